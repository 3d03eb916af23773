"""The converter CLI (python -m iomm_jax.convert): round trips for all four components, strictness, verify,
a trained checkpoint loading in diffusers with the same outputs, and training starting from converted weights.

Every PyTorch checkpoint here is a tiny random model built in the test and saved with save_pretrained / torch.save.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, ZImageTransformer2DModel
from flax import nnx
from transformers import InternVLConfig as HFInternVLConfig
from transformers import InternVLForConditionalGeneration

from helpers import ROOT, tiny_config
from iomm_jax.convert import cli
from iomm_jax.weights import io, orbax_io
from iomm_jax.models import keymap, mmdit_keys
from iomm_jax.models.keymap import Rule
from iomm_jax.convert.torch_rqa import TorchRQA

FLUX = dict(
    in_channels=8,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    pooled_projection_dim=12,
    axes_dims_rope=(2, 2, 4),
)
ZIMAGE = dict(
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=4,
    dim=32,
    n_layers=1,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    qk_norm=True,
    cap_feat_dim=16,
    axes_dims=[4, 6, 6],
    axes_lens=[64, 16, 16],
)
VAE = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    scaling_factor=0.5,
    shift_factor=0.25,
    sample_size=16,
)
RQA = dict(dim=16, num_queries=4, num_heads=2, mlp_ratio=2.0, num_layers=1, eps=1e-6)
MLLM = dict(
    vision_config=dict(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28, patch_size=7
    ),
    text_config=dict(
        model_type="qwen2",
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    ),
    image_token_id=99,
    image_seq_length=4,
)


def _perturb(model, scale=0.1):
  """Move every parameter (norm weights, zero biases) off its init so a wrong mapping cannot hide."""
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))
  return model


def _write_rqa(path, extra=None, drop=None):
  """The RQA reference layout (config.json + model.safetensors), optionally with an extra / missing key."""
  torch.manual_seed(3)
  ref = _perturb(TorchRQA(**RQA))
  sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  sd.update(extra or {})
  for k in drop or ():
    sd.pop(k)
  io.write_safetensors(sd, path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"_class_name": "TorchRQA", **RQA}, f)
  return ref


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """{name: (component, src path, extra CLI args)} of tiny random PyTorch checkpoints."""
  root = tmp_path_factory.mktemp("torch")
  out = {}
  torch.manual_seed(0)
  _perturb(FluxTransformer2DModel(**FLUX)).save_pretrained(root / "flux", max_shard_size="20KB")  # sharded + index
  out["mmdit"] = ("transformer", str(root / "flux"), [])
  torch.manual_seed(1)
  _perturb(ZImageTransformer2DModel(**ZIMAGE)).to(torch.bfloat16).save_pretrained(root / "zimage")  # bf16
  out["s3dit_bf16"] = ("transformer", str(root / "zimage"), [])
  torch.manual_seed(2)
  _perturb(AutoencoderKL(**VAE)).save_pretrained(root / "vae")
  # A bare .safetensors plus --config.
  out["vae_file"] = (
      "vae",
      str(root / "vae" / "diffusion_pytorch_model.safetensors"),
      ["--config", str(root / "vae" / "config.json")],
  )
  rqa = _write_rqa(str(root / "rqa"))
  os.makedirs(root / "rqa_pt")
  torch.save(rqa.state_dict(), root / "rqa_pt" / "rqa.pt")  # a torch pickle plus --config
  out["rqa_pt"] = ("rqa", str(root / "rqa_pt" / "rqa.pt"), ["--config", str(root / "rqa" / "config.json")])
  out["rqa"] = ("rqa", str(root / "rqa"), [])
  torch.manual_seed(4)
  _perturb(InternVLForConditionalGeneration(HFInternVLConfig(**MLLM))).save_pretrained(root / "mllm")
  out["mllm"] = ("mllm", str(root / "mllm"), [])
  return out


def _cli(*argv):
  return cli.main([str(a) for a in argv])


def _load_reference(kind, path):
  """Load an exported folder with the PyTorch library; asserts nothing was missing or unexpected."""
  if kind == "mmdit":
    model, info = FluxTransformer2DModel.from_pretrained(path, output_loading_info=True)
  elif kind == "s3dit_bf16":
    model, info = ZImageTransformer2DModel.from_pretrained(path, output_loading_info=True)
  elif kind == "vae_file":
    model, info = AutoencoderKL.from_pretrained(path, output_loading_info=True)
  elif kind.startswith("rqa"):
    cfg = json.load(open(os.path.join(path, "config.json")))
    model = TorchRQA(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    sd = {k: torch.from_numpy(v.copy()) for k, v in io.read_state_dict(path).items()}
    model.load_state_dict(sd, strict=True)
    return model
  else:
    model, info = InternVLForConditionalGeneration.from_pretrained(path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  return model


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["mmdit", "s3dit_bf16", "vae_file", "rqa_pt", "mllm"])
def test_round_trip_bit_exact(ckpts, tmp_path, name):
  component, src, extra = ckpts[name]
  assert _cli("to-jax", "--component", component, "--src", src, "--dst", tmp_path / "jax", *extra) == 0
  meta = orbax_io.read_meta(tmp_path / "jax")
  assert meta["component"] == component
  assert _cli("to-torch", "--component", component, "--src", tmp_path / "jax", "--dst", tmp_path / "torch") == 0
  before, after = io.read_state_dict(src), io.read_state_dict(tmp_path / "torch")
  assert sorted(before) == sorted(after)
  for k, v in before.items():
    assert after[k].dtype == v.dtype and np.array_equal(after[k], v), k
  if name == "s3dit_bf16":
    assert meta["dtypes"] == ["bfloat16"] and {str(v.dtype) for v in after.values()} == {"bfloat16"}
  _load_reference(name, tmp_path / "torch")


def test_dtype_cast(ckpts, tmp_path):
  _, src, extra = ckpts["rqa"]
  assert _cli("to-jax", "--component", "rqa", "--src", src, "--dst", tmp_path / "j", "--dtype", "bf16") == 0
  _, flat = orbax_io.load(tmp_path / "j")
  assert {str(v.dtype) for v in flat.values()} == {"bfloat16"}


# ---------------------------------------------------------------- strictness and user errors


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_to_jax_strict(tmp_path, capsys, change):
  if change == "extra":
    _write_rqa(str(tmp_path / "src"), extra={"query_blocks.0.bogus.weight": np.zeros((2, 2), np.float32)})
    key = "query_blocks.0.bogus.weight"
  else:
    _write_rqa(str(tmp_path / "src"), drop=["query_blocks.0.mlp.fc1.bias"])
    key = "query_blocks.0.mlp.fc1.bias"
  assert _cli("to-jax", "--component", "rqa", "--src", tmp_path / "src", "--dst", tmp_path / "dst") == 2
  err = capsys.readouterr().err
  assert key in err and ("unexpected" if change == "extra" else "missing") in err
  assert not (tmp_path / "dst").exists()


def test_user_errors_exit_2(ckpts, tmp_path, capsys):
  _, flux, _ = ckpts["mmdit"]
  assert _cli("to-jax", "--component", "transformer", "--src", tmp_path / "nope", "--dst", tmp_path / "d") == 2
  assert "does not exist" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:  # unknown component: argparse, exit 2
    _cli("to-jax", "--component", "unet", "--src", flux, "--dst", tmp_path / "d")
  assert e.value.code == 2
  # A wrong --component for the checkpoint: its config is not that component's.
  assert _cli("to-jax", "--component", "vae", "--src", flux, "--dst", tmp_path / "d") == 2
  assert "does not describe a AutoencoderKL" in capsys.readouterr().err
  # A bare .safetensors without a config beside it.
  os.makedirs(tmp_path / "bare")
  io.write_safetensors({"x": np.zeros(2, np.float32)}, tmp_path / "bare")
  assert (
      _cli("to-jax", "--component", "rqa", "--src", tmp_path / "bare" / "model.safetensors", "--dst", tmp_path / "d")
      == 2
  )
  assert "--config" in capsys.readouterr().err
  # to-torch: not a component directory, then the wrong component for one.
  assert _cli("to-torch", "--component", "rqa", "--src", flux, "--dst", tmp_path / "d") == 2
  assert "component.json" in capsys.readouterr().err
  assert _cli("to-jax", "--component", "transformer", "--src", flux, "--dst", tmp_path / "j") == 0
  assert _cli("to-torch", "--component", "vae", "--src", tmp_path / "j", "--dst", tmp_path / "d") == 2
  assert "--component transformer" in capsys.readouterr().err
  assert _cli("to-jax", "--component", "transformer", "--src", flux, "--dst", tmp_path / "j") == 2  # not empty
  assert "--overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------- broken mappings and verify

_Q = r"transformer_blocks\.0\.attn\.to_q\.kernel"
_K = r"transformer_blocks\.0\.attn\.to_k\.kernel"


def test_broken_mapping_stops_the_round_trip(ckpts, tmp_path, capsys, monkeypatch):
  _, flux, _ = ckpts["mmdit"]
  # Two parameters onto one torch key.
  monkeypatch.setattr(mmdit_keys.KEY_TABLE, "rules", [Rule(_Q, "transformer_blocks.0.attn.to_k.weight", "linear")])
  assert _cli("to-jax", "--component", "transformer", "--src", flux, "--dst", tmp_path / "a") == 2
  assert "transformer_blocks.0.attn.to_k.weight" in capsys.readouterr().err
  # A wrong transform (no transpose) on a non-square weight: the shape check lists it.
  monkeypatch.setattr(mmdit_keys.KEY_TABLE, "rules", [Rule(r"x_embedder\.kernel", "x_embedder.weight", "identity")])
  assert _cli("to-jax", "--component", "transformer", "--src", flux, "--dst", tmp_path / "b") == 2
  err = capsys.readouterr().err
  assert "wrong shape" in err and "x_embedder.weight" in err


def test_swapped_mapping_fails_verify(ckpts, tmp_path, monkeypatch):
  """q↔k swapped in the table survives a round trip (it is its own inverse) but not verify."""
  _, flux, _ = ckpts["mmdit"]
  monkeypatch.setattr(
      mmdit_keys.KEY_TABLE,
      "rules",
      [
          Rule(_Q, "transformer_blocks.0.attn.to_k.weight", "linear"),
          Rule(_K, "transformer_blocks.0.attn.to_q.weight", "linear"),
      ],
  )
  assert _cli("verify", "--component", "transformer", "--src", flux) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mmdit", "s3dit_bf16", "vae_file", "rqa", "mllm"])
def test_verify_passes_on_good_checkpoints(ckpts, capsys, name):
  component, src, extra = ckpts[name]
  assert _cli("verify", "--component", component, "--src", src, *extra) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["passed"] and all(o["max_rel_diff"] <= 1e-4 for o in report["outputs"].values())


def test_verify_converted_and_tampered(ckpts, tmp_path, capsys):
  _, flux, _ = ckpts["mmdit"]
  assert _cli("to-jax", "--component", "transformer", "--src", flux, "--dst", tmp_path / "good") == 0
  assert _cli("verify", "--component", "transformer", "--src", flux, "--jax", tmp_path / "good") == 0
  assert _cli("verify", "--component", "transformer", "--src", tmp_path / "good") == 0
  capsys.readouterr()
  meta, flat = orbax_io.load(tmp_path / "good")
  flat["transformer_blocks.0.attn.to_v.kernel"] = flat["transformer_blocks.0.attn.to_v.kernel"] + 0.05
  orbax_io.save(tmp_path / "bad", component=meta["component"], kind=meta["kind"], config=meta["config"], params=flat)
  assert _cli("verify", "--component", "transformer", "--src", flux, "--jax", tmp_path / "bad") == 1
  report = json.loads(capsys.readouterr().out)
  assert not report["passed"] and report["outputs"]["weights"]["key"] == "transformer_blocks.0.attn.to_v.weight"


def test_to_jax_and_to_torch_do_not_import_torch(ckpts, tmp_path):
  _, src, _ = ckpts["rqa"]
  code = (
      f"import sys; from iomm_jax.convert import cli; "
      f"assert cli.main(['to-jax','--component','rqa','--src',{src!r},'--dst',{str(tmp_path / 'j')!r}]) == 0; "
      f"assert cli.main(['to-torch','--component','rqa','--src',{str(tmp_path / 'j')!r},"
      f"'--dst',{str(tmp_path / 't')!r}]) == 0; print('TORCH' if 'torch' in sys.modules else 'NO_TORCH')"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().endswith("NO_TORCH")


# ---------------------------------------------------------------- trained checkpoints ↔ diffusers


def test_export_refuses_an_x_prediction_run(tmp_path):
  """A run whose DiT predicts the clean latent is not a diffusers Flux pipeline: to-torch says so in one line."""
  work = tmp_path / "w"
  (work / "checkpoints").mkdir(parents=True)
  (work / "config.json").write_text(tiny_config().to_json())
  assert tiny_config().model.prediction == "x"
  from iomm_jax.weights import components
  from iomm_jax.convert import export

  with pytest.raises(components.ConvertError, match="model.prediction='x'"):
    export.export_workdir(work, tmp_path / "out")


def _tiny_train_config(**overrides):
  """configs/tiny.py:short at 1+1 DiT blocks and a 1-layer MLLM (compile time), 2 steps, checkpoint at 2; the DiT
  predicts v, as the diffusers pipelines it is exported to read it."""
  return tiny_config(
      "short",
      model__prediction="v",
      train__num_steps=2,
      train__ckpt_every=2,
      train__log_every=1,
      train__sample_every=0,
      train__warmup_steps=1,
      model__dit__arch__num_layers=1,
      model__dit__arch__num_single_layers=1,
      model__mllm__arch__text__num_hidden_layers=1,
      model__mllm__arch__vision__num_hidden_layers=1,
      **overrides,
  )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One in-process training run that starts from converted PyTorch weights and is exported back.

  1. random diffusers FluxTransformer2DModel / TorchRQA of the run's sizes → to-jax → DIRs;
  2. train 2 steps with --config.init.transformer / --config.init.rqa = DIRs (the initial params are captured);
  3. to-torch --src WORKDIR --use-ema → pipeline folder.
  """
  from iomm_jax.weights import init_weights
  from iomm_jax.models import factory
  from iomm_jax.train import loop

  root = tmp_path_factory.mktemp("run")
  base = _tiny_train_config()
  width = factory.mllm_width(factory.mllm_config(base))
  torch.manual_seed(5)
  _perturb(FluxTransformer2DModel(**factory.dit_config(base, width).to_diffusers()), 0.02).save_pretrained(
      root / "flux"
  )
  r = factory.rqa_config(base, width)
  torch.manual_seed(6)
  rqa = _perturb(
      TorchRQA(
          dim=r.dim,
          num_queries=r.num_queries,
          num_heads=r.num_heads,
          mlp_ratio=r.mlp_ratio,
          num_layers=r.num_layers,
          eps=r.eps,
      ),
      0.02,
  )
  os.makedirs(root / "rqa")
  torch.save(rqa.state_dict(), root / "rqa" / "rqa.pt")
  with open(root / "rqa" / "config.json", "w") as f:
    json.dump(rqa.config, f)
  assert _cli("to-jax", "--component", "transformer", "--src", root / "flux", "--dst", root / "init_t") == 0
  assert _cli("to-jax", "--component", "rqa", "--src", root / "rqa" / "rqa.pt", "--dst", root / "init_r") == 0

  captured = {}
  original = init_weights.apply

  def spy(config, params, shardings):
    out = original(config, params, shardings)
    captured["params"] = jax.device_get(out)
    return out

  config = _tiny_train_config(init__transformer=str(root / "init_t"), init__rqa=str(root / "init_r"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(init_weights, "apply", spy)
    loop.train(config, str(root / "work"))
  assert _cli("to-torch", "--src", root / "work", "--use-ema", "--dst", root / "export") == 0
  return {"root": root, "work": root / "work", "export": root / "export", "initial": captured["params"]}


def _diff(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.max(np.abs(ours - theirs))) / max(1.0, float(np.max(np.abs(theirs))))


@pytest.mark.slow  # shares one in-process training run (≈1 min of compile on 2 CPU cores)
def test_training_starts_from_converted_weights(trained):
  for part, d in (("dit", "init_t"), ("rqa", "init_r")):
    _, flat = orbax_io.load(trained["root"] / d)
    got = {k: np.asarray(v) for k, v in keymap.flatten_state(trained["initial"][part]).items()}
    assert sorted(got) == sorted(flat)
    for k, v in flat.items():
      assert np.array_equal(got[k], v), (part, k)


@pytest.mark.slow  # shares one in-process training run (≈1 min of compile on 2 CPU cores)
def test_init_config_mismatch_names_the_field(trained):
  from iomm_jax.weights.init_weights import InitWeightsError, apply

  root, params = trained["root"], trained["initial"]
  bad = _tiny_train_config(
      init__transformer=str(root / "init_t"),
      model__dit__arch__attention_head_dim=8,
      model__dit__arch__axes_dims_rope=(2, 2, 4),
  )
  with pytest.raises(InitWeightsError, match="attention_head_dim=16 but the run has attention_head_dim=8"):
    apply(bad, params, {"dit": None, "rqa": None})
  bad = _tiny_train_config(init__rqa=str(root / "init_r"), model__rqa__num_queries=8)
  with pytest.raises(InitWeightsError, match="config.model.rqa.num_queries"):
    apply(bad, params, {"dit": None, "rqa": None})
  wrong = _tiny_train_config(init__transformer=str(root / "init_r"))
  with pytest.raises(InitWeightsError, match="to-jax --component transformer"):
    apply(wrong, params, {"dit": None, "rqa": None})


@pytest.mark.slow  # shares one in-process training run (≈1 min of compile on 2 CPU cores)
def test_trained_checkpoint_loads_in_diffusers(trained):
  from iomm_jax.models import latents

  export = trained["export"]
  info = json.load(open(export / "iomm_pipeline.json"))
  assert info["checkpoint_step"] == 2 and info["weights"] == "ema" and info["mllm"]["kind"] == "random tiny"
  assert info["autoencoder"]["folder"] is None and (export / "vae_NOTE.txt").is_file()
  assert not (export / "vae").exists()
  for k in ("mask_ratio", "condition", "sampling", "resolution"):
    assert k in info
  flux = FluxTransformer2DModel.from_pretrained(export / "transformer").eval()
  rqa = _load_reference("rqa", export / "rqa").eval()

  from iomm_jax.convert.export import load_generator

  run, ema, step = load_generator(trained["work"], use_ema=True)
  _, raw, _ = load_generator(trained["work"], use_ema=False)
  assert step == 2
  gen = nnx.merge(run.statics.gen_def, ema)
  # Training moved the weights away from the converted starting point, and the export holds the EMA ones.
  assert not np.array_equal(
      np.asarray(raw["dit"]["proj_out"]["kernel"]), trained["initial"]["dit"]["proj_out"]["kernel"]
  )
  assert not np.array_equal(np.asarray(raw["dit"]["proj_out"]["kernel"]), np.asarray(ema["dit"]["proj_out"]["kernel"]))
  cfg = gen.dit.cfg
  rng = np.random.default_rng(0)
  b, (gh, gw), lc = 2, (4, 4), 16
  x = rng.standard_normal((b, gh * gw, cfg.in_channels)).astype(np.float32)
  h = rng.standard_normal((b, lc, cfg.joint_attention_dim)).astype(np.float32)
  pooled, t = h.mean(1), np.array([0.3, 0.8], np.float32)
  img_ids, txt_ids = np.array(latents.image_ids(gh, gw)), np.array(latents.text_ids(lc))
  ours = jax.jit(lambda *a: gen.dit(*a))(x, h, pooled, t, img_ids, txt_ids)
  with torch.no_grad():
    theirs = flux(
        hidden_states=torch.from_numpy(x),
        encoder_hidden_states=torch.from_numpy(h),
        pooled_projections=torch.from_numpy(pooled),
        timestep=torch.from_numpy(t),
        img_ids=torch.from_numpy(img_ids),
        txt_ids=torch.from_numpy(txt_ids),
        return_dict=False,
    )[0]
  assert np.abs(theirs.numpy()).max() > 0
  assert _diff(ours, theirs.numpy()) <= 1e-4

  c = rng.standard_normal((b, 7, gen.rqa.cfg.dim)).astype(np.float32)
  mask = np.ones((b, 7), bool)
  mask[1, 4:] = False
  ours_q = jax.jit(lambda c, m: gen.rqa(c, m))(c, mask)
  with torch.no_grad():
    theirs_q = rqa(torch.from_numpy(c), torch.from_numpy(mask)).numpy()
  assert _diff(ours_q, theirs_q) <= 1e-4
