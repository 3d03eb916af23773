#!/usr/bin/env bash
# The GPU figures in one call: checks the machine, installs what the step imports, then runs bench/gpu_sweep.py —
# IOMM-B's training step (random weights, cached-feature batch shapes: ViT tokens + 64×64×16 latents of 512² images)
# at global batch 8/16/32, then attention auto/xla/cudnn and DiT remat none/dots_saveable/full at batch 16: images/s,
# MFU, measured peak device memory beside XLA's estimate, compile time. Writes $IOMM_BENCH_OUT/points.jsonl and
# table.md and prints one JSON summary line; no new point starts after $IOMM_BENCH_BUDGET_S seconds.
#
#   bench/gpu.sh [gpu_sweep.py flags] [extra --config.* / bench/step.py flags passed to every point...]
#   bench/gpu.sh --batches=8 --attention= --remat=        one point only (the config's attention and remat)
# --config.model.attention reaches every module (DiT, RQA, VAE, ViT, LLM): auto (default) | cudnn | xla | splash (TPU).
# --profile=DIR adds a jax.profiler trace of 3 steps; --compile_cache=DIR keeps compiled programs between runs.
#
# Needs the JAX already installed on the CUDA machine (jax + its CUDA plugin); it is never reinstalled or
# upgraded. Python packages the step imports that are missing come from ./wheels when that folder exists (a machine
# without network: fetch them elsewhere with bench/gpu_wheels.sh and carry the folder; they are installed into
# $IOMM_BENCH_SITE, default /tmp/iomm_bench_site, put first on PYTHONPATH), else from PyPI, pinned to
# constraints.txt where it names them. Environment knobs:
#   IOMM_BENCH_CONFIG     config file (default configs/iomm_b.py)
#   IOMM_BENCH_OUT        sweep output folder (default bench_gpu)
#   IOMM_BENCH_BUDGET_S   sweep: start no new point after this many seconds (default: gpu_sweep.py's --budget_s)
#   IOMM_BENCH_STEPS      timed steps per point (default 10)
#   IOMM_BENCH_ALLOW_CPU  1: run even without a GPU (smoke test of this script; figures are then meaningless)
#   PYTHON                interpreter (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONFIG=${IOMM_BENCH_CONFIG:-configs/iomm_b.py}
STEPS=${IOMM_BENCH_STEPS:-10}

"$PY" -c "import jax" 2>/dev/null || {
  echo "gpu.sh: jax is not importable by $PY; install jax with its CUDA plugin first (pip install 'jax[cuda12]')" >&2
  exit 2; }

# module:pip-name of everything the step imports besides jax/numpy (flax.nnx: an old flax imports, its nnx not).
NEEDED="grain:grain ml_collections:ml_collections array_record:array_record tensorboardX:tensorboardX
flax.nnx:flax optax:optax orbax.checkpoint:orbax-checkpoint chex:chex absl:absl-py tqdm:tqdm PIL:pillow
msgpack:msgpack tokenizers:tokenizers transformers:transformers"
missing() {
  for pair in $NEEDED; do "$PY" -c "import ${pair%%:*}" 2>/dev/null || echo "${pair##*:}"; done
}
MISSING=($(missing))
if (( ${#MISSING[@]} )) && [[ -d wheels ]]; then
  # An offline machine: the wheels carried in ./wheels (bench/gpu_wheels.sh) go into a folder of their own, first
  # on PYTHONPATH, without dependency resolution and without touching the machine's own packages.
  SITE=${IOMM_BENCH_SITE:-/tmp/iomm_bench_site}
  echo "gpu.sh: missing ${MISSING[*]}; installing ./wheels into $SITE" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" wheels/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  MISSING=($(missing))
fi
if (( ${#MISSING[@]} )); then
  echo "gpu.sh: installing missing packages from PyPI: ${MISSING[*]}" >&2
  # Pin what constraints.txt pins, except jax/jaxlib and their plugins (keep the machine's own JAX) and flax, which
  # follows JAX: the pinned flax 0.12.8 does not import under JAX 0.11 (seen on an H200 with JAX 0.11.2; 0.12.12 ran).
  CONS=$(mktemp)
  trap 'rm -f "$CONS"' EXIT
  if [[ -f constraints.txt ]]; then grep -viE '^(jax|jaxlib|jax-cuda|jax_cuda|torch|nvidia-|flax=)' constraints.txt > "$CONS"; fi
  "$PY" - >> "$CONS" <<'PYEOF'
import importlib.metadata as md
for name in ("jax", "jaxlib"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
PYEOF
  "$PY" -m pip install -q -c "$CONS" "${MISSING[@]}"
fi

PLATFORM=$("$PY" -c "import jax; print(jax.devices()[0].platform)")
if [[ "$PLATFORM" != "gpu" && "${IOMM_BENCH_ALLOW_CPU:-0}" != "1" ]]; then
  echo "gpu.sh: JAX sees no GPU (platform '$PLATFORM'); check the CUDA plugin (python -c 'import jax; print(jax.devices())')," \
       "or set IOMM_BENCH_ALLOW_CPU=1 for a smoke test" >&2
  exit 3
fi

ALLOW=()
[[ "$PLATFORM" != "gpu" ]] && ALLOW=(--allow_cpu)
exec "$PY" bench/gpu_sweep.py --config="$CONFIG" --out="${IOMM_BENCH_OUT:-bench_gpu}" --steps="$STEPS" \
  ${IOMM_BENCH_BUDGET_S:+--budget_s="$IOMM_BENCH_BUDGET_S"} "${ALLOW[@]}" "$@"
