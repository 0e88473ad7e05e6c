"""The ledger against a real Slurm (tests/slurm_cluster.py): a plain sbatch job on the `spot`
partition holding 2 (fake) GPUs is preempted for real by a `debug` job that needs all 8, is
requeued and finishes; the ledger then holds one segment per run of the job, with GPU-seconds
within 2% of sacct's own ElapsedRaw x gres/gpu, and a second sync changes nothing."""

from __future__ import annotations

import json
import subprocess

import pytest

from budget_lab.launch.cluster import load_cluster
from budget_lab.ledger.store import Ledger
from budget_lab.ledger.sync import sync_run
from budget_lab.workspace import Workspace
from tests.slurm_cluster import sacct_runs, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# First run: sleep long (it is preempted); the requeued run (SLURM_RESTART_COUNT >= 1) is short.
_SPOT_JOB = 'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then sleep 4; else sleep 300; fi'


def _sbatch(*args: str) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", "-c", "1", "-o", "/dev/null", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().split(";")[0]


def _states(job_id: str) -> list[str]:
    return [r["State"].split()[0] for r in sacct_runs(job_id)]


@pytest.mark.usefixtures("slurm_cluster")
def test_a_preempted_requeued_sbatch_job_has_one_segment_per_run(tmp_path):
    spot = _sbatch("-p", "spot", "--gres=gpu:2", "--requeue", "--time=60", "--wrap", _SPOT_JOB)
    wait_until(lambda: _states(spot) == ["RUNNING"], 120, f"spot job {spot} to start")
    # Preemption for real: a debug job that needs every GPU of the node.
    debug = _sbatch("-p", "debug", "--gres=gpu:8", "--time=5", "--wrap", "sleep 2")
    wait_until(
        lambda: len(_states(spot)) >= 2 and _states(spot)[-1] == "COMPLETED",
        240,
        f"spot job {spot} to be preempted, requeued and completed",
    )
    assert _states(debug)[-1] == "COMPLETED"

    ws = Workspace(tmp_path / "ws").ensure()
    run = ws.run_dir("sbatch-spot")
    run.mkdir()
    (run / "launch.json").write_text(
        json.dumps(
            {"run": "sbatch-spot", "run_dir": str(run), "cluster": "slurm-local",
             "executor": "slurm", "launch_id": "manual", "job_ids": [spot], "nodes": 1,
             "gpus_per_node": 2, "sweep": None, "trial": None}
        )
    )  # fmt: skip
    (run / "result.json").write_text(json.dumps({"status": "completed"}))
    cluster = load_cluster("slurm-local", ["slurm.partition=spot"])  # fixed $1 per GPU-hour

    with Ledger.for_workspace(ws) as ledger:
        segments = sync_run(ledger, run, cluster, price_cache_dir=ws.prices_cache_dir)
        truth = sacct_runs(spot)  # sacct's own figures, read independently
        assert len(segments) == len(truth) >= 2, (segments, truth)
        assert segments[0].state in ("PREEMPTED", "REQUEUED")
        assert segments[-1].state == "COMPLETED"
        for seg, row in zip(segments, truth, strict=True):
            gpus = int(dict(kv.split("=") for kv in row["AllocTRES"].split(","))["gres/gpu"])
            expected = int(row["ElapsedRaw"]) * gpus
            assert gpus == 2 and seg.gpus == 2 and seg.partition == "spot"
            assert seg.gpu_seconds == pytest.approx(expected, rel=0.02)
            assert seg.cost_usd == pytest.approx(seg.gpu_seconds / 3600 * 1.00)
        assert segments[0].wasted_usd == pytest.approx(segments[0].cost_usd)  # no checkpoints
        assert segments[-1].wasted_usd == 0.0
        assert len({s.key for s in segments}) == len(segments)

        stored = ledger.segments()
        again = sync_run(ledger, run, cluster, price_cache_dir=ws.prices_cache_dir)
        assert again == segments and ledger.segments() == stored  # syncing twice changes nothing
        assert ledger.spent(run="sbatch-spot") == pytest.approx(sum(s.cost_usd for s in segments))
