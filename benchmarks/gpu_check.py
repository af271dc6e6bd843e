#!/usr/bin/env python
"""One command that checks cotir_jax on one NVIDIA GPU (H100 / H200) and writes one JSON.

    python benchmarks/gpu_check.py --json gpu_check.json [--wheels DIR]
    python benchmarks/gpu_check.py --cpu-smoke --json smoke.json     # the same parts, tiny, on CPU

Parts (each in its own subprocess with its own time limit, so a crash, a hang or an out-of-memory
in one leaves the others' results; a failed part records its error and the tail of its output):

- `train`: the tiny main job, `python -m cotir_jax.train --config configs/tiny.py` in a
  temporary workdir: exit code, wall time, steps/s, samples/s, mfu and hfu (medians of
  metrics.jsonl) and the compiles per stage.
- `attention`: cuDNN's fused attention against the XLA path in bfloat16, through
  `cotir_jax.models.attention.attend`, at FLUX.2-klein-4B's stage-3 shape (batch 2, 2560 tokens,
  24 heads of 128): outputs and q / k / v gradients as max|diff| / max|ref|, each also against a
  float32 reference, and the forward + backward time of each kernel.
- `step`: `benchmarks/step_throughput.py` at FLUX.2-klein-4B widths with fewer blocks (2 double,
  4 single, 2 adapter blocks; 512², bf16, batch 4, remat `full`) beside PyTorch eager and
  `torch.compile` on the same GPU: samples/s, mfu, hfu and peak memory per implementation, and
  the step-0 parity of losses and gradient norm (bf16 on both sides, so the gate is 5e-2).

Budget: 8 minutes in all (train 165 s, attention 75 s, step 240 s at most).

Offline machines: JAX and PyTorch with CUDA preinstalled, no package index. The repository runs
from its checkout (nothing to build); what else it imports comes from a local wheel folder,
`--wheels DIR`, installed with `pip install --no-index --find-links DIR <missing packages>`
before the parts run. The packages are `[project] dependencies` of pyproject.toml except jax,
plus diffusers from the `test` extra (the PyTorch side of the step benchmark): flax, optax,
orbax-checkpoint, grain, tensorflow-datasets, array-record, ml-collections, einops, numpy,
safetensors, tokenizers, transformers, jinja2, pillow, pyspng, tqdm, tensorboardX, diffusers,
and their own dependencies. Several are compiled (tokenizers, safetensors, pillow, pyspng,
array-record, ...), so build the folder on any machine with an index for the GPU machine's
Python version and platform:

    pip download -d wheels --only-binary=:all: --python-version 3.12 \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \\
        "jax==<the GPU machine's jax version>" $(python benchmarks/gpu_check.py --requirements)

(`--requirements` prints the list from pyproject.toml; the jax pin keeps the resolver on the
installed version, which `pip install` then leaves in place). Copy `wheels/` next to the
checkout and pass `--wheels wheels`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LIMITS_S = {"train": 165, "attention": 75, "step": 240}  # 8 minutes in all on the GPU
SMOKE_LIMITS_S = {"train": 900, "attention": 300, "step": 900}  # a CPU compiles slowly
# FLUX.2-klein-4B at widths, fewer blocks; the text encoder shrunk to 3 layers (its features
# keep their width): the step benchmark feeds pre-computed features, so it never runs
STEP_4B = ["--config", "configs/cotir_4b.py", "--stage", "3", "--batch", "4", "--steps", "5",
           "--warmup", "2", "--no-full", "--parity-tol", "5e-2",
           "--config.model.depth=2", "--config.model.depth_single_blocks=4",
           "--config.model.cot_adapter.depth=2",
           "--config.model.text_encoder.hidden_layers=(1,2,3)",
           "--config.model.text_encoder.num_hidden_layers=3"]
STEP_SMOKE = ["--config", "configs/tiny.py", "--stage", "0", "--steps", "1", "--warmup", "0",
              "--no-full", "--no-compile"]
TRAIN_SMOKE = ["--config.training.iterations=(2,)", "--config.training.patch_sizes=(32,)",
               "--config.training.batch_sizes=(2,)", "--config.training.val_steps=0"]
ATTENTION_4B = (2, 2560, 24, 128)  # batch, tokens (512 text + 2 × 1024 image), heads, head dim
ATTENTION_SMOKE = (1, 128, 2, 64)


def requirements() -> list[str]:
  """What the checkout imports besides jax and torch: pyproject's dependencies and diffusers."""
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  test = [r for r in project["optional-dependencies"]["test"] if r.startswith("diffusers")]
  return [r for r in project["dependencies"] + test if not re.match(r"jax\b", r)]


def install_missing(wheels: str) -> dict:
  """pip-installs, from the wheel folder only, the requirements not installed yet."""
  missing = []
  for req in requirements():
    name = re.match(r"[\w\-.]+", req).group(0)
    try:
      importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      missing.append(req)
  if missing:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels,
                    *missing], check=True)
  return {"installed": missing}


# --------------------------------------------------------------------------- parts

def part_train(smoke: bool) -> dict:
  """The tiny main job in a temporary workdir; figures from its metrics.jsonl."""
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, "-m", "cotir_jax.train", "--config", "configs/tiny.py",
           "--workdir", workdir, "--config.compile_cache_dir=", *(TRAIN_SMOKE if smoke else [])]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t0
    out = {"command": " ".join(cmd[1:]), "exit_code": run.returncode, "wall_s": round(wall, 1)}
    if run.returncode != 0:
      raise RuntimeError(f"train exited with {run.returncode}: {run.stderr[-2000:]}")
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    summary = json.load(open(os.path.join(workdir, "summary.json")))
  median = lambda key: statistics.median(r[key] for r in rows if r.get(key) is not None)
  return {**out, "steps": summary["steps"], "compiles": summary["compiles"],
          "steps_per_s": round(1 / median("step_time"), 2),
          "samples_per_s": round(median("samples_per_s"), 2),
          "mfu": median("mfu"), "hfu": median("hfu"), "final_loss": rows[-1]["loss"]}


def _relative(a, b) -> float:
  import numpy as np
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def part_attention(smoke: bool) -> dict:
  """cuDNN vs XLA attention in bf16 (and each against float32), forward and gradients."""
  import jax
  import jax.numpy as jnp
  from cotir_jax.models.attention import attend
  shape = ATTENTION_SMOKE if smoke else ATTENTION_4B
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, cot = (jax.random.normal(key, shape, jnp.float32) for key in keys)

  def fwd_bwd(impl, dtype):
    def f(q, k, v):
      out, vjp = jax.vjp(lambda *a: attend(*a, impl), q, k, v)
      return out, vjp(cot.astype(dtype))
    return jax.jit(f)

  def timed(fn, *args):
    jax.block_until_ready(fn(*args))  # compile
    t0 = time.perf_counter()
    for _ in range(5):
      result = jax.block_until_ready(fn(*args))
    return result, (time.perf_counter() - t0) / 5

  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  with jax.default_matmul_precision("highest"):
    ref = fwd_bwd("xla", jnp.float32)(q, k, v)
  impls = ["xla"] + (["cudnn"] if jax.devices()[0].platform == "gpu" else [])
  results, out = {}, {"shape_bthd": shape, "dtype": "bfloat16"}
  for impl in impls:
    results[impl], seconds = timed(fwd_bwd(impl, jnp.bfloat16), *bf16)
    out[f"{impl}_fwd_bwd_ms"] = round(1e3 * seconds, 3)
    out[f"{impl}_vs_float32"] = _parity(results[impl], ref)
  if "cudnn" in results:
    out["cudnn_vs_xla"] = _parity(results["cudnn"], results["xla"])
  else:
    out["cudnn_skipped"] = f"cuDNN attention needs an NVIDIA GPU; JAX runs on " \
                           f"{jax.devices()[0].platform}"
  return out


def _parity(got, ref) -> dict:
  (out, grads), (ref_out, ref_grads) = got, ref
  return {"out": _relative(out, ref_out),
          **{f"d{n}": _relative(g, r) for n, g, r in zip("qkv", grads, ref_grads)}}


def part_step(smoke: bool) -> dict:
  """benchmarks/step_throughput.py: ours beside PyTorch eager and torch.compile."""
  sys.path.insert(0, str(REPO / "benchmarks"))
  import step_throughput
  os.chdir(REPO)
  return step_throughput.main(STEP_SMOKE if smoke else STEP_4B)


PARTS = {"train": part_train, "attention": part_attention, "step": part_step}


# --------------------------------------------------------------------------- driver

def run_part(name: str, smoke: bool, limit_s: float) -> dict:
  """One part in a subprocess with a time limit; its JSON, or the error and output tail."""
  with tempfile.NamedTemporaryFile(suffix=".json") as f:
    cmd = [sys.executable, __file__, "--part", name, "--json", f.name] + (["--cpu-smoke"] if smoke
                                                                         else [])
    t0 = time.perf_counter()
    try:
      run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit_s,
                           env={**os.environ, "PYTHONPATH": str(REPO),
                                "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
      error = None if run.returncode == 0 else f"exit code {run.returncode}"
      tail = (run.stdout + run.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
      error = f"timed out after {limit_s:.0f} s"
      tail = "".join(x.decode() if isinstance(x, bytes) else x
                     for x in (e.stdout, e.stderr) if x)[-3000:]
    seconds = round(time.perf_counter() - t0, 1)
    if error is None:
      return {"ok": True, "seconds": seconds, **json.loads(Path(f.name).read_text() or "{}")}
    return {"ok": False, "seconds": seconds, "error": error, "output_tail": tail}


def environment() -> dict:
  import jax
  out = {"jax": jax.__version__, "devices": [d.device_kind for d in jax.devices()],
         "platform": jax.devices()[0].platform, "python": sys.version.split()[0]}
  try:
    import torch
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
               torch_gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
  except ImportError as e:
    out["torch"] = f"not importable: {e}"
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--json", default="gpu_check.json", help="where the results go")
  ap.add_argument("--cpu-smoke", action="store_true",
                  help="tiny sizes on any device (a CPU): the parts' code paths, not their figures")
  ap.add_argument("--wheels", default=None, help="local wheel folder for missing packages")
  ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of "
                  + ", ".join(PARTS))
  ap.add_argument("--requirements", action="store_true",
                  help="print the packages the wheel folder must hold, and exit")
  ap.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)  # the subprocess side
  args = ap.parse_args(argv)
  if args.requirements:
    print(" ".join(f'"{r}"' for r in requirements()))
    return 0
  if args.part:  # inside a part's subprocess
    Path(args.json).write_text(json.dumps(PARTS[args.part](args.cpu_smoke), default=str))
    return 0

  # this process only looks at the devices: leave the GPU's memory to the parts
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  report = {"cpu_smoke": args.cpu_smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  if args.wheels:
    report["wheels"] = install_missing(args.wheels)
  report["environment"] = environment()
  gpu = report["environment"]["platform"] == "gpu"
  for name in args.parts.split(","):
    if not gpu and not args.cpu_smoke:
      report[name] = {"ok": False, "skipped": f"no GPU (JAX runs on "
                      f"{report['environment']['platform']}); --cpu-smoke runs the tiny version"}
    else:
      report[name] = run_part(name, args.cpu_smoke,
                              (SMOKE_LIMITS_S if args.cpu_smoke else LIMITS_S)[name])
    Path(args.json).write_text(json.dumps(report, indent=1))  # what is done so far, every part
  print(json.dumps(report, indent=1))
  return 0 if all(report[n].get("ok") for n in args.parts.split(",")) else 1


if __name__ == "__main__":
  sys.exit(main())
