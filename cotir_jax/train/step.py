"""The training step as one pure function (design decisions 1, 5): frozen encoders on device →
flow-matching CoTIR losses → one primal-dual optax update.

The state is `{"params", "lambdas", "opt_state", "step", "rng"}`; `params` is the trainable
`nnx.State` (LoRA + adapter), frozen weights travel separately and get no gradient. The random
key of step k is `fold_in(rng, k)`, so a resumed run draws exactly what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cotir_jax.train import objective as obj
from cotir_jax.train import optim

ANSWERS = ("ans_s", "ans_d", "ans_p")


@dataclasses.dataclass(frozen=True)
class Graphs:
  """Static graph definitions of the modules the step merges with their states."""
  model: nnx.GraphDef
  vae: nnx.GraphDef
  text: nnx.GraphDef
  clip: nnx.GraphDef | None


def text_key(family: str) -> str:
  """Name of the main text tokenizer in data batches: Qwen3 for FLUX.2, T5 for FLUX.1."""
  return "qwen" if family == "flux2" else "t5"


@dataclasses.dataclass
class Prepared:
  x_1: jax.Array        # clean target latent tokens [B, N, C]
  x_c: jax.Array        # conditioning (LQ) latent tokens
  grid: tuple[int, int]
  txt: jax.Array        # features of the chosen prompt [B, L, D]
  targets: dict         # {"s", "d", "p"}: features of the three CoT answers
  vec: jax.Array | None  # CLIP pooled vector (FLUX.1)
  use_gen_prob: jax.Array


def prepare(cfg, graphs: Graphs, frozen: dict, batch: dict, key, step) -> Prepared:
  """Runs the frozen VAE and text encoders (spec §10 steps 1–3); no gradient flows here."""
  family, compat = cfg.model.family, cfg.compat
  vae = nnx.merge(graphs.vae, frozen["vae"])
  lat_hq, lat_lq = vae.encode(batch["hq"]), vae.encode(batch["lq"])
  x_1, x_c = obj.image_tokens(lat_hq, family), obj.image_tokens(lat_lq, family)
  b = x_1.shape[0]
  p = optim.use_gen_prob(cfg, step)
  use_gen = jax.random.uniform(key, (b,)) < p
  pick = lambda gen, spe: jnp.where(use_gen.reshape(-1, *([1] * (gen.ndim - 1))), gen, spe)
  name = text_key(family)
  ids = jnp.concatenate([pick(batch[f"gen_{name}_ids"], batch[f"spe_{name}_ids"])]
                        + [batch[f"{a}_{name}_ids"] for a in ANSWERS])
  encoder = nnx.merge(graphs.text, frozen["text"])
  if family == "flux2":
    mask = jnp.concatenate([pick(batch[f"gen_{name}_mask"], batch[f"spe_{name}_mask"])]
                           + [batch[f"{a}_{name}_mask"] for a in ANSWERS])
    feats = encoder(ids, mask)
  else:
    feats = encoder(ids)  # upstream runs T5 without a mask: padding is attended (spec §9.4)
  txt, s, d, pl = jnp.split(feats, 4)
  vec = None
  if graphs.clip is not None:
    clip = nnx.merge(graphs.clip, frozen["clip"])
    vec = clip(pick(batch["gen_clip_ids"], batch["spe_clip_ids"]))
  x_1, x_c, txt, s, d, pl, vec = jax.lax.stop_gradient(
      obj.cast_inputs((x_1, x_c, txt, s, d, pl, vec), compat))
  return Prepared(x_1=x_1, x_c=x_c, grid=obj.token_grid(lat_hq.shape, family), txt=txt,
                  targets={"s": s, "d": d, "p": pl}, vec=vec, use_gen_prob=p)


def guidance_for(cfg, batch: int):
  return jnp.full((batch,), cfg.training.guidance, jnp.float32) if cfg.model.guidance_embed else None


def make_train_step(cfg, graphs: Graphs, tx: optax.GradientTransformation):
  """`train_step(state, frozen, batch) -> (state, metrics)`, to be wrapped in `jax.jit`."""
  family, compat = cfg.model.family, cfg.compat
  deltas = obj.deltas_from_config(cfg)
  lr_logged = optim.lr_unfloored(cfg)

  def train_step(state, frozen, batch):
    step = state["step"]
    k_prep, k_fm = jax.random.split(jax.random.fold_in(state["rng"], step))
    inp = prepare(cfg, graphs, frozen, batch, k_prep, step)
    b = inp.x_1.shape[0]
    x_t, x_0, t = obj.flow_matching_inputs(k_fm, inp.x_1, compat)
    ids_tgt, ids_cnd, txt_ids = obj.position_ids(b, inp.grid, inp.txt.shape[1], family)
    img, img_ids, txt, txt_ids, t_in = obj.model_inputs(x_t, inp.x_c, ids_tgt, ids_cnd, inp.txt,
                                                        txt_ids, t, compat)
    guidance = guidance_for(cfg, b)

    def loss_fn(params):
      model = nnx.merge(graphs.model, params, frozen["model"])
      v, s, d, p = model(img, img_ids, txt, txt_ids, t_in, vec=inp.vec, guidance=guidance)
      return obj.losses(v, {"s": s, "d": d, "p": p}, x_0, inp.x_1, inp.targets,
                        state["lambdas"], deltas)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    current = {"params": state["params"], "lambdas": state["lambdas"]}
    updates, opt_state = tx.update(optim.join_grads(grads, aux["c"]), state["opt_state"], current)
    new = optax.apply_updates(current, updates)
    metrics = {"loss": loss, "img_loss": aux["img_loss"],
               **{f"txt_{k}_loss": aux[f"txt_{k}_loss"] for k in "sdp"},
               **{f"c_{k}": aux["c"][k] for k in "sdp"},
               **{f"lambda_{k}": new["lambdas"][k] for k in "sdp"},
               "lr": lr_logged(step), "use_gen_prob": inp.use_gen_prob,
               "grad_norm": opt_state.grad_norm}
    state = {**state, **new, "opt_state": opt_state, "step": step + 1}
    return state, metrics

  return train_step
