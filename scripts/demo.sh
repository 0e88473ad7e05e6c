#!/usr/bin/env bash
# demo.sh - set up (scripts/setup.sh) and run the main job on the embedded default:
#
#   budget-lab sweep mask_ratio
#
# five `nano` trials at mask ratios 0 ... 0.9 on this machine (local executor), each a short
# masked pretraining then an unmasked finetune, judged on real Inception FID and dollars (the
# local machine at clusters/local.yaml's $/hour): Optuna study in a journal file, the dollar
# ledger in SQLite, W&B offline, the built-in synthetic captioned data made on first use. It prints the
# trials, the Pareto front of FID against $, and leaves workspace/ (study, ledger, runs,
# summary.json and the HTML report at workspace/sweeps/mask_ratio/report/index.html).
# Running it again resumes the study (nothing is trained twice).
# Knobs: BUDGET_LAB_WORKSPACE (default ./workspace); extra arguments go to `budget-lab sweep`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
budget-lab sweep mask_ratio "$@"
