"""The field's evaluation protocols (`cotir_jax.quality.PROTOCOLS`) against the libraries their
projects call, and `cotir_jax.evaluate`'s per-type tables, `--compare` and CLI errors.

References: scikit-image itself (OneRestore's and MoCE-IR's calls, with the dtypes they feed
it); torchmetrics' own LPIPS code and shipped VGG linear layers (MoCE-IR's call) with a
torchvision-layout VGG16 trunk of random weights built here, since torchvision does not import
beside the CPU torch build (see tests/test_quality.py) and its ImageNet weights cannot be
downloaded; BasicSR transcribed below in NumPy (installing basicsr pulls a CUDA torch and
torchvision).
"""

import csv
import importlib.util
import os
import sys
import types

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cotir_jax import evaluate, quality
from cotir_jax.convert import lpips as lpips_convert

pytestmark = pytest.mark.usefixtures("highest_precision")  # float32 parity

TOL = 1e-5  # relative, psnr and ssim
LPIPS_TOL = 2e-5  # float32 max|diff| / max|ref|
H, W = 72, 88


def _u8(a):
  return np.clip(np.round(a), 0, 255).astype(np.uint8)


def _pairs():
  """8-bit (result, reference) pairs: photographic crops with noise, haze, low light and blur,
  random noise against noise, and a flat bright region beside a dark one."""
  rng = np.random.default_rng(0)
  photos = [skdata.astronaut()[100:100 + H, 180:180 + W], skdata.chelsea()[60:60 + H, 150:150 + W],
            skdata.coffee()[150:150 + H, 200:200 + W]]
  pairs = []
  for p in photos:
    f = p.astype(np.float64)
    blur = sum(np.roll(np.roll(f, dy, 0), dx, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
    pairs += [(_u8(f + rng.normal(0, 10, f.shape)), p), (_u8(0.6 * f + 100), p),
              (_u8(0.25 * f), p), (_u8(blur), p)]
  pairs.append((rng.integers(0, 256, (H, W, 3), np.uint8), rng.integers(0, 256, (H, W, 3), np.uint8)))
  flat = np.full((H, W, 3), 250, np.uint8)
  half = flat.copy()
  half[:, : W // 2] = 3
  pairs += [(half, flat), (photos[0], photos[0])]  # identical: PSNR inf, SSIM 1
  return pairs


PAIRS = _pairs()
PHOTOS = slice(0, 12)  # the photographic pairs


def _batch(images, dtype=np.float32):
  return np.stack([i.astype(np.float64) / 255.0 for i in images]).astype(dtype)


def _rel(got, want):
  """max |got − want| / |want|; equal values (the inf PSNR of identical images) count 0."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  with np.errstate(invalid="ignore"):
    return float(np.max(np.where(got == want, 0.0, np.abs(got - want) / np.abs(want))))


def test_onerestore_and_moceir_match_skimage():
  x, ref = _batch([p[0] for p in PAIRS]), _batch([p[1] for p in PAIRS])
  x64, ref64 = _batch([p[0] for p in PAIRS], np.float64), _batch([p[1] for p in PAIRS], np.float64)
  got = {name: {m: np.asarray(jax.jit(getattr(quality.PROTOCOLS[name], m))(x, ref))
                for m in ("psnr", "ssim")} for name in ("onerestore", "moceir")}
  assert got["onerestore"]["psnr"].tolist() == got["moceir"]["psnr"].tolist()
  # OneRestore: cv2.imread(...) / 255.0 (float64), win_size=min(7, H, W), channel_axis=-1
  with np.errstate(divide="ignore"):  # identical images: skimage's inf, with a warning
    want_psnr = [peak_signal_noise_ratio(r, a, data_range=1.0) for a, r in zip(x64, ref64)]
  want_ssim = [structural_similarity(r, a, win_size=7, channel_axis=-1, data_range=1.0)
               for a, r in zip(x64, ref64)]
  assert _rel(got["onerestore"]["psnr"], want_psnr) <= TOL
  assert _rel(got["onerestore"]["ssim"], want_ssim) <= TOL
  # MoCE-IR: float32 tensors from ToTensor, gaussian_weights=True, channel_axis=2; skimage then
  # computes in float32 itself, so it is the reference on the photos (its own float32 error
  # reaches 1e-5 on the near-zero SSIM of pure noise) and float64 skimage on every pair
  for a, r, p, s in zip(x[PHOTOS], ref[PHOTOS], got["moceir"]["psnr"], got["moceir"]["ssim"]):
    assert _rel(p, peak_signal_noise_ratio(r, a, data_range=1)) <= TOL
    assert _rel(s, structural_similarity(r, a, channel_axis=2, gaussian_weights=True,
                                         data_range=1.0)) <= TOL
  want_gauss = [structural_similarity(r, a, channel_axis=2, gaussian_weights=True, data_range=1.0)
                for a, r in zip(x64, ref64)]
  assert _rel(got["moceir"]["ssim"], want_gauss) <= TOL
  # PromptIR's utils/val_utils.py: the OneRestore calls on float32 tensors
  want_f32 = [structural_similarity(r, a, channel_axis=-1, data_range=1)
              for a, r in zip(x[PHOTOS], ref[PHOTOS])]
  assert _rel(got["onerestore"]["ssim"][PHOTOS], want_f32) <= TOL
  assert got["onerestore"]["ssim"][-2] != got["moceir"]["ssim"][-2]  # the windows differ
  assert got["moceir"]["psnr"][-1] == np.inf and got["moceir"]["ssim"][-1] == 1.0


# ----------------------------------------------------------------------------- BasicSR
# A transcription of XPixelGroup/BasicSR basicsr/metrics/psnr_ssim.py (calculate_psnr,
# calculate_ssim, _ssim) and basicsr/metrics/metric_util.py (to_y_channel) with
# basicsr/utils/color_util.py (bgr2ycbcr y_only), inputs as BasicSR gets them: uint8, HWC, BGR.
# cv2.getGaussianKernel(11, 1.5) and cv2.filter2D(...)[5:-5, 5:-5] are written out as the
# normalised 1-D Gaussian and a float64 valid correlation (the kernel is symmetric).

def _basicsr_to_y(img):
  img = img.astype(np.float32) / 255.
  out = np.dot(img, [24.966, 128.553, 65.481]) + 16.0  # bgr2ycbcr(y_only=True)
  out /= 255.  # _convert_output_type_range(.., np.float32)
  return (out.astype(np.float32) * 255.)[..., None]


def _basicsr_crop(img, crop_border):
  return img[crop_border:-crop_border, crop_border:-crop_border, ...] if crop_border else img


def _basicsr_psnr(img, img2, crop_border):
  img, img2 = (_basicsr_to_y(_basicsr_crop(i, crop_border)).astype(np.float64) for i in (img, img2))
  mse = np.mean((img - img2) ** 2)
  return float("inf") if mse == 0 else 10. * np.log10(255. * 255. / mse)


def _basicsr_ssim_plane(img, img2):
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
  window = np.outer(g / g.sum(), g / g.sum())
  filt = lambda a: np.einsum("ijkl,kl->ij", np.lib.stride_tricks.sliding_window_view(a, (11, 11)),
                             window)
  mu1, mu2 = filt(img), filt(img2)
  sigma1_sq, sigma2_sq, sigma12 = filt(img ** 2) - mu1 ** 2, filt(img2 ** 2) - mu2 ** 2, \
      filt(img * img2) - mu1 * mu2
  ssim_map = (((2 * mu1 * mu2 + c1) * (2 * sigma12 + c2))
              / ((mu1 ** 2 + mu2 ** 2 + c1) * (sigma1_sq + sigma2_sq + c2)))
  return ssim_map.mean()


def _basicsr_ssim(img, img2, crop_border):
  img, img2 = (_basicsr_to_y(_basicsr_crop(i, crop_border)).astype(np.float64) for i in (img, img2))
  return np.mean([_basicsr_ssim_plane(img[..., i], img2[..., i]) for i in range(img.shape[2])])


@pytest.mark.parametrize("crop_border", [0, 4])
def test_y_channel_matches_basicsr(crop_border):
  x = np.stack([evaluate.crop(_batch([a])[0], crop_border) for a, _ in PAIRS])
  ref = np.stack([evaluate.crop(_batch([r])[0], crop_border) for _, r in PAIRS])
  protocol = quality.PROTOCOLS["y-channel"]
  got_psnr, got_ssim = jax.jit(protocol.psnr)(x, ref), jax.jit(protocol.ssim)(x, ref)
  bgr = lambda a: a[..., ::-1]  # cv2.imread's channel order, as BasicSR reads files
  assert _rel(got_psnr, [_basicsr_psnr(bgr(a), bgr(r), crop_border) for a, r in PAIRS]) <= TOL
  assert _rel(got_ssim, [_basicsr_ssim(bgr(a), bgr(r), crop_border) for a, r in PAIRS]) <= TOL


def test_crops_are_basicsr_and_moceir_crops():
  image = np.arange(37 * 53 * 3).reshape(37, 53, 3)
  # MoCE-IR src/utils/image_utils.py crop_img(image, base=16)
  h, w = image.shape[:2]
  ch, cw = h % 16, w % 16
  moceir = image[ch // 2:h - ch + ch // 2, cw // 2:w - cw + cw // 2, :]
  np.testing.assert_array_equal(evaluate.crop(image, multiple=16), moceir)
  np.testing.assert_array_equal(evaluate.crop(image, border=4), image[4:-4, 4:-4])
  np.testing.assert_array_equal(evaluate.crop(image, 2, 16), moceir[2:-2, 2:-2])


# ----------------------------------------------------------------------------- LPIPS-VGG

def _vgg16_features(seed):
  """torchvision's vgg16().features layout (config "D"), PyTorch's default init."""
  torch.manual_seed(seed)
  layers, cin = [], 3
  for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
    if v == "M":
      layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [torch.nn.Conv2d(cin, v, kernel_size=3, padding=1), torch.nn.ReLU(inplace=True)]
      cin = v
  return torch.nn.Sequential(*layers)


def _torchmetrics_lpips(monkeypatch):
  """torchmetrics' functional/image/lpips.py, the code behind its
  LearnedPerceptualImagePatchSimilarity, loaded on its own: the package's __init__ imports
  every domain (transformers, scipy.signal, ...) and takes longer than this test. Its one
  torchmetrics import, the torchvision check, is answered yes; the trunk comes from
  `_vgg16_features` instead of torchvision."""
  spec = importlib.util.find_spec("torchmetrics")
  if spec is None:
    pytest.fail("torchmetrics is a test dependency (pip install -e .[test])")
  imports = types.ModuleType("torchmetrics.utilities.imports")
  imports._TORCHVISION_AVAILABLE = True
  monkeypatch.setitem(sys.modules, "torchmetrics.utilities.imports", imports)
  path = os.path.join(next(iter(spec.submodule_search_locations)), "functional", "image",
                      "lpips.py")
  module_spec = importlib.util.spec_from_file_location("_torchmetrics_lpips", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def test_lpips_vgg_matches_torchmetrics(tmp_path, monkeypatch):
  """MoCE-IR's `LearnedPerceptualImagePatchSimilarity(net_type='vgg', normalize=True)`: its
  per-image value is torchmetrics' `_lpips_update(img1, img2, _NoTrainLpips(net='vgg'),
  normalize=True)`, run here with torchmetrics' shipped vgg.pth linear layers; only the
  ImageNet trunk is replaced by random weights in torchvision's layout."""
  tm = _torchmetrics_lpips(monkeypatch)
  features = _vgg16_features(0)
  monkeypatch.setattr(tm, "_get_tv_model_features", lambda net, pretrained: features)
  net = tm._NoTrainLpips(net="vgg")
  trunk = str(tmp_path / lpips_convert.VGG16_FILE)
  torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, trunk)
  lins = lpips_convert.default_locations("vgg")["lin"][-1]  # torchmetrics' own file
  assert lins.endswith(os.path.join("lpips_models", "vgg.pth")) and os.path.isfile(lins)
  model = lpips_convert.load_lpips(lins, trunk, **quality.PROTOCOLS["moceir"].lpips)

  pairs = [PAIRS[0], PAIRS[5], PAIRS[-1]]  # small: VGG16's FLOPs dominate the test's time
  x, ref = _batch([p[0] for p in pairs])[:, 8:24, 8:32], _batch([p[1] for p in pairs])[:, 8:24, 8:32]
  graphdef, state = nnx.split(model)
  got = np.asarray(jax.jit(lambda s, a, b: nnx.merge(graphdef, s)(a, b))(state, x, ref))
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]
  with torch.no_grad():  # MoCE-IR: one image at a time, calc_lpips(clean, restored)
    want = np.array([float(tm._lpips_update(nchw(r), nchw(a), net, normalize=True))
                     for a, r in zip(x, ref)])
  assert np.abs(got - want).max() / np.abs(want).max() <= LPIPS_TOL, (got, want)
  with pytest.raises(ValueError, match="at least 16"):
    model(x[:, :15], ref[:, :15])


# ----------------------------------------------------------------------------- the CLI

CDD11 = evaluate.BENCHMARKS["cdd11"].types


def _cdd11_layout(root, types=("haze", "low", "low_haze"), names=("001.png", "002.png")):
  """restore's output for a CDD-11 split: restored/<type>/<name>.png, reference/<name>.png;
  the last type lacks one image, so the mean over types and over images differ."""
  rng = np.random.default_rng(1)
  refs = {}
  (root / "reference").mkdir(parents=True)
  for i, name in enumerate(names):
    refs[name] = PAIRS[4 * (i % 3)][1][:40, :48]
    Image.fromarray(refs[name]).save(root / "reference" / name)
  results = {}
  for t_i, t in enumerate(types):
    (root / "restored" / t).mkdir(parents=True)
    for name in names[:len(names) - (t_i == len(types) - 1)]:
      noisy = _u8(refs[name].astype(float) + rng.normal(0, 6 + 4 * t_i, refs[name].shape))
      Image.fromarray(noisy).save(root / "restored" / t / name)
      results[t, name] = noisy
  return refs, results


def test_type_tables_and_compare(tmp_path, capsys):
  refs, results = _cdd11_layout(tmp_path)
  out = tmp_path / "restored"
  argv = ["--results", str(out), "--reference", str(tmp_path / "reference"),
          "--protocol", "onerestore", "--compare", "cdd11"]
  assert evaluate.main(argv) == 0
  printed = capsys.readouterr().out

  # per image: skimage as OneRestore calls it (no pair is identical: PSNR stays finite)
  want = {(t, n): (peak_signal_noise_ratio(refs[n] / 255.0, img / 255.0, data_range=1.0),
                   structural_similarity(refs[n] / 255.0, img / 255.0, win_size=7,
                                         channel_axis=-1, data_range=1.0))
          for (t, n), img in results.items()}
  with open(out / "metrics_onerestore_images.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["type"], r["name"]) for r in rows] == [  # CDD-11's type order, then names
      (t, n) for t in ("low", "haze", "low_haze") for n in ("001.png", "002.png")
      if (t, n) in results]
  for r in rows:
    assert _rel([float(r["psnr"]), float(r["ssim"])], want[r["type"], r["name"]]) <= TOL
  # per type, then the mean of the type means and the mean of all images
  per_type = {t: np.mean([v for (tt, _), v in want.items() if tt == t], axis=0)
              for t in ("low", "haze", "low_haze")}
  expected = [*((t, len([k for k in want if k[0] == t]), m) for t, m in per_type.items()),
              ("mean over types", 5, np.mean(list(per_type.values()), axis=0)),
              ("mean over images", 5, np.mean(list(want.values()), axis=0))]
  with open(out / "metrics_onerestore_types.csv") as f:
    table = list(csv.reader(f))
  assert table[0] == ["type", "images", "psnr", "ssim"]
  for row, (label, n, means) in zip(table[1:], expected, strict=True):
    assert row[:2] == [label, str(n)] and _rel([float(v) for v in row[2:]], means) <= TOL
  assert not np.allclose(expected[-1][2], expected[-2][2])

  md = (out / "metrics_onerestore.md").read_text()
  mean_types = expected[-2][2]
  assert f"| **mean over types** | 5 | {mean_types[0]:.2f} | {mean_types[1]:.4f} |" in md
  assert f"| **this run** | {mean_types[0]:.2f} | {mean_types[1]:.4f} | onerestore |" in md
  for method, psnr, ssim in (("AirNet", "23.75", "0.8140"), ("PromptIR", "25.90", "0.8499"),
                             ("OneRestore", "28.47", "0.8784"), ("MoCE-IR", "29.05", "0.881")):
    assert any(line.startswith(f"| {method} ") and f"| {psnr} | {ssim} |" in line
               for line in md.splitlines()), method
  assert "[1] OneRestore's README" in md and "cal_psnr_ssim.py" in md
  assert "[2] MoCE-IR's paper" in md and "UNVERIFIED" in md
  assert "missing: rain, snow" in md and "--protocol moceir" in md
  assert md.strip() in printed


def test_raw_cdd11_split_and_y_channel_crop(tmp_path, capsys):
  """A CDD-11 split as it is downloaded (clear/ beside the type folders) scores the degraded
  inputs; the reference folder inside --results is not a type. y-channel with --crop_border
  equals BasicSR's numbers."""
  split = tmp_path / "test"
  refs, results = _cdd11_layout(split, types=CDD11, names=("001.png",))
  (split / "reference").rename(split / "clear")
  for t in CDD11:  # the last type's folder holds no image: not scored
    (split / "restored" / t).rename(split / t)
  (split / "restored").rmdir()
  argv = ["--results", str(split), "--reference", str(split / "clear"),
          "--protocol", "y-channel", "--crop_border", "3", "--compare", "cdd11"]
  assert evaluate.main(argv) == 0
  printed = capsys.readouterr().out
  with open(split / "metrics_y-channel_images.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["type"] for r in rows] == list(CDD11[:-1])
  bgr = lambda a: a[..., ::-1]
  for r in rows:
    img, ref = results[r["type"], r["name"]], refs[r["name"]]
    assert _rel([float(r["psnr"]), float(r["ssim"])],
                [_basicsr_psnr(bgr(img), bgr(ref), 3), _basicsr_ssim(bgr(img), bgr(ref), 3)]) <= TOL
  assert "missing: low_haze_snow; not CDD-11's: none" in printed
  assert "(other protocol)" in printed and "--protocol moceir / onerestore" in printed


def _error(argv, capsys) -> str:
  """The one `cotir_jax: error:` line (after a progress bar, if scoring had begun)."""
  assert evaluate.main(argv) == 2
  lines = capsys.readouterr().err.splitlines()
  said = [line for line in lines if "cotir_jax:" in line]
  assert len(said) == 1 and lines[-1] == said[0] and said[0].startswith("cotir_jax: error: "), lines
  return said[0]


def test_cli_help_and_errors(tmp_path, capsys, monkeypatch):
  assert evaluate.main(["--help"]) == 0
  helptext = capsys.readouterr().out
  for name in quality.PROTOCOLS:
    assert f"  {name} " in helptext
  assert "7×7 uniform window" in helptext and "BT.601" in helptext and "--compare" in helptext

  _cdd11_layout(tmp_path)
  ok = ["--results", str(tmp_path / "restored"), "--reference", str(tmp_path / "reference")]
  assert "--results /nope: not a directory" in _error(
      ["--results", "/nope", "--reference", str(tmp_path)], capsys)
  (tmp_path / "other").mkdir()
  assert "has a namesake in" in _error(ok[:3] + [str(tmp_path / "other"), "--protocol", "moceir",
                                                 "--metrics", "psnr"], capsys)
  (tmp_path / "empty").mkdir()
  assert "no images in" in _error(["--results", str(tmp_path / "empty"), *ok[2:]], capsys)
  assert "argument --protocol: invalid choice: 'promptir'" in _error(
      ok + ["--protocol", "promptir"], capsys)
  assert "the onerestore protocol reports psnr,ssim" in _error(
      ok + ["--protocol", "onerestore", "--metrics", "psnr,lpips"], capsys)
  assert "--vgg_weights v.pth: not used with --protocol pyiqa" in _error(
      ok + ["--vgg_weights", "v.pth"], capsys)
  assert "LPIPS is not computed" in _error(
      ok + ["--protocol", "onerestore", "--lpips_weights", "l.pth"], capsys)
  assert "--compare cdd11: published averages" in _error(ok + ["--compare", "cdd11"], capsys)
  assert "--crop_border -1: must be >= 0" in _error(
      ok + ["--protocol", "onerestore", "--crop_border", "-1"], capsys)
  assert "001.png: ssim needs images of at least 7×7 pixels, got (0, 8)" in _error(
      ok + ["--protocol", "onerestore", "--crop_border", "20"], capsys)
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-cache"))
  err = _error(ok + ["--protocol", "moceir"], capsys)  # LPIPS-VGG by default, no trunk file
  assert "torchvision VGG16 (vgg16-397923af.pth" in err and "pass --vgg_weights" in err
  assert "--metrics psnr,ssim" in err
