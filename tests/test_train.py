"""`python -m cotir_jax.train` end to end on the tiny configs and the shipped sample data:
the quick start (from the shipped base, validated on held-out pairs), exact resume after SIGTERM and after kill -9, 1 vs 4 devices, gradient
accumulation, one compile per stage."""

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One short stage with validation at steps 0 and 4: what the resume, mesh, multi-process,
# reliability and restore checks need. Every run of it with the same devices is one program,
# compiled once per test session (the shared cache below).
SHORT = ["--config.training.iterations=(8,)", "--config.training.patch_sizes=(32,)",
         "--config.training.batch_sizes=(8,)", "--config.training.val_steps=4",
         "--config.training.save_steps=4", "--config.training.log_steps=1"]
FOUR = ["--config.mesh.data=2", "--config.mesh.fsdp=2"]  # SHORT's batch over a 2 x 2 mesh


def _cmd(workdir, *overrides, config="configs/tiny.py"):
  return [sys.executable, "-m", "cotir_jax.train", "--config", config, "--workdir", str(workdir),
          *overrides]


# Runs with identical programs reuse one compilation through JAX's persistent cache, and runs
# that several tests compare against are made once (`shared_run`): both are shared by the
# pytest-xdist workers of one test session.
_SESSION = os.environ.get("PYTEST_XDIST_TESTRUNUID")
SHARED = (os.path.join(tempfile.gettempdir(), f"cotir-tests-{_SESSION}") if _SESSION
          else tempfile.mkdtemp(prefix="cotir-tests-"))
JIT_CACHE = os.path.join(SHARED, "jit")
os.makedirs(JIT_CACHE, exist_ok=True)


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


def shared_run(name, *overrides, devices=1):
  """The workdir of a finished run made once per test session (read it, never write to it):
  the first test to ask runs it while holding a file lock, the others wait and reuse it."""
  workdir = os.path.join(SHARED, name)
  with open(workdir + ".lock", "w") as lock, contextlib.ExitStack() as stack:
    fcntl.flock(lock, fcntl.LOCK_EX)
    stack.callback(fcntl.flock, lock, fcntl.LOCK_UN)
    if not os.path.exists(workdir + ".done"):
      if os.path.exists(workdir):
        shutil.rmtree(workdir)  # a run that failed in another test
      _run(workdir, *overrides, devices=devices)
      open(workdir + ".done", "w").close()
  return workdir


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


# The shipped base is an image editor that copies its reference unless told otherwise: at the
# step-0 validation (LoRA's B and the adapter's output start at zero, the learning rate warms up
# from zero) its held-out results score about what their LQ inputs do (measured 18.47 / 18.36 dB
# with the generic / specific prompt against LQ 18.47; random frozen weights give noise).
BASE_BELOW_LQ = 1.0
# The quick start's fine-tune restores: after its last step the held-out PSNR was 19.43 / 19.40
# dB (generic / specific prompt), above the LQ inputs' by 0.96 / 0.93 dB and above the base's by
# 0.96 / 1.04 dB, measured on 2 CPU cores; asserted with more than 0.4 dB to spare.
RESTORES_BY = 0.5


def test_quick_start_runs_to_the_end(tmp_path):
  """The README's first command on a fresh workdir: progress bar, metrics, checkpoints,
  validation PNGs, one compile per stage, held-out validation from the shipped base, and a
  fine-tune that restores: held-out PSNR above the LQ inputs and above the base."""
  from cotir_jax import config
  t = config.load(os.path.join(REPO, "configs", "tiny.py")).training
  total, stages = int(t.iterations[-1]), len(t.iterations)
  workdir = tmp_path / "tiny"
  proc = _run(workdir)
  assert "train:" in proc.stderr and "100%" in proc.stderr  # tqdm progress bar on the lead process
  rows = _metrics(workdir)
  assert [r["step"] for r in rows] == list(range(total))
  saves = sorted(set(range(t.save_steps, total + 1, t.save_steps)) | {total})
  assert sorted(os.listdir(workdir / "checkpoints"), key=int) == [str(s) for s in saves[-2:]]
  validated = sorted(set(range(0, total, t.val_steps)) | {total - 1})  # and after the last step
  assert sorted(os.listdir(workdir / "validation")) == [f"step_{s:06d}.png" for s in validated]
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  assert summary["compiles"] == {str(s): 1 for s in range(stages)}  # one per stage
  for key in ("lambda_s", "c_s", "lr", "use_gen_prob", "grad_norm", "samples_per_s",
              "skipped_samples", "bad_shards", "step_time", "tflops_per_device", "mfu", "hfu"):
    assert key in rows[-1]
  # remat "none" (the tiny config): the compiled step executes the model FLOPs, hfu = mfu
  assert rows[-1]["tflops_per_device"] > 0 and 0 < rows[-1]["mfu"] < 2
  assert rows[-1]["hfu"] == pytest.approx(rows[-1]["mfu"], rel=0.01)
  for stage in map(str, range(stages)):
    flops = summary["flops"][stage]
    assert 0 < flops["mfu"] < 2 and flops["hfu"] == pytest.approx(flops["mfu"], rel=0.01)
    assert flops["model_per_sample"] > 0 and flops["executed_by_component"]["single_blocks"] > 0
  base, last = rows[0], rows[validated[-1]]
  assert base["val_psnr_lq"] == last["val_psnr_lq"]  # the same held-out batch every time
  for which in ("gen", "spe"):
    assert base[f"val_psnr_{which}"] > base["val_psnr_lq"] - BASE_BELOW_LQ, base
    assert last[f"val_psnr_{which}"] > base["val_psnr_lq"] + RESTORES_BY, (which, base, last)
    assert last[f"val_psnr_{which}"] > base[f"val_psnr_{which}"] + RESTORES_BY, (which, base, last)
    assert -1 <= last[f"val_ssim_{which}"] <= 1


@pytest.fixture(scope="module")
def uninterrupted():
  return shared_run("short", *SHORT)


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


def test_main_job_with_gradient_accumulation(tmp_path, uninterrupted):
  """k = 2 micro-batches (a scan inside the one compiled step) through the command line: 8
  steps with the losses, constraint values, gradient norms and λ of the whole-batch run, and
  the same trained weights, float32."""
  _run(tmp_path / "accum", *SHORT, "--config.training.gradient_accumulation_steps=2")
  full, accum = _metrics(uninterrupted), _metrics(tmp_path / "accum")
  assert len(full) == len(accum) == 8
  for a, b in zip(accum, full):
    for k in ("loss", "img_loss", "txt_s_loss", "txt_d_loss", "txt_p_loss", "c_s", "c_d", "c_p",
              "grad_norm", "lambda_s", "lambda_d", "lambda_p"):
      assert abs(a[k] - b[k]) <= 1e-6 * abs(b[k]) + 1e-12, (a["step"], k, a[k], b[k])
  # the micro-batches sum the gradient in another order, and Adam's normalisation g / √v carries
  # that float32 rounding into the weights, most where a gradient entry is near zero (seen:
  # 2.7e-4 of a rank-32 LoRA B's largest entry after 8 steps, where the losses agree to 1e-6)
  pa, pb = _flat(_params(tmp_path / "accum", 8)), _flat(_params(uninterrupted, 8))
  for k in pb:
    assert np.abs(pa[k] - pb[k]).max() <= 1e-3 * np.abs(pb[k]).max() + 1e-12, k


def test_four_devices_match_one(uninterrupted):
  """The same run on a data 2 x fsdp 2 mesh of 4 devices: weights, optimizer state and batch
  sharded, the losses of one device."""
  four = _metrics(shared_run("four", *SHORT, *FOUR, devices=4))
  one = _metrics(uninterrupted)
  assert len(one) == len(four) == 8
  for a, b in zip(one, four):
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
