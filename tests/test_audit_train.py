"""Audit findings (issue 15) on the trainer and its checkpoints: planted pickles are refused, read
errors never throw checkpoints away, W&B and sample grids never fail a run, orphan temp files go."""

from __future__ import annotations

import errno
import warnings
from pathlib import Path

import pytest
import torch

from budget_lab.config import run_config_to_dict
from budget_lab.eval.evaluate import load_run_model
from budget_lab.io import yaml_dump
from budget_lab.report import wandb_log
from budget_lab.train import CheckpointStore, Trainer, TrainState, read_result
from budget_lab.train import trainer as trainer_module
from budget_lab.train.checkpoint import CheckpointError
from tests.helpers import tiny_run_config


def short_cfg(data_dir, *extra):
    """2 masked + 1 finetune steps at batch 8, a checkpoint every step: a run in ~2 s."""
    return tiny_run_config(
        data_dir, "phases.0.steps=2", "phases.1.steps=1", "checkpoint.every=1", *extra
    )


def _write_checkpoints(directory: Path, steps=(1, 2)) -> CheckpointStore:
    store = CheckpointStore(directory, keep=5)
    for step in steps:
        store.save(step, {"model": {"w": torch.full((3,), float(step))}, "global_step": step})
    return store


# -- 2. a checkpoint cannot run code ------------------------------------------------------------


class _Planted:
    """Unpickling this writes a marker file: what a planted checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_planted_pickle_checkpoint_is_refused_and_never_runs(train_data_dir, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml_dump(run_config_to_dict(short_cfg(train_data_dir))))
    store = _write_checkpoints(run / "checkpoints", steps=(1,))
    marker = tmp_path / "marker"
    planted = store.save(2, {"model": {}, "payload": _Planted(marker)})  # `latest` names it

    for load in (lambda: load_run_model(run), lambda: store.load_latest()):  # eval, the trainer
        with pytest.raises(CheckpointError, match=r"refused to load checkpoint .*step-000000002"):
            load()
    assert not marker.exists()  # the pickle's code never ran
    assert planted.is_file()  # left in place for inspection, not silently skipped

    # Nor through the trainer: the run fails clearly, with the reason in result.json.
    with pytest.raises(CheckpointError, match="refused"):
        Trainer(short_cfg(train_data_dir), run, progress=False).run()
    assert not marker.exists()
    result = read_result(run)
    assert result["status"] == "failed" and "refused to load" in result["error"]


def test_real_checkpoint_loads_weights_only(train_data_dir, tmp_path):
    # Everything a real checkpoint holds (optimizer, scheduler, loader position, RNG states, EMA)
    # loads with weights_only=True; exact resume itself: tests/test_train.py.
    run = tmp_path / "run"
    Trainer(short_cfg(train_data_dir), run, progress=False, stop_at_step=1).run()
    path = CheckpointStore(run / "checkpoints").latest_path()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == 1 and ckpt["phase_states"]["loader"]["batch"] == 1
    assert list(ckpt) == [  # what `checkpoint_payload` writes: old checkpoints load as they are
        "version", "model", "ema", "phase_states", "rng", "segment", "phase_name", "world_size",
        "phase", "phase_step", "global_step", "images_seen", "train_seconds",
    ]  # fmt: skip
    assert TrainState.from_payload(ckpt) == TrainState(0, 1, 1, 8, ckpt["train_seconds"])
    result = Trainer(short_cfg(train_data_dir), run, progress=False).run()
    assert result["status"] == "completed" and result["global_step"] == 3


# -- 8. a read error never throws checkpoints away -----------------------------------------------


def _flaky_torch_load(monkeypatch, failures: int):
    real_load = torch.load
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= failures:
            raise OSError(errno.EIO, "Input/output error", str(args[0]))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", flaky)
    monkeypatch.setattr(CheckpointStore, "io_retry_delays", (0.01, 0.01, 0.01), raising=False)
    return calls


def test_transient_io_error_is_retried(tmp_path, monkeypatch):
    store = _write_checkpoints(tmp_path)
    calls = _flaky_torch_load(monkeypatch, failures=2)
    ckpt, path = store.load_latest()
    assert path.name == "step-000000002.pt" and ckpt["global_step"] == 2  # the newest, not older
    assert calls["n"] == 3
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [
        "step-000000001.pt",
        "step-000000002.pt",
    ]


def test_persistent_io_error_raises_and_keeps_every_checkpoint(
    train_data_dir, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    Trainer(short_cfg(train_data_dir), run, progress=False, stop_at_step=2).run()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    _flaky_torch_load(monkeypatch, failures=10**6)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*step-000000002.pt.*EIO"):
        Trainer(short_cfg(train_data_dir), run, progress=False).run()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing renamed
    result = read_result(run)
    assert result["status"] == "failed" and "cannot read checkpoint" in result["error"]
    monkeypatch.undo()  # the disk is back: the run resumes where it was, not at step 0
    resumed = Trainer(short_cfg(train_data_dir), run, progress=False).run()
    assert resumed["status"] == "completed" and resumed["segment"] == 1


def test_truncated_latest_falls_back_and_is_quarantined(tmp_path):
    store = _write_checkpoints(tmp_path)
    newest = store.path_for(2)
    newest.write_bytes(newest.read_bytes()[:200])
    with pytest.warns(UserWarning, match="step-000000002.pt is unreadable"):
        ckpt, path = store.load_latest()
    assert path.name == "step-000000001.pt" and ckpt["global_step"] == 1
    assert (tmp_path / "step-000000002.pt.corrupt").is_file()
    assert store.path_for(1).is_file()  # the good one stays


def test_when_no_checkpoint_loads_none_is_moved_and_the_run_does_not_restart(
    train_data_dir, tmp_path
):
    run = tmp_path / "run"
    Trainer(short_cfg(train_data_dir), run, progress=False, stop_at_step=2).run()
    store = CheckpointStore(run / "checkpoints")
    for path in store.list():
        path.write_bytes(path.read_bytes()[:100])
    before = sorted(p.name for p in store.dir.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="no checkpoint .* loads"):
            Trainer(short_cfg(train_data_dir), run, progress=False).run()
    assert sorted(p.name for p in store.dir.iterdir()) == before  # nothing quarantined
    assert read_result(run)["status"] == "failed"
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2  # no step trained from scratch


# -- 13. orphan temporary checkpoint files ---------------------------------------------------------


def test_orphan_temp_files_are_removed_at_save_and_at_start(train_data_dir, tmp_path):
    store = _write_checkpoints(tmp_path / "a", steps=(1,))
    orphans = [store.dir / ".step-000000002.pt.k3j4h5g6.tmp", store.dir / ".latest.a1b2c3d4.tmp"]
    others = [store.dir / "notes.tmp", store.dir / "step-000000001.pt.corrupt"]
    for path in orphans + others:
        path.write_bytes(b"x" * 1000)
    store.save(3, {"model": {}})
    assert not any(p.exists() for p in orphans)
    assert all(p.exists() for p in others) and store.path_for(1).is_file()
    assert store.latest_path().name == "step-000000003.pt"

    run = tmp_path / "run"  # a run killed mid-save: the orphan goes when it resumes
    Trainer(short_cfg(train_data_dir), run, progress=False, stop_at_step=1).run()
    orphan = run / "checkpoints" / ".step-000000002.pt.zz9y8x7w.tmp"
    orphan.write_bytes(b"x" * 1000)
    store = CheckpointStore(run / "checkpoints")
    assert store.load_latest() is not None and orphan.exists()  # a reader leaves it alone
    Trainer(short_cfg(train_data_dir), run, progress=False, stop_at_step=1).run()
    assert not orphan.exists()
    assert store.latest_path().name == "step-000000002.pt"


# -- 9. W&B never fails a run ---------------------------------------------------------------------


@pytest.fixture
def wandb_env(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", "fake" + "0" * 36)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    return monkeypatch


def test_wandb_with_a_key_but_no_network_logs_offline_and_the_run_completes(
    train_data_dir, tmp_path, wandb_env
):
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="W&B: cannot reach http://127.0.0.1:9"):
        result = Trainer(short_cfg(train_data_dir, "wandb.enabled=true"), run, progress=False).run()
    assert result["status"] == "completed" and read_result(run)["status"] == "completed"
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1


def test_wandb_mode_from_the_environment_is_honoured(train_data_dir, tmp_path, wandb_env):
    assert wandb_log.wandb_mode("auto") == "online"  # a key: online...
    wandb_env.setenv("WANDB_MODE", "offline")
    assert wandb_log.wandb_mode("auto") == "offline"  # ...unless the environment says otherwise
    assert wandb_log.wandb_mode("online") == "offline"
    wandb_env.setenv("WANDB_MODE", "disabled")
    assert wandb_log.wandb_mode("auto") == "disabled"

    wandb_env.setenv("WANDB_MODE", "offline")
    wandb_env.setattr(wandb_log, "service_reachable", lambda *a: pytest.fail("probed the net"))
    run = tmp_path / "run"
    result = Trainer(short_cfg(train_data_dir, "wandb.enabled=true"), run, progress=False).run()
    assert result["status"] == "completed"
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1


def test_a_wandb_error_is_a_warning_not_a_failed_run(train_data_dir, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")

    def broken_init(*args, **kwargs):
        raise RuntimeError("wandb service crashed")

    monkeypatch.setattr(wandb, "init", broken_init)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="W&B could not start .*wandb service crashed"):
        result = Trainer(short_cfg(train_data_dir, "wandb.enabled=true"), run, progress=False).run()
    assert result["status"] == "completed" and read_result(run)["status"] == "completed"

    class BrokenRun:  # started, then fails while logging and finishing
        def __init__(self):
            self.finished = 0

        def define_metric(self, *a, **k):
            pass

        def log(self, data):
            raise ConnectionError("network went away")

        def finish(self):
            self.finished += 1
            raise ConnectionError("network went away")

    broken = BrokenRun()
    monkeypatch.setattr(wandb, "init", lambda *a, **k: broken)
    with pytest.warns(UserWarning, match="W&B logging failed"):
        result = Trainer(
            short_cfg(train_data_dir, "wandb.enabled=true"), tmp_path / "run2", progress=False
        ).run()
    assert result["status"] == "completed" and broken.finished == 1


# -- 12. a cosmetic step never fails a run ----------------------------------------------------------


def test_sample_grid_larger_than_the_validation_split_does_not_fail_the_run(
    train_data_dir, tmp_path
):
    # 16 validation images; a 25-image grid cannot be made from them.
    run = tmp_path / "run"
    cfg = short_cfg(train_data_dir, "eval.grid_size=25", "eval.sampler_steps=1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = Trainer(cfg, run, progress=False).run()
    assert result["status"] == "completed" and result["global_step"] == 3
    assert read_result(run)["status"] == "completed"
    made = (
        sorted(p.name for p in (run / "samples").glob("*.png"))
        if (run / "samples").is_dir()
        else []
    )
    grid_warnings = [str(w.message) for w in caught if "sample grid" in str(w.message)]
    assert len(made) + len(grid_warnings) == 2, (made, grid_warnings)  # each phase: grid or warning


def test_a_failing_sample_grid_warns_and_training_goes_on(train_data_dir, tmp_path, monkeypatch):
    def no_val_split(*args, **kwargs):
        raise FileNotFoundError("no val split in the manifest")

    monkeypatch.setattr(trainer_module, "sample_grid_for_run", no_val_split)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="no sample grid for phase 'masked-pretrain'"):
        result = Trainer(short_cfg(train_data_dir, "eval.grid_size=4"), run, progress=False).run()
    assert result["status"] == "completed" and result["global_step"] == 3


def test_failing_cost_fn_does_not_fail_the_run(train_data_dir, tmp_path):
    def cost_fn():
        raise OSError("ledger unreachable")

    with pytest.warns(UserWarning, match="cost_fn failed"):
        result = Trainer(
            short_cfg(train_data_dir), tmp_path / "run", progress=False, cost_fn=cost_fn
        ).run()
    assert result["status"] == "completed"


def test_the_sweep_summary_run_also_falls_back_offline(tmp_path, wandb_env):
    """Item 9 for the sweep's W&B summary run: a key but no network logs it offline (it used to
    try the service and fail the sweep's outputs)."""
    from budget_lab.report.data import ReportData
    from budget_lab.report.wandb_report import open_summary_run

    data = ReportData("Sweep tiny", "tiny", "pareto", "(F, C)")
    with pytest.warns(UserWarning, match="W&B service unreachable"):
        run = open_summary_run(data, "budget-lab-test", dir=tmp_path)
    try:
        assert run.settings.mode == "offline"
    finally:
        run.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_status_never_unpickles_a_result_outside_the_workspace_jobs(tmp_path):
    """Item 2 for submitit's result pickles: a launch.json planted in a run folder that points at
    a folder outside the workspace's jobs/ is not read (reading a pickle runs its code)."""
    import json
    import pickle

    from budget_lab.launch.status import run_status

    marker = tmp_path / "pwned"
    evil = tmp_path / "elsewhere"
    evil.mkdir()

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (evil / "123_0_result.pkl").write_bytes(pickle.dumps(Payload()))
    run_dir = tmp_path / "ws" / "runs" / "victim"
    run_dir.mkdir(parents=True)
    record = {
        "run": "victim", "run_dir": str(run_dir), "cluster": "local", "executor": "local",
        "launch_id": "x", "submitit_folder": str(evil), "job_ids": ["123"], "nodes": 1,
        "gpus_per_node": 0, "tasks_per_node": 1,
    }  # fmt: skip
    (run_dir / "launch.json").write_text(json.dumps(record))
    run_status(run_dir, scheduler=False)
    assert not marker.exists()
