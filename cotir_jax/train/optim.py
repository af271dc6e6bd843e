"""CoTIR's primal-dual optimizer as optax chains: one for the weights, one per multiplier.

The optimized pytree is `{"params": <trainable nnx.State>, "lambdas": {"s", "d", "p"}}`;
`make_optimizer` is an `optax.multi_transform` over it:

* `params`: clip the global gradient norm, then AdamW with the lr of `lr_schedule`, as upstream
  trains (torch's `clip_grad_norm_` + `AdamW`);
* each λ_k: Adam on the dual loss −Σ λ_k c_k (descending it is ascent on λ), then λ_k ≥ 0.
  Each λ_k has its own Adam state, as in torch, so that a batch without evidence for λ_k
  (`join_grads(..., valid)`) can leave λ_k and its state as they are.

The primal loss holds λ constant, so autodiff gives λ no gradient: the step passes it,
`join_grads(param_grads, c)`, as −c_k. c is the mean over the global batch, so every
data-parallel replica computes the same λ.

optax's pieces are used where they compute torch's numbers to 1e-6 over a 120-step float32
trajectory; the custom pieces are where they do not:
* `scale_by_torch_adam`: torch takes the bias corrections 1 − β^t in double. In float32 they
  come out up to 1.3e-5 too large, and with `optax.scale_by_adam` λ drifts 8.5e-6 from torch's.
* `torch_adamw_step`: torch decays p by the factor (1 − lr·wd), rounded, before the Adam step;
  `optax.add_decayed_weights` decays exactly and ends 1.6e-6 away.
* compat="upstream" keeps the weights and Adam moments in bf16, as upstream does; the torch_*
  pieces then round where torch's bf16 kernels round (bit for bit but for rare 1-ulp
  differences), and the clip is `torch_clip_by_global_norm`, which rounds its norms too.

Updates are float32, so that `optax.apply_updates` lands exactly on the parameter torch holds.
"""

from __future__ import annotations

import math
from typing import NamedTuple

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
  """k ↦ learning_rate·f(k), diffusers' cosine-with-warmup counted in optimizer updates.

  This is what upstream logs as `learning_rate` (the scheduler's value before its floor).
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
  """k ↦ the learning rate of the update applied after k updates (k = 0, 1, ...).

  lr(k) = max(min_learning_rate, learning_rate·f(k)) for every k ≥ 1.

  k = 0: under compat="upstream" the lr is exactly 0, as upstream's first step runs before its
  scheduler first applies the floor (LambdaLR starts at base·f(0) = 0): that step only fills
  the Adam moments. By default the floor holds from k = 0 on, so the first batch is not
  wasted; the 0 comes from the order of torch's scheduler calls, not from the method.
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
  """Probability of the generic prompt at `step`: the value of the largest key ≤ step.

  0 before the first key (upstream's default), clipped to [0, 1]. Works with a Python int or a
  traced int inside jit.
  """
  items = sorted((int(k), float(v)) for k, v in dict(cfg.training.use_gen).items())
  if not items:
    return jnp.float32(0.0)
  keys = jnp.asarray([k for k, _ in items], jnp.int32)
  values = jnp.asarray([0.0] + [v for _, v in items], jnp.float32)
  idx = jnp.searchsorted(keys, jnp.asarray(step, jnp.int32), side="right")
  return jnp.clip(values[idx], 0.0, 1.0)


# --------------------------------------------------------------------------- multipliers

class DualGrad(NamedTuple):
  """The gradient of λ_k and whether any sample of the batch constrains λ_k."""
  grad: jax.Array   # −c_k, float32 scalar
  valid: jax.Array  # bool scalar


def init_lambdas() -> dict:
  """λ_s, λ_d, λ_p as float32 scalars, initialised to 0 (the text losses start unweighted)."""
  return {k: jnp.zeros((), jnp.float32) for k in LAMBDA_KEYS}


def join_grads(param_grads, c: dict, valid: dict | None = None) -> dict:
  """The gradient pytree `make_optimizer` takes: the primal gradients, and for each λ_k the
  gradient of the dual loss −Σ λ_k c_k, which is −c_k.

  `valid` {k: bool scalar} (default: all True): False where no sample of the batch has the
  answer of term k; λ_k then takes no step at all (its value and Adam state are kept).
  """
  lambdas = {k: DualGrad(-jnp.asarray(c[k], jnp.float32),
                         jnp.asarray(True if valid is None else valid[k], bool))
             for k in LAMBDA_KEYS}
  return {"params": param_grads, "lambdas": lambdas}


def grad_norm(opt_state) -> jax.Array:
  """The global L2 norm of the last primal gradient, before clipping (for logging)."""
  return optax.tree.get(opt_state, "grad_norm")


# --------------------------------------------------------------------------- custom pieces

def _rnd(x, dtype):
  """Rounds a float32 intermediate to a storage dtype, back in float32 for further maths."""
  return x.astype(dtype).astype(jnp.float32)


def _one_minus_pow(b: float, t) -> jax.Array:
  """1 − b**t in float32 for a Python float `b` and a float32 step `t`, within 2 ulp.

  −expm1(t·log b), with log b taken in double, has neither float32's rounding of b nor the
  cancellation of 1 − b**t.
  """
  if b == 0.0:
    return jnp.float32(1.0)
  return -jnp.expm1(t * jnp.float32(math.log(b)))


class TorchAdamState(NamedTuple):
  count: jax.Array  # int32: updates so far
  mu: optax.Updates
  nu: optax.Updates


def scale_by_torch_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """Adam's direction m̂ / (√v̂ + ε) as torch's Adam computes it.

  The bias corrections are exact (torch's are in double). The moments are kept in the
  parameter's dtype, like torch's, and rounded to it where torch's kernels round: m by
  `lerp_`, v twice (`mul_`, `addcmul_`), the denominator's three steps.
  """
  def init(params):
    return TorchAdamState(jnp.zeros((), jnp.int32), optax.tree.zeros_like(params),
                          optax.tree.zeros_like(params))

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    bc1, bc2_sqrt = _one_minus_pow(b1, t), jnp.sqrt(_one_minus_pow(b2, t))

    def first(g, m):
      m32 = m.astype(jnp.float32)
      return (m32 + (1.0 - b1) * (g.astype(jnp.float32) - m32)).astype(m.dtype)

    def second(g, v):
      g = g.astype(jnp.float32)
      return (_rnd(v.astype(jnp.float32) * b2, v.dtype) + (1.0 - b2) * g * g).astype(v.dtype)

    def direction(m, v):
      root = _rnd(_rnd(jnp.sqrt(v.astype(jnp.float32)), v.dtype) / bc2_sqrt, v.dtype)
      return m.astype(jnp.float32) / bc1 / _rnd(root + eps, v.dtype)

    mu = jax.tree.map(first, updates, state.mu)
    nu = jax.tree.map(second, updates, state.nu)
    return jax.tree.map(direction, mu, nu), TorchAdamState(count, mu, nu)

  return optax.GradientTransformation(init, update)


class TorchClipState(NamedTuple):
  grad_norm: jax.Array  # global L2 norm of the last gradient, before clipping


def torch_clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """torch's `clip_grad_norm_`: g·min(1, max_norm / (‖g‖ + 1e-6)), keeping ‖g‖ as `grad_norm`.

  Torch works in the gradients' dtype: it rounds the per-tensor norms, the total, ‖g‖ + 1e-6,
  the coefficient and the clipped gradient to it (`optax.clip_by_global_norm` does not).
  """
  def update(updates, state, params=None):
    del state, params
    leaves = jax.tree.leaves(updates)
    dt = jnp.result_type(*leaves)
    norms = [_rnd(jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)))), x.dtype) for x in leaves]
    total = _rnd(jnp.sqrt(sum(jnp.square(n) for n in norms)), dt)
    coef = jnp.minimum(_rnd(max_norm / _rnd(total + 1e-6, dt), dt), 1.0)
    clipped = jax.tree.map(lambda g: (g.astype(jnp.float32) * coef).astype(g.dtype), updates)
    return clipped, TorchClipState(total)

  return optax.GradientTransformation(lambda _: TorchClipState(jnp.zeros((), jnp.float32)),
                                      update)


def torch_adamw_step(learning_rate, weight_decay: float) -> optax.GradientTransformation:
  """torch AdamW's parameter update from Adam's direction d, as an update of p.

  p ← p·(1 − lr·wd), then p ← p − lr·d, each rounded to p's dtype as torch's `mul_` and
  `addcdiv_` round; returns the float32 difference to that parameter. `learning_rate(k)`:
  the lr after k updates.
  """
  def update(updates, state, params=None):
    if params is None:
      raise ValueError("torch_adamw_step needs the params (weight decay, rounding)")
    lr = jnp.asarray(learning_rate(state.count), jnp.float32)

    def leaf(d, p):
      p32 = p.astype(jnp.float32)
      decayed = _rnd(p32 * (1.0 - lr * weight_decay), p.dtype)
      return _rnd(decayed - lr * d, p.dtype) - p32  # exact: p + u is the rounded parameter

    return (jax.tree.map(leaf, updates, params),
            optax.ScaleByScheduleState(optax.safe_increment(state.count)))

  return optax.GradientTransformation(
      lambda _: optax.ScaleByScheduleState(jnp.zeros((), jnp.int32)), update)


def skip_invalid(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` on the gradients of `DualGrad` leaves, or no step at all (zero update, state
  unchanged) when one of them is not valid."""
  is_dual = lambda x: isinstance(x, DualGrad)

  def update(updates, state, params=None):
    valid = jnp.all(jnp.stack([g.valid for g in jax.tree.leaves(updates, is_leaf=is_dual)]))
    grads = jax.tree.map(lambda g: g.grad, updates, is_leaf=is_dual)
    new_updates, new_state = inner.update(grads, state, params)
    return (jax.tree.map(lambda u: jnp.where(valid, u, 0.0), new_updates),
            jax.tree.map(lambda new, old: jnp.where(valid, new, old), new_state, state))

  return optax.GradientTransformation(inner.init, update)


# --------------------------------------------------------------------------- the optimizer

def make_optimizer(cfg) -> optax.GradientTransformation:
  """The primal-dual optimizer of `cfg.training`: `params` and each λ_k in their own chain."""
  t = cfg.training
  max_norm = float(t.max_grad_norm)
  if cfg.get("compat", "default") == "upstream":  # bf16 gradients: torch's roundings
    clip = torch_clip_by_global_norm(max_norm)
  else:
    clip = optax.chain(optax.snapshot("grad_norm", optax.tree.norm),
                       optax.clip_by_global_norm(max_norm))
  primal = optax.chain(
      clip,
      scale_by_torch_adam(float(t.adam_beta1), float(t.adam_beta2), float(t.adam_epsilon)),
      torch_adamw_step(lr_schedule(cfg), float(t.adam_weight_decay)))
  # torch.optim.Adam's defaults, as upstream's λ optimizer
  dual = skip_invalid(optax.chain(scale_by_torch_adam(0.9, 0.999, 1e-8),
                                  optax.scale_by_learning_rate(float(t.lambda_lr)),
                                  optax.keep_params_nonnegative()))
  groups = {"params": primal, **{f"lambda_{k}": dual for k in LAMBDA_KEYS}}
  labels = {"params": "params", "lambdas": {k: f"lambda_{k}" for k in LAMBDA_KEYS}}
  return optax.multi_transform(groups, labels)
