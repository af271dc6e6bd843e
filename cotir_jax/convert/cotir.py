"""Released CoTIR weights (upstream `lora.pt` / `cot_adapter.pt`) ↔ our CoTIR.

Upstream saves two `torch.save` dicts of bfloat16 tensors with BFL-native names:
`lora.pt` holds every `.lora_` key of the backbone (`single_blocks.{i}.linear1.lora_A.weight`
[r, in], `…lora_B.weight` [out, r], `…lora_B.bias` [out]; `final_layer.linear`,
`final_layer.adaLN_modulation.1`; Kontext also `single_blocks.{i}.modulation.lin`), and
`cot_adapter.pt` every `cot_adapter.*` parameter (`decoder.{i}` blocks, the three hidden
heads, the three LastLayers, the three [1] scales). Ours keep LoRA as `Dense.lora.{a, b,
b_bias}` with a = A.T [in, r], b = B.T [r, out], and stack blocks on a leading layer axis, so
one `core.Rule` table (`{i}` = layer) drives import, export and the coverage check. BFL's
`final_layer.adaLN_modulation.1` already emits (shift, scale) like ours: no swap here. The
fused projections (`linear1`'s columns: LoRA B and its bias; `linear2`'s rows: LoRA A; the
adapter's kernels) are regrouped by head as the base weights are (`models.layers.FusedLayout`):
the tables take the `ModelSpec` whose layouts they follow, which the functions below read from
the trainable weights' shapes (`spec_of_trainable`).

Files may also be `.safetensors` with the same keys (what `save_cotir_weights(fmt=
"safetensors")` writes). Import casts to each variable's dtype; export casts to `dtype`
(bfloat16 by default, as upstream; `None` keeps ours, which makes round trips bit-exact).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from cotir_jax.convert import orbax_io
from cotir_jax.convert.core import (IDENTITY, LINEAR, ConversionError, Rule, export_params,
                                    flat_params, import_params, linear, regroup, rule)
from cotir_jax.convert.safetensors_io import SafetensorsDir, save_file
from cotir_jax.models.layers import FUSED_LAYOUT
from cotir_jax.models.spec import ModelSpec

HEADS = ("degradation", "sharpness", "planning")
LORA_FILE, ADAPTER_FILE = "lora", "cot_adapter"
FORMATS = ("pt", "safetensors")
UPSTREAM_FILES = tuple(f"{name}.{fmt}" for name in (LORA_FILE, ADAPTER_FILE) for fmt in FORMATS)


# ----------------------------------------------------------------------------- the table

def _lora(ours: str, ref: str, *, cols=None, rows=None) -> list[Rule]:
  """A LoRA of a Linear whose outputs (`cols`: B and its bias) or inputs (`rows`: A) may be a
  fused projection's (`FusedLayout`)."""
  a, b, b_bias = LINEAR, LINEAR, IDENTITY
  if cols is not None:
    b, b_bias = regroup(b, cols, -1), regroup(b_bias, cols, -1)
  if rows is not None:
    a = regroup(a, rows, -2)
  return [rule(f"{ours}.lora.a", f"{ref}.lora_A.weight", t=a),
          rule(f"{ours}.lora.b", f"{ref}.lora_B.weight", t=b),
          rule(f"{ours}.lora.b_bias", f"{ref}.lora_B.bias", t=b_bias)]


def lora_rules(spec: ModelSpec, prefix: str = "backbone.") -> list[Rule]:
  """Our LoRA variables (under `prefix`) ↔ upstream `lora.pt` keys."""
  p, s = prefix, "single_blocks.{i}"
  rules = [*_lora(f"{p}single_blocks.linear1", f"{s}.linear1", cols=spec.linear1_layout),
           *_lora(f"{p}single_blocks.linear2", f"{s}.linear2", rows=spec.linear2_layout),
           *_lora(f"{p}final_layer.linear", "final_layer.linear"),
           *_lora(f"{p}final_layer.adaLN_modulation", "final_layer.adaLN_modulation.1")]
  if spec.family == "flux1":
    rules += _lora(f"{p}single_blocks.modulation.lin", f"{s}.modulation.lin")
  return rules


def adapter_rules(spec: ModelSpec, prefix: str = "cot_adapter.") -> list[Rule]:
  """Our `cot_adapter` variables ↔ upstream `cot_adapter.pt` keys."""
  a, d = "cot_adapter", "cot_adapter.decoder.{i}"
  p = prefix
  rules = [*linear(f"{p}decoder.linear1", f"{d}.linear1", True, cols=spec.adapter_linear1_layout),
           *linear(f"{p}decoder.linear2", f"{d}.linear2", True, rows=spec.adapter_linear2_layout),
           rule(f"{p}decoder.norm.query_norm.scale", f"{d}.norm.query_norm.scale", t=IDENTITY),
           rule(f"{p}decoder.norm.key_norm.scale", f"{d}.norm.key_norm.scale", t=IDENTITY),
           *linear(f"{p}decoder.modulation.lin", f"{d}.modulation.lin", True)]
  for h in HEADS:
    rules += [*linear(f"{p}{h}_layer", f"{a}.{h}_layer", True),
              *linear(f"{p}final_{h}_layer.linear", f"{a}.final_{h}_layer.linear", True),
              *linear(f"{p}final_{h}_layer.adaLN_modulation",
                      f"{a}.final_{h}_layer.adaLN_modulation.1", True),
              rule(f"{p}scale_{h}", f"{a}.scale_{h}", t=IDENTITY)]
  return rules


def cotir_rules(spec: ModelSpec) -> list[Rule]:
  """The whole trainable set of `CoTIR` (paths as in `nnx.state(model, TRAINABLE)`)."""
  return lora_rules(spec) + adapter_rules(spec)


def family_of(paths) -> str:
  """flux1 (Kontext) is the only family with LoRA on the single blocks' modulation."""
  return "flux1" if any(".modulation.lin.lora." in p and "single_blocks" in p for p in paths) \
      else "flux2"


def spec_of_trainable(params: Mapping[str, object], source: str, family: str | None = None
                      ) -> ModelSpec:
  """A `ModelSpec` with the family (default: `family_of`) and widths of a trainable set (our
  dotted paths → arrays or shapes), read from its shapes: what the tables' fused layouts need.
  The adapter's QK-norm gives the head width, its linear1 the widths, the single blocks' LoRA
  A on linear2 (when there is LoRA) the MLP width."""
  from cotir_jax import config
  shape = lambda k: np.shape(params[k])
  try:
    hidden, fused = shape("cot_adapter.decoder.linear1.kernel")[-2:]
    head_dim = shape("cot_adapter.decoder.norm.query_norm.scale")[-1]
  except KeyError as e:
    raise ConversionError(f"{source}: no CoT adapter among the weights (missing {e})") from None
  lora_a = "backbone.single_blocks.linear2.lora.a"
  model = config.defaults().model
  model.update(family=family or family_of(params), hidden_size=hidden,
               num_heads=hidden // head_dim)
  model.cot_adapter.mlp_ratio = (fused - 3 * hidden) / hidden
  if lora_a in params:
    model.mlp_ratio = (shape(lora_a)[-2] - hidden) / hidden
  spec = ModelSpec.from_config(model)
  if (spec.adapter_mlp_hidden != fused - 3 * hidden
      or (lora_a in params and spec.mlp_hidden != shape(lora_a)[-2] - hidden)):
    raise ConversionError(f"{source}: cannot tell the model's widths from its weights; give "
                          "its --config")
  return spec


def regroup_side_by_side(arrays: Mapping[str, object], spec: ModelSpec, xp=np) -> dict:
  """Trainable arrays written when the fused projections' parts lay side by side (a checkpoint
  without `fused_layout`) → ours: every array whose dotted path (a trailing `.value` aside)
  ends with the path of such a parameter, which also catches what mirrors it (optimizer
  moments, the moving average); the other arrays as they are."""
  fused = {r.ours: r.transform.regroups for r in cotir_rules(spec) if r.transform.regroups}
  out = {}
  for path, x in arrays.items():
    key = path[:-len(".value")] if path.endswith(".value") else path
    for ours, regroups in fused.items():
      if key == ours or key.endswith("." + ours):
        for layout, axis in regroups:
          x = layout.from_parts(x, axis, xp)
        break
    out[path] = x
  return out


def load_trainable(path: str, item: str = orbax_io.PARAMS_ITEM, spec: ModelSpec | None = None
                   ) -> dict[str, np.ndarray]:
  """`orbax_io.load_trainable`'s params in our layout: one written before the fused
  projections were grouped by head is regrouped (`spec`: its model's; default: read from its
  shapes)."""
  params, meta = orbax_io.load_trainable(path, item)
  if meta.get("fused_layout") != FUSED_LAYOUT:
    params = regroup_side_by_side(params, spec or spec_of_trainable(params, path))
  return params


def trainable_targets(model) -> tuple[dict, dict]:
  """(LoRA targets, adapter targets): dotted path → array or ShapeDtypeStruct."""
  lora = flat_params(nnx.state(model, nnx.LoRAParam))
  adapter = {f"cot_adapter.{k}": v for k, v in flat_params(nnx.state(model.cot_adapter)).items()}
  return lora, adapter


# ----------------------------------------------------------------------------- file I/O

class _TorchTensors(Mapping):
  """A torch.save dict as a lazy mapping of numpy arrays (bfloat16 via ml_dtypes)."""

  def __init__(self, path: str):
    import torch
    try:  # mmap needs torch's zip format; pre-1.6 files (torchvision's AlexNet) load whole
      sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 — any unpickling failure is a bad file
      raise ConversionError(f"{path}: cannot read as a torch.save state dict ({e})") from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
      raise ConversionError(f"{path}: expected a dict of name → tensor")
    self._sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}

  def __getitem__(self, key):
    return torch_to_numpy(self._sd[key])

  def shape(self, key):
    return tuple(self._sd[key].shape)

  def __contains__(self, key):  # without reading the tensor
    return key in self._sd

  def __iter__(self):
    return iter(self._sd)

  def __len__(self):
    return len(self._sd)


def torch_to_numpy(t) -> np.ndarray:
  import torch
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def numpy_to_torch(a: np.ndarray):
  import torch
  a = np.array(a, copy=not a.flags.writeable or not a.flags.c_contiguous)
  if a.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(a)


def read_tensors(path: str) -> Mapping[str, np.ndarray]:
  """`.pt` / `.bin` (torch.save dict) or `.safetensors` → lazy name → numpy mapping."""
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: file does not exist")
  if path.endswith(".safetensors"):
    return SafetensorsDir(path)
  return _TorchTensors(path)


def _export_dtype(dtype):
  if dtype is None:
    return None
  d = np.dtype(jnp.dtype(dtype))
  if d not in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)):
    raise ConversionError(f"dtype {d} cannot be represented in upstream CoTIR files "
                          "(choose bfloat16, float16 or float32)")
  return d


def write_tensors(tensors: Mapping[str, np.ndarray], path: str, fmt: str) -> None:
  """torch.save dict (`fmt="pt"`) or safetensors file with the same keys."""
  if fmt == "safetensors":
    save_file(tensors, path)
  else:
    import torch
    torch.save({k: numpy_to_torch(v) for k, v in tensors.items()}, path)


# ----------------------------------------------------------------------------- import / export

def import_cotir_params(family: str, lora_targets: Mapping, adapter_targets: Mapping,
                        lora_path: str | None, adapter_path: str | None) -> dict[str, np.ndarray]:
  """Reads the upstream files into our dotted paths (numpy, each target's dtype)."""
  spec = spec_of_trainable({**lora_targets, **adapter_targets}, "the model", family)
  out = {}
  for path, targets, rules, what in ((lora_path, lora_targets, lora_rules(spec), "LoRA"),
                                     (adapter_path, adapter_targets, adapter_rules(spec),
                                      "adapter")):
    if path is None:
      continue
    if not targets:
      raise ConversionError(f"{path}: the model has no {what} parameters to load into "
                            f"(is model.lora.enabled false?)")
    tensors = read_tensors(path)
    if what == "LoRA" and not any(k.endswith(".lora.b_bias") for k in targets):
      tensors = _without_zero_biases(tensors, path)
    out.update(import_params(rules, tensors, targets, source=path))
  return out


def _without_zero_biases(tensors: Mapping[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
  """The file's tensors less its `lora_B.bias` vectors, which a LoRA without bias
  (`model.lora.lora_bias=False`) can drop only when they are zero."""
  for k in tensors:
    if k.endswith(".lora_B.bias") and np.any(np.asarray(tensors[k], np.float32)):
      raise ConversionError(f"{path}: {k} is not zero, but the config's LoRA has no bias "
                            "(model.lora.lora_bias=False); set it True to load these weights")
  return {k: tensors[k] for k in tensors if not k.endswith(".lora_B.bias")}


def _assign(model: nnx.Module, values: Mapping[str, np.ndarray]) -> None:
  """Writes arrays into the model's variables in place, keeping dtype and sharding."""
  state = nnx.state(model)
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    key = ".".join(str(k) for k in path)
    if key not in values:
      continue
    old = var.get_value()
    new = jnp.asarray(values[key], dtype=old.dtype)
    sharding = getattr(old, "sharding", None)
    if sharding is not None and not isinstance(old, jax.ShapeDtypeStruct):
      new = jax.device_put(new, sharding)
    var.set_value(new)
  nnx.update(model, nnx.from_flat_state(flat))


def load_cotir_weights(model, lora_path: str | None = None, adapter_path: str | None = None):
  """Fills `model`'s LoRA and CoT-adapter variables from upstream `lora.pt` / `cot_adapter.pt`.

  Either path may be None (skip that part). Every variable of the loaded part must be in the
  file and every key of the file must map; errors name the file and the key (and both shapes
  when they disagree). Values are cast to each variable's dtype. Returns the model.
  """
  lora_t, adapter_t = trainable_targets(model)
  values = import_cotir_params(model.backbone.spec.family, lora_t, adapter_t, lora_path,
                               adapter_path)
  _assign(model, values)
  return model


def export_cotir_params(params: Mapping[str, object], dtype=jnp.bfloat16
                        ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Our trainable dotted paths → (lora dict, cot_adapter dict) with upstream names."""
  want = _export_dtype(dtype)
  params = {k: np.asarray(v) for k, v in params.items()}
  spec = spec_of_trainable(params, "the weights to export")
  lora = {k: v for k, v in params.items() if not k.startswith("cot_adapter.")}
  adapter = {k: v for k, v in params.items() if k.startswith("cot_adapter.")}
  cast = (lambda d: {k: v.astype(want) for k, v in d.items()}) if want is not None else (lambda d: d)
  lora = export_params(lora_rules(spec), lora)
  for k, b in list(lora.items()):  # upstream's LoRA always has B's bias: zeros keep its output
    if k.endswith(".lora_B.weight") and k.replace(".weight", ".bias") not in lora:
      lora[k.replace(".weight", ".bias")] = np.zeros(b.shape[:1], b.dtype)
  return cast(lora), cast(export_params(adapter_rules(spec), adapter))


def write_cotir_files(params: Mapping[str, object], out_dir: str, fmt: str = "pt",
                      dtype=jnp.bfloat16) -> dict[str, str]:
  """Writes `lora.<fmt>` (if the params hold LoRA) and `cot_adapter.<fmt>`; returns their paths."""
  if fmt not in FORMATS:
    raise ConversionError(f"format {fmt!r} is not supported; choose one of {FORMATS}")
  lora, adapter = export_cotir_params(params, dtype)
  os.makedirs(out_dir, exist_ok=True)
  written = {}
  for name, tensors in ((LORA_FILE, lora), (ADAPTER_FILE, adapter)):
    if not tensors:
      continue
    path = os.path.join(out_dir, f"{name}.{fmt}")
    tmp = f"{path}.tmp-{os.getpid()}"  # a failed write never leaves a truncated file
    write_tensors(tensors, tmp, fmt)
    os.replace(tmp, path)
    written[name] = path
  return written


def save_cotir_weights(model, out_dir: str, fmt: str = "pt", dtype=jnp.bfloat16) -> dict[str, str]:
  """Our LoRA + adapter → upstream `lora.pt` + `cot_adapter.pt` (or `.safetensors`, same keys).

  `dtype`: tensor dtype of the files (bfloat16 as upstream; None keeps the model's dtype).
  """
  lora_t, adapter_t = trainable_targets(model)
  return write_cotir_files({**lora_t, **adapter_t}, out_dir, fmt, dtype)


# ----------------------------------------------------------------------------- any source

def read_trainable(paths: Sequence[str], targets: Mapping[str, object], family: str, *,
                   item: str = orbax_io.PARAMS_ITEM, what: str = "--weights") -> dict[str, np.ndarray]:
  """Flat trainable params (our dotted paths) from any accepted source, checked against
  `targets` (the model's trainable state: dotted path → array or ShapeDtypeStruct): paths,
  shapes and every key of the files. `what` names the source in messages (a flag or a field).

  Sources: a training workdir (its newest checkpoint) or one of its step directories, a
  trainable-weights checkpoint of `cotir_to_orbax`, a directory holding upstream's `lora.pt`
  and `cot_adapter.pt` (or `.safetensors`), or those two files. `item="ema"` reads the
  moving average a training checkpoint keeps with `training.ema_decay` > 0 instead.
  """
  paths = list(paths)
  for p in paths:
    if not os.path.exists(p):
      raise ConversionError(f"{what} {p!r} does not exist")
  if len(paths) == 1 and os.path.isdir(paths[0]):
    upstream = [os.path.join(paths[0], f) for f in UPSTREAM_FILES
                if os.path.isfile(os.path.join(paths[0], f))]
    if not upstream:
      flat = load_trainable(paths[0], item, spec_of_trainable(targets, what, family))
      check_trainable(flat, targets, paths[0])
      return flat
    paths = upstream
  if item != orbax_io.PARAMS_ITEM:
    raise ConversionError(f"{what} {paths}: upstream's files hold no {item!r} weights; only a "
                          "training checkpoint of a run with training.ema_decay > 0 does")
  lora = adapter = None
  for p in paths:
    keys = list(read_tensors(p))
    if any(k.startswith("cot_adapter.") for k in keys):
      if adapter is not None:
        raise ConversionError(f"{what}: two CoT-adapter files, {adapter} and {p}")
      adapter = p
    elif lora is not None:
      raise ConversionError(f"{what}: two LoRA files, {lora} and {p}")
    else:
      lora = p
  lora_t = {k: v for k, v in targets.items() if not k.startswith("cot_adapter.")}
  adapter_t = {k: v for k, v in targets.items() if k.startswith("cot_adapter.")}
  if adapter is None:
    raise ConversionError(f"{what} {paths}: no cot_adapter file (keys cot_adapter.*) among them")
  if lora_t and lora is None:
    raise ConversionError(f"{what} {paths}: no lora file, but the config has LoRA "
                          "(model.lora.enabled)")
  return import_cotir_params(family, lora_t, adapter_t, lora, adapter)


# ----------------------------------------------------------------------------- Orbax

def _abstract_model(cfg):
  from cotir_jax import models
  return nnx.eval_shape(lambda: models.CoTIR(cfg.model, rngs=nnx.Rngs(0)))


def check_trainable(params: Mapping[str, object], targets: Mapping[str, object], source: str):
  """Same paths and shapes as the model's trainable state; errors name the key and shapes."""
  missing = sorted(set(targets) - set(params))
  unexpected = sorted(set(params) - set(targets))
  if missing and not any(".lora." in k for k in params) and all(".lora." in k for k in missing):
    raise ConversionError(f"{source}: holds no LoRA weights, but the config has LoRA "
                          "(model.lora.enabled)")
  if missing:
    raise ConversionError(f"{source}: missing key(s) {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
  if unexpected:
    raise ConversionError(f"{source}: unexpected key(s) {unexpected[:5]}"
                          + (" ..." if len(unexpected) > 5 else ""))
  for k, t in targets.items():
    if tuple(np.shape(params[k])) != tuple(t.shape):
      raise ConversionError(f"{source}: key {k!r} has shape {tuple(np.shape(params[k]))}, the "
                            f"config expects {tuple(t.shape)}")


def cotir_to_orbax(lora_path: str | None, adapter_path: str | None, cfg, out: str, *,
                   overwrite: bool = False) -> dict[str, np.ndarray]:
  """Upstream `lora.pt` + `cot_adapter.pt` → trainable-weights Orbax checkpoint (layout in
  `orbax_io`), in the dtypes of the config's trainable variables. Returns the flat params."""
  from cotir_jax import models
  model = _abstract_model(cfg)
  lora_t, adapter_t = trainable_targets(model)
  if lora_t and lora_path is None:
    raise ConversionError("the config has LoRA (model.lora.enabled) but no LoRA file was given")
  if adapter_path is None:
    raise ConversionError("a cot_adapter file is required")
  params = import_cotir_params(cfg.model.family, lora_t, adapter_t, lora_path, adapter_path)
  check_trainable(params, flat_params(nnx.state(model, models.TRAINABLE)), "cotir_to_orbax")
  meta = {"family": cfg.model.family, "fused_layout": FUSED_LAYOUT,
          "sources": {"lora": lora_path, "cot_adapter": adapter_path},
          "dtypes": sorted({str(v.dtype) for v in params.values()}),
          "config": json.loads(cfg.to_json_best_effort())}
  orbax_io.save_trainable(out, params, meta, overwrite=overwrite)
  return params


def orbax_to_cotir(checkpoint: str, out_dir: str, fmt: str = "pt", dtype=jnp.bfloat16,
                   cfg=None, *, ema: bool = False) -> dict[str, str]:
  """Trainable params of a training / `cotir_to_orbax` checkpoint → upstream files.

  With `cfg`, paths and shapes are checked against that config's model first. `ema`: export
  the moving average of the weights a training checkpoint keeps (`training.ema_decay` > 0).
  """
  from cotir_jax import models
  params = load_trainable(checkpoint, orbax_io.EMA_ITEM if ema else orbax_io.PARAMS_ITEM)
  if cfg is not None:
    check_trainable(params, flat_params(nnx.state(_abstract_model(cfg), models.TRAINABLE)),
                    checkpoint)
  return write_cotir_files(params, out_dir, fmt, dtype)
