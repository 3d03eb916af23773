"""The same MM-DiT training step in PyTorch (diffusers FluxTransformer2DModel) and in JAX, timed like for like.

Used by `python bench/step.py --config=configs/tiny.py --compare_torch`. Both sides train only the DiT of the
config (the MLLM, RQA and autoencoder are not part of the comparison): random latents of the run's latent shape,
condition tokens random of the MLLM width (as many as the DiT sees: the RQA queries, or the whole template for
condition='all'), pooled = their mean, the flow-matching loss of train/loss.py (t ~ U(0, 1), x_t = (1 − t)x + t·z,
target z − x on packed 2×2 tokens, diffusers' timestep = t as ours), global-norm clip, AdamW β = (b1, b2).
"""

from __future__ import annotations

import functools
import statistics
import time


def _shapes(config):
  from flax import nnx

  from iomm_jax.models import factory, iomm

  mcfg = factory.mllm_config(config)
  width = factory.mllm_width(mcfg)
  if config.model.dit.kind != "mmdit":
    raise ValueError(
        f"--compare_torch times the MM-DiT (FluxTransformer2DModel); config.model.dit.kind="
        f"{config.model.dit.kind!r} is not supported"
    )
  dit_cfg = factory.dit_config(config, width)
  ae = nnx.eval_shape(lambda: factory.make_ae(config, nnx.Rngs(0)))
  side = config.data.resolution // ae.downsample
  q = factory.rqa_config(config, width).appended_queries
  processor = factory.make_processor(config, mcfg)
  template = iomm.make_templates(processor, config.model.mllm.aux_prompt, config.data.max_text_tokens).length
  _, cond_len = iomm.condition_lengths(template, q, config.model.condition)
  return dit_cfg, (config.train.global_batch, side, side, ae.latent_channels), cond_len, width


def _median_time(fn, steps: int, warmup: int, sync) -> float:
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def torch_step_time(config, dit_cfg, latent_shape, cond_len, width, steps: int, warmup: int) -> float:
  """Median seconds of one diffusers FluxTransformer2DModel training step (fp32, torch AdamW)."""
  import numpy as np
  import torch
  from diffusers import FluxTransformer2DModel

  from iomm_jax.models import latents

  t_cfg = config.train
  torch.manual_seed(0)
  model = FluxTransformer2DModel(**dit_cfg.to_diffusers()).train()
  opt = torch.optim.AdamW(
      model.parameters(), lr=t_cfg.lr, betas=(t_cfg.b1, t_cfg.b2), eps=t_cfg.eps, weight_decay=t_cfg.weight_decay
  )
  b, h, w, c = latent_shape

  def pack(x):  # NHWC → (B, N, 4C) in FluxPipeline._pack_latents channel order (as models/latents.pack)
    return x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 5, 2, 4).reshape(b, (h // 2) * (w // 2), 4 * c)

  x = torch.randn(latent_shape)
  cond = torch.randn(b, cond_len, width)
  pooled = cond.mean(1)
  img_ids = torch.from_numpy(np.array(latents.image_ids(h // 2, w // 2)))
  txt_ids = torch.from_numpy(np.array(latents.text_ids(cond_len)))

  def step():
    t = torch.rand(b)
    z = torch.randn_like(x)
    tb = t.view(b, 1, 1, 1)
    x_t = (1 - tb) * x + tb * z
    v = model(
        hidden_states=pack(x_t),
        encoder_hidden_states=cond,
        pooled_projections=pooled,
        timestep=t,
        img_ids=img_ids,
        txt_ids=txt_ids,
        return_dict=False,
    )[0]
    loss = torch.mean((v - pack(z - x)) ** 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if t_cfg.grad_clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), t_cfg.grad_clip)
    opt.step()
    return loss

  return _median_time(step, steps, warmup, lambda loss: loss.item())


def jax_dit_step(config, dit_cfg, latent_shape, cond_len, width, devices=None):
  """The same DiT-only step in JAX (our MMDiT, the training optimizer) as `run() -> loss`, data-parallel over
  `devices` (default: every local device that divides the batch evenly; parameters replicated, batch split).

  On a CPU, JAX uses several cores for a small model best as several host devices, one per core
  (XLA_FLAGS=--xla_force_host_platform_device_count=N): each runs half the batch's small ops on its own thread, where
  one device runs them one after another.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  from iomm_jax.models import factory, latents
  from iomm_jax.models.mmdit import MMDiT
  from iomm_jax.train import loss as loss_lib
  from iomm_jax.train import optimizers

  b, h, w, c = latent_shape
  if devices is None:
    devices = jax.local_devices()
    while b % len(devices):
      devices = devices[:-1]
  mesh = jax.make_mesh((len(devices),), ("batch",), axis_types=(AxisType.Auto,), devices=devices)
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
  model = MMDiT(dit_cfg, dtype=factory.DTYPES[config.model.dtype], param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tx = optimizers.make_optimizer(config.train)
  params = jax.device_put(params, replicated)
  opt_state = jax.device_put(tx.init(params), replicated)
  img_ids, txt_ids = latents.image_ids(h // 2, w // 2), latents.text_ids(cond_len)

  @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=(replicated, replicated, replicated))
  def step(params, opt_state, x, cond, rng):
    def loss_fn(p):
      m = nnx.merge(graphdef, p)
      velocity = lambda x_t, t: latents.unpack(m(latents.pack(x_t), cond, cond.mean(1), t, img_ids, txt_ids), h, w, c)
      return loss_lib.flow_matching_loss(velocity, x, rng)[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  key = jax.random.key(0)
  x = jax.device_put(jax.random.normal(jax.random.fold_in(key, 1), latent_shape), split)
  cond = jax.device_put(jax.random.normal(jax.random.fold_in(key, 2), (b, cond_len, width)), split)
  carry = {"params": params, "opt": opt_state, "i": 0}

  def run():
    carry["i"] += 1
    carry["params"], carry["opt"], loss = step(
        carry["params"], carry["opt"], x, cond, jax.random.fold_in(key, carry["i"])
    )
    return loss

  run.devices = len(devices)
  return run


def jax_dit_step_time(config, dit_cfg, latent_shape, cond_len, width, steps: int, warmup: int) -> tuple[float, int]:
  """Median seconds of `jax_dit_step` on every local device that divides the batch, and that device count."""
  import jax

  run = jax_dit_step(config, dit_cfg, latent_shape, cond_len, width)
  return _median_time(run, steps, max(warmup, 1), jax.block_until_ready), run.devices


def compare(config, jax_step_s: float, steps: int = 20, warmup: int = 2, repeats: int = 3) -> dict:
  """Median step times of the DiT-only step in PyTorch and JAX on this machine, and their ratio.

  The two sides alternate `repeats` times (each a median over `steps` steps) and the medians of those medians are
  reported, so a load spike from other processes on a shared machine hits both sides alike.
  """
  import jax
  import torch

  dit_cfg, latent_shape, cond_len, width = _shapes(config)
  torch_runs, jax_runs = [], []
  for _ in range(repeats):
    torch_runs.append(torch_step_time(config, dit_cfg, latent_shape, cond_len, width, steps, warmup))
    jax_s, jax_devices = jax_dit_step_time(config, dit_cfg, latent_shape, cond_len, width, steps, warmup)
    jax_runs.append(jax_s)
  torch_s, jax_s = statistics.median(torch_runs), statistics.median(jax_runs)
  return {
      "torch_step_s_median": round(torch_s, 4),
      "jax_dit_step_s_median": round(jax_s, 4),
      "torch_over_jax": round(torch_s / jax_s, 3),
      "jax_over_torch": round(jax_s / torch_s, 3),
      "compare_repeats": {"torch": [round(x, 4) for x in torch_runs], "jax": [round(x, 4) for x in jax_runs]},
      "torch_compare_scope": "MM-DiT only, same config/shapes/loss/optimizer; MLLM, RQA and autoencoder are NOT "
      "in either timed step (condition tokens random of the MLLM width)",
      "torch_compare_shapes": {
          "latent": list(latent_shape),
          "condition_tokens": cond_len,
          "width": width,
          "dit_width": dit_cfg.inner_dim,
          "dit_blocks": [dit_cfg.num_layers, dit_cfg.num_single_layers],
      },
      "torch_threads": torch.get_num_threads(),
      "jax_dit_devices": jax_devices,  # data-parallel; one per core is fastest on a CPU (see jax_dit_step)
      "jax_full_step_s_median": None if jax_step_s is None else round(jax_step_s, 4),
      "jax_platform": jax.devices()[0].platform,
      "jax_attention": config.model.attention,
  }
