"""The training step as one pure jitted function of split NNX state: frozen encoders on device →
flow-matching CoTIR losses → one primal-dual optax update.

The state is `{"params", "lambdas", "opt_state", "step", "rng", "nonfinite_step"}` (plus
`"ema"` with `training.ema_decay` > 0, see `ema.py`); `params` is the trainable `nnx.State`
(LoRA + adapter), frozen weights travel separately and get no gradient. Every random draw of a sample (prompt choice, t, noise) comes from its own key,
`split(fold_in(rng, step), global_batch)[row]`: a resumed run draws exactly what an
uninterrupted one does, and the draws do not depend on how the batch is split over processes
or into micro-batches.

Gradient accumulation (`training.gradient_accumulation_steps = k`) splits the global batch into
k equal micro-batches inside the one compiled step (a `lax.scan`; micro-batch j holds rows
j, j + k, …, so each device keeps its own rows), averages gradients, losses and constraint
values, and applies one primal and one dual update.

A sample without one of the CoT answers (`answer_mask`, e.g. paired data without scene
descriptions) is left out of that text loss and its constraint; a term that no sample of the
global batch has gets no dual step. Each micro-batch divides its masked sums by the global
batch's counts, so accumulation computes what the whole batch does.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cotir_jax import latents, sharding
from cotir_jax.modules import Graphs
from cotir_jax.data.decode import ANSWER_MASK
from cotir_jax.train import ema
from cotir_jax.train import objective as obj
from cotir_jax.train import optim

ANSWERS = ("ans_s", "ans_d", "ans_p")


def text_key(family: str) -> str:
  """Name of the main text tokenizer in data batches: Qwen3 for FLUX.2, T5 for FLUX.1."""
  return "qwen" if family == "flux2" else "t5"


@functools.partial(jax.tree_util.register_dataclass, meta_fields=["grid"],
                   data_fields=["x_1", "x_c", "txt", "targets", "vec"])
@dataclasses.dataclass
class Prepared:
  x_1: jax.Array        # clean target latent tokens [B, N, C]
  x_c: jax.Array        # conditioning (LQ) latent tokens
  grid: tuple[int, int]
  txt: jax.Array        # features of the chosen prompt [B, L, D]
  targets: dict         # {"s", "d", "p"}: features of the three CoT answers
  vec: jax.Array | None  # CLIP pooled vector (FLUX.1)


def prepare(cfg, graphs: Graphs, frozen: dict, batch: dict, use_gen: jax.Array) -> Prepared:
  """Runs the frozen VAE and text encoders; no gradient flows here.

  `use_gen` [B] bool picks the generic prompt of each sample (else the specific one)."""
  family, compat = cfg.model.family, cfg.compat
  vae = nnx.merge(graphs.vae, frozen["vae"])
  with jax.named_scope("vae"):
    # one encoder call on [hq0, lq0, hq1, lq1, ...]: each device keeps its own rows, and the
    # step holds one copy of the encoder instead of two (half its compile time)
    pairs = jnp.stack([batch["hq"], batch["lq"]], axis=1)
    lat = vae.encode(pairs.reshape(-1, *pairs.shape[2:]))
    lat = lat.reshape(pairs.shape[0], 2, *lat.shape[1:])
    lat_hq, lat_lq = lat[:, 0], lat[:, 1]
  x_1, x_c = latents.image_tokens(lat_hq, family), latents.image_tokens(lat_lq, family)
  pick = lambda gen, spe: jnp.where(use_gen.reshape(-1, *([1] * (gen.ndim - 1))), gen, spe)
  name = text_key(family)
  ids = jnp.concatenate([pick(batch[f"gen_{name}_ids"], batch[f"spe_{name}_ids"])]
                        + [batch[f"{a}_{name}_ids"] for a in ANSWERS])
  encoder = nnx.merge(graphs.text, frozen["text"])
  with jax.named_scope("text_encoder"):
    if family == "flux2":
      mask = jnp.concatenate([pick(batch[f"gen_{name}_mask"], batch[f"spe_{name}_mask"])]
                             + [batch[f"{a}_{name}_mask"] for a in ANSWERS])
      feats = encoder(ids, mask)
    else:
      feats = encoder(ids)  # upstream runs T5 without a mask: padding is attended
  txt, s, d, pl = jnp.split(feats, 4)
  vec = None
  if graphs.clip is not None:
    clip = nnx.merge(graphs.clip, frozen["clip"])
    with jax.named_scope("clip"):
      vec = clip(pick(batch["gen_clip_ids"], batch["spe_clip_ids"]))
  x_1, x_c, txt, s, d, pl, vec = jax.lax.stop_gradient(
      obj.cast_inputs((x_1, x_c, txt, s, d, pl, vec), compat))
  return Prepared(x_1=x_1, x_c=x_c, grid=latents.token_grid(lat_hq.shape, family), txt=txt,
                  targets={"s": s, "d": d, "p": pl}, vec=vec)


def guidance_for(cfg, batch: int):
  return jnp.full((batch,), cfg.training.guidance, jnp.float32) if cfg.model.guidance_embed else None


def split_micro(tree, k: int):
  """[B, ...] leaves → [k, B/k, ...]: micro-batch j = rows j, j + k, … (each device's own rows)."""
  def one(x):
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return x if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else sharding.constrain(
        x, (None, "batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(one, tree)


def guard_nonfinite(train_step):
  """Leaves the state unchanged when the loss or gradient is not finite, and records the step
  in `nonfinite_step` (the loop stops the run at its next host sync, naming the step)."""
  def step(state, frozen, batch):
    new, metrics = train_step(state, frozen, batch)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(ok, x, y), a, b)
    new = {**keep(new, state), "step": state["step"] + 1,
           "nonfinite_step": jnp.where((state["nonfinite_step"] < 0) & ~ok, state["step"],
                                       state["nonfinite_step"])}
    return new, metrics
  return step


def make_train_step(cfg, graphs: Graphs, tx: optax.GradientTransformation, prepare_inputs=prepare):
  """`train_step(state, frozen, batch) -> (state, metrics)`, to be wrapped in `jax.jit`
  (inside `sharding.activation_sharding` when running on a mesh).

  `prepare_inputs(cfg, graphs, frozen, batch, use_gen) -> Prepared` makes the model inputs:
  the frozen encoders on the data batch by default; benchmarks/step_throughput.py passes
  pre-computed latents and text features to time the rest of the step alone."""
  family, compat = cfg.model.family, cfg.compat
  deltas = obj.deltas_from_config(cfg)
  lr_logged = optim.lr_unfloored(cfg)
  k = int(cfg.training.gradient_accumulation_steps)
  ema_decay = float(cfg.training.ema_decay)
  shift = float(cfg.training.timestep_shift)

  def grads_and_aux(params, frozen, batch, keys, p_gen, lambdas, norms):
    """Gradient and loss terms of one (micro-)batch whose rows draw from `keys`; `norms` [3]:
    the whole batch's count of samples with each answer, per micro-batch."""
    k_prompt, k_fm = _split_rows(keys)
    use_gen = jax.vmap(jax.random.uniform)(k_prompt) < p_gen
    inp = prepare_inputs(cfg, graphs, frozen, batch, use_gen)
    b = inp.x_1.shape[0]
    x_t, x_0, t = obj.flow_matching_inputs(k_fm, inp.x_1, compat, shift)
    ids_tgt, ids_cnd, txt_ids = latents.position_ids(b, inp.grid, inp.txt.shape[1], family)
    img, img_ids, txt, txt_ids, t_in = obj.model_inputs(x_t, inp.x_c, ids_tgt, ids_cnd, inp.txt,
                                                        txt_ids, t, compat)
    guidance = guidance_for(cfg, b)

    def loss_fn(params):
      model = nnx.merge(graphs.model, params, frozen["model"])
      v, s, d, p = model(img, img_ids, txt, txt_ids, t_in, vec=inp.vec, guidance=guidance)
      with jax.named_scope("loss"):
        return obj.losses(v, {"s": s, "d": d, "p": p}, x_0, inp.x_1, inp.targets, lambdas, deltas,
                          batch[ANSWER_MASK], norms)

    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, aux

  def train_step(state, frozen, batch):
    step, params = state["step"], state["params"]
    rows = jax.tree.leaves(batch)[0].shape[0]
    keys = jax.random.split(jax.random.fold_in(state["rng"], step), rows)
    p_gen = optim.use_gen_prob(cfg, step)
    # samples of the global batch with a scene / degradation / plan answer: the text losses
    # are means over these, so micro-batches share the batch's counts (sums, not means, add up)
    counts = jnp.sum(batch[ANSWER_MASK].astype(jnp.float32), axis=0)
    if k == 1:
      grads, aux = grads_and_aux(params, frozen, batch, keys, p_gen, state["lambdas"], counts)
    else:
      def body(acc, micro):
        g, a = grads_and_aux(params, frozen, *micro, p_gen, state["lambdas"], counts / k)
        f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
        return jax.tree.map(jnp.add, acc, (f32(g), f32(a))), None
      micro = split_micro((batch, keys), k)
      first = jax.tree.map(lambda x: x[0], micro)
      shapes = jax.eval_shape(grads_and_aux, params, frozen, *first, p_gen, state["lambdas"],
                              counts)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
      # scan_layers=False unrolls this loop too: a program without loops (profiling, and XLA's
      # cost model, which prices a loop body once)
      (g_sum, a_sum), _ = jax.lax.scan(body, zeros, micro, unroll=not cfg.model.scan_layers)
      grads = jax.tree.map(lambda s, p: (s / k).astype(p.dtype), g_sum, params)
      aux = jax.tree.map(lambda s: s / k, a_sum)

    with jax.named_scope("optimizer"):
      current = {"params": params, "lambdas": state["lambdas"]}
      valid = {n: counts[i] > 0 for i, n in enumerate(obj.TEXT_KEYS)}
      updates, opt_state = tx.update(optim.join_grads(grads, aux["c"], valid),
                                     state["opt_state"], current)
      new = optax.apply_updates(current, updates)
    metrics = {"loss": aux["loss"], "img_loss": aux["img_loss"],
               **{f"txt_{n}_loss": aux[f"txt_{n}_loss"] for n in "sdp"},
               **{f"c_{n}": aux["c"][n] for n in "sdp"},
               **{f"lambda_{n}": new["lambdas"][n] for n in "sdp"},
               **{f"answers_{n}": counts[i] for i, n in enumerate(obj.TEXT_KEYS)},
               "lr": lr_logged(step), "use_gen_prob": p_gen,
               "grad_norm": optim.grad_norm(opt_state)}
    state = {**state, **new, "opt_state": opt_state, "step": step + 1}
    if ema_decay:
      state["ema"] = ema.update(state["ema"], new["params"], ema_decay, step)
    return state, metrics

  return guard_nonfinite(train_step)


def _split_rows(keys):
  """Per-row keys [B] → (prompt-choice keys [B], flow-matching keys [B])."""
  pairs = jax.vmap(jax.random.split)(keys)
  return pairs[:, 0], pairs[:, 1]
