"""The phased trainer on real shards: end to end, exact resume, checkpoint fallback, NaN, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from budget_lab.cli import main as cli_main
from budget_lab.config import compose_run, model_config
from budget_lab.errors import ConfigError, TrainingError
from budget_lab.io import yaml_dump, yaml_load
from budget_lab.train import CheckpointStore, Trainer, lr_factor, read_result
from budget_lab.train import trainer as trainer_module
from budget_lab.train.optim import param_groups
from model.microdit import MicroDiT

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(data_dir, *extra):
    """Two phases (masked then unmasked), batch 8, on the nano preset."""
    return compose_run(
        "nano",
        [
            f"data.path={data_dir}",
            "phases.0.steps=5",
            "phases.0.warmup_steps=2",
            "phases.0.batch_size=8",
            "phases.1.steps=4",
            "phases.1.batch_size=8",
            "checkpoint.every=3",
            "log_every=1",
            "eval.grid_size=4",
            "eval.sampler_steps=2",
            *extra,
        ],
    )


def weights(run_dir):
    ckpt, _ = CheckpointStore(Path(run_dir) / "checkpoints").load_latest()
    return ckpt


def test_two_phase_run_end_to_end(train_data_dir, tmp_path):
    run = tmp_path / "run"
    result = Trainer(tiny_cfg(train_data_dir), run, progress=False).run()
    assert result["status"] == "completed" and result["global_step"] == 9
    assert result["images_seen"] == 9 * 8
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert [r["phase"] for r in rows] == ["masked-pretrain"] * 5 + ["finetune"] * 4
    assert {r["mask_ratio"] for r in rows[:5]} == {0.75} and {
        r["mask_ratio"] for r in rows[5:]
    } == {0.0}
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 and r["lr"] > 0 for r in rows)
    assert (run / "config.yaml").is_file() and read_result(run)["status"] == "completed"
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "00-masked-pretrain.png",
        "01-finetune.png",
    ]
    ckpts = CheckpointStore(run / "checkpoints").list()
    assert [p.name for p in ckpts] == ["step-000000009.pt", "step-000000006.pt"]  # keep=2


@pytest.mark.parametrize("stop_at", [2, 7])  # inside phase 0, and inside phase 1
def test_resume_is_bit_identical(train_data_dir, tmp_path, stop_at):
    cfg = tiny_cfg(train_data_dir)
    Trainer(cfg, tmp_path / "straight", progress=False).run()

    interrupted = Trainer(cfg, tmp_path / "resumed", progress=False, stop_at_step=stop_at).run()
    assert interrupted["status"] == "interrupted" and interrupted["global_step"] == stop_at
    resumed = Trainer(cfg, tmp_path / "resumed", progress=False).run()
    assert resumed["status"] == "completed" and resumed["global_step"] == 9

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert torch.equal(a["rng"]["gen"], b["rng"]["gen"])
    rows = [json.loads(r) for r in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()]
    # The second segment continued after the checkpoint instead of starting over.
    assert [r["step"] for r in rows if r["segment"] == 1] == list(range(stop_at + 1, 10))


def test_resume_from_a_different_run_diverges(train_data_dir, tmp_path):
    # The bit-identical test above must be able to fail: another seed gives other weights.
    Trainer(tiny_cfg(train_data_dir), tmp_path / "a", progress=False).run()
    Trainer(tiny_cfg(train_data_dir, "seed=1"), tmp_path / "b", progress=False).run()
    a, b = weights(tmp_path / "a")["model"], weights(tmp_path / "b")["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_corrupt_latest_checkpoint_falls_back(train_data_dir, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_cfg(train_data_dir), run, progress=False).run()
    store = CheckpointStore(run / "checkpoints")
    latest = store.latest_path()
    assert latest.name == "step-000000009.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # torn file
    with pytest.warns(UserWarning, match="step-000000009.pt is unreadable"):
        ckpt, path = store.load_latest()
    assert path.name == "step-000000006.pt" and ckpt["global_step"] == 6
    assert (run / "checkpoints" / "step-000000009.pt.corrupt").exists()
    # Training picks up from the fallback and finishes again.
    result = Trainer(tiny_cfg(train_data_dir), run, progress=False).run()
    assert result["status"] == "completed" and result["global_step"] == 9


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, keep=2)
    store.save(1, {"model": {"w": torch.ones(2)}})

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        store.save(2, {"model": {"w": torch.zeros(2)}})
    monkeypatch.undo()
    assert store.latest_path().name == "step-000000001.pt"
    assert [
        p.name for p in tmp_path.iterdir() if not p.name.startswith("step-") and p.name != "latest"
    ] == []
    ckpt, _ = store.load_latest()
    assert torch.equal(ckpt["model"]["w"], torch.ones(2))


def test_non_finite_loss_fails_clearly_and_keeps_checkpoints(train_data_dir, tmp_path, monkeypatch):
    real_loss = trainer_module.edm_loss
    calls = {"n": 0}

    def loss_that_explodes(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(trainer_module, "edm_loss", loss_that_explodes)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite loss .* step 4") as err:
        Trainer(tiny_cfg(train_data_dir), run, progress=False).run()
    assert "step-000000003.pt" in str(err.value)
    result = read_result(run)
    assert result["status"] == "failed" and "non-finite" in result["error"]
    assert CheckpointStore(run / "checkpoints").latest_path().name == "step-000000003.pt"


def test_changed_config_on_resume_is_refused(train_data_dir, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_cfg(train_data_dir), run, progress=False, stop_at_step=2).run()
    with pytest.raises(ConfigError, match="differs in: phases"):
        Trainer(tiny_cfg(train_data_dir, "phases.0.lr=0.1"), run, progress=False).run()
    # A run folder written before a field existed (here: distributed) resumes with its default.
    saved = yaml_load((run / "config.yaml").read_text())
    saved.pop("distributed")
    (run / "config.yaml").write_text(yaml_dump(saved))
    Trainer(tiny_cfg(train_data_dir), run, progress=False)._prepare_run_dir()


def test_lr_schedule():
    cfg = compose_run("nano", ["phases.0.steps=100", "phases.0.warmup_steps=10"])
    phase = cfg.phases[0]
    assert lr_factor(phase, 0) == pytest.approx(0.1)
    assert lr_factor(phase, 9) == pytest.approx(1.0)
    assert lr_factor(phase, 10) == pytest.approx(1.0)
    assert lr_factor(phase, 99) == pytest.approx(phase.min_lr_ratio, abs=1e-3)
    assert lr_factor(cfg.phases[1], 50) == 1.0  # constant
    # A phase that ends at a dollar figure: the decay follows the dollars when they run ahead.
    assert lr_factor(phase, 30, budget_progress=1.0) == pytest.approx(phase.min_lr_ratio)
    assert lr_factor(phase, 30, budget_progress=0.0) == pytest.approx(lr_factor(phase, 30))
    assert lr_factor(phase, 5, budget_progress=0.9) == pytest.approx(0.6)  # warmup by steps
    assert lr_factor(cfg.phases[1], 50, budget_progress=0.9) == 1.0


def test_a_dollar_bounded_phase_ends_its_schedule_with_its_dollars(train_data_dir, tmp_path):
    """A sweep trial's job (fid_at_budget) tells the trainer how far each phase is through its
    dollars; the phase's cosine then ends with its budget, not at its (padded) step count."""
    from budget_lab.launch.job import EvalPlan, TrainJob

    cfg = tiny_cfg(train_data_dir)
    run = tmp_path / "run"
    run.mkdir()
    price = 3600.0  # $ per device-hour: $1 a second of the segment
    plan = EvalPlan(final_eval=False, stop_at_usd=100.0, phase_end_usd=[40.0])
    job = TrainJob(str(run), {}, usd_per_device_hour=price, devices=1, eval_plan=plan)
    trainer = Trainer(cfg, run, progress=False)
    job._trainer, job._attempt, job._rungs_done = trainer, 0, set()
    start = time.time()
    row = {"event": "start", "attempt": 0, "job_id": "t", "host": "h", "pid": os.getpid()}
    (run / "segments.jsonl").write_text(json.dumps({**row, "devices": 1, "time": start - 30}))
    info = {"state": {"global_step": 3}, "phase": cfg.phases[0], "phase_done": False}
    job._after_step({**info, "phase_index": 0, "last_phase": False})
    assert trainer.budget_progress == pytest.approx(30 / 40, abs=0.05)  # $30 of the first $40
    (run / "segments.jsonl").write_text(json.dumps({**row, "devices": 1, "time": start - 70}))
    job._spent_before = None
    job._after_step({**info, "phase": cfg.phases[1], "phase_index": 1, "last_phase": True})
    assert trainer.budget_progress == pytest.approx(30 / 60, abs=0.05)  # $30 of $40..$100


def test_moe_parameters_get_their_own_learning_rate(train_data_dir, tmp_path, monkeypatch):
    seen = {}
    real_adamw = torch.optim.AdamW

    def spy(groups, **kw):
        seen["groups"] = [(g["lr"], len(g["params"])) for g in groups]
        return real_adamw(groups, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    Trainer(
        tiny_cfg(train_data_dir, "phases.0.steps=2", "phases.0.warmup_steps=0"),
        tmp_path / "r",
        progress=False,
        stop_at_step=1,
    ).run()
    lrs = sorted({lr for lr, _ in seen["groups"]})
    assert lrs == [pytest.approx(1e-3), pytest.approx(2e-3)]  # moe_lr_scale 0.5 of phase lr 2e-3


def test_param_groups_keep_their_order(train_data_dir):
    # A checkpoint's optimizer state is matched to the groups by position: (MoE?, matrix?) in
    # sorted order, each parameter in exactly one group, at its group's lr and weight decay.
    cfg = tiny_cfg(train_data_dir)
    net = MicroDiT(model_config(cfg))
    groups = param_groups(net, cfg.optim, lr=2e-3)
    moe = {id(p) for name, p in net.named_parameters() if name in net.moe_parameter_names()}
    kinds = []
    for g in groups:
        (kind,) = {(id(p) in moe, p.ndim >= 2) for p in g["params"]}
        assert g["lr"] == pytest.approx(2e-3 * (cfg.optim.moe_lr_scale if kind[0] else 1.0))
        assert g["weight_decay"] == (cfg.optim.weight_decay if kind[1] else 0.0)
        kinds.append(kind)
    assert kinds == sorted(set(kinds)) and (True, True) in kinds  # nano has MoE matrices
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in net.parameters())


def run_cli(args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "budget_lab", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_user_mistakes_exit_2_without_traceback(tmp_path, capsys):
    assert cli_main(["train", "--recipe", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'no-such-recipe'" in err and "nano" in err and "Traceback" not in err
    assert cli_main(["train", "phases.0.mask_ratio=1.5", "--dry-run"]) == 2
    assert "mask_ratio=1.5" in capsys.readouterr().err
    assert (
        cli_main(["train", f"data.path={tmp_path / 'nothing'}", "--run-dir", str(tmp_path / "r")])
        == 2
    )
    err = capsys.readouterr().err
    assert "budget-lab data synth" in err and "Traceback" not in err
    assert cli_main(["eval", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_sigterm_checkpoints_and_stops_then_resumes(train_data_dir, tmp_path):
    run = tmp_path / "run"
    args = [
        "train",
        f"data.path={train_data_dir}",
        "phases.0.steps=400",
        "phases.0.batch_size=8",
        "phases.1.steps=1",
        "phases.1.batch_size=8",
        "checkpoint.every=1000",
        "log_every=1",
        "eval.grid_size=0",
        "--run-dir",
        str(run),
        "--no-progress",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "budget_lab", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (
        metrics.is_file() and len(metrics.read_text().splitlines()) >= 3
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "interrupted" in out
    result = read_result(run)
    assert result["status"] == "interrupted" and 3 <= result["global_step"] < 400
    ckpt = weights(run)
    assert ckpt["global_step"] == result["global_step"]  # saved at the step it stopped


def test_wandb_offline_run_is_resumed_not_duplicated(train_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    cfg = tiny_cfg(train_data_dir, "wandb.enabled=true", "eval.grid_size=0")
    Trainer(cfg, run, progress=False, stop_at_step=4).run()
    Trainer(cfg, run, progress=False).run()
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # two segments...
    ids = {p.name.rsplit("-", 1)[-1] for p in runs}
    assert len(ids) == 1  # ...of one W&B run
    assert not any("WANDB_API_KEY" in p.read_text(errors="ignore") for p in run.rglob("*.yaml"))


def test_phase_end_request_moves_to_the_next_phase(train_data_dir, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(tiny_cfg(train_data_dir), run, progress=False)

    def end_pretraining_early(info):
        if info["phase_index"] == 0 and info["state"]["phase_step"] == 2:
            trainer.request_phase_end()

    trainer.step_callback = end_pretraining_early
    result = trainer.run()
    assert result["status"] == "completed"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in rows]
    assert phases.count("masked-pretrain") == 3  # ended at the step after the request
    assert phases.count("finetune") == 4  # the last phase ran in full
