"""Self-contained training components: optax chain, schedules, objective, sampler, sharding,
checkpoints, metrics. Runs single-device; the 8-device mesh test uses a subprocess."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cotir_jax import config, latents, sample
from cotir_jax.train import checkpoint, metrics, objective, optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(*overrides, compat="default"):
  cfg = config.defaults("flux.2-klein-4b")
  cfg.compat = compat
  for o in overrides:
    config.apply_override(cfg, o)
  return config.validate(cfg)


# ------------------------------------------------------------------------------ lr schedule

SPEC_LR = {1: 5e-5, 50: 5e-5, 200: 5e-5, 1000: 2.5e-4, 2000: 5e-4, 10000: 4.94e-4,
           20000: 4.72e-4, 40000: 3.83e-4, 60000: 2.57e-4, 80000: 1.29e-4, 95000: 5.34e-5,
           95836: 5e-5, 100000: 5e-5, 120000: 5e-5}


@pytest.mark.parametrize("compat", ["default", "upstream"])
def test_lr_schedule_spec_values(compat):
  sched = optim.lr_schedule(_cfg(compat=compat))
  for k, want in SPEC_LR.items():
    assert float(sched(k)) == pytest.approx(want, rel=5e-3, abs=0), k
  assert float(sched(0)) == (0.0 if compat == "upstream" else pytest.approx(5e-5))
  # upstream logs the unfloored value
  raw = optim.lr_unfloored(_cfg(compat=compat))
  assert float(raw(0)) == 0.0
  assert float(raw(100)) == pytest.approx(2.5e-5)
  assert float(raw(95000)) == pytest.approx(5.34e-5, rel=5e-3)
  assert float(raw(120000)) < 5e-5
  # jit-friendly with a traced step
  assert float(jax.jit(sched)(jnp.int32(2000))) == pytest.approx(5e-4)


def test_use_gen_prob():
  cfg = _cfg()
  want = {0: .2, 9999: .2, 10000: .3, 25000: .4, 39999: .5, 40000: .6, 10**6: .6}
  f = jax.jit(lambda s: optim.use_gen_prob(cfg, s))
  for step, p in want.items():
    assert float(optim.use_gen_prob(cfg, step)) == pytest.approx(p)
    assert float(f(step)) == pytest.approx(p)
  cfg2 = _cfg()
  cfg2.training.use_gen = {5: 1.7, 10: -0.2}
  assert [float(optim.use_gen_prob(cfg2, s)) for s in (0, 4, 5, 10)] == [0.0, 0.0, 1.0, 0.0]


# ------------------------------------------------------------------------------ primal update

def _toy_cfg(compat="default"):
  return _cfg("training.lr_warmup_steps=3", "training.iterations=(10,)",
              "training.patch_sizes=(128,)", "training.batch_sizes=(2,)",
              "training.learning_rate=0.01", "training.min_learning_rate=0.002",
              "training.adam_weight_decay=0.1", "training.max_grad_norm=1.0", compat=compat)


def _primal(opt_state, field):
  """A field of the primal Adam state: `count`, or `mu` / `nu` as the parameters' tree."""
  is_adam = lambda x: isinstance(x, optim.TorchAdamState)
  adam = next(s for s in jax.tree.leaves(opt_state.inner_states["params"], is_leaf=is_adam)
              if is_adam(s))
  return adam.count if field == "count" else getattr(adam, field)["params"]


def _toy_grads(rng, k):
  # large on even steps (clipping active), small on odd steps (no clipping)
  s = 3.0 if k % 2 == 0 else 0.05
  return {"w": rng.normal(size=(3, 4)) * s, "b": rng.normal(size=(4,)) * s}


@pytest.mark.parametrize("compat", ["default", "upstream"])
def test_primal_update_matches_hand_written_clip_adamw(compat):
  cfg = _toy_cfg(compat)
  t = cfg.training
  tx = optim.make_optimizer(cfg)
  rng = np.random.default_rng(0)
  p0 = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))}
  params = {"params": jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p0),
            "lambdas": optim.init_lambdas()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  ref = {k: v.copy() for k, v in p0.items()}
  m = {k: np.zeros_like(v) for k, v in p0.items()}
  v2 = {k: np.zeros_like(v) for k, v in p0.items()}
  for k in range(8):
    g = _toy_grads(rng, k)
    # hand-written: torch clip_grad_norm_ + AdamW + floored warmup-cosine
    norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
    coef = min(1.0, t.max_grad_norm / (norm + 1e-6))
    f = k / 3 if k < 3 else 0.5 * (1 + math.cos(math.pi * (k - 3) / (10 - 3)))
    lr = max(t.min_learning_rate, t.learning_rate * f)
    if compat == "upstream" and k == 0:
      lr = 0.0
    for n in ref:
      gc = g[n] * coef
      m[n] = 0.9 * m[n] + 0.1 * gc
      v2[n] = 0.999 * v2[n] + 0.001 * gc * gc
      mh, vh = m[n] / (1 - 0.9 ** (k + 1)), v2[n] / (1 - 0.999 ** (k + 1))
      ref[n] = ref[n] * (1 - lr * t.adam_weight_decay) - lr * mh / (np.sqrt(vh) + 1e-8)
    grads = optim.join_grads(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g),
                             {"s": 0.0, "d": 0.0, "p": 0.0})
    upd, state = update(grads, state, params)
    params = optax.apply_updates(params, upd)
    assert float(optim.grad_norm(state)) == pytest.approx(norm, rel=1e-5)
    assert int(_primal(state, "count")) == k + 1
    for n in ref:
      np.testing.assert_allclose(np.asarray(params["params"][n]), ref[n], rtol=2e-5, atol=2e-6)
  if compat == "upstream":  # k = 0 ran at lr 0: the params changed only from step 1 on
    assert not np.allclose(ref["w"], p0["w"])


def test_primal_update_matches_torch_adamw():
  """Reference check against torch: clip_grad_norm_ + AdamW + diffusers cosine + lr floor,
  in upstream's order, compat schedule (lr 0 on the first step)."""
  torch = pytest.importorskip("torch")
  from diffusers.optimization import get_scheduler
  cfg = _toy_cfg("upstream")
  t = cfg.training
  rng = np.random.default_rng(1)
  p0 = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
  tp = {n: torch.nn.Parameter(torch.tensor(v)) for n, v in p0.items()}
  opt = torch.optim.AdamW(list(tp.values()), lr=t.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=t.adam_weight_decay)
  sch = get_scheduler("cosine", optimizer=opt, num_warmup_steps=3, num_training_steps=10)
  tx = optim.make_optimizer(cfg)
  params = {"params": {n: jnp.asarray(v) for n, v in p0.items()}, "lambdas": optim.init_lambdas()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for k in range(8):
    g = {n: x.astype(np.float32) for n, x in _toy_grads(rng, k).items()}
    assert optim.lr_unfloored(cfg)(k) == pytest.approx(sch.get_last_lr()[0], rel=1e-6, abs=1e-12)
    for n in tp:
      tp[n].grad = torch.tensor(g[n])
    torch.nn.utils.clip_grad_norm_(list(tp.values()), t.max_grad_norm)
    opt.step()
    sch.step()
    for group in opt.param_groups:
      group["lr"] = max(group["lr"], t.min_learning_rate)
    upd, state = update(optim.join_grads(g, {"s": 0., "d": 0., "p": 0.}), state, params)
    params = optax.apply_updates(params, upd)
    for n in tp:
      np.testing.assert_allclose(np.asarray(params["params"][n]), tp[n].detach().numpy(),
                                 rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compat", ["default", "upstream"])
def test_float32_adam_matches_torch_over_120_steps(compat):
  """Primal clip + AdamW and dual Adam + projection against torch in float32 for 120 steps
  (compat="upstream" clips with the torch-rounding clip, a no-op rounding in float32).

  The bias corrections must be exact: computed in float32 (optax.scale_by_adam), 1 − 0.999**t
  is up to 1.3e-5 too large (relative) and every Adam step 6.6e-6 too small, which drifts λ by
  8.5e-6 here; the decay must be torch's, rounded factor first (optax.add_decayed_weights:
  1.6e-6). Compiled without XLA's fusion and algebraic simplifier every operation rounds
  as written, and the chain must then agree with torch to ≤ 1e-6; the normal compile may turn a
  multiply-add into one FMA and x / c into x·(1/c) (1-ulp noise, no drift: ≤ 4e-6)."""
  torch = pytest.importorskip("torch")
  cfg = _cfg("training.lr_warmup_steps=10", "training.iterations=(150,)",
             "training.patch_sizes=(128,)", "training.batch_sizes=(2,)",
             "training.learning_rate=0.01", "training.min_learning_rate=0.002",
             "training.adam_weight_decay=0.1", "training.max_grad_norm=1.0",
             "training.lambda_lr=0.01", compat=compat)
  t = cfg.training
  sched = optim.lr_schedule(cfg)
  rng = np.random.default_rng(0)
  p0 = {"w": rng.normal(size=(64, 32)).astype(np.float32),
        "b": rng.normal(size=(32,)).astype(np.float32)}
  c_mean = {"s": 2e-3, "d": 1e-3, "p": -2e-4}  # c_p < 0 on average: λ_p keeps hitting 0
  steps = []
  for k in range(120):
    scale = 3.0 if k % 3 == 0 else 0.02  # every third step is clipped
    g = {n: (rng.normal(size=v.shape) * scale).astype(np.float32) for n, v in p0.items()}
    steps.append((g, {key: np.float32(m + 1e-3 * rng.normal()) for key, m in c_mean.items()}))

  tp = {n: torch.nn.Parameter(torch.tensor(v)) for n, v in p0.items()}
  opt = torch.optim.AdamW(list(tp.values()), lr=t.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=t.adam_weight_decay)
  tl = {key: torch.nn.Parameter(torch.zeros(())) for key in optim.LAMBDA_KEYS}
  lopt = torch.optim.Adam(list(tl.values()), lr=t.lambda_lr, betas=(0.9, 0.999), eps=1e-8)
  want = []
  for k, (g, c) in enumerate(steps):
    for n in tp:
      tp[n].grad = torch.tensor(g[n])
    torch.nn.utils.clip_grad_norm_(list(tp.values()), t.max_grad_norm)
    for group in opt.param_groups:
      group["lr"] = float(sched(k))
    opt.step()
    for key in tl:
      tl[key].grad = torch.tensor(-c[key])
    lopt.step()
    with torch.no_grad():
      for lam in tl.values():
        lam.clamp_(min=0.0)
    want.append(({n: x.detach().numpy().copy() for n, x in tp.items()},
                 np.array([float(tl[key].detach()) for key in optim.LAMBDA_KEYS])))

  tx = optim.make_optimizer(cfg)
  params = {"params": {n: jnp.asarray(v) for n, v in p0.items()}, "lambdas": optim.init_lambdas()}
  state = tx.init(params)
  grads = optim.join_grads(steps[0][0], steps[0][1])
  ieee = jax.jit(tx.update).lower(grads, state, params).compile(
      compiler_options={"xla_disable_hlo_passes": "fusion,algsimp"})
  rel = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
  for update, bound in ((ieee, 1e-6), (jax.jit(tx.update), 4e-6)):
    p, st, worst_p, worst_l = params, state, 0.0, 0.0
    for (g, c), (want_p, want_l) in zip(steps, want):
      upd, st = update(optim.join_grads(g, c), st, p)
      p = optax.apply_updates(p, upd)
      worst_p = max([worst_p] + [rel(np.asarray(p["params"][n]), want_p[n]) for n in want_p])
      worst_l = max(worst_l, rel(np.array([float(p["lambdas"][key]) for key in optim.LAMBDA_KEYS]),
                                 want_l))
    assert worst_p <= bound and worst_l <= 1e-6, (bound, worst_p, worst_l)
  lambdas = np.array([lam for _, lam in want])
  assert lambdas[-1, 0] > 0.5 and np.any(lambdas[:, 2] == 0.0)  # λ_s rose; λ_p was projected


def test_bf16_update_matches_torch_bf16_adamw():
  """compat="upstream": bf16 params and moments round like torch's bf16 clip + AdamW."""
  torch = pytest.importorskip("torch")
  cfg = _toy_cfg("upstream")
  sched = optim.lr_schedule(cfg)
  rng = np.random.default_rng(0)
  p0 = {"w": (rng.normal(size=(32, 32)) * 0.05).astype(np.float32),
        "b": (rng.normal(size=(32,)) * 0.05).astype(np.float32)}
  tp = {n: torch.nn.Parameter(torch.tensor(v).bfloat16()) for n, v in p0.items()}
  opt = torch.optim.AdamW(list(tp.values()), lr=0.01, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=cfg.training.adam_weight_decay)
  tx = optim.make_optimizer(cfg)
  params = {"params": {n: jnp.asarray(v, jnp.bfloat16) for n, v in p0.items()},
            "lambdas": optim.init_lambdas()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for k in range(6):
    g = {n: (rng.normal(size=v.shape) * (0.5 if k % 2 else 0.01)).astype(np.float32)
         for n, v in p0.items()}
    for n in tp:
      tp[n].grad = torch.tensor(g[n]).bfloat16()
    norm = torch.nn.utils.clip_grad_norm_(list(tp.values()), cfg.training.max_grad_norm)
    for group in opt.param_groups:
      group["lr"] = float(sched(k))
    opt.step()
    grads = optim.join_grads({n: jnp.asarray(x, jnp.bfloat16) for n, x in g.items()},
                             {"s": 0., "d": 0., "p": 0.})
    upd, state = update(grads, state, params)
    params = optax.apply_updates(params, upd)
    assert float(optim.grad_norm(state)) == float(norm)
    for n in tp:
      ours = np.asarray(params["params"][n].astype(jnp.float32))
      theirs = tp[n].detach().float().numpy()
      assert params["params"][n].dtype == jnp.bfloat16
      assert _primal(state, "mu")[n].dtype == jnp.bfloat16
      assert np.mean(ours != theirs) <= 0.002, (k, n)          # rare 1-ulp differences
      np.testing.assert_allclose(ours, theirs, rtol=2 ** -7, atol=0)
      np.testing.assert_allclose(np.asarray(_primal(state, "nu")[n].astype(jnp.float32)),
                                 opt.state[tp[n]]["exp_avg_sq"].float().numpy(), rtol=2 ** -7)


def test_bf16_params_and_moments_under_compat():
  cfg = _toy_cfg("upstream")
  tx = optim.make_optimizer(cfg)
  params = {"params": {"w": jnp.full((4, 4), 0.5, jnp.bfloat16)}, "lambdas": optim.init_lambdas()}
  state = tx.init(params)
  assert _primal(state, "mu")["w"].dtype == jnp.bfloat16
  assert _primal(state, "nu")["w"].dtype == jnp.bfloat16
  for k in range(3):
    g = optim.join_grads({"w": jnp.full((4, 4), 0.01, jnp.bfloat16)}, {"s": 0., "d": 0., "p": 0.})
    upd, state = tx.update(g, state, params)
    params = optax.apply_updates(params, upd)
  assert params["params"]["w"].dtype == jnp.bfloat16
  assert _primal(state, "mu")["w"].dtype == jnp.bfloat16
  # steps 1, 2 at lr ≥ 0.002 move a 0.5 weight by ≥ 1 bf16 ulp (2^-9) each
  assert float(params["params"]["w"][0, 0]) < 0.5


def test_chain_on_nnx_state():
  """The chain runs on an nnx.State of trainable variables (what nnx.split returns)."""
  from flax import nnx

  class Toy(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((2, 3)), out_sharding=("embed", "mlp"), eager_sharding=False)
      self.lora = nnx.LoRAParam(jnp.zeros((3,)))

  _, st = nnx.split(Toy())
  tx = optim.make_optimizer(_toy_cfg())
  params = {"params": st, "lambdas": optim.init_lambdas()}
  state = tx.init(params)
  grads = optim.join_grads(jax.tree.map(jnp.ones_like, st), {"s": 1e-3, "d": 0., "p": 0.})
  upd, state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, upd)
  assert isinstance(new["params"], nnx.State)
  assert float(new["params"]["w"][...][0, 0]) < 1.0
  assert float(new["lambdas"]["s"]) > 0


# ------------------------------------------------------------------------------ dual ascent

def test_dual_ascent_rises_then_projects_to_zero():
  cfg = _cfg()
  lam_lr = cfg.training.lambda_lr
  tx = optim.make_optimizer(cfg)
  params = {"params": {"w": jnp.zeros((2,))}, "lambdas": optim.init_lambdas()}
  state = tx.init(params)
  update = jax.jit(tx.update)

  def step(params, state, c):
    upd, state = update(optim.join_grads({"w": jnp.zeros((2,))}, c), state, params)
    return optax.apply_updates(params, upd), state

  history = []
  for k in range(30):  # c_s > 0: λ_s rises by ≈ lambda_lr per step; c_d < 0 keeps λ_d at 0
    params, state = step(params, state, {"s": 3e-5, "d": -2e-5, "p": 0.0})
    history.append(float(params["lambdas"]["s"]))
    assert float(params["lambdas"]["d"]) == 0.0 and float(params["lambdas"]["p"]) == 0.0
  np.testing.assert_allclose(np.diff([0.0] + history), lam_lr, rtol=1e-3)
  top = history[-1]
  falling = []
  for k in range(120):  # c_s < 0: λ_s falls back to 0 and stays exactly there
    params, state = step(params, state, {"s": -3e-5, "d": -2e-5, "p": 0.0})
    falling.append(float(params["lambdas"]["s"]))
  assert min(falling) >= 0.0
  assert max(falling) <= top + 10 * lam_lr  # Adam momentum: a few more rising steps at most
  first_zero = falling.index(0.0)
  assert first_zero < 80
  assert all(x == 0.0 for x in falling[first_zero:])


def test_dual_step_skipped_for_a_term_without_answers():
  """valid[k] False: λ_k and its Adam state stay as they are, as if that step never happened
  for λ_k (a later λ_k equals a run without it), while the weights and the other λ step."""
  tx = optim.make_optimizer(_cfg("training.lambda_lr=0.01"))
  update = jax.jit(tx.update)
  cs = [{"s": 3e-3, "d": 1e-3, "p": -1e-3}, {"s": -2e-3, "d": 2e-3, "p": 1e-3},
        {"s": 1e-3, "d": 2e-3, "p": 3e-3}]

  def run(skip_s_at):
    params = {"params": {"w": jnp.ones((2,))}, "lambdas": optim.init_lambdas()}
    state, seen = tx.init(params), []
    for k, c in enumerate(cs[:skip_s_at] + [{"s": 5.0, "d": 1e-3, "p": 1e-3}] + cs[skip_s_at:]):
      valid = {"s": k != skip_s_at, "d": True, "p": True}
      before = params, state
      upd, state = update(optim.join_grads({"w": jnp.ones((2,))}, c, valid), state, params)
      params = optax.apply_updates(params, upd)
      if k == skip_s_at:
        assert float(params["lambdas"]["s"]) == float(before[0]["lambdas"]["s"])
        same = lambda a, b: all(np.array_equal(x, y)
                                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        assert same(state.inner_states["lambda_s"], before[1].inner_states["lambda_s"])
        assert not same(state.inner_states["lambda_d"], before[1].inner_states["lambda_d"])
        assert float(params["params"]["w"][0]) < float(before[0]["params"]["w"][0])
      seen.append(float(params["lambdas"]["s"]))
    return seen

  ref = {"params": {"w": jnp.ones((2,))}, "lambdas": optim.init_lambdas()}
  st, want = tx.init(ref), []
  for c in cs:
    upd, st = update(optim.join_grads({"w": jnp.ones((2,))}, c), st, ref)
    ref = optax.apply_updates(ref, upd)
    want.append(float(ref["lambdas"]["s"]))
  assert want[0] > 0
  got = run(skip_s_at=1)
  assert got[:1] + got[2:] == want and got[1] == got[0]


# ------------------------------------------------------------------------------ objective

def test_flux2_tokens_and_ids():
  lat = jnp.arange(2 * 3 * 4 * 128, dtype=jnp.float32).reshape(2, 3, 4, 128)
  tok = latents.flux2_tokens(lat)
  assert tok.shape == (2, 12, 128)
  np.testing.assert_array_equal(tok[1, 4 * 2 + 3], lat[1, 2, 3])  # row-major (h outer, w inner)
  np.testing.assert_array_equal(latents.flux2_untokens(tok, 3, 4), lat)
  tgt, cnd, txt = latents.position_ids(2, (3, 4), 5, "flux2")
  assert tgt.shape == (2, 12, 4) and txt.shape == (2, 5, 4)
  np.testing.assert_array_equal(tgt[0, 4 * 2 + 3], [0, 2, 3, 0])
  np.testing.assert_array_equal(cnd[1, 4 * 1 + 0], [10, 1, 0, 0])
  np.testing.assert_array_equal(txt[0, :, 3], np.arange(5))
  assert float(jnp.abs(txt[..., :3]).sum()) == 0.0


def test_flux1_pack_unpack_matches_einops():
  einops = pytest.importorskip("einops")
  rng = np.random.default_rng(0)
  lat_nchw = rng.normal(size=(2, 16, 6, 8)).astype(np.float32)  # [B, C, H/8, W/8]
  want = einops.rearrange(lat_nchw, "b c (hh ph) (ww pw) -> b (hh ww) (c ph pw)", ph=2, pw=2)
  lat = jnp.asarray(lat_nchw.transpose(0, 2, 3, 1))              # ours: NHWC
  tok = latents.flux1_pack(lat)
  np.testing.assert_array_equal(np.asarray(tok), want)
  # channel index c·4 + ph·2 + pw
  assert float(tok[0, 1 * 4 + 2, 5 * 4 + 1 * 2 + 0]) == lat_nchw[0, 5, 2 * 1 + 1, 2 * 2 + 0]
  np.testing.assert_array_equal(np.asarray(latents.flux1_unpack(tok, 3, 4)), np.asarray(lat))
  grid = latents.token_grid(lat.shape, "flux1")
  assert grid == (3, 4)
  np.testing.assert_array_equal(latents.tokens_to_latents(latents.image_tokens(lat, "flux1"),
                                                            grid, "flux1"), lat)
  tgt, cnd, txt = latents.position_ids(2, grid, 7, "flux1")
  np.testing.assert_array_equal(tgt[0, 4 * 2 + 1], [0, 2, 1])
  np.testing.assert_array_equal(cnd[0, 4 * 2 + 1], [1, 2, 1])
  assert txt.shape == (2, 7, 3) and float(jnp.abs(txt).sum()) == 0.0


def test_losses_and_constraints():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x_1 = jax.random.normal(k1, (2, 6, 8))
  x_t, x_0, t = objective.flow_matching_inputs(k2, x_1)
  assert t.shape == (2,) and float(t.min()) > 0 and float(t.max()) < 1
  np.testing.assert_allclose(x_t, (1 - t[:, None, None]) * x_1 + t[:, None, None] * x_0, rtol=1e-6)
  v = jnp.concatenate([x_0 - x_1 + 0.5, jnp.full((2, 6, 8), 9.0)], axis=1)  # cond tokens ignored
  feats = {k: jax.random.normal(jax.random.fold_in(k3, i), (2, 5, 16)) for i, k in enumerate("sdp")}
  targets = {k: feats[k] * 3.0 for k in "sdp"}          # same direction → loss 0
  targets["d"] = -feats["d"]                             # opposite → per-token (2/‖‖)² = 4 / D
  lambdas = {"s": 2.0, "d": 0.5, "p": 0.0}
  deltas = {"s": 1e-4, "d": 1e-4, "p": 1e-4}
  loss, aux = objective.losses(v, feats, x_0, x_1, targets, lambdas, deltas)
  assert float(aux["img_loss"]) == pytest.approx(0.25, rel=1e-5)
  assert float(aux["txt_s_loss"]) == pytest.approx(0.0, abs=1e-7)
  assert float(aux["txt_d_loss"]) == pytest.approx(4.0 / 16, rel=1e-5)
  assert float(aux["c"]["d"]) == pytest.approx(4.0 / 16 - 1e-4, rel=1e-5)
  assert float(loss) == pytest.approx(0.25 + 2.0 * (0 - 1e-4) + 0.5 * (0.25 - 1e-4), rel=1e-5)
  # λ is held constant in the primal loss
  g = jax.grad(lambda lam: objective.losses(v, feats, x_0, x_1, targets, lam, deltas)[0])(lambdas)
  assert all(float(x) == 0.0 for x in g.values())
  # zero features: normalised with max(‖·‖, 1e-6), no NaN
  assert float(objective.text_loss(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 4)))) == 0.0


def test_timestep_shift_moves_the_draw_towards_noise():
  """shift 1 is upstream's sigmoid(N(0, 1)) draw; shift s maps each draw t to s·t / (1 + (s − 1)·t)
  (same noise, same ε), the resolution shift of the FLUX samplers; a bad value names the field."""
  keys = jax.random.split(jax.random.key(4), 4096)
  x_1 = jnp.zeros((4096, 2, 3))
  _, x_0, t = objective.flow_matching_inputs(keys, x_1)
  _, x_0s, ts = objective.flow_matching_inputs(keys, x_1, shift=7.0)
  np.testing.assert_array_equal(x_0, x_0s)
  np.testing.assert_allclose(ts, 7 * t / (1 + 6 * t), rtol=1e-6)
  eps = jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[1], (), jnp.float32))(keys)
  np.testing.assert_allclose(t, jax.nn.sigmoid(eps), rtol=1e-6)
  assert float(jnp.mean(t > 0.9)) < 0.03 and float(jnp.mean(ts > 0.9)) > 0.3
  for bad in (0.0, -1.0, float("nan")):
    cfg = config.defaults("flux.2-klein-4b")
    cfg.training.timestep_shift = bad
    with pytest.raises(config.ConfigError, match=r"training\.timestep_shift=.* must be a number > 0"):
      config.validate(cfg)


def test_compat_casts_to_bf16():
  x_1 = jnp.ones((1, 4, 8), jnp.bfloat16)
  x_t, x_0, t = objective.flow_matching_inputs(jax.random.key(1), x_1, "upstream")
  assert x_0.dtype == jnp.bfloat16 and x_t.dtype == jnp.float32 and t.dtype == jnp.float32
  ids = latents.position_ids(1, (2, 2), 3, "flux2")
  img, img_ids, txt, txt_ids, ts = objective.model_inputs(x_t, x_1, ids[0], ids[1],
                                                          jnp.ones((1, 3, 5)), ids[2], t, "upstream")
  assert {a.dtype for a in (img, img_ids, txt, txt_ids, ts)} == {jnp.dtype(jnp.bfloat16)}
  assert img.shape == (1, 8, 8) and img_ids.shape == (1, 8, 4)
  out = objective.model_inputs(x_t, x_1, ids[0], ids[1], jnp.ones((1, 3, 5)), ids[2], t)
  assert {a.dtype for a in out} == {jnp.dtype(jnp.float32)}


# ------------------------------------------------------------------------------ answer masks

def _loss_inputs(b=4):
  ks = jax.random.split(jax.random.key(3), 8)
  x_1 = jax.random.normal(ks[0], (b, 6, 8))
  _, x_0, _ = objective.flow_matching_inputs(ks[1], x_1)
  v = jax.random.normal(ks[2], (b, 12, 8))
  feats = {k: jax.random.normal(ks[3 + i], (b, 5, 16)) for i, k in enumerate("sdp")}
  targets = {k: feats[k] + jax.random.normal(ks[6], (b, 5, 16)) for k in "sdp"}
  return v, feats, x_0, x_1, targets


def test_answer_mask_masks_text_terms():
  """All answers: exactly today's losses and gradients, bit for bit (λ is state, as in the step);
  some: the mean over the samples that have one, no gradient from the others; none: the term and
  its constraint are 0; two micro-batches with the batch's counts average to the batch's values."""
  v, feats, x_0, x_1, targets = _loss_inputs()
  lambdas = {"s": jnp.float32(0.5), "d": jnp.float32(2.0), "p": jnp.float32(1.0)}
  deltas = {"s": 1e-4, "d": 2e-4, "p": 3e-4}
  grad = lambda *mask: jax.jit(jax.value_and_grad(
      lambda f, v, x_0, x_1, t, lam, *m: objective.losses(v, f, x_0, x_1, t, lam, deltas, *m), has_aux=True))
  (loss0, ref), g0 = grad()(feats, v, x_0, x_1, targets, lambdas)
  (loss1, aux), g1 = grad(1)(feats, v, x_0, x_1, targets, lambdas, jnp.ones((4, 3), jnp.int32),
                             jnp.full((3,), 4.0))
  assert float(loss1) == float(loss0)
  for k in "sdp":
    assert float(aux[f"txt_{k}_loss"]) == float(ref[f"txt_{k}_loss"])
    np.testing.assert_array_equal(g1[k], g0[k])
    # c_k may differ by one rounding: XLA may contract this small program's mean − δ into one
    # fused multiply-add (a whole training run with all answers is bit-identical to today's)
    assert float(aux["c"][k]) == pytest.approx(float(ref["c"][k]), rel=2e-7, abs=0)
  masked = jax.jit(lambda v, f, x_0, x_1, t, m, n: objective.losses(v, f, x_0, x_1, t, lambdas, deltas, m, n))

  m = jnp.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]], jnp.int32)  # s: rows 0, 2; d: none
  loss, aux = masked(v, feats, x_0, x_1, targets, m, m.sum(0).astype(jnp.float32))
  l_s = objective.text_loss(feats["s"][::2], targets["s"][::2])
  assert float(aux["txt_s_loss"]) == pytest.approx(float(l_s), rel=1e-6)
  assert float(aux["txt_d_loss"]) == 0.0 and float(aux["c"]["d"]) == 0.0
  assert float(aux["txt_p_loss"]) == float(ref["txt_p_loss"])
  want = ref["img_loss"] + 0.5 * (l_s - 1e-4) + 1.0 * (ref["txt_p_loss"] - 3e-4)
  assert float(loss) == pytest.approx(float(want), rel=1e-6)
  g = jax.grad(lambda f: objective.losses(v, f, x_0, x_1, targets, lambdas, deltas, m)[0])(feats)
  assert float(jnp.abs(g["s"][1::2]).max()) == 0.0 and float(jnp.abs(g["s"][::2]).max()) > 0
  assert float(jnp.abs(g["d"]).max()) == 0.0

  # micro-batch j = rows j, j + 2 (the step's split); micro-batch 1 has no scene answer at all
  micro = [masked(*(jax.tree.map(lambda a: a[j::2], (v, feats, x_0, x_1, targets, m))),
                  m.sum(0).astype(jnp.float32) / 2)[1] for j in range(2)]
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *micro)
  for key in ("txt_s_loss", "txt_d_loss", "txt_p_loss", "img_loss", "loss"):
    assert float(mean[key]) == pytest.approx(float(aux[key]), rel=1e-6, abs=1e-12), key
  for k in "sdp":
    assert float(mean["c"][k]) == pytest.approx(float(aux["c"][k]), rel=1e-6, abs=1e-12), k


def _toy_step_setup(k):
  """The real train step (`make_train_step`: masks, counts, micro-batch scan, dual update) around
  a two-layer toy model on ready-made inputs, for gradient accumulation k."""
  from flax import nnx
  from cotir_jax.modules import Graphs
  from cotir_jax.train.step import Prepared, make_train_step

  class Toy(nnx.Module):
    def __init__(self):
      self.img, self.txt = nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Linear(6, 18, rngs=nnx.Rngs(1))

    def __call__(self, img, img_ids, txt, txt_ids, t, vec=None, guidance=None):
      s, d, p = jnp.split(self.txt(txt), 3, axis=-1)
      return self.img(img) * t[:, None, None], s, d, p

  def prepare(cfg, graphs, frozen, batch, use_gen):
    return Prepared(x_1=batch["x_1"], x_c=batch["x_c"], grid=(2, 2), txt=batch["txt"],
                    targets={n: batch[f"t_{n}"] for n in "sdp"}, vec=None)

  cfg = _cfg(f"training.gradient_accumulation_steps={k}", "training.lambda_lr=0.01")
  graph, params, rest = nnx.split(Toy(), nnx.Param, ...)
  tx = optim.make_optimizer(cfg)
  step = jax.jit(make_train_step(cfg, Graphs(graph, None, None, None), tx, prepare_inputs=prepare))
  lambdas = {"s": jnp.float32(0.3), "d": jnp.float32(0.2), "p": jnp.float32(0.0)}
  state = {"params": params, "lambdas": lambdas, "opt_state": tx.init({"params": params, "lambdas": lambdas}),
           "step": jnp.int32(0), "rng": jax.random.key(0), "nonfinite_step": jnp.int32(-1)}
  return step, state, {"model": rest}


def test_train_step_masks_and_accumulates_like_the_whole_batch():
  rng = np.random.default_rng(0)
  batch = {"x_1": rng.normal(size=(4, 4, 4)), "x_c": rng.normal(size=(4, 4, 4)), "txt": rng.normal(size=(4, 3, 6)),
           **{f"t_{n}": rng.normal(size=(4, 3, 6)) for n in "sdp"}}
  batch = {k: jnp.asarray(v, jnp.float32) for k, v in batch.items()}
  # micro-batches (k = 2) are rows 0, 2 and 1, 3: the second has no scene answer
  batch["answer_mask"] = jnp.array([[1, 1, 0], [0, 1, 0], [0, 0, 0], [0, 1, 0]], jnp.int32)
  (whole, state0, frozen), (accum, _, _) = _toy_step_setup(1), _toy_step_setup(2)
  new1, m1 = whole(state0, frozen, batch)
  new2, m2 = accum(_toy_step_setup(2)[1], frozen, batch)
  assert (float(m1["answers_s"]), float(m1["answers_d"]), float(m1["answers_p"])) == (1.0, 3.0, 0.0)
  for key in ("loss", "img_loss", "txt_s_loss", "txt_d_loss", "txt_p_loss", "c_s", "c_d", "c_p",
              "grad_norm", "lambda_s", "lambda_d", "lambda_p"):
    assert abs(float(m2[key]) - float(m1[key])) <= 1e-6 * abs(float(m1[key])) + 1e-12, key
  for a, b in zip(jax.tree.leaves(new1["params"]), jax.tree.leaves(new2["params"])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
  # no plan answer in the batch: λ_p and its moments unchanged (λ_s, λ_d moved)
  assert float(m1["lambda_p"]) == 0.0
  assert all(not np.any(np.asarray(x)) for x in  # λ_p's Adam state still the initial zeros
             jax.tree.leaves(new1["opt_state"].inner_states["lambda_p"]))
  assert float(m1["c_p"]) == 0.0 and float(m1["lambda_s"]) != 0.3 and float(m1["lambda_d"]) != 0.2
  # a batch without any answer (data.cot_answers=none): every λ stays exactly where it was
  none = dict(batch, answer_mask=jnp.zeros((4, 3), jnp.int32))
  new3, m3 = whole(_toy_step_setup(1)[1], frozen, none)
  assert [float(m3[f"lambda_{n}"]) for n in "sdp"] == [float(np.float32(x)) for x in (0.3, 0.2, 0.0)]
  assert float(m3["loss"]) == float(m3["img_loss"])


# ------------------------------------------------------------------------------ sampler

SPEC_SCHEDULES = {
    ("flux2", 5): [1, .968, .919, .8345, .6541, 0],
    ("flux2", 20): [1, .9923, .9839, .9747, .9645, .9532, .9407, .9266, .9107, .8925, .8717,
                    .8476, .8192, .7854, .7444, .6938, .6295, .5453, .4302, .2635, 0],
    ("flux1", 20): [1, .9727, .9441, .9141, .8825, .8492, .8142, .7771, .7380, .6965, .6525,
                    .6057, .5559, .5027, .4459, .3849, .3195, .2489, .1726, .0899, 0],
}


@pytest.mark.parametrize("family,n", list(SPEC_SCHEDULES))
def test_sampler_schedules_match_spec(family, n):
  got = sample.schedule(family, n, 1024)
  np.testing.assert_allclose(got, SPEC_SCHEDULES[(family, n)], atol=1e-4)
  assert sample.empirical_mu(1024, 5) == pytest.approx(2.0235, abs=1e-4)
  assert sample.empirical_mu(1024, 20) == pytest.approx(1.9164, abs=1e-4)
  assert sample.empirical_mu(5000, 20) == pytest.approx(0.00016927 * 5000 + 0.45666666)


def test_euler_sampler_integrates_to_the_conditioning():
  """With the exact velocity of a point mass at the clean tokens, v = (x − x_c)/t, Euler lands
  on x_c; it also checks that x_c is re-fed after the noisy tokens and t is passed."""
  seen = {}

  def velocity_fn(img, img_ids, txt, txt_ids, timesteps, vec, guidance):
    n = img.shape[1] // 2
    x, c = img[:, :n], img[:, n:]
    seen["shapes"] = (img.shape, img_ids.shape, guidance.shape)
    v = (x - c) / timesteps[:, None, None]
    return jnp.concatenate([v, jnp.full_like(c, 1e3)], axis=1)

  x_c = jax.random.normal(jax.random.key(3), (2, 6, 8))
  ids = latents.position_ids(2, (2, 3), 4, "flux2")
  txt = jnp.zeros((2, 4, 5))
  run = jax.jit(lambda key: sample.euler_sample(velocity_fn, x_c, ids[0], ids[1], txt, ids[2],
                                                num_steps=5, family="flux2", key=key))
  out = run(jax.random.key(0))
  assert out.shape == x_c.shape
  np.testing.assert_allclose(out, x_c, atol=1e-5)
  assert seen["shapes"] == ((2, 12, 8), (2, 12, 4), (2,))


def test_to_uint8_truncates():
  x = np.array([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0, -0.996], np.float32)
  np.testing.assert_array_equal(sample.to_uint8(x), [0, 0, 127, 254, 255, 255, 0])


# ------------------------------------------------------------------------------ sharding

_MESH_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from cotir_jax import config, models, sharding
    assert jax.device_count() == 8
    cfg = config.load("configs/tiny.py", ["mesh.data=2", "mesh.fsdp=4"])
    mesh = sharding.make_mesh(cfg.mesh)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}, mesh.shape
    cfg2 = config.load("configs/tiny.py", ["mesh.data=-1", "mesh.fsdp=2", "mesh.tensor=2"])
    assert dict(sharding.make_mesh(cfg2.mesh).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    cfg3 = config.load("configs/tiny.py", ["mesh.data=3", "mesh.fsdp=2"])
    try:
      sharding.make_mesh(cfg3.mesh)
      raise SystemExit("expected an error for a 6-device mesh on 8 devices")
    except ValueError as e:
      assert "8" in str(e) and "6" in str(e), e
    # rules: embed→fsdp, mlp→tensor; non-divisible dims fall back to replicated
    m4 = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    assert sharding.logical_to_spec(("layers", "embed", "mlp"), (2, 64, 192), m4) == P(None, "fsdp", "tensor")
    assert sharding.logical_to_spec(("embed", "mlp"), (6, 8), m4) == P(None, "tensor")
    assert sharding.logical_to_spec((None, "vocab"), (4, 5), m4) == P()
    rules = dict(sharding.DEFAULT_RULES, embed=None, mlp="fsdp")
    assert sharding.logical_to_spec(("embed", "mlp"), (8, 8), m4, rules) == P(None, "fsdp")
    # the real model's states, placed by their logical axes (abstract: no 8-device init compile)
    init = lambda: nnx.split(models.CoTIR(cfg.model, rngs=nnx.Rngs(0)), models.TRAINABLE, ...)
    abstract, abstract_frozen = nnx.eval_shape(lambda: init()[1:])
    rng = np.random.default_rng(0)
    host = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract_frozen)
    placed = jax.device_put(host, sharding.tree_shardings(host, mesh))
    assert isinstance(placed, nnx.State)
    specs = {jax.tree_util.keystr(p): x.sharding.spec for p, x in jax.tree_util.tree_flatten_with_path(placed)[0]}
    k = [p for p in specs if "img_mlp" in p and "fc1" in p and "kernel" in p][0]
    assert specs[k] == P(None, "fsdp", "tensor"), (k, specs[k])
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(host)):
      np.testing.assert_array_equal(np.asarray(a), b)
    # the optimizer state mirrors the params' metadata, so it gets the same layout
    import optax
    from cotir_jax.train import optim
    tx = optim.make_optimizer(cfg)
    ost = jax.eval_shape(tx.init, {"params": abstract, "lambdas": optim.init_lambdas()})
    osh = sharding.tree_shardings(ost, mesh)
    psh = sharding.tree_shardings(abstract, mesh)
    mu = optax.tree.get(osh.inner_states["params"], "mu")["params"]
    assert jax.tree.leaves(mu) == jax.tree.leaves(psh)
    assert len(jax.tree.leaves(osh)) == len(jax.tree.leaves(ost))
    # batch over (data, fsdp)
    x = sharding.global_array(np.zeros((8, 4, 3)), sharding.batch_sharding(mesh, (8, 4, 3)))
    assert x.sharding.spec == P(("data", "fsdp"))
    assert len(x.addressable_shards) == 8 and x.addressable_shards[0].data.shape == (1, 4, 3)
    print("MESH_OK")
""")


def test_mesh_on_8_simulated_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and "MESH_OK" in r.stdout, r.stdout + r.stderr


def test_mesh_single_device():
  from cotir_jax import sharding
  mesh = sharding.make_mesh(_cfg().mesh)
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh({"data": 2, "fsdp": 3, "tensor": 1})


# ------------------------------------------------------------------------------ checkpoints

def _train_state(seed):
  cfg = _toy_cfg()
  tx = optim.make_optimizer(cfg)
  rng = np.random.default_rng(seed)
  params = {"params": {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                       "b": jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16)},
            "lambdas": optim.init_lambdas()}
  opt_state = tx.init(params)
  g = optim.join_grads(jax.tree.map(jnp.ones_like, params["params"]), {"s": .1, "d": .1, "p": .1})
  upd, opt_state = tx.update(g, opt_state, params)
  params = optax.apply_updates(params, upd)
  from flax import nnx

  class Toy(nnx.Module):  # an nnx.State (Variables with sharding metadata) round-trips too
    def __init__(self):
      self.w = nnx.Param(jnp.full((2, 3), float(seed)), out_sharding=("embed", "mlp"),
                         eager_sharding=False)

  return {"params": params, "opt_state": opt_state, "step": jnp.int32(seed),
          "rng": jax.random.key(seed), "model": nnx.state(Toy())}


def test_checkpoint_round_trip_retention_and_atomicity(tmp_path):
  from cotir_jax import sharding
  cfg = _cfg()
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
  assert ckpt.latest_step() is None and ckpt.restore(_train_state(0)) is None
  for step in (1, 2, 3):
    data_state = b'{"next_index": %d}' % step if step != 3 else {"next_index": 3, "epoch": 0}
    assert ckpt.save(step, _train_state(step), data_state=data_state, config=cfg)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  assert not ckpt.save(3, _train_state(3))  # an existing step is not overwritten
  ckpt.close()

  # a save killed half-way leaves only a temporary directory: it must be ignored
  tmp = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1234567"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "garbage").write_bytes(b"\x00partial")

  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
  assert ckpt.latest_step() == 3 and ckpt.all_steps() == [2, 3]
  mesh = sharding.make_mesh(cfg.mesh)
  like = _train_state(0)
  target = sharding.abstract_with_shardings(like, sharding.tree_shardings(like, mesh))
  out = ckpt.restore(target)
  want = _train_state(3)
  assert out["step"] == 3
  assert out["data_state"] == {"next_index": 3, "epoch": 0}
  assert out["config"]["training"]["learning_rate"] == cfg.training.learning_rate
  got = out["state"]
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert got["params"]["params"]["w"].sharding == sharding.replicated(mesh)
  assert isinstance(got["opt_state"], optax.MultiTransformState)
  assert type(got["model"]) is type(want["model"])
  assert got["model"]["w"].get_metadata()["out_sharding"] == ("embed", "mlp")
  # restoring an explicit older step; bytes come back as bytes
  older = ckpt.restore(like, step=2)
  assert older["data_state"] == b'{"next_index": 2}'
  np.testing.assert_array_equal(older["state"]["params"]["params"]["w"],
                                _train_state(2)["params"]["params"]["w"])
  ckpt.close()


# ------------------------------------------------------------------------------ metrics

def test_metrics_jsonl_tensorboard_and_resume_truncation(tmp_path):
  with metrics.MetricsWriter(tmp_path) as w:
    for step in (0, 10, 20, 30):
      w.write(step, {"loss": jnp.float32(1.0 / (step + 1)), "lr": 5e-5, "n": np.int32(3)})
  recs = metrics.read_metrics(tmp_path)
  assert [r["step"] for r in recs] == [0, 10, 20, 30]
  assert recs[1]["loss"] == pytest.approx(1 / 11) and recs[0]["n"] == 3
  assert any(f.startswith("events.") for f in os.listdir(tmp_path / "tensorboard"))
  # resume from a checkpoint at step 20: later lines of the killed run are dropped
  with metrics.MetricsWriter(tmp_path, start_step=20) as w:
    w.write(20, {"loss": 0.5})
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [0, 10, 20]
  assert metrics.read_metrics(tmp_path)[-1]["loss"] == 0.5
  # non-lead processes write nothing
  other = tmp_path / "other"
  w = metrics.MetricsWriter(other, is_lead=False)
  w.write(0, {"loss": 1.0})
  w.close()
  assert not other.exists()
