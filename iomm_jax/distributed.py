"""Multi-process start-up: join the JAX job (SLURM automatic, or explicit coordinator/process settings)."""

from __future__ import annotations

import os

import jax


def initialize_from_config(config) -> None:
  """Call jax.distributed.initialize when this is one process of several; a no-op for single-process runs.

  Sources, in order: config.distributed.coordinator (+ num_processes, process_id, local_device_ids), the
  environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or SLURM (auto-detected by JAX).
  """
  d = config.distributed
  coordinator = d.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  num = int(os.environ.get("JAX_NUM_PROCESSES", d.num_processes))
  pid = int(os.environ.get("JAX_PROCESS_ID", d.process_id))
  in_slurm = "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if not coordinator and not in_slurm:
    return
  if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(initialization_timeout=int(d.init_timeout_s), heartbeat_timeout_seconds=int(d.heartbeat_timeout_s))
  local = os.environ.get("JAX_LOCAL_DEVICE_IDS", d.local_device_ids)
  if local:
    kwargs["local_device_ids"] = [int(x) for x in str(local).split(",")]
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid, **kwargs)
  else:
    jax.distributed.initialize(**kwargs)
