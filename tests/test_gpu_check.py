"""bench/gpu_check.sh: its --help, and its CPU dry run (every check on tiny shapes), for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_help_and_usage_errors():
    out = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True, check=True).stdout
    assert "--cpu" in out and "--wheelhouse" in out and "never installed or replaced" in out
    bad = subprocess.run([SCRIPT, "--gpus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option '--gpus'" in bad.stderr
    missing = subprocess.run(
        [SCRIPT, "--wheelhouse", "/nonexistent"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "scripts/wheelhouse.sh" in missing.stderr


def test_cpu_dry_run_runs_every_check(tmp_path: Path, train_data_dir: Path):
    rows_path = tmp_path / "rows.json"
    run = subprocess.run(
        [SCRIPT, "--cpu", "--python", sys.executable, "--json", str(rows_path),
         "--data", str(train_data_dir)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(rows_path.read_text())
    checks = [r["check"] for r in rows]
    assert checks.count("step nano") == 1 and "nano resume" in checks and "FID" in checks
    two = next(r for r in rows if r["check"] == "2 processes")
    assert two["status"] == "skip" and "test_distributed" in two["result"]
    assert {r["status"] for r in rows if r["check"] not in ("FID", "2 processes")} == {"ok"}
    assert next(r for r in rows if r["check"] == "nano resume")["result"] == "bit-identical"
    assert "| check | detail | status | result | s |" in run.stdout
