"""The apps' command line for a `--config=configs/<name>.py[:arg]` flag: every problem with the config file, its
variant word or a `--config.<field>=<value>` override as one line, no traceback.

    app.run(main, flags_parser=config_cli.flags_parser(_CONFIG, unknown_field=unknown_field_message))
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Callable

from absl import flags


def flag_error_line(e: Exception) -> str:
  """absl's flag error as one line. When a config file's get_config raised, absl's message is the flag, then that
  exception's traceback: keep the flag and the exception's own message (its last line), without the traceback."""
  lines = [x.strip() for x in str(e).splitlines() if x.strip()]
  if any(x.startswith("Traceback (most recent call last)") for x in lines[1:]):
    reason = re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1])
    return f"{lines[0]} {reason}"
  return lines[0]


def overridden_field(name: str, argv: list[str]) -> str:
  """The dotted field of the `--config.<field>=` override in `argv` whose path holds `name` (the key ml_collections
  reported missing), else `name`."""
  for a in argv[1:]:
    if a.startswith("--config."):
      field = a.split("=", 1)[0][len("--config.") :]
      if name in field.split("."):
        return field
  return name


def _config_file(argv: list[str]) -> str:
  """The config file named by `--config=FILE[:arg]` (or `--config FILE[:arg]`) in `argv` ('the config' if none)."""
  for i, a in enumerate(argv[1:], 1):
    if a.startswith("--config="):
      return a.split("=", 1)[1].split(":", 1)[0]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return "the config"


def _config_as_written(argv: list[str]):
  """The config file's own config (its get_config, without the overrides), or None when it cannot be had: what an
  unknown override is matched against, beside the schema."""
  spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
  if spec is None:
    return None
  path, _, arg = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_config_as_written", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # noqa: BLE001 — only a better hint is lost
    return None


def missing_file_line(argv: list[str]) -> str:
  """'config error: …' naming the config file when `--config` names a file that is not there ('' otherwise); the
  loader's own message only says the config 'is not available because of an earlier failure'."""
  path = _config_file(argv)
  if path == "the config" or os.path.isfile(path):
    return ""
  what = "is a folder, not a config file" if os.path.isdir(path) else "does not exist"
  where = "" if os.path.isabs(path) else f" (looked in {os.getcwd()})"
  return f"config error: --config={path} {what}{where}; give a config file such as configs/tiny.py"


def flags_parser(
    config_flag: flags.FlagHolder,
    *,
    unknown_field: Callable[..., str] | None = None,
    sections: tuple[str, ...] = (),
    example: str = "configs/tiny.py",
    flag_values: flags.FlagValues | None = None,
) -> Callable[[list[str]], list[str]]:
  """An absl `flags_parser` for app.run that turns config problems into `SystemExit('config error: …')`.

  `unknown_field(field, config)` words the line for an override naming a field the config lacks, given the config
  file's own config (or None; the IOMM schema's `config_validation.unknown_field_message` lists the nearest known
  fields); without it the line names the field and the file. A config lacking one of `sections` is another command's (the MLLM's for training, or the reverse): the
  line says so and names `example`, a config this command reads. `flag_values`: the FlagValues `config_flag` was
  defined in, when not absl's global FLAGS.
  """
  parsed = flags.FLAGS if flag_values is None else flag_values

  def error_line(e: Exception, argv: list[str]) -> str:
    missing = missing_file_line(argv)  # a config file that is not there fails in several ways: name it first
    if missing:
      return missing
    if isinstance(e, AttributeError) and "get_config" in str(e):
      return f"config error: --config={_config_file(argv)} defines no get_config(arg), which returns the config"
    if isinstance(e, (AttributeError, KeyError)):  # ml_collections: an override names a field the config lacks
      found = re.search(r"'([^'\\]+)", str(e))
      field = overridden_field(found.group(1) if found else str(e), argv)
      if unknown_field is None:
        return f"config error: --config.{field}: {_config_file(argv)} sets no such field"
      return f"config error: {unknown_field(field, _config_as_written(argv))}"
    if isinstance(e, flags.Error):  # a mistake in another flag (--max_steps=-3) is not a config error
      line = flag_error_line(e)
      name = re.match(r"flag --([\w.-]+)", line)
      return f"{'config ' if name is None or name[1].split('.')[0] == 'config' else ''}error: {line}"
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]  # the config file failed to load (get_config)
    return f"config error: --config={_config_file(argv)} failed to load: {' '.join(lines)[:400]}"

  def parse(argv: list[str]) -> list[str]:
    try:
      rest = parsed(argv)
      if config_flag.value is None:
        raise SystemExit("config error: --config=configs/<name>.py[:arg] is required")
      keys = set(config_flag.value.keys())  # a config file that failed to load raises only when first touched
    except SystemExit:
      raise
    except Exception as e:  # noqa: BLE001 — every config problem is one line, no traceback
      raise SystemExit(error_line(e, argv)) from None
    missing = [name for name in sections if name not in keys]
    if missing:
      raise SystemExit(
          f"config error: --config={_config_file(argv)} is not a config of this command (it has no "
          f"{', '.join(missing)} section); give one such as {example}"
      )
    return rest

  return parse
