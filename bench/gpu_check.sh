#!/usr/bin/env bash
# One prepared GPU check: run `bench/gpu_check.sh --help`.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: bench/gpu_check.sh [--cpu] [--wheelhouse DIR] [--python PY] [--json PATH]

Everything a GPU must confirm, in one run (about 8 minutes on one H100/H200, no network):
  - MicroDiT-XL/2 and MicroDiT-Tiny/2 training steps at 256 px, bf16, eager and torch.compile,
    mask ratio 0 / 0.5 / 0.75: images/s, MFU, peak memory;
  - a short nano run on the GPU, interrupted and resumed exactly;
  - an FID evaluation on the GPU (skipped, and said so, without the InceptionV3 weights);
  - a 2-process run (torchrun, NCCL) when the machine has 2 GPUs.
Prints one table; exits 1 if any check failed, 2 on a usage error.

  --wheelhouse DIR  install the project's pure-Python dependencies from DIR (made here by
                    scripts/wheelhouse.sh) into a venv that sees the machine's torch; torch is
                    never installed or replaced. DIR/gpu-check-data, when there, is the nano
                    data (no text encoder needed on the machine).
  --python PY       the Python to use (default: python3; with --wheelhouse, the venv is made
                    from it with --system-site-packages so that its torch is used)
  --cpu             dry run on tiny shapes on the CPU (CI runs it: every section once; the
                    2-process row is skipped, tests/test_distributed.py covers it)
  --json PATH       also write the rows as JSON
  --data DIR        prepared nano data to use (default: made on the spot, needs MiniLM)
USAGE
}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY=python3
WHEELS=""
ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --cpu) ARGS+=(--cpu); shift ;;
        --json) ARGS+=(--json "$2"); shift 2 ;;
        --data) ARGS+=(--data "$2"); shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        --wheelhouse) WHEELS="$2"; shift 2 ;;
        *) echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

if [[ -n "$WHEELS" ]]; then
    [[ -d "$WHEELS" ]] || { echo "gpu_check.sh: no wheel folder $WHEELS: make it with scripts/wheelhouse.sh" >&2; exit 2; }
    VENV="${TMPDIR:-/tmp}/gpu-check-venv"
    "$PY" -m venv --system-site-packages "$VENV"
    TORCH_BEFORE="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
    # --no-index: nothing from the network; torch is left out of the requirements, and a pin on
    # the installed version makes pip refuse to replace it.
    echo "torch==$TORCH_BEFORE" > "$VENV/constraints.txt"
    "$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" \
        -c "$VENV/constraints.txt" -r "$WHEELS/requirements.txt"
    TORCH_AFTER="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
    [[ "$TORCH_BEFORE" == "$TORCH_AFTER" ]] || { echo "torch changed ($TORCH_BEFORE -> $TORCH_AFTER)" >&2; exit 1; }
    PY="$VENV/bin/python"
    [[ -d "$WHEELS/gpu-check-data" ]] && ARGS+=(--data "$WHEELS/gpu-check-data")
fi
cd "$HERE"
exec env OMP_WAIT_POLICY=PASSIVE WANDB_MODE=disabled PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" \
    "$PY" bench/gpu_check.py "${ARGS[@]}"
