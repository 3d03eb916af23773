"""Random weights compile fast on GPU: every init program is lowered with JAX's threefry kernel, not the inlined hash.

No GPU is needed: the init programs are lowered for CUDA from this CPU and their StableHLO read.
"""

import jax
from flax import nnx

from iomm_jax import parallel
from iomm_jax.models import factory
from iomm_jax.train import builder
from tests.helpers import tiny_config

# The inlined threefry hash rotates with shifts; the kernel is one custom call.
KERNEL = "cu_threefry2x32"
INLINED = "stablehlo.shift_left"


def _mllm_init_for_cuda(config) -> str:
  mcfg = factory.mllm_config(config)
  fn = lambda: nnx.to_pure_dict(nnx.state(factory.make_mllm(config, nnx.Rngs(0), mcfg), nnx.Param))  # noqa: E731
  return jax.jit(fn).trace().lower(lowering_platforms=("cuda",)).as_text()


def test_threefry_gpu_kernel_replaces_the_inlined_hash_and_restores_the_setting():
  config = tiny_config()
  plain = _mllm_init_for_cuda(config)
  assert INLINED in plain and KERNEL not in plain  # the control: without it, the hash is inlined
  before = jax.config.jax_threefry_gpu_kernel_lowering
  with builder.threefry_gpu_kernel():
    kernel = _mllm_init_for_cuda(config)
  assert KERNEL in kernel and INLINED not in kernel
  assert len(kernel) < len(plain) / 2
  assert jax.config.jax_threefry_gpu_kernel_lowering == before


def _init_flags(monkeypatch, mesh) -> tuple[list, list]:
  """The kernel setting at each jitted call of a run's frozen-weight load and its train-state init."""
  flags = []
  real_jit = jax.jit

  def spy(fn, **kw):
    jitted = real_jit(fn, **kw)

    def call(*a):
      flags.append(jax.config.jax_threefry_gpu_kernel_lowering)
      return jitted(*a)

    return call

  monkeypatch.setattr(builder.jax, "jit", spy)
  run = builder.build(tiny_config(), mesh=mesh, load_frozen=False)
  flags.clear()  # build() itself draws nothing
  run.frozen = builder.load_frozen_weights(run.config, run)
  frozen = list(flags)
  flags.clear()
  run.init_state()
  return frozen, flags


def test_on_one_device_every_random_init_draws_through_the_kernel(monkeypatch):
  """The frozen MLLM, then the generator: each jitted inside the setting. Outside it: the tiny config's identity
  autoencoder (no weights, so no device) and the optimizer state (zeros)."""
  mesh = parallel.make_mesh(tiny_config().mesh, jax.devices()[:1])
  assert _init_flags(monkeypatch, mesh) == ([True, False], [True, False])


def test_across_devices_the_hash_stays_inlined_and_partitioned(monkeypatch):
  assert len(jax.devices()) == 8
  mesh = parallel.make_mesh(tiny_config().mesh)
  assert _init_flags(monkeypatch, mesh) == ([False, False], [False, False])


def test_a_random_mllm_keeps_an_arch_vocabulary_larger_than_the_tiny_tokenizers():
  """The full-size configs' random MLLM is InternVL3-2B with its whole embedding (the dry run counts it); the tiny
  one takes the tiny tokenizer's vocabulary."""
  from tests.helpers import load_config
  from iomm_jax.models import factory
  from iomm_jax.models.processor import Processor

  assert factory.mllm_config(load_config("iomm_b", "pretrain")).text.vocab_size == 151674
  assert factory.mllm_config(load_config("tiny", "pretrain")).text.vocab_size == Processor.tiny().vocab_size
