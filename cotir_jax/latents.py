"""VAE latents as transformer tokens, their RoPE position ids, and the dtypes they are fed in.

What training and inference both feed the model: FLUX.2 (klein) flattens its 128-channel
latents at H/16 row-major; FLUX.1 (Kontext) packs 2×2 patches of its 16-channel latents at H/8.
Position ids give each image token (t, row, col[, 0]) with t = 0 for the target and a family
constant for the conditioning image, and each text token its own id (FLUX.2) or none (FLUX.1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange


def input_dtype(compat: str):
  """Dtype of the model inputs: bf16 under compat="upstream" (upstream casts every input to its
  bf16 weight dtype), else float32."""
  return jnp.bfloat16 if compat == "upstream" else jnp.float32


def latent_dtype(family: str, compat: str):
  """Dtype of the autoencoder latents, in which upstream's sampler starts and keeps its state:
  under compat="upstream" bf16 for FLUX.2 (upstream loads klein's VAE in bf16) and float32 for
  FLUX.1 (its `ae.safetensors` is float32 and loaded as stored); float32 otherwise."""
  return jnp.bfloat16 if compat == "upstream" and family == "flux2" else jnp.float32


# --------------------------------------------------------------------------- FLUX.2 tokens / ids

def flux2_tokens(latents: jax.Array) -> jax.Array:
  """[B, h, w, 128] → [B, h·w, 128], row-major."""
  return rearrange(latents, "b h w c -> b (h w) c")


def flux2_untokens(tokens: jax.Array, h: int, w: int) -> jax.Array:
  """Inverse of `flux2_tokens`: [B, h·w, C] → [B, h, w, C] for the VAE decoder."""
  return rearrange(tokens, "b (h w) c -> b h w c", h=h, w=w)


def flux2_img_ids(batch: int, h: int, w: int, t: float = 0.0, dtype=jnp.float32) -> jax.Array:
  """(t, row, col, 0) per token, row-major: t = 0 for the target, t = 10 for the conditioning."""
  r, c = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
  ids = jnp.stack([jnp.full_like(r, 0) + t, r, c, jnp.zeros_like(r)], -1).reshape(h * w, 4)
  return jnp.broadcast_to(ids.astype(dtype), (batch, h * w, 4))


def flux2_txt_ids(batch: int, length: int, dtype=jnp.float32) -> jax.Array:
  """(0, 0, 0, l) for l = 0..length−1."""
  l = jnp.arange(length, dtype=jnp.float32)
  ids = jnp.stack([jnp.zeros_like(l)] * 3 + [l], -1)
  return jnp.broadcast_to(ids.astype(dtype), (batch, length, 4))


# --------------------------------------------------------------------------- FLUX.1 tokens / ids

def flux1_pack(latents: jax.Array) -> jax.Array:
  """[B, H/8, W/8, 16] → [B, (H/16)(W/16), 64]; channel index c·4 + ph·2 + pw, as BFL packs."""
  return rearrange(latents, "b (h ph) (w pw) c -> b (h w) (c ph pw)", ph=2, pw=2)


def flux1_unpack(tokens: jax.Array, h: int, w: int) -> jax.Array:
  """Inverse of `flux1_pack`: [B, h·w, C·4] → [B, 2h, 2w, C] with h, w the token grid."""
  return rearrange(tokens, "b (h w) (c ph pw) -> b (h ph) (w pw) c", h=h, w=w, ph=2, pw=2)


def flux1_img_ids(batch: int, h: int, w: int, t: float = 0.0, dtype=jnp.float32) -> jax.Array:
  """(t, row, col) over the h×w token grid: t = 0 target, t = 1 conditioning (Kontext)."""
  r, c = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
  ids = jnp.stack([jnp.zeros_like(r) + t, r, c], -1).reshape(h * w, 3)
  return jnp.broadcast_to(ids.astype(dtype), (batch, h * w, 3))


def flux1_txt_ids(batch: int, length: int, dtype=jnp.float32) -> jax.Array:
  """All zeros: every text token gets the identity rotation, as FLUX.1 gives text."""
  return jnp.zeros((batch, length, 3), dtype)


# --------------------------------------------------------------------------- family dispatch

COND_T = {"flux2": 10.0, "flux1": 1.0}


def image_tokens(latents: jax.Array, family: str) -> jax.Array:
  """VAE latents → transformer tokens for either family."""
  return flux2_tokens(latents) if family == "flux2" else flux1_pack(latents)


def tokens_to_latents(tokens: jax.Array, grid: tuple[int, int], family: str) -> jax.Array:
  """Transformer tokens → VAE latents; `grid` = (h, w) of the token grid (H/16, W/16)."""
  h, w = grid
  return flux2_untokens(tokens, h, w) if family == "flux2" else flux1_unpack(tokens, h, w)


def token_grid(latents_shape, family: str) -> tuple[int, int]:
  """(h, w) of the token grid of a latent batch shape [B, H', W', C]."""
  _, h, w, _ = latents_shape
  return (h, w) if family == "flux2" else (h // 2, w // 2)


def position_ids(batch: int, grid: tuple[int, int], txt_len: int, family: str, dtype=jnp.float32):
  """(target ids, conditioning ids, text ids) for one family."""
  h, w = grid
  if family == "flux2":
    return (flux2_img_ids(batch, h, w, 0.0, dtype), flux2_img_ids(batch, h, w, COND_T[family], dtype),
            flux2_txt_ids(batch, txt_len, dtype))
  return (flux1_img_ids(batch, h, w, 0.0, dtype), flux1_img_ids(batch, h, w, COND_T[family], dtype),
          flux1_txt_ids(batch, txt_len, dtype))
