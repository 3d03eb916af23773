"""InternVL3 in JAX vs transformers.InternVLModel: parity on tiny random checkpoints made by save_pretrained."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import InternVLConfig as HFInternVLConfig
from transformers import InternVLForConditionalGeneration

from iomm_jax.models import internvl_keys, keymap
from iomm_jax.weights import io
from iomm_jax.models import layers
from iomm_jax.models.internvl import InternVL, InternVLConfig
from iomm_jax.models.internvl_keys import MLLMCheckpointError
from iomm_jax.weights.load_internvl import load_internvl

IMG = 99  # image_token_id of the tiny configs

CONFIGS = {
    # ViT LayerNorm, qkv bias, GQA 6:2, default-size image
    "ln_gqa3": dict(
        vision=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=56,
            patch_size=14,
            norm_type="layer_norm",
            attention_bias=True,
        ),
        text=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
        ),
    ),
    # ViT RMSNorm + qk-norm, layer scale 0.5, final ViT layernorm, MHA, other eps/theta
    "rms_qknorm_mha": dict(
        vision=dict(
            hidden_size=24,
            num_hidden_layers=2,
            num_attention_heads=3,
            intermediate_size=40,
            image_size=28,
            patch_size=7,
            norm_type="rms_norm",
            use_qk_norm=True,
            attention_bias=False,
            layer_scale_init_value=0.5,
            use_mean_pooling=False,
            layer_norm_eps=1e-5,
        ),
        text=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            rope_theta=10_000.0,
            rms_norm_eps=1e-5,
        ),
    ),
    # GQA 8:1, ViT config 56² fed a 84² image (absolute position embeddings interpolated)
    "gqa8_interp": dict(
        vision=dict(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=56,
            patch_size=14,
            norm_type="layer_norm",
            use_qk_norm=True,
            attention_bias=True,
        ),
        text=dict(
            hidden_size=64,
            intermediate_size=80,
            num_hidden_layers=1,
            num_attention_heads=8,
            num_key_value_heads=1,
            rope_theta=500.0,
        ),
        feed_size=84,
    ),
}


def _hf_config(spec):
  text = dict(model_type="qwen2", vocab_size=100, **spec["text"])
  return HFInternVLConfig(vision_config=dict(spec["vision"]), text_config=text, image_token_id=IMG, image_seq_length=4)


def _make_checkpoint(spec, path, seed=0):
  """A random transformers model (non-trivial weights everywhere), saved with save_pretrained."""
  torch.manual_seed(seed)
  model = InternVLForConditionalGeneration(_hf_config(spec)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


def _inputs(spec, cfg, seed=0):
  rng = np.random.default_rng(seed)
  size = spec.get("feed_size", cfg.vision.image_size)
  n_img = int(size // cfg.vision.patch_size * cfg.downsample_ratio) ** 2
  text = rng.integers(0, IMG, size=(2, 9))
  ids = np.concatenate([text[:, :4], np.full((2, n_img), IMG), text[:, 4:]], axis=1)
  pixels = rng.standard_normal((2, size, size, 3)).astype(np.float32)
  return text, ids, pixels


def _torch_forward(model, ids, pixels=None, mask=None):
  with torch.no_grad():
    out = model.model(
        input_ids=torch.from_numpy(ids),
        pixel_values=None if pixels is None else torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
        attention_mask=None if mask is None else torch.from_numpy(mask.astype(np.int64)),
    )
  proj = None if out.image_outputs is None else out.image_outputs.pooler_output.numpy()
  return out.last_hidden_state.numpy(), proj


def _jit(model, fn, *args):
  """fn(model, *args) under one jax.jit (one compile is much cheaper than op-by-op dispatch on CPU)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a))(state, *args)


def _outputs(m, text, mask, ids, pixels):
  """Text-only hidden states (padded), projector outputs, image+text hidden states."""
  text_h = m.language_model_forward(m.embed_tokens(text), mask)
  proj = m.encode_image_tokens(pixels)
  image_h = m.language_model_forward(m.splice_image_tokens(m.embed_tokens(ids), ids, proj))
  return text_h, proj, image_h


def _assert_close(ours, theirs, tol=1e-4):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape
  err = np.max(np.abs(ours - theirs))
  assert err <= tol * max(1.0, np.max(np.abs(theirs))), err


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  out = {}
  for name, spec in CONFIGS.items():
    path = tmp_path_factory.mktemp(name)
    out[name] = (spec, path, _make_checkpoint(spec, path))
  return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_text_image_projector(checkpoints, name):
  spec, path, torch_model = checkpoints[name]
  ours = load_internvl(path, dtype=jnp.float32)
  text, ids, pixels = _inputs(spec, ours.cfg)

  mask = np.ones_like(text, bool)
  mask[1, -3:] = False  # right padding on the second row
  text_h, proj, image_h = _jit(ours, _outputs, text, mask, ids, pixels)
  theirs_text, _ = _torch_forward(torch_model, text, mask=mask)
  _assert_close(np.asarray(text_h)[mask], theirs_text[mask])  # only real positions are compared
  theirs_image, theirs_proj = _torch_forward(torch_model, ids, pixels)
  _assert_close(proj, theirs_proj)
  _assert_close(image_h, theirs_image)
  # splice outside jit checks the image-token count
  with pytest.raises(ValueError, match="image-token positions"):
    ours.splice_image_tokens(jnp.zeros(ids.shape + (8,)), jnp.asarray(ids), jnp.zeros((1, 1, 8)))


def test_round_trip_bit_exact(checkpoints):
  spec, path, torch_model = checkpoints["rms_qknorm_mha"]
  ours = load_internvl(path, dtype=jnp.float32)
  back = keymap.to_torch(keymap.flatten_state(nnx.state(ours, nnx.Param)), internvl_keys.KEY_TABLE)
  ref = {k: v.numpy() for k, v in torch_model.model.state_dict().items()}
  assert set(back) == set(ref)
  for k in ref:
    np.testing.assert_array_equal(np.asarray(back[k]), ref[k], err_msg=k)


def test_our_keys_in_the_file_layout_are_what_save_pretrained_writes(tmp_path):
  """to_checkpoint_key puts every InternVLModel key and lm_head.weight where transformers' save_pretrained puts them,
  so a folder we write is laid out as one transformers wrote (reading accepts both layouts; this pins the writing)."""
  spec = CONFIGS["rms_qknorm_mha"]
  config = _hf_config(spec)
  config.tie_word_embeddings = False  # as our writer says: lm_head is then saved (tied, transformers drops it)
  torch_model = InternVLForConditionalGeneration(config)
  torch_model.save_pretrained(tmp_path)
  ours = set(torch_model.model.state_dict()) | {internvl_keys.LM_HEAD}
  assert {internvl_keys.to_checkpoint_key(k) for k in ours} == set(io.read_state_dict(tmp_path))


def test_permuted_weight_breaks_parity(checkpoints, tmp_path):
  spec, path, torch_model = checkpoints["ln_gqa3"]
  sd = io.read_state_dict(path)
  key = "language_model.model.layers.0.mlp.up_proj.weight"  # save_pretrained writes the llava layout
  sd[key] = np.ascontiguousarray(sd[key][::-1])  # permute the output features
  io.write_safetensors(sd, tmp_path)
  shutil.copy(path / "config.json", tmp_path / "config.json")
  ours = load_internvl(tmp_path, dtype=jnp.float32)
  text, _, _ = _inputs(spec, ours.cfg)
  theirs, _ = _torch_forward(torch_model, text)
  mine = np.asarray(_jit(ours, lambda m, t: m(t), text))
  with pytest.raises(AssertionError):
    _assert_close(mine, theirs)
  assert np.max(np.abs(mine - theirs)) > 1e-2 * np.max(np.abs(theirs))


def test_key_mismatch_and_sharded_and_bin(checkpoints, tmp_path):
  spec, path, torch_model = checkpoints["ln_gqa3"]
  sd = io.read_state_dict(path)
  # sharded safetensors + index, in the InternVLForConditionalGeneration module layout (`model.` prefix)
  as_module = {
      "model." + internvl_keys.normalize_torch_key(k) if not k.endswith("lm_head.weight") else "lm_head.weight": v
      for k, v in sd.items()
  }
  assert "model.language_model.norm.weight" in as_module
  shard_dir = tmp_path / "sharded"
  files = io.write_safetensors(as_module, shard_dir, max_shard_bytes=20_000)
  assert len(files) > 1 and (shard_dir / "model.safetensors.index.json").is_file()
  plain = (shard_dir / "model.safetensors.index.json").stat().st_mode & 0o777  # written with open(): the umask's
  assert {f.stat().st_mode & 0o777 for f in files} == {plain}  # not safetensors' own 0600
  shutil.copy(path / "config.json", shard_dir / "config.json")
  text, _, _ = _inputs(spec, internvl_keys.config_from_torch(json.loads((path / "config.json").read_text())))
  theirs, _ = _torch_forward(torch_model, text)
  _assert_close(_jit(load_internvl(shard_dir, dtype=jnp.float32), lambda m, t: m(t), text), theirs)

  # .bin reading gives the same tensors
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "pytorch_model.bin")
  from_bin = io.read_state_dict(tmp_path / "pytorch_model.bin")
  assert all(np.array_equal(from_bin[k], sd[k]) for k in sd)

  # missing + unexpected + mis-shaped keys are all listed
  bad = dict(sd)
  del bad["vision_tower.encoder.layer.0.lambda_1"]
  bad["extra.weight"] = np.zeros(3, np.float32)
  bad["language_model.model.norm.weight"] = np.zeros(5, np.float32)
  bad_dir = tmp_path / "bad"
  io.write_safetensors(bad, bad_dir)
  shutil.copy(path / "config.json", bad_dir / "config.json")
  with pytest.raises(keymap.KeyMismatchError) as e:
    load_internvl(bad_dir, dtype=jnp.float32)
  msg = str(e.value)
  assert "vision_tower.encoder.layer.0.lambda_1" in msg and "extra.weight" in msg
  assert "language_model.model.norm.weight" in msg
  assert f"{bad_dir / 'config.json'} does not describe these weights" in msg and "--component" not in msg


def test_missing_directory_errors(tmp_path):
  with pytest.raises(MLLMCheckpointError, match="InternVL3-2B-hf"):
    load_internvl(tmp_path / "nope")
  (tmp_path / "config.json").write_text(json.dumps(internvl_keys.config_to_torch(InternVLConfig())))
  with pytest.raises(MLLMCheckpointError, match="safetensors"):
    load_internvl(tmp_path)


def test_folders_a_researcher_may_point_at_are_refused_naming_what_is_wrong(tmp_path):
  """An InternVL this port does not run (a Qwen3 LLM, scaled RoPE), a config without its sections, a folder of
  .bin weights only, and sharded safetensors without their index: one message each, saying what to do."""
  base = internvl_keys.config_to_torch(InternVLConfig())

  def folder(name, edit=lambda c: None, files=()):
    d = tmp_path / name
    d.mkdir()
    config = json.loads(json.dumps(base))
    edit(config)
    (d / "config.json").write_text(json.dumps(config))
    for f in files:
      (d / f).write_bytes(b"x")
    return d

  qwen3 = folder("qwen3", lambda c: c["text_config"].update(model_type="qwen3"))
  with pytest.raises(MLLMCheckpointError) as e:
    load_internvl(qwen3)
  assert "model_type='qwen3'" in str(e.value) and "InternVL3.5 uses Qwen3" in str(e.value)
  assert "does not describe" not in str(e.value) and "huggingface-cli download" not in str(e.value)
  # A folder of one half of a multimodal model, or InternVL's remote-code layout, is named for what it is.
  for model_type, said in (
      ("qwen2", "a Qwen2 language model alone"),
      ("siglip", "a SigLIP model"),
      ("internvl_chat", "InternVL's trust_remote_code layout: use the '-hf' repository"),
  ):
    d = folder(f"mt_{model_type}", lambda c, t=model_type: c.update(model_type=t))
    with pytest.raises(MLLMCheckpointError) as e:
      load_internvl(d)
    assert f"model_type={model_type!r} ({said}" in str(e.value) and "\n" not in str(e.value), str(e.value)
  yarn = folder("yarn", lambda c: c["text_config"].update(rope_parameters={"rope_type": "yarn", "factor": 4.0}))
  with pytest.raises(MLLMCheckpointError, match="rope type 'yarn' is not supported.*this port runs InternVL3"):
    load_internvl(yarn)
  no_text = folder("no_text", lambda c: c.pop("text_config"))
  with pytest.raises(MLLMCheckpointError, match="config.json does not describe .*has no text_config section"):
    load_internvl(no_text)
  bin_only = folder("bin_only", files=("pytorch_model.bin",))
  with pytest.raises(MLLMCheckpointError, match="it holds pytorch_model.bin: this path reads safetensors only"):
    load_internvl(bin_only)
  shards = folder("shards", files=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"))
  with pytest.raises(MLLMCheckpointError, match="sharded safetensors .* but no \\*.safetensors.index.json"):
    load_internvl(shards)


@pytest.mark.parametrize(
    "section, field, value, says",
    [
        ("text_config", "hidden_size", "64", 'text_config.hidden_size="64" must be an integer >= 1'),
        ("vision_config", "num_attention_heads", 0, "vision_config.num_attention_heads=0 must be an integer >= 1"),
        ("text_config", "rms_norm_eps", -1e-6, "text_config.rms_norm_eps=-1e-06 must be a finite number > 0"),
        ("vision_config", "patch_size", [14, "14"], 'vision_config.patch_size=[14, "14"] must be an integer >= 1 or'),
        ("", "downsample_ratio", None, "downsample_ratio=null must be a finite number > 0"),
    ],
)
def test_a_hand_edited_mllm_config_is_one_line_naming_file_and_field_before_any_build(
    tmp_path, section, field, value, says
):
  """model.mllm.path's config.json is checked as the converter checks it (models/config_json): training and the
  apps stop at start with the file and the field, not a shape error inside the build."""
  config = internvl_keys.config_to_torch(InternVLConfig())
  (config[section] if section else config)[field] = value
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(MLLMCheckpointError) as e:
    internvl_keys.read_config(tmp_path)
  assert str(e.value).startswith(f"{tmp_path / 'config.json'}: ") and says in str(e.value), str(e.value)
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(MLLMCheckpointError, match="config.json holds a JSON list, not an object"):
    internvl_keys.read_config(tmp_path)


@pytest.mark.slow
def test_bf16_load_and_sharded_placement(checkpoints):
  spec, path, torch_model = checkpoints["ln_gqa3"]
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  seen = []

  def shard(dotted, shape):
    seen.append(dotted)
    spec_ = jax.sharding.PartitionSpec("fsdp") if shape and shape[0] % 4 == 0 else jax.sharding.PartitionSpec()
    return jax.sharding.NamedSharding(mesh, spec_)

  ours = load_internvl(path, dtype=jnp.bfloat16, shardings=shard)
  params = keymap.flatten_state(nnx.state(ours, nnx.Param))
  assert set(seen) == set(params)
  assert all(v.dtype == jnp.bfloat16 for v in params.values())
  emb = params["language_model.embed_tokens.embedding"]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("fsdp")
  text, ids, pixels = _inputs(spec, ours.cfg)
  theirs, _ = _torch_forward(torch_model, ids, pixels)
  mine = np.asarray(_jit(ours, lambda m, i, p: m(i, p), ids, pixels).astype(jnp.float32))
  assert np.max(np.abs(mine - theirs)) <= 0.1 * np.max(np.abs(theirs))


def test_config_round_trip_and_from_hf():
  cfg = InternVLConfig()
  assert internvl_keys.config_from_torch(internvl_keys.config_to_torch(cfg)) == cfg
  hf = HFInternVLConfig(**internvl_keys.config_to_torch(cfg))  # transformers accepts our dict
  assert hf.text_config.num_key_value_heads == 2 and hf.vision_config.attention_bias
  assert internvl_keys.config_from_torch(hf.to_diff_dict()) == cfg
  assert cfg.num_image_tokens == 256
  with pytest.raises(ValueError, match="remat"):
    InternVLConfig(remat="sometimes")


@pytest.mark.slow
def test_full_size_param_count():
  """InternVL3-2B: ≈2.09e9 with the (untied) lm_head as published; ≈1.86e9 for InternVLModel alone."""
  model = nnx.eval_shape(lambda: InternVL(InternVLConfig(with_lm_head=True), rngs=nnx.Rngs(0)))
  full = layers.count_params(nnx.state(model, nnx.Param))
  assert abs(full - 2.1e9) <= 0.05 * 2.1e9, full
  assert model.lm_head.kernel.shape == (1536, 151674)


@pytest.mark.slow
def test_gradient_path_through_frozen_llm(checkpoints):
  """An RQA-like trainable tensor gets non-zero grads through the frozen LLM; remat 'full' == 'none'."""
  spec, path, _ = checkpoints["gqa8_interp"]
  text, _, _ = _inputs(spec, internvl_keys.config_from_torch(json.loads((path / "config.json").read_text())))
  text = jnp.asarray(text)
  n_q, d = 3, spec["text"]["hidden_size"]
  trainable = {
      "queries": jax.random.normal(jax.random.key(0), (n_q, d)),
      "proj": 0.1 * jax.random.normal(jax.random.key(1), (d, d)),
  }

  def grads(remat, dtype):
    model = load_internvl(path, dtype=dtype, remat=remat)
    graphdef, frozen = nnx.split(model)  # frozen params: closed over, never differentiated

    def loss(tr):
      m = nnx.merge(graphdef, frozen)
      ctx = m.embed_tokens(text)
      q = tr["queries"][None] + jnp.mean(ctx.astype(jnp.float32), axis=1, keepdims=True) @ tr["proj"]
      h = m.language_model_forward(jnp.concatenate([ctx, q.astype(ctx.dtype)], axis=1))
      return jnp.mean(jnp.square(h[:, -n_q:].astype(jnp.float32)))

    return jax.jit(jax.grad(loss))(trainable)

  g_none, g_full = grads("none", jnp.float32), grads("full", jnp.float32)
  for k in trainable:
    assert g_none[k].dtype == jnp.float32 and float(jnp.max(jnp.abs(g_none[k]))) > 0
    np.testing.assert_allclose(g_full[k], g_none[k], rtol=1e-5, atol=1e-6)
  g_bf16 = grads("dots_saveable", jnp.bfloat16)  # bf16 frozen weights, fp32 trainable
  assert g_bf16["queries"].dtype == jnp.float32 and float(jnp.max(jnp.abs(g_bf16["queries"]))) > 0


@pytest.mark.slow
def test_verify_mllm(checkpoints):
  from iomm_jax.convert.internvl_verify import verify_mllm

  _, path, _ = checkpoints["rms_qknorm_mha"]
  report = verify_mllm(path, seed=1)
  assert report["passed"], report
  assert report["image_text"]["max_rel_diff"] <= 1e-4 and report["projector"]["max_abs_diff"] >= 0


def test_defaults_for_omitted_fields_are_transformers_own():
  """A config.json that omits a field means transformers' default: ours for every field we read equals the default
  of the installed transformers (num_key_value_heads None = as many as the heads; rope_theta lives in
  rope_parameters; head_dim None = hidden / heads)."""
  import transformers

  vision, text = transformers.InternVLVisionConfig(), transformers.Qwen2Config()
  top = transformers.InternVLConfig()

  def default(cfg, field):
    value = getattr(cfg, field)
    return tuple(value) if isinstance(value, list) else value

  for field, ours in internvl_keys._HF_VISION.items():
    assert default(vision, field) == ours, field
  for field, ours in internvl_keys._HF_TOP.items():
    assert default(top, field) == ours, field
  special = {"num_key_value_heads", "head_dim", "rope_theta"}
  for field, ours in internvl_keys._HF_TEXT.items():
    if field not in special:
      assert default(text, field) == ours, field
  assert text.num_key_value_heads == text.num_attention_heads and internvl_keys._HF_TEXT["num_key_value_heads"] is None
  assert text.rope_parameters["rope_theta"] == internvl_keys._HF_TEXT["rope_theta"]
  assert getattr(text, "head_dim", None) in (None, text.hidden_size // text.num_attention_heads)
