"""Two real ranks (torch.distributed on CPU, gloo, through accelerate) train like one process.

One 2-rank launch does three runs of the same tiny nano recipe (global batch 8, data.lanes=2):
  two   uninterrupted at world size 2;
  cut   at world size 2, rank 1 alone asked to stop after step 3 (both must stop there);
  grow  a world-size-1 run interrupted at step 3, resumed at world size 2;
  fsdp  uninterrupted at world size 2 with distributed.strategy=fsdp (FSDP2 on gloo), with sample
        grids (rank 0 samples from the gathered EMA);
  fsdp-cut  the same, rank 1 alone asked to stop after step STOP_AT, resumed sharded.
The pytest process then runs the references at world size 1 (batch 8; and micro-batches of 4 with
gradient accumulation 2) and resumes `cut` at world size 1, and compares weights and loss curves.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from budget_lab.train import Trainer
from tests.helpers import tiny_run_config

STOP_AT = 2
STEPS = 4
# Adam turns gradients that differ in the last bits (another summation order) into weight
# differences of ~1e-5 after a few steps; another batch or other noise moves them by ~1e-3.
TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}


def _config(data_dir: Path, *extra: str):
    """Phase 0: 3 masked steps, phase 1: 1 step, global batch 8, a checkpoint every 3 steps."""
    return tiny_run_config(
        data_dir, "phases.0.steps=3", "phases.1.steps=1", "data.lanes=2", "seed=11", *extra
    )


def _rank_main(rank: int, port: int, data_dir: str, root: str) -> None:
    """One rank of the 2-rank launch (spawned: a fresh interpreter)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
    )
    torch.set_num_threads(1)
    root_dir = Path(root)
    writes: list[str] = []
    if rank != 0:  # every file rank 1 opens for writing in the run folders

        def audit(event: str, args: tuple) -> None:
            if (
                event == "open"
                and str(args[0]).startswith(root)
                and (
                    (args[1] is not None and any(c in args[1] for c in "wax+"))
                    or (
                        isinstance(args[2], int)
                        and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
                    )
                )
            ):
                writes.append(str(args[0]))

        sys.addaudithook(audit)
    cfg = _config(Path(data_dir))
    Trainer(cfg, root_dir / "two", progress=False).run()
    stop = STOP_AT if rank == 1 else None  # a signal that reached one rank only
    Trainer(cfg, root_dir / "cut", progress=False, stop_at_step=stop).run()
    # STOP_AT is not a checkpoint interval (every 3): the stop itself saved it on both ranks.
    Trainer(cfg, root_dir / "grow", progress=False).run()
    fsdp = _config(Path(data_dir), "distributed.strategy=fsdp")
    Trainer(fsdp, root_dir / "fsdp-cut", progress=False, stop_at_step=stop).run()
    Trainer(fsdp, root_dir / "fsdp-cut", progress=False).run()  # the full state, sharded again
    grids = _config(Path(data_dir), "distributed.strategy=fsdp", "eval.grid_size=2")
    Trainer(grids, root_dir / "fsdp", progress=False).run()
    if rank != 0:  # next to the run folders, not in them
        Path(root + "-rank1-writes.json").write_text(json.dumps(writes))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _latest(run_dir: Path) -> dict:
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(latest, weights_only=True)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = _latest(run_dir)
    return {"model." + k: v for k, v in ckpt["model"].items()} | {
        "ema." + k: v for k, v in ckpt["ema"].items() if torch.is_floating_point(v)
    }


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TOLERANCE, msg=name)


@pytest.fixture(scope="module")
def two_rank_runs(train_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    cfg = _config(train_data_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # The world-size-1 run that `grow` resumes at world size 2.
        Trainer(cfg, root / "grow", progress=False, stop_at_step=STOP_AT).run()
        mp.start_processes(
            _rank_main,
            args=(_free_port(), str(train_data_dir), str(root)),
            nprocs=2,
            join=True,
            start_method="spawn",
        )
        Trainer(cfg, root / "one", progress=False).run()
        accum = _config(
            train_data_dir, "phases.0.micro_batch_size=4", "phases.1.micro_batch_size=4"
        )
        Trainer(accum, root / "accum", progress=False).run()
        shutil.copytree(root / "cut", root / "shrink")
        Trainer(cfg, root / "shrink", progress=False).run()  # 2 -> 1
    finally:
        torch.set_num_threads(threads)
    return root


def test_two_ranks_and_accumulation_train_like_one_process(two_rank_runs: Path):
    one = _weights(two_rank_runs / "one")
    for name in ("two", "accum"):
        _assert_close(_weights(two_rank_runs / name), one)
        steps, losses = zip(*_losses(two_rank_runs / name), strict=True)
        ref_steps, ref_losses = zip(*_losses(two_rank_runs / "one"), strict=True)
        assert (
            steps == ref_steps == tuple(range(1, STEPS + 1))
        )  # one row per step: rank 0 alone logs
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0
        )


def test_one_signalled_rank_stops_both_at_the_same_step(two_rank_runs: Path):
    cut = two_rank_runs / "cut"
    result = json.loads((cut / "result.json").read_text())
    assert result["status"] == "interrupted" and result["global_step"] == STOP_AT
    assert [
        json.loads(r)["step"] for r in (cut / "checkpoints.jsonl").read_text().splitlines()
    ] == [STOP_AT]
    assert _losses(cut)[-1][0] == STOP_AT


def test_only_rank_0_writes_the_run_folder(two_rank_runs: Path):
    writes = json.loads(Path(f"{two_rank_runs}-rank1-writes.json").read_text())
    assert writes == []
    for name in ("two", "cut"):
        rows = (two_rank_runs / name / "checkpoints.jsonl").read_text().splitlines()
        assert len(rows) == len({json.loads(r)["step"] for r in rows})  # each checkpoint once


def test_resume_on_another_world_size(two_rank_runs: Path):
    one = _weights(two_rank_runs / "one")
    for name in ("shrink", "grow"):  # 2 -> 1 and 1 -> 2, the global batch unchanged
        result = json.loads((two_rank_runs / name / "result.json").read_text())
        assert result["status"] == "completed" and result["images_seen"] == STEPS * 8
        _assert_close(_weights(two_rank_runs / name), one)
        ref = dict(_losses(two_rank_runs / "one"))
        for step, loss in _losses(two_rank_runs / name)[STOP_AT:]:
            assert loss == pytest.approx(ref[step], rel=1e-5)


def test_fsdp_trains_like_one_process_and_saves_the_full_state(two_rank_runs: Path):
    one = _weights(two_rank_runs / "one")
    ref_losses = dict(_losses(two_rank_runs / "one"))
    for name in ("fsdp", "fsdp-cut"):  # sharded from the start, and resumed from a stop
        run = two_rank_runs / name
        assert json.loads((run / "result.json").read_text())["status"] == "completed"
        _assert_close(_weights(run), one)
        for step, loss in _losses(run):
            assert loss == pytest.approx(ref_losses[step], rel=1e-5)
    cut_steps = [
        json.loads(r)["step"]
        for r in (two_rank_runs / "fsdp-cut" / "checkpoints.jsonl").read_text().splitlines()
    ]
    assert cut_steps == [STOP_AT, 3, STEPS]  # both ranks stopped at STOP_AT, then resumed
    # Rank 0 sampled each phase's grid from the gathered EMA weights.
    assert sorted(p.name for p in (two_rank_runs / "fsdp" / "samples").iterdir()) == [
        "00-masked-pretrain.png", "01-finetune.png"
    ]  # fmt: skip
    # The checkpoint is the full state, laid out as without FSDP: any world size, either strategy
    # resumes it. The MoE experts (sharded by expert) came back whole.
    sharded, plain = _latest(two_rank_runs / "fsdp"), _latest(two_rank_runs / "two")
    for part in ("model", "ema"):
        assert {k: v.shape for k, v in sharded[part].items()} == {
            k: v.shape for k, v in plain[part].items()
        }
    assert sharded["model"]["blocks.1.ffn.w1"].shape[0] == 4  # all 4 experts
    s_opt, p_opt = (c["phase_states"]["optimizer"] for c in (sharded, plain))
    assert s_opt["param_groups"] == p_opt["param_groups"]
    assert {i: {k: v.shape for k, v in st.items()} for i, st in s_opt["state"].items()} == {
        i: {k: v.shape for k, v in st.items()} for i, st in p_opt["state"].items()
    }
