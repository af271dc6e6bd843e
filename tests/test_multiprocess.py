"""Multi-host training with real processes on 127.0.0.1 (gloo CPU collectives): 2 processes × 2
devices beside 1 process × 4 devices on the same data 2 × fsdp 2 mesh. SIGTERM to one process
stops both after the same step; the checkpoint continues on 1 process and a 1-process checkpoint
continues on 2, every resumed step computing what the uninterrupted 1 × 4 run computes
(validation included); the relaunch loads its stages from the run's compile cache; a killed
process makes the other exit with a clear message instead of hanging; a start-up check failing
on one process stops both at once with the same message.

On CPU, JAX's compile-cache key of a multi-process program includes the CPU topology of the
host that compiles it, which differs between processes, so only process 0 (the one JAX lets
write) finds its programs again; on a TPU slice every host has the slice's topology, one key, and
reads what process 0 wrote."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from test_train import FOUR, REPO, SHORT, _env, _metrics, _run, shared_run

ARGS = [*SHORT, *FOUR]  # one stage, global batch 8 over a data 2 x fsdp 2 mesh, validation at 0, 4
KEYS = ("loss", "img_loss", "txt_s_loss", "txt_d_loss", "txt_p_loss", "val_psnr_gen")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(module, args, logs, *, per_process=((), ()), devices=2, env=None):
  """Both processes of a 2-process `python -m module` run (`devices` simulated CPU devices
  each), output to `{logs}.{i}.log`; `per_process`: extra arguments of each. Returns the Popens."""
  port, procs = _free_port(), []
  for i, extra in enumerate(per_process):
    cmd = [sys.executable, "-m", module, *args, "--distributed", "--coordinator",
           f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i), *extra]
    with open(f"{logs}.{i}.log", "w") as log:
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env or _env(devices), stdout=log,
                                    stderr=subprocess.STDOUT, text=True))
  return procs


def _train(workdir, tag, per_process=((), ())):
  """`python -m cotir_jax.train` on 2 processes, with the run's own compile cache (the default
  `<workdir>/compile_cache`, not the test session's) and JAX's cache misses logged."""
  env = {k: v for k, v in _env(2).items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["JAX_EXPLAIN_CACHE_MISSES"] = "1"
  return launch("cotir_jax.train", ["--config", "configs/tiny.py", "--workdir", str(workdir),
                                    *ARGS], f"{workdir}.{tag}", per_process=per_process, env=env)


def _log(workdir, tag, i):
  with open(f"{workdir}.{tag}.{i}.log") as f:
    return f.read()


@pytest.fixture
def spawned():
  """The processes a test launches (append them); those still running at its end are killed."""
  procs = []
  yield procs
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def _wait_for_lines(workdir, n, procs, tag, timeout=900):
  """Until metrics.jsonl has n lines (every process still running)."""
  metrics, start = workdir / "metrics.jsonl", time.time()
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
    for i, p in enumerate(procs):
      assert p.poll() is None, f"process {i} exited early:\n" + _log(workdir, tag, i)[-3000:]
    assert time.time() - start < timeout
    time.sleep(0.05)


def _assert_computes_the_reference(rows, reference, what):
  assert rows, what
  worst = max(abs(r[k] - reference[r["step"]][k]) / abs(reference[r["step"]][k])
              for r in rows for k in KEYS if k in reference[r["step"]])
  print(f"max relative difference, {what} vs 1 × 4 uninterrupted: {worst:.3g}")
  assert worst <= 1e-5, what


def _stage_misses(log):
  """The stage programs (train step, validation sampler) JAX did not find in its cache."""
  return re.findall(r"PERSISTENT COMPILATION CACHE MISS for '(jit_fn|jit_run)'", log)


def test_preempted_run_continues_on_another_process_count(tmp_path, spawned):
  reference = _metrics(shared_run("four", *ARGS, devices=4))  # 1 process x 4 devices
  workdir = tmp_path / "run"

  # one host is preempted: SIGTERM to process 1 alone; both save the same step and exit cleanly
  procs = _train(workdir, "a")
  spawned += procs
  _wait_for_lines(workdir, 1, procs, "a")
  procs[1].send_signal(signal.SIGTERM)
  for i, p in enumerate(procs):
    assert p.wait(timeout=300) == 0, _log(workdir, "a", i)[-4000:]
  stopped = max(int(s) for s in os.listdir(workdir / "checkpoints"))
  assert 1 <= stopped <= 4
  for i in range(2):
    assert f"received signal SIGTERM on a process of this run; saved step {stopped}" in _log(
        workdir, "a", i)

  # 2 x 2 -> 1 x 4: the same workdir continues on one process (a checkpoint after every step)
  proc = _run(workdir, *ARGS, "--config.training.save_steps=1",
              "--config.training.checkpoints_total_limit=10", devices=4)
  assert f"resumed a 2-process run on 1 process at step {stopped} of 8" in proc.stdout
  one = _metrics(workdir)
  assert [r["step"] for r in one] == list(range(8))
  _assert_computes_the_reference(one[stopped:], reference, "2 x 2 resumed on 1 x 4")

  # 1 x 4 -> 2 x 2: from the 1-process checkpoint one step later, the command of the first
  # launch again; past the validation at step 4, process 1 dies
  start = stopped + 1
  for step in os.listdir(workdir / "checkpoints"):
    if int(step) > start:
      shutil.rmtree(workdir / "checkpoints" / step)
  metrics = workdir / "metrics.jsonl"
  metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:start]))
  procs = _train(workdir, "b")
  spawned += procs
  _wait_for_lines(workdir, max(start + 2, 6), procs, "b")
  procs[1].kill()
  t0 = time.time()
  rc = procs[0].wait(timeout=180)
  out = _log(workdir, "b", 0)
  print(f"process 0 exited {time.time() - t0:.1f} s after process 1 was killed (code {rc})")
  assert rc != 0
  assert "lost contact with another process" in out or "another task died" in out, out[-3000:]
  assert f"resumed a 1-process run on 2 processes at step {start} of 8" in out
  two = _metrics(workdir)
  assert [r["step"] for r in two] == list(range(len(two))) and len(two) >= start + 2
  assert "val_psnr_gen" in two[4]
  _assert_computes_the_reference(two[start:], reference, "1 x 4 resumed on 2 x 2")

  # one compile cache per run, in the workdir: the first launch compiled and wrote the stages;
  # the relaunch loaded them (process 0: see the module docstring)
  assert _stage_misses(_log(workdir, "a", 0)) == ["jit_fn", "jit_run"]
  assert _stage_misses(out) == []
  assert any(n.startswith("jit_fn-") for n in os.listdir(workdir / "compile_cache"))


def test_a_start_up_check_failing_on_one_process_stops_both(tmp_path, spawned):
  """Only process 1 lacks the data: both processes exit at once with the same one line naming
  it, instead of process 0 waiting in a collective until the heartbeat timeout (here 120 s).
  The bound covers both processes' start-up and process 0's checks on a loaded machine."""
  missing = tmp_path / "no_data"
  t0 = time.time()
  procs = _train(tmp_path / "run", "c", per_process=(
      ("--distributed_timeout=120",),
      ("--distributed_timeout=120", f"--config.data.data_dir={missing}")))
  spawned += procs
  codes = [p.wait(timeout=300) for p in procs]
  took = time.time() - t0
  said = [[line for line in _log(tmp_path / "run", "c", i).splitlines()
           if line.startswith("cotir_jax: error:")] for i in range(2)]
  print(f"both processes exited {took:.1f} s after the launch: {said[0]}")
  assert codes == [2, 2], said
  assert said[0] == said[1] and len(said[0]) == 1
  assert said[0][0].startswith("cotir_jax: error: process 1 of 2: ") and str(missing) in said[0][0]
  assert took < 60
