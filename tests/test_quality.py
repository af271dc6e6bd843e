"""Full-reference metrics (`cotir_jax.quality`), the LPIPS weight table and the evaluate CLI.

Two references. `pyiqa` and `lpips` themselves import torchvision, and PyPI's torchvision (a
CUDA build) does not import beside the CPU torch 2.13 build ("operator torchvision::nms does not
exist"); once installed it also breaks `transformers` / `diffusers` imports for the rest of the
suite, so neither package can be a test dependency. The CI reference is therefore PyTorch code
written here from pyiqa's default-metric definitions (SSIM filtered in float64 as pyiqa does,
AlexNet as torchvision's `features`), loading the same files our converter reads.
`test_matches_pyiqa_and_lpips_packages` compares against the real packages
(`pyiqa.create_metric`, `lpips.LPIPS`) where they import, e.g. in a separate environment:
`pip install pyiqa==0.1.15.post2 lpips==0.1.4 torchvision==0.28.0`.
"""

import math
import os
import sys
import types

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cotir_jax import evaluate, quality, sample
from cotir_jax.convert import lpips as lpips_convert
from cotir_jax.convert.core import ConversionError

pytestmark = pytest.mark.usefixtures("highest_precision")  # float32 parity

TOL = 1e-5  # psnr / ssim, relative (the bound; values here are 0.07 .. 50)
LPIPS_TOL = 2e-5  # float32 max|diff| / max|ref|
SHAPE = (4, 48, 40, 3)
# torchvision AlexNet `features`: (index, in, out, kernel, stride, padding); ReLUs follow each
ALEXNET = ((0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1),
           (8, 384, 256, 3, 1, 1), (10, 256, 256, 3, 1, 1))


def _luma_ties(rng, h, w):
  """8-bit pixels whose exact luma 0.299 R + 0.587 G + 0.114 B ends in .5: float rounding
  order decides which way they round (pyiqa: PyTorch's, no fused multiply-add)."""
  r, g = rng.integers(0, 256, (2, 8 * h * w))
  c = (500 - 299 * r - 587 * g) % 1000  # need 114 B ≡ c (mod 1000)
  b = (c // 2) * pow(57, -1, 500) % 500
  keep = (c % 2 == 0) & (b < 256)
  return np.stack([r, g, b], -1)[keep][:h * w].reshape(h, w, 3)


def _images(seed=0):
  """Pairs that stress different parts: float noise, 8-bit luma ties, a flat bright region
  (variance cancellation), a smooth gradient with mild noise."""
  rng = np.random.default_rng(seed)
  u8 = lambda a: np.clip(a, 0, 255).astype(np.uint8).astype(np.float32) / 255.0
  h, w = SHAPE[1:3]
  grad = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.3, 1, h)[:, None, None] * [1, .8, .6]
  x = np.stack([rng.random((h, w, 3)), u8(_luma_ties(rng, h, w)),
                u8(250 + rng.integers(-1, 2, (h, w, 3))), u8(grad + rng.normal(0, 4, (h, w, 3)))])
  ref = np.stack([rng.random((h, w, 3)), u8(_luma_ties(rng, h, w)),
                  u8(np.full((h, w, 3), 250)), u8(grad)])
  return x.astype(np.float32), ref.astype(np.float32)


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def _torch_psnr(x, ref):
  mse = ((_nchw(x) - _nchw(ref)) ** 2).mean(dim=(1, 2, 3))
  return (10 * torch.log10(1.0 / (mse + 1e-8))).numpy()


def _torch_ssim(x, ref):
  """Y of YIQ in float32 (grey as it is), ×255 and rounded, then SSIM in float64 with a
  float32 Gaussian window."""
  def luma(a):
    t = _nchw(a)
    if t.shape[1] == 3:
      r, g, b = t.unbind(1)
      t = ((r * 0.299 + g * 0.587) + b * 0.114)[:, None]
    return torch.round(t * 255).double()
  grid = torch.arange(11, dtype=torch.float64) - 5
  g = torch.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * 1.5 ** 2))
  win = (g / g.sum()).float().double()[None, None]
  a, b = luma(x), luma(ref)
  mean = lambda t: F.conv2d(t, win)
  mu_a, mu_b = mean(a), mean(b)
  var_a, var_b, cov = mean(a * a) - mu_a ** 2, mean(b * b) - mu_b ** 2, mean(a * b) - mu_a * mu_b
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  cs = torch.relu((2 * cov + c2) / (var_a + var_b + c2))
  return (((2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1)) * cs).mean(dim=(1, 2, 3)).numpy()


def _close(got, want, tol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.all(np.abs(got - want) <= tol * np.abs(want)), (got, want)


def test_psnr_ssim_match_torch_reference():
  x, ref = _images()
  _close(jax.jit(quality.psnr)(x, ref), _torch_psnr(x, ref), TOL)
  _close(jax.jit(quality.ssim)(x, ref), _torch_ssim(x, ref), TOL)
  grey, grey_ref = x[..., :1], ref[..., :1]  # one channel: used as it is, like pyiqa
  _close(jax.jit(quality.ssim)(grey, grey_ref), _torch_ssim(grey, grey_ref), TOL)
  with pytest.raises(ValueError, match="at least 11"):
    quality.ssim(x[:, :10], ref[:, :10])


def test_quantize_is_the_saved_png():
  """Validation numbers use what `sample.to_uint8` writes, as evaluate reads it back."""
  x = np.random.default_rng(0).uniform(-1.2, 1.2, (2, 16, 12, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(quality.quantize(x)),
                                sample.to_uint8(x).astype(np.float32) / 255.0)


# ----------------------------------------------------------------------------- LPIPS

def _lpips_files(tmp_path, legacy=True):
  """Random weights in upstream's two layouts: torchvision AlexNet (classifier included, small
  stand-ins since the table ignores it; legacy torch.save format like the real 2017 file) and
  lpips' linear layers (non-negative, as trained)."""
  g = torch.Generator().manual_seed(0)
  trunk = {}
  for idx, cin, cout, k, _, _ in ALEXNET:
    bound = 1 / math.sqrt(cin * k * k)
    trunk[f"features.{idx}.weight"] = (torch.rand(cout, cin, k, k, generator=g) * 2 - 1) * bound
    trunk[f"features.{idx}.bias"] = (torch.rand(cout, generator=g) * 2 - 1) * bound
  trunk.update({f"classifier.{i}.{p}": torch.zeros(2) for i in (1, 4, 6)
                for p in ("weight", "bias")})
  lins = {f"lin{i}.model.1.weight": torch.rand(1, spec[2], 1, 1, generator=g)
          for i, spec in enumerate(ALEXNET)}
  alexnet_path, lin_path = str(tmp_path / lpips_convert.ALEXNET_FILE), str(tmp_path / "alex.pth")
  torch.save(trunk, alexnet_path, _use_new_zipfile_serialization=not legacy)
  torch.save(lins, lin_path)
  return lin_path, alexnet_path, trunk, lins


def _torch_lpips(trunk, lins, x, ref):
  """LPIPS v0.1 AlexNet: inputs to [-1, 1], scaling layer, unit-normalised ReLU features,
  weighted squared differences, spatial mean, summed over the five layers."""
  shift = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
  scale = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]

  def feats(t):
    out = []
    for n, (idx, _, _, _, stride, pad) in enumerate(ALEXNET):
      if n in (1, 2):
        t = F.max_pool2d(t, 3, 2)
      t = torch.relu(F.conv2d(t, trunk[f"features.{idx}.weight"], trunk[f"features.{idx}.bias"],
                              stride, pad))
      out.append(t)
    return out

  norm = lambda f: f / (torch.sqrt((f ** 2).sum(dim=1, keepdim=True)) + 1e-10)
  scaled = lambda a: ((2 * _nchw(a) - 1) - shift) / scale
  total = 0
  for i, (a, b) in enumerate(zip(feats(scaled(x)), feats(scaled(ref)))):
    weighted = F.conv2d((norm(a) - norm(b)) ** 2, lins[f"lin{i}.model.1.weight"])
    total = total + weighted.mean(dim=(2, 3))
  return total[:, 0].numpy()


def test_lpips_converter_matches_torch_reference(tmp_path):
  lin_path, alexnet_path, trunk, lins = _lpips_files(tmp_path)
  model = lpips_convert.load_lpips(lin_path, alexnet_path)
  x, ref = _images(1)
  got = np.asarray(jax.jit(lambda a, b: model(a, b))(x, ref))
  want = _torch_lpips(trunk, lins, x, ref)
  assert np.abs(got - want).max() / np.abs(want).max() <= LPIPS_TOL, (got, want)
  with pytest.raises(ValueError, match="at least 31"):
    model(x[:, :30], ref[:, :30])


def test_lpips_weight_lookup_and_errors(tmp_path, monkeypatch):
  lin_path, alexnet_path, _, lins = _lpips_files(tmp_path, legacy=False)
  hub = tmp_path / "torch" / "hub"
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  with pytest.raises(ConversionError) as e:
    lpips_convert.find_weights(str(tmp_path / "nope.pth"), None)
  msg = str(e.value)
  assert "--lpips_weights" in msg and "nope.pth" in msg and "does not exist" in msg
  assert "--alexnet_weights" in msg and str(hub / "checkpoints" / lpips_convert.ALEXNET_FILE) in msg
  # found where torchvision and pyiqa cache them
  (hub / "checkpoints").mkdir(parents=True)
  (hub / "pyiqa").mkdir()
  os.replace(alexnet_path, hub / "checkpoints" / lpips_convert.ALEXNET_FILE)
  os.replace(lin_path, hub / "pyiqa" / lpips_convert.LPIPS_FILE)
  assert lpips_convert.find_weights() == (str(hub / "pyiqa" / lpips_convert.LPIPS_FILE),
                                          str(hub / "checkpoints" / lpips_convert.ALEXNET_FILE))
  # a file in the wrong role, or one lacking a layer, is named with the key
  bad = str(tmp_path / "bad.pth")
  torch.save({k: v for k, v in lins.items() if not k.startswith("lin4")}, bad)
  with pytest.raises(ConversionError, match=r"bad\.pth: missing key 'lin4\.model\.1\.weight'"):
    lpips_convert.load_lpips(bad)
  with pytest.raises(ConversionError, match=r"missing key 'features\.0\.weight'"):
    lpips_convert.load_lpips(None, str(hub / "pyiqa" / lpips_convert.LPIPS_FILE))


# ----------------------------------------------------------------------------- the CLI

def _write_png(path, array):
  Image.fromarray(array).save(path)


def test_evaluate_cli(tmp_path, capsys, monkeypatch):
  """restore's layout (<out>/{vague,precise,reference}); grey and RGBA inputs become RGB."""
  lin_path, alexnet_path, trunk, lins = _lpips_files(tmp_path)
  rng = np.random.default_rng(0)
  out = tmp_path / "out"
  for d in ("vague", "precise", "reference"):
    (out / d).mkdir(parents=True)
  h, w = 36, 44
  hq = {n: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for n in ("a.png", "b.png", "c.png")}
  for name, img in hq.items():
    _write_png(out / "reference" / name, img)
    for d in ("vague", "precise"):
      noisy = np.clip(img.astype(int) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
      _write_png(out / d / name, noisy)
  _write_png(out / "vague" / "b.png", np.asarray(Image.open(out / "vague" / "b.png").convert("L")))
  _write_png(out / "vague" / "c.png",
             np.asarray(Image.open(out / "vague" / "c.png").convert("RGBA")))
  _write_png(out / "vague" / "only_here.png", hq["a.png"])  # no reference: skipped
  argv = ["--results", str(out), "--reference", str(out / "reference"),
          "--lpips_weights", lin_path, "--alexnet_weights", alexnet_path]
  assert evaluate.main(argv) == 0
  printed = capsys.readouterr().out

  for d in ("precise", "vague"):
    names = sorted(hq)
    x = np.stack([evaluate.load_image(str(out / d / n)) for n in names])
    ref = np.stack([evaluate.load_image(str(out / "reference" / n)) for n in names])
    assert x.shape == (3, h, w, 3)
    want = {"psnr": _torch_psnr(x, ref), "ssim": _torch_ssim(x, ref),
            "lpips": _torch_lpips(trunk, lins, x, ref)}
    rows = (out / d / evaluate.CSV_NAME).read_text().splitlines()
    assert rows[0] == "name,psnr,ssim,lpips" and [r.split(",")[0] for r in rows[1:]] == names
    got = np.array([[float(v) for v in r.split(",")[1:]] for r in rows[1:]])
    for j, m in enumerate(evaluate.METRICS):
      _close(got[:, j], want[m], TOL if m != "lpips" else LPIPS_TOL)
    means = {m: float(np.mean(got[:, j])) for j, m in enumerate(evaluate.METRICS)}
    line = f"{d} & {means['psnr']:.2f} & {means['ssim']:.4f} & {means['lpips']:.4f}"
    summary = (out / d / evaluate.SUMMARY_NAME).read_text()
    assert summary == f"method & psnr & ssim & lpips\n{line}\n"
    assert line in printed
  assert not (out / "reference" / evaluate.SUMMARY_NAME).exists()

  # a subset of metrics keeps upstream's column order; a bad name or size is an error
  assert evaluate.main(["--results", str(out / "precise"), "--reference", str(out / "reference"),
                        "--metrics", "ssim,psnr"]) == 0
  assert (out / "precise" / evaluate.SUMMARY_NAME).read_text().startswith("method & psnr & ssim\n")
  assert evaluate.main(argv + ["--metrics", "psnr,niqe"]) == 2
  assert "unknown ['niqe']" in capsys.readouterr().err
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
  assert evaluate.main(argv[:4]) == 2  # LPIPS by default, weights nowhere
  err = capsys.readouterr().err
  assert err.startswith("cotir_jax: error: LPIPS weights missing") and err.count("\n") == 1
  assert "pass --alexnet_weights" in err and "--metrics psnr,ssim" in err
  _write_png(out / "precise" / "a.png", hq["a.png"][:, :40])
  assert evaluate.main(argv[:4] + ["--metrics", "psnr"]) == 2
  assert "a.png: result is 40×36 but the reference is 44×36" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the real packages

def _import_reference_packages():
  """pyiqa and lpips, or a skip naming why. Their torchvision import fails only in the
  registration of fake kernels for its C++ ops (absent beside a CPU torch), which neither
  metric uses; that one module is skipped then."""
  try:
    import torchvision  # noqa: F401
  except ImportError:
    pytest.skip("pyiqa / lpips need torchvision, which is not installed (see the module doc)")
  except RuntimeError as e:
    if "torchvision::nms" not in str(e):
      raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("_meta_registrations")
  pyiqa = pytest.importorskip("pyiqa", reason="pyiqa is not installed (see the module doc)")
  lpips = pytest.importorskip("lpips", reason="lpips is not installed (see the module doc)")
  return pyiqa, lpips


def test_matches_pyiqa_and_lpips_packages(tmp_path, monkeypatch):
  pyiqa, lpips = _import_reference_packages()
  import torchvision
  x, ref = _images(2)
  for name in ("psnr", "ssim"):
    want = pyiqa.create_metric(name, device="cpu")(_nchw(x), _nchw(ref)).numpy()
    _close(jax.jit(getattr(quality, name))(x, ref), want, TOL)

  torch.manual_seed(0)
  alexnet = torchvision.models.alexnet()  # random; pyiqa reads it from the torch hub cache
  monkeypatch.setenv("TORCH_HOME", str(tmp_path))
  (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
  torch.save(alexnet.state_dict(), tmp_path / "hub" / "checkpoints" / lpips_convert.ALEXNET_FILE)
  net = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False).eval()
  with torch.no_grad():
    net.net.load_state_dict({f"slice{s}.{i}.{p}": alexnet.features[i].state_dict()[p]
                             for s, i in zip(range(1, 6), (0, 3, 6, 8, 10))
                             for p in ("weight", "bias")})
    for lin in net.lins:
      lin.model[1].weight.uniform_(0, 1)
  lin_path = str(tmp_path / lpips_convert.LPIPS_FILE)
  torch.save({f"lin{i}.model.1.weight": lin.model[1].weight for i, lin in enumerate(net.lins)},
             lin_path)
  model = lpips_convert.load_lpips(lin_path)
  got = np.asarray(jax.jit(lambda a, b: model(a, b))(x, ref))
  with torch.no_grad():
    for want in (net(_nchw(x) * 2 - 1, _nchw(ref) * 2 - 1).reshape(-1).numpy(),
                 pyiqa.create_metric("lpips", device="cpu", pretrained_model_path=lin_path)(
                     _nchw(x), _nchw(ref)).reshape(-1).numpy()):
      assert np.abs(got - want).max() / np.abs(want).max() <= LPIPS_TOL, (got, want)
