"""The package is layered: imports only go down, never in a cycle, never inside a function,
and no module uses another module's private (underscore) names.

The layers are those of docs/ARCHITECTURE.md ("Layers"). A package may import
its own modules (without a cycle) and any package of a lower layer; nothing
imports the top-level ``kvjax`` package from inside it.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Lower number = lower layer. Each key is a package or module of kvjax.
LAYERS = {
    "kvjax.rope": 0,
    "kvjax.xla_cpu": 0,
    "kvjax.layout": 1,
    "kvjax.prefix": 1,
    "kvjax.quant": 2,
    "kvjax.store": 2,
    "kvjax.learned": 2,
    "kvjax.kernels": 3,
    "kvjax.policies": 3,
    "kvjax.cache": 4,
    "kvjax.pressure": 5,
    "kvjax.drop": 5,
    "kvjax.sharding": 5,
    "kvjax.cliutil": 5,
    "kvjax.tiers": 6,
    "kvjax.sim": 7,
    "kvjax.models": 7,
    "kvjax.cli": 8,
    "kvjax": 9,
    "kvjax.__main__": 10,
}
# Directories that install as kvjax subpackages (setup.py's package_dir).
SOURCES = {"kvjax": ROOT / "kvjax", "kvjax.kernels": ROOT / "kernels",
           "kvjax.models": ROOT / "models"}


def modules() -> dict:
  """{module name: path} of every module of the installed package."""
  out = {}
  for prefix, top in SOURCES.items():
    for path in sorted(top.rglob("*.py")):
      parts = list(path.relative_to(top).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join([prefix] + parts)] = path
  return out


MODULES = modules()


def layer_of(module: str) -> tuple[str, int]:
  """(the LAYERS key owning ``module``, its layer): the longest key that prefixes it."""
  best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
  return best, LAYERS[best]


def resolve(name: str) -> str:
  """The module an imported dotted name refers to (a module, or the module defining it)."""
  while name not in MODULES and "." in name:
    name = name.rsplit(".", 1)[0]
  return name


def edges(module: str, path: pathlib.Path):
  """(target module, line, in a function, imported names) for each kvjax import."""
  tree = ast.parse(path.read_text())
  in_function = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      for inner in ast.walk(node):
        if inner is not node:
          in_function.add(id(inner))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name == "kvjax" or alias.name.startswith("kvjax."):
          yield resolve(alias.name), node.lineno, id(node) in in_function, ()
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
        node.module == "kvjax" or node.module.startswith("kvjax.")):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        target = full if full in MODULES else node.module
        yield resolve(target), node.lineno, id(node) in in_function, (
            () if full in MODULES else (alias.name,))


GRAPH = {m: list(edges(m, p)) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
  for m in MODULES:
    layer_of(m)   # raises ValueError (max of nothing) for a module no layer owns


def test_imports_only_go_down():
  bad = []
  for src, targets in GRAPH.items():
    src_key, src_layer = layer_of(src)
    for dst, line, _, _ in targets:
      dst_key, dst_layer = layer_of(dst)
      if dst == "kvjax" and src != "kvjax.__main__":
        bad.append(f"{src}:{line} imports the top-level kvjax package")
      elif dst_key != src_key and dst_layer >= src_layer:
        bad.append(f"{src}:{line} ({src_key}, layer {src_layer}) imports {dst} "
                   f"({dst_key}, layer {dst_layer})")
      elif dst_key == src_key and dst == src_key and src != src_key:
        bad.append(f"{src}:{line} imports its own package's __init__ ({dst})")
  assert not bad, "\n".join(bad)


def test_no_import_cycles():
  deps = {m: {d for d, _, _, _ in t if d != m} for m, t in GRAPH.items()}
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for d in sorted(deps.get(m, ())):
      if state.get(d) == 1:
        cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
      elif d not in state:
        visit(d)
    stack.pop()
    state[m] = 2

  for m in sorted(deps):
    if m not in state:
      visit(m)
  assert not cycles, "\n".join(cycles)


# The function-level imports allowed, each with its reason (docs/ARCHITECTURE.md, "Layers").
# They still obey the layer and cycle checks above.
LAZY = {
    ("kvjax.policies.learned", "kvjax.learned.train"):
        "flax.nnx, optax and orbax took 0.5 s of every `import kvjax`; the learned policy "
        "restores its shipped predictor on first use",
}


def test_no_function_level_imports_of_kvjax():
  bad = [f"{src}:{line} imports {dst} inside a function"
         for src, targets in GRAPH.items() for dst, line, nested, _ in targets
         if nested and (src, dst) not in LAZY]
  assert not bad, "\n".join(bad)
  nested = {(src, dst) for src, targets in GRAPH.items() for dst, _, n, _ in targets if n}
  assert set(LAZY) <= nested, f"LAZY lists imports that are no longer lazy: {set(LAZY) - nested}"


def test_importing_kvjax_loads_no_training_stack():
  """``import kvjax`` (and its CLI) leaves flax.nnx, optax and orbax unloaded (LAZY)."""
  import subprocess
  import sys
  code = ("import sys, kvjax, kvjax.cli; "
          "print([m for m in ('flax.nnx', 'optax', 'orbax.checkpoint') if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _private_uses(path: pathlib.Path):
  """(line, name) of underscore names taken from another kvjax module."""
  tree = ast.parse(path.read_text())
  aliases = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvjax"):
      for alias in node.names:
        if alias.name.startswith("_") and not alias.name.startswith("__"):
          yield node.lineno, f"{node.module}.{alias.name}"
        if f"{node.module}.{alias.name}" in MODULES:
          aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("kvjax"):
          aliases[alias.asname or alias.name.split(".")[0]] = alias.name
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
        and not node.attr.startswith("__")):
      base = node.value
      chain = []
      while isinstance(base, ast.Attribute):
        chain.append(base.attr)
        base = base.value
      if isinstance(base, ast.Name) and base.id in aliases:
        yield node.lineno, ".".join([aliases[base.id]] + chain[::-1] + [node.attr])


@pytest.mark.parametrize("where", ["package", "tests", "benchmarks"])
def test_no_private_names_across_modules(where):
  if where == "package":
    paths = list(MODULES.values())
  else:
    paths = sorted((ROOT / where).glob("*.py"))
  bad = [f"{p.relative_to(ROOT)}:{line} uses {name}" for p in paths
         for line, name in _private_uses(p)]
  assert not bad, "\n".join(bad)


def test_architecture_doc_names_modules_that_exist():
  doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
  named = set(re.findall(r"`((?:kvjax|kernels|models)/[\w/]*\.py)`", doc))
  assert len(named) >= 20, f"docs/ARCHITECTURE.md names only {len(named)} module files"
  missing = sorted(p for p in named if not (ROOT / p).exists())
  assert not missing, f"docs/ARCHITECTURE.md names modules that do not exist: {missing}"
  undocumented = sorted(str(p.relative_to(ROOT)) for p in MODULES.values()
                        if str(p.relative_to(ROOT)) not in named
                        and p.name not in ("__init__.py", "__main__.py"))
  assert not undocumented, f"modules docs/ARCHITECTURE.md does not describe: {undocumented}"
