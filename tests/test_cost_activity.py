"""Dollars that match the bill (issue 16): each segment's dollars split by phase and activity
from the run's own clock (activity.jsonl), a preemption's waste in the phase that lost it,
calibration that learns from a settled run, `sweep --dry-run`, and one price model for the live
and the settled figure (fixed, on-demand, AWS spot through moto)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from moto import mock_aws

from budget_lab.launch.activity import ActivityLog
from budget_lab.launch.cluster import load_cluster
from budget_lab.launch.job import TrainJob
from budget_lab.ledger import Ledger, estimate_run, sync_run
from budget_lab.ledger.calibration import Calibration, learn_from_run
from budget_lab.train.trainer import Trainer
from budget_lab.units import usd
from budget_lab.workspace import Workspace
from tests.helpers import tiny_run_config

T0 = 1_795_000_000.0
RATE = 0.10  # clusters/local.yaml: $ per machine-hour


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _launch_json(run: Path, cluster: str = "local") -> None:
    (run / "launch.json").write_text(
        json.dumps(
            {"run": run.name, "run_dir": str(run), "cluster": cluster, "executor": "local",
             "launch_id": "L1", "job_ids": ["1"], "nodes": 1, "gpus_per_node": 0,
             "sweep": None, "trial": None, "created_at": T0}
        )
    )  # fmt: skip


@pytest.fixture(scope="module")
def two_phase_run(train_data_dir, tmp_path_factory):
    """A real two-phase run trained in one job segment, written as the job wrapper writes it:
    segments.jsonl start and end rows around the trainer, its activity spans in between."""
    ws = Workspace(tmp_path_factory.mktemp("split") / "ws").ensure()
    cfg = tiny_run_config(train_data_dir)
    run = ws.run_dir("two-phase")
    run.mkdir(parents=True)
    _launch_json(run)
    start = time.time()
    segment = {"event": "start", "attempt": 0, "job_id": "1", "host": socket.gethostname()}
    segment |= {"pid": os.getpid(), "devices": 1, "nice": 0, "time": start}
    activity = ActivityLog(run, 0, start=start)
    Trainer(cfg, run, progress=False, activity=activity).run()
    end = time.time()
    activity.close(now=end)
    _write_jsonl(
        run / "segments.jsonl",
        [segment, {"event": "end", "attempt": 0, "status": "completed", "time": end}],
    )
    return ws, cfg, run


def test_a_single_job_two_phase_run_is_split_by_phase_and_activity(two_phase_run):
    ws, cfg, run = two_phase_run
    pretrain, finetune = (p.name for p in cfg.phases)
    rows = [json.loads(line) for line in (run / "activity.jsonl").read_text().splitlines()]
    assert {r["activity"] for r in rows} >= {"startup", "train", "checkpoint", "other"}
    assert {r["phase"] for r in rows} == {pretrain, finetune}
    with Ledger.for_workspace(ws) as ledger:
        (seg,) = sync_run(ledger, run, load_cluster("local"))
        by_phase = {r.group: r for r in ledger.report("phase", run=run.name)}
        by_activity = {r.group: r for r in ledger.report("activity", run=run.name)}
        total = ledger.spent(run=run.name)
    # The split never changes the bill.
    assert sum(p.cost_usd for p in seg.parts) == pytest.approx(seg.cost_usd, rel=1e-12)
    assert total == pytest.approx(seg.cost_usd, rel=1e-12)
    assert sum(r.cost_usd for r in by_phase.values()) == pytest.approx(total, rel=1e-12)
    assert sum(r.cost_usd for r in by_activity.values()) == pytest.approx(total, rel=1e-12)
    # One job, both phases, each charged for its own time on the run's clock.
    assert set(by_phase) == {pretrain, finetune}
    for phase in (pretrain, finetune):
        seconds = sum(r["end"] - r["start"] for r in rows if r["phase"] == phase)
        assert by_phase[phase].cost_usd == pytest.approx(seconds / 3600 * RATE, rel=1e-9)
    # Checkpoint writes (4: steps 3, 6, 9, 10) are carved out of the phases' training time.
    assert sum(1 for r in rows if r["activity"] == "checkpoint") == 4
    assert by_activity["checkpoint"].cost_usd > 0 and by_activity["train"].cost_usd > 0
    assert by_activity["startup"].cost_usd > 0


def test_calibration_learns_from_a_settled_run_and_the_next_estimate_uses_it(two_phase_run):
    ws, cfg, run = two_phase_run
    cluster = load_cluster("local")
    before = estimate_run(cfg, cluster, ws)
    assert {p.source for p in before.phases} == {"reference"}
    assert before.overhead_sources["startup"] == "reference"
    with Ledger.for_workspace(ws) as ledger:
        sync_run(ledger, run, cluster)
        settled = ledger.spent(run=run.name)
        learned = learn_from_run(ws, run, cluster, ledger)
    assert {e.activity for e in learned} >= {"startup", "train", "checkpoint", "other"}
    saved = Calibration.load(ws).activities
    assert {e.source for e in saved} == {f"run:{run.name}"}
    after = estimate_run(cfg, cluster, ws)
    assert all(p.source == f"run:{run.name} (wall clock)" for p in after.phases)
    assert after.overhead_sources["startup"] == f"run:{run.name}"
    # The same job estimated from what it measured: within 20 % of what the ledger settled.
    assert abs(settled / after.usd - 1) <= 0.2, (settled, after.usd, before.usd)


def test_a_preempted_segments_waste_lands_in_the_phase_that_lost_it(tmp_path):
    ws = Workspace(tmp_path / "ws").ensure()
    run = ws.run_dir("preempted")
    run.mkdir(parents=True)
    _launch_json(run)
    host = socket.gethostname()
    _write_jsonl(
        run / "segments.jsonl",
        [
            {"event": "start", "attempt": 0, "job_id": "1", "host": host, "pid": 1, "devices": 1, "time": T0},
            {"event": "end", "attempt": 0, "status": "preempted", "time": T0 + 1000},
            {"event": "start", "attempt": 1, "job_id": "2", "host": host, "pid": 2, "devices": 1, "time": T0 + 1100},
            {"event": "end", "attempt": 1, "status": "completed", "time": T0 + 1500},
        ],
    )  # fmt: skip
    spans = [  # (attempt, activity, phase, start, end), relative to T0
        (0, "startup", "pretrain", 0, 50),
        (0, "train", "pretrain", 50, 600),
        (0, "checkpoint", "pretrain", 600, 610),
        (0, "train", "pretrain", 610, 695),
        (0, "checkpoint", "pretrain", 695, 705),  # the phase's end: its work is saved
        (0, "train", "finetune", 705, 1000),  # preempted: lost since the checkpoint at +705
        (1, "startup", "finetune", 1100, 1140),
        (1, "train", "finetune", 1140, 1490),
        (1, "checkpoint", "finetune", 1490, 1495),
        (1, "other", "finetune", 1495, 1500),
    ]
    _write_jsonl(
        run / "activity.jsonl",
        [
            {"attempt": a, "activity": w, "phase": p, "start": T0 + s, "end": T0 + e}
            for a, w, p, s, e in spans
        ],
    )
    _write_jsonl(
        run / "checkpoints.jsonl",
        [
            {"step": 5, "phase": "pretrain", "segment": 0, "time": T0 + 610, "path": "a"},
            {"step": 10, "phase": "pretrain", "segment": 0, "time": T0 + 705, "path": "b"},
            {"step": 14, "phase": "finetune", "segment": 1, "time": T0 + 1495, "path": "c"},
        ],
    )
    (run / "result.json").write_text(json.dumps({"status": "completed"}))
    with Ledger.for_workspace(ws) as ledger:
        first, second = sync_run(ledger, run, load_cluster("local"))
        by_phase = {r.group: r for r in ledger.report("phase", run=run.name)}
        by_activity = {r.group: r for r in ledger.report("activity", run=run.name)}
    lost = 295 / 3600 * RATE
    assert first.wasted_usd == pytest.approx(lost)
    assert sum(p.wasted_usd for p in first.parts) == pytest.approx(first.wasted_usd, rel=1e-12)
    assert sum(p.cost_usd for p in first.parts) == pytest.approx(first.cost_usd, rel=1e-12)
    assert by_phase["finetune"].wasted_usd == pytest.approx(lost)
    assert by_phase["pretrain"].wasted_usd == pytest.approx(0.0, abs=1e-15)
    assert by_phase["pretrain"].cost_usd == pytest.approx(705 / 3600 * RATE)
    assert by_phase["finetune"].cost_usd == pytest.approx((295 + 400) / 3600 * RATE)
    assert by_activity["startup"].cost_usd == pytest.approx(90 / 3600 * RATE)
    assert by_activity["train"].wasted_usd == pytest.approx(lost)


def test_sweep_dry_run_prices_the_plan_and_launches_nothing(tmp_path, capsys):
    from budget_lab.cli import main

    ws = tmp_path / "ws"
    assert (
        main(["sweep", "mask_ratio", "--dry-run", "--budget-usd", "0.01", "--workspace", str(ws)])
        == 0
    )
    out = capsys.readouterr().out
    assert "dry run: nothing launched, no study created" in out
    assert "2 trial(s)" in out and "mask_ratio=0.75" in out and "fixed $0.1/device-hour" in out
    assert "each trial trains until it has spent $0.005" in out  # fid_at_budget: sized at launch
    assert "total: $" in out and "exceeds the budget" in out
    assert not (ws / "sweeps" / "mask_ratio").exists()  # no study file, no study folder
    assert not any((ws / "runs").iterdir()) and not any((ws / "jobs").iterdir())
    # A bad value is a clear error, not a traceback.
    assert main(["sweep", "mask_ratio", "--dry-run", "--trials", "0", "--workspace", str(ws)]) == 2
    assert "--trials=0 is invalid" in capsys.readouterr().err


def _spot_cluster() -> SimpleNamespace:
    """ClusterConfig's fields for a local-accounted p5.48xlarge spot machine (8 GPUs)."""
    price = SimpleNamespace(
        kind="spot", usd_per_gpu_hour=12.29, catalog_date="2024-06-01",
        on_demand_usd_per_gpu_hour=12.29, gpus_per_instance=8, availability_zone=None,
        product_description="Linux/UNIX",
    )  # fmt: skip
    return SimpleNamespace(
        name="p5-spot", executor="local", gpu_type="H100", gpus_per_node=8, capacity="spot",
        region="us-east-1", instance_type="p5.48xlarge", price=price,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["fixed", "on_demand", "spot"])
def test_live_and_settled_dollars_come_from_one_price_model(kind, tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFAKEFAKE1234")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    if kind == "fixed":
        cluster = load_cluster("local")
    elif kind == "on_demand":
        cluster = load_cluster("local", ["price.kind=on_demand", "price.usd_per_gpu_hour=3.5"])
    else:
        cluster = _spot_cluster()
    ws = Workspace(tmp_path / "ws").ensure()
    run = ws.run_dir("r")
    run.mkdir(parents=True)
    _launch_json(run, cluster.name)
    devices = 8 if kind == "spot" else 1
    host = socket.gethostname()
    _write_jsonl(
        run / "segments.jsonl",
        [
            {"event": "start", "attempt": 0, "job_id": "1", "host": host, "pid": 1, "devices": devices, "time": T0},
            {"event": "end", "attempt": 0, "status": "preempted", "time": T0 + 1800},
            {"event": "start", "attempt": 1, "job_id": "2", "host": host, "pid": 2, "devices": devices, "time": T0 + 2000},
            {"event": "end", "attempt": 1, "status": "completed", "time": T0 + 5600},
        ],
    )  # fmt: skip
    job = TrainJob(
        str(run),
        {},
        usd_per_device_hour=cluster.price.usd_per_gpu_hour,
        devices=devices,
        cluster=cluster,
        price_cache_dir=str(ws.prices_cache_dir),
    )
    with mock_aws():
        live = job.spent_usd(now=T0 + 9000)
        with Ledger.for_workspace(ws) as ledger:
            sync_run(ledger, run, cluster)
            settled = ledger.spent(run="r")
            (source,) = {s.price_source for s in ledger.segments(run="r")}
    assert live["cost_provisional"] is True
    assert live["cost_usd"] == pytest.approx(settled, rel=1e-12)
    assert live["price_source"] == source
    hours = 5400 / 3600 * devices
    if kind == "spot":  # the history, not the list price the job once multiplied by
        assert source == "aws spot history"
        assert settled == pytest.approx(hours * 0.00001 / 8)
        assert settled != pytest.approx(hours * cluster.price.usd_per_gpu_hour)
    else:
        assert settled == pytest.approx(hours * cluster.price.usd_per_gpu_hour)


def test_a_plain_launch_keeps_its_estimate_and_teaches_the_calibration_once(
    train_data_dir, tmp_path, capsys
):
    """`launch --wait` writes estimate.json, settles the run into the ledger and learns from it;
    `cost sync` after it does not average the run in twice; `cost report --run` prints the
    estimate against the settled dollars."""
    from budget_lab.cli import main

    ws = tmp_path / "ws"
    tiny = [f"data.path={train_data_dir}", "phases.0.steps=6", "phases.0.warmup_steps=2"]
    tiny += ["phases.0.batch_size=8", "phases.1.steps=4", "phases.1.batch_size=8"]
    tiny += ["checkpoint.every=3", "log_every=1", "eval.grid_size=0"]
    argv = ["launch", "--cluster", "local", "--name", "plain", "--wait", "--workspace", str(ws)]
    assert main([*argv, *tiny]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    estimate = json.loads((ws / "runs" / "plain" / "estimate.json").read_text())
    assert estimate["usd"] > 0 and {"startup", "train"} <= set(estimate["by_activity_usd"])
    assert "cost     estimate $" in out and "vs settled $" in out
    assert "calibration updated from run plain" in out
    calibration = json.loads((ws / "calibration.json").read_text())
    (learned,) = calibration["learned"]
    assert learned.startswith("plain@")
    assert {a["source"] for a in calibration["activities"]} == {"run:plain"}
    assert {a["runs"] for a in calibration["activities"]} == {1}

    # Synced again: the settled run is not averaged in a second time.
    assert main(["cost", "sync", "--workspace", str(ws)]) == 0
    assert "calibration updated" not in capsys.readouterr().out
    assert json.loads((ws / "calibration.json").read_text()) == calibration

    assert main(["cost", "report", "--run", "plain", "--workspace", str(ws)]) == 0
    report = capsys.readouterr().out
    with Ledger.for_workspace(Workspace(ws)) as ledger:
        settled = ledger.spent(run="plain")
    error = f"{settled / estimate['usd'] - 1:+.0%}"
    line = f"estimate {usd(estimate['usd'])} vs settled {usd(settled)}: error {error}"
    assert line in report, report
