"""Euler sampler with upstream's timestep schedules: validation images and inference.

Time runs from t = 1 (noise) to t = 0 (data); the model predicts v = noise − data, so each step
is x ← x + (t_next − t_cur)·v. The clean conditioning tokens are re-fed every step with the
same timestep as the noisy tokens (BFL's non-cached `denoise`). `restore_images` is the whole
LQ → result path (VAE encode, sample, decode); `resize_bicubic` and `to_uint8` are upstream's
host-side resize and output cast.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cotir_jax import latents


def _time_shift(mu: float, ts: np.ndarray) -> np.ndarray:
  """σ(t) = e^μ / (e^μ + (1/t − 1)) in float32 like torch (t = 0 → 0)."""
  with np.errstate(divide="ignore"):
    inv = (np.float32(1.0) / ts - np.float32(1.0)).astype(np.float32)
  e = np.float32(math.exp(mu))
  return (e / (e + inv)).astype(np.float32)


def _linspace_1_0(n: int) -> np.ndarray:
  return np.linspace(1.0, 0.0, n + 1, dtype=np.float64).astype(np.float32)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
  """FLUX.2's empirical μ(N, n) (klein): the schedule shift for N image tokens, n steps."""
  a1, b1 = 8.73809524e-05, 1.89833333
  a2, b2 = 0.00016927, 0.45666666
  if image_seq_len > 4300:
    return float(a2 * image_seq_len + b2)
  m_200 = a2 * image_seq_len + b2
  m_10 = a1 * image_seq_len + b1
  a = (m_200 - m_10) / 190.0
  return float(a * num_steps + (m_200 - 200.0 * a))


def get_schedule_flux2(num_steps: int, image_seq_len: int) -> list[float]:
  """klein: linspace(1, 0, n+1) shifted with the empirical μ."""
  mu = empirical_mu(image_seq_len, num_steps)
  return [float(x) for x in _time_shift(mu, _linspace_1_0(num_steps))]


def get_schedule(num_steps: int, image_seq_len: int, base_shift: float = 0.5,
                 max_shift: float = 1.15, shift: bool = True) -> list[float]:
  """FLUX.1 / Kontext: μ linear in N through (256, 0.5) and (4096, 1.15)."""
  ts = _linspace_1_0(num_steps)
  if shift:
    m = (max_shift - base_shift) / (4096 - 256)
    mu = m * image_seq_len + (base_shift - m * 256)
    ts = _time_shift(mu, ts)
  return [float(x) for x in ts]


def schedule(family: str, num_steps: int, image_seq_len: int) -> list[float]:
  """The schedule upstream uses for a family ("flux2" klein, "flux1" Kontext)."""
  if family == "flux2":
    return get_schedule_flux2(num_steps, image_seq_len)
  if family == "flux1":
    return get_schedule(num_steps, image_seq_len, shift=True)
  raise ValueError(f"unknown family {family!r}; expected 'flux2' or 'flux1'")


def euler_sample(velocity_fn: Callable, x_c: jax.Array, img_ids: jax.Array, cond_ids: jax.Array,
                 txt: jax.Array, txt_ids: jax.Array, *, num_steps: int, family: str,
                 key: jax.Array | None, vec: jax.Array | None = None, guidance: float | None = 4.0,
                 noise: jax.Array | None = None, dtype=None, state_dtype=jnp.float32,
                 timesteps: jax.Array | None = None) -> jax.Array:
  """Restores target tokens [B, N_tgt, C] from clean conditioning tokens x_c [B, N_cnd, C].

  `velocity_fn(img, img_ids, txt, txt_ids, timesteps, vec, guidance)` returns the velocity of
  all image tokens (e.g. `lambda *a: model(*a)[0]`); only the first N_tgt are used. The target
  has x_c's shape (N_tgt = N_cnd in CoTIR). The schedule is static (num_steps and N are
  shapes), the loop is a `fori_loop`, so the whole call can sit under `jax.jit`.
  `noise` overrides the N(0, I) start drawn from `key`. `timesteps` [B, num_steps + 1] gives
  every sample its own schedule (images padded to a shared shape keep the schedule of their
  own token count); default: `schedule(family, num_steps, N_tgt)`.

  Dtypes follow upstream's loop and torch's type promotion: every model input is cast to
  `dtype` (x_c's dtype by default) and the velocity is taken in `dtype`, as a model run in its
  weights' dtype returns it; the noise and x_c are rounded to `state_dtype` (upstream: its
  autoencoder latents' dtype, `latents.latent_dtype`) and the state lives in the wider of the
  two; each step adds dt·v after rounding that product to `dtype`. The timestep and the
  guidance pass through the state's dtype on their way to `dtype`. Returns the final state.
  """
  dtype = jnp.dtype(dtype or x_c.dtype)
  carry = jnp.promote_types(state_dtype, dtype)
  b, n_tgt = x_c.shape[0], x_c.shape[1]
  if timesteps is None:
    timesteps = jnp.asarray(schedule(family, num_steps, n_tgt), jnp.float32)
  ts = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b, num_steps + 1))
  if noise is None and key is None:
    raise ValueError("euler_sample needs a PRNG key (or the starting noise)")
  x = noise if noise is not None else jax.random.normal(key, x_c.shape, jnp.float32)
  x = x.astype(state_dtype).astype(carry)
  cond = x_c.astype(state_dtype).astype(dtype)
  ids = jnp.concatenate([img_ids, cond_ids], axis=1).astype(dtype)
  txt, txt_ids = txt.astype(dtype), txt_ids.astype(dtype)
  vec = None if vec is None else vec.astype(dtype)
  g = None if guidance is None else jnp.full((b,), guidance, state_dtype).astype(dtype)

  def body(i, x):
    # upstream rounds t to its state's dtype: state_dtype at step 0, where t = 1 is exact in any
    t_cur, t_next = ts[:, i], ts[:, i + 1]
    img = jnp.concatenate([x.astype(dtype), cond], axis=1)
    v = velocity_fn(img, ids, txt, txt_ids, t_cur.astype(carry).astype(dtype), vec, g)
    v = v[:, :n_tgt].astype(dtype).astype(jnp.float32)
    dt = (t_next - t_cur)[:, None, None]  # torch: a Python float, as float32 in the product
    update = (dt * v).astype(dtype)
    return (x.astype(jnp.float32) + update.astype(jnp.float32)).astype(carry)

  return jax.lax.fori_loop(0, num_steps, body, x)


def restore_images(model, vae, lq: jax.Array, txt: jax.Array, *, family: str, num_steps: int,
                   keys: jax.Array, vec: jax.Array | None = None, guidance: float | None = None,
                   timesteps: jax.Array | None = None, compat: str = "default") -> jax.Array:
  """LQ images [B, H, W, 3] in [-1, 1] → restored images of the same shape.

  The VAE latent tokens of the LQ images condition `num_steps` Euler steps of the CoTIR
  `model` on text features `txt` (`vec`: FLUX.1's CLIP vector), starting from N(0, I) noise
  drawn per sample from `keys` [B] (a result does not depend on its batch mates); the VAE
  decodes the final tokens. H and W are multiples of 16. `compat="upstream"` samples with
  upstream's dtypes (`latents.input_dtype`, `latents.latent_dtype`).
  """
  lat = vae.encode(lq)
  x_c = latents.image_tokens(lat, family)
  grid = latents.token_grid(lat.shape, family)
  ids_tgt, ids_cnd, txt_ids = latents.position_ids(lq.shape[0], grid, txt.shape[1], family)
  noise = jax.vmap(lambda k: jax.random.normal(k, x_c.shape[1:], jnp.float32))(keys)
  tokens = euler_sample(
      lambda img, ids, t, t_ids, ts, v, g: model(img, ids, t, t_ids, ts, vec=v, guidance=g)[0],
      x_c, ids_tgt, ids_cnd, txt, txt_ids, num_steps=num_steps, family=family, key=None,
      vec=vec, guidance=guidance, noise=noise, dtype=latents.input_dtype(compat),
      state_dtype=latents.latent_dtype(family, compat), timesteps=timesteps)
  return vae.decode(latents.tokens_to_latents(tokens, grid, family))


def to_uint8(images) -> np.ndarray:
  """Images in [-1, 1] → uint8 like upstream: clamp, (x + 1)·127.5, truncating cast (on host)."""
  x = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
  return ((x + 1.0) * 127.5).astype(np.uint8)  # float → uint8 truncates toward zero


def _cubic_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices [n_out, 4], weights [n_out, 4]) of torch's bicubic, align_corners=False: source
  x = (i + 0.5)·n_in/n_out − 0.5 (not clamped; one rounding, as torch's fused multiply-add
  gives), Keys kernel a = −0.75, border taps clamped."""
  a = np.float32(-0.75)
  scale = np.float64(np.float32(n_in) / np.float32(n_out))
  src = ((np.arange(n_out) + 0.5) * scale - 0.5).astype(np.float32)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  t = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1            # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a       # 1 < |x| < 2
  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1).astype(np.float32)
  index = np.clip(i0[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
  return index, weights


def _resize_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
  if x.shape[axis] == size:
    return x
  index, weights = _cubic_taps(x.shape[axis], size)
  shape = [1] * x.ndim
  shape[axis] = size
  out = np.take(x, index[:, 0], axis=axis) * weights[:, 0].reshape(shape)
  for k in range(1, 4):  # one tap at a time: no [.., size, 4, ..] temporary
    out += np.take(x, index[:, k], axis=axis) * weights[:, k].reshape(shape)
  return out


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """HWC float32 → [height, width, C]: what `F.interpolate(mode="bicubic",
  align_corners=False)` computes (no antialias, no clamping), as upstream's inference.py
  resizes to a multiple of 16 and back."""
  x = np.asarray(image, np.float32)
  return _resize_axis(_resize_axis(x, height, 0), width, 1)
