"""`python -m cotir_jax.restore` after a short tiny training run: a directory of odd sizes and
modes (one compile per size bucket, bad files reported and skipped), upstream lora.pt +
cot_adapter.pt giving the Orbax checkpoint's results, a CoTIR-Bench layout scored by
`python -m cotir_jax.evaluate`; and the host-side pieces (torch-exact bicubic, buckets, modes,
the test JSONL)."""

import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cotir_jax import convert, restore
from cotir_jax.sample import resize_bicubic
from data_helpers import _add, _meta, _png
from test_multiprocess import launch, spawned  # noqa: F401 (a fixture)
from test_train import FOUR, SHORT, _env  # the same persistent compile cache: this run is test_train's

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["--num_steps", "2", "--batch_size", "2"]


def _run(module, *args, config=True, devices=1):
  cmd = [sys.executable, "-m", module] + (["--config", "configs/tiny.py"] if config else [])
  proc = subprocess.run(cmd + list(args), cwd=REPO, env=_env(devices), capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  w = tmp_path_factory.mktemp("tiny")
  _run("cotir_jax.train", "--workdir", str(w), *SHORT)
  return w


# name → (array or bytes); sizes are PIL's (width, height)
def _odd_images(rng):
  gray16 = rng.integers(0, 65536, (72, 100)).astype(np.uint16)
  return {
      "a_rgb.png": Image.fromarray(rng.integers(0, 256, (75, 100, 3), np.uint8)),
      "b_gray.jpg": Image.fromarray(rng.integers(0, 256, (70, 98), np.uint8)),
      "c_rgba.png": Image.fromarray(rng.integers(0, 256, (66, 100, 4), np.uint8), "RGBA"),
      "d_palette.png": Image.fromarray(rng.integers(0, 256, (517, 333, 3), np.uint8)).convert("P"),
      "e_gray16.png": Image.fromarray(gray16),
  }


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("odd")
  images = _odd_images(np.random.default_rng(0))
  for name, im in images.items():
    im.save(d / name)
  (d / "f_corrupt.png").write_bytes(b"not an image")
  data = (d / "a_rgb.png").read_bytes()
  (d / "g_truncated.png").write_bytes(data[:len(data) // 2])
  (d / "notes.txt").write_text("not an image suffix: ignored")
  return d, {os.path.splitext(n)[0]: im.size for n, im in images.items()}


@pytest.fixture(scope="module")
def from_workdir(workdir, odd_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("restored")
  proc = _run("cotir_jax.restore", "--weights", str(workdir), "--input", str(odd_dir[0]),
              "--out", str(out), *STEPS)
  return out, proc


def test_restores_every_size_and_mode_once_per_bucket(odd_dir, from_workdir):
  src, sizes = odd_dir
  out, proc = from_workdir
  assert sorted(os.listdir(out)) == sorted(f"{stem}.png" for stem in sizes)
  for stem, size in sizes.items():
    with Image.open(out / f"{stem}.png") as im:
      assert im.size == size and im.mode == "RGB", stem
      assert np.asarray(im).std() > 0
  for bad in ("f_corrupt.png", "g_truncated.png"):
    assert re.search(rf"skipped {re.escape(str(src / bad))}: \w+", proc.stderr), proc.stderr[-2000:]
  assert "restore:" in proc.stderr  # the progress bar
  # 100x75, 98x70, 100x66 and 100x72 work at 96x64 (one bucket), 333x517 at 320x512
  assert "restored 5 image(s)" in proc.stdout and "skipped 2;" in proc.stdout
  assert "2 size bucket(s), 2 compile(s)" in proc.stdout, proc.stdout


def test_upstream_files_give_the_orbax_checkpoint_results(workdir, odd_dir, from_workdir,
                                                          tmp_path):
  """lora.pt + cot_adapter.pt exported from the training checkpoint (float32, upstream names)
  restore exactly what the checkpoint itself restores."""
  files = convert.orbax_to_cotir(str(workdir), str(tmp_path / "export"), "pt", dtype=None)
  out = tmp_path / "from_pt"
  _run("cotir_jax.restore", "--weights", files["lora"], files["cot_adapter"],
       "--input", str(odd_dir[0]), "--out", str(out), *STEPS)
  expected = from_workdir[0]
  assert sorted(os.listdir(out)) == sorted(os.listdir(expected))
  for name in os.listdir(out):
    np.testing.assert_array_equal(np.asarray(Image.open(out / name)),
                                  np.asarray(Image.open(expected / name)), err_msg=name)


def test_bench_layout_then_evaluate(workdir, tmp_path):
  """The README's tiny end-to-end path on a two-sample CoTIR-Bench layout: restore the LQ
  images, the HQ ones land as references, and the evaluate command scores them."""
  rng = np.random.default_rng(1)
  (tmp_path / "bench" / "image" / "noise").mkdir(parents=True)
  hq = {}
  with tarfile.open(tmp_path / "bench" / "image" / "noise" / "noise-000000.tar", "w") as tar:
    for key in ("noise_000000", "noise_000001"):
      hq[key] = rng.integers(0, 256, (75, 100, 3), np.uint8)
      _add(tar, f"{key}.hq.png", _png(hq[key]))
      _add(tar, f"{key}.lq.png", _png(rng.integers(0, 256, (75, 100, 3), np.uint8)))
      _add(tar, f"{key}.meta.json", _meta())
  out = tmp_path / "out"
  _run("cotir_jax.restore", "--weights", str(workdir), "--input", str(tmp_path / "bench"),
       "--out", str(out), *STEPS, "--config.data.index_cache_dir=")
  for key, image in hq.items():
    np.testing.assert_array_equal(np.asarray(Image.open(out / "reference" / f"{key}.png")), image)
    assert Image.open(out / "restored" / f"{key}.png").size == (100, 75)
  proc = _run("cotir_jax.evaluate", "--results", str(out / "restored"), "--reference",
              str(out / "reference"), "--metrics", "psnr,ssim", config=False)
  assert (out / "restored" / "metrics_summary.txt").is_file(), proc.stdout


def test_two_hosts_restore_what_one_does(workdir, tmp_path, spawned):
  """`--distributed` on 2 processes × 2 devices: the base sharded over all 4 (fsdp 2), each
  process loading and writing the images its devices hold; the files are 1 process × 4
  devices' byte for byte (5 images: a full batch of 4, then 1 with 3 blank rows)."""
  rng = np.random.default_rng(2)
  (tmp_path / "in").mkdir()
  for i in range(5):
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), np.uint8)).save(tmp_path / "in" / f"{i}.png")
  args = ["--config", "configs/tiny.py", "--weights", str(workdir), "--input",
          str(tmp_path / "in"), "--num_steps", "2", *FOUR]
  _run("cotir_jax.restore", *args[2:], "--out", str(tmp_path / "one"), devices=4)
  procs = launch("cotir_jax.restore", [*args, "--out", str(tmp_path / "two")], tmp_path / "two")
  spawned += procs
  for i, p in enumerate(procs):
    assert p.wait(timeout=900) == 0, (tmp_path / f"two.{i}.log").read_text()[-3000:]
  assert "restored 5 image(s)" in (tmp_path / "two.0.log").read_text()
  names = sorted(os.listdir(tmp_path / "one"))
  assert names == [f"{i}.png" for i in range(5)] == sorted(os.listdir(tmp_path / "two"))
  for name in names:
    assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


# ----------------------------------------------------------------------------- host side

@pytest.mark.parametrize("src,dst", [((75, 100), (64, 96)), ((64, 96), (75, 100)),
                                     ((517, 333), (512, 320)), ((16, 16), (3, 40))])
def test_bicubic_is_torchs(src, dst):
  x = np.random.default_rng(0).uniform(-1, 1, (*src, 3)).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=dst, mode="bicubic",
                      align_corners=False)[0].permute(1, 2, 0).numpy()
  ours = resize_bicubic(x, *dst)
  assert float(np.abs(ours - ref).max() / np.abs(ref).max()) <= 2e-5


def test_work_sizes_and_buckets():
  assert restore.work_size(75, 100) == (64, 96) and restore.work_size(10, 517) == (16, 512)
  ladder = sorted({restore.bucket_side(n) for n in range(16, 2049, 16)})
  assert ladder[:9] == [16, 32, 48, 64, 80, 96, 112, 128, 160] and ladder[-1] == 2048
  assert all(restore.bucket_side(n) <= 1.25 * n for n in range(16, 4097, 16))
  assert restore.capped_size(4000, 3000, 1024) == (1024, 768)
  assert restore.capped_size(800, 600, 1024) == (800, 600)


def test_modes_become_rgb():
  gray16 = Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16))
  assert np.asarray(restore.to_rgb(gray16))[0, :, 0].tolist() == [0, 100, 255]
  rgba = Image.fromarray(np.full((2, 2, 4), 7, np.uint8), "RGBA")
  assert np.asarray(restore.to_rgb(rgba)).tolist() == np.full((2, 2, 3), 7).tolist()


def test_test_jsonl_gives_vague_and_precise_jobs(tmp_path):
  (tmp_path / "lq").mkdir()
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "lq" / "7.png")
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "lq" / "x.png")
  lines = [{"id": 7, "gen_prompt": "Make it clear.", "spe_prompt": "Remove the rain."},
           {"lq_path": "lq/x.png", "gen_prompt": "Fix it.", "spe_prompt": ""}, "{broken"]
  (tmp_path / "test.jsonl").write_text("\n".join(l if isinstance(l, str) else json.dumps(l)
                                                 for l in lines))
  jobs, skipped = restore.collect_jobs(str(tmp_path / "test.jsonl"), "out", prompt=None,
                                       default_prompt="unused")
  assert [(j.out, j.prompt, j.index) for j in jobs] == [
      ("out/vague/7.png", "Make it clear.", 1), ("out/precise/7.png", "Remove the rain.", 1),
      ("out/vague/x.png", "Fix it.", 2)]
  assert [reason for _, reason in skipped] == ["missing `spe_prompt`", skipped[1][1]]
  assert skipped[1][0].endswith("test.jsonl:3") and "not JSON" in skipped[1][1]
  with pytest.raises(restore.RestoreError, match="--prompt does not apply to a JSONL"):
    restore.collect_jobs(str(tmp_path / "test.jsonl"), "out", prompt="x", default_prompt="y")
