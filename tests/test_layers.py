"""Imports run one way: core → models → weights → data → train → apps (docs/design.md §3).

Every `import iomm_jax...` may only name a module of the same or a lower layer, no two modules may import each other
(a cycle), and package imports sit at module level, where the checks see them: only optional heavy dependencies
(torch, diffusers, transformers, ...) are imported inside functions."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "iomm_jax"

# Layer of each module, by the first prefix that matches (longest prefixes first). Lower number = lower layer.
LAYERS = {
    "core": [
        "iomm_jax.config",
        "iomm_jax.data_kinds",
        "iomm_jax.parallel",
        "iomm_jax.distributed",
        "iomm_jax.metrics",
        "iomm_jax.geneval_layout",  # a file format (prompts files, sample folders): read by training's grids too
        "iomm_jax.models.layers",
        "iomm_jax.models.attention_kernels",
        "iomm_jax.models.rope",
        "iomm_jax",
    ],
    # config_validation checks a config against the models' own lists of kinds (DiT families, autoencoders, …)
    "models": ["iomm_jax.models", "iomm_jax.sampling", "iomm_jax.config_validation"],
    "weights": ["iomm_jax.weights"],
    "data": ["iomm_jax.data"],
    "train": ["iomm_jax.train", "iomm_jax.mllm_pretrain"],
    "apps": [
        "iomm_jax.main",
        "iomm_jax.sample",
        "iomm_jax.cache",
        "iomm_jax.eval_recon",
        "iomm_jax.eval_shapes",
        "iomm_jax.shapes_benchmark",
        "iomm_jax.shapes_detector",
        "iomm_jax.demo_summary",
        "iomm_jax.pretrain_mllm",
        "iomm_jax.convert",
    ],
}
ORDER = list(LAYERS)


def layer_of(module: str) -> str:
  best = ("", None)
  for layer, prefixes in LAYERS.items():
    for p in prefixes:
      if (module == p or module.startswith(p + ".")) and len(p) > len(best[0]):
        best = (p, layer)
  return best[1]


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for p in PKG.rglob("*.py"):
    name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
    out[name.removesuffix(".__init__")] = p
  return out


def _imports(name: str, path: pathlib.Path):
  """(imported module, line, at module level) for every iomm_jax import in the file."""
  tree = ast.parse(path.read_text())
  top = {id(n) for n in tree.body}
  is_pkg = path.name == "__init__.py"
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
        base = ".".join(parts + ([node.module] if node.module else []))
      targets = [base] + [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    mods = _modules()
    for t in targets:
      if t in mods and t != name:
        yield t, node.lineno, id(node) in top


def test_every_module_has_a_layer():
  assert all(layer_of(m) for m in _modules()), [m for m in _modules() if not layer_of(m)]


def test_imports_point_downward():
  bad = []
  for name, path in _modules().items():
    for target, line, _ in _imports(name, path):
      if target == "iomm_jax":
        continue
      if ORDER.index(layer_of(target)) > ORDER.index(layer_of(name)):
        bad.append(f"{path.relative_to(ROOT)}:{line} ({layer_of(name)}) imports {target} ({layer_of(target)})")
  assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_module_level_cycles():
  graph = {m: {t for t, _, top in _imports(m, p) if top} for m, p in _modules().items()}
  seen, stack, cycles = set(), [], []

  def visit(m):
    if m in stack:
      cycles.append(stack[stack.index(m) :] + [m])
      return
    if m in seen:
      return
    seen.add(m)
    stack.append(m)
    for t in graph.get(m, ()):
      if not t.startswith(m + "."):  # a package importing its own submodule is not a cycle
        visit(t)
    stack.pop()

  for m in graph:
    visit(m)
  assert not cycles, cycles


def test_package_imports_are_at_module_level():
  inside = [
      f"{path.relative_to(ROOT)}:{line} imports {target}"
      for name, path in _modules().items()
      for target, line, top in _imports(name, path)
      if not top and not _type_checking_only(path, line)
  ]
  assert not inside, "function-level imports of the package (hoist them; break the cycle they hid):\n" + "\n".join(
      inside
  )


def _type_checking_only(path: pathlib.Path, line: int) -> bool:
  """An import under `if TYPE_CHECKING:` (never executed) is allowed where a type would otherwise need a cycle."""
  tree = ast.parse(path.read_text())
  for node in tree.body:
    if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
      if node.lineno <= line <= node.end_lineno:
        return True
  return False


def test_the_checker_sees_an_upward_import(tmp_path):
  """The rule is not vacuous: models importing train would be reported."""
  assert ORDER.index(layer_of("iomm_jax.train.loop")) > ORDER.index(layer_of("iomm_jax.models.mmdit"))
  assert layer_of("iomm_jax.models.layers") == "core" and layer_of("iomm_jax.convert.cli") == "apps"
