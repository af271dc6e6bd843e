"""transformers text encoders → ours (Qwen3, T5 v1.1 encoder, CLIP text), one rule table each.

`load_text_encoder(path)` reads a transformers `save_pretrained` directory (config.json plus
one or sharded safetensors) and dispatches on `model_type`:

- `qwen3`: `Qwen3Model` keys, or `Qwen3ForCausalLM` keys under `model.` (its `lm_head` is
  ignored). Only decoder layers 1..max(hidden_layers) are read; keys of deeper layers and the
  final `norm` are ignored on purpose (the embedder never runs them).
- `t5`: `T5EncoderModel` (or full T5) keys; the embedding comes from `shared.weight`, or from
  `encoder.embed_tokens.weight` when only that copy of the tied table is stored; decoder and
  LM-head keys are ignored.
- `clip_text_model`: `CLIPTextModel` keys, bare (transformers ≥ 5) or under `text_model.`;
  the `position_ids` buffer and a `text_projection` are ignored.

Any other key that no rule uses is an error naming it (see `core.import_params`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cotir_jax.convert.core import (IDENTITY, ConversionError, Rule, flat_params, import_params,
                                    linear, materialize, rule)
from cotir_jax.convert.safetensors_io import SafetensorsDir
from cotir_jax.models.text import (CLIPTextConfig, Qwen3Config, T5Config, build_text_encoder)

SUPPORTED = ("qwen3", "t5", "clip_text_model")


def qwen3_rules(prefix: str = "", bias: bool = False) -> list[Rule]:
  """`Qwen3Model` (prefix "") or `Qwen3ForCausalLM` (prefix "model.") ↔ `Qwen3Embedder`."""
  L = f"{prefix}layers.{{i}}"
  rules = [rule("embed_tokens.embedding", f"{prefix}embed_tokens.weight", t=IDENTITY),
           rule("layers.input_layernorm.scale", f"{L}.input_layernorm.weight", t=IDENTITY),
           rule("layers.post_attention_layernorm.scale", f"{L}.post_attention_layernorm.weight",
                t=IDENTITY),
           rule("layers.self_attn.q_norm.scale", f"{L}.self_attn.q_norm.weight", t=IDENTITY),
           rule("layers.self_attn.k_norm.scale", f"{L}.self_attn.k_norm.weight", t=IDENTITY)]
  for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
    rules += linear(f"layers.self_attn.{p}", f"{L}.self_attn.{p}", bias=bias)
  for p in ("gate_proj", "up_proj", "down_proj"):
    rules += linear(f"layers.mlp.{p}", f"{L}.mlp.{p}", bias=False)
  return rules


def qwen3_ignore(prefix: str, keep_layers: int, total_layers: int) -> list[str]:
  """Keys we deliberately drop: final norm, LM head, rotary buffers, layers ≥ keep_layers."""
  p = re.escape(prefix)
  out = [rf"^{p}norm\.weight$", r"^lm_head\.", r"rotary_emb\.inv_freq$"]
  if total_layers > keep_layers:
    deeper = "|".join(str(i) for i in range(keep_layers, total_layers))
    out.append(rf"^{p}layers\.({deeper})\.")
  return out


def t5_rules(embed_key: str = "shared.weight") -> list[Rule]:
  """`T5EncoderModel` ↔ `T5Encoder`; `embed_key` is whichever copy of the tied table exists."""
  B = "encoder.block.{i}.layer"
  rules = [rule("shared.embedding", embed_key, t=IDENTITY),
           rule("relative_attention_bias",
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", t=IDENTITY),
           rule("blocks.attn_norm.scale", f"{B}.0.layer_norm.weight", t=IDENTITY),
           rule("blocks.ff_norm.scale", f"{B}.1.layer_norm.weight", t=IDENTITY),
           rule("final_layer_norm.scale", "encoder.final_layer_norm.weight", t=IDENTITY)]
  for p in ("q", "k", "v", "o"):
    rules += linear(f"blocks.attn.{p}", f"{B}.0.SelfAttention.{p}", bias=False)
  for p in ("wi_0", "wi_1", "wo"):
    rules += linear(f"blocks.ff.{p}", f"{B}.1.DenseReluDense.{p}", bias=False)
  return rules


T5_IGNORE = [r"^encoder\.embed_tokens\.weight$", r"^decoder\.", r"^lm_head\."]


def clip_rules(prefix: str = "") -> list[Rule]:
  """`CLIPTextModel` (prefix "" in transformers ≥ 5, "text_model." before) ↔ `CLIPTextEncoder`."""
  L = f"{prefix}encoder.layers.{{i}}"
  rules = [rule("token_embedding.embedding", f"{prefix}embeddings.token_embedding.weight",
                t=IDENTITY),
           rule("position_embedding.embedding", f"{prefix}embeddings.position_embedding.weight",
                t=IDENTITY),
           rule("final_layer_norm.scale", f"{prefix}final_layer_norm.weight", t=IDENTITY),
           rule("final_layer_norm.bias", f"{prefix}final_layer_norm.bias", t=IDENTITY)]
  for n in ("layer_norm1", "layer_norm2"):
    rules += [rule(f"layers.{n}.scale", f"{L}.{n}.weight", t=IDENTITY),
              rule(f"layers.{n}.bias", f"{L}.{n}.bias", t=IDENTITY)]
  for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
    rules += linear(f"layers.self_attn.{p}", f"{L}.self_attn.{p}", bias=True)
  for p in ("fc1", "fc2"):
    rules += linear(f"layers.mlp.{p}", f"{L}.mlp.{p}", bias=True)
  return rules


CLIP_IGNORE = [r"embeddings\.position_ids$", r"^text_projection\.", r"^logit_scale$"]


def read_config(path: str) -> dict:
  """config.json of a transformers model directory, with errors that name the file."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise ConversionError(f"{cfg_path}: missing (expected a transformers save_pretrained "
                          "directory with config.json and *.safetensors)")
  with open(cfg_path) as f:
    return json.load(f)


def text_config_from_hf(cfg: dict, *, source: str, hidden_layers=(9, 18, 27)):
  """Our encoder config from a transformers config dict; unsupported model_type is an error."""
  model_type = cfg.get("model_type")
  if model_type == "qwen3":
    return Qwen3Config.from_hf(cfg, hidden_layers=hidden_layers)
  if model_type == "t5":
    return T5Config.from_hf(cfg)
  if model_type == "clip_text_model":
    return CLIPTextConfig.from_hf(cfg)
  raise ConversionError(f"{source}: model_type {model_type!r} is not a supported text encoder "
                        f"(supported: {', '.join(SUPPORTED)})")


def rules_for(cfg, keys: Sequence[str]) -> tuple[list[Rule], list[str]]:
  """The rule table and ignore patterns for our config and the checkpoint's key names."""
  keys = set(keys)
  if isinstance(cfg, Qwen3Config):
    prefix = "model." if any(k.startswith("model.") for k in keys) else ""
    return (qwen3_rules(prefix, cfg.attention_bias),
            qwen3_ignore(prefix, cfg.num_layers_built, cfg.num_hidden_layers))
  if isinstance(cfg, T5Config):
    embed = "shared.weight" if "shared.weight" in keys or not keys else "encoder.embed_tokens.weight"
    return t5_rules(embed), T5_IGNORE
  if isinstance(cfg, CLIPTextConfig):
    prefix = "text_model." if any(k.startswith("text_model.") for k in keys) else ""
    return clip_rules(prefix), CLIP_IGNORE
  raise TypeError(f"not a text encoder config: {cfg!r}")


def _checkpoint_dtype(tensors: Mapping[str, np.ndarray]):
  for k in tensors:
    if re.search(r"(embed_tokens|shared|token_embedding)\.weight$", k):
      return tensors[k].dtype
  return next(iter(tensors.values())).dtype


def load_text_encoder(path: str, dtype=None, hidden_layers=(9, 18, 27), *, compute_dtype=None,
                      implementation="xla", scan: bool = True):
  """A transformers Qwen3 / T5 encoder / CLIP text directory → our module with its weights.

  `dtype`: parameter dtype (None = the checkpoint's); `compute_dtype`: activations (None =
  the parameter dtype). `hidden_layers` only matters for Qwen3 (which hidden states to return,
  and so how many decoder layers to read). `implementation`: the attention kernel, a
  `model.attention` name or a `models.attention.AttentionSpec`.
  """
  hf_cfg = read_config(path)
  cfg = text_config_from_hf(hf_cfg, source=os.path.join(path, "config.json"),
                            hidden_layers=hidden_layers)
  tensors = SafetensorsDir(path)
  param_dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(_checkpoint_dtype(tensors))
  compute = jnp.dtype(compute_dtype) if compute_dtype is not None else param_dtype

  def build():
    return build_text_encoder(cfg, dtype=compute, param_dtype=param_dtype, rngs=nnx.Rngs(0),
                              implementation=implementation, scan=scan)

  rules, ignore = rules_for(cfg, list(tensors))
  targets = flat_params(nnx.eval_shape(build))
  params = import_params(rules, tensors, targets, source=path, dtype=param_dtype, ignore=ignore)
  return materialize(build, params)
