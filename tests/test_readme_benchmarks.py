"""The README's CDD-11 walk ("Benchmarks": check the protocol on the inputs, train, restore,
evaluate against the published table) run as written on a tiny set in CDD-11's layout, with the
substitutions the README itself names for a laptop: `configs/tiny.py` for `configs/cotir_4b.py`
without the 4B base's `model.pretrained`, and a short schedule (SHORT's program: no new
compile)."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from data_helpers import paired_fixture
from test_train import REPO, SHORT, _env

NO_VALIDATION = ["--config.training.val_steps=0"]
RESTORE_STEPS = ["--num_steps", "2", "--batch_size", "2"]  # test_restore's sampler program


def readme_commands(section: str) -> list[str]:
  """The ```bash blocks of a README section, one command per block (continuations joined)."""
  text = open(os.path.join(REPO, "README.md")).read()
  start = text.index(section)
  end = text.find("\n### ", start + len(section))
  blocks = re.findall(r"```bash\n(.*?)```", text[start:end], flags=re.S)
  return [" ".join(b.replace("\\\n", " ").split()) for b in blocks]


def laptop(command: str, root, runs) -> list[str]:
  """A README command for the tiny set: its paths under `root` / `runs`, the tiny config without
  the 4B base; training with a short schedule and restore with few sampler steps."""
  argv = [a for a in shlex.split(command) if not a.startswith("--config.model.pretrained=")]
  out = []
  for a in argv:
    a = a.replace("configs/cotir_4b.py", "configs/tiny.py")
    a = re.sub(r"^(--config\.data\.data_dir=)?CDD-11/", lambda m: (m.group(1) or "") + f"{root}/", a)
    a = re.sub(r"^(runs|out)/", lambda m: f"{runs}/{m.group(1)}/", a)
    out.append(a)
  assert out[:2] == ["python", "-m"], command
  module = out[2]
  out[0] = sys.executable
  extra = {"cotir_jax.train": [*SHORT, *NO_VALIDATION],
           "cotir_jax.restore": [*RESTORE_STEPS]}
  return out + extra.get(module, [])


@pytest.fixture(scope="module")
def cdd11_mini(tmp_path_factory):
  root = tmp_path_factory.mktemp("cdd11") / "CDD-11"
  paired_fixture(root / "train", size=100, height=75)
  paired_fixture(root / "test", size=100, height=75, seed=1)
  return root


def test_readme_cdd11_walk_runs_as_written(cdd11_mini, tmp_path):
  commands = readme_commands("### CDD-11")
  assert [shlex.split(c)[2] for c in commands] == [
      "cotir_jax.evaluate", "cotir_jax.train", "cotir_jax.restore", "cotir_jax.evaluate"]
  outputs = []
  for command in commands:
    argv = laptop(command, cdd11_mini, tmp_path)
    proc = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    outputs.append(proc.stdout)
  # 2. the unrestored inputs scored per type, with the published table beside them
  inputs_md = (cdd11_mini / "test" / "metrics_onerestore.md").read_text()
  assert "| low_haze_rain |" in inputs_md and "| clear |" not in inputs_md
  assert "Input (degraded, unrestored)" in outputs[0]
  # 3. trained: checkpoints of the short schedule
  assert sorted(os.listdir(tmp_path / "runs" / "cdd11" / "checkpoints")) == ["4", "8"]
  # 4. every type folder restored, the clear images as references
  restored = tmp_path / "out" / "restored"
  assert sorted(os.listdir(restored / "rain")) == ["000.png", "001.png", "002.png"]
  assert sorted(os.listdir(tmp_path / "out" / "reference")) == ["000.png", "001.png", "002.png"]
  # 5. the results scored with OneRestore's protocol and compared with the published rows
  table = (restored / "metrics_onerestore.md").read_text()
  for t in ("low", "haze", "rain", "low_haze_rain", "foggy_night"):
    assert f"| {t} |" in table, table
  assert "Input (degraded, unrestored)" in outputs[3] and "OneRestore" in outputs[3]
