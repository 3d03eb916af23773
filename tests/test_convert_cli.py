"""The converter CLI (python -m iomm_jax.convert): round trips for every component, strictness, user errors, verify.
Training from converted weights and exporting back: tests/test_convert_training.py.

Every PyTorch checkpoint here is a tiny random model built in the test and saved with save_pretrained / torch.save.
"""

import json
import os
import shutil
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, ZImageTransformer2DModel
from transformers import InternVLConfig as HFInternVLConfig
from transformers import InternVLForConditionalGeneration

from helpers import ROOT, tiny_config
from iomm_jax.models import mmdit_keys
from iomm_jax.models.keymap import Rule
from iomm_jax.models.processor import Processor
from iomm_jax.convert import verify
from iomm_jax.weights import io, orbax_io, transfer
from iomm_jax.weights.components import ConvertError
from torch_checkpoints import FLUX, MLLM, VAE, ZIMAGE, load_reference, perturb, run_cli, write_rqa


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """{name: (component, src path, extra CLI args)} of tiny random PyTorch checkpoints."""
  root = tmp_path_factory.mktemp("torch")
  out = {}
  torch.manual_seed(0)
  perturb(FluxTransformer2DModel(**FLUX)).save_pretrained(root / "flux", max_shard_size="20KB")  # sharded + index
  out["mmdit"] = ("transformer", str(root / "flux"), [])
  torch.manual_seed(1)
  perturb(ZImageTransformer2DModel(**ZIMAGE)).to(torch.bfloat16).save_pretrained(root / "zimage")  # bf16
  out["s3dit_bf16"] = ("transformer", str(root / "zimage"), [])
  torch.manual_seed(2)
  perturb(AutoencoderKL(**VAE)).save_pretrained(root / "vae")
  # A bare .safetensors plus --config.
  out["vae_file"] = (
      "vae",
      str(root / "vae" / "diffusion_pytorch_model.safetensors"),
      ["--config", str(root / "vae" / "config.json")],
  )
  rqa = write_rqa(str(root / "rqa"))
  os.makedirs(root / "rqa_pt")
  torch.save(rqa.state_dict(), root / "rqa_pt" / "rqa.pt")  # a torch pickle plus --config
  out["rqa_pt"] = ("rqa", str(root / "rqa_pt" / "rqa.pt"), ["--config", str(root / "rqa" / "config.json")])
  out["rqa"] = ("rqa", str(root / "rqa"), [])
  torch.manual_seed(4)
  perturb(InternVLForConditionalGeneration(HFInternVLConfig(**MLLM))).save_pretrained(root / "mllm")
  Processor.tiny().tokenizer.save_pretrained(str(root / "mllm"))  # a folder training can load has its tokenizer
  out["mllm"] = ("mllm", str(root / "mllm"), [])
  return out


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["mmdit", "s3dit_bf16", "vae_file", "rqa_pt", "mllm"])
def test_round_trip_bit_exact(ckpts, tmp_path, name):
  component, src, extra = ckpts[name]
  assert run_cli("to-jax", "--component", component, "--src", src, "--dst", tmp_path / "jax", *extra) == 0
  meta = orbax_io.read_meta(tmp_path / "jax")
  assert meta["component"] == component
  assert run_cli("to-torch", "--component", component, "--src", tmp_path / "jax", "--dst", tmp_path / "torch") == 0
  before, after = io.read_state_dict(src), io.read_state_dict(tmp_path / "torch")
  assert sorted(before) == sorted(after)
  for k, v in before.items():
    assert after[k].dtype == v.dtype and np.array_equal(after[k], v), k
  if name == "s3dit_bf16":
    assert meta["dtypes"] == ["bfloat16"] and {str(v.dtype) for v in after.values()} == {"bfloat16"}
  load_reference(name, tmp_path / "torch")


@pytest.mark.parametrize("name,stored", [("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp32", "float32")])
def test_dtype_cast(ckpts, tmp_path, name, stored):
  """--dtype takes the numpy names every other config and command uses, and their short forms."""
  _, src, extra = ckpts["rqa"]
  assert run_cli("to-jax", "--component", "rqa", "--src", src, "--dst", tmp_path / "j", "--dtype", name) == 0
  _, flat = orbax_io.load(tmp_path / "j")
  assert {str(v.dtype) for v in flat.values()} == {stored}


def test_dtype_not_offered_is_one_line(ckpts, tmp_path, capsys):
  _, src, _ = ckpts["rqa"]
  with pytest.raises(SystemExit) as e:
    run_cli("to-jax", "--component", "rqa", "--src", src, "--dst", tmp_path / "j", "--dtype", "float16")
  assert e.value.code == 2 and not (tmp_path / "j").exists()
  err = capsys.readouterr().err
  assert "--dtype='float16' is not one of float32, bfloat16 (or fp32, bf16)" in err and "Traceback" not in err


# ---------------------------------------------------------------- strictness and user errors


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_to_jax_strict(tmp_path, capsys, change):
  if change == "extra":
    write_rqa(str(tmp_path / "src"), extra={"query_blocks.0.bogus.weight": np.zeros((2, 2), np.float32)})
    key = "query_blocks.0.bogus.weight"
  else:
    write_rqa(str(tmp_path / "src"), drop=["query_blocks.0.mlp.fc1.bias"])
    key = "query_blocks.0.mlp.fc1.bias"
  assert run_cli("to-jax", "--component", "rqa", "--src", tmp_path / "src", "--dst", tmp_path / "dst") == 2
  err = capsys.readouterr().err
  assert key in err and ("unexpected" if change == "extra" else "missing") in err
  assert not (tmp_path / "dst").exists()


def test_user_errors_exit_2(ckpts, tmp_path, capsys):
  _, flux, _ = ckpts["mmdit"]
  assert run_cli("to-jax", "--component", "transformer", "--src", tmp_path / "nope", "--dst", tmp_path / "d") == 2
  assert "does not exist" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:  # unknown component: argparse, exit 2
    run_cli("to-jax", "--component", "unet", "--src", flux, "--dst", tmp_path / "d")
  assert e.value.code == 2
  # A wrong --component for the checkpoint: its config is not that component's.
  assert run_cli("to-jax", "--component", "vae", "--src", flux, "--dst", tmp_path / "d") == 2
  assert "does not describe a AutoencoderKL" in capsys.readouterr().err
  # A bare .safetensors without a config beside it.
  os.makedirs(tmp_path / "bare")
  io.write_safetensors({"x": np.zeros(2, np.float32)}, tmp_path / "bare")
  assert (
      run_cli("to-jax", "--component", "rqa", "--src", tmp_path / "bare" / "model.safetensors", "--dst", tmp_path / "d")
      == 2
  )
  assert "--config" in capsys.readouterr().err
  # Files that are not what their names say (a truncated download): one line naming the file.
  config = tmp_path / "flux_config.json"
  config.write_text((Path(flux) / "config.json").read_text())
  for name, data in (("cut.safetensors", b"\x08\x00"), ("cut.pt", b"not a torch pickle")):
    (tmp_path / name).write_bytes(data)
    src = tmp_path / name
    assert (
        run_cli("to-jax", "--component", "transformer", "--src", src, "--config", config, "--dst", tmp_path / "d") == 2
    )
    assert f"{src} cannot be read as a checkpoint" in capsys.readouterr().err
  assert not (tmp_path / "d").exists()
  # to-torch: not a component directory, then the wrong component for one.
  assert run_cli("to-torch", "--component", "rqa", "--src", flux, "--dst", tmp_path / "d") == 2
  assert "component.json" in capsys.readouterr().err
  (tmp_path / "run").mkdir()  # a training workdir before its first checkpoint: said so, not "convert it first"
  (tmp_path / "run" / "config.json").write_text('{"model": {}, "train": {}, "data": {}}')
  assert run_cli("to-torch", "--component", "transformer", "--src", tmp_path / "run", "--dst", tmp_path / "d") == 2
  assert "a training workdir that has saved no checkpoint yet" in capsys.readouterr().err
  assert run_cli("to-jax", "--component", "transformer", "--src", flux, "--dst", tmp_path / "j") == 0
  assert run_cli("to-torch", "--component", "vae", "--src", tmp_path / "j", "--dst", tmp_path / "d") == 2
  assert "--component transformer" in capsys.readouterr().err
  assert run_cli("to-jax", "--component", "transformer", "--src", flux, "--dst", tmp_path / "j") == 2  # not empty
  assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, field, value, says",
    [
        ("mmdit", "num_layers", "two", 'num_layers="two" must be an integer >= 0'),
        ("mmdit", "num_attention_heads", 0, "num_attention_heads=0 must be an integer >= 1"),
        ("mmdit", "in_channels", True, "in_channels=true must be an integer >= 1"),
        ("mmdit", "axes_dims_rope", "2,2,4", 'axes_dims_rope="2,2,4" must be a list of integers >= 1'),
        ("mmdit", None, [1, 2], "holds a JSON list, not an object of config fields"),
        ("s3dit_bf16", "n_heads", 0, "n_heads=0 must be an integer >= 1"),
        ("vae_file", "block_out_channels", [8, "16"], 'block_out_channels=[8, "16"] must be a list of integers >= 1'),
        ("rqa", "num_heads", 2.0, "num_heads=2.0 must be an integer >= 1"),
        ("mllm", "text_config.num_hidden_layers", "one", 'text_config.num_hidden_layers="one" must be an integer'),
        ("rqa", "mlp_ratio", 0, "mlp_ratio=0 must be a finite number > 0"),
        ("vae_file", "scaling_factor", -0.3, "scaling_factor=-0.3 must be a finite number > 0"),
        ("mllm", "text_config.rms_norm_eps", float("nan"), "text_config.rms_norm_eps=NaN must be a finite number > 0"),
    ],
)
def test_a_hand_edited_source_config_is_one_line_naming_its_file_and_field(
    ckpts, tmp_path, capsys, name, field, value, says
):
  """to-jax and verify check the source config.json's architecture fields before building anything from them."""
  component, src, extra = ckpts[name]
  config_arg = "--config" in extra
  config_file = Path(extra[1]) if config_arg else Path(src) / "config.json"
  edited = tmp_path / "edited"
  if config_arg:  # a bare weights file plus --config: edit a copy of the config
    edited.mkdir()
    args = [src, "--config", edited / "config.json"]
  else:
    shutil.copytree(src, edited)
    args = [edited]
  config = json.loads(config_file.read_text())
  if field is None:
    config = value
  else:
    *sections, key = field.split(".")
    node = config
    for s in sections:
      node = node[s]
    node[key] = value
  (edited / "config.json").write_text(json.dumps(config))
  commands = [("to-jax", "--dst", tmp_path / "dst"), ("verify",)]
  for command, *rest in commands:
    assert run_cli(command, "--component", component, "--src", *args, *rest) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {edited / 'config.json'}") and says in err and "\n" not in err, err
  assert not (tmp_path / "dst").exists()


def test_a_source_config_with_no_blocks_in_a_stack_is_not_refused_as_a_type(ckpts, tmp_path, capsys):
  """A depth of 0 is a model the MM-DiT builds (tests/test_mmdit.py): only the checkpoint's keys disagree here."""
  _, flux, _ = ckpts["mmdit"]
  shutil.copytree(flux, tmp_path / "edited")
  config = json.loads((tmp_path / "edited" / "config.json").read_text())
  (tmp_path / "edited" / "config.json").write_text(json.dumps({**config, "num_single_layers": 0}))
  assert run_cli("to-jax", "--component", "transformer", "--src", tmp_path / "edited", "--dst", tmp_path / "d") == 2
  err = capsys.readouterr().err
  assert "unexpected" in err and "single_transformer_blocks.0" in err and "must be" not in err


def test_overwrite_replaces_only_what_the_converter_wrote(ckpts, tmp_path, capsys):
  """--overwrite never deletes a folder the converter did not write, nor its own input: a workdir, a model folder or
  a thesis given as --dst by mistake stays as it was; the converter's own earlier output is replaced whole."""
  _, rqa, _ = ckpts["rqa"]
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "thesis.tex").write_text("years of work")
  assert run_cli("to-jax", "--component", "rqa", "--src", rqa, "--dst", mine, "--overwrite") == 2
  err = capsys.readouterr().err
  assert "did not write" in err and "give a new or empty folder" in err, err
  assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
  j = tmp_path / "j"
  assert run_cli("to-jax", "--component", "rqa", "--src", rqa, "--dst", j) == 0
  capsys.readouterr()
  for dst in (j, j / "params" / "again", tmp_path):  # the input itself, a folder inside it, one holding it
    assert run_cli("to-torch", "--component", "rqa", "--src", j, "--dst", dst, "--overwrite") == 2
    assert "is, holds or lies inside --src" in capsys.readouterr().err
  assert (j / "component.json").is_file() and not (j / "params" / "again").exists()
  t = tmp_path / "t"
  assert run_cli("to-torch", "--component", "rqa", "--src", j, "--dst", t) == 0
  assert run_cli("to-jax", "--component", "rqa", "--src", t, "--dst", j, "--overwrite") == 0  # its own output
  assert run_cli("to-torch", "--component", "rqa", "--src", j, "--dst", t, "--overwrite") == 0
  capsys.readouterr()
  assert sorted(p.name for p in t.iterdir()) == ["config.json", "iomm_export.json", "model.safetensors"]
  assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]  # no temporary left


def test_a_dst_that_is_or_sits_under_a_file_fails_before_any_conversion(ckpts, tmp_path, capsys, monkeypatch):
  _, rqa, _ = ckpts["rqa"]
  (tmp_path / "file").write_text("x")

  def no_work(*a, **k):
    raise AssertionError("converted before checking --dst")

  monkeypatch.setattr(transfer, "torch_to_ours", no_work)
  monkeypatch.setattr(orbax_io, "load", no_work)
  for command, dst, message in (
      ("to-jax", tmp_path / "file", "exists and is not a folder"),
      ("to-jax", tmp_path / "file" / "sub", "file is a file, so"),
      ("to-torch", tmp_path / "file", "exists and is not a folder"),
      ("to-torch", tmp_path / "file" / "sub", "file is a file, so"),
  ):
    assert run_cli(command, "--component", "rqa", "--src", rqa, "--dst", dst) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --dst={dst}") and message in err and "\n" not in err, err
  assert (tmp_path / "file").read_text() == "x"


def test_verify_fails_naming_a_missing_or_broken_tokenizer(ckpts, tmp_path, capsys, monkeypatch):
  _, mllm, _ = ckpts["mllm"]
  good = verify.check_tokenizer(mllm)
  assert good == {"vocab_size": Processor.tiny().vocab_size, "image_token_id": 4, "mismatches": []}
  missing, broken, odd_dir = tmp_path / "missing", tmp_path / "broken", tmp_path / "odd"
  for d in (missing, broken, odd_dir):
    shutil.copytree(mllm, d)
  config = json.loads((odd_dir / "config.json").read_text())  # weights saved with another image-token id
  (odd_dir / "config.json").write_text(json.dumps({**config, "image_token_id": 99}))
  odd = verify.check_tokenizer(odd_dir)
  assert len(odd["mismatches"]) == 1 and "image_token_id=99 but the tokenizer's <IMG_CONTEXT>" in odd["mismatches"][0]
  (missing / "tokenizer.json").unlink()
  (broken / "tokenizer.json").write_text("not json")
  assert verify.check_tokenizer(missing) == {
      "error": f"{missing} has no tokenizer.json, so its tokenizer cannot be loaded; copy tokenizer.json and "
      "tokenizer_config.json from the model's download into it"
  }
  assert verify.check_tokenizer(broken)["error"].startswith(f"{broken / 'tokenizer.json'} is not valid JSON")
  # The CLI: the report fails and the one line names the file (the numerical comparison stubbed: it is tested above).
  same = {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "scale": 1.0}
  monkeypatch.setattr(verify, "verify_mllm", lambda src, **kw: {k: same for k in verify.MLLM_PARTS})
  assert run_cli("verify", "--component", "mllm", "--src", missing) == 1
  out, err = capsys.readouterr()
  report = json.loads(out)
  assert not report["passed"] and "no tokenizer.json" in report["tokenizer"]["error"]
  assert err.strip() == f"verify FAILED: {report['tokenizer']['error']}"
  # A tokenizer that loads but disagrees with config.json fails verify too: training would stop on it.
  assert run_cli("verify", "--component", "mllm", "--src", odd_dir) == 1
  out, err = capsys.readouterr()
  assert not json.loads(out)["passed"] and err.strip() == f"verify FAILED: {odd['mismatches'][0]}"


# ---------------------------------------------------------------- broken mappings and verify

_Q = r"transformer_blocks\.0\.attn\.to_q\.kernel"
_K = r"transformer_blocks\.0\.attn\.to_k\.kernel"


def test_broken_mapping_stops_the_round_trip(ckpts, tmp_path, capsys, monkeypatch):
  _, flux, _ = ckpts["mmdit"]
  # Two parameters onto one torch key.
  monkeypatch.setattr(mmdit_keys.KEY_TABLE, "rules", [Rule(_Q, "transformer_blocks.0.attn.to_k.weight", "linear")])
  assert run_cli("to-jax", "--component", "transformer", "--src", flux, "--dst", tmp_path / "a") == 2
  assert "transformer_blocks.0.attn.to_k.weight" in capsys.readouterr().err
  # A wrong transform (no transpose) on a non-square weight: the shape check lists it.
  monkeypatch.setattr(mmdit_keys.KEY_TABLE, "rules", [Rule(r"x_embedder\.kernel", "x_embedder.weight", "identity")])
  assert run_cli("to-jax", "--component", "transformer", "--src", flux, "--dst", tmp_path / "b") == 2
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
  assert run_cli("verify", "--component", "transformer", "--src", flux) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mmdit", "s3dit_bf16", "vae_file", "rqa", "mllm"])
def test_verify_passes_on_good_checkpoints(ckpts, capsys, name):
  component, src, extra = ckpts[name]
  assert run_cli("verify", "--component", component, "--src", src, *extra) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["passed"] and all(o["max_rel_diff"] <= 1e-4 for o in report["outputs"].values())


def test_a_damaged_component_directory_is_one_line_naming_it(ckpts, tmp_path, capsys):
  _, flux, _ = ckpts["mmdit"]
  assert run_cli("to-jax", "--component", "transformer", "--src", flux, "--dst", tmp_path / "j") == 0
  for data in (tmp_path / "j" / orbax_io.PARAMS_DIR).rglob("d/*"):
    os.truncate(data, 50)
  capsys.readouterr()
  for argv, flag in (
      (("verify", "--component", "transformer", "--src", flux, "--jax", tmp_path / "j"), "--jax"),
      (("to-torch", "--component", "transformer", "--src", tmp_path / "j", "--dst", tmp_path / "t"), "--src"),
  ):
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {flag}={tmp_path / 'j'}: its weights ") and "could not be read" in err, err
    assert "\n" not in err and "to-jax" in err
  assert not (tmp_path / "t").exists()


def test_verify_converted_and_tampered(ckpts, tmp_path, capsys):
  _, flux, _ = ckpts["mmdit"]
  assert run_cli("to-jax", "--component", "transformer", "--src", flux, "--dst", tmp_path / "good") == 0
  assert run_cli("verify", "--component", "transformer", "--src", flux, "--jax", tmp_path / "good") == 0
  assert run_cli("verify", "--component", "transformer", "--src", tmp_path / "good") == 0
  capsys.readouterr()
  meta, flat = orbax_io.load(tmp_path / "good")
  flat["transformer_blocks.0.attn.to_v.kernel"] = flat["transformer_blocks.0.attn.to_v.kernel"] + 0.05
  orbax_io.save(tmp_path / "bad", component=meta["component"], kind=meta["kind"], config=meta["config"], params=flat)
  assert run_cli("verify", "--component", "transformer", "--src", flux, "--jax", tmp_path / "bad") == 1
  report = json.loads(capsys.readouterr().out)
  assert not report["passed"] and report["outputs"]["weights"]["key"] == "transformer_blocks.0.attn.to_v.weight"
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "x").write_text("x")
  assert run_cli("verify", "--component", "transformer", "--src", flux, "--jax", tmp_path / "other") == 2
  assert f"--jax={tmp_path / 'other'} has no component.json" in capsys.readouterr().err  # the flag that named it


def test_the_hint_for_a_folder_that_is_not_converted_writes_a_new_folder(ckpts, tmp_path, capsys):
  """verify --jax / config.init.transformer given a PyTorch folder or a training workdir: the to-jax it suggests
  writes a new folder, never into that folder itself."""
  _, flux, _ = ckpts["mmdit"]
  model, run = tmp_path / "model", tmp_path / "run"
  shutil.copytree(flux, model)
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text('{"model": {}, "train": {}}')
  assert run_cli("verify", "--component", "transformer", "--src", model, "--jax", model) == 2
  err = capsys.readouterr().err.strip()
  assert err.endswith(f"--src {model} --dst {model}-jax, then give --jax={model}-jax") and "\n" not in err, err
  (tmp_path / "model-jax").mkdir()  # the folder beside it is taken: a placeholder
  with pytest.raises(ConvertError) as e:
    orbax_io.read_meta(model, what="config.init.transformer")
  assert str(e.value).endswith(f"--src {model} --dst NEW_FOLDER, then give config.init.transformer=NEW_FOLDER")
  assert run_cli("verify", "--component", "transformer", "--src", model, "--jax", run) == 2
  err = capsys.readouterr().err
  assert "--src TORCH_PATH --dst NEW_FOLDER, then give --jax=NEW_FOLDER" in err and f"--dst {run}" not in err
  with pytest.raises(ConvertError, match="It is a training workdir: start from one with config.init.workdir"):
    orbax_io.read_meta(run, what="config.init.transformer")


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


def _workdir(tmp_path, **fields):
  """A workdir as `is_workdir` sees it (config.json + checkpoints/, no checkpoint): the tiny config, `fields`
  ('section__key') set."""
  work = tmp_path / "w"
  (work / "checkpoints").mkdir(parents=True)
  c = tiny_config(**fields)
  (work / "config.json").write_text(c.to_json())
  return work


@pytest.mark.parametrize(
    "component, fields, says",
    [
        ("vae", {}, "it uses the 'identity' autoencoder (config.model.autoencoder.kind), which has no weights"),
        (
            "vae",
            {"model__autoencoder__kind": "flux_vae", "model__autoencoder__path": "/ckpt/FLUX.1-dev/vae"},
            "it reads the frozen FLUX VAE from config.model.autoencoder.path=/ckpt/FLUX.1-dev/vae",
        ),
        ("vae", {"model__autoencoder__kind": "flux_vae"}, "random-init FLUX VAE"),
        ("mllm", {}, "it builds a random InternVL from config.model.mllm.arch"),
        (
            "mllm",
            {"model__mllm__path": "/ckpt/InternVL3-2B-hf"},
            "it reads the frozen MLLM from config.model.mllm.path=/ckpt/InternVL3-2B-hf",
        ),
    ],
)
def test_to_torch_of_a_frozen_component_of_a_workdir_is_one_line(tmp_path, capsys, component, fields, says):
  """The MLLM and the autoencoder are not in a run's checkpoints: --component vae|mllm with a workdir names where
  the run reads them from, in one line (exit 2), and writes nothing."""
  work = _workdir(tmp_path, **fields)
  assert run_cli("to-torch", "--component", component, "--src", work, "--dst", tmp_path / "out") == 2
  out, err = capsys.readouterr()
  assert out == "" and err.count("\n") == 1 and "Traceback" not in err
  assert err.startswith(f"error: --component {component}: {work} does not train its ") and says in err, err
  assert "checkpoints hold none" in err
  assert not (tmp_path / "out").exists()


def test_to_torch_rqa_of_an_adapter_ablation_workdir_is_refused(tmp_path, capsys):
  work = _workdir(tmp_path, model__rqa__kind="metaquery")
  assert run_cli("to-torch", "--component", "rqa", "--src", work, "--dst", tmp_path / "out") == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "config.model.rqa.kind='metaquery'" in err and "TorchRQA" in err
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["metaquery", "none"])
def test_export_refuses_an_adapter_ablation(tmp_path, kind):
  """TorchRQA is the paper's adapter: a run of another rqa.kind would export weights no PyTorch class loads."""
  from iomm_jax.weights import components
  from iomm_jax.convert import export

  work = tmp_path / "w"
  (work / "checkpoints").mkdir(parents=True)
  c = tiny_config()
  c.model.rqa.kind, c.model.prediction = kind, "v"
  (work / "config.json").write_text(c.to_json())
  with pytest.raises(components.ConvertError, match=f"config.model.rqa.kind='{kind}' .*TorchRQA"):
    export.export_workdir(work, tmp_path / "out")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("use_ema", [True, False])
def test_export_takes_the_runs_own_ema_choice_unasked(tmp_path, monkeypatch, use_ema):
  """As sample does: without --use-ema / --no-ema the run's config.sample.use_ema decides."""
  from iomm_jax.convert import export

  work = tmp_path / "w"
  (work / "checkpoints").mkdir(parents=True)
  c = tiny_config()
  c.model.prediction, c.sample.use_ema = "v", use_ema
  (work / "config.json").write_text(c.to_json())
  asked = {}

  def fake_load(workdir, *, step=None, use_ema=None):
    asked["use_ema"] = use_ema
    raise components.ConvertError("stop here")

  from iomm_jax.weights import components

  monkeypatch.setattr(export, "load_generator", fake_load)
  with pytest.raises(components.ConvertError, match="stop here"):
    export.export_workdir(work, tmp_path / "out")
  assert asked["use_ema"] is use_ema
  with pytest.raises(components.ConvertError, match="stop here"):
    export.export_workdir(work, tmp_path / "out", use_ema=not use_ema)  # an explicit flag wins
  assert asked["use_ema"] is (not use_ema)


def test_a_latent_shift_of_any_sign_is_not_refused(ckpts, tmp_path, capsys):
  """The VAE's shift_factor centres latents and may be negative or 0, where every other number must be above 0."""
  _, src, extra = ckpts["vae_file"]
  config = json.loads(Path(extra[1]).read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "shift_factor": -0.5}))
  args = ("--component", "vae", "--src", src, "--config", tmp_path / "config.json")
  assert run_cli("to-jax", *args, "--dst", tmp_path / "d") == 0, capsys.readouterr().err
  assert json.loads((tmp_path / "d" / "component.json").read_text())["config"]["shift_factor"] == -0.5
