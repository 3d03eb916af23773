#!/usr/bin/env bash
# Run N cooperating JAX processes of `python -m iomm_jax.main` on this machine (CPU, gloo collectives).
#
#   launch/local.sh N --config=configs/tiny.py:short --workdir=runs/local2 [--config.mesh.fsdp=4 ...]
#   IOMM_MODULE=iomm_jax.cache launch/local.sh 2 --config=... --dst=DIR      # the feature cache, 2 processes
#
# Each process gets IOMM_LOCAL_DEVICES / N simulated CPU devices (default 8 / N) through
# XLA_FLAGS=--xla_force_host_platform_device_count, and joins the job through the environment read by
# iomm_jax/distributed.py: JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i.
# Output lines are prefixed with [pI]. Environment knobs:
#   IOMM_LOCAL_DEVICES  total simulated devices over all processes (default 8)
#   IOMM_PORT           coordinator port (default: a free port from portpicker)
#   IOMM_PYTHON         python interpreter (default: python)
#   IOMM_MODULE         the module every process runs (default: iomm_jax.main; iomm_jax.cache works the same way)
#   IOMM_PID_DIR        if set, process i writes its pid to $IOMM_PID_DIR/p<i>.pid (tests use it to kill one)
#   IOMM_GRACE_S        after the first failure, seconds to let the others exit on their own before they are
#                       killed (default 180; the processes' own watchdog, config.distributed.heartbeat_timeout_s,
#                       should end them well before)
# Exit status: 0 when every process exits 0, else the status of the first process that failed.
set -u -o pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 N [python -m iomm_jax.main arguments...]   (N = number of processes, >= 1)" >&2
  exit 2
fi
N=$1
shift
TOTAL=${IOMM_LOCAL_DEVICES:-8}
if (( TOTAL % N )); then
  echo "local.sh: IOMM_LOCAL_DEVICES=$TOTAL simulated devices do not split evenly over $N processes" >&2
  exit 2
fi
PER=$(( TOTAL / N ))
PY=${IOMM_PYTHON:-python}
MODULE=${IOMM_MODULE:-iomm_jax.main}
GRACE=${IOMM_GRACE_S:-180}
PORT=${IOMM_PORT:-$("$PY" -c 'import portpicker; print(portpicker.pick_unused_port())')} || {
  echo "local.sh: could not pick a free port (is portpicker installed? or set IOMM_PORT)" >&2; exit 2; }

# Drop any device-count flag the caller had, then add ours.
BASE_XLA_FLAGS=$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')

declare -a PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  sleep 2
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
}
trap 'echo "local.sh: interrupted; stopping all processes" >&2; cleanup; exit 130' INT TERM

for (( i = 0; i < N; i++ )); do
  XLA_FLAGS="$BASE_XLA_FLAGS --xla_force_host_platform_device_count=$PER" \
  JAX_PLATFORMS=cpu \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" \
  JAX_NUM_PROCESSES="$N" \
  JAX_PROCESS_ID="$i" \
    "$PY" -u -m "$MODULE" "$@" > >(sed -u "s/^/[p$i] /") 2> >(sed -u "s/^/[p$i] /" >&2) &
  PIDS[i]=$!
  if [[ -n "${IOMM_PID_DIR:-}" ]]; then mkdir -p "$IOMM_PID_DIR" && echo "${PIDS[i]}" > "$IOMM_PID_DIR/p$i.pid"; fi
done
echo "local.sh: started $N processes x $PER devices (coordinator 127.0.0.1:$PORT): pids ${PIDS[*]}" >&2

# Reap processes as they end. After the first failure the others get GRACE seconds to notice (their watchdog
# exits them non-zero) before the launcher kills them, so a stuck process can never hang the launcher.
STATUS=0
declare -A DONE=()
FAIL_TIME=0
while (( ${#DONE[@]} < N )); do
  for (( i = 0; i < N; i++ )); do
    [[ -n "${DONE[$i]:-}" ]] && continue
    if ! kill -0 "${PIDS[i]}" 2>/dev/null; then
      wait "${PIDS[i]}"
      rc=$?
      DONE[$i]=$rc
      if (( rc != 0 )); then
        echo "local.sh: process $i (pid ${PIDS[i]}) exited with status $rc" >&2
        if (( STATUS == 0 )); then STATUS=$rc; FAIL_TIME=$SECONDS; fi
      fi
    fi
  done
  if (( STATUS != 0 && SECONDS - FAIL_TIME > GRACE )); then
    echo "local.sh: processes still running ${GRACE}s after the first failure; killing them" >&2
    cleanup
    for (( i = 0; i < N; i++ )); do [[ -z "${DONE[$i]:-}" ]] && { wait "${PIDS[i]}" 2>/dev/null; DONE[$i]=killed; }; done
    break
  fi
  (( ${#DONE[@]} < N )) && sleep 0.5
done
wait  # the output filters
exit "$STATUS"
