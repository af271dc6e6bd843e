"""Builds what training and inference run: graph definitions and states of the CoTIR model and
the frozen encoders, the batch layout, and the host tokenizers.

Everything starts abstract (`abstract_states`: shapes and dtypes, no weight materialised), so
the planner can compile a full-size step on a laptop; concrete states are created directly in
their target shardings, under `jax.jit` with `out_shardings` or by an Orbax restore, which works
when the devices span several processes (multi-host) and never holds a full-size base twice.

Without `model.pretrained` every module is randomly initialised from the config (the tiny
configs). With it, the frozen weights come from a checkpoint written by
`convert/diffusers_to_orbax.py`: the encoders are rebuilt from the configs stored in its
manifest (so `model.vae` / `model.text_encoder` / `model.clip` are not used), every frozen array
is restored into its sharding, and only the trainable LoRA + adapter weights are initialised —
inside `jax.jit`, where XLA drops the random init of everything frozen.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cotir_jax import models, sharding, tokenization
from cotir_jax.config import ConfigError
from cotir_jax.data.decode import ANSWER_MASK, TEXT_FIELDS
from cotir_jax.models.attention import AttentionSpec, platform_of
from cotir_jax.models.layers import dtype_of
from cotir_jax.models.text import build_text_encoder
from cotir_jax.models.vae import build_vae

@dataclasses.dataclass(frozen=True)
class Graphs:
  """Static graph definitions of the modules the step merges with their states."""
  model: nnx.GraphDef
  vae: nnx.GraphDef
  text: nnx.GraphDef
  clip: nnx.GraphDef | None


# our module name → name in a converted base checkpoint
BASE_NAMES = {"vae": "vae", "text": "text_encoder", "clip": "clip"}
CLIP_LENGTH = 77  # CLIP's context, as upstream tokenizes it


def _encoders_from_config(cfg, rngs, platform) -> dict:
  m = cfg.model
  enc = dict(dtype=dtype_of(m.encoder_dtype), param_dtype=dtype_of(m.encoder_dtype), rngs=rngs)
  text = dict(enc, implementation=AttentionSpec.from_config(m, platform),
              scan=bool(m.scan_layers))
  return {"vae": build_vae(m.vae, **enc), "text": build_text_encoder(m.text_encoder, **text),
          "clip": build_text_encoder(m.clip, **text) if "clip" in m else None}


def _encoders_from_base(cfg, platform) -> dict:
  from cotir_jax.convert.base import module_builder, read_manifest
  path, dt = cfg.model.pretrained, dtype_of(cfg.model.encoder_dtype)
  present = read_manifest(path)["modules"]
  attention = AttentionSpec.from_config(cfg.model, platform)
  out = {}
  for ours, theirs in BASE_NAMES.items():
    if theirs in present:
      build, _ = module_builder(path, theirs, dtype=dt, compute_dtype=dt, attention=attention,
                                scan=bool(cfg.model.scan_layers))
      out[ours] = nnx.eval_shape(build)
    else:
      out[ours] = None
  return out


def _split(modules: dict) -> tuple[Graphs, dict]:
  """(graphs, states): the model splits into trainable `params` and frozen `model` state."""
  gd_model, params, frozen_model = nnx.split(modules["model"], models.TRAINABLE, ...)
  graphs, states = {"model": gd_model}, {"params": params, "model": frozen_model}
  for name in ("vae", "text", "clip"):
    if modules.get(name) is not None:
      graphs[name], states[name] = nnx.split(modules[name])
    else:
      graphs[name] = None
  return Graphs(**graphs), states


def _modules_from_config(cfg, platform=None) -> dict:
  rngs = nnx.Rngs(cfg.seed)  # the model first: its draws do not depend on the encoders
  return {"model": models.CoTIR(cfg.model, rngs=rngs, platform=platform),
          **_encoders_from_config(cfg, rngs, platform)}


def abstract_states(cfg, platform: str | None = None) -> tuple[Graphs, dict]:
  """(graphs, states) with ShapeDtypeStruct leaves: {"params", "model", "vae", "text"[, "clip"]}.

  `platform`: of the devices the graphs will run on, which `model.attention` resolves for
  (`attention.platform_of`; None: the default devices)."""
  if not cfg.model.pretrained:
    graphs, states = _split(nnx.eval_shape(lambda: _modules_from_config(cfg, platform)))
  else:
    model = nnx.eval_shape(lambda: models.CoTIR(cfg.model, rngs=nnx.Rngs(cfg.seed),
                                                platform=platform))
    graphs, states = _split({"model": model, **_encoders_from_base(cfg, platform)})
  return graphs, {k: v for k, v in states.items() if v is not None}


def run_init(fn, out_shardings, *args):
  """`fn(*args)` (an initialiser) jitted straight into `out_shardings`. It runs once, so on CPU
  it is compiled without LLVM's optimisations: half the compile time of the tiny configs'
  frozen weights (18 s → 9 s), the same values."""
  compiled = jax.jit(fn, out_shardings=out_shardings).lower(*args)
  cpu = jax.default_backend() == "cpu"
  return compiled.compile(compiler_options={"xla_backend_optimization_level": 0} if cpu else None)(
      *args)


def init_params(cfg):
  """The trainable LoRA + adapter state, freshly initialised (call under jit)."""
  return nnx.state(models.CoTIR(cfg.model, rngs=nnx.Rngs(cfg.seed)), models.TRAINABLE)


def init_frozen(cfg, abstract: dict) -> dict:
  """Concrete frozen states {"model", "vae", "text"[, "clip"]} in the shardings that the
  ShapeDtypeStruct leaves of `abstract` carry: random (jitted) or restored from the base."""
  frozen_abstract = {k: v for k, v in abstract.items() if k != "params"}
  if not cfg.model.pretrained:
    def init():
      _, states = _split(_modules_from_config(cfg))
      return {k: states[k] for k in frozen_abstract}
    shardings = jax.tree.map(lambda a: a.sharding, frozen_abstract)
    return run_init(init, shardings)

  from cotir_jax.convert.base import restore_base_params
  targets = {}
  for ours, state in frozen_abstract.items():
    pure = nnx.to_pure_dict(state)
    if ours == "model":
      targets["transformer"] = pure["backbone"]
    else:
      targets[BASE_NAMES[ours]] = pure
  restored = restore_base_params(cfg.model.pretrained, tuple(targets), targets=targets)
  frozen = {}
  for ours, state in frozen_abstract.items():
    state = jax.tree.map(lambda x: x, state)  # a copy whose leaves are replaced below
    if ours == "model":
      nnx.replace_by_pure_dict(state, {"backbone": restored["transformer"]})
    else:
      nnx.replace_by_pure_dict(state, restored[BASE_NAMES[ours]])
    frozen[ours] = state
  return frozen


def build_states(cfg, mesh, rules=None):
  """(graphs, params, frozen): concrete trainable and frozen states placed with the rule-table
  shardings on `mesh` (for inference and tools; training goes through `program.Program`)."""
  graphs, abstract = abstract_states(cfg, platform_of(mesh.devices.flat[0]))
  abstract = sharding.abstract_with_shardings(abstract, sharding.tree_shardings(abstract, mesh, rules))
  params_sh = jax.tree.map(lambda a: a.sharding, abstract["params"])
  params = run_init(lambda: init_params(cfg), params_sh)
  return graphs, params, init_frozen(cfg, abstract)


def tokenizer_lengths(cfg) -> dict[str, int]:
  """Host tokenizers by the name the data batches use, with their fixed lengths."""
  n = int(cfg.data.max_length)
  return {"qwen": n} if cfg.model.family == "flux2" else {"t5": n, "clip": CLIP_LENGTH}


def batch_spec(cfg, batch: int, patch: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a training batch (the data pipeline's arrays, `meta` aside)."""
  image = jax.ShapeDtypeStruct((batch, patch, patch, 3), jnp.float32)
  spec = {"hq": image, "lq": image, ANSWER_MASK: jax.ShapeDtypeStruct((batch, 3), jnp.int32)}
  for name, length in tokenizer_lengths(cfg).items():
    for field in TEXT_FIELDS:
      for part in ("ids", "mask"):
        spec[f"{field}_{name}_{part}"] = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  return spec


def _tokenizer_dir(cfg, field: str, base_module: str) -> str:
  path = cfg.model.get(field)
  if path:
    return path
  if cfg.model.pretrained:
    from cotir_jax.convert.base import tokenizer_path
    found = tokenizer_path(cfg.model.pretrained, base_module)
    if found:
      return found
  raise ConfigError(f"model.{field} is unset and model.pretrained has no tokenizer for "
                    f"{base_module}; point model.{field} at a tokenizer directory")


def build_tokenizers(cfg) -> dict:
  """Host tokenizers keyed as the data pipeline names its arrays: qwen (FLUX.2) or t5 + clip."""
  n = tokenizer_lengths(cfg)
  if cfg.model.family == "flux2":
    return {"qwen": tokenization.QwenChatTokenizer(_tokenizer_dir(cfg, "tokenizer", "text_encoder"),
                                                   n["qwen"])}
  return {"t5": tokenization.T5TextTokenizer(_tokenizer_dir(cfg, "tokenizer_2", "text_encoder"),
                                             n["t5"]),
          "clip": tokenization.CLIPTextTokenizer(_tokenizer_dir(cfg, "tokenizer", "clip"),
                                                 n["clip"])}
