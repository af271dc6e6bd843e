"""The primal-dual optimiser of CoTIR (spec §11) as ONE optax `GradientTransformation`.

The optimised pytree is `{"params": <trainable nnx.State>, "lambdas": {"s", "d", "p"}}`:

* primal (`params`): torch-style `clip_grad_norm_` (scale min(1, max_norm / (‖g‖ + 1e-6))) then
  torch AdamW (decoupled weight decay on every trainable leaf) with the lr of `lr_schedule`;
* dual (`lambdas`): Adam(`lambda_lr`, 0.9, 0.999, 1e-8) *ascent* on the Lagrange multipliers,
  then the projection λ ← max(λ, 0).

How c reaches the dual part: the primal loss holds λ constant (stop_gradient), so autodiff gives
λ no useful gradient. The step instead passes the dual gradient explicitly,
`grads = join_grads(param_grads, c)`, whose `lambdas` leaf k is −c_k (the gradient of
the dual loss −Σ λ_k c_k; minimising it with Adam is ascent on λ). Inside one `jax.jit` over
the global batch c is already the global average, so every data-parallel replica computes the
same λ (upstream's per-rank λ drift, spec §11.5, does not happen). A term that no sample of
the batch has an answer for (`join_grads(..., valid)`) gets no dual step: its λ and moments are
kept, and the bias corrections keep counting optimizer updates.

Typical use in the train step::

    tx = optim.make_optimizer(cfg)
    opt_state = tx.init({"params": params, "lambdas": optim.init_lambdas()})
    ...
    (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params, lambdas)   # aux["c"]
    grads = optim.join_grads(g, aux["c"])
    updates, opt_state = tx.update(grads, opt_state, {"params": params, "lambdas": lambdas})
    new = optax.apply_updates({"params": params, "lambdas": lambdas}, updates)
    lr = optim.lr_schedule(cfg)(opt_state.count - 1)     # the lr this update used
    gnorm = opt_state.grad_norm                          # pre-clip global norm, for logging

Precision: moments are stored in the dtype of their parameter (float32 masters by default; bf16
under compat="upstream", where the model builds bf16 trainable params — torch's AdamW keeps its
state in the param dtype, spec §11.2). Arithmetic runs in float32 and is rounded to the
gradient / storage dtype wherever torch's bf16 kernels round: the clip norms and coefficient,
the clipped gradient, m and v (v twice: ×β2, then +(1−β2)g²), the denominator's three steps,
the parameter after the weight decay and again after the Adam step. With bf16 params this
matches torch's CPU AdamW bit for bit up to rare 1-ulp differences (tested); with float32 params
it is torch's float32 computation operation for operation, its bias corrections included (exact
to float32, `_one_minus_pow`). Compiled, XLA may fuse a multiply and an add into one FMA or
divide by a scalar through its reciprocal: 1-ulp differences, no drift (tested both ways).
Updates are returned in float32 so that `optax.apply_updates` (p + u, cast to p.dtype) lands
exactly on the rounded parameter.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

LAMBDA_KEYS = ("s", "d", "p")


# --------------------------------------------------------------------------- schedules

def _schedule_numbers(cfg):
  t = cfg.training
  if t.lr_scheduler != "cosine":
    raise ValueError(f"training.lr_scheduler={t.lr_scheduler!r} is not supported; only 'cosine'")
  return (float(t.learning_rate), float(t.min_learning_rate), int(t.lr_warmup_steps),
          int(t.iterations[-1]), cfg.get("compat", "default") == "upstream")


def lr_unfloored(cfg):
  """k ↦ learning_rate·f(k) (diffusers' cosine-with-warmup in optimizer steps, spec §11.4).

  This is what upstream logs as `learning_rate` (get_last_lr() before the floor).
  f(k) = k/warmup for k < warmup, else max(0, 0.5(1 + cos(π(k − warmup)/(total − warmup)))).
  """
  lr, _, warmup, total, _ = _schedule_numbers(cfg)

  def schedule(k):
    k = jnp.asarray(k, jnp.float32)
    warm = k / max(1, warmup)
    progress = (k - warmup) / max(1, total - warmup)
    cos = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * progress)))
    return lr * jnp.where(k < warmup, warm, cos)

  return schedule


def lr_schedule(cfg):
  """k ↦ the learning rate of the k-th optimizer update (k = 0, 1, ...), spec §11.4.

  lr(k) = max(min_learning_rate, learning_rate·f(k)) for every k ≥ 1.

  k = 0: under compat="upstream" the lr is exactly 0 (LambdaLR sets base·f(0) = 0 before the
  first floor is applied, so upstream's first step only fills the Adam moments). By default
  the floor applies to k = 0 as well (lr = min_learning_rate): the closed form of §11.4 holds
  for every step and the first batch is not wasted; the 0 is an artefact of the order of
  torch's scheduler calls, not part of the method (design decision 3).
  """
  base = lr_unfloored(cfg)
  _, min_lr, _, _, upstream = _schedule_numbers(cfg)

  def schedule(k):
    k = jnp.asarray(k)
    lr = jnp.maximum(min_lr, base(k))
    if upstream:
      lr = jnp.where(k == 0, 0.0, lr)
    return lr

  return schedule


def use_gen_prob(cfg, step):
  """Probability of the generic prompt at `step` (spec §11.6): value of the largest key ≤ step.

  0 before the first key (upstream's default), clipped to [0, 1] (spec §10.1). Works with a
  Python int or a traced int inside jit.
  """
  items = sorted((int(k), float(v)) for k, v in dict(cfg.training.use_gen).items())
  if not items:
    return jnp.float32(0.0)
  keys = jnp.asarray([k for k, _ in items], jnp.int32)
  values = jnp.asarray([0.0] + [v for _, v in items], jnp.float32)
  idx = jnp.searchsorted(keys, jnp.asarray(step, jnp.int32), side="right")
  return jnp.clip(values[idx], 0.0, 1.0)


# --------------------------------------------------------------------------- the chain

class PrimalDualState(NamedTuple):
  """Optimizer state; `count` is the number of updates applied so far (k of the next one)."""
  count: jax.Array            # int32 scalar
  mu: Any                     # primal first moments (like params)
  nu: Any                     # primal second moments (like params)
  lambda_mu: dict             # dual Adam moments, float32 scalars
  lambda_nu: dict
  grad_norm: jax.Array        # global L2 norm of the last primal gradient, before clipping


def init_lambdas() -> dict:
  """λ_s, λ_d, λ_p as float32 scalars, initialised to 0 (spec §11.5)."""
  return {k: jnp.zeros((), jnp.float32) for k in LAMBDA_KEYS}


def dual_grads(c: dict) -> dict:
  """The gradient of the dual loss −Σ λ_k c_k with respect to λ: {k: −c_k} (float32)."""
  return {k: -jnp.asarray(c[k], jnp.float32) for k in LAMBDA_KEYS}


def join_grads(param_grads, c: dict, valid: dict | None = None) -> dict:
  """The gradient pytree the chain expects: primal grads plus the dual gradient from c.

  `valid` {k: bool scalar} (default all True): False for a term that no sample of the global
  batch has an answer for; its dual step is skipped (λ_k and its Adam moments stay as they are),
  so λ_k moves only on evidence from samples that carry that answer.
  """
  valid = {k: jnp.asarray(True if valid is None else valid[k], bool) for k in LAMBDA_KEYS}
  return {"params": param_grads, "lambdas": dual_grads(c), "lambda_valid": valid}


def global_norm(tree) -> jax.Array:
  """L2 norm over all leaves, accumulated in float32."""
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _rnd(x, dtype):
  """Round a float32 intermediate to a storage dtype, back in float32 for further maths."""
  return x.astype(dtype).astype(jnp.float32)


def _torch_clip_scale(grads, max_norm):
  """(global norm, clip coefficient) as torch.nn.utils.clip_grad_norm_ computes them.

  coef = min(1, max_norm / (‖g‖ + 1e-6)). Torch works in the gradients' dtype: per-tensor
  norms, the total norm and the coefficient are rounded to it (bf16 under compat); with
  float32 gradients this is the plain float32 computation.
  """
  leaves = jax.tree.leaves(grads)
  if not leaves:
    return jnp.float32(0.0), jnp.float32(1.0)
  dt = jnp.result_type(*leaves)
  norms = [_rnd(jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)))), x.dtype) for x in leaves]
  total = _rnd(jnp.sqrt(sum(jnp.square(n) for n in norms)), dt)
  if max_norm is None:
    return total, jnp.float32(1.0)
  coef = _rnd(max_norm / _rnd(total + 1e-6, dt), dt)
  return total, jnp.minimum(coef, 1.0)


def _one_minus_pow(b: float, t) -> jax.Array:
  """1 − b**t in float32 for a Python float `b` and float32 step `t`, within 2 ulp of exact.

  torch computes Adam's bias corrections in double. Evaluated in float32, b = 0.999 rounds to
  0.99900001 and 1 − b**t comes out up to 1.3e-5 (relative) too large, so every Adam step would
  be ~6.6e-6 too small. −expm1(t·log b), with log b taken in double, has neither the rounded b
  nor the cancellation.
  """
  if b == 0.0:
    return jnp.float32(1.0)
  return -jnp.expm1(t * jnp.float32(math.log(b)))


def primal_dual(learning_rate, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                weight_decay: float = 0.01, max_grad_norm: float | None = 1.0,
                lambda_lr: float = 1e-4, lambda_b1: float = 0.9, lambda_b2: float = 0.999,
                lambda_eps: float = 1e-8, moment_dtype=None) -> optax.GradientTransformation:
  """Clip + torch AdamW on `params`, projected Adam ascent on `lambdas` (see module docstring).

  `learning_rate`: a float or a schedule k ↦ lr evaluated at k = state.count.
  `moment_dtype`: None stores each moment in its parameter's dtype (torch's behaviour).
  """
  sched = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init(params):
    p = params["params"]
    mdt = lambda x: moment_dtype or x.dtype
    zeros = lambda x: jnp.zeros(x.shape, mdt(x))
    lam = {k: jnp.zeros((), jnp.float32) for k in params["lambdas"]}
    return PrimalDualState(count=jnp.zeros((), jnp.int32), mu=jax.tree.map(zeros, p),
                           nu=jax.tree.map(zeros, p), lambda_mu=lam, lambda_nu=dict(lam),
                           grad_norm=jnp.zeros((), jnp.float32))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("primal_dual needs params (weight decay and the λ ≥ 0 projection)")
    k = state.count
    t = (k + 1).astype(jnp.float32)          # torch's 1-based step for the bias corrections
    lr = jnp.asarray(sched(k), jnp.float32)

    # primal: torch clip_grad_norm_ (note the + 1e-6) ...
    g_tree, p_tree = grads["params"], params["params"]
    gnorm, scale = _torch_clip_scale(g_tree, max_grad_norm)
    bc1 = _one_minus_pow(b1, t)
    bc2_sqrt = jnp.sqrt(_one_minus_pow(b2, t))

    # ... then torch AdamW (decay first, then the Adam step), rounded as torch rounds.
    def leaf(g, p, m, v):
      sdt, pdt = m.dtype, p.dtype
      g = _rnd(g.astype(jnp.float32) * scale, g.dtype)                 # grads.mul_(coef)
      m32, v32 = m.astype(jnp.float32), v.astype(jnp.float32)
      m_new = _rnd(m32 + (1.0 - b1) * (g - m32), sdt)                 # lerp
      v_new = _rnd(_rnd(v32 * b2, sdt) + (1.0 - b2) * g * g, sdt)       # mul_, addcmul_
      denom = _rnd(_rnd(_rnd(jnp.sqrt(v_new), sdt) / bc2_sqrt, sdt) + eps, sdt)
      step = (lr / bc1) * m_new / denom
      p32 = p.astype(jnp.float32)
      decayed = _rnd(p32 * (1.0 - lr * weight_decay), pdt)
      u = _rnd(decayed - step, pdt) - p32   # exact: p + u == the torch-rounded parameter
      return u, m_new.astype(sdt), v_new.astype(sdt)

    treedef = jax.tree.structure(g_tree)
    flat = [treedef.flatten_up_to(x) for x in (g_tree, p_tree, state.mu, state.nu)]
    out = [leaf(*xs) for xs in zip(*flat)]
    u_p, mu, nu = (treedef.unflatten([o[i] for o in out]) for i in range(3))

    # dual: Adam on the dual loss (gradient −c), then project onto λ ≥ 0.
    lbc1 = _one_minus_pow(lambda_b1, t)
    lbc2_sqrt = jnp.sqrt(_one_minus_pow(lambda_b2, t))
    u_l, lmu, lnu = {}, {}, {}
    valid = grads.get("lambda_valid", {})
    for key, g in grads["lambdas"].items():
      g = jnp.asarray(g, jnp.float32)
      lam = jnp.asarray(params["lambdas"][key], jnp.float32)
      m_k = state.lambda_mu[key] + (1.0 - lambda_b1) * (g - state.lambda_mu[key])
      v_k = lambda_b2 * state.lambda_nu[key] + (1.0 - lambda_b2) * g * g
      denom = jnp.sqrt(v_k) / lbc2_sqrt + lambda_eps
      new = jnp.maximum(lam - (lambda_lr / lbc1) * m_k / denom, 0.0)
      ok = valid.get(key, True)  # no answer for this term in the batch: no dual step at all
      lmu[key] = jnp.where(ok, m_k, state.lambda_mu[key])
      lnu[key] = jnp.where(ok, v_k, state.lambda_nu[key])
      u_l[key] = jnp.where(ok, new - lam, 0.0)  # λ + u_l ≥ 0 exactly (and == 0 when projected)

    new_state = PrimalDualState(count=k + 1, mu=mu, nu=nu, lambda_mu=lmu, lambda_nu=lnu,
                                grad_norm=gnorm)
    return {"params": u_p, "lambdas": u_l}, new_state

  return optax.GradientTransformation(init, update)


def make_optimizer(cfg, moment_dtype=None) -> optax.GradientTransformation:
  """The chain of spec §11 from `cfg.training` (lr schedule of `lr_schedule(cfg)`)."""
  t = cfg.training
  return primal_dual(lr_schedule(cfg), b1=float(t.adam_beta1), b2=float(t.adam_beta2),
                     eps=float(t.adam_epsilon), weight_decay=float(t.adam_weight_decay),
                     max_grad_norm=float(t.max_grad_norm), lambda_lr=float(t.lambda_lr),
                     moment_dtype=moment_dtype)
