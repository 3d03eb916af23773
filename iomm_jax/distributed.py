"""Multi-process start-up and failure detection.

`initialize_from_config` joins the JAX job (explicit coordinator, environment, or SLURM auto-detection) with a
start-up timeout, then starts a watchdog thread: if any peer process dies or becomes unreachable, this process
prints one clear line naming the peer and exits non-zero within about `config.distributed.heartbeat_timeout_s`
instead of hanging in a collective that will never complete. The watchdog stands down when the process exits
normally: JAX's own exit handler disconnects each process from the coordination service, and a peer that has
finished and disconnected is not a lost one.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

import jax

# Exit status of a process stopped by the watchdog (distinct from Python's 1 and from signals' 128+n).
PEER_LOST_EXIT_CODE = 17
# Set at interpreter exit. Registered when the watchdog starts, after `import jax` registered JAX's clean-up (which
# shuts the distributed client down), so it runs first: atexit handlers run last-registered first.
_EXITING = threading.Event()


class DistributedStartError(RuntimeError):
  """Joining the multi-process job failed (bad settings, coordinator unreachable, or a peer never arrived)."""


def settings_from(config, environ=os.environ) -> dict | None:
  """The resolved start-up settings, or None for a single-process run.

  Sources, in order of precedence: the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID,
  JAX_LOCAL_DEVICE_IDS: what launch/local.sh and launch/k8s set), then config.distributed.*, then SLURM (JAX
  detects coordinator, process count and id itself when SLURM_NTASKS > 1).
  """
  d = config.distributed
  coordinator = environ.get("JAX_COORDINATOR_ADDRESS") or d.coordinator
  num = int(environ.get("JAX_NUM_PROCESSES", d.num_processes))
  pid = int(environ.get("JAX_PROCESS_ID", d.process_id))
  local = environ.get("JAX_LOCAL_DEVICE_IDS", d.local_device_ids)
  in_slurm = "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1
  if not coordinator and not in_slurm:
    if num > 1:
      raise DistributedStartError(
          f"num_processes={num} but no coordinator address: set config.distributed.coordinator=HOST:PORT "
          "(process 0's address) or JAX_COORDINATOR_ADDRESS, or launch with launch/local.sh or under SLURM"
      )
    return None
  out = {
      "coordinator": coordinator or None,
      "num_processes": num if coordinator else None,
      "process_id": pid if coordinator else None,
      "init_timeout_s": int(d.init_timeout_s),
      "heartbeat_timeout_s": int(d.heartbeat_timeout_s),
  }
  if coordinator:
    if ":" not in coordinator:
      raise DistributedStartError(f"coordinator address {coordinator!r} must be HOST:PORT")
    if num < 1 or not 0 <= pid < num:
      raise DistributedStartError(
          f"process id {pid} must be in [0, num_processes={num}) " "(config.distributed.process_id / JAX_PROCESS_ID)"
      )
  if local:
    out["local_device_ids"] = [int(x) for x in str(local).split(",") if x.strip()]
  if out["init_timeout_s"] <= 0 or out["heartbeat_timeout_s"] <= 0:
    raise DistributedStartError("config.distributed.init_timeout_s and heartbeat_timeout_s must be positive")
  return out


def initialize_from_config(config) -> bool:
  """Join the job when this is one process of several (no-op for one process); True when multi-process.

  Must run before anything touches devices. On CPU the cross-process collectives use gloo.
  """
  s = settings_from(config)
  if s is None:
    return False
  if jax.distributed.is_initialized():
    return True
  # Only affects the CPU client (harmless on GPU): without it, CPU collectives across processes are unimplemented.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(initialization_timeout=s["init_timeout_s"], heartbeat_timeout_seconds=s["heartbeat_timeout_s"])
  if "local_device_ids" in s:
    kwargs["local_device_ids"] = s["local_device_ids"]
  if s["coordinator"]:
    kwargs.update(coordinator_address=s["coordinator"], num_processes=s["num_processes"], process_id=s["process_id"])
  where = (
      f"coordinator {s['coordinator']}, process {s['process_id']} of {s['num_processes']}"
      if s["coordinator"]
      else "SLURM auto-detection"
  )
  # JAX's client aborts the process (no Python exception) when it cannot register with the coordinator in time, so
  # say beforehand what is being tried, for the person reading that abort.
  print(
      f"distributed: joining the job ({where}), waiting up to config.distributed.init_timeout_s="
      f"{s['init_timeout_s']} s; an abort below mentioning RegisterTask means process 0 was not reachable there",
      file=sys.stderr,
      flush=True,
  )
  t0 = time.monotonic()
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # noqa: BLE001 — re-raised with the settings that failed
    raise DistributedStartError(
        f"could not join the multi-process job ({where}) within config.distributed.init_timeout_s="
        f"{s['init_timeout_s']} s after {time.monotonic() - t0:.0f} s: {type(e).__name__}: {e}. Check that every "
        "process was started with the same coordinator address and process count, that process 0 is running and "
        "reachable on that port, and that each process id is used once"
    ) from e
  start_watchdog(s["heartbeat_timeout_s"])
  return True


def _client():
  from jax._src import distributed as jax_distributed

  return jax_distributed.global_state.client


def start_watchdog(heartbeat_timeout_s: float, *, poll_s: float | None = None, exit_fn=None) -> threading.Thread | None:
  """A daemon thread that ends this process when a peer is lost (see `watch`)."""
  client = _client()
  if client is None or jax.process_count() == 1:
    return None
  poll = poll_s or max(0.5, min(5.0, heartbeat_timeout_s / 4))
  atexit.register(_EXITING.set)
  thread = threading.Thread(
      target=watch,
      args=(client, jax.process_index(), jax.process_count(), heartbeat_timeout_s, poll, exit_fn, _EXITING),
      name="iomm-peer-watchdog",
      daemon=True,
  )
  thread.start()
  return thread


def watch(
    client,
    me: int,
    n: int,
    heartbeat_timeout_s: float,
    poll_s: float,
    exit_fn=None,
    stop: threading.Event | None = None,
) -> None:
  """Poll the coordination service; on a missing peer or an unreachable coordinator, report and exit.

  The coordination service declares a process dead after `heartbeat_timeout_s` without a heartbeat;
  `get_live_nodes` then omits it. If the coordinator itself (process 0) is gone the call fails; after
  `heartbeat_timeout_s` of consecutive failures this process gives up. Exits through `os._exit` because the
  main thread may be blocked inside a collective that no exception can interrupt. Once `stop` is set (this process
  is exiting normally, so its peers are too) nothing is reported and the thread ends.
  """
  exit_fn = exit_fn or _exit
  stop = stop or threading.Event()
  peers = list(range(n))
  failing_since = None
  while not stop.wait(poll_s):
    try:
      live = client.get_live_nodes(peers)
      failing_since = None
    except Exception as e:  # noqa: BLE001 — any failure to reach the coordinator counts
      now = time.monotonic()
      failing_since = failing_since or now
      if now - failing_since >= heartbeat_timeout_s and not stop.is_set():
        exit_fn(
            f"process {me} of {n}: lost contact with the coordination service on process 0 "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); process 0 probably died. "
            "Stopping this process so the job does not hang; restart the job to resume from the last checkpoint"
        )
        return
      continue
    missing = sorted(set(peers) - set(live))
    if missing and not stop.is_set():  # a peer gone after this process began to exit has finished, not died
      exit_fn(
          f"process {me} of {n}: peer process(es) {missing} stopped sending heartbeats for "
          f"config.distributed.heartbeat_timeout_s={heartbeat_timeout_s:g} s (died or unreachable). "
          "Stopping this process so the job does not hang; restart the job to resume from the last checkpoint"
      )
      return


def _exit(message: str) -> None:
  sys.stderr.write(f"\nIOMM DISTRIBUTED FAILURE: {message}\n")
  sys.stderr.flush()
  sys.stdout.flush()
  os._exit(PEER_LOST_EXIT_CODE)
