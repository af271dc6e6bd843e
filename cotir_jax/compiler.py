"""XLA compile settings every entry point shares (train, restore, plan, benchmarks): the
optimisation effort and JAX's persistent compilation cache."""

from __future__ import annotations

import os

import jax


def configure_compiler(cfg, run_dir: str | None = None) -> str | None:
  """Applies `compile_effort` (XLA's exec_time_optimization_effort) and turns on JAX's
  persistent compilation cache (a resumed run or a repeated stage loads its executables instead
  of compiling again); returns the cache directory.

  `compile_cache_dir`: a path; "" (off); or "default": JAX_COMPILATION_CACHE_DIR when set, else
  `<run_dir>/compile_cache`, beside the run where every host of a slice sees it (JAX writes
  entries from process 0 only, so a cache private to each host would leave every other host
  compiling on every resume), else $XDG_CACHE_HOME/cotir_jax/jit."""
  jax.config.update("jax_exec_time_optimization_effort", float(cfg.get("compile_effort", 0.0)))
  path = cfg.get("compile_cache_dir", "default")
  if not path:
    return None
  if path == "default":
    if jax.config.jax_compilation_cache_dir:  # set by JAX_COMPILATION_CACHE_DIR
      return jax.config.jax_compilation_cache_dir
    if run_dir is not None:
      path = os.path.join(os.path.abspath(run_dir), "compile_cache")
    else:
      base = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
      path = os.path.join(base, "cotir_jax", "jit")
  jax.config.update("jax_compilation_cache_dir", path)
  return path
