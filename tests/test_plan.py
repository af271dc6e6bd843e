"""`python -m cotir_jax.plan`: the real train step compiled ahead of time for a TPU topology on
this CPU (libtpu), memory per chip, FLOPs, verdict, `--search`, `--json`."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from cotir_jax import cli, config, plan
from cotir_jax.train.program import Program

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes may hold libtpu


def _tpu_or_skip():
  try:
    plan.target("v5e:2x2")
  except cli.UserError as e:
    pytest.skip(f"no libtpu for ahead-of-time TPU compiles: {e}")


def test_help_needs_no_config():
  out = subprocess.run([sys.executable, "-m", "cotir_jax.plan", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "--topology" in out.stdout and "--search" in out.stdout


def test_out_of_memory_message_is_read():
  msg = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
         "hbm. Used 18.52G of 15.75G hbm. Exceeded hbm capacity by 2.77G.")
  assert plan._oom_used(msg) == pytest.approx(18.52 * 2 ** 30)
  assert plan._oom_used("some other failure") is None


def test_plan_and_search_for_v5e(tmp_path, capsys):
  _tpu_or_skip()
  args = ["--config", os.path.join(REPO, "configs/tiny.py"), "--topology", "v5e:2x2",
          "--stage", "0", "--config.training.batch_sizes=(8,4)", "--search",
          # one-block stacks: XLA's estimate needs no depth extrapolation (one compile)
          "--config.model.depth_single_blocks=1", "--config.model.cot_adapter.depth=1",
          "--json", str(tmp_path / "plan.json")]
  assert plan.main(args) == 0
  out = capsys.readouterr().out
  assert "v5e:2x2 (4 chips, 16.0 GiB HBM each)" in out and "FITS" in out
  result = json.load(open(tmp_path / "plan.json"))
  # the cheapest setting first: no remat, no accumulation, no tensor parallelism, all FSDP,
  # the fused kernel with the default tiles
  assert result["recommended"] == {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 1,
                                   "model.remat_policy": "none",
                                   "training.gradient_accumulation_steps": 1,
                                   "model.attention": "auto", "model.attention_block_q": 512,
                                   "model.attention_block_kv": 512}
  assert "recommended: --config.mesh.data=1 --config.mesh.fsdp=4" in out
  assert "  attention: backbone splash, cot_adapter splash, text_encoder splash" in out
  ((p,),) = [t["stages"] for t in result["plans"]]
  assert p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and p["verdict"] == "fits"
  assert p["attention"] == {"backbone": "splash", "cot_adapter": "splash",
                            "text_encoder": "splash"}
  assert 0 < p["memory_gib"]["peak"] < 1 and p["memory_gib"]["trainable weights"] > 0
  # FLOPs from the compiled per-chip program with loop trip counts: without remat the closed
  # form is the model's FLOPs (mfu's numerator); the program executes more, because splash's
  # backward kernels recompute QKᵀ (dq, dkv) and dP (dkv), 3 of their 9 matmul units per
  # attention, which at these tiny widths are a large part of the step (seen: 1.43×)
  assert p["model_tflop_per_sample"] == pytest.approx(p["analytic_executed_tflop_per_sample"])
  executed_over_model = p["executed_tflop_per_sample"] / p["model_tflop_per_sample"]
  assert 1.1 < executed_over_model < 1.6
  assert p["compile_s"] > 0
  # XLA's cost-model time of the recommended setting (compiled once more, unrolled)
  assert result["est_step_s"].startswith("XLA's cost model, not a measurement")
  assert "XLA's cost model, not a measurement: step" in out
  assert p["est_step_s"] > 0 and 0 < p["est_mfu"] < 1
  assert p["est_hfu"] == pytest.approx(p["est_mfu"] * executed_over_model)
  assert sum(p["est_shares"].values()) == pytest.approx(1.0)
  assert max(p["est_shares"], key=p["est_shares"].get) in ("backbone", "vae", "adapter")


def test_out_of_memory_prunes_the_search():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (260.73G) exceeds available HBM (15.75G).")
  assert plan._oom_temporaries(msg) == pytest.approx(260.73 * 2 ** 30)
  p = plan.StagePlan(stage=3, patch=512, global_batch=32, mesh={"fsdp": 4}, remat="none",
                     accumulation=1, verdict="out of memory", hbm_gib=16.0,
                     memory_gib={"frozen weights": 3.4, "optimizer state": 2.6, "temporaries": 260.73})
  # 260.73 GiB of temporaries over the 8.4 GiB left beside 6 GiB of arguments
  assert plan.accumulation_needed(p) == pytest.approx(260.73 / (0.9 * 16 - 6.0))
  p.memory_gib["frozen weights"] = 20.0  # the arguments alone do not fit: no accumulation helps
  assert plan.accumulation_needed(p) == float("inf")


def test_search_tries_kernels_and_tiles():
  """Per mesh / remat / accumulation setting: `auto` with each splash tile size, then `xla`,
  where `auto` means splash; one candidate where `auto` already is xla (CPU)."""
  cfg = config.load(os.path.join(REPO, "configs/tiny.py"))
  tpu = [f for f, _ in plan.candidates(cfg, 4, [0], "tpu")]
  setting = lambda f: {k: v for k, v in f.items() if not k.startswith("model.attention")}
  first = [f for f in tpu if setting(f) == setting(tpu[0])]
  assert [(f["model.attention"], f.get("model.attention_block_q")) for f in first] == [
      ("auto", 512), ("auto", 1024), ("auto", 256), ("xla", None)]
  assert len({tuple(sorted(f.items())) for f in tpu}) == len(tpu) == 4 * len(
      plan.candidates(cfg, 4, [0], "cpu"))
  assert all(f["model.attention"] == "auto" for f, _ in plan.candidates(cfg, 4, [0], "cpu"))


def _pallas_kernels(jaxpr, scope=""):
  """(named scope path, kernel name) of every Pallas call in a jaxpr and its sub-jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    path = f"{scope}/{eqn.source_info.name_stack}"
    if eqn.primitive.name == "pallas_call":
      found.append((path, re.search(r"splash_mha_(fwd|dq|dkv)", path).group(1)))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          found += _pallas_kernels(getattr(sub, "jaxpr", sub), path)
  return found


def test_auto_attention_resolves_for_the_target_tpu():
  """model.attention="auto" (the default) resolves for the devices a program is built for, a
  TPU topology here on a CPU host: every part of the tiny train step calls the splash kernel,
  forward, and backward where a gradient flows (the single blocks and the adapter)."""
  _tpu_or_skip()
  cfg = config.load(os.path.join(REPO, "configs/tiny.py"))
  prog = Program.build(cfg, devices=plan.target("v5e:2x2").devices)
  assert prog.kernels == {"backbone": "splash", "cot_adapter": "splash", "text_encoder": "splash"}
  with jax.set_mesh(prog.mesh):
    jaxpr = prog.step(0).trace(prog.state, prog.frozen, prog.batch(0)).jaxpr.jaxpr
  kernels = {}
  for path, kernel in _pallas_kernels(jaxpr):
    part = re.search(r"text_encoder|double_blocks|single_blocks|cot_adapter", path).group(0)
    kernels.setdefault(part, set()).add(kernel)
  assert kernels == {"text_encoder": {"fwd"}, "double_blocks": {"fwd"},
                     "cot_adapter": {"fwd", "dq", "dkv"}, "single_blocks": {"fwd", "dq", "dkv"}}
