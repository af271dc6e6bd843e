"""`python -m cotir_jax.train` and `restore` on paired data built at test time: a CDD-11 split
trained without CoT answers (λ stays exactly 0) and restored per type with its references; an
`hq/` + `lq/` manifest with some answers (λ_k moves only on steps whose batch has answer k),
resumed exactly from a checkpoint. The runs have SHORT's program: one compile per test session."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cotir_jax import restore
from data_helpers import paired_fixture
from test_train import REPO, SHORT, _env, _flat, _metrics, _params, _run

STEPS = ["--num_steps", "2", "--batch_size", "2"]  # with 100x75 images: test_restore's program
NO_VALIDATION = ["--config.training.val_steps=0"]  # SHORT's step program all the same


@pytest.fixture(scope="module")
def cdd11(tmp_path_factory):
  """A CDD-11 split trained with data.cot_answers=none (plain flow-matching fine-tuning)."""
  root = paired_fixture(tmp_path_factory.mktemp("cdd11") / "train", size=100, height=75)
  workdir = tmp_path_factory.mktemp("run") / "cdd11"
  proc = _run(workdir, *SHORT, *NO_VALIDATION, "--config.data.source=paired",
              f"--config.data.data_dir={root}", "--config.data.cot_answers=none")
  return root, workdir, proc


def test_trains_on_a_cdd11_split_without_cot_answers(cdd11):
  root, workdir, proc = cdd11
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("cotir_jax: data: ")]
  assert lines[0] == f"cotir_jax: data: 15 pairs of 5 types (CDD-11 layout at {root}); data.cot_answers=none"
  assert "cotir_jax: data: scene term masked: no scene descriptions (data.cot_answers=none)" in lines
  rows = _metrics(workdir)
  assert [r["step"] for r in rows] == list(range(8))
  for r in rows:
    assert all(r[key] == 0 for n in "sdp" for key in (f"lambda_{n}", f"c_{n}", f"answers_{n}",
                                                        f"txt_{n}_loss")), r
    assert r["loss"] == r["img_loss"] and np.isfinite(r["loss"])


def test_restores_every_type_folder_with_its_references(cdd11, tmp_path):
  """restored/<type>/<name>.png for every degraded image, reference/<name>.png once per clean
  image: every result has its reference under the same name, as evaluate pairs them."""
  root, workdir, _ = cdd11
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "cotir_jax.restore", "--config", "configs/tiny.py",
                         "--weights", str(workdir), "--input", str(root), "--out", str(out), *STEPS],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "restored 15 image(s)" in proc.stdout and "1 compile(s)" in proc.stdout
  types = sorted(d.name for d in root.iterdir() if d.name != "clear")
  assert sorted(os.listdir(out / "restored")) == types
  for t in types:
    assert sorted(os.listdir(out / "restored" / t)) == ["000.png", "001.png", "002.png"]
  assert sorted(os.listdir(out / "reference")) == ["000.png", "001.png", "002.png"]
  for name in ("000.png", "002.png"):
    np.testing.assert_array_equal(np.asarray(Image.open(out / "reference" / name)),
                                  np.asarray(Image.open(root / "clear" / name)))
    assert Image.open(out / "restored" / "low_haze_rain" / name).size == (100, 75)


def test_restore_jobs_of_an_hq_lq_folder_and_a_manifest(tmp_path):
  root = paired_fixture(tmp_path / "set", "hq_lq", types={"rain": ["rain"]}, n=2)
  shutil.copy(root / "lq" / "rain" / "000.png", root / "lq" / "000.png")  # untyped: restored/000.png
  jobs, skipped = restore.collect_jobs(str(root), "o", prompt=None, default_prompt="Fix it.")
  assert [(j.out, j.reference and j.reference[1], j.prompt) for j in jobs] == [
      ("o/restored/000.png", "o/reference/000.png", "Fix it."),
      ("o/restored/rain/000.png", None, "Fix it."),
      ("o/restored/rain/001.png", "o/reference/001.png", "Fix it.")] and skipped == []
  (root / "pairs.jsonl").write_text(json.dumps({"lq": "lq/rain/001.png", "hq": "hq/001.png", "type": "rain",
                                                "prompt": "Derain."}) + "\n")
  jobs, _ = restore.collect_jobs(str(root / "pairs.jsonl"), "o", prompt="Remove rain.", default_prompt="x")
  assert [(j.out, j.prompt) for j in jobs] == [("o/restored/rain/001.png", "Remove rain.")]


@pytest.fixture(scope="module")
def manifest_set(tmp_path_factory):
  """hq/ + lq/<type>/ and a manifest naming a scene for one pair, the rest from the templates."""
  types = {"rain": ["rain"], "haze": ["haze"], "noise": ["noise"]}
  root = paired_fixture(tmp_path_factory.mktemp("pairs") / "set", "hq_lq", types=types, n=4)
  lines = []
  for t in types:
    for i in range(4):
      entry = {"lq": f"lq/{t}/{i:03d}.png", "hq": f"hq/{i:03d}.png", "type": t}
      if (t, i) == ("rain", 0):
        entry["scene"] = "A photograph."
      lines.append(entry)
  path = root / "pairs.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  return path


def test_manifest_with_answers_trains_and_resumes_exactly(manifest_set, tmp_path):
  workdir = tmp_path / "manifest"
  args = [*SHORT, *NO_VALIDATION, "--config.data.source=paired", f"--config.data.data_dir={manifest_set}"]
  proc = _run(workdir, *args)
  assert "cotir_jax: data: scene term: 1 of 12 pairs have scene descriptions; the others are masked in it" \
      in proc.stdout
  rows = _metrics(workdir)
  assert all(r["answers_d"] == r["answers_p"] == 8 for r in rows)  # every pair has templates
  counts = [r["answers_s"] for r in rows]
  assert 0 in counts and max(counts) > 0
  for prev, r in zip(rows, rows[1:]):  # λ_s moves on steps with a scene answer only
    assert (r["lambda_s"] == prev["lambda_s"]) == (r["answers_s"] == 0), (r["step"], counts)
  final = _flat(_params(workdir, 8))
  shutil.rmtree(workdir / "checkpoints" / "8")  # resume from step 4
  _run(workdir, *args)
  assert [(r["step"], r["loss"], r["lambda_s"]) for r in _metrics(workdir)] == \
      [(r["step"], r["loss"], r["lambda_s"]) for r in rows]
  resumed = _flat(_params(workdir, 8))
  for k in final:
    np.testing.assert_array_equal(resumed[k], final[k], err_msg=k)
