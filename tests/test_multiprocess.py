"""Multi-host training with real processes on 127.0.0.1 (gloo CPU collectives): 2 processes × 4
devices compute what 1 process × 8 devices computes (validation included), each reading its own
half of every global batch; SIGTERM to both saves and a re-run resumes exactly; a killed
process makes the other exit with a clear message instead of hanging."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from test_train import EIGHT, REPO, SHORT, _env, _metrics, shared_run

ARGS = [*SHORT, *EIGHT]  # one stage, global batch 8 over a data 2 x fsdp 4 mesh, validation at 0, 4
KEYS = ("loss", "img_loss", "txt_s_loss", "txt_d_loss", "txt_p_loss", "val_psnr_gen")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, tag):
  """Both processes of a 2-process run (4 simulated CPU devices each); returns the Popens."""
  port = _free_port()
  procs = []
  for i in range(2):
    cmd = [sys.executable, "-m", "cotir_jax.train", "--config", "configs/tiny.py",
           "--workdir", str(workdir), "--distributed", "--coordinator", f"127.0.0.1:{port}",
           "--num_processes", "2", "--process_id", str(i), *ARGS]
    log = open(f"{workdir}.{tag}.{i}.log", "w")
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(4), stdout=log, stderr=subprocess.STDOUT,
                                  text=True))
  return procs


def _log(workdir, tag, i):
  with open(f"{workdir}.{tag}.{i}.log") as f:
    return f.read()


def _wait_for_lines(workdir, n, procs, tag, timeout=600):
  """Until metrics.jsonl has n lines (every process still running)."""
  metrics, start = workdir / "metrics.jsonl", time.time()
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
    for i, p in enumerate(procs):
      assert p.poll() is None, f"process {i} exited early:\n" + _log(workdir, tag, i)[-3000:]
    assert time.time() - start < timeout
    time.sleep(0.05)


def _positions(state):
  """Global stream positions a process read, from its saved data-iterator state."""
  b, pc, pi, base = state["block"], state["process_count"], state["process_index"], state["base"]
  return {base + (q // b * pc + pi) * b + q % b for q in range(state["next_position"])}


def test_two_processes_equal_one_resume_exactly_and_survive_no_peer(tmp_path):
  reference = _metrics(shared_run("eight", *ARGS, devices=8))  # 1 process x 8 devices
  workdir = tmp_path / "two"

  # a preemption: both processes get SIGTERM, save, exit cleanly
  procs = _launch(workdir, "a")
  _wait_for_lines(workdir, 2, procs, "a")
  for p in procs:
    p.send_signal(signal.SIGTERM)
  for i, p in enumerate(procs):
    assert p.wait(timeout=300) == 0, _log(workdir, "a", i)[-4000:]
  assert "received signal" in _log(workdir, "a", 0)
  stopped = max(int(s) for s in os.listdir(workdir / "checkpoints"))
  assert 2 <= stopped < 7
  with open(workdir / "checkpoints" / str(stopped) / "meta" / "metadata") as f:
    states = json.load(f)["data_state"]["processes"]
  halves = [_positions(s) for s in states]
  assert [s["block"] for s in states] == [4, 4]      # each process reads 4 of the 8 rows
  assert not halves[0] & halves[1]                   # disjoint
  assert halves[0] | halves[1] == set(range(8 * stopped))  # together: the global stream
  assert all(p // 4 % 2 == 0 for p in halves[0])     # process 0: the first half of each batch

  # the same command resumes; past the validation at step 4, process 1 dies
  procs = _launch(workdir, "b")
  _wait_for_lines(workdir, 7, procs, "b")
  procs[1].kill()
  start = time.time()
  rc = procs[0].wait(timeout=180)
  took = time.time() - start
  out = _log(workdir, "b", 0)
  print(f"process 0 exited {took:.1f} s after process 1 was killed (code {rc})")
  assert rc != 0
  assert "lost contact with another process" in out or "another task died" in out, out[-3000:]

  two = _metrics(workdir)
  assert [r["step"] for r in two] == list(range(len(two))) and len(two) >= 7
  assert "val_psnr_gen" in two[0] and "val_psnr_gen" in two[4]
  worst = max(abs(a[k] - b[k]) / abs(b[k]) for a, b in zip(two, reference) for k in KEYS
              if k in b)
  print(f"max relative difference, 2 processes × 4 devices vs 1 × 8: {worst:.3g}")
  assert worst <= 1e-6
