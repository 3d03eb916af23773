"""Config schema: the shipped configs load and validate; bad fields fail naming the field."""

import re

import pytest

from helpers import load_config, run_app
from iomm_jax import config as schema
from iomm_jax import config_validation


@pytest.mark.parametrize("name", ["tiny", "iomm_b", "iomm_l", "iomm_xl"])
@pytest.mark.parametrize("arg", ["", "pair_pretrain", "finetune", "finetune_pair", "finetune_image"])
def test_six_recipes_validate(name, arg):
  c = load_config(name, arg)
  if name != "tiny":
    c.data.path = "/data/x"
  config_validation.validate(c)
  stage, recipe = schema.VARIANTS[arg]
  assert (c.train.stage, c.data.recipe) == (stage, recipe)


def test_paper_settings():
  b, l, xl = load_config("iomm_b"), load_config("iomm_l"), load_config("iomm_xl")
  assert (b.train.global_batch, l.train.global_batch, xl.train.global_batch) == (1024, 512, 4096)
  assert (b.train.mask_ratio, l.train.mask_ratio, xl.train.mask_ratio) == (0.85, 0.85, 0.45)
  assert (b.train.ema_decay, l.train.ema_decay, xl.train.ema_decay) == (0.999, 0.0, 0.0)
  assert xl.train.optimizer == "muon" and b.train.optimizer == "adamw"
  assert load_config("iomm_b", "finetune").train.global_batch == 256
  assert load_config("iomm_b", "finetune,1024").train.global_batch == 96
  assert load_config("iomm_b", "finetune").data.mix_lambda == 0.5


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("train.mask_ratio", 1.5, "train.mask_ratio"),
        ("data.recipe", "captions", "data.recipe"),
        ("mesh.fsdp", 0, "config.mesh"),
        ("train.global_batch", 0, "train.global_batch"),
        ("train.lr", -1.0, "train.lr"),
        ("train.b2", 1.0, "train.b2"),
        ("train.grad_clip", -1.0, "train.grad_clip"),
        ("sample.steps", 0, "sample.steps=0 must be 1 or more"),
        ("train.time_shift", 0.0, "train.time_shift=0.0 must be positive"),
        ("train.logit_std", 0.0, "train.logit_std=0.0 must be positive"),
        ("train.epochs", -1.0, "train.epochs=-1.0 must be >= 0"),
        ("sample.num", 0, "sample.num=0 must be 1 or more"),
        ("train.peak_flops", 0.0, "train.peak_flops=0.0 must be positive"),
    ],
)
def test_bad_values_name_the_field(field, value, needle):
  c = load_config("tiny")
  section, key = field.split(".")
  c[section][key] = value
  with pytest.raises(schema.ConfigError, match=needle.replace(".", r"\.")):
    config_validation.validate(c)


@pytest.mark.parametrize("field", sorted(config_validation.CHOICES))
def test_each_listed_field_rejects_a_value_outside_its_list(field):
  c = load_config("tiny")
  section, _, key = field.rpartition(".")
  schema.get_field(c, section)[key] = "bogus"
  allowed = config_validation.CHOICES[field]
  with pytest.raises(schema.ConfigError, match=rf"config\.{field}='bogus' is not one of {re.escape(str(allowed))}"):
    config_validation.validate(c)


def test_each_allowed_training_choice_is_one_the_training_code_runs():
  import jax
  import optax

  from iomm_jax.train import loss, optimizers

  for kind in schema.T_SAMPLINGS:
    assert loss.sample_t(jax.random.key(0), 4, kind=kind).shape == (4,)
  with pytest.raises(ValueError, match=r"t_sampling='bogus'.*'uniform', 'logit_normal'"):
    loss.sample_t(jax.random.key(0), 4, kind="bogus")
  for name in schema.OPTIMIZERS:
    c = load_config("tiny").train
    c.optimizer = name
    tx = optimizers.make_optimizer(c, hidden_blocks={})
    assert isinstance(tx, optax.GradientTransformation)
  c.optimizer = "sgd"
  with pytest.raises(ValueError, match=r"optimizer='sgd'.*'adamw', 'muon'"):
    optimizers.make_optimizer(c)


def test_missing_mllm_dir_explains_layout(tmp_path):
  c = load_config("iomm_b")
  c.data.path = "/data/x"
  c.model.mllm.path = str(tmp_path / "nope")
  with pytest.raises(schema.ConfigError, match="config.json"):
    config_validation.validate(c)


def test_cli_unknown_config_key_fails(tmp_path):
  r = run_app("iomm_jax.main", "--config=configs/tiny.py", "--config.train.no_such_field=3", f"--workdir={tmp_path}")
  assert r.returncode != 0
  assert "no_such_field" in r.stderr


def test_cli_unwritable_workdir_fails(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  for workdir, message in ((blocker / "sub", "file is a file, so"), (blocker, "exists and is not a folder")):
    r = run_app("iomm_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"--workdir='{workdir}': " in r.stderr and message in r.stderr, r.stderr
  assert blocker.read_text() == "x"


@pytest.mark.slow
def test_cli_missing_data_dir_fails(tmp_path):
  r = run_app(
      "iomm_jax.main",
      "--config=configs/tiny.py",
      "--config.data.source=folder",
      f"--config.data.path={tmp_path}/missing",
      f"--workdir={tmp_path}/w",
  )
  assert r.returncode != 0
  assert "Traceback" not in r.stderr, r.stderr[-2000:]  # one line naming the field, the path and the fix
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: image folder {tmp_path}/missing does not exist; set data.path to a folder"), last
  assert list((tmp_path / "w").iterdir()) == []  # no config.json, no tensorboard/


def test_workdir_config_from_an_older_schema_gets_new_fields_defaults(tmp_path):
  """A run saved before a field existed still loads for sampling/export; saved values win, new fields default."""
  import json

  from iomm_jax.train import restore

  saved = schema.base_config().to_dict()
  del saved["train"]["grad_accum"], saved["model"]["mllm"]["scan_layers"]
  saved["train"]["global_batch"] = 24
  saved["model"]["dit"]["arch"] = {"num_layers": 2}
  (tmp_path / "config.json").write_text(json.dumps(saved))
  c = restore.load_config(str(tmp_path))
  assert (c.train.grad_accum, c.model.mllm.scan_layers, c.train.global_batch) == (1, False, 24)
  assert dict(c.model.dit.arch) == {"num_layers": 2}
  assert isinstance(c.mesh.rules, tuple)


@pytest.mark.parametrize("name,arg,known", [("tiny", "finetnue", "short"), ("iomm_b", "finetune,2048", "1024")])
def test_a_mistyped_variant_word_fails_naming_it(name, arg, known):
  """A word that is neither a recipe nor the config's own flag fails (ignored, it would train the default recipe)."""
  bad = arg.split(",")[-1]
  with pytest.raises(schema.ConfigError, match=rf"\['{bad}'\].*finetune_pair.*flags: \['{known}'"):
    load_config(name, arg)
  assert load_config(name, f"finetune,{known}").train.stage == "finetune"  # the known flag still goes with a recipe


@pytest.mark.parametrize(
    "module,args,needle",
    [
        (
            "iomm_jax.main",
            ["--config=configs/tiny.py:pretrian", "--workdir=W"],
            "unknown config variant word(s) ['pretrian']",
        ),
        ("iomm_jax.cache", ["--config=configs/iomm_b.py:cahced", "--dst=W"], "['cahced'] in 'cahced'; recipes:"),
        ("iomm_jax.cache", ["--config=configs/iomm_b.py", "--config.train.lrr=1", "--dst=W"], "nearest known fields"),
        (
            "iomm_jax.pretrain_mllm",
            ["--config=configs/tiny_mllm.py", "--config.train.lrr=1", "--out=W"],
            "--config.train.lrr: configs/tiny_mllm.py sets no such field",
        ),
        ("iomm_jax.pretrain_mllm", ["--config=configs/tiny_mllm.py:shrot", "--out=W"], "['shrot']; known: short"),
        # a config file that is not there: named, with where relative paths start
        (
            "iomm_jax.main",
            ["--config=configs/tinyy.py:pretrain", "--config.train.num_steps=3", "--workdir=W"],
            "--config=configs/tinyy.py does not exist (looked in",
        ),
        ("iomm_jax.cache", ["--config", "configs/tinyy.py", "--dst=W"], "--config=configs/tinyy.py does not exist"),
        # a field only the config file sets (the schema leaves model.dit.arch free-form) is offered too
        (
            "iomm_jax.main",
            ["--config=configs/tiny.py", "--config.model.dit.arch.num_heads=8", "--workdir=W"],
            "config.model.dit.arch.num_attention_heads",
        ),
        # a kernel this machine cannot run: refused before the workdir is written
        (
            "iomm_jax.main",
            ["--config=configs/tiny.py", "--config.model.attention=cudnn", "--workdir=W"],
            "config.model.attention='cudnn' needs an NVIDIA GPU (this backend is 'cpu')",
        ),
        # another command's config: said so, with a config this command reads
        (
            "iomm_jax.main",
            ["--config=configs/tiny_mllm.py", "--workdir=W"],
            "--config=configs/tiny_mllm.py is not a config of this command (it has no distributed, init, mesh, "
            "model, sample section); give one such as configs/tiny.py",
        ),
        (
            "iomm_jax.pretrain_mllm",
            ["--config=configs/tiny.py", "--out=W"],
            "(it has no arch, vision_pretrain section); give one such as configs/tiny_mllm.py",
        ),
        # checked only once the mesh is built against the devices (the tests' 8)
        ("iomm_jax.main", ["--config=configs/tiny.py", "--config.mesh.fsdp=3", "--dry_run"], "do not divide the 8"),
        # a module config's own check, reached through the factory
        (
            "iomm_jax.main",
            ["--config=configs/tiny.py", "--config.model.mllm.arch.text.hidden_size=30", "--workdir=W"],
            "config.model.mllm.arch: Qwen2Config: hidden_size=30 is not a multiple of num_attention_heads=4",
        ),
        (
            "iomm_jax.pretrain_mllm",
            ["--config=configs/tiny_mllm.py", "--config.arch.vision.image_size=60", "--out=W"],
            "config.arch: InternVLConfig: the ViT grid 7 times downsample_ratio 0.5 is not an integer",
        ),
    ],
)
def test_every_app_reports_a_config_mistake_in_one_line(tmp_path, module, args, needle):
  r = run_app(module, *[a.replace("=W", f"={tmp_path / 'out'}") for a in args])
  assert r.returncode != 0
  lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("[transformers]")]
  assert lines == [lines[0]] and lines[0].startswith("config error: ") and needle in lines[0], r.stderr
  # Nothing written: the workdir, when an app got as far as creating it (main does, to lock it), is left empty.
  assert "Traceback" not in r.stderr and not [*(tmp_path / "out").rglob("*")]


@pytest.mark.parametrize(
    "text,needle",
    [
        ("CONFIG = {}\n", "defines no get_config(arg)"),
        ("def get_config(:\n", "failed to load: invalid syntax"),
        ("import no_such_module_here\n", "failed to load: No module named 'no_such_module_here'"),
    ],
)
def test_a_config_file_that_does_not_load_is_named(tmp_path, text, needle):
  (tmp_path / "cfg.py").write_text(text)
  r = run_app("iomm_jax.main", f"--config={tmp_path / 'cfg.py'}", f"--workdir={tmp_path / 'out'}")
  lines = [x for x in r.stderr.splitlines() if x.strip()]
  assert r.returncode != 0 and lines == [lines[0]] and "Traceback" not in r.stderr, r.stderr
  assert lines[0].startswith(f"config error: --config={tmp_path / 'cfg.py'}") and needle in lines[0], lines[0]


def test_a_resolution_the_latent_patches_do_not_divide_fails_naming_both_factors():
  from iomm_jax.train import builder

  c = load_config("tiny")
  c.data.resolution = 30  # even, but its 15² latent does not split into 2×2 patches
  with pytest.raises(schema.ConfigError, match=r"resolution=30 must be a multiple of 4: .* 2× downsampling .* 2×2"):
    builder.build(c, load_frozen=False)


def test_dit_channels_that_do_not_fit_the_autoencoder_fail_naming_the_field_and_the_value_to_use():
  from iomm_jax.models import dit_families
  from iomm_jax.models.mmdit import MMDiTConfig
  from iomm_jax.models.s3dit import S3DiTConfig
  from iomm_jax.train import builder

  c = load_config("tiny")  # identity autoencoder, factor 2: 12 latent channels, packed 2×2 → 48 a token
  c.model.dit.arch.in_channels = 64
  with pytest.raises(
      schema.ConfigError, match=r"arch.in_channels=64 must be 48: the autoencoder's 12 latent .*'identity'"
  ):
    builder.build(c, load_frozen=False)
  mmdit, s3dit = dit_families.family("mmdit"), dit_families.family("s3dit")
  assert mmdit.channel_mismatch(MMDiTConfig(in_channels=64), 16) is None  # FLUX: 16 VAE channels × 2×2
  assert "patch_size=2 makes 256 output" in mmdit.channel_mismatch(MMDiTConfig(in_channels=64, patch_size=2), 16)
  assert s3dit.channel_mismatch(S3DiTConfig(in_channels=16), 16) is None  # Z-Image patchifies inside
  assert "in_channels=16 must be the autoencoder's 12" in s3dit.channel_mismatch(S3DiTConfig(in_channels=16), 12)


@pytest.mark.parametrize(
    "section,field,value,needle",
    [
        ("mllm.arch.text", "hidden_size", 30, r"config\.model\.mllm\.arch: Qwen2Config: hidden_size=30"),
        ("mllm.arch.vision", "patch_size", 7, r"config\.model\.mllm\.arch: InternVLConfig: the ViT grid 9"),
        ("dit.arch", "axes_dims_rope", (4, 6, 4), r"config\.model\.dit\.arch: MMDiTConfig\.axes_dims_rope"),
        ("rqa", "num_queries", 0, r"config\.model\.rqa: RQAConfig needs .* num_queries >= 1"),
        ("rqa", "num_heads", 5, r"config\.model\.rqa\.num_heads=5 does not divide the MLLM width 64"),
    ],
)
def test_a_module_config_s_own_check_is_a_config_error_naming_its_section(section, field, value, needle):
  from iomm_jax.train import builder

  c = load_config("tiny")
  node = c.model
  for part in section.split("."):
    node = node[part]
  node[field] = value
  with pytest.raises(schema.ConfigError, match=needle):
    builder.build(c, load_frozen=False)


def test_a_qwen2_head_dimension_rope_cannot_rotate_is_refused():
  from iomm_jax.models.qwen2 import Qwen2Config

  with pytest.raises(ValueError, match="head dimension 7 must be even"):
    Qwen2Config(hidden_size=28, num_attention_heads=4, num_key_value_heads=2)
  with pytest.raises(ValueError, match="hidden_size=30 is not a multiple of num_attention_heads=4"):
    Qwen2Config(hidden_size=30, num_attention_heads=4, num_key_value_heads=2)
  assert Qwen2Config(hidden_size=30, num_attention_heads=4, num_key_value_heads=2, head_dim=8).resolved_head_dim == 8


def test_a_mesh_rule_to_an_unknown_mesh_axis_fails_naming_the_axes():
  c = load_config("tiny")
  c.mesh.rules = tuple((name, "model" if name == "mlp" else axis) for name, axis in c.mesh.rules)
  with pytest.raises(
      schema.ConfigError, match=r"maps 'mlp' to 'model'; mesh axes are 'data', 'fsdp', 'tensor' or None"
  ):
    config_validation.validate(c)
  c.mesh.rules = tuple((name, None if name == "mlp" else axis) for name, axis in c.mesh.rules)
  config_validation.validate(c)  # None (replicated) is allowed


def test_an_rqa_without_an_mlp_is_refused():
  c = load_config("tiny")
  c.model.rqa.mlp_ratio = 0.0
  with pytest.raises(schema.ConfigError, match=r"config\.model\.rqa\.mlp_ratio=0\.0 must be positive"):
    config_validation.validate(c)


def test_variant_word_inverts_parse_variant():
  for word in (w for w in schema.VARIANTS if w):
    stage, recipe, _ = schema.parse_variant(word)
    assert schema.parse_variant(schema.variant_word(stage, recipe))[:2] == (stage, recipe)
  assert schema.variant_word("finetune", "mix") == "finetune" and schema.variant_word("pretrain", "image") == "pretrain"
  with pytest.raises(schema.ConfigError, match="no config variant trains recipe 'mix' in stage 'pretrain'"):
    schema.variant_word("pretrain", "mix")
