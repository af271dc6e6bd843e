"""Full-reference image quality in JAX: what pyiqa's default `psnr`, `ssim` and `lpips` compute.

Upstream scores restorations with `pyiqa.create_metric(name)` at its defaults (spec §16); these
functions reproduce those definitions (pyiqa 0.1.15.post2, the version upstream pins, and its
current release agree) so that numbers are comparable with upstream's tables:

- `psnr`: on RGB, data range 1, `10·log10(1 / (mse + 1e-8))`, mse the mean over H, W, C of one
  image (no colour conversion, no border crop).
- `ssim`: on the luma channel of YIQ (Y = 0.299 R + 0.587 G + 0.114 B, PyTorch's float32
  rounding order), scaled to [0, 255] and rounded to integers, 11×11 Gaussian window with
  σ = 1.5, valid filtering (no padding), no downsampling, C1 = (0.01·255)², C2 = (0.03·255)²,
  and pyiqa's ReLU on the contrast-structure term. pyiqa filters in float64; here the local
  variances are accumulated around the local means in float32 (sum of w·(x − μ)² over the
  window), which keeps flat bright regions accurate without float64.
- `LPIPS`: v0.1 with the AlexNet trunk: inputs mapped to [-1, 1], pyiqa's / lpips' scaling
  layer, ReLU outputs of the five conv layers, unit-normalised over channels (eps 1e-10),
  squared differences weighted by the learned 1×1 layers, spatial means summed over layers.
  Weights come from the lpips / torchvision files via `cotir_jax.convert.lpips`.

Input range: every function takes NHWC float images in [0, 1] (pyiqa's convention: RGB, or one
grey channel) and returns one float32 value per image, shape [B]. Model outputs in [-1, 1]
(validation, `restore`) go through `quantize` first, which gives the [0, 1] values of the 8-bit
PNG that `sample.to_uint8` writes, so in-training numbers equal what `cotir_jax.evaluate`
computes from the saved files. All functions are pure and jittable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cotir_jax.models.layers import param, torch_uniform
from cotir_jax.models.vae import Conv

PSNR_EPS = 1e-8
YIQ_LUMA = (0.299, 0.587, 0.114)
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_RANGE = 255.0
# (in, out, kernel, stride, padding) of torchvision's AlexNet `features` convs 0, 3, 6, 8, 10
ALEXNET_CONVS = ((3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1),
                 (384, 256, 3, 1, 1), (256, 256, 3, 1, 1))
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10
LPIPS_MIN_SIZE = 31  # smallest side that survives AlexNet's two 3×3 / 2 poolings
_UNIT_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255)  # uint8 PNG level → [0, 1]


def quantize(images: jax.Array) -> jax.Array:
  """Model images in [-1, 1] → [0, 1] on the 8-bit grid of the PNG upstream writes.

  clamp, (x + 1)·127.5, truncation to an integer (`sample.to_uint8`), then / 255 as
  upstream's evaluate.py loads a PNG.
  """
  x = jnp.clip(jnp.asarray(images, jnp.float32), -1.0, 1.0)
  levels = jnp.floor((x + 1.0) * 127.5).astype(jnp.int32)
  return jnp.asarray(_UNIT_LEVELS)[levels]  # a table: XLA may turn `/ 255` into `* (1 / 255)`


def psnr(x: jax.Array, ref: jax.Array, data_range: float = 1.0) -> jax.Array:
  """Per-image PSNR in dB over all channels: pyiqa `psnr` (test_y_channel=False, eps 1e-8)."""
  diff = jnp.asarray(x, jnp.float32) - jnp.asarray(ref, jnp.float32)
  mse = jnp.mean(jnp.square(diff), axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range ** 2 / (mse + PSNR_EPS))


def _gaussian_window() -> np.ndarray:
  """MATLAB's fspecial('gaussian', 11, 1.5) as pyiqa builds it (float64, then float32)."""
  m = (SSIM_WINDOW - 1) / 2.0
  y, x = np.ogrid[-m:m + 1, -m:m + 1]
  h = np.exp(-(x * x + y * y) / (2.0 * SSIM_SIGMA * SSIM_SIGMA))
  h[h < np.finfo(h.dtype).eps * h.max()] = 0
  return (h / h.sum()).astype(np.float32)


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
  if x.shape != ref.shape:
    raise ValueError(f"ssim: image shapes differ: {x.shape} vs {ref.shape}")
  win = _gaussian_window()
  k = win.shape[0]
  if min(x.shape[1:3]) < k:
    raise ValueError(f"ssim needs images of at least {k}×{k} pixels, got {x.shape[1:3]}")
  a, b = _luma_255(x), _luma_255(ref)
  kernel = jnp.asarray(win)[:, :, None, None]

  def local_mean(img):
    return jax.lax.conv_general_dilated(img[..., None], kernel, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)[..., 0]

  mu_a, mu_b = local_mean(a), local_mean(b)
  h, w = mu_a.shape[1:]
  weights = jnp.asarray(win.reshape(-1))

  def accumulate(i, moments):  # one window offset: Σ w·(x − μ)(y − μ) around each output pixel
    dy, dx = i // k, i % k
    da = jax.lax.dynamic_slice(a, (0, dy, dx), (a.shape[0], h, w)) - mu_a
    db = jax.lax.dynamic_slice(b, (0, dy, dx), (b.shape[0], h, w)) - mu_b
    var_a, var_b, cov = moments
    return var_a + weights[i] * da * da, var_b + weights[i] * db * db, cov + weights[i] * da * db

  zeros = jnp.zeros_like(mu_a)
  var_a, var_b, cov = jax.lax.fori_loop(0, k * k, accumulate, (zeros, zeros, zeros))
  c1, c2 = (0.01 * SSIM_RANGE) ** 2, (0.03 * SSIM_RANGE) ** 2
  cs = jax.nn.relu((2.0 * cov + c2) / (var_a + var_b + c2))
  luminance = (2.0 * mu_a * mu_b + c1) / (mu_a * mu_a + mu_b * mu_b + c1)
  return jnp.mean(luminance * cs, axis=(1, 2))


def _max_pool(x: jax.Array) -> jax.Array:
  """torch MaxPool2d(kernel_size=3, stride=2), no padding."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


class LPIPS(nnx.Module):
  """LPIPS v0.1, AlexNet trunk (pyiqa `lpips` = lpips.LPIPS(net='alex')): `lpips(x, ref)` → [B].

  `convs.{0..4}` are AlexNet's feature convs, `lins.{0..4}` the learned per-channel weights
  (HWIO 1×1 kernels without bias). Random init here; `convert.lpips.load_lpips` fills them.
  """

  def __init__(self, *, rngs: nnx.Rngs):
    self.convs = nnx.List([
        Conv(cin, cout, k, stride=s, pad=((p, p), (p, p)), dtype=jnp.float32,
             param_dtype=jnp.float32, rngs=rngs)
        for cin, cout, k, s, p in ALEXNET_CONVS])
    self.lins = nnx.List([param(torch_uniform(rngs.params(), (1, 1, cout, 1), cout, jnp.float32),
                                (None, None, None, None))
                          for _, cout, _, _, _ in ALEXNET_CONVS])

  def features(self, x: jax.Array) -> list[jax.Array]:
    """The ReLU outputs of the five convs (lpips' relu1..relu5) for inputs after scaling."""
    feats = []
    for i, conv in enumerate(self.convs):
      if i in (1, 2):
        x = _max_pool(x)
      x = jax.nn.relu(conv(x))
      feats.append(x)
    return feats

  def __call__(self, x: jax.Array, ref: jax.Array) -> jax.Array:
    if x.shape != ref.shape:
      raise ValueError(f"lpips: image shapes differ: {x.shape} vs {ref.shape}")
    if min(x.shape[1:3]) < LPIPS_MIN_SIZE:
      raise ValueError(f"lpips (AlexNet) needs images of at least {LPIPS_MIN_SIZE}×"
                       f"{LPIPS_MIN_SIZE} pixels, got {x.shape[1:3]}")
    shift, scale = np.float32(LPIPS_SHIFT), np.float32(LPIPS_SCALE)
    both = jnp.concatenate([jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)])
    with jax.default_matmul_precision("highest"):
      feats = self.features(((2.0 * both - 1.0) - shift) / scale)
      total = jnp.zeros((x.shape[0],), jnp.float32)
      for f, lin in zip(feats, self.lins):
        f = f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + LPIPS_EPS)
        diff = jnp.square(f[:x.shape[0]] - f[x.shape[0]:])
        total = total + jnp.mean(diff @ lin[...][0, 0], axis=(1, 2, 3))
    return total
