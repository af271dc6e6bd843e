"""The CoTIR objective as pure functions.

Flow matching as upstream writes it: x_1 = clean latent tokens, x_0 = Gaussian noise,
t = sigmoid(N(0, 1)), x_t = (1 − t)·x_1 + t·x_0, velocity target x_0 − x_1 (t = 1 is noise).
All losses are float32. `compat="upstream"` reproduces upstream's bf16 casts
(inputs, ids and timesteps in bf16, noise drawn in bf16, target formed in bf16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cotir_jax import latents

TEXT_KEYS = ("s", "d", "p")  # scene, degradation, plan (the adapter's 2nd..4th outputs)


def cast_inputs(tree, compat: str = "default"):
  """Casts every floating leaf (latents, features, ids, timesteps, vec) to the input dtype:
  bf16 under compat="upstream" (upstream's `check_tensor_consistency`), else f32."""
  dt = latents.input_dtype(compat)
  cast = lambda x: x.astype(dt) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x
  return jax.tree.map(cast, tree)


def model_inputs(x_t, x_c, ids_tgt, ids_cnd, txt, txt_ids, t, compat: str = "default"):
  """The positional arguments of the model call: (img, img_ids, txt, txt_ids, timesteps), with
  the clean conditioning tokens appended after the target tokens."""
  img = jnp.concatenate([x_t.astype(jnp.float32), x_c.astype(jnp.float32)], axis=1)
  ids = jnp.concatenate([ids_tgt, ids_cnd], axis=1)
  return cast_inputs((img, ids, txt, txt_ids, t), compat)


# --------------------------------------------------------------------------- flow matching

def sample_timesteps(keys: jax.Array, shift: float = 1.0) -> jax.Array:
  """t = sigmoid(ε), ε ~ N(0, 1) per row key, float32 [B] (logit-normal, upstream's draw).

  `shift` s ≠ 1 maps t → s·t / (1 + (s − 1)·t) (the sampler's resolution shift, applied to the
  draw): s > 1 moves training towards the high-noise timesteps that a few-step FLUX schedule
  spends most of its evaluations on."""
  t = jax.nn.sigmoid(jax.vmap(lambda k: jax.random.normal(k, (), jnp.float32))(keys))
  return t if shift == 1.0 else shift * t / (1.0 + (shift - 1.0) * t)


def flow_matching_inputs(keys: jax.Array, x_1: jax.Array, compat: str = "default",
                         shift: float = 1.0):
  """Returns (x_t, x_0, t): noise x_0 in the input dtype (bf16 under compat, as upstream), t f32,
  x_t = (1 − t)·x_1 + t·x_0 in float32 (type promotion, as upstream).

  `keys`: one key per row [B] (each sample's draws depend only on its own key), or a single
  key, split into one per row. `shift`: see `sample_timesteps`.
  """
  if keys.ndim == 0:
    keys = jax.random.split(keys, x_1.shape[0])
  pairs = jax.vmap(jax.random.split)(keys)
  dtype = latents.input_dtype(compat)
  x_0 = jax.vmap(lambda k: jax.random.normal(k, x_1.shape[1:], dtype))(pairs[:, 0])
  t = sample_timesteps(pairs[:, 1], shift)
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
  """The primal loss and its parts.

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
