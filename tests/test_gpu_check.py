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


#: What scripts/wheelhouse.sh leaves out of the GPU machine (it has torch and the wheel folder's
#: packages only): W&B, the report and ledger stack, AWS, the text encoder's and the VAE's
#: libraries, the test tools.
LEFT_OUT = (
    "wandb matplotlib optuna sqlalchemy psycopg boto3 botocore moto transformers tokenizers "
    "diffusers rich"
).split()


def test_every_check_imports_without_what_the_wheel_folder_leaves_out():
    """Each check's imports, with the left-out packages made unimportable (`sys.modules[name] =
    None`: `import` fails, `find_spec` says absent; their distributions unknown to
    importlib.metadata): a check must not fail on the GPU machine for a package it does not
    need, which the --cpu run here (full venv) cannot see."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import importlib.metadata as md\n"
        f"LEFT_OUT = {LEFT_OUT!r}\n"
        "for name in LEFT_OUT: sys.modules[name] = None\n"
        # Libraries that ask the installed distributions (torchmetrics: matplotlib) see none.
        "def hide(real):\n"
        "    def ask(name, *a, **k):\n"
        "        if name.lower() in LEFT_OUT: raise md.PackageNotFoundError(name)\n"
        "        return real(name, *a, **k)\n"
        "    return ask\n"
        "md.version, md.distribution = hide(md.version), hide(md.distribution)\n"
        "import bench.gpu_check, bench.model_step, model.summary, budget_lab.config\n"
        "import budget_lab.train, budget_lab.eval.fid, budget_lab.errors\n"
        "print('imported')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and "imported" in run.stdout, run.stderr[-3000:]
