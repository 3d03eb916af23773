"""The offline feature cache: prepare → cache (CLI) → train with data.cached=True, features equal to the live path,
exact resume on cached data, the cached step never runs the ViT, and the writer's resume / atomicity / errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import ROOT, run_app, tiny_config
from iomm_jax import cache, metrics, parallel
from iomm_jax.data import data_config, decode, holdout, pipeline, records, shapes, shapes_shards, shard_dir, sources
from iomm_jax.train import builder, checkpoint, loop, step as step_lib

NUM = 40  # records in the procedural ArrayRecord set
SHARDS = 2


def image_config(src, **kw):
  return tiny_config(data__source="arrayrecord", data__path=str(src), train__sample_every=0, **kw)


def cached_config(cache_dir, **kw):
  c = image_config(
      "unused",
      data__cached=True,
      data__cache_path=str(cache_dir),
      train__num_steps=6,
      train__log_every=1,
      train__ckpt_every=3,
      train__warmup_steps=2,
      **kw,
  )
  return c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """prepare: the shapes set as ArrayRecord shards, then the feature cache through the CLI (a subprocess)."""
  root = tmp_path_factory.mktemp("cache_e2e")
  c = image_config(root / "src")
  shapes_shards.write_arrayrecord(root / "src", NUM, c.data.resolution, seed=0, shards=2, progress=False)
  dst = root / "features"
  proc = run_app(
      "iomm_jax.cache",
      f"--config={ROOT}/configs/tiny.py",
      "--config.data.source=arrayrecord",
      f"--config.data.path={root / 'src'}",
      f"--config.train.global_batch={c.train.global_batch}",
      f"--config.data.num_images={c.data.num_images}",
      "--config.train.sample_every=0",
      f"--dst={dst}",
      f"--shards={SHARDS}",
      "--no_progress",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  return {"root": root, "src": root / "src", "dst": dst, "summary": summary}


@pytest.fixture(scope="module")
def cached_run(data):
  return builder.build(cached_config(data["dst"]))


# ------------------------------------------------------------------------------------------------ the cache files
@pytest.mark.slow
def test_cli_writes_every_record_once_in_order(data):
  s = data["summary"]
  assert (s["written"], s["skipped"], s["uncaptioned"], s["records"]) == (NUM, 0, 0, NUM)
  assert (s["shards"], s["shards_written"], s["shards_already_done"], s["dtype"]) == (SHARDS, SHARDS, 0, "float16")
  names = sorted(p.name for p in data["dst"].iterdir())
  assert names == [".cache_state"] + [cache.shard_name(0, 1, k, SHARDS) for k in range(SHARDS)]  # no temp files
  src, feats = sources.ArrayRecordSource(data["src"]), sources.ArrayRecordSource(data["dst"])
  assert len(feats) == NUM
  assert [feats[i]["id"] for i in range(NUM)] == [src[i]["id"] for i in range(NUM)]  # source order, once each
  rec = feats[7]
  assert rec["kind"] == "features" and rec["vit_tokens"].dtype == np.float16 and rec["latent"].dtype == np.float16
  assert rec["caption"] == src[7]["caption"] and rec["caption_ids"].dtype == np.int32


@pytest.mark.slow
def test_cached_features_equal_the_live_path(data, cached_run):
  """ViT tokens and latents from the cache equal what the live step computes for the same images (fp16 rounding)."""
  run = cached_run
  src, feats = sources.ArrayRecordSource(data["src"]), sources.ArrayRecordSource(data["dst"])
  idx = [0, 13, 39]
  views = [decode.views(decode.to_rgb(src[i]), run.config.data.resolution, run.config.data.vit_size) for i in idx]
  pixels = jnp.asarray(np.stack([v[0] for v in views]))
  vit_pixels = jnp.asarray(np.stack([v[1] for v in views]))
  mllm = nnx.merge(run.statics.mllm_def, run.frozen["mllm"])
  ae = nnx.merge(run.statics.ae_def, run.frozen["ae"])
  tokens, latents = np.asarray(mllm.encode_image_tokens(vit_pixels)), np.asarray(ae.encode(pixels))
  assert tokens.shape[1:] == (run.mcfg.num_image_tokens, run.mcfg.text.hidden_size)
  assert latents.shape[1:] == run.latent_shape
  for k, i in enumerate(idx):
    rec = feats[i]
    for name, live in (("vit_tokens", tokens[k]), ("latent", latents[k])):
      got = rec[name].astype(np.float32)
      scale = max(1.0, float(np.abs(live).max()))
      np.testing.assert_allclose(got, live, rtol=2**-10, atol=1e-3 * scale, err_msg=f"{name} of record {i}")
    assert rec["caption_ids"].tolist() == list(run.tokenize(rec["caption"]))
  # the comparison can fail: another record's tokens are far away
  assert np.abs(feats[idx[1]]["vit_tokens"].astype(np.float32) - tokens[0]).max() > 1e-2


# --------------------------------------------------------------------------------------------- training on it
@pytest.mark.slow
def test_cached_batches_have_the_keys_and_shapes_the_step_expects(data, cached_run):
  run = cached_run
  c = run.config
  b = next(iter(pipeline.make_dataset(c.data, global_batch=c.train.global_batch, tokenize=run.tokenize)))
  n, d = run.mcfg.num_image_tokens, run.mcfg.text.hidden_size
  assert b["latent"].shape == (c.train.global_batch, *run.latent_shape) and b["latent"].dtype == np.float16
  assert b["vit_tokens"].shape == (c.train.global_batch, n, d) and b["vit_tokens"].dtype == np.float16
  assert "pixels" not in b and "vit_pixels" not in b
  mb = loop.model_batch(b, cached=True)
  assert set(mb) == {
      "caption_ids",
      "caption_len",
      "is_image_only",
      "skipped",
      "skipped_uncaptioned",
      "caption_truncated",
      "latent",
      "vit_tokens",
  }


def _losses(workdir):
  return [(r["step"], r["loss"]) for r in metrics.read_metrics(workdir)]


def _final_params(run, workdir):
  ckpt = checkpoint.Checkpointer(str(workdir), with_data=False)
  state, step = ckpt.restore(checkpoint.abstract_with_shardings(run.abstract_state, run.state_shardings))
  ckpt.close()
  return step, jax.device_get(state.params)


@pytest.mark.slow
def test_train_on_cache_and_resume_exactly(data, cached_run, tmp_path):
  """main's loop on cached data: 6 steps straight == 3 steps, stop, resume 3 steps (losses and params)."""
  c = cached_run.config
  straight, split = tmp_path / "straight", tmp_path / "split"
  out = loop.train(c, str(straight))
  assert out["step"] == 6 and np.isfinite(out["loss"])
  loop.train(c, str(split), max_steps=3)
  assert [s for s, _ in _losses(split)] == [1, 2, 3]
  out2 = loop.train(c, str(split), max_steps=3)
  assert out2["start_step"] == 3 and out2["step"] == 6
  a, b = _losses(straight), _losses(split)
  assert [s for s, _ in a] == list(range(1, 7)) and a == b  # identical per-step losses
  rows = metrics.read_metrics(straight)
  assert all(r["skipped_total"] == 0 for r in rows)
  kept = [r["kept_fraction"] for r in rows]  # masking happens per step on the cached tokens
  assert len(set(kept)) > 1 and all(abs(k - (1 - c.train.mask_ratio)) < 0.25 for k in kept)
  (sa, pa), (sb, pb) = _final_params(cached_run, straight), _final_params(cached_run, split)
  assert sa == sb == 6
  jax.tree_util.tree_map(np.testing.assert_array_equal, pa, pb)


def _step_jaxpr(run, statics, batch):
  import functools

  fn = functools.partial(step_lib.train_step, statics, run.optimizer, run.lr_fn)
  return str(jax.make_jaxpr(fn)(run.abstract_state, run.frozen, batch))


@pytest.mark.slow
def test_cached_step_never_runs_the_vit_or_the_encoder(data, cached_run):
  run = cached_run
  c = run.config
  b = next(iter(pipeline.make_dataset(c.data, global_batch=c.train.global_batch, tokenize=run.tokenize)))
  batch = loop.model_batch(b, cached=True)
  assert "conv_general_dilated" not in _step_jaxpr(run, run.statics, batch)
  # control: the live step (pixels in) does run the ViT's patch-embedding convolution
  import dataclasses

  live_statics = dataclasses.replace(run.statics, cached=False)
  r = c.data.resolution
  live = {k: v for k, v in batch.items() if k not in ("latent", "vit_tokens")}
  live["pixels"] = np.zeros((len(b["index"]), r, r, 3), np.float32)
  live["vit_pixels"] = np.zeros((len(b["index"]), c.data.vit_size, c.data.vit_size, 3), np.float32)
  assert "conv_general_dilated" in _step_jaxpr(run, live_statics, live)

  # and numerically: NaN vision weights (ViT + projector) change nothing in a cached step
  def poison(path, x):
    keys = [getattr(p, "key", p) for p in path]
    return jnp.full_like(x, jnp.nan) if keys[0] in ("vision_tower", "multi_modal_projector") else x

  poisoned = {"mllm": jax.tree_util.tree_map_with_path(poison, run.frozen["mllm"]), "ae": run.frozen["ae"]}
  n_poisoned = sum(int(jnp.isnan(x).all()) for x in jax.tree_util.tree_leaves(poisoned["mllm"]))
  assert n_poisoned > 4
  gbatch = parallel.global_batch(batch, run.mesh)
  _, m_ok = run.train_step(run.init_state(), run.frozen, gbatch)
  _, m_nan = run.train_step(run.init_state(), poisoned, gbatch)
  assert np.isfinite(float(m_nan["loss"])) and float(m_nan["loss"]) == float(m_ok["loss"])


# ----------------------------------------------------------------------------------------------- the writer
@pytest.mark.slow
def test_a_full_disk_is_an_oserror_naming_the_shard_and_the_rerun_resumes(data, cached_run, tmp_path, monkeypatch):
  """array_record reports a failed write as RuntimeError: the cache turns it into the OSError its command reports in
  one line (exit 1), leaves no half shard, keeps the finished one, and the rerun writes only the lost shard."""
  from array_record.python import array_record_module as ar

  dst = tmp_path / "features"
  shutil.copytree(data["dst"], dst)
  lost = cache.shard_name(0, 1, 1, SHARDS)
  (dst / lost).unlink()
  (dst / cache.STATE_DIR / f"{lost}.json").unlink()
  real = ar.ArrayRecordWriter

  class FillsUp:  # every write meets a full disk, as array_record reports it

    def __init__(self, path, options):
      self.path = path

    def write(self, data):
      raise RuntimeError(f"write() failed: No space left on device; writing {self.path}\nat byte 0")

  monkeypatch.setattr(ar, "ArrayRecordWriter", FillsUp)
  cfg = image_config(data["src"])
  with pytest.raises(OSError) as e:
    cache.write_cache(cfg, dst, shards=SHARDS, run=cached_run, progress=False)
  assert (e.value.errno, e.value.strerror, e.value.filename) == (28, "No space left on device", str(dst / lost))
  assert (
      not list(dst.glob(".*.tmp-*"))
      and not (dst / lost).exists()
      and not (dst / cache.STATE_DIR / f"{lost}.json").exists()
  )
  monkeypatch.setattr(ar, "ArrayRecordWriter", real)
  s = cache.write_cache(cfg, dst, shards=SHARDS, run=cached_run, progress=False)
  assert (s["written"], s["shards_written"], s["shards_already_done"]) == (NUM, 1, 1)


@pytest.mark.slow
def test_writer_resumes_skips_bad_images_and_refuses_mixing(data, cached_run, tmp_path):
  """Kill one shard (and leave a temp file): a rerun rewrites only it; bad images are counted, not written."""
  dst = tmp_path / "features"
  shutil.copytree(data["dst"], dst)
  lost = cache.shard_name(0, 1, 1, SHARDS)
  before = sources.ArrayRecordSource(dst)
  expect = [before[i] for i in range(NUM)]
  (dst / lost).unlink()
  (dst / cache.STATE_DIR / f"{lost}.json").unlink()
  (dst / f".{lost}.tmp-999").write_bytes(b"half a shard")
  cfg = image_config(data["src"])
  s = cache.write_cache(cfg, dst, shards=SHARDS, run=cached_run, progress=False)
  assert (s["written"], s["shards_written"], s["shards_already_done"]) == (NUM, 1, 1)
  assert not list(dst.glob(".*.tmp-*"))
  after = sources.ArrayRecordSource(dst)
  for i in (0, NUM // 2, NUM - 1):  # the rewritten shard holds the same records
    assert after[i]["id"] == expect[i]["id"]
    np.testing.assert_allclose(
        after[i]["vit_tokens"].astype(np.float32), expect[i]["vit_tokens"].astype(np.float32), rtol=2**-9, atol=1e-3
    )
  # nothing to do on a second rerun
  s2 = cache.write_cache(cfg, dst, shards=SHARDS, run=cached_run, progress=False)
  assert (s2["shards_written"], s2["shards_already_done"]) == (0, SHARDS)
  with pytest.raises(ValueError, match=r"different settings \(changed: \['dtype'\]\)"):
    cache.write_cache(cfg, dst, shards=SHARDS, dtype="float32", run=cached_run, progress=False)
  with pytest.raises(ValueError, match="another layout"):
    cache.write_cache(cfg, dst, shards=3, run=cached_run, progress=False)
  with pytest.raises(ValueError, match="drop --config.data.cached"):
    cache.write_cache(cached_run.config, tmp_path / "x", run=cached_run, progress=False)

  # a folder with a zero-byte and a truncated image, one caption missing: 2 skipped, 1 uncaptioned, float32
  folder = tmp_path / "imgs"
  folder.mkdir()
  for i in range(10):
    png, cap = shapes.render_png(i, cfg.data.resolution, 0)
    (folder / f"{i:03d}.png").write_bytes(png)
    if i != 4:
      (folder / f"{i:03d}.txt").write_text(cap)
  (folder / "002.png").write_bytes(b"")
  (folder / "006.png").write_bytes((folder / "006.png").read_bytes()[:50])
  fcfg = tiny_config(data__source="folder", data__path=str(folder), train__sample_every=0)
  s3 = cache.write_cache(fcfg, tmp_path / "f32", dtype="fp32", run=cached_run, progress=False)  # the short form
  assert (s3["written"], s3["skipped"], s3["uncaptioned"], s3["dtype"]) == (8, 2, 1, "float32")
  assert any("002.png" in e and "zero-byte" in e for e in s3["first_errors"])
  feats = sources.ArrayRecordSource(tmp_path / "f32")
  assert [feats[i]["id"] for i in range(8)] == [
      "000.png",
      "001.png",
      "003.png",
      "004.png",
      "005.png",
      "007.png",
      "008.png",
      "009.png",
  ]
  assert feats[3]["caption"] is None and feats[3]["caption_ids"] is None
  assert feats[0]["latent"].dtype == np.float32
  with pytest.raises(ValueError, match="--dtype='bfloat16' is not one of float16, float32.*bfloat16 cannot be stored"):
    cache.write_cache(fcfg, tmp_path / "bf", dtype="bfloat16", run=cached_run, progress=False)
  with pytest.raises(ValueError, match=r"--dtype='int8' is not one of float16, float32 \(or fp16, fp32\)$"):
    cache.write_cache(fcfg, tmp_path / "i8", dtype="int8", run=cached_run, progress=False)


def test_split_range_covers_everything_once():
  from iomm_jax.data import cache_reader

  for n, procs, shards in ((40, 1, 2), (41, 3, 4), (5, 2, 4)):
    rows = []
    for p in range(procs):
      plo, phi = cache_reader.split_range(0, n, procs, p)
      for s in range(shards):
        lo, hi = cache_reader.split_range(plo, phi, shards, s)
        assert hi - lo <= cache_reader.max_shard_len(n, procs, shards)
        rows += range(lo, hi)
    assert rows == list(range(n))


@pytest.mark.slow
def test_a_cache_of_other_frozen_models_is_refused_naming_what_differs(data, tmp_path):
  """Features of another MLLM have the same shapes: the cache's plan, not its shapes, says they do not fit."""
  from iomm_jax.data import cache_reader

  assert cache_reader.cache_mismatches(cached_config(data["dst"]), str(data["dst"])) == []
  other = cached_config(data["dst"], seed=1)  # the random frozen MLLM and autoencoder are seeded by config.seed
  assert cache_reader.cache_mismatches(other, str(data["dst"])) == ["model seed: cache 0, this run 1"]
  with pytest.raises(SystemExit, match=r"config.data.cache_path=.* holds features computed with other settings "):
    loop.train(other, str(tmp_path / "w"))


def test_the_cache_seed_matters_only_where_a_frozen_model_is_random(tmp_path):
  """A loaded MLLM with the weightless identity autoencoder computes the same features for any config.seed."""
  from iomm_jax.data import cache_reader

  c = tiny_config()
  assert c.model.autoencoder.kind == "identity" and not c.model.mllm.path
  assert cache_reader.feature_model(c)["seed"] == c.seed  # a random MLLM
  c.model.mllm.path = "/some/InternVL3-2B-hf"
  assert cache_reader.feature_model(c)["seed"] is None
  c.model.autoencoder.kind = "flux_vae"  # a random VAE (no path) is seeded
  assert cache_reader.feature_model(c)["seed"] == c.seed
  c.model.autoencoder.path = "/some/vae"
  assert cache_reader.feature_model(c)["seed"] is None
  # A cache written by an older plan that stored the seed anyway is not refused for it.
  state = tmp_path / cache_reader.CACHE_STATE_DIR
  state.mkdir()
  plan = {"model": {**cache_reader.feature_model(c), "seed": 3}, "data": {}}
  (state / cache_reader.CACHE_PLAN_FILE).write_text(json.dumps(plan))
  assert cache_reader.cache_mismatches(c, str(tmp_path)) == []
  c.model.autoencoder.path = ""
  assert cache_reader.cache_mismatches(c, str(tmp_path)) == [
      f"model autoencoder: cache {plan['model']['autoencoder']!r}, this run {cache_reader.feature_model(c)['autoencoder']!r}",
      f"model seed: cache 3, this run {c.seed}",
  ]


def test_a_dst_holding_anything_but_the_caches_own_output_or_its_images_is_refused_before_the_build(
    tmp_path, monkeypatch
):
  """The cache adds its shards only to a new or empty folder or its own earlier output: a training workdir, prepared
  image shards, or a folder that is, holds or lies inside config.data.path are refused before anything is built."""
  from iomm_jax.data import shard_dir

  def no_build(*a, **k):
    raise AssertionError("built the run before checking --dst")

  monkeypatch.setattr(builder, "build", no_build)
  images = tmp_path / "images"  # prepare's output: its state folder and shards
  (images / ".prepare").mkdir(parents=True)
  (images / "data-00000-of-00001.array_record").write_bytes(b"x")
  workdir = tmp_path / "workdir"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "config.json").write_text("{}")
  cfg = image_config(images)
  for dst, says in (
      (workdir, f"--dst={workdir} holds 'checkpoints', which the feature cache did not write"),
      (images, f"--dst={images} is, holds or lies inside config.data.path={images}"),
      (images / "features", f"--dst={images / 'features'} is, holds or lies inside config.data.path={images}"),
      (tmp_path, f"--dst={tmp_path} is, holds or lies inside config.data.path={images}"),
  ):
    with pytest.raises(ValueError) as e:
      cache.write_cache(cfg, dst, progress=False)
    assert str(e.value).startswith(says) and "\n" not in str(e.value), e.value
  other = tmp_path / "other"  # image shards copied elsewhere: not the cache's either
  shutil.copytree(images, other)
  with pytest.raises(ValueError, match=f"--dst={other} holds '.prepare', which the feature cache did not write"):
    cache.write_cache(cfg, other, progress=False)
  assert not (images / "features").exists() and not (workdir / cache.STATE_DIR).exists()
  # Its own earlier output, with a kill's temporary in it, is resumed (the resume itself: the slow test above).
  own = tmp_path / "own"
  (own / cache.STATE_DIR).mkdir(parents=True)
  (own / cache.shard_name(0, 1, 0, 2)).write_bytes(b"x")
  (own / f".{cache.shard_name(0, 1, 1, 2)}.tmp-dead").write_bytes(b"half")
  shard_dir.check(own, cache.OWN_FILES, tool="the feature cache", source=str(images), source_flag="config.data.path")


def _fake_cache(dst, processes, shards, empty=()):
  """A feature cache folder as iomm_jax.cache leaves it (plan, per-shard stats, shards) without computing one: a
  record per shard, none in the (process, shard) pairs `empty`, for which the cache writes stats but no file."""
  from array_record.python import array_record_module as ar

  (dst / cache.STATE_DIR).mkdir(parents=True)
  plan = {"format": "iomm_jax.cache/1", "process_count": processes, "shards": shards}
  (dst / cache.STATE_DIR / cache.PLAN_FILE).write_text(json.dumps(plan))
  for p in range(processes):
    for s in range(shards):
      name, written = cache.shard_name(p, processes, s, shards), int((p, s) not in empty)
      if written:
        w = ar.ArrayRecordWriter(str(dst / name), cache.WRITER_OPTIONS)
        w.write(
            records.encode_feature_record(
                id=f"{p}/{s}", vit_tokens=np.zeros((2, 4), np.float16), latent=np.zeros((2, 2, 3), np.float16)
            )
        )
        w.close()
      stats = {"written": written, "skipped": 0, "uncaptioned": written, "errors": []}
      (dst / cache.STATE_DIR / f"{name}.json").write_text(json.dumps(stats))


def test_training_refuses_a_cache_whose_run_did_not_finish(tmp_path):
  """A cache stopped by a full disk or a kill keeps its finished shards, for the rerun to resume: data.cache_path (and
  data.val_path) naming it is refused in one line with the counts and the rerun, not trained on in part. A shard
  that held no readable image has stats and no file, and counts as finished; shards copied without .cache_state/
  (another tool's) read as before."""
  dst = tmp_path / "features"
  _fake_cache(dst, processes=2, shards=2, empty={(0, 1)})
  cached = lambda path, **kw: data_config.from_config(cached=True, cache_path=str(path), **kw)  # noqa: E731
  assert len(sources.make_source(cached(dst))) == 3
  assert shard_dir.finished(dst, shard_dir.CACHE, cache.shard_name(0, 2, 1, 2))  # what the writer's resume skips
  foreign = tmp_path / "foreign"
  shutil.copytree(dst, foreign, ignore=shutil.ignore_patterns(cache.STATE_DIR))
  for s in range(2):  # process 1's shards never came (a kill, or a host that did not write to this folder)
    (dst / cache.shard_name(1, 2, s, 2)).unlink()
  (dst / cache.STATE_DIR / f"{cache.shard_name(1, 2, 1, 2)}.json").unlink()
  for make, field in (
      (lambda: sources.make_source(cached(dst)), "data.cache_path"),
      (lambda: holdout.val_source(cached(tmp_path / "unused", val_path=str(dst))), "data.val_path"),
  ):
    with pytest.raises(pipeline.DataConfigError) as e:
      make()
    msg = str(e.value)
    assert msg.startswith(f"config.{field}={str(dst)!r}: only 2 of the 4 shards that the feature cache planned"), msg
    assert f"rerun the same `python -m iomm_jax.cache` command (--dst={dst})" in msg and "\n" not in msg, msg
  assert len(sources.make_source(cached(foreign))) == 3


def test_cache_without_dst_is_a_one_line_usage_error():
  proc = run_app("iomm_jax.cache", f"--config={ROOT}/configs/tiny.py")
  assert proc.returncode == 2, proc.stderr
  err = proc.stderr.strip()
  assert err == "cache: error: --dst is required; give the folder to write the feature shards to (--dst DIR)", err


@pytest.mark.parametrize("field, other", [("resolution", 64), ("vit_size", 32), ("max_text_tokens", 7)])
def test_a_cache_of_other_views_is_named_by_its_data_field(tmp_path, field, other):
  """Features computed at another image size, ViT size or caption length do not fit the run: the mismatch names the
  data field with both values."""
  from iomm_jax.data import cache_reader

  c = tiny_config()
  state = tmp_path / cache_reader.CACHE_STATE_DIR
  state.mkdir()
  data = {k: c.data[k] for k in cache_reader.FEATURE_DATA_FIELDS}
  plan = {"model": cache_reader.feature_model(c), "data": data}
  (state / cache_reader.CACHE_PLAN_FILE).write_text(json.dumps(plan))
  assert cache_reader.cache_mismatches(c, str(tmp_path)) == []
  (state / cache_reader.CACHE_PLAN_FILE).write_text(json.dumps({**plan, "data": {**data, field: other}}))
  assert cache_reader.cache_mismatches(c, str(tmp_path)) == [f"data.{field}: cache {other}, this run {c.data[field]}"]
