"""Shared test helpers: load a config file by name, build a small tiny-config run."""
import importlib.util
import os

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
