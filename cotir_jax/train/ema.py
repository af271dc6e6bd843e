"""An exponential moving average of the trainable weights (`training.ema_decay`; 0 turns it off).

Averaged weights usually sample better than the last step's, above all late in a run at a
still-large learning rate. The average lives in the training state as `state["ema"]`: the
params' tree in float32 (a bf16 average would round away updates of (1 - decay) · Δ), with
the params' Variables, so it is sharded like them, updated inside the jitted step, saved in
every checkpoint and restored bit for bit on resume.

Warm-up, as diffusers' `EMAModel` does by default: update n (0 for the first step) uses
min(decay, (1 + n) / (10 + n)), 0.1 at the first step, 0.9 from n = 80, 0.99 from n = 890. A
plain decay of 0.999 would keep the initial weights' share at 37% after 1000 steps; with the
warm-up the average follows the training from the start.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init(params):
  """The average of weights that have taken no step: the weights, in float32."""
  return jax.tree.map(lambda p: p.astype(jnp.float32), params)


def decay_at(decay: float, n: jax.Array) -> jax.Array:
  """The decay update `n` (0-based) uses: `decay`, lowered by the warm-up early on."""
  n = n.astype(jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def update(ema, params, decay: float, n: jax.Array):
  """ema ← ema − (1 − d)(ema − params), d = `decay_at(decay, n)`, all in float32."""
  d = decay_at(decay, n)
  return jax.tree.map(lambda e, p: e - (1.0 - d) * (e - p.astype(jnp.float32)), ema, params)


def as_params(ema, params):
  """The average in the params' dtypes, as validation samples with it."""
  return jax.tree.map(lambda e, p: e.astype(p.dtype), ema, params)
