#!/usr/bin/env bash
# Fetches, on a machine that reaches PyPI, the wheels bench/gpu.sh installs on a GPU machine that cannot: the
# packages a stock CUDA JAX image lacks (grain, array_record, ml_collections, tensorboardX, dm-tree, portpicker) and
# a flax that matches that machine's JAX. Carry ./wheels there; bench/gpu.sh puts them on PYTHONPATH.
#
#   bench/gpu_wheels.sh [PYTHON_VERSION]      the GPU machine's Python, default 3.12 (x86-64 manylinux wheels)
#   FLAX=0.12.12 bench/gpu_wheels.sh          flax version (default: the newest for that Python). flax follows JAX:
#                                             0.12.8 (this repo's pin) for JAX 0.10; under JAX 0.11 it does not
#                                             import, 0.12.12 ran (H200, JAX 0.11.2)
# Other versions are constraints.txt's pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
SPECS=()
for pkg in grain array_record ml_collections tensorboardX dm-tree portpicker; do
  pinned=$(grep -iE "^${pkg}==" constraints.txt | head -1 || true)
  SPECS+=("${pinned:-$pkg}")
done
SPECS+=("flax${FLAX:+==$FLAX}")
PLATFORMS=(--platform manylinux2014_x86_64)
for n in 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
mkdir -p wheels
for spec in "${SPECS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    "${PLATFORMS[@]}" -d wheels "$spec"
done
echo "gpu_wheels.sh: $(ls wheels | wc -l) wheels in ./wheels ($(du -sh wheels | cut -f1)) for Python $PYV: ${SPECS[*]}"
