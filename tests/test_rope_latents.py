"""RoPE (models/rope.py) and latent packing (models/latents.py) against diffusers' FLUX and Z-Image implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_flux import FluxPosEmbed
from diffusers.models.transformers.transformer_z_image import RopeEmbedder
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from flax import nnx

from helpers import assert_close
from iomm_jax.models import latents, rope
from iomm_jax.models.mmdit import MMDiT, MMDiTConfig

# ---------------------------------------------------------------- latents


@pytest.mark.parametrize("h,w,c", [(4, 6, 3), (8, 2, 16)])
def test_pack_unpack_match_diffusers(h, w, c):
  x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
  theirs = FluxPipeline._pack_latents(x, 2, c, h, w).numpy()
  ours = latents.pack(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  np.testing.assert_array_equal(np.asarray(ours), theirs)
  back = FluxPipeline._unpack_latents(torch.from_numpy(theirs), h * 8, w * 8, 8).numpy()
  np.testing.assert_array_equal(np.asarray(latents.unpack(ours, h, w, c)), back.transpose(0, 2, 3, 1))
  ids = FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32).numpy()
  np.testing.assert_array_equal(np.asarray(latents.image_ids(h // 2, w // 2)), ids)
  np.testing.assert_array_equal(np.asarray(latents.text_ids(5)), np.zeros((5, 3), np.float32))


def test_pack_rejects_odd_sizes():
  with pytest.raises(ValueError, match="even"):
    latents.pack(jnp.zeros((1, 5, 4, 2)))
  with pytest.raises(ValueError, match="do not fit"):
    latents.unpack(jnp.zeros((1, 6, 8)), 4, 4, 2)


# ---------------------------------------------------------------- RoPE


def _ids(n=11, seed=0):
  return np.random.default_rng(seed).integers(0, 64, (n, 3)).astype(np.float32)


def test_rope_matches_flux_pos_embed_and_apply_rotary_emb():
  ids, dims = _ids(), (4, 6, 6)
  cos_t, sin_t = FluxPosEmbed(10000, list(dims))(torch.from_numpy(ids))
  cos, sin = rope.rope_frequencies(jnp.asarray(ids), dims, 10000.0)
  assert_close(cos, cos_t.numpy(), 1e-5)
  assert_close(sin, sin_t.numpy(), 1e-5)
  x = np.random.default_rng(1).standard_normal((2, 11, 3, 16)).astype(np.float32)
  theirs = apply_rotary_emb(torch.from_numpy(x), (cos_t, sin_t), sequence_dim=1).numpy()
  assert_close(rope.apply_rope(jnp.asarray(x), cos, sin), theirs, 1e-5)


def test_rope_half_layout_matches_diffusers_unbind_minus_2():
  pos = np.arange(9, dtype=np.float32)
  cos_t, sin_t = get_1d_rotary_pos_embed(
      16, torch.from_numpy(pos), 10000.0, use_real=True, repeat_interleave_real=False
  )
  cos, sin = rope.rope_frequencies(jnp.asarray(pos)[:, None], (16,), 10000.0, layout="half")
  assert_close(cos, cos_t.numpy(), 1e-5)
  x = np.random.default_rng(2).standard_normal((1, 9, 2, 16)).astype(np.float32)
  theirs = apply_rotary_emb(torch.from_numpy(x), (cos_t, sin_t), use_real_unbind_dim=-2, sequence_dim=1).numpy()
  assert_close(rope.apply_rope(jnp.asarray(x), cos, sin, layout="half"), theirs, 1e-5)


def test_rope_complex_matches_z_image():
  ids, dims = _ids().astype(np.int64), (4, 6, 6)
  theirs = RopeEmbedder(theta=256.0, axes_dims=list(dims), axes_lens=[64, 64, 64])(torch.from_numpy(ids))
  ours = rope.rope_frequencies_complex(jnp.asarray(ids), dims, 256.0)
  assert_close(np.real(ours), theirs.real.numpy(), 1e-5)
  assert_close(np.imag(ours), theirs.imag.numpy(), 1e-5)
  x = np.random.default_rng(3).standard_normal((2, 11, 3, 16)).astype(np.float32)
  xc = torch.view_as_complex(torch.from_numpy(x).reshape(2, 11, 3, 8, 2))  # Z-Image's own formula
  ref = torch.view_as_real(xc * theirs.unsqueeze(1)).flatten(3).numpy()
  assert_close(rope.apply_rope_complex(jnp.asarray(x), ours), ref, 1e-5)
  # ... and it is the interleaved real rotation.
  cos, sin = rope.rope_frequencies(jnp.asarray(ids), dims, 256.0)
  assert_close(rope.apply_rope(jnp.asarray(x), cos, sin), ref, 1e-5)


def test_rope_errors():
  with pytest.raises(ValueError, match="one dimension per axis"):
    rope.rope_frequencies(jnp.zeros((3, 2)), (4, 4, 4))
  with pytest.raises(ValueError, match="even"):
    rope.rope_frequencies(jnp.zeros((3, 3)), (4, 3, 5))


def test_rope_tables_are_constants_of_the_traced_program():
  """With ids from `latents` (host arrays, known at trace time) MMDiT builds its RoPE cos/sin tables eagerly, so
  the program holds them as constants (XLA:CPU would otherwise evaluate cos/sin per rotated element); traced ids
  still work. The only cos left in the program is the timestep embedding's."""
  cfg = MMDiTConfig(
      in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
      joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
  )  # fmt: skip
  dit = MMDiT(cfg, rngs=nnx.Rngs(0))
  x, cond, t = jnp.ones((2, 4, 8)), jnp.ones((2, 3, 16)), jnp.full((2,), 0.5)
  img_ids, txt_ids = latents.image_ids(2, 2), latents.text_ids(3)
  assert isinstance(img_ids, np.ndarray) and isinstance(txt_ids, np.ndarray)

  def cos_count(fn, *args):
    return sum(e.primitive.name == "cos" for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns)

  assert cos_count(lambda x: dit(x, cond, cond.mean(1), t, img_ids, txt_ids), x) == 1
  traced = lambda x, i, c: dit(x, cond, cond.mean(1), t, i, c)  # noqa: E731
  assert cos_count(traced, x, img_ids, txt_ids) == 2
  np.testing.assert_allclose(
      np.asarray(jax.jit(traced)(x, img_ids, txt_ids)), np.asarray(dit(x, cond, cond.mean(1), t, img_ids, txt_ids)),
      atol=1e-6,
  )  # fmt: skip
