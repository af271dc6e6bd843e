"""The CoTIR objective (spec §10) as pure functions, plus latent tokenisation and position ids (§6).

Flow matching as upstream writes it: x_1 = clean latent tokens, x_0 = Gaussian noise,
t = sigmoid(N(0, 1)), x_t = (1 − t)·x_1 + t·x_0, velocity target x_0 − x_1 (t = 1 is noise).
All losses are float32. `compat="upstream"` reproduces the bf16 casts of spec §10.3 / §12
(inputs, ids and timesteps in bf16, noise drawn in bf16, target formed in bf16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TEXT_KEYS = ("s", "d", "p")  # scene, degradation, plan (the adapter's 2nd..4th outputs)


def input_dtype(compat: str):
  """Dtype of the prepared model inputs: bf16 under compat="upstream" (spec §10.3), else f32."""
  return jnp.bfloat16 if compat == "upstream" else jnp.float32


# --------------------------------------------------------------------------- FLUX.2 tokens / ids

def flux2_tokens(latents: jax.Array) -> jax.Array:
  """[B, h, w, 128] → [B, h·w, 128], row-major ("b c h w → b (h w) c" in NCHW terms)."""
  b, h, w, c = latents.shape
  return latents.reshape(b, h * w, c)


def flux2_untokens(tokens: jax.Array, h: int, w: int) -> jax.Array:
  """Inverse of `flux2_tokens`: [B, h·w, C] → [B, h, w, C] for the VAE decoder."""
  return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1])


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
  """[B, H/8, W/8, 16] → [B, (H/16)(W/16), 64]; channel index c·4 + ph·2 + pw (spec §6.2).

  Same as einops "b c (hh ph) (ww pw) → b (hh ww) (c ph pw)" on the NCHW latent.
  """
  b, hh, ww, c = latents.shape
  x = latents.reshape(b, hh // 2, 2, ww // 2, 2, c)          # b hh ph ww pw c
  x = x.transpose(0, 1, 3, 5, 2, 4)                          # b hh ww c ph pw
  return x.reshape(b, (hh // 2) * (ww // 2), c * 4)


def flux1_unpack(tokens: jax.Array, h: int, w: int) -> jax.Array:
  """Inverse of `flux1_pack`: [B, h·w, C·4] → [B, 2h, 2w, C] with h, w the token grid."""
  b, _, cc = tokens.shape
  c = cc // 4
  x = tokens.reshape(b, h, w, c, 2, 2)                       # b hh ww c ph pw
  x = x.transpose(0, 1, 4, 2, 5, 3)                          # b hh ph ww pw c
  return x.reshape(b, 2 * h, 2 * w, c)


def flux1_img_ids(batch: int, h: int, w: int, t: float = 0.0, dtype=jnp.float32) -> jax.Array:
  """(t, row, col) over the h×w token grid: t = 0 target, t = 1 conditioning (Kontext)."""
  r, c = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
  ids = jnp.stack([jnp.zeros_like(r) + t, r, c], -1).reshape(h * w, 3)
  return jnp.broadcast_to(ids.astype(dtype), (batch, h * w, 3))


def flux1_txt_ids(batch: int, length: int, dtype=jnp.float32) -> jax.Array:
  """All zeros: every text token gets the identity rotation (spec §6.2)."""
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
  """(target ids, conditioning ids, text ids) for one family (spec §6)."""
  h, w = grid
  if family == "flux2":
    return (flux2_img_ids(batch, h, w, 0.0, dtype), flux2_img_ids(batch, h, w, COND_T[family], dtype),
            flux2_txt_ids(batch, txt_len, dtype))
  return (flux1_img_ids(batch, h, w, 0.0, dtype), flux1_img_ids(batch, h, w, COND_T[family], dtype),
          flux1_txt_ids(batch, txt_len, dtype))


def cast_inputs(tree, compat: str = "default"):
  """Casts every floating leaf (latents, features, ids, timesteps, vec) to the input dtype:
  bf16 under compat="upstream" (upstream's `check_tensor_consistency`, spec §10.3), else f32."""
  dt = input_dtype(compat)
  cast = lambda x: x.astype(dt) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x
  return jax.tree.map(cast, tree)


def model_inputs(x_t, x_c, ids_tgt, ids_cnd, txt, txt_ids, t, compat: str = "default"):
  """The positional arguments of the model call: (img, img_ids, txt, txt_ids, timesteps), with
  the clean conditioning tokens appended after the target tokens (spec §10.6)."""
  img = jnp.concatenate([x_t.astype(jnp.float32), x_c.astype(jnp.float32)], axis=1)
  ids = jnp.concatenate([ids_tgt, ids_cnd], axis=1)
  return cast_inputs((img, ids, txt, txt_ids, t), compat)


# --------------------------------------------------------------------------- flow matching

def sample_timesteps(keys: jax.Array) -> jax.Array:
  """t = sigmoid(ε), ε ~ N(0, 1) per row key, float32 [B] (logit-normal, no shift)."""
  return jax.nn.sigmoid(jax.vmap(lambda k: jax.random.normal(k, (), jnp.float32))(keys))


def flow_matching_inputs(keys: jax.Array, x_1: jax.Array, compat: str = "default"):
  """Returns (x_t, x_0, t): noise x_0 in the input dtype (bf16 under compat, spec §12), t f32,
  x_t = (1 − t)·x_1 + t·x_0 in float32 (type promotion, as upstream).

  `keys`: one key per row [B] (each sample's draws depend only on its own key), or a single
  key, split into one per row.
  """
  if keys.ndim == 0:
    keys = jax.random.split(keys, x_1.shape[0])
  pairs = jax.vmap(jax.random.split)(keys)
  x_0 = jax.vmap(lambda k: jax.random.normal(k, x_1.shape[1:], input_dtype(compat)))(pairs[:, 0])
  t = sample_timesteps(pairs[:, 1])
  tt = t[:, None, None]
  x_t = (1.0 - tt) * x_1.astype(jnp.float32) + tt * x_0.astype(jnp.float32)
  return x_t, x_0, t


def image_loss(velocity: jax.Array, x_0: jax.Array, x_1: jax.Array) -> jax.Array:
  """mean((v̂[:, :N_tgt] − (x_0 − x_1))²); the target is formed in the inputs' dtype (bf16 under
  compat, as upstream) and then upcast."""
  n_tgt = x_1.shape[1]
  target = (x_0 - x_1.astype(x_0.dtype)).astype(jnp.float32)
  return jnp.mean(jnp.square(velocity[:, :n_tgt].astype(jnp.float32) - target))


def l2_normalize(h: jax.Array, eps: float = 1e-6) -> jax.Array:
  """h / max(‖h‖₂, eps) per token over the last axis, float32 (torch F.normalize)."""
  h = h.astype(jnp.float32)
  return h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), eps)


def text_loss(pred: jax.Array, target: jax.Array, weight: jax.Array | None = None,
              norm: jax.Array | None = None) -> jax.Array:
  """MSE of per-token L2-normalised features over all B×L×D elements (padding included).

  With `weight` [B] (1: the sample has this answer, 0: it has none) the other samples are left
  out: their prediction is replaced by the target (no error, no gradient) and the mean is
  rescaled by B / norm, where `norm` is how many samples the mean is over (default Σ weight; one
  micro-batch of a larger batch passes that batch's count divided by the number of
  micro-batches, so the micro-batch losses average to the batch's). No sample with an answer
  gives 0. With every weight 1 and norm = B the same values reach the same mean, then × 1, so
  the numbers stay those of the unmasked loss (bit for bit over a tiny CPU training run; a
  weighted sum instead can be rewritten by XLA into a dot product that adds in another order).
  """
  p, t = l2_normalize(pred), l2_normalize(target)
  if weight is None:
    return jnp.mean(jnp.square(p - t))
  has = weight.reshape(-1, *([1] * (p.ndim - 1))) > 0
  norm = jnp.sum(weight.astype(jnp.float32)) if norm is None else jnp.asarray(norm, jnp.float32)
  return jnp.mean(jnp.square(jnp.where(has, p, t) - t)) * (p.shape[0] / jnp.where(norm > 0, norm, 1.0))


def losses(velocity, text_preds: dict, x_0, x_1, text_targets: dict, lambdas: dict,
           deltas: dict, answer_mask: jax.Array | None = None, norms: jax.Array | None = None):
  """The primal loss and its parts (spec §10.7-10).

  Returns (loss, aux) with aux = {img_loss, txt_{k}_loss, c: {k: c_k}}; c_k = L_k − δ_k and
  loss = L_img + Σ_k stop_gradient(λ_k)·c_k. All float32 scalars.

  `answer_mask` [B, 3] (TEXT_KEYS order) marks the samples that have each answer: L_k is the
  mean over those only (`text_loss`), with `norms` [3] the sample counts the means run over
  (default: this batch's). A term without any such sample has L_k = c_k = 0 and adds nothing.
  """
  l_img = image_loss(velocity, x_0, x_1)
  aux = {"img_loss": l_img, "c": {}}
  loss = l_img
  for i, k in enumerate(TEXT_KEYS):
    if answer_mask is None:
      l_k = text_loss(text_preds[k], text_targets[k])
      c_k = l_k - jnp.float32(deltas[k])
    else:
      weight = answer_mask[:, i].astype(jnp.float32)
      norm = jnp.sum(weight) if norms is None else norms[i]
      l_k = text_loss(text_preds[k], text_targets[k], weight, norm)
      c_k = jnp.where(norm > 0, l_k - jnp.float32(deltas[k]), 0.0)
    aux[f"txt_{k}_loss"] = l_k
    aux["c"][k] = c_k
    loss = loss + jax.lax.stop_gradient(jnp.asarray(lambdas[k], jnp.float32)) * c_k
  aux["loss"] = loss
  return loss, aux


def deltas_from_config(cfg) -> dict:
  """{k: δ_k} from training.delta_{s,d,p}."""
  return {k: float(cfg.training[f"delta_{k}"]) for k in TEXT_KEYS}
