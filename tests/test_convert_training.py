"""Training from converted PyTorch weights and back: a run initialised from to-jax folders starts from exactly those
weights, names a mismatched config field, and its exported checkpoint gives diffusers' and the reference RQA's
outputs.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from flax import nnx

from helpers import tiny_config
from iomm_jax.convert.torch_rqa import TorchRQA
from iomm_jax.models import keymap
from iomm_jax.weights import io, orbax_io
from torch_checkpoints import load_reference, perturb, run_cli


def _tiny_train_config(**overrides):
  """configs/tiny.py:short at 1+1 DiT blocks and a 1-layer MLLM (compile time), 2 steps, checkpoint at 2; the DiT
  predicts v, as the diffusers pipelines it is exported to read it."""
  return tiny_config(
      "short",
      **{
          "model__prediction": "v",
          "train__num_steps": 2,
          "train__ckpt_every": 2,
          "train__log_every": 1,
          "train__sample_every": 0,
          "train__warmup_steps": 1,
          "model__dit__arch__num_layers": 1,
          "model__dit__arch__num_single_layers": 1,
          "model__mllm__arch__text__num_hidden_layers": 1,
          "model__mllm__arch__vision__num_hidden_layers": 1,
          **overrides,
      },
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
  perturb(FluxTransformer2DModel(**factory.dit_config(base, width).to_diffusers()), 0.02).save_pretrained(root / "flux")
  r = factory.rqa_config(base, width)
  torch.manual_seed(6)
  rqa = perturb(
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
  assert run_cli("to-jax", "--component", "transformer", "--src", root / "flux", "--dst", root / "init_t") == 0
  assert run_cli("to-jax", "--component", "rqa", "--src", root / "rqa" / "rqa.pt", "--dst", root / "init_r") == 0

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
  assert run_cli("to-torch", "--src", root / "work", "--use-ema", "--dst", root / "export") == 0
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
  from iomm_jax.train import loop
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
  # Training checks them before it writes anything: the refused run's workdir stays empty.
  with pytest.raises(InitWeightsError, match="to-jax --component transformer"):
    loop.train(wrong, str(root / "refused"))
  assert os.listdir(root / "refused") == []


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
  from iomm_jax.train import restore

  saved = restore.load_config(str(trained["work"]))  # the sampler's time grid is the training shift's
  assert info["sampling"] == {
      "steps": saved.sample.steps,
      "cfg_scale": saved.sample.cfg_scale,
      "time_shift": saved.train.time_shift,
  }
  flux = FluxTransformer2DModel.from_pretrained(export / "transformer").eval()
  rqa = load_reference("rqa", export / "rqa").eval()

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


@pytest.fixture(scope="module")
def trained_x(tmp_path_factory):
  """A 2-step run of the tiny demo's own prediction: its DiT predicts x (the clean latent), so it has no pipeline
  folder, but its trained components export one by one."""
  from iomm_jax.train import loop

  work = tmp_path_factory.mktemp("run_x") / "work"
  config = _tiny_train_config(model__prediction="x")
  loop.train(config, str(work))
  return work


@pytest.mark.slow  # one in-process training run (≈1 min of compile on 2 CPU cores)
@pytest.mark.parametrize("component, part", [("transformer", "dit"), ("rqa", "rqa")])
def test_one_component_of_a_workdir_exports_its_checkpoint_weights(trained_x, tmp_path, capsys, component, part):
  """to-torch --component transformer|rqa --src WORKDIR: just that folder, from the checkpoint and weights asked for
  (an x-predicting run's DiT too), and to-jax of it gives back exactly the checkpoint's params."""
  from iomm_jax.convert.export import load_generator

  run, raw, _ = load_generator(trained_x, use_ema=False)
  _, ema, _ = load_generator(trained_x, use_ema=True)
  for flag, weights, tree in (("--no-ema", "params", raw), ("--use-ema", "ema", ema)):
    out = tmp_path / f"{component}_{weights}"
    capsys.readouterr()
    assert run_cli("to-torch", "--component", component, "--src", trained_x, flag, "--dst", out) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["component"] == component and said["checkpoint_step"] == 2 and said["weights"] == weights
    assert said["prediction"] == "x"
    assert ("note" in said) is (component == "transformer")  # the DiT's output is x, not a pipeline's velocity
    assert sorted(os.listdir(out)) == sorted(["config.json", "iomm_export.json", *said["files"]])
    marker = json.load(open(out / "iomm_export.json"))
    assert marker["source"] == str(trained_x) and marker["prediction"] == "x" and marker["weights"] == weights
    assert run_cli("to-jax", "--component", component, "--src", out, "--dst", tmp_path / f"back_{weights}") == 0
    meta, back = orbax_io.load(tmp_path / f"back_{weights}")
    want = {k: np.asarray(v) for k, v in keymap.flatten_state(tree[part]).items()}
    assert meta["kind"] == (run.config.model.dit.kind if component == "transformer" else "rqa")
    assert sorted(back) == sorted(want)
    for k, v in want.items():
      assert np.array_equal(back[k], v), (component, weights, k)
  # The two DiT exports differ (EMA is not the raw weights; 2 steps leave this RQA where it started), and --dtype casts.
  raw_flat, ema_flat = keymap.flatten_state(raw[part]), keymap.flatten_state(ema[part])
  differ = any(not np.array_equal(np.asarray(raw_flat[k]), np.asarray(ema_flat[k])) for k in raw_flat)
  assert differ or component == "rqa"
  assert (
      run_cli("to-torch", "--component", component, "--src", trained_x, "--dtype", "bf16", "--dst", tmp_path / "b") == 0
  )
  assert {dtype for _, dtype in io.tensor_specs(tmp_path / "b").values()} == {"BF16"}


def test_an_export_whose_vae_config_was_edited_since_names_the_file_and_field(tmp_path):
  """export reads the run's VAE folder through the converter's own check of config.json fields."""
  from iomm_jax.convert import export
  from iomm_jax.weights.components import ConvertError

  (tmp_path / "vae").mkdir()
  (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": -4}))
  c = tiny_config()
  c.model.autoencoder.kind, c.model.autoencoder.path = "flux_vae", str(tmp_path / "vae")
  with pytest.raises(ConvertError, match=r"vae/config.json: latent_channels=-4 must be an integer >= 1"):
    export._vae_config(c)
  (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "num_layers": 2}))
  with pytest.raises(ConvertError, match=r"does not describe a VAE .*unknown field\(s\) \['num_layers'\]"):
    export._vae_config(c)
