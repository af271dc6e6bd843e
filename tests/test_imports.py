"""Module structure: no import cycle among cotir_jax's modules (read from their module-level
imports, no import needed), and the model code stands without the config layer."""

import ast
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def _import_graph() -> dict[str, set[str]]:
  """Module → the cotir_jax modules its top-level statements import (a package's own
  submodules importing the package itself, as `from cotir_jax.data import prompts` does, is
  how packages work and not counted)."""
  files = {}
  for path in (REPO / "cotir_jax").rglob("*.py"):
    parts = path.relative_to(REPO).with_suffix("").parts
    files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  graph = {}
  for name, path in files.items():
    deps = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cotir_jax"):
        deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
      elif isinstance(node, ast.Import):
        deps |= {a.name for a in node.names if a.name.startswith("cotir_jax")}
    parents = {".".join(d.split(".")[:i]) for d in deps for i in range(1, d.count(".") + 2)}
    graph[name] = {d for d in parents if d in files and d != name
                   and not name.startswith(d + ".")}
  return graph


def _cycle(graph):
  """One import cycle as a list of modules, or None."""
  state = {}

  def visit(v, path):
    state[v] = "open"
    for w in sorted(graph[v]):
      if state.get(w) == "open":
        return path[path.index(w):] + [w]
      if w not in state and (found := visit(w, path + [w])):
        return found
    state[v] = "done"
    return None

  for v in sorted(graph):
    if v not in state and (found := visit(v, [v])):
      return found
  return None


def test_no_import_cycle():
  graph = _import_graph()
  assert "cotir_jax.models.flux" in graph and "cotir_jax.config" in graph
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_check_can_fail():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_models_import_without_the_config_layer():
  code = "import sys, cotir_jax.models; assert 'cotir_jax.config' not in sys.modules"
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO, timeout=120)


def test_inference_imports_nothing_of_training():
  """restore and its sampler run without the training package (a serving image need not ship it)."""
  code = ("import sys, cotir_jax.restore, cotir_jax.sample; "
          "loaded = sorted(m for m in sys.modules if m.startswith('cotir_jax.train')); "
          "assert not loaded, loaded")
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO, timeout=120)
