"""Builds what training runs: graph definitions and sharded states of the CoTIR model and the
frozen encoders, and the host tokenizers.

Without `model.pretrained` every module is randomly initialised from the config (the tiny
configs). With it, the frozen weights come from a checkpoint written by
`convert/diffusers_to_orbax.py`: the encoders are rebuilt from the configs stored in its
manifest (so `model.vae` / `model.text_encoder` / `model.clip` are not used), every frozen array
is restored directly into its target sharding, and only the trainable LoRA + adapter weights are
initialised — inside `jax.jit`, where XLA drops the random init of everything frozen, so a
full-size base never exists twice on the host.
"""

from __future__ import annotations


import jax
from flax import nnx

from cotir_jax import models, sharding, tokenization
from cotir_jax.models.layers import dtype_of
from cotir_jax.models.text import build_text_encoder
from cotir_jax.models.vae import build_vae

# our module name → name in a converted base checkpoint
BASE_NAMES = {"vae": "vae", "text": "text_encoder", "clip": "clip"}


def _encoders_from_config(cfg, rngs) -> dict:
  m = cfg.model
  enc = dict(dtype=dtype_of(m.encoder_dtype), param_dtype=dtype_of(m.encoder_dtype), rngs=rngs)
  return {"vae": build_vae(m.vae, **enc), "text": build_text_encoder(m.text_encoder, **enc),
          "clip": build_text_encoder(m.clip, **enc) if "clip" in m else None}


def _encoders_from_base(cfg) -> dict:
  from cotir_jax.convert.base import module_builder, read_manifest
  path, dt = cfg.model.pretrained, dtype_of(cfg.model.encoder_dtype)
  present = read_manifest(path)["modules"]
  out = {}
  for ours, theirs in BASE_NAMES.items():
    if theirs in present:
      build, _ = module_builder(path, theirs, dtype=dt, compute_dtype=dt)
      out[ours] = nnx.eval_shape(build)
    else:
      out[ours] = None
  return out


def _split(modules: dict):
  """(graphs, states): the model splits into trainable `params` and frozen `model` state."""
  gd_model, params, frozen_model = nnx.split(modules["model"], models.TRAINABLE, ...)
  graphs, states = {"model": gd_model}, {"params": params, "model": frozen_model}
  for name in ("vae", "text", "clip"):
    if modules.get(name) is not None:
      graphs[name], states[name] = nnx.split(modules[name])
    else:
      graphs[name] = None
  return graphs, states


def build_states(cfg, mesh, rules):
  """(graphs, params, frozen): graph definitions, the trainable state and the frozen states
  ({"model", "vae", "text"[, "clip"]}), all placed with the rule-table shardings."""
  if not cfg.model.pretrained:
    rngs = nnx.Rngs(cfg.seed)
    graphs, states = _split({"model": models.CoTIR(cfg.model, rngs=rngs),
                             **_encoders_from_config(cfg, rngs)})
    states = sharding.place(states, sharding.tree_shardings(states, mesh, rules))
    return graphs, states.pop("params"), states

  from cotir_jax.convert.base import restore_base_params
  abstract_model = nnx.eval_shape(lambda: models.CoTIR(cfg.model, rngs=nnx.Rngs(cfg.seed)))
  graphs, abstract = _split({"model": abstract_model, **_encoders_from_base(cfg)})
  shardings = sharding.tree_shardings(abstract, mesh, rules)

  def init_params():
    model = models.CoTIR(cfg.model, rngs=nnx.Rngs(cfg.seed))
    return nnx.state(model, models.TRAINABLE)

  params = jax.jit(init_params, out_shardings=shardings["params"])()

  targets = {}
  for ours, state in abstract.items():
    if ours == "params":
      continue
    pure, shard = nnx.to_pure_dict(state), nnx.to_pure_dict(shardings[ours])
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          pure, shard)
    if ours == "model":
      targets["transformer"] = target["backbone"]
    else:
      targets[BASE_NAMES[ours]] = target
  restored = restore_base_params(cfg.model.pretrained, tuple(targets), targets=targets)
  frozen = {}
  for ours, state in abstract.items():
    if ours == "params":
      continue
    if ours == "model":
      nnx.replace_by_pure_dict(state, {"backbone": restored["transformer"]})
    else:
      nnx.replace_by_pure_dict(state, restored[BASE_NAMES[ours]])
    frozen[ours] = state
  return graphs, params, frozen


def _tokenizer_dir(cfg, field: str, base_module: str) -> str:
  path = cfg.model.get(field)
  if path:
    return path
  if cfg.model.pretrained:
    from cotir_jax.convert.base import tokenizer_path
    found = tokenizer_path(cfg.model.pretrained, base_module)
    if found:
      return found
  raise ValueError(f"model.{field} is unset and model.pretrained has no tokenizer for "
                   f"{base_module}; point model.{field} at a tokenizer directory")


def build_tokenizers(cfg) -> dict:
  """Host tokenizers keyed as the data pipeline names its arrays: qwen (FLUX.2) or t5 + clip."""
  n = cfg.data.max_length
  if cfg.model.family == "flux2":
    return {"qwen": tokenization.QwenChatTokenizer(_tokenizer_dir(cfg, "tokenizer", "text_encoder"), n)}
  return {"t5": tokenization.T5TextTokenizer(_tokenizer_dir(cfg, "tokenizer_2", "text_encoder"), n),
          "clip": tokenization.CLIPTextTokenizer(_tokenizer_dir(cfg, "tokenizer", "clip"), 77)}
