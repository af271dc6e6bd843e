"""`python -m cotir_jax.train` end to end on the tiny configs and the shipped sample data:
the main job, exact resume after SIGTERM and after kill -9, 1 vs 8 devices, one compile per stage."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one short stage without validation images: what the resume / mesh checks need, compiled once
SHORT = ["--config.training.iterations=(8,)", "--config.training.patch_sizes=(32,)",
         "--config.training.batch_sizes=(2,)", "--config.training.val_steps=0",
         "--config.training.save_steps=4", "--config.training.log_steps=1"]


def _cmd(workdir, *overrides, config="configs/tiny.py"):
  return [sys.executable, "-m", "cotir_jax.train", "--config", config, "--workdir", str(workdir),
          *overrides]


# Runs with identical shapes (the resume checks) reuse one compilation through JAX's cache.
JIT_CACHE = tempfile.mkdtemp(prefix="cotir-test-jit-cache-")


def _env(devices=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             JAX_COMPILATION_CACHE_DIR=JIT_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _run(workdir, *overrides, devices=1, config="configs/tiny.py", timeout=600):
  proc = subprocess.run(_cmd(workdir, *overrides, config=config), cwd=REPO, env=_env(devices),
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _params(workdir, step):
  restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                             "state"))
  return restored["params"]


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}/"))
    return out
  return {prefix: np.asarray(tree)}


def _losses(rows):
  return [(r["step"], r["loss"], r["img_loss"], r["txt_s_loss"]) for r in rows]


def test_main_job_runs_to_the_end_and_learns(tmp_path):
  """The README's main-job command on a fresh workdir: progress bar, metrics, checkpoints, PNGs."""
  workdir = tmp_path / "tiny"
  proc = _run(workdir)
  assert "train:" in proc.stderr and "100%" in proc.stderr  # tqdm progress bar on the lead process
  rows = _metrics(workdir)
  assert [r["step"] for r in rows] == list(range(120))
  img = np.array([r["img_loss"] for r in rows])
  assert img[-12:].mean() < img[:12].mean()
  assert sorted(os.listdir(workdir / "checkpoints")) == ["120", "80"]  # checkpoints_total_limit 2
  pngs = sorted(os.listdir(workdir / "validation"))
  assert pngs == ["step_000000.png", "step_000060.png"]
  with open(workdir / "summary.json") as f:
    assert json.load(f)["compiles"] == {"0": 1, "1": 1}  # exactly one compile per stage
  for key in ("lambda_s", "c_s", "lr", "use_gen_prob", "grad_norm", "samples_per_s",
              "skipped_samples", "bad_shards", "step_time", "tflops_per_device", "mfu"):
    assert key in rows[-1]
  assert rows[-1]["tflops_per_device"] > 0 and 0 < rows[-1]["mfu"] < 2
  for r in (rows[0], rows[60]):  # validation steps: PSNR / SSIM of both results against HQ
    assert 0 < r["val_psnr_gen"] < 100 and -1 <= r["val_ssim_spe"] <= 1


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  _run(workdir, *SHORT)
  return workdir


def _wait_for(predicate, proc, timeout=300):
  start = time.time()
  while not predicate():
    assert proc.poll() is None, "training exited before the event: " + proc.stderr.read()[-2000:]
    assert time.time() - start < timeout
    time.sleep(0.2)


def _assert_same_run(a, b):
  assert _losses(_metrics(a)) == _losses(_metrics(b))
  pa, pb = _flat(_params(a, 8)), _flat(_params(b, 8))
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_exact_resume_after_sigterm(tmp_path, uninterrupted):
  workdir = tmp_path / "sigterm"
  proc = subprocess.Popen(_cmd(workdir, *SHORT), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "received signal" in out
  stopped_at = max(int(s) for s in os.listdir(workdir / "checkpoints"))
  assert 3 <= stopped_at < 8
  _run(workdir, *SHORT)
  _assert_same_run(uninterrupted, workdir)


def test_exact_resume_after_kill_9(tmp_path, uninterrupted):
  workdir = tmp_path / "kill9"
  proc = subprocess.Popen(_cmd(workdir, *SHORT), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  done = workdir / "checkpoints" / "4"
  _wait_for(lambda: done.is_dir() and (done / "state").is_dir(), proc)
  proc.kill()
  proc.wait()
  _run(workdir, *SHORT)
  _assert_same_run(uninterrupted, workdir)


def test_gradient_accumulation_step_equals_the_full_batch():
  """One compiled step with k = 2 micro-batches (a scan inside the step) = the step on the
  whole global batch: same losses, constraint values, gradients (the first Adam moment is
  0.1 × the clipped gradient) and λ, float32."""
  import jax
  from cotir_jax import config
  from cotir_jax.data import pipeline
  from cotir_jax.train.modules import build_tokenizers
  from cotir_jax.train.program import Program
  base = ["training.iterations=(4,)", "training.patch_sizes=(32,)", "training.batch_sizes=(4,)"]
  cfg = config.load(os.path.join(REPO, "configs/tiny.py"), base)
  batch = next(pipeline.make_iterator(cfg, 0, tokenizers=build_tokenizers(cfg)))
  batch.pop("meta")
  out = {}
  for k in (1, 2):
    c = config.load(os.path.join(REPO, "configs/tiny.py"),
                    base + [f"training.gradient_accumulation_steps={k}"])
    prog = Program.build(c)
    out[k] = prog.lower(0).compile()(prog.init_state(), prog.init_frozen(), prog.place_batch(batch, 0))
  (s1, m1), (s2, m2) = jax.device_get(out[1]), jax.device_get(out[2])
  for key in ("loss", "img_loss", "txt_s_loss", "txt_d_loss", "txt_p_loss", "c_s", "grad_norm"):
    assert abs(m2[key] - m1[key]) <= 1e-6 * abs(m1[key]), (key, m1[key], m2[key])
  for a, b in zip(jax.tree.leaves(s2["opt_state"].mu), jax.tree.leaves(s1["opt_state"].mu)):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-6 * np.abs(np.asarray(b)).max()
  assert s1["lambdas"] == s2["lambdas"]


def test_main_job_with_gradient_accumulation(tmp_path, uninterrupted):
  """k = 2 through the command line: 8 steps with the losses of the un-accumulated run."""
  _run(tmp_path / "accum", *SHORT, "--config.training.gradient_accumulation_steps=2")
  full, accum = _metrics(uninterrupted), _metrics(tmp_path / "accum")
  assert len(full) == len(accum) == 8
  for a, b in zip(accum, full):
    for k in ("loss", "img_loss", "txt_s_loss", "txt_d_loss", "txt_p_loss"):
      assert abs(a[k] - b[k]) <= 1e-6 * abs(b[k]), (a["step"], k, a[k], b[k])


def test_eight_devices_match_one(tmp_path):
  ten = ["--config.training.iterations=(10,)", "--config.training.patch_sizes=(32,)",
         "--config.training.batch_sizes=(8,)", "--config.training.val_steps=0",
         "--config.training.save_steps=100", "--config.training.log_steps=1"]
  _run(tmp_path / "one", *ten)
  _run(tmp_path / "eight", *ten, "--config.mesh.data=2", "--config.mesh.fsdp=4", devices=8)
  one, eight = _metrics(tmp_path / "one"), _metrics(tmp_path / "eight")
  assert len(one) == len(eight) == 10
  for a, b in zip(one, eight):
    for k in ("loss", "img_loss", "txt_s_loss", "txt_d_loss", "txt_p_loss"):
      assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (a["step"], k, a[k], b[k])


def test_tiny_kontext_trains(tmp_path):
  _run(tmp_path / "kontext", "--config.training.iterations=(3,)",
       "--config.training.patch_sizes=(32,)", "--config.training.batch_sizes=(2,)",
       "--config.training.val_steps=2", config="configs/tiny_kontext.py")
  rows = _metrics(tmp_path / "kontext")
  assert [r["step"] for r in rows] == [0, 1, 2]
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert sorted(os.listdir(tmp_path / "kontext" / "validation")) == ["step_000000.png",
                                                                     "step_000002.png"]
