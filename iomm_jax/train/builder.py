"""Build everything a run needs, already sharded: mesh, modules, frozen weights, train state, jitted step.

Parameters are born sharded: shapes come from `nnx.eval_shape`, shardings from the logical-axis rules, and
`random_init` (`jax.jit(init, out_shardings=...)`; on one device with the threefry GPU kernel) creates each array
directly on its devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import optax
from flax import nnx

from iomm_jax import parallel, tree_paths
from iomm_jax.config import ConfigError
from iomm_jax.models import dit_families, factory, iomm
from iomm_jax.models.layers import count_params
from iomm_jax.train import loss as loss_lib
from iomm_jax.train import optimizers
from iomm_jax.train import state as state_lib
from iomm_jax.train import step as step_lib
from iomm_jax.train import warm_start
from iomm_jax.weights import components, init_weights, load_internvl, transfer


@dataclasses.dataclass
class Run:
  """The built pieces of one training run (see `build`)."""

  config: Any
  mesh: Any
  mcfg: Any
  processor: Any
  templates: iomm.Templates
  tokenize: Any
  statics: step_lib.StepStatics
  optimizer: optax.GradientTransformation
  lr_fn: Any
  hidden_blocks: dict
  param_shardings: Any
  state_shardings: Any
  frozen_shardings: Any
  abstract_state: Any
  latent_shape: tuple = ()  # (h, w, c) of one latent at the training resolution
  frozen: Any = None  # {'mllm': pure dict, 'ae': pure dict}, sharded
  param_counts: dict = dataclasses.field(default_factory=dict)

  def init_state(self):
    """A fresh TrainState at step 0, created directly with its shardings.

    Generator weights start random (seeded) unless config.init.workdir names a training workdir (its latest
    checkpoint's EMA or raw weights) or config.init.transformer / config.init.rqa name Orbax directories written by
    `python -m iomm_jax.convert to-jax`; those replace the matching subtrees.
    """
    seed = self.config.seed

    def init_params():
      gen = factory.make_generator(self.config, nnx.Rngs(seed), self.mcfg)
      return nnx.to_pure_dict(nnx.state(gen, nnx.Param))

    params = random_init(init_params, self.param_shardings)
    if self.config.init.workdir:
      params = warm_start.params_from_workdir(self.config, params)
    if self.config.init.transformer or self.config.init.rqa:
      params = init_weights.apply(self.config, params, self.param_shardings)

    def create(params):
      rng = jax.random.fold_in(jax.random.key(seed), 1)
      return state_lib.create(params, self.optimizer, ema=self.config.train.ema_decay > 0, rng=rng)

    return jax.jit(create, out_shardings=self.state_shardings)(params)

  def with_num_steps(self, num_steps: int) -> "Run":
    """This run with its optimizer and lr schedule for a run of `num_steps` updates (a decaying schedule needs the
    resolved length, known only once the dataset's size is: train.epochs). The optimizer state's structure does not
    depend on the schedule, so `abstract_state` and the shardings stay valid."""
    optimizer = optimizers.make_optimizer(self.config.train, self.hidden_blocks, num_steps)
    return dataclasses.replace(self, optimizer=optimizer, lr_fn=optimizers.lr_schedule(self.config.train, num_steps))

  @functools.cached_property
  def train_step(self):
    """jit(train_step) with explicit shardings; donates the incoming state."""
    fn = functools.partial(step_lib.train_step, self.statics, self.optimizer, self.lr_fn)
    batch_sh = parallel.batch_sharding(self.mesh)
    return jax.jit(
        fn,
        in_shardings=(self.state_shardings, self.frozen_shardings, batch_sh),
        out_shardings=(self.state_shardings, parallel.replicated(self.mesh)),
        donate_argnums=(0,),
    )


def _split_pure(module):
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  if jax.tree_util.tree_leaves(rest):
    raise ValueError(
        f"{type(module).__name__} holds non-parameter state {list(nnx.to_flat_state(rest))[:3]}; "
        "IOMM modules must be stateless besides their parameters"
    )
  return graphdef, params


def build(config, *, mesh=None, load_frozen: bool = True) -> Run:
  """Mesh, processor, templates, graph definitions, shardings and (optionally) the frozen weights."""
  mesh = mesh or parallel.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  mcfg = factory.mllm_config(config)
  processor = factory.make_processor(config, mcfg)
  templates = iomm.make_templates(processor, config.model.mllm.aux_prompt, config.data.max_text_tokens)
  tokenize = iomm.Tokenize(processor, config.data.max_text_tokens)

  gen_module = nnx.eval_shape(lambda: factory.make_generator(config, nnx.Rngs(0), mcfg))
  hidden_blocks = {"dit": type(gen_module.dit).HIDDEN_BLOCKS, "rqa": type(gen_module.rqa).HIDDEN_BLOCKS}
  gen_def, gen_abs = _split_pure(gen_module)
  mllm_def, mllm_abs = _split_pure(nnx.eval_shape(lambda: factory.make_mllm(config, nnx.Rngs(0), mcfg)))
  ae_module = nnx.eval_shape(lambda: factory.make_ae(config, nnx.Rngs(0)))
  ae_def, ae_abs = _split_pure(ae_module)
  fam = dit_families.family(config.model.dit.kind)
  mismatch = fam.channel_mismatch(gen_module.dit.cfg, ae_module.latent_channels)
  if mismatch:
    raise ConfigError(
        f"config.model.dit.arch.{mismatch} (config.model.autoencoder.kind={config.model.autoencoder.kind!r}); "
        "change the DiT's channels or the autoencoder"
    )
  patch = fam.patch(gen_module.dit.cfg)
  if config.data.resolution % (ae_module.downsample * patch):
    raise ConfigError(
        f"config.data.resolution={config.data.resolution} must be a multiple of {ae_module.downsample * patch}: "
        f"the autoencoder's {ae_module.downsample}× downsampling × the DiT's {patch}×{patch} latent patches"
    )
  side = config.data.resolution // ae_module.downsample

  param_sh = parallel.param_shardings(gen_abs, mesh, rules)
  frozen_sh = {
      "mllm": parallel.param_shardings(mllm_abs, mesh, rules),
      "ae": parallel.param_shardings(ae_abs, mesh, rules),
  }
  optimizer = optimizers.make_optimizer(config.train, hidden_blocks)
  lr_fn = optimizers.lr_schedule(config.train)

  gen_pure = nnx.to_pure_dict(gen_abs)
  abstract_state = jax.eval_shape(
      lambda p: state_lib.create(p, optimizer, ema=config.train.ema_decay > 0, rng=jax.random.key(0)), gen_pure
  )
  rep = parallel.replicated(mesh)
  # Partitioned optimizers (Muon + AdamW) hold MaskedNode placeholders; they keep no array, so they
  # stay MaskedNode in the sharding tree too.
  masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  opt_sh = optax.tree_map_params(
      optimizer,
      lambda x, s: x if masked(x) else s,
      abstract_state.opt_state,
      param_sh,
      transform_non_params=lambda _: rep,
      is_leaf=masked,
  )
  state_sh = state_lib.TrainState(
      step=rep, params=param_sh, opt_state=opt_sh, ema_params=param_sh if config.train.ema_decay > 0 else {}, rng=rep
  )

  t = config.train
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if t.global_batch % (t.grad_accum * shards):
    raise ConfigError(
        f"config.train.global_batch={t.global_batch} must be divisible by config.train.grad_accum="
        f"{t.grad_accum} × the batch shards data×fsdp={shards}, so that every microbatch is spread "
        "evenly over the devices; change the batch, the accumulation or the mesh"
    )
  statics = step_lib.StepStatics(
      gen_def=gen_def,
      mllm_def=mllm_def,
      ae_def=ae_def,
      templates=templates,
      mask_ratio=t.mask_ratio,
      p_uncond=t.p_uncond,
      condition=config.model.condition,
      t_kwargs=loss_lib.t_options(t),
      loss_kwargs=loss_lib.loss_options(config),
      ema_decay=t.ema_decay,
      needs_vit=config.data.recipe != "pair" or t.repa_weight > 0,  # REPA's target is the image's MLLM tokens
      cached=bool(config.data.cached),
      grad_accum=int(t.grad_accum),
      repa_weight=float(t.repa_weight),
      skip_nonfinite=t.on_nonfinite == "skip",
  )
  counts = {
      "dit": count_params(gen_abs["dit"]),
      "rqa": count_params(gen_abs["rqa"]) if "rqa" in gen_abs else 0,  # model.rqa.kind="none": no parameters
      "mllm": count_params(mllm_abs),
      "autoencoder": count_params(ae_abs),
  }
  run = Run(
      config=config,
      mesh=mesh,
      mcfg=mcfg,
      processor=processor,
      templates=templates,
      tokenize=tokenize,
      statics=statics,
      optimizer=optimizer,
      lr_fn=lr_fn,
      hidden_blocks=hidden_blocks,
      param_shardings=param_sh,
      state_shardings=state_sh,
      frozen_shardings=frozen_sh,
      abstract_state=abstract_state,
      param_counts=counts,
      latent_shape=(side, side, ae_module.latent_channels),
  )
  if load_frozen:
    run.frozen = load_frozen_weights(config, run)
  return run


@contextlib.contextmanager
def threefry_gpu_kernel():
  """Within: JAX lowers threefry random bits on GPU to its one CUDA kernel instead of inlining the hash.

  Inlined, the 20-round hash lands in every initialiser's fusion, and ptxas compiles each: IOMM-B's random frozen
  MLLM init was still compiling after 3 minutes on an H200 (bench/gpu.sh, every point timed out). The kernel gives
  the same bits, so a seed still gives the same weights; off GPU the setting changes nothing.
  """
  before = jax.config.jax_threefry_gpu_kernel_lowering
  jax.config.update("jax_threefry_gpu_kernel_lowering", True)
  try:
    yield
  finally:
    jax.config.update("jax_threefry_gpu_kernel_lowering", before)


def random_init(fn, out_shardings):
  """`fn()` — a program that draws random weights — jitted straight onto `out_shardings`; on one device under
  `threefry_gpu_kernel`, so that it compiles in seconds on a GPU.

  Across several devices the hash stays inlined: the kernel is a custom call that XLA's partitioner cannot split, so
  every device would draw each whole array (with its 32-bit counters: several GB for the largest stacked weights),
  where the inlined, partitionable hash draws only its own shard. There the first start pays the compile and the
  persistent compile cache spares restarts.
  """
  devices = {d for s in jax.tree_util.tree_leaves(out_shardings) for d in s.device_set}
  with threefry_gpu_kernel() if len(devices) == 1 else contextlib.nullcontext():
    return jax.jit(fn, out_shardings=out_shardings)()


def load_frozen_weights(config, run: Run) -> dict:
  """The frozen MLLM and autoencoder weights, sharded: loaded from disk when paths are set, else random (seeded)."""
  seed = config.seed + 7919  # frozen random weights never share a stream with the trainable init
  if config.model.mllm.path:
    _, state = load_internvl.load_internvl(
        config.model.mllm.path,
        dtype=factory.DTYPES[config.model.frozen_dtype],
        shardings=run.frozen_shardings["mllm"],
        remat=config.model.mllm.remat,
        return_split=True,
    )
    mllm = nnx.to_pure_dict(state)
  else:
    mllm = random_init(
        lambda: nnx.to_pure_dict(nnx.state(factory.make_mllm(config, nnx.Rngs(seed), run.mcfg), nnx.Param)),
        run.frozen_shardings["mllm"],
    )
  if config.model.autoencoder.kind == "flux_vae" and config.model.autoencoder.path:
    ae = load_vae_weights(config, run.frozen_shardings["ae"], factory.DTYPES[config.model.frozen_dtype])
  else:
    ae = random_init(
        lambda: nnx.to_pure_dict(nnx.state(factory.make_ae(config, nnx.Rngs(seed + 1)), nnx.Param)),
        run.frozen_shardings["ae"],
    )
  return {"mllm": mllm, "ae": ae}


def load_vae_weights(config, shardings, dtype) -> dict:
  """The diffusers AutoencoderKL folder config.model.autoencoder.path as our pure dict, each tensor placed on its
  sharding as it is read (the one streaming loader, weights.transfer.load_placed). Strict: missing, unexpected or
  mis-shaped keys raise models.keymap.KeyMismatchError listing them."""
  flat_sh = tree_paths.flatten(shardings)
  placed = transfer.load_placed(
      components.spec("vae"),
      factory.vae_config(config),
      config.model.autoencoder.path,
      dtype=dtype,
      sharding_of=lambda path, shape: flat_sh[path],
  )
  return tree_paths.nest(placed, int_keys=True)
