"""How a process finds its multi-process job (distributed.settings_from) and how a bad setting is reported."""

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
