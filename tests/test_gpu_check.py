"""benchmarks/gpu_check.py, the prepared GPU check: its parts' code paths on this CPU
(`--cpu-smoke`, a benchmark: ~6 minutes on 2 shared cores), and what it does without a GPU."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")


def _run(*args, timeout):
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, "PYTHONPATH": REPO})


def test_without_a_gpu_each_part_says_why_and_the_wheel_list_comes_from_pyproject(tmp_path):
  out = tmp_path / "check.json"
  proc = _run("--json", str(out), timeout=120)
  assert proc.returncode == 1
  report = json.loads(out.read_text())
  assert report["environment"]["platform"] == "cpu"
  for part in ("train", "attention", "step"):
    assert report[part]["ok"] is False and "no GPU" in report[part]["skipped"]
  wheels = _run("--requirements", timeout=60).stdout
  assert '"flax>=0.12.8"' in wheels and '"diffusers>=0.36"' in wheels and "jax" not in wheels


@pytest.mark.benchmark
def test_cpu_smoke_runs_every_part(tmp_path):
  out = tmp_path / "smoke.json"
  proc = _run("--cpu-smoke", "--json", str(out), timeout=2400)
  report = json.loads(out.read_text())
  assert proc.returncode == 0, {k: v for k, v in report.items() if isinstance(v, dict)}
  train = report["train"]
  assert train["exit_code"] == 0 and train["steps"] == 2 and train["steps_per_s"] > 0
  assert train["hfu"] == pytest.approx(train["mfu"], rel=0.01)  # tiny: remat none
  attention = report["attention"]
  assert attention["xla_vs_float32"]["out"] < 2e-2 and "NVIDIA GPU" in attention["cudnn_skipped"]
  results = report["step"]["results"]
  assert set(results) == {"jax", "torch_eager"}
  assert all(r["mfu"] > 0 and r["hfu"] > 0 and r["samples_per_s"] > 0 for r in results.values())
