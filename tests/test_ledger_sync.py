"""Sync: run folders (local segments.jsonl, Slurm sacct records) into priced, keyed segments;
wasted dollars at preemptions, hard kills, failed and cut runs; idempotence; `budget-lab cost`."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from budget_lab.cli import main
from budget_lab.errors import ConfigError
from budget_lab.launch.cluster import load_cluster
from budget_lab.ledger.sacct import SacctRecord, parse_sacct
from budget_lab.ledger.store import Ledger
from budget_lab.ledger.sync import sync_run, sync_workspace
from budget_lab.workspace import Workspace

T0 = 1_795_000_000.0


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def local_run(
    ws: Workspace,
    name: str,
    *,
    status: str = "completed",
    cut_reason: str | None = None,
    sweep: str | None = None,
    trial: int | None = None,
) -> Path:
    """A local run that ran three times on this CPU machine (1 device):

    attempt 0  T0 .. T0+1000     preempted; checkpoints at +400 and +900 (pretrain)
    attempt 1  T0+1100 ..        killed hard (no end row); last metrics row at +1700
    attempt 2  T0+2000 .. +3000  completed; switches to finetune at +2500
    """
    run = ws.run_dir(name)
    run.mkdir(parents=True)
    (run / "launch.json").write_text(
        json.dumps(
            {"run": name, "run_dir": str(run), "cluster": "local", "executor": "local",
             "launch_id": "L1", "job_ids": ["111"], "nodes": 1, "gpus_per_node": 0,
             "sweep": sweep, "trial": trial, "created_at": T0}
        )
    )  # fmt: skip
    host = socket.gethostname()
    write_jsonl(
        run / "segments.jsonl",
        [
            {"event": "start", "attempt": 0, "job_id": "111", "host": host, "pid": 1, "devices": 1, "time": T0},
            {"event": "end", "attempt": 0, "status": "preempted", "time": T0 + 1000},
            {"event": "start", "attempt": 1, "job_id": "112", "host": host, "pid": 2**22 + 7, "devices": 1, "time": T0 + 1100},
            {"event": "start", "attempt": 2, "job_id": "113", "host": host, "pid": 3, "devices": 1, "time": T0 + 2000},
            {"event": "end", "attempt": 2, "status": "completed", "time": T0 + 3000},
        ],
    )  # fmt: skip
    write_jsonl(
        run / "checkpoints.jsonl",
        [
            {"step": 40, "phase": "pretrain", "segment": 0, "time": T0 + 400, "path": "a"},
            {"step": 90, "phase": "pretrain", "segment": 0, "time": T0 + 900, "path": "b"},
            {"step": 300, "phase": "finetune", "segment": 2, "time": T0 + 3000, "path": "c"},
        ],
    )  # fmt: skip
    write_jsonl(
        run / "metrics.jsonl",
        [
            *({"step": 10 * i, "phase": "pretrain", "images_per_s": 50.0, "segment": 0, "time": T0 + 100 * i} for i in range(1, 10)),
            *({"step": 100 + 10 * i, "phase": "pretrain", "images_per_s": 50.0, "segment": 1, "time": T0 + 1100 + 100 * i} for i in range(1, 7)),
            *({"step": 200 + 10 * i, "phase": "pretrain" if i < 5 else "finetune", "images_per_s": 50.0, "segment": 2, "time": T0 + 2000 + 100 * i} for i in range(1, 11)),
        ],
    )  # fmt: skip
    result = {"status": status, "updated_at": T0 + 3000}
    if cut_reason:
        result["cut_reason"] = cut_reason
    (run / "result.json").write_text(json.dumps(result))
    return run


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path / "ws").ensure()


@pytest.fixture
def local():
    return load_cluster("local")  # fixed $0.10 per machine-hour, no GPUs


def test_local_segments_waste_and_idempotent_sync(ws, local):
    run = local_run(ws, "nano-001")
    with Ledger.for_workspace(ws) as ledger:
        segs = sync_run(ledger, run, local, now=T0 + 10_000)
        assert [(s.state, s.start - T0, s.end - T0, s.gpus) for s in segs] == [
            ("PREEMPTED", 0, 1000, 1),
            ("KILLED", 1100, 1700, 1),  # ended at its last sign of life (metrics at +1700)
            ("COMPLETED", 2000, 3000, 1),
        ]
        rate = 0.10 / 3600
        assert [s.gpu_seconds for s in segs] == [1000, 600, 1000]
        assert [s.cost_usd for s in segs] == pytest.approx([1000 * rate, 600 * rate, 1000 * rate])
        # Preempted: 100 s since the checkpoint at +900. Killed: no checkpoint in it, all lost.
        assert [s.wasted_usd for s in segs] == pytest.approx([100 * rate, 600 * rate, 0.0])
        assert segs[0].waste_reason.startswith("preempted: 1.7 min since last checkpoint")
        assert [s.phase for s in segs] == ["pretrain", "pretrain", "finetune"]
        assert {s.cluster for s in segs} == {"local"} and segs[0].capacity == "owned"
        assert segs[0].gpu_type == "cpu" and segs[0].price_source == "fixed"
        assert len({s.key for s in segs}) == 3

        before = ledger.segments()
        again = sync_run(ledger, run, local, now=T0 + 20_000)
        assert again == segs
        assert ledger.segments() == before  # syncing twice changes nothing
        assert ledger.spent(run="nano-001") == pytest.approx(2600 * rate)
        assert ledger.wasted(run="nano-001") == pytest.approx(700 * rate)


@pytest.mark.parametrize(
    ("status", "cut_reason", "wasted_all"),
    [
        ("failed", None, True),
        ("cut", "budget cap reached", True),
        ("cut", "trial budget $0.0500 reached", False),  # a planned stop: the trial's result
    ],
)
def test_failed_and_capped_runs_waste_every_segment(ws, local, status, cut_reason, wasted_all):
    run = local_run(ws, "r", status=status, cut_reason=cut_reason, sweep="s", trial=3)
    with Ledger.for_workspace(ws) as ledger:
        segs = sync_run(ledger, run, local, now=T0 + 10_000)
        assert {(s.sweep, s.trial) for s in segs} == {("s", 3)}
        if wasted_all:
            assert ledger.wasted(run="r") == pytest.approx(ledger.spent(run="r"))
            assert all(s.waste_reason.startswith("run ") for s in segs)
        else:
            assert ledger.wasted(run="r") == pytest.approx(700 * 0.10 / 3600)


def test_a_running_local_segment_grows_under_the_same_key(ws, local):
    run = local_run(ws, "live")
    rows = [json.loads(x) for x in (run / "segments.jsonl").read_text().splitlines()]
    rows.append(
        {"event": "start", "attempt": 3, "job_id": "114", "host": socket.gethostname(),
         "pid": os.getpid(), "devices": 1, "time": T0 + 4000}
    )  # fmt: skip
    write_jsonl(run / "segments.jsonl", rows)
    (run / "result.json").write_text(json.dumps({"status": "running"}))
    with Ledger.for_workspace(ws) as ledger:
        live = sync_run(ledger, run, local, now=T0 + 4600)[-1]
        assert (live.state, live.end - T0, live.wasted_usd) == ("RUNNING", 4600, 0.0)
        rows.append({"event": "end", "attempt": 3, "status": "completed", "time": T0 + 5000})
        write_jsonl(run / "segments.jsonl", rows)
        done = sync_run(ledger, run, local, now=T0 + 9999)[-1]
        assert done.key == live.key and (done.state, done.end - T0) == ("COMPLETED", 5000)
        assert len(ledger.segments(run="live")) == 4


SACCT_OUT = """\
77|REQUEUED|1795000000|1795000600|600|billing=2,cpu=2,gres/gpu=2,mem=2G,node=1|spot|1
77|COMPLETED|1795000700|1795001000|300|billing=2,cpu=2,gres/gpu=2,mem=2G,node=1|spot|1
78|PREEMPTED|1795000000|1795000100|100|cpu=16,gres/gpu:h100=16,node=2|spot|2
79|RUNNING|1795000800|Unknown|200|cpu=1,node=1|debug|1
80|PENDING|Unknown|Unknown|0||debug|1
81|CANCELLED by 0|2026-11-18T10:00:00|2026-11-18T10:01:00|60|cpu=1,gres/gpu=1|debug|1
"""


def test_parse_sacct():
    recs = parse_sacct(SACCT_OUT)
    assert [(r.job_id, r.state, r.gpus, r.nodes) for r in recs] == [
        ("77", "REQUEUED", 2, 1),
        ("77", "COMPLETED", 2, 1),
        ("78", "PREEMPTED", 16, 2),
        ("79", "RUNNING", 0, 1),
        ("80", "PENDING", 0, 1),
        ("81", "CANCELLED", 1, 1),
    ]
    assert recs[0].gpu_seconds == 1200 and recs[0].finished
    assert recs[3].end is None and not recs[3].finished and recs[4].start is None
    assert recs[5].end - recs[5].start == 60  # ISO local times, when a site prints those


def slurm_run(ws: Workspace, name: str, job_ids: list[str], status: str = "completed") -> Path:
    run = ws.run_dir(name)
    run.mkdir(parents=True)
    (run / "launch.json").write_text(
        json.dumps({"run": name, "cluster": "slurm-local", "executor": "slurm", "job_ids": job_ids,
                    "nodes": 1, "gpus_per_node": 2, "launch_id": "L2"})
    )  # fmt: skip
    (run / "result.json").write_text(json.dumps({"status": status}))
    return run


def test_slurm_sync_polls_until_accounting_has_the_last_rows(ws):
    calls = []
    complete = parse_sacct(SACCT_OUT)[:2]

    def sacct(job_ids):
        calls.append(list(job_ids))
        if len(calls) == 1:  # the job just ended: its last run is not in sacct yet
            return complete[:1]
        if len(calls) == 2:  # ... then it is, still RUNNING
            return [complete[0], SacctRecord("77", "RUNNING", T0 + 700, None, 250, 2, "spot", 1)]
        return complete

    run = slurm_run(ws, "sb", ["77"])
    cluster = load_cluster("slurm-local", ["slurm.partition=spot"])
    with Ledger.for_workspace(ws) as ledger:
        segs = sync_run(ledger, run, cluster, sacct_query=sacct, sacct_wait_s=10)
        assert len(calls) == 3 and calls[0] == ["77"]
        assert [(s.state, s.gpu_seconds, s.partition) for s in segs] == [
            ("REQUEUED", 1200, "spot"),
            ("COMPLETED", 600, "spot"),
        ]
        assert segs[0].wasted_usd == pytest.approx(segs[0].cost_usd)  # no checkpoint: all lost
        assert ledger.spent() == pytest.approx(1800 / 3600 * 1.00)


def test_a_live_slurm_run_takes_what_sacct_has_now(ws):
    calls = []

    def sacct(job_ids):
        calls.append(1)
        return [SacctRecord("90", "RUNNING", T0, None, 100, 2, "spot", 1)]

    run = slurm_run(ws, "live", ["90"], status="running")
    with Ledger.for_workspace(ws) as ledger:
        (seg,) = sync_run(ledger, run, load_cluster("slurm-local"), sacct_query=sacct, now=T0 + 130)
        assert len(calls) == 1 and seg.state == "RUNNING" and seg.gpu_seconds == 260


def test_sync_needs_a_launched_run(ws, local):
    run = ws.run_dir("plain")
    run.mkdir()
    with Ledger.for_workspace(ws) as ledger, pytest.raises(ConfigError, match="no launch.json"):
        sync_run(ledger, run, local)


def test_sync_workspace_reports_and_goes_on_after_an_error(ws):
    local_run(ws, "a")
    local_run(ws, "b")
    ws.run_dir("untracked").mkdir()
    broken = local_run(ws, "c")
    launch = json.loads((broken / "launch.json").read_text())
    (broken / "launch.json").write_text(json.dumps({**launch, "cluster": "no-such-cluster"}))
    with Ledger.for_workspace(ws) as ledger:
        report = sync_workspace(ledger, ws)
        assert (report.runs, report.inserted, report.unchanged) == (2, 6, 0)
        assert report.skipped == ["untracked"] and "no-such-cluster" in report.errors["c"]
        report = sync_workspace(ledger, ws, runs=["a"])
        assert (report.runs, report.inserted, report.unchanged) == (1, 0, 3)


def test_cost_cli_sync_and_report(ws, capsys, monkeypatch):
    local_run(ws, "nano-001", sweep="mask_ratio", trial=1)
    local_run(ws, "nano-002", sweep="mask_ratio", trial=2, status="failed")
    w = ["--workspace", str(ws.root)]
    assert main(["cost", "sync", *w]) == 0
    out = capsys.readouterr().out
    assert "synced 2 run(s): 6 new" in out
    assert main(["cost", "sync", *w]) == 0
    assert "0 new, 0 updated, 6 unchanged" in capsys.readouterr().out

    assert main(["cost", "report", *w, "--by", "trial", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["group"]: r for r in data["rows"]}
    assert set(rows) == {"mask_ratio#1", "mask_ratio#2"}
    assert rows["mask_ratio#2"]["wasted_usd"] == pytest.approx(rows["mask_ratio#2"]["cost_usd"])
    assert data["total"]["segments"] == 6

    assert main(["cost", "report", *w, "--by", "phase", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("phase,segments,gpu_hours,cost_usd,useful_usd,wasted_usd")
    assert [line.split(",")[0] for line in lines[1:]] == ["finetune", "pretrain", "total"]

    monkeypatch.setenv("COLUMNS", "140")
    assert main(["cost", "report", *w, "--run", "nano-001"]) == 0
    table = capsys.readouterr().out
    assert "nano-001" in table and "fixed" in table and "total" in table

    assert main(["cost", "report", *w, "--since", "18-11-2026"]) == 2
    assert "expected YYYY-MM-DD" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["cost", "report", *w, "--by", "week"])
    assert exit_info.value.code == 2

    ws.config_path.write_text("ledger: x\n")
    assert main(["cost", "report", *w]) == 2
    assert (
        "unknown key(s) ledger; valid keys: monthly_budget_usd, ledger_url"
        in capsys.readouterr().err
    )


def test_a_cpu_only_slurm_job_counts_one_device_per_node(ws):
    cluster = SimpleNamespace(
        name="cpu-slurm", executor="slurm", gpu_type="cpu", gpus_per_node=0, capacity="owned",
        slurm=SimpleNamespace(partition="debug"),
        price=SimpleNamespace(kind="fixed", usd_per_gpu_hour=0.5, catalog_date=None),
    )  # fmt: skip
    run = slurm_run(ws, "cpu", ["5"])
    with Ledger.for_workspace(ws) as ledger:
        (seg,) = sync_run(
            ledger,
            run,
            cluster,
            sacct_query=lambda ids: [
                SacctRecord("5", "COMPLETED", T0, T0 + 3600, 3600, 0, "debug", 2)
            ],
        )
        assert seg.gpus == 2 and seg.cost_usd == pytest.approx(1.0)
