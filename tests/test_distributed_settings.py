"""How a process finds its multi-process job (distributed.settings_from), how a bad setting is reported, and when
the peer watchdog reports a lost peer."""

import threading

import pytest

from helpers import load_config, run_app
from iomm_jax import distributed


def _settings(env=None, **fields):
  c = load_config("tiny")
  for k, v in fields.items():
    c.distributed[k] = v
  return distributed.settings_from(c, environ=env or {})


def test_one_process_needs_no_job():
  assert _settings() is None


def test_config_settings_resolve_with_the_environment_taking_precedence():
  s = _settings(coordinator="h0:1234", num_processes=4, process_id=2, local_device_ids="0,1")
  assert (s["coordinator"], s["num_processes"], s["process_id"], s["local_device_ids"]) == ("h0:1234", 4, 2, [0, 1])
  env = {"JAX_COORDINATOR_ADDRESS": "h9:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  s = _settings(env, coordinator="h0:1234", num_processes=4, process_id=2)
  assert (s["coordinator"], s["num_processes"], s["process_id"]) == ("h9:99", 2, 1)


def test_under_slurm_jax_detects_the_job_itself():
  s = _settings({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})
  assert s["coordinator"] is None and s["num_processes"] is None and s["process_id"] is None
  assert _settings({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None  # a one-task allocation: one process


@pytest.mark.parametrize(
    "fields,needle",
    [
        (dict(num_processes=2), "num_processes=2 but no coordinator address"),
        (dict(coordinator="h0", num_processes=2), "'h0' must be HOST:PORT"),
        (dict(coordinator="h0:1", num_processes=2, process_id=2), "process id 2 must be in [0, num_processes=2)"),
        (dict(coordinator="h0:1", num_processes=2, init_timeout_s=0), "init_timeout_s and heartbeat_timeout_s"),
    ],
)
def test_bad_settings_name_what_to_set(fields, needle):
  with pytest.raises(distributed.DistributedStartError) as e:
    _settings(**fields)
  assert needle in str(e.value)


def test_main_reports_a_bad_setting_in_one_line(tmp_path):
  r = run_app(
      "iomm_jax.main", "--config=configs/tiny.py:short", f"--workdir={tmp_path / 'w'}",
      "--config.distributed.num_processes=2",
  )  # fmt: skip
  lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("[transformers]")]
  assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert lines == [
      "error: num_processes=2 but no coordinator address: set config.distributed.coordinator=HOST:PORT "
      "(process 0's address) or JAX_COORDINATOR_ADDRESS, or launch with launch/local.sh or under SLURM"
  ]
  assert not (tmp_path / "w").exists()


class _Coordinator:
  """A stand-in for the coordination client: answers `get_live_nodes` from a list of replies (a list of live
  processes, or an exception to raise), then keeps giving the last one."""

  def __init__(self, *replies, on_call=None):
    self.replies, self.calls, self.on_call = list(replies), 0, on_call

  def get_live_nodes(self, peers):
    self.calls += 1
    reply = self.replies[min(self.calls, len(self.replies)) - 1]
    if self.on_call:
      self.on_call(self.calls)
    if isinstance(reply, Exception):
      raise reply
    return reply


def _watch(client, stop=None, timeout_s=0.05):
  exits = []
  distributed.watch(client, 0, 2, timeout_s, 0.01, exits.append, stop)
  return exits


def test_watchdog_reports_a_peer_that_stopped_heartbeating():
  exits = _watch(_Coordinator([0, 1], [0, 1], [0]))
  assert len(exits) == 1 and "peer process(es) [1] stopped sending heartbeats" in exits[0]


def test_watchdog_reports_an_unreachable_coordinator_only_after_the_timeout():
  client = _Coordinator([0, 1], RuntimeError("connection refused"))
  exits = _watch(client, timeout_s=0.1)
  assert len(exits) == 1 and "lost contact with the coordination service" in exits[0]
  assert client.calls >= 5  # polled every 0.01 s for at least 0.1 s of failures before giving up


def test_watchdog_stands_down_when_the_process_exits_normally():
  """At a normal exit JAX disconnects every process; peers then leave the live list. That is not a lost peer."""
  stop = threading.Event()
  # The exit begins (atexit sets the event) while a poll is in flight, which then sees the peer gone.
  client = _Coordinator([0, 1], [0], on_call=lambda n: n == 2 and stop.set())
  assert _watch(client, stop) == []
  stop2 = threading.Event()
  client = _Coordinator([0, 1], RuntimeError("shut down"), on_call=lambda n: n == 2 and stop2.set())
  assert _watch(client, stop2, timeout_s=0.0) == []
