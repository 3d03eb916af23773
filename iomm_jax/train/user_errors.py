"""The exceptions that describe a user's mistake — a path, weights or a workdir that do not fit the run — which every
app reports as one line, without a traceback."""

import contextlib

from iomm_jax.config import ConfigError
from iomm_jax.data.data_config import DataConfigError
from iomm_jax.metrics import MetricsFileError, MetricsWriteError
from iomm_jax.models.internvl_keys import MLLMCheckpointError
from iomm_jax.models.keymap import KeyMismatchError
from iomm_jax.train.checkpoint import CheckpointRestoreError, SaveFailedError
from iomm_jax.train.guard import NonFiniteError
from iomm_jax.train.lock import WorkdirLockedError
from iomm_jax.train.warm_start import WarmStartError
from iomm_jax.weights.init_weights import InitWeightsError
from iomm_jax.workdir_layout import SavedConfigError

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DataConfigError,
    InitWeightsError,
    KeyMismatchError,
    MLLMCheckpointError,
    WarmStartError,
    NonFiniteError,
    WorkdirLockedError,
    CheckpointRestoreError,
    SaveFailedError,
    MetricsWriteError,
    MetricsFileError,
    SavedConfigError,
)


@contextlib.contextmanager
def as_one_line():
  """A ConfigError as `SystemExit('config error: …')`, the other USER_ERRORS as `SystemExit('error: …')` (exit
  status 1, no traceback): how training (`iomm_jax.main`) and the bench scripts report a user's mistake."""
  try:
    yield
  except ConfigError as e:
    raise SystemExit(f"config error: {e}") from None
  except USER_ERRORS as e:
    raise SystemExit(f"error: {e}") from None
