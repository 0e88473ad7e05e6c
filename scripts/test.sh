#!/usr/bin/env bash
# test.sh - set up (scripts/setup.sh) and run the whole test suite. Extra args go to pytest.
# As root the suite starts a local Slurm (tests/slurm_cluster.py) and stops, at its end, the
# daemons it started; one found running is left running. BUDGET_LAB_KEEP_SLURM=1 keeps it up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# OpenMP busy-waiting makes torch ~10x slower on small shared-core VMs (see BENCHMARKS.md).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec .venv/bin/python -m pytest -q --timeout 900 --durations=30 "$@"
