"""Full-reference image quality in JAX, computed the way each project's evaluation script does.

A *protocol* (`PROTOCOLS`, `python -m cotir_jax.evaluate --protocol`) is one project's choice of
PSNR, SSIM and LPIPS; the same pair of images scores differently under each, so a number is
only comparable with numbers of the same protocol. Each equals, to float32 rounding, the
library its authors call:

- `pyiqa` (upstream CoTIR's evaluate.py: `pyiqa.create_metric(name)` at its defaults, pyiqa
  0.1.15.post2, the version upstream pins, and its current release agree):
  - `psnr`: on RGB, data range 1, `10·log10(1 / (mse + 1e-8))`, mse the mean over H, W, C of
    one image (no colour conversion, no border crop).
  - `ssim`: on the luma channel of YIQ (Y = 0.299 R + 0.587 G + 0.114 B, PyTorch's float32
    rounding order), scaled to [0, 255] and rounded to integers, 11×11 Gaussian window with
    σ = 1.5, valid filtering (no padding), no downsampling, C1 = (0.01·255)², C2 = (0.03·255)²,
    and pyiqa's ReLU on the contrast-structure term.
  - `LPIPS`: v0.1 with the AlexNet trunk (the `lpips` package): inputs mapped to [-1, 1], the
    scaling layer, ReLU outputs of the five conv layers, unit-normalised over channels
    (f / (‖f‖ + 1e-10)), squared differences weighted by the learned 1×1 layers, spatial means
    summed over layers.
- `onerestore` (OneRestore's CDD-11 script img_file/cal_psnr_ssim.py, which scored every method
  of its CDD-11 table; PromptIR's utils/val_utils.py makes the same calls on float32 tensors):
  scikit-image `peak_signal_noise_ratio(data_range=1)` (10·log10(1 / mse), no epsilon) and
  `structural_similarity(win_size=7, channel_axis=-1, data_range=1)`: each RGB channel on its
  own, 7×7 uniform window, sample covariance (× 49/48), C1 = 0.01², C2 = 0.03², the map
  averaged away from a 3-pixel border (skimage filters with reflection, then crops it), the
  three channel means averaged.
- `moceir` (MoCE-IR's src/test.py): the same PSNR; `structural_similarity(channel_axis=2,
  gaussian_weights=True, data_range=1)`: an 11-tap Gaussian window (σ = 1.5, truncate 3.5),
  still sample covariance (× 121/120, skimage's default), 5-pixel border; LPIPS v0.1 with the
  VGG16 trunk as torchmetrics computes it (`LearnedPerceptualImagePatchSimilarity(net_type=
  'vgg', normalize=True)`: relu1_2 … relu5_3, features normalised f / √(‖f‖² + 1e-8)).
- `y-channel` (BasicSR basicsr/metrics/psnr_ssim.py with `test_y_channel=True`, the Restormer
  line of single-task papers): Y of ITU-R BT.601 in [16, 235] (Y = 65.481 R + 128.553 G +
  24.966 B + 16 for RGB in [0, 1], not rounded); PSNR 10·log10(255² / mse); SSIM on Y with the
  11×11 Gaussian window (σ = 1.5), population covariance, C1 = (0.01·255)², C2 = (0.03·255)²,
  valid filtering. BasicSR's `crop_border` is applied by the caller (`evaluate --crop_border`).

Windowed statistics (every SSIM here) accumulate each local variance as a sum of w·(x − μ)²
around its own window mean: the E[x²] − μ² that the libraries compute in float64 would lose
flat bright regions to cancellation in float32.

Input range: every function takes NHWC float images in [0, 1] (RGB, or one grey channel for
the pyiqa SSIM) and returns one float32 value per image, shape [B]. Model outputs in [-1, 1]
(validation, `restore`) go through `quantize` first, which gives the [0, 1] values of the 8-bit
PNG that `sample.to_uint8` writes, so in-training numbers equal what `cotir_jax.evaluate`
computes from the saved files. All functions are pure and jittable.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cotir_jax.models.layers import param, torch_uniform
from cotir_jax.models.vae import Conv

PSNR_EPS = 1e-8
YIQ_LUMA = (0.299, 0.587, 0.114)
BT601_Y = (65.481, 128.553, 24.966)  # ITU-R BT.601 Y from RGB in [0, 1], plus 16 (BasicSR)
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_UNIFORM_WINDOW = 7  # skimage's default for uniform weights
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_RANGE = 255.0
# torchvision `features` convs: (in, out, kernel, stride, padding, max pool (window, stride)
# applied before the conv or None, whether LPIPS taps its ReLU output)
ALEXNET_CONVS = ((3, 64, 11, 4, 2, None, True), (64, 192, 5, 1, 2, (3, 2), True),
                 (192, 384, 3, 1, 1, (3, 2), True), (384, 256, 3, 1, 1, None, True),
                 (256, 256, 3, 1, 1, None, True))
VGG16_CONVS = tuple(
    (cin, cout, 3, 1, 1, pool, tap) for cin, cout, pool, tap in (
        (3, 64, None, False), (64, 64, None, True),  # relu1_2
        (64, 128, (2, 2), False), (128, 128, None, True),  # relu2_2
        (128, 256, (2, 2), False), (256, 256, None, False), (256, 256, None, True),  # relu3_3
        (256, 512, (2, 2), False), (512, 512, None, False), (512, 512, None, True),  # relu4_3
        (512, 512, (2, 2), False), (512, 512, None, False), (512, 512, None, True)))  # relu5_3
LPIPS_TRUNKS = {"alex": ALEXNET_CONVS, "vgg": VGG16_CONVS}
# smallest side with a feature left after the trunk's poolings (AlexNet: stride 4, two 3×3 / 2)
LPIPS_MIN_SIZE = {"alex": 31, "vgg": 16}
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# unit normalisation of the features: the lpips package (and pyiqa) divide by ‖f‖ + 1e-10;
# torchmetrics (since 1.3, what MoCE-IR runs) by √(‖f‖² + 1e-8)
LPIPS_UNIT_NORMS = ("lpips", "torchmetrics")
_UNIT_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255)  # uint8 PNG level → [0, 1]


def quantize(images: jax.Array) -> jax.Array:
  """Model images in [-1, 1] → [0, 1] on the 8-bit grid of the PNG upstream writes.

  clamp, (x + 1)·127.5, truncation to an integer (`sample.to_uint8`), then / 255 as
  upstream's evaluate.py loads a PNG.
  """
  x = jnp.clip(jnp.asarray(images, jnp.float32), -1.0, 1.0)
  levels = jnp.floor((x + 1.0) * 127.5).astype(jnp.int32)
  return jnp.asarray(_UNIT_LEVELS)[levels]  # a table: XLA may turn `/ 255` into `* (1 / 255)`


def psnr(x: jax.Array, ref: jax.Array, data_range: float = 1.0,
         eps: float = PSNR_EPS) -> jax.Array:
  """Per-image PSNR in dB over all channels: `10·log10(data_range² / (mse + eps))`.

  The defaults are pyiqa's `psnr` (test_y_channel=False); scikit-image and BasicSR add no
  epsilon (`eps=0`: identical images score inf, as there).
  """
  diff = jnp.asarray(x, jnp.float32) - jnp.asarray(ref, jnp.float32)
  mse = jnp.mean(jnp.square(diff), axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range ** 2 / (mse + eps))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
  """2-D Gaussian weights summing to one, built in float64, then float32.

  MATLAB's fspecial('gaussian', 11, 1.5) as pyiqa builds it; the same numbers as the outer
  product of the normalised 1-D kernels scipy (skimage's `gaussian_weights`, radius
  int(3.5·σ + 0.5) = 5) and OpenCV's getGaussianKernel (BasicSR) filter with.
  """
  m = (size - 1) / 2.0
  y, x = np.ogrid[-m:m + 1, -m:m + 1]
  h = np.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
  h[h < np.finfo(h.dtype).eps * h.max()] = 0
  return (h / h.sum()).astype(np.float32)


def uniform_window(size: int = SSIM_UNIFORM_WINDOW) -> np.ndarray:
  """Equal weights over size×size pixels: scipy's uniform_filter, skimage's default window."""
  return np.full((size, size), 1.0 / (size * size), np.float32)


def _local_moments(a: jax.Array, b: jax.Array, window: np.ndarray):
  """Window means, variances and covariance of two [N, H, W] images at every valid position.

  The means are one convolution each; each (co)variance is Σ w·(x − μ)(y − μ) summed over
  the window offsets around its own mean, so a flat region gets exactly zero variance.
  """
  k = window.shape[0]
  kernel = jnp.asarray(window)[:, :, None, None]

  def local_mean(img):
    return jax.lax.conv_general_dilated(img[..., None], kernel, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)[..., 0]

  mu_a, mu_b = local_mean(a), local_mean(b)
  n, h, w = mu_a.shape

  def accumulate(dy, moments):  # one window row: its k offsets fuse into one pass
    rows_a = jax.lax.dynamic_slice(a, (0, dy, 0), (n, h, a.shape[2]))
    rows_b = jax.lax.dynamic_slice(b, (0, dy, 0), (n, h, b.shape[2]))
    weights = jnp.asarray(window)[dy]
    var_a, var_b, cov = moments
    for dx in range(k):
      da, db = rows_a[:, :, dx:dx + w] - mu_a, rows_b[:, :, dx:dx + w] - mu_b
      var_a, var_b, cov = (var_a + weights[dx] * da * da, var_b + weights[dx] * db * db,
                           cov + weights[dx] * da * db)
    return var_a, var_b, cov

  zeros = jnp.zeros_like(mu_a)
  var_a, var_b, cov = jax.lax.fori_loop(0, k, accumulate, (zeros, zeros, zeros))
  return mu_a, mu_b, var_a, var_b, cov


def _check_window(name: str, x: jax.Array, ref: jax.Array, k: int) -> None:
  if x.shape != ref.shape:
    raise ValueError(f"{name}: image shapes differ: {x.shape} vs {ref.shape}")
  if min(x.shape[1:3]) < k:
    raise ValueError(f"{name} needs images of at least {k}×{k} pixels, got {x.shape[1:3]}")


def _exact_product(p: jax.Array) -> jax.Array:
  """`p` unchanged; keeps XLA from fusing the product into a following add (an FMA would
  round differently from PyTorch and flip Y values that sit on a .5 tie)."""
  return jnp.where(p == p, p, jnp.nan)  # noqa: PLR0124 — NaN-preserving identity, on purpose


def _luma_255(x: jax.Array) -> jax.Array:
  """pyiqa's `to_y_channel(x, 255, 'yiq')` (or x·255 for one channel), rounded: [B, H, W]."""
  x = jnp.asarray(x, jnp.float32)
  if x.shape[-1] == 3:
    r, g, b = (_exact_product(x[..., c] * np.float32(w)) for c, w in enumerate(YIQ_LUMA))
    y = (r + g) + b
  elif x.shape[-1] == 1:
    y = x[..., 0]
  else:
    raise ValueError(f"ssim expects RGB or grey images (last axis 3 or 1), got shape {x.shape}")
  return jnp.round(y * SSIM_RANGE)


def ssim(x: jax.Array, ref: jax.Array) -> jax.Array:
  """Per-image SSIM of the rounded Y channel: pyiqa `ssim` (test_y_channel, no downsampling)."""
  win = gaussian_window()
  _check_window("ssim", x, ref, win.shape[0])
  mu_a, mu_b, var_a, var_b, cov = _local_moments(_luma_255(x), _luma_255(ref), win)
  c1, c2 = (SSIM_K1 * SSIM_RANGE) ** 2, (SSIM_K2 * SSIM_RANGE) ** 2
  cs = jax.nn.relu((2.0 * cov + c2) / (var_a + var_b + c2))
  luminance = (2.0 * mu_a * mu_b + c1) / (mu_a * mu_a + mu_b * mu_b + c1)
  return jnp.mean(luminance * cs, axis=(1, 2))


def structural_similarity(x: jax.Array, ref: jax.Array, window: np.ndarray, *,
                          data_range: float, sample_covariance: bool) -> jax.Array:
  """Per-image SSIM of NHWC images, each channel on its own, the channel values averaged.

  scikit-image's `structural_similarity(x, ref, channel_axis=-1, data_range=...)` with the
  given window (`sample_covariance`: its default N/(N−1) scaling of the (co)variances, N the
  window's pixel count), or BasicSR's `_ssim` (population covariance). Only positions whose
  window lies inside the image count, as skimage's border crop and BasicSR's valid crop do.
  """
  k = window.shape[0]
  _check_window("ssim", x, ref, k)
  batch, h, w, channels = x.shape
  planes = lambda t: jnp.moveaxis(jnp.asarray(t, jnp.float32), -1, 1).reshape(-1, h, w)
  mu_a, mu_b, var_a, var_b, cov = _local_moments(planes(x), planes(ref), window)
  if sample_covariance:
    n = window.size
    var_a, var_b, cov = (v * np.float32(n / (n - 1)) for v in (var_a, var_b, cov))
  c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
  s = (((2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2))
       / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)))
  return jnp.mean(jnp.mean(s, axis=(1, 2)).reshape(batch, channels), axis=1)


def ssim_uniform(x: jax.Array, ref: jax.Array) -> jax.Array:
  """skimage `structural_similarity(win_size=7, channel_axis=-1, data_range=1)`: OneRestore."""
  return structural_similarity(x, ref, uniform_window(), data_range=1.0, sample_covariance=True)


def ssim_gaussian(x: jax.Array, ref: jax.Array) -> jax.Array:
  """skimage `structural_similarity(gaussian_weights=True, channel_axis=-1, data_range=1)`:
  MoCE-IR."""
  return structural_similarity(x, ref, gaussian_window(), data_range=1.0, sample_covariance=True)


def bt601_y(x: jax.Array) -> jax.Array:
  """RGB in [0, 1] → Y of ITU-R BT.601 in [16, 235], unrounded, [B, H, W, 1]: BasicSR's
  `rgb2ycbcr(y_only=True)` (its `bgr2ycbcr` on OpenCV's channel order), × 255."""
  x = jnp.asarray(x, jnp.float32)
  r, g, b = (x[..., c] * np.float32(w) for c, w in enumerate(BT601_Y))
  return ((r + g + b) + np.float32(16.0))[..., None]


def psnr_y(x: jax.Array, ref: jax.Array) -> jax.Array:
  """BasicSR `calculate_psnr(test_y_channel=True)` (crop_border 0): 10·log10(255² / mse) on Y."""
  return psnr(bt601_y(x), bt601_y(ref), data_range=SSIM_RANGE, eps=0.0)


def ssim_y(x: jax.Array, ref: jax.Array) -> jax.Array:
  """BasicSR `calculate_ssim(test_y_channel=True)` (crop_border 0): 11×11 Gaussian on Y."""
  return structural_similarity(bt601_y(x), bt601_y(ref), gaussian_window(),
                               data_range=SSIM_RANGE, sample_covariance=False)


def _max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """torch MaxPool2d(kernel_size=window, stride=stride), no padding, floor mode."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                               (1, stride, stride, 1), "VALID")


class LPIPS(nnx.Module):
  """LPIPS v0.1 with torchvision's AlexNet or VGG16 trunk: `lpips(x, ref)` → [B].

  `net="alex"`, `unit_norm="lpips"` is pyiqa's `lpips` (= lpips.LPIPS(net='alex'));
  `net="vgg"`, `unit_norm="torchmetrics"` is torchmetrics' LearnedPerceptualImagePatchSimilarity
  (net_type='vgg'), MoCE-IR's. `convs.{i}` are the trunk's feature convs, `lins.{0..4}` the
  learned per-channel weights of the five tapped layers (HWIO 1×1 kernels without bias).
  Random init here; `convert.lpips.load_lpips` fills them.
  """

  def __init__(self, net: str = "alex", unit_norm: str = "lpips", *, rngs: nnx.Rngs):
    if net not in LPIPS_TRUNKS or unit_norm not in LPIPS_UNIT_NORMS:
      raise ValueError(f"LPIPS(net={net!r}, unit_norm={unit_norm!r}): net is one of "
                       f"{sorted(LPIPS_TRUNKS)}, unit_norm one of {list(LPIPS_UNIT_NORMS)}")
    self.net, self.unit_norm = net, unit_norm
    layers = LPIPS_TRUNKS[net]
    self.convs = nnx.List([
        Conv(cin, cout, k, stride=s, pad=((p, p), (p, p)), dtype=jnp.float32,
             param_dtype=jnp.float32, rngs=rngs)
        for cin, cout, k, s, p, _, _ in layers])
    self.lins = nnx.List([param(torch_uniform(rngs.params(), (1, 1, cout, 1), cout, jnp.float32),
                                (None, None, None, None))
                          for _, cout, _, _, _, _, tap in layers if tap])

  def features(self, x: jax.Array) -> list[jax.Array]:
    """The tapped ReLU outputs (AlexNet relu1..relu5, VGG16 relu1_2..relu5_3) of scaled inputs."""
    feats = []
    for conv, (_, _, _, _, _, pool, tap) in zip(self.convs, LPIPS_TRUNKS[self.net]):
      if pool is not None:
        x = _max_pool(x, *pool)
      x = jax.nn.relu(conv(x))
      if tap:
        feats.append(x)
    return feats

  def _normalize(self, f: jax.Array) -> jax.Array:
    square_norm = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    if self.unit_norm == "lpips":
      return f / (jnp.sqrt(square_norm) + 1e-10)
    return f / jnp.sqrt(square_norm + 1e-8)

  def __call__(self, x: jax.Array, ref: jax.Array) -> jax.Array:
    if x.shape != ref.shape:
      raise ValueError(f"lpips: image shapes differ: {x.shape} vs {ref.shape}")
    min_size = LPIPS_MIN_SIZE[self.net]
    if min(x.shape[1:3]) < min_size:
      raise ValueError(f"lpips ({self.net}) needs images of at least {min_size}×{min_size} "
                       f"pixels, got {x.shape[1:3]}")
    shift, scale = np.float32(LPIPS_SHIFT), np.float32(LPIPS_SCALE)
    both = jnp.concatenate([jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)])
    with jax.default_matmul_precision("highest"):
      feats = self.features(((2.0 * both - 1.0) - shift) / scale)
      total = jnp.zeros((x.shape[0],), jnp.float32)
      for f, lin in zip(feats, self.lins):
        f = self._normalize(f)
        diff = jnp.square(f[:x.shape[0]] - f[x.shape[0]:])
        total = total + jnp.mean(diff @ lin[...][0, 0], axis=(1, 2, 3))
    return total


# ----------------------------------------------------------------------------- protocols

@dataclasses.dataclass(frozen=True)
class Protocol:
  """One project's PSNR / SSIM (/ LPIPS): jittable (x, ref) [B, H, W, 3] in [0, 1] → [B]."""
  source: str  # the script whose numbers it reproduces
  psnr: Callable[[jax.Array, jax.Array], jax.Array]
  ssim: Callable[[jax.Array, jax.Array], jax.Array]
  lpips: dict | None = None  # `LPIPS` arguments, or None where the project reports no LPIPS

  @property
  def metrics(self) -> tuple[str, ...]:
    return ("psnr", "ssim", "lpips") if self.lpips else ("psnr", "ssim")


PROTOCOLS = {
    "pyiqa": Protocol("upstream CoTIR's evaluate.py (pyiqa psnr, ssim, lpips defaults)",
                      psnr, ssim, {"net": "alex", "unit_norm": "lpips"}),
    "onerestore": Protocol("OneRestore's img_file/cal_psnr_ssim.py (= PromptIR's skimage calls)",
                           functools.partial(psnr, eps=0.0), ssim_uniform),
    "moceir": Protocol("MoCE-IR's src/test.py (skimage, Gaussian SSIM; torchmetrics LPIPS-VGG)",
                       functools.partial(psnr, eps=0.0), ssim_gaussian,
                       {"net": "vgg", "unit_norm": "torchmetrics"}),
    "y-channel": Protocol("BasicSR's basicsr/metrics/psnr_ssim.py (test_y_channel=True)",
                          psnr_y, ssim_y),
}
