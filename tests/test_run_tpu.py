"""run_tpu.sh against a fake `gcloud` that records every call (one JSON line each) and, for
`tpu-vm ssh` / `scp`, can play a worker: run the command under a temporary home with a fake
trainer, uv and gcsfuse, so train / stop / setup are checked by what they do, not only by text."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "run_tpu.sh")

# bash, not Python: it runs a few dozen times and must start fast.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
words=()
for word in "$@"; do
  word=${word//\\/\\\\} word=${word//\"/\\\"} word=${word//$'\n'/\\n} word=${word//$'\t'/\\t}
  words+=("\"$word\"")
done
(IFS=,; echo "[${words[*]}]") >>"$FAKE_GCLOUD_LOG"
[[ -n ${FAKE_WORKER_HOME:-} && "$1 $2 $3" == "compute tpus tpu-vm" ]] || exit 0
if [[ $4 == scp ]]; then
  cp "$5" "$FAKE_WORKER_HOME/${6#*:}"
elif [[ $4 == ssh ]]; then
  for word in "$@"; do [[ $word == --command=* ]] && command=${word#--command=}; done
  cd "$FAKE_WORKER_HOME" && HOME=$FAKE_WORKER_HOME exec bash -c "$command"
fi
"""

# Stands in for the worker venv's python: records how it was started, exits on SIGTERM as the
# trainer does after its checkpoint.
FAKE_TRAINER = """\
import json, os, signal, sys, time
out = os.path.join(os.environ["HOME"], "trainer")
def on_term(signum, frame):
  print("saved a checkpoint on SIGTERM", flush=True)
  open(out + ".sigterm", "w").close()
  sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
with open(out + ".tmp", "w") as f:
  json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "pid": os.getpid(), "sid": os.getsid(0),
             "unbuffered": os.environ.get("PYTHONUNBUFFERED")}, f)
os.replace(out + ".tmp", out + ".json")
time.sleep(30)
"""

RECORD = '#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "$HOME/{name}.calls"\n'
WHERE = ["--zone=us-west4-a", "--project=proj"]
OVERRIDES = ["--config.training.batch_sizes=[8, 4]", "--config.project_name=it's",
             "--config.model.lora.rank", "4"]
TRAIN_ARGS = ["--config", "configs/cotir_9b.py", "--workdir", "/gcs/runs/9b", *OVERRIDES]


def _executable(path, text):
  path.write_text(text)
  path.chmod(0o755)


@pytest.fixture
def tpu(tmp_path):
  """(run, calls, worker home): `run(*args)` runs run_tpu.sh with the fake gcloud first on PATH
  (`run.env`: its environment), `calls()` returns the gcloud calls made since the last look."""
  bin_dir, worker, log = tmp_path / "bin", tmp_path / "worker", tmp_path / "gcloud.jsonl"
  bin_dir.mkdir()
  _executable(bin_dir / "gcloud", FAKE_GCLOUD)
  _executable(bin_dir / "sudo", '#!/usr/bin/env bash\nexec "$@"\n')
  _executable(bin_dir / "gcsfuse", RECORD.format(name="gcsfuse"))
  (worker / ".local" / "bin").mkdir(parents=True)
  _executable(worker / ".local" / "bin" / "uv", RECORD.format(name="uv"))
  base = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
          "FAKE_GCLOUD_LOG": str(log), "TPU_NAME": "cotir", "ZONE": "us-west4-a",
          "PROJECT": "proj", "MOUNT": str(tmp_path / "gcs")}

  def run(*args, script=SCRIPT, on_worker=False, rc=0, **env):
    """run_tpu.sh ARGS with the fixture's environment updated by env (None removes a name)."""
    env = {**base, **({"FAKE_WORKER_HOME": str(worker)} if on_worker else {}), **env}
    env = {k: v for k, v in env.items() if v is not None}
    r = subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == rc, (r.returncode, r.stdout, r.stderr)
    return r

  def calls():
    if not log.exists():
      return []
    lines = log.read_text().splitlines()
    log.unlink()
    return [json.loads(line) for line in lines]

  run.env = base
  yield run, calls, worker
  record = worker / "trainer.json"
  if record.exists() and not (worker / "trainer.sigterm").exists():
    try:
      os.kill(json.loads(record.read_text())["pid"], signal.SIGKILL)
    except ProcessLookupError:
      pass


def _ssh(call, worker="all"):
  """The shell command of a recorded `tpu-vm ssh` call, after checking its target."""
  assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "cotir"], call
  assert call[5:8] == [*WHERE, f"--worker={worker}"], call
  assert call[8].startswith("--command=bash -c "), call
  return call[8]


def test_help_and_missing_settings(tpu):
  run, calls, _ = tpu
  text = run("--help").stdout
  for word in ("create", "status", "setup", "train", "tail", "stop", "exec", "delete", "--dry-run",
               "TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "PROVISIONING",
               "BUCKET", "v5e v2-alpha-tpuv5-lite", "v5p v2-alpha-tpuv5,", "v6e v2-alpha-tpuv6e"):
    assert word in text, word
  for args, env, message in [
      (["status"], {"ZONE": None}, "status needs ZONE: export ZONE=... or pass --zone"),
      (["stop"], {"TPU_NAME": ""}, "stop needs TPU_NAME: export TPU_NAME=... or pass --name"),
      (["create"], {}, "create needs ACCELERATOR_TYPE"),
      (["create"], {"ACCELERATOR_TYPE": "v5e-16"}, "v5e slices are called v5litepod-N"),
      (["create"], {"ACCELERATOR_TYPE": "v6e-8", "PROVISIONING": "cheap"},
       "PROVISIONING=cheap: expected spot, reserved or on-demand"),
      (["train", "--config", "c.py"], {}, "train needs --workdir DIR with an absolute DIR"),
      (["train", "--workdir=runs/x"], {}, "(got 'runs/x')"),
      (["--bogus", "1", "status"], {}, "unknown option --bogus"),
      (["launch"], {}, "unknown command 'launch'")]:
    assert message in run(*args, rc=2, **env).stderr, (args, env)
  assert calls() == []


@pytest.mark.parametrize("accelerator, provisioning, runtime, flags", [
    ("v5litepod-16", None, "v2-alpha-tpuv5-lite", ["--spot"]),
    ("v5p-8", "reserved", "v2-alpha-tpuv5", ["--reserved"]),
    ("v6e-8", "on-demand", "v2-alpha-tpuv6e", []),
])
def test_create(tpu, accelerator, provisioning, runtime, flags):
  run, calls, _ = tpu
  run("create", "--description=cotir", ACCELERATOR_TYPE=accelerator, PROVISIONING=provisioning)
  assert calls() == [["compute", "tpus", "queued-resources", "create", "cotir", "--node-id=cotir",
                      *WHERE, f"--accelerator-type={accelerator}", f"--runtime-version={runtime}",
                      *flags, "--description=cotir"]]


def test_options_status_delete_tail(tpu):
  run, calls, _ = tpu
  run("--name", "other", "--zone=europe-west4-b", "--runtime-version", "v2-alpha-tpuv6e",
      "--accelerator-type=v6e-8", "create", PROJECT="", TPU_NAME=None, ZONE=None)
  run("status")
  run("delete")
  run("tail", "1")
  run("tail", "x", rc=2)
  got = calls()
  assert got[0] == ["compute", "tpus", "queued-resources", "create", "other", "--node-id=other",
                    "--zone=europe-west4-b", "--accelerator-type=v6e-8",
                    "--runtime-version=v2-alpha-tpuv6e", "--spot"]
  assert got[1] == ["compute", "tpus", "queued-resources", "describe", "cotir", *WHERE]
  assert got[2] == ["compute", "tpus", "queued-resources", "delete", "cotir", *WHERE, "--force"]
  assert 'tail -n 100 -F "$log"' in _ssh(got[3], worker="1")
  assert len(got) == 4


def test_train_detaches_and_stop_sends_sigterm(tpu):
  """train starts the trainer with --distributed and the overrides verbatim in its own session
  (it outlives the ssh command); a second train refuses; stop SIGTERMs it and waits."""
  run, calls, worker = tpu
  (worker / "cotir_jax_venv" / "bin").mkdir(parents=True)
  _executable(worker / "cotir_jax_venv" / "bin" / "python", f"#!{sys.executable}\n{FAKE_TRAINER}")
  (worker / "cotir_jax").mkdir()
  assert "trainer started" in run("train", *TRAIN_ARGS, on_worker=True).stdout
  record = worker / "trainer.json"
  deadline = time.monotonic() + 20
  while not record.exists():
    assert time.monotonic() < deadline, "the trainer did not start"
    time.sleep(0.05)
  started = json.loads(record.read_text())
  assert started["argv"] == ["-m", "cotir_jax.train", "--distributed", *TRAIN_ARGS]
  assert started["cwd"] == str(worker / "cotir_jax")
  assert started["sid"] == started["pid"] and started["unbuffered"] == "1"
  assert (worker / "cotir_jax_train.pid").read_text().strip() == str(started["pid"])
  assert "already running" in run("train", *TRAIN_ARGS, on_worker=True, rc=1).stderr

  stopped = run("stop", on_worker=True).stdout
  assert (worker / "trainer.sigterm").exists()
  assert "trainer exited" in stopped and "saved a checkpoint on SIGTERM" in stopped
  assert "no trainer running" in run("stop", on_worker=True).stdout
  log = (worker / "cotir_jax_train.log").read_text()
  assert "python -m cotir_jax.train --distributed --config configs/cotir_9b.py" in log
  got = calls()
  assert len(got) == 4
  assert "cotir_jax.train --distributed" in _ssh(got[0])
  assert "kill -TERM" in _ssh(got[2])


def test_setup_copies_checkout_installs_and_mounts(tpu, tmp_path):
  """setup packs the git checkout's tracked and untracked-but-not-ignored files, unpacks them
  on the worker (replacing the old copy), installs with uv and mounts the bucket."""
  run, calls, worker = tpu
  repo = tmp_path / "repo"
  (repo / "cotir_jax").mkdir(parents=True)
  (repo / "runs").mkdir()
  shutil.copy(SCRIPT, repo / "run_tpu.sh")
  for name, text in [("pyproject.toml", "[project]\n"), ("cotir_jax/__init__.py", ""),
                     ("runs/metrics.jsonl", "{}\n"), (".gitignore", "/runs/\n"),
                     ("name with space.txt", "x")]:
    (repo / name).write_text(text)
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  (worker / "cotir_jax").mkdir()
  (worker / "cotir_jax" / "stale.py").write_text("")
  run("setup", script=str(repo / "run_tpu.sh"), on_worker=True, BUCKET="gs://my-bucket")

  got = calls()
  assert got[0][:4] == ["compute", "tpus", "tpu-vm", "scp"]
  assert got[0][5:] == ["cotir:cotir_jax_src.tar.gz", "--worker=all", *WHERE]
  assert not os.path.exists(got[0][4]), "the local tarball is left behind"
  assert "gcsfuse" in _ssh(got[1]) and "uv pip install" in _ssh(got[2]) and len(got) == 3
  unpacked = sorted(str(p.relative_to(worker / "cotir_jax")) for p in
                    (worker / "cotir_jax").rglob("*") if p.is_file())
  assert unpacked == [".gitignore", "cotir_jax/__init__.py", "name with space.txt",
                      "pyproject.toml", "run_tpu.sh"]
  assert not (worker / "cotir_jax_src.tar.gz").exists()
  venv, checkout = worker / "cotir_jax_venv", worker / "cotir_jax"
  assert (worker / "uv.calls").read_text().splitlines() == [
      f"venv --allow-existing --python 3.11 {venv}",
      f"pip install --python {venv}/bin/python -e {checkout}[tpu]"]
  mount = tmp_path / "gcs"
  assert (worker / "gcsfuse.calls").read_text().splitlines() == [
      f"--implicit-dirs --rename-dir-limit=1000000 my-bucket {mount}"]
  assert mount.is_dir()


def test_dry_run_prints_the_commands_it_would_run(tpu):
  """The printed text, run by a shell, makes exactly the gcloud calls the real command makes."""
  run, calls, _ = tpu
  env = {"ACCELERATOR_TYPE": "v5litepod-16", "REMOTE_DIR": "my dir"}
  for args in (["create"], ["train", *TRAIN_ARGS], ["tail", "1"], ["stop"], ["exec", "ls", "/gcs"],
               ["delete"]):
    run(*args, **env)
    real = calls()
    printed = run("--dry-run", *args, **env).stdout
    assert calls() == [] and printed.startswith("gcloud compute tpus "), (args, printed)
    subprocess.run(["bash", "-c", printed], check=True, env=run.env)
    assert calls() == real, args
  printed = run("--dry-run", "setup", BUCKET="b").stdout.splitlines()
  assert printed[0].startswith("# pack the") and calls() == []
  assert [line.split()[:5] for line in printed[1:] if line.startswith("gcloud")] == [
      ["gcloud", "compute", "tpus", "tpu-vm", "scp"]] + 2 * [
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
