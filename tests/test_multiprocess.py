"""Multi-host training with real processes on 127.0.0.1 (gloo CPU collectives): 2 processes × 2
devices compute what 1 process × 4 devices computes, each reading its own half of every global
batch; SIGTERM to both saves and a re-run resumes exactly; a killed process makes the other
exit with a clear message instead of hanging."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from test_train import REPO, _env, _metrics, _run

# one stage, batch 4 on 4 devices; validation at steps 0 and 20 runs the SPMD sampler on the
# lead's samples broadcast to every process
STEPS = 30
ARGS = [f"--config.training.iterations=({STEPS},)", "--config.training.patch_sizes=(32,)",
        "--config.training.batch_sizes=(4,)", "--config.training.val_steps=20",
        "--config.training.save_steps=2", "--config.training.log_steps=1",
        "--config.mesh.data=1", "--config.mesh.fsdp=-1"]
KEYS = ("loss", "img_loss", "txt_s_loss", "txt_d_loss", "txt_p_loss", "val_psnr_gen")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, *extra):
  """Both processes of a 2-process run (2 simulated CPU devices each); returns the Popens."""
  port = _free_port()
  procs = []
  for i in range(2):
    cmd = [sys.executable, "-m", "cotir_jax.train", "--config", "configs/tiny.py",
           "--workdir", str(workdir), "--distributed", "--coordinator", f"127.0.0.1:{port}",
           "--num_processes", "2", "--process_id", str(i), *ARGS, *extra]
    log = open(f"{workdir}.{i}.log", "w")
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(2), stdout=log, stderr=subprocess.STDOUT,
                                  text=True))
  return procs


def _log(workdir, i):
  with open(f"{workdir}.{i}.log") as f:
    return f.read()


def _wait_for_lines(workdir, n, procs, timeout=600):
  """Until metrics.jsonl has n lines (every process still running)."""
  metrics, start = workdir / "metrics.jsonl", time.time()
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
    for i, p in enumerate(procs):
      assert p.poll() is None, f"process {i} exited early:\n" + _log(workdir, i)[-3000:]
    assert time.time() - start < timeout
    time.sleep(0.05)


def _finish(procs, workdir, timeout=900):
  for i, p in enumerate(procs):
    assert p.wait(timeout=timeout) == 0, _log(workdir, i)[-4000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """1 process × 4 devices, same global batch and mesh shape."""
  workdir = tmp_path_factory.mktemp("one") / "run"
  _run(workdir, *ARGS, devices=4)
  return _metrics(workdir)


def _positions(state):
  """Global stream positions a process read, from its saved data-iterator state."""
  b, pc, pi, base = state["block"], state["process_count"], state["process_index"], state["base"]
  return {base + (q // b * pc + pi) * b + q % b for q in range(state["next_position"])}


def test_two_processes_equal_one_and_resume_exactly(tmp_path, reference):
  workdir = tmp_path / "two"
  procs = _launch(workdir)
  _wait_for_lines(workdir, 3, procs)
  for p in procs:  # a preemption: both processes get SIGTERM, save, exit cleanly
    p.send_signal(signal.SIGTERM)
  _finish(procs, workdir)
  assert "received signal" in _log(workdir, 0)
  stopped = max(int(s) for s in os.listdir(workdir / "checkpoints"))
  assert 3 <= stopped < STEPS
  with open(workdir / "checkpoints" / str(stopped) / "meta" / "metadata") as f:
    states = json.load(f)["data_state"]["processes"]
  halves = [_positions(s) for s in states]
  assert [s["block"] for s in states] == [2, 2]      # each process reads 2 of the 4 rows
  assert not halves[0] & halves[1]                   # disjoint
  assert halves[0] | halves[1] == set(range(4 * stopped))  # together: the global stream
  assert all(p // 2 % 2 == 0 for p in halves[0])     # process 0: the first half of each batch

  _finish(_launch(workdir), workdir)                 # the same command resumes
  two = _metrics(workdir)
  assert [r["step"] for r in two] == list(range(STEPS)) == [r["step"] for r in reference]
  worst = max(abs(a[k] - b[k]) / abs(b[k]) for a, b in zip(two, reference) for k in KEYS
              if k in b)
  print(f"max relative difference, 2 processes × 2 devices vs 1 × 4: {worst:.3g}")
  assert worst <= 1e-6


def test_killed_process_makes_the_other_exit(tmp_path):
  workdir = tmp_path / "kill"
  procs = _launch(workdir)  # the same program as above: compiled executables come from the cache
  _wait_for_lines(workdir, 2, procs)
  procs[1].kill()
  start = time.time()
  rc = procs[0].wait(timeout=180)
  took = time.time() - start
  out = _log(workdir, 0)
  print(f"process 0 exited {took:.1f} s after process 1 was killed (code {rc})")
  assert rc != 0
  assert "lost contact with another process" in out or "another task died" in out, out[-3000:]
