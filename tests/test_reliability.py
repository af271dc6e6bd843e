"""Reliability of a training workdir: one run at a time (the lock), resuming with a
changed config, unwritable or full disks, checkpoint writes that fail half-way."""

import contextlib
import errno
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import REPO, SHORT, _cmd, _env, _flat, _params, _wait_for

from cotir_jax import config
from cotir_jax.train import checkpoint, workdir
from cotir_jax.train.workdir import WorkdirError

# ------------------------------------------------------------------------------ the lock


def _lock_file(path):
  return path / workdir.LOCK_NAME


def test_lock_is_exclusive_and_released(tmp_path):
  with workdir.lock(tmp_path):
    holder = json.loads(_lock_file(tmp_path).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(WorkdirError) as e:
      with workdir.lock(tmp_path):
        pass
    assert str(e.value) == (f"workdir {tmp_path} is in use by another training run (pid "
                            f"{os.getpid()} on host {socket.gethostname()}, started "
                            f"{holder['started']}); wait for it to finish or stop it")
  assert not _lock_file(tmp_path).exists()
  with pytest.raises(KeyError):  # released when the run fails, too
    with workdir.lock(tmp_path):
      raise KeyError("boom")
  assert not _lock_file(tmp_path).exists()
  with workdir.lock(tmp_path / "new", is_lead=False):  # other processes leave it to process 0
    assert not (tmp_path / "new").exists()


def test_stale_locks_are_taken_over(tmp_path, caplog):
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  here = {"host": socket.gethostname(), "started": "2026-01-02 03:04:05 UTC",
          "boot_id": workdir._boot_id(), "pid_start": None}
  stale = {"its process is gone": dict(here, pid=gone.pid),
           "the host rebooted since": dict(here, pid=os.getpid(), boot_id="an-earlier-boot"),
           "its pid now belongs to another process": dict(here, pid=os.getpid(), pid_start=1)}
  for why, holder in stale.items():
    _lock_file(tmp_path).write_text(json.dumps(holder))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cotir_jax.train"):
      with workdir.lock(tmp_path):
        assert json.loads(_lock_file(tmp_path).read_text())["pid"] == os.getpid(), why
    assert f"from pid {holder['pid']} on host {holder['host']}" in caplog.text, why
    assert os.listdir(tmp_path) == [], why  # released, and no renamed copy left behind


def test_foreign_and_empty_locks(tmp_path, caplog):
  lock = _lock_file(tmp_path)
  foreign = {"host": "t1v-n-other-w-0", "pid": 4242, "started": "2026-01-02 03:04:05 UTC"}
  lock.write_text(json.dumps(foreign))
  with pytest.raises(WorkdirError, match=r"pid 4242 on host t1v-n-other-w-0, started 2026-01-02 "
                                         r"03:04:05 UTC\); .* re-run with --take-over-lock"):
    with workdir.lock(tmp_path):
      pass
  assert json.loads(lock.read_text()) == foreign  # a refused run leaves the lock as it was
  with caplog.at_level(logging.WARNING, logger="cotir_jax.train"):
    with workdir.lock(tmp_path, take_over=True):
      assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert "pid 4242 on host t1v-n-other-w-0" in caplog.text and "--take-over-lock" in caplog.text
  lock.write_text("")  # created, not yet written: another run is taking the lock right now
  with pytest.raises(WorkdirError, match="right now"):
    with workdir.lock(tmp_path):
      pass
  old = time.time() - 60  # still empty a minute later: its process died in between
  os.utime(lock, (old, old))
  with workdir.lock(tmp_path):
    assert json.loads(lock.read_text())["pid"] == os.getpid()


_TWO_PROCESSES = """
import sys
from cotir_jax.multihost import init_distributed
init_distributed(sys.argv[1], 2, int(sys.argv[2]), 120)
import jax
from cotir_jax.train import workdir
try:
  with workdir.lock(sys.argv[3], jax.process_index() == 0):
    print("locked")
except workdir.WorkdirError as e:
  print(f"refused: {e}")
"""


def test_every_process_of_a_multi_host_run_gets_the_lead_s_verdict(tmp_path):
  """Only process 0 reads the lock; the others learn its verdict (through the coordination
  service) and stop with the same line, instead of waiting in a collective for a process 0 that
  has exited."""
  foreign = {"host": "t1v-n-other-w-0", "pid": 4242, "started": "2026-01-02 03:04:05 UTC"}
  _lock_file(tmp_path).write_text(json.dumps(foreign))
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, f"localhost:{port}", str(i),
                             str(tmp_path)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, encoding="utf-8") for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
  for out, _ in outs:
    assert out.splitlines()[-1].startswith(f"refused: workdir {tmp_path} is in use by another "
                                           "training run (pid 4242 on host t1v-n-other-w-0")
  assert json.loads(_lock_file(tmp_path).read_text()) == foreign


def test_taking_over_yields_to_a_run_that_took_the_lock_first(tmp_path):
  """Two runs judged the same lock stale; the first already replaced it: the second must put
  that fresh lock back and stop, not delete it."""
  lock = _lock_file(tmp_path)
  fresh = json.dumps({"host": "h", "pid": 7, "started": "2026-01-02 03:04:05 UTC"})
  lock.write_text(fresh)
  with pytest.raises(WorkdirError, match="pid 7 on host h"):
    workdir._remove_stale(str(tmp_path), str(lock), '{"the": "stale lock read earlier"}')
  assert lock.read_text() == fresh and os.listdir(tmp_path) == [workdir.LOCK_NAME]


def test_free_space_check(tmp_path):
  assert workdir.check(tmp_path, 1) > 0
  assert os.listdir(tmp_path) == []  # the probe file is gone
  free = shutil.disk_usage(tmp_path).free
  with pytest.raises(WorkdirError, match=r"free but one checkpoint takes about .* room for two"):
    workdir.check(tmp_path, free)
  assert checkpoint.estimate_nbytes({"w": jnp.zeros((3, 4)), "b": jax.ShapeDtypeStruct(
      (5,), jnp.bfloat16), "rng": jax.random.key(0)}) == 48 + 10 + 8


# ------------------------------------------------------------------------------ config on resume

TINY = os.path.join(REPO, "configs", "tiny.py")


def test_resume_config_check_reads_only_the_stored_config(tmp_path):
  cfg = config.load(TINY)
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ck:
    ck.save(3, {"w": jnp.ones((4,))}, config=cfg)
  meta = checkpoint.latest_meta(tmp_path)  # the meta item's file alone: no state, no manager
  assert meta["step"] == 3 and checkpoint.check_config(meta, cfg) == []
  allowed = checkpoint.check_config(meta, config.load(TINY, [
      "training.learning_rate=1e-4", "training.iterations=(50,150)", "mesh.fsdp=2",
      "model.remat_policy=full", "data.data_dir=/elsewhere"]))
  assert [c.field for c in allowed] == ["data.data_dir", "mesh.fsdp", "model.remat_policy",
                                        "training.iterations", "training.learning_rate"]
  assert str(allowed[-1]) == "training.learning_rate: 0.002 → 0.0001"
  with pytest.raises(checkpoint.IncompatibleConfigError) as e:
    checkpoint.check_config(meta, config.load(TINY, [
        "model.hidden_size=256", "model.num_heads=8", "model.lora.rank=4", "compat=upstream",
        "training.learning_rate=1e-4"]))
  lines = str(e.value).splitlines()
  assert f"checkpoint at step 3 in {ck.directory}" in lines[0]
  assert lines[1:] == ['  compat: "default" → "upstream"',
                       '  model.compat: "default" → "upstream"',
                       "  model.cot_adapter.hidden_size: 128 → 256",
                       "  model.cot_adapter.num_heads: 4 → 8",
                       "  model.hidden_size: 128 → 256",
                       "  model.lora.rank: 32 → 4",
                       "  model.num_heads: 4 → 8"]
  # a field the checkpoint's config does not have (the schema grew since) is not a mismatch
  breaking, allowed = checkpoint.config_changes({"model": {"depth": 2}}, {"model": {"depth": 2,
                                                                                   "new": 1}})
  assert breaking == [] and [str(c) for c in allowed] == ["model.new: (absent) → 1"]


# ------------------------------------------------------------------------------ failed writes

@contextlib.contextmanager
def _file_size_limit(nbytes):
  """No file of this process grows past `nbytes` while inside: writes fail with EFBIG (and no
  SIGXFSZ kill), in Orbax's background threads too — a real failed write, even as root."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old)


def test_failed_checkpoint_writes_name_the_last_complete_one(tmp_path):
  state = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(1024, 1024)), jnp.float32),
           "step": jnp.int32(1)}
  ck = checkpoint.Checkpointer(tmp_path, max_to_keep=1)
  ck.save(1, state, config={"seed": 0})
  ck.wait()
  want = (f"could not be written to {ck.directory} (File too large); the last complete "
          "checkpoint is step 1; free space or fix the directory's permissions, then re-run the "
          "same command to resume from it")
  with _file_size_limit(2**20):  # the 4 MiB array cannot be written; the JSON item can
    assert ck.save(2, state)     # asynchronous: the write fails in Orbax's thread ...
    with pytest.raises(checkpoint.CheckpointWriteError) as e:
      ck.save(3, state)          # ... and surfaces at the next save, naming its step
    assert str(e.value) == "checkpoint of step 2 " + want
    ck.save(3, state)
    deadline = time.time() + 60
    with pytest.raises(checkpoint.CheckpointWriteError) as e:
      while time.time() < deadline:  # polled without blocking the training loop
        ck.check_for_errors()
        time.sleep(0.05)
    assert str(e.value) == "checkpoint of step 3 " + want
    ck.save(4, state)
    with pytest.raises(checkpoint.CheckpointWriteError) as e:
      ck.close()                 # or when the run ends
    assert str(e.value) == "checkpoint of step 4 " + want
  ck = checkpoint.Checkpointer(tmp_path, max_to_keep=1)
  assert ck.all_steps() == [1]  # retention never deleted the last complete checkpoint
  np.testing.assert_array_equal(ck.restore(state)["state"]["w"], state["w"])
  ck.close()


def test_write_failures_are_recognised():
  reason = checkpoint._write_failure_reason
  assert reason(ValueError('RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/3.orbax-'
                           'checkpoint-tmp/state/d/1f": No space left on device')) is not None
  assert reason(OSError(errno.EROFS, "Read-only file system")) == os.strerror(errno.EROFS)
  assert reason(ValueError("Error writing ... [os_error_code='28']")) == os.strerror(errno.ENOSPC)
  assert reason(ValueError("User-provided restore item and on-disk value metadata tree "
                           "structures do not match")) is None


# ------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def locked_run(tmp_path_factory):
  """test_train's short run (its compile cache is reused); while it holds the workdir's lock it
  is paused (SIGSTOP) and a second trainer is started on the same workdir."""
  path = tmp_path_factory.mktemp("locked")
  first = subprocess.Popen(_cmd(path, *SHORT), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  lock = _lock_file(path)
  _wait_for(lambda: lock.exists() and lock.read_text().endswith("}"), first)
  first.send_signal(signal.SIGSTOP)
  try:
    holder = json.loads(lock.read_text())
    second = subprocess.run(_cmd(path, *SHORT), cwd=REPO, env=_env(), capture_output=True,
                            encoding="utf-8", timeout=300)
  finally:
    first.send_signal(signal.SIGCONT)
  _, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-3000:]
  return SimpleNamespace(workdir=path, holder=holder, second=second)


def _said(proc) -> list[str]:
  """What the trainer itself printed to stderr (the platform's start-up noise left out)."""
  return [line for line in proc.stderr.splitlines() if line.startswith("cotir_jax")]


def test_second_trainer_exits_at_once_naming_the_holder(locked_run):
  h, second = locked_run.holder, locked_run.second
  assert second.returncode == 2 and second.stdout == ""  # nothing built, no start-up summary
  assert _said(second) == [
      f"cotir_jax: error: workdir {locked_run.workdir} is in use by another training run (pid "
      f"{h['pid']} on host {h['host']}, started {h['started']}); wait for it to finish or stop it"]
  # the first run went on undisturbed and released the lock when it finished
  assert not _lock_file(locked_run.workdir).exists()
  assert sorted(os.listdir(locked_run.workdir / "checkpoints")) == ["4", "8"]


def test_resume_with_a_changed_width_lists_the_fields(locked_run):
  proc = subprocess.run(_cmd(locked_run.workdir, *SHORT, "--config.model.hidden_size=256",
                             "--config.model.num_heads=8"), cwd=REPO, env=_env(),
                        capture_output=True, encoding="utf-8", timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  ckpt_dir = locked_run.workdir / "checkpoints"
  assert proc.stderr.split("cotir_jax: error: ", 1)[1].splitlines() == [
      f"the config changes fields that define the checkpoint at step 8 in {ckpt_dir}; resume "
      "with the checkpoint's values or start a new --workdir:",
      "  model.cot_adapter.hidden_size: 128 → 256", "  model.cot_adapter.num_heads: 4 → 8",
      "  model.hidden_size: 128 → 256", "  model.num_heads: 4 → 8"]


_CHECK_THEN_TRAIN = """
import sys
from cotir_jax.train import workdir
from cotir_jax.train.__main__ import main
try:
  workdir.check(sys.argv[1], 1)
except workdir.WorkdirError as e:
  print(f"cotir_jax: check: {e}", file=sys.stderr)
sys.exit(main(["--config", "configs/tiny.py", "--workdir", *sys.argv[1:]]))
"""


def _read_only(path):
  """(command prefix, undo) that run a command with `path` read-only: chmod 0555 as a normal
  user; as root, which chmod does not stop, a read-only bind mount in a private user and mount
  namespace (unshare)."""
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    return [], lambda: os.chmod(path, 0o755)
  if shutil.which("unshare") and subprocess.run(["unshare", "-rm", "true"]).returncode == 0:
    return ["unshare", "-rm", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"',
            str(path)], lambda: None
  pytest.skip("running as root without user namespaces (unshare -rm): no way to make a directory "
              "read-only for this process")


def test_read_only_workdir_fails_in_one_line_and_keeps_the_checkpoint(locked_run):
  path = locked_run.workdir
  before = _flat(_params(path, 8))
  prefix, undo = _read_only(path)
  try:
    proc = subprocess.run(prefix + [sys.executable, "-c", _CHECK_THEN_TRAIN, str(path), *SHORT],
                          cwd=REPO, env=_env(), capture_output=True, encoding="utf-8",
                          timeout=300)
  finally:
    undo()
  reason = os.strerror(errno.EACCES if prefix == [] else errno.EROFS)
  line = (f"workdir {path} is not writable ({reason}); point --workdir at a writable directory "
          "or fix its permissions")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert _said(proc) == [f"cotir_jax: check: {line}", f"cotir_jax: error: {line}"]
  after = _flat(_params(path, 8))
  for k in before:
    np.testing.assert_array_equal(after[k], before[k])
  assert checkpoint.Checkpointer(path).latest_step() == 8
