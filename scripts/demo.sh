#!/usr/bin/env bash
# demo.sh - set up (scripts/setup.sh) and run the main job on the embedded default:
#
#   budget-lab sweep mask_ratio
#
# two `nano` trials, mask ratio 0 and 0.75, on this machine (local executor), each spending the
# same $0.005 of the machine (a masked pretraining, then an unmasked finetune), judged on real
# Inception FID at N = 256 with its 95% interval (and the two trials' paired difference), KID and
# the built-in data's text alignment: Optuna study in a journal file, the dollar ledger in SQLite,
# W&B offline, the built-in synthetic captioned data made on first use. It prints the trials,
# the verdict (which ratios are apart beyond the noise, which are tied) and leaves workspace/
# (study, ledger, runs, summary.json and the HTML report at
# workspace/sweeps/mask_ratio/report/index.html).
# Running it again resumes the study (nothing is trained twice).
# Knobs: BUDGET_LAB_WORKSPACE (default ./workspace); extra arguments go to `budget-lab sweep`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
budget-lab sweep mask_ratio "$@"
