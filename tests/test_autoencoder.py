"""Autoencoders: FluxVAE parity with diffusers.AutoencoderKL, conversion both ways, the identity and the factory."""

import json
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from flax import nnx

from iomm_jax.models import keymap
from iomm_jax.models.vae_keys import KEY_TABLE, config_from_diffusers, config_to_diffusers
from iomm_jax.models.autoencoder import Autoencoder, IdentityAutoencoder, make_autoencoder
from iomm_jax.models.flux_vae import FluxVAE, FluxVAEConfig
from iomm_jax.models.layers import count_params

# Two tiny random configs: with/without quant convs, 8 or 32 groups, 4 or 16 latent channels, with/without
# mid-block attention, 2 or 3 resolutions.
TINY = {
    "quant_attn": dict(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.5,
        shift_factor=0.25,
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=True,
        sample_size=32,
    ),
    "flux_like": dict(
        block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        sample_size=32,
    ),
}


def _param_shapes(model):
  return {k: tuple(v.shape) for k, v in keymap.flatten_state(nnx.state(model, nnx.Param)).items()}


def _load(model, torch_sd):
  flat = keymap.to_jax(torch_sd, KEY_TABLE, _param_shapes(model))
  nnx.update(
      model,
      nnx.from_flat_state(
          [(tuple(int(p) if p.isdigit() else p for p in k.split(".")), jnp.asarray(v)) for k, v in flat.items()]
      ),
  )


def _numpy_sd(module):
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def _reference(name):
  torch.manual_seed(0)
  ref = AutoencoderKL(**TINY[name]).eval()
  # GroupNorms start at (1, 0): randomise them (and the biases) so that a wrong mapping cannot hide.
  with torch.no_grad():
    for key, p in ref.named_parameters():
      if p.ndim == 1:
        p.copy_((1.0 if key.endswith("weight") and "norm" in key else 0.0) + 0.2 * torch.randn_like(p))
  return ref


@pytest.fixture(scope="module", params=sorted(TINY))
def pair(request):
  ref = _reference(request.param)
  cfg = config_from_diffusers(ref.config)
  ours = _abstract_vae(cfg)
  _load(ours, _numpy_sd(ref))
  return ref, ours


# jit the whole encoder/decoder: one compilation is much cheaper than op-by-op eager dispatch on CPU.
_encode = jax.jit(lambda m, x, rng=None: m.encode(x, rng=rng))
_decode = jax.jit(lambda m, z: m.decode(z))


def _abstract_vae(cfg, dtype=jnp.float32):
  """A FluxVAE without its (slow, eager) random init: every parameter is then loaded from a checkpoint."""
  return nnx.eval_shape(lambda: FluxVAE(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def _images(b=2, h=16, w=24):
  return np.random.default_rng(0).uniform(-1, 1, size=(b, h, w, 3)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _assert_close(ours, theirs):
  tol = 1e-4 * max(1.0, float(np.abs(theirs).max()))
  diff = float(np.abs(np.asarray(ours) - theirs).max())
  assert diff <= tol, f"max|ours-theirs|={diff} > {tol}"


def _torch_encode_normalised(ref, images):
  c = ref.config
  with torch.no_grad():
    mean = _nhwc(ref.encode(_nchw(images)).latent_dist.mean)
  return (mean - (c.shift_factor or 0.0)) * c.scaling_factor


def test_encode_decode_parity(pair):
  ref, ours = pair
  images = _images()
  theirs = _torch_encode_normalised(ref, images)
  latents = _encode(ours, jnp.asarray(images))
  assert latents.shape == (2, 16 // ours.downsample, 24 // ours.downsample, ours.latent_channels)
  _assert_close(latents, theirs)

  z = np.random.default_rng(1).normal(size=theirs.shape).astype(np.float32)
  c = ref.config
  with torch.no_grad():
    decoded = _nhwc(ref.decode(_nchw(z / c.scaling_factor + (c.shift_factor or 0.0))).sample)
  out = _decode(ours, jnp.asarray(z))
  assert out.shape == (2, 16, 24, 3)
  _assert_close(out, decoded)


def test_round_trip_bit_exact(pair):
  ref, ours = pair
  back = keymap.to_torch(keymap.flatten_state(nnx.state(ours, nnx.Param)), KEY_TABLE)
  sd = _numpy_sd(ref)
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
  fresh = AutoencoderKL(**config_to_diffusers(ours.cfg))
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in back.items()}, strict=True)


def test_config_round_trip(pair):
  ref, ours = pair
  d = config_to_diffusers(ours.cfg)
  for k, v in d.items():
    theirs = ref.config[k]
    assert (list(theirs) if isinstance(theirs, (list, tuple)) else theirs) == v, k
  assert config_from_diffusers(d) == ours.cfg
  with pytest.raises(ValueError, match="unknown field"):
    config_from_diffusers({**d, "bogus": 1})
  with pytest.raises(ValueError, match="latents_mean"):
    config_from_diffusers({**d, "latents_mean": [0.0] * 4})


def test_broken_mapping_fails():
  ref = _reference("quant_attn")
  sd = _numpy_sd(ref)
  # A spatially transposed conv kernel (OIHW read as OIWH): same shape, wrong layout.
  sd["encoder.conv_in.weight"] = np.ascontiguousarray(sd["encoder.conv_in.weight"].transpose(0, 1, 3, 2))
  ours = _abstract_vae(config_from_diffusers(ref.config))
  _load(ours, sd)
  images = _images()
  diff = float(np.abs(np.asarray(_encode(ours, jnp.asarray(images))) - _torch_encode_normalised(ref, images)).max())
  assert diff > 1e-2, diff
  del sd["decoder.mid_block.attentions.0.to_q.bias"]
  with pytest.raises(keymap.KeyMismatchError, match="to_q.bias"):
    _load(ours, sd)


def test_sampled_posterior(pair):
  _, ours = pair
  images = jnp.asarray(_images(b=1, h=8, w=8))
  # One compilation for the mean, a sample and the log-variance.
  f = jax.jit(lambda m, x, k: (m.encode(x), m.encode(x, rng=k), m.moments(x)[1]))
  mean, a, logvar = f(ours, images, jax.random.key(0))
  _, b, _ = f(ours, images, jax.random.key(0))
  _, c, _ = f(ours, images, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(jnp.abs(a - mean).max()) > 0 and float(jnp.abs(a - c).max()) > 0
  noise = (a - mean) / (ours.cfg.scaling_factor * jnp.exp(0.5 * logvar))
  assert abs(float(jnp.std(noise)) - 1.0) < 0.25


def test_full_flux_vae_param_count_and_axes():
  abstract = nnx.eval_shape(lambda: FluxVAE(FluxVAEConfig(), rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  n = count_params(params)
  assert n == 83_819_683  # diffusers.AutoencoderKL(**FluxVAEConfig().to_diffusers()) counts the same
  assert abs(n - 83.8e6) <= 0.05 * 83.8e6
  assert abstract.downsample == 8 and abstract.latent_channels == 16
  allowed = {"embed", "mlp", "heads", "kv", "vocab", "conv_in", "conv_out", None}
  for path, var in nnx.to_flat_state(params):
    axes = var.get_metadata().get("axes")
    assert axes is not None and len(axes) == len(var.shape) and set(axes) <= allowed, (path, axes)


def test_bf16_compute():
  ref = _reference("quant_attn")
  model = _abstract_vae(config_from_diffusers(ref.config), dtype=jnp.bfloat16)
  _load(model, _numpy_sd(ref))
  images = _images(b=1, h=8, w=8)
  lat = _encode(model, jnp.asarray(images))
  img = _decode(model, lat)
  assert lat.dtype == jnp.float32 and img.dtype == jnp.float32 and img.shape == (1, 8, 8, 3)
  theirs = _torch_encode_normalised(ref, images)
  # bf16 convolutions: loose agreement with the fp32 reference, but far from garbage.
  assert float(np.abs(np.asarray(lat) - theirs).max()) < 0.05 * max(1.0, float(np.abs(theirs).max()))
  assert bool(jnp.all(jnp.isfinite(img)))


def test_identity_and_factory():
  ae = make_autoencoder("identity", scale=2.0)
  assert isinstance(ae, IdentityAutoencoder) and isinstance(ae, Autoencoder)
  assert ae.downsample == 1 and ae.latent_channels == 3
  x = jnp.asarray(_images())
  np.testing.assert_array_equal(np.asarray(ae.encode(x, rng=jax.random.key(0))), np.asarray(x) * 2.0)
  np.testing.assert_allclose(np.asarray(ae.decode(ae.encode(x))), np.asarray(x), rtol=0, atol=1e-7)
  assert nnx.state(ae, nnx.Param) == nnx.state(IdentityAutoencoder(), nnx.Param)  # no parameters
  s2d = make_autoencoder("identity", factor=2)
  assert s2d.downsample == 2 and s2d.latent_channels == 12
  z = s2d.encode(x)
  assert z.shape == (x.shape[0], x.shape[1] // 2, x.shape[2] // 2, 12)
  np.testing.assert_array_equal(np.asarray(z[:, 0, 0, :3]), np.asarray(x[:, 0, 0]))  # block (0,0) pixel (0,0)
  np.testing.assert_array_equal(np.asarray(z[:, 0, 0, 3:6]), np.asarray(x[:, 0, 1]))  # pixel (0,1) next
  np.testing.assert_array_equal(np.asarray(s2d.decode(z)), np.asarray(x))  # exactly invertible
  vae = nnx.eval_shape(lambda: make_autoencoder("flux_vae", cfg=TINY["flux_like"], rngs=nnx.Rngs(0)))
  assert isinstance(vae, FluxVAE) and isinstance(vae, Autoencoder) and vae.downsample == 4
  with pytest.raises(ValueError, match="unknown autoencoder kind"):
    make_autoencoder("vqgan")
  with pytest.raises(ValueError, match="norm_num_groups"):
    FluxVAEConfig(**{**TINY["flux_like"], "norm_num_groups": 24})


def test_run_loads_the_vae_from_a_diffusers_folder(tmp_path):
  """config.model.autoencoder.path = a save_pretrained AutoencoderKL folder: the run's VAE takes its config and
  weights (sharded on a 2-device mesh) and encodes like diffusers; a folder missing a tensor fails naming it."""
  from safetensors.torch import load_file, save_file

  from helpers import tiny_config
  from iomm_jax import parallel, tree_paths
  from iomm_jax.models import factory
  from iomm_jax.train import builder

  ref = _reference("flux_like")
  ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
  c = tiny_config()
  c.model.autoencoder.kind, c.model.autoencoder.path = "flux_vae", str(tmp_path / "vae")
  c.model.frozen_dtype = "float32"
  mesh = parallel.make_mesh(c.mesh, devices=jax.devices()[:2])
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: factory.make_ae(c, nnx.Rngs(0))))
  shardings = parallel.param_shardings(abstract, mesh, c.mesh.rules)
  params = builder.load_vae_weights(c, shardings, jnp.float32)
  flat_params, flat_sh = tree_paths.flatten(params), tree_paths.flatten(shardings)
  assert all(v.sharding == flat_sh[k] for k, v in flat_params.items())  # placed on the run's shardings as read
  ae = nnx.merge(graphdef, params)
  assert ae.latent_channels == 16 and ae.downsample == 4  # from the folder's config.json, not FLUX.1's defaults
  images = _images(2, 16, 16)
  _assert_close(_encode(ae, jnp.asarray(images)), _torch_encode_normalised(ref, images))

  weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
  sd = load_file(weights)
  del sd["encoder.conv_in.bias"]
  save_file(sd, weights)
  with pytest.raises(keymap.KeyMismatchError, match="encoder.conv_in.bias"):
    builder.load_vae_weights(c, shardings, jnp.float32)


@pytest.mark.parametrize(
    "edit, says",
    [
        ({"latent_channels": 0}, "latent_channels=0 must be an integer >= 1"),
        ({"scaling_factor": "0.36"}, 'scaling_factor="0.36" must be a finite number > 0'),
        ({"block_out_channels": [8, 16.0]}, "block_out_channels=[8, 16.0] must be a list of integers >= 1"),
    ],
)
def test_a_hand_edited_vae_config_is_one_line_naming_file_and_field(tmp_path, edit, says):
  """model.autoencoder.path's config.json is checked as the converter checks it (models/config_json), and a
  negative latent shift, valid, is kept."""
  from helpers import tiny_config
  from iomm_jax.config import ConfigError
  from iomm_jax.models import factory

  (tmp_path / "vae").mkdir()
  cfg_file = tmp_path / "vae" / "config.json"
  c = tiny_config()
  c.model.autoencoder.kind, c.model.autoencoder.path = "flux_vae", str(tmp_path / "vae")
  cfg_file.write_text(json.dumps({**TINY["flux_like"], "shift_factor": -0.2, **edit}))
  with pytest.raises(ConfigError) as e:
    factory.vae_config(c)
  assert str(e.value).startswith(f"{cfg_file}: ") and says in str(e.value) and "\n" not in str(e.value), str(e.value)
  cfg_file.write_text(json.dumps({**TINY["flux_like"], "shift_factor": -0.2}))
  assert factory.vae_config(c).shift_factor == -0.2
  cfg_file.write_text("[]")
  with pytest.raises(ConfigError, match="config.json holds a JSON list, not an object of config fields"):
    factory.vae_config(c)
