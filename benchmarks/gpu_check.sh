#!/usr/bin/env bash
# The one command a session with a lent GPU runs (under 8 minutes), from the repo root:
#
#   benchmarks/gpu_check.sh [--out DIR]      # the check; report in DIR/gpu_check.json
#   benchmarks/gpu_check.sh --dry-run [--out DIR]   # the same steps on the CPU, tiny sizes (CI)
#   benchmarks/gpu_check.sh --fetch-wheels   # here, before: wheels of what the GPU image lacks
#
# DIR defaults to $OUT (the device tool's output folder), else ./gpu_check_out.  On the GPU
# machine nothing can be fetched: the packages its image lacks (array-api-compat,
# array-api-extra) travel as wheels in .whl/ (made by --fetch-wheels; carry .whl), are
# installed with --no-deps into a private folder, and certattn runs from this source tree
# (PYTHONPATH), so the image's own numpy, torch, triton and cupy-cuda13x stay as they are.
# Steps, limits and the report: benchmarks/gpu_check.py.
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
DRY=""
OUT_DIR="${OUT:-$ROOT/gpu_check_out}"
WHEELS="$ROOT/.whl"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY="--dry-run" ;;
    --out) OUT_DIR="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    --fetch-wheels)
      exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "array-api-compat>=1.11" "array-api-extra>=0.7" "array-api-strict>=2.3" ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT_DIR"
if [ -z "$DRY" ]; then
  SITE="${TMPDIR:-/tmp}/certattn-site"
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl || exit 3
  fi
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export TRITON_INTERPRET=0  # compiled for the device
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
# 470 s for everything: the machine's 8 minutes, less the start
exec timeout 470 "$PY" "$ROOT/benchmarks/gpu_check.py" --out "$OUT_DIR" $DRY
