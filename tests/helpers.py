"""Shared test helpers: load a config file by name, build a small tiny-config run, compare arrays with a tolerance."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(f"configs.{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def tiny_config(arg: str | None = None, **overrides):
  """configs/tiny.py with a small batch; overrides as 'section.key'=value pairs (dots as '__')."""
  c = load_config("tiny", arg)
  c.train.global_batch = 8
  c.data.num_images = 256
  for key, value in overrides.items():
    node = c
    parts = key.split("__")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return c


def with_tiny_s3dit(c, n_layers: int = 3):
  """Config c with its DiT swapped for a small Z-Image S3-DiT of `n_layers` main layers, reading the MLLM's width."""
  width = c.model.mllm.arch["text"]["hidden_size"]
  c.model.dit.kind = "s3dit"
  c.model.dit.arch = dict(
      dim=32, n_layers=n_layers, n_refiner_layers=1, n_heads=2, n_kv_heads=2, in_channels=12, cap_feat_dim=width,
      axes_dims=(4, 6, 6), axes_lens=(64, 32, 32),
  )  # fmt: skip
  return c


def take(it, n: int) -> list:
  """The next n elements of an iterator."""
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b) -> None:
  """Two lists of batches (dicts of arrays) are equal key by key."""
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def word_lengths(text: str) -> list[int]:
  """A picklable toy tokenizer for pipeline tests: one id per word, its length."""
  return [len(w) for w in text.split()]


def copy_folder(src, dst):
  """A flat copy of folder src into a new folder dst (tests then damage some of the copies)."""
  dst.mkdir()
  for p in src.iterdir():
    (dst / p.name).write_bytes(p.read_bytes())
  return dst


def subprocess_env(tmp_path) -> dict:
  """Environment for a training subprocess: CPU, and one persistent compilation cache under tmp_path, so the
  second and later subprocesses of a test reuse the first one's compiled step."""
  return dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )


def run_app(module: str, *args: str, cwd=ROOT, env: dict | None = None, timeout: int = 300):
  """`python -m <module> *args` on the CPU from `cwd` (the repository root unless given), its output captured;
  returns the CompletedProcess and asserts nothing (the callers check the exit status and what was printed)."""
  env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
  )


def run_bench(script: str, *args: str, timeout: int = 900) -> dict:
  """Run `bench/<script>` with `args` on one CPU device; assert it succeeded and printed ONE JSON line; return it."""
  cmd = [sys.executable, f"bench/{script}", *args]
  out = subprocess.run(
      cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, "XLA_FLAGS": ""}
  )
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1, lines
  return json.loads(lines[0])


def diff_and_bound(ours, theirs, tol=1e-4):
  """(max |ours − theirs|, the bound it must stay under: tol relative to the larger of 1 and max |theirs|)."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs))), tol * max(1.0, float(np.max(np.abs(theirs))))


def assert_close(ours, theirs, tol=1e-4):
  """ours equals theirs (arrays of one shape) within diff_and_bound's bound."""
  diff, bound = diff_and_bound(ours, theirs, tol)
  assert diff <= bound, f"max|ours-theirs|={diff:.3g} > {bound:.3g}"


def image_only_batch(c, b: int, seed: int = 0) -> dict:
  """A batch of `b` image-only examples as the pipeline hands the step (random pixels and ViT views, no caption)
  for config `c`."""
  import jax.numpy as jnp

  rng = np.random.default_rng(seed)
  r, v = c.data.resolution, c.data.vit_size
  return {
      "pixels": jnp.asarray(rng.uniform(-1, 1, (b, r, r, 3)), jnp.float32),
      "vit_pixels": jnp.asarray(rng.normal(size=(b, v, v, 3)), jnp.float32),
      "caption_ids": jnp.zeros((b, c.data.max_text_tokens), jnp.int32),
      "caption_len": jnp.zeros((b,), jnp.int32),
      "is_image_only": jnp.ones((b,), bool),
  }
