"""Frozen base weights: a diffusers repository → one Orbax checkpoint (converted once, streaming).

Why: maxdiffusion-style in-process conversion re-reads PyTorch weights on every start; we
convert once. Tensors are read one at a time with plain file reads (no mmap, whose touched
pages would count as resident memory, and no torch model), transformed by the family's rule
table into preallocated arrays, and written by Orbax without extra copies: peak host memory
is one copy of the converted weights plus one tensor of working space.

Accepted source layouts (diffusers `save_pretrained` / Hugging Face snapshots):

- FLUX.2-klein: `model_index.json`, `transformer/` (Flux2Transformer2DModel), `vae/`
  (AutoencoderKLFlux2), `text_encoder/` (Qwen3), `tokenizer/`;
- FLUX.1-Kontext: `transformer/` (FluxTransformer2DModel), `vae/` (AutoencoderKL),
  `text_encoder/` (CLIP text), `text_encoder_2/` (T5 encoder), `tokenizer/`, `tokenizer_2/`;
- a bare diffusers transformer directory (config.json + safetensors): transformer only;
- a BFL single-file transformer (`flux-2-klein-4b.safetensors`, `flux-2-klein-9b.safetensors`,
  `flux1-kontext-dev.safetensors`; `convert.bfl`) in place of `transformer/`, with the other
  modules from one of the repositories above (the Hugging Face repos ship both).

Output layout (`<out>/`, written in a temporary sibling and renamed at the end):

    weights/          one Orbax PyTree checkpoint: {"transformer": {...}, "vae": {...},
                      "text_encoder": {...}[, "clip": {...}]}, each a nested dict (string
                      keys) of our module's parameters: the dotted paths of
                      `nnx.state(module)` split at the dots; stacked layers keep their axis
    manifest.json     {"format", "source", "layout", "family", "dtype", "modules": {name:
                      {"kind", "subfolder", "class", "config" (the diffusers / transformers
                      config.json needed to rebuild it), "parameters", "bytes", "tokenizer",
                      ["hidden_layers"]}}, ["model_index"]}
    tokenizer/ [tokenizer_2/]   copied verbatim

Module names: FLUX.2 "text_encoder" = Qwen3 (tokenizer/); FLUX.1 "text_encoder" = T5
(diffusers' text_encoder_2/, tokenizer_2/) and "clip" = CLIP (text_encoder/, tokenizer/).
`load_base(path)` rebuilds the modules; `restore_base_params` gives the raw trees, optionally
straight into sharded targets (what training uses).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cotir_jax.convert import bfl, orbax_io
from cotir_jax.convert.core import ConversionError, flat_params, import_params, materialize
from cotir_jax.convert.flux import CLASSES as TRANSFORMER_CLASSES
from cotir_jax.convert.flux import spec_from_diffusers, transformer_rules
from cotir_jax.convert.safetensors_io import DTYPES, SafetensorsDir, SafetensorsError, _read_header
from cotir_jax.models.flux import FluxTransformer

# /2: the transformer's fused projections grouped by head (`models.layers.FusedLayout`); /1
# had their parts side by side, which this version would misread.
BASE_FORMAT = "cotir_jax.base/2"
SIDE_BY_SIDE_FORMAT = "cotir_jax.base/1"
WEIGHTS = "weights"
MANIFEST = "manifest.json"
QWEN3_DEFAULT_LAYERS = (9, 18, 27)  # the hidden states FLUX.2-klein concatenates
ALLOWED_DTYPES = ("bfloat16", "float32")

# family → module name → (kind, diffusers subfolder, tokenizer subfolder)
LAYOUTS = {
    "flux2": {"transformer": ("transformer", "transformer", None),
              "vae": ("vae", "vae", None),
              "text_encoder": ("text", "text_encoder", "tokenizer")},
    "flux1": {"transformer": ("transformer", "transformer", None),
              "vae": ("vae", "vae", None),
              "text_encoder": ("text", "text_encoder_2", "tokenizer_2"),
              "clip": ("text", "text_encoder", "tokenizer")},
}
LAYOUT_NAMES = {"flux2": "flux2-klein", "flux1": "flux1-kontext"}


# ----------------------------------------------------------------------------- reading

class StreamingTensors(Mapping):
  """Tensors of a model directory read one by one with plain reads into fresh buffers.

  Unlike a memory map, nothing stays resident after a tensor is converted and dropped.
  `on_read(nbytes)` is called after each read (progress).
  """

  def __init__(self, path: str, on_read=None):
    try:
      index = SafetensorsDir(path)  # resolves the index / shards; reads headers only
    except SafetensorsError as e:
      raise ConversionError(str(e)) from None
    self.path = path
    self.on_read = on_read
    self._info = {}
    for f in sorted({index.file_of(k) for k in index}):
      header, start = _read_header(f)
      size = os.path.getsize(f)
      for key, info in header.items():
        self._info[key] = (f, start, size, info)
    self._files = {}

  def info(self, key):
    return self._info[key][3]

  def shape(self, key) -> tuple[int, ...]:
    return tuple(self._info[key][3]["shape"])

  def dtype(self, key) -> np.dtype:
    return np.dtype(DTYPES[self._info[key][3]["dtype"]])

  def __getitem__(self, key: str) -> np.ndarray:
    f, start, size, info = self._info[key]
    if info["dtype"] not in DTYPES:
      raise ConversionError(f"{f}: tensor {key!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    if start + end > size:
      raise ConversionError(f"{f}: tensor {key!r} runs past the end of the file (truncated?)")
    buf = np.empty(end - begin, np.uint8)
    fh = self._files.get(f)
    if fh is None:
      fh = self._files[f] = open(f, "rb", buffering=0)
    fh.seek(start + begin)
    got = fh.readinto(memoryview(buf))
    if got != end - begin:
      raise ConversionError(f"{f}: short read of tensor {key!r} (truncated?)")
    if self.on_read is not None:
      self.on_read(end - begin)
    return buf.view(DTYPES[info["dtype"]]).reshape(info["shape"])

  def __contains__(self, key) -> bool:  # Mapping's default would read the tensor
    return key in self._info

  def __iter__(self):
    return iter(self._info)

  def __len__(self):
    return len(self._info)

  def close(self):
    for fh in self._files.values():
      fh.close()
    self._files = {}


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise ConversionError(f"{path}: missing") from None
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: malformed JSON ({e})") from None


# ----------------------------------------------------------------------------- modules

def _compute_dtype(param_dtype):
  return jnp.float32 if jnp.dtype(param_dtype) == jnp.float32 else jnp.bfloat16


def default_hidden_layers(text_cfg: dict, transformer_cfg: dict | None) -> tuple[int, ...]:
  """Qwen3 layers whose hidden states feed the transformer: upstream's (9, 18, 27) when the
  encoder is that deep; else k layers spaced as upstream's (n·j/(k+1), which gives 9, 18, 27
  for 36 layers), k = joint_attention_dim / hidden_size; the last k layers if n is too small."""
  n = text_cfg["num_hidden_layers"]
  if n >= max(QWEN3_DEFAULT_LAYERS):
    return QWEN3_DEFAULT_LAYERS
  k = len(QWEN3_DEFAULT_LAYERS)
  if transformer_cfg and transformer_cfg.get("joint_attention_dim", 0) % text_cfg["hidden_size"] == 0:
    k = transformer_cfg["joint_attention_dim"] // text_cfg["hidden_size"]
  if k > n:
    raise ConversionError(f"Qwen3 encoder has {n} layers, fewer than the {k} hidden states the "
                          "transformer needs; pass hidden_layers explicitly")
  layers = tuple(int(round(n * (j + 1) / (k + 1))) for j in range(k))
  if len(set(layers)) < k or layers[0] < 1:
    layers = tuple(range(n - k + 1, n + 1))
  return layers


def _module_builder(kind: str, config: dict, *, source: str, param_dtype, compute_dtype=None,
                    hidden_layers=None, attention="xla", scan: bool = True):
  """(build() → module, our config) for one module kind from its reference config.json;
  `attention`: a text encoder's kernel (`models.attention.AttentionSpec` or name); `scan=False`:
  a text encoder runs its layers unrolled."""
  compute = compute_dtype or _compute_dtype(param_dtype)
  if kind == "transformer":
    spec = spec_from_diffusers(config, source=source, dtype=compute, param_dtype=param_dtype)
    return (lambda: FluxTransformer(spec, rngs=nnx.Rngs(0))), spec
  if kind == "vae":
    from cotir_jax.convert.vae import vae_config_from_diffusers
    from cotir_jax.models.vae import build_vae
    cfg = vae_config_from_diffusers(config, source=source)
    return (lambda: build_vae(cfg, dtype=compute, param_dtype=param_dtype,
                              rngs=nnx.Rngs(0))), cfg
  if kind == "text":
    from cotir_jax.convert.text import text_config_from_hf
    from cotir_jax.models.text import build_text_encoder
    cfg = text_config_from_hf(config, source=source,
                              **({"hidden_layers": tuple(hidden_layers)} if hidden_layers else {}))
    return (lambda: build_text_encoder(cfg, dtype=compute, param_dtype=param_dtype,
                                       rngs=nnx.Rngs(0), implementation=attention,
                                       scan=scan)), cfg
  raise ValueError(f"unknown module kind {kind!r}")


def _rules(kind: str, our_cfg, keys, config: dict, from_bfl: bool = False):
  """(rule table, ignore patterns) of one module kind (a transformer in BFL or diffusers names)."""
  if kind == "transformer" and from_bfl:
    return bfl.transformer_rules(our_cfg, key_prefix=bfl.key_prefix(keys)), ()
  if kind == "transformer":
    return transformer_rules(our_cfg), ()
  if kind == "vae":
    from cotir_jax.convert.vae import IGNORE, vae_rules
    return vae_rules(our_cfg), IGNORE
  from cotir_jax.convert.text import rules_for
  return rules_for(our_cfg, list(keys))


# ----------------------------------------------------------------------------- layout

def detect_layout(src: str | None, only=None, *, transformer: str | None = None
                  ) -> tuple[str, str, dict[str, tuple[str, str, str | None]]]:
  """(family, layout name, {module: (kind, subfolder, tokenizer)}) of a source directory.

  With `transformer` (a BFL single-file checkpoint, `convert.bfl`) the transformer comes from
  that file (its entry's subfolder is the file's absolute path) and `src` supplies the other
  modules; `src` may then be None when only the transformer is wanted.
  """
  if transformer is not None:
    family = bfl.family_of(list(bfl.open_file(transformer)), transformer)
    if src is None:
      wanted = set(only or LAYOUTS[family])
      if wanted != {"transformer"}:
        raise ConversionError(
            f"{transformer}: a BFL file holds only the transformer; "
            f"{sorted(wanted - {'transformer'})} must come from a diffusers "
            f"{LAYOUT_NAMES[family]} repository (--src; its transformer/ is not needed), or "
            "convert only the transformer (--only transformer)")
      return family, "bfl-transformer-only", {
          "transformer": ("transformer", os.path.abspath(transformer), None)}
  if not os.path.isdir(src):
    raise ConversionError(f"{src}: source directory does not exist")
  if transformer is not None:
    return _check_modules(src, family, f"BFL {os.path.basename(transformer)}", only,
                          bfl_file=os.path.abspath(transformer))
  cfg_path = os.path.join(src, "config.json")
  if os.path.isfile(cfg_path) and not os.path.isdir(os.path.join(src, "transformer")):
    cls = _read_json(cfg_path).get("_class_name")
    if cls in TRANSFORMER_CLASSES:
      if only and set(only) != {"transformer"}:
        raise ConversionError(f"{src}: a bare transformer directory has no {sorted(set(only) - {'transformer'})}")
      return TRANSFORMER_CLASSES[cls], "transformer-only", {"transformer": ("transformer", "", None)}
  t_cfg = os.path.join(src, "transformer", "config.json")
  if not os.path.isfile(t_cfg):
    raise ConversionError(
        f"{src}: unknown layout: missing transformer/config.json. Expected a FLUX.2-klein repo "
        "(model_index.json, transformer/, vae/, text_encoder/ (Qwen3), tokenizer/), a "
        "FLUX.1-Kontext repo (transformer/, vae/, text_encoder/ (CLIP), text_encoder_2/ (T5), "
        "tokenizer/, tokenizer_2/) or a bare diffusers transformer directory")
  cls = _read_json(t_cfg).get("_class_name")
  if cls not in TRANSFORMER_CLASSES:
    raise ConversionError(f"{t_cfg}: unknown transformer class {cls!r}; expected one of "
                          f"{sorted(TRANSFORMER_CLASSES)}")
  return _check_modules(src, TRANSFORMER_CLASSES[cls], cls, only)


def _check_modules(src: str, family: str, cls: str, only, bfl_file: str | None = None):
  """The modules of a repository of `family`, every one checked present and of the right type."""
  modules = dict(LAYOUTS[family])
  if only:
    unknown = sorted(set(only) - set(modules))
    if unknown:
      raise ConversionError(f"--only {unknown}: a {LAYOUT_NAMES[family]} repo has modules "
                            f"{sorted(modules)}")
    modules = {k: v for k, v in modules.items() if k in only}
  missing = []
  for name, (kind, sub, tok) in modules.items():
    if name == "transformer" and bfl_file:
      continue
    if not os.path.isfile(os.path.join(src, sub, "config.json")):
      missing.append(f"{sub}/config.json")
    if tok and not os.path.isdir(os.path.join(src, tok)):
      missing.append(f"{tok}/")
  if (family == "flux2" and not only and not bfl_file
      and not os.path.isfile(os.path.join(src, "model_index.json"))):
    missing.append("model_index.json")
  if missing:
    raise ConversionError(f"{src}: {LAYOUT_NAMES[family]} layout (transformer class {cls}) is "
                          f"missing {missing}")
  expected_text = {"flux2": {"text_encoder": "qwen3"},
                   "flux1": {"text_encoder": "t5", "clip": "clip_text_model"}}[family]
  for name, want in expected_text.items():
    if name in modules:
      sub = modules[name][1]
      got = _read_json(os.path.join(src, sub, "config.json")).get("model_type")
      if got != want:
        raise ConversionError(f"{src}/{sub}/config.json: model_type {got!r}, but a "
                              f"{LAYOUT_NAMES[family]} repo needs {want!r} there")
  if bfl_file and "transformer" in modules:
    modules["transformer"] = ("transformer", bfl_file, None)
    return family, f"{LAYOUT_NAMES[family]}+bfl", modules
  return family, LAYOUT_NAMES[family], modules


# ----------------------------------------------------------------------------- convert

class _Progress:
  """A tqdm bar per module when stderr is a terminal, else one line per module."""

  def __init__(self, name: str, total_tensors: int, stream=None):
    self.name, self.total = name, total_tensors
    self.count, self.bytes, self.start = 0, 0, time.time()
    self.stream = stream or sys.stderr
    self.bar = None
    if self.stream.isatty():
      try:
        from tqdm import tqdm
        self.bar = tqdm(total=total_tensors, desc=name, unit="tensor", file=self.stream)
      except ImportError:
        pass

  def __call__(self, nbytes: int):
    self.count += 1
    self.bytes += nbytes
    if self.bar is not None:
      self.bar.update(1)

  def close(self, params: int):
    if self.bar is not None:
      self.bar.close()
    dt = max(time.time() - self.start, 1e-9)
    print(f"[convert] {self.name}: {self.count} tensors, {self.bytes / 1e9:.3f} GB read, "
          f"{params:,} parameters in {dt:.1f} s ({self.count / dt:.1f} tensors/s, "
          f"{self.bytes / 1e6 / dt:.0f} MB/s)", file=self.stream, flush=True)


def _param_dtype(dtype):
  name = jnp.dtype(dtype).name if dtype is not None else None
  if name not in ALLOWED_DTYPES:
    raise ConversionError(f"dtype {dtype!r} cannot be used for base weights; choose one of "
                          f"{ALLOWED_DTYPES}")
  return jnp.dtype(name)


def convert_module(path: str, kind: str, *, dtype, name: str | None = None, hidden_layers=None,
                   transformer_config: dict | None = None, verbose: bool = True,
                   bfl_config: dict | None = None):
  """One diffusers / transformers directory → (flat numpy params, our config, entry for the
  manifest). Streams tensor by tensor into preallocated arrays. With `bfl_config` (from
  `bfl.read`), `path` is a BFL single-file transformer that this config describes."""
  cfg_path = path if bfl_config is not None else os.path.join(path, "config.json")
  config = bfl_config if bfl_config is not None else _read_json(cfg_path)
  param_dtype = _param_dtype(dtype)
  extra = {}
  if kind == "text" and config.get("model_type") == "qwen3":
    hidden_layers = tuple(hidden_layers or default_hidden_layers(config, transformer_config))
    extra["hidden_layers"] = list(hidden_layers)
  build, our_cfg = _module_builder(kind, config, source=cfg_path, param_dtype=param_dtype,
                                   hidden_layers=hidden_layers)
  progress = _Progress(name or kind, 0) if verbose else None
  tensors = StreamingTensors(path, on_read=progress)
  if progress is not None and progress.bar is not None:
    progress.bar.total = len(tensors)
  try:
    targets = flat_params(nnx.eval_shape(build))
    rules, ignore = _rules(kind, our_cfg, list(tensors), config, from_bfl=bfl_config is not None)
    params = import_params(rules, tensors, targets, source=path, ignore=ignore)
  finally:
    tensors.close()
  n = sum(int(np.prod(v.shape)) for v in params.values())
  if progress is not None:
    progress.close(n)
  entry = {"kind": kind, "class": config.get("_class_name") or config.get("model_type"),
           "config": config, "parameters": n,
           "bytes": int(sum(v.nbytes for v in params.values())), **extra}
  return params, our_cfg, entry


def diffusers_to_orbax(src: str | None, out: str, dtype="bfloat16", *, transformer: str | None = None,
                       only=None, hidden_layers=None, overwrite: bool = False,
                       verbose: bool = True) -> dict:
  """Converts a FLUX.2-klein / FLUX.1-Kontext diffusers repo (or a bare transformer dir) into
  the base checkpoint layout of this module's docstring; returns the manifest.

  `transformer`: a BFL single-file transformer (`flux-2-klein-4b.safetensors`, ...) used instead
  of the repo's transformer/; `src` then supplies the VAE, text encoders and tokenizers (None:
  the transformer alone), and its transformer/config.json, when present, describes the file
  (else the config is derived from the file, `bfl.transformer_config`).
  """
  param_dtype = _param_dtype(dtype)
  family, layout, modules = detect_layout(src, only, transformer=transformer)
  t_cfg = None
  if transformer is not None:
    repo_cfg = os.path.join(src or "", "transformer", "config.json")
    t_cfg = bfl.read(transformer, _read_json(repo_cfg) if src and os.path.isfile(repo_cfg)
                     else None)[1]
  elif "transformer" in modules:
    t_cfg = _read_json(os.path.join(src, modules["transformer"][1], "config.json"))
  manifest = {"format": BASE_FORMAT, "source": os.path.abspath(src or transformer),
              "layout": layout, "family": family, "dtype": param_dtype.name, "modules": {}}
  if transformer is not None:
    manifest["transformer_source"] = os.path.abspath(transformer)
  if src and os.path.isfile(os.path.join(src, "model_index.json")):
    manifest["model_index"] = _read_json(os.path.join(src, "model_index.json"))
  tree = {}
  with orbax_io.atomic_dir(out, overwrite=overwrite) as tmp:
    for name, (kind, sub, tok) in modules.items():
      from_bfl = transformer is not None and name == "transformer"
      params, _, entry = convert_module(sub if from_bfl else os.path.join(src, sub), kind,
                                        dtype=param_dtype, name=name, hidden_layers=hidden_layers,
                                        transformer_config=t_cfg, verbose=verbose,
                                        bfl_config=t_cfg if from_bfl else None)
      entry.update(subfolder=sub or ".", tokenizer=tok)
      manifest["modules"][name] = entry
      tree[name] = orbax_io.nest(params)
      del params
    t0 = time.time()
    orbax_io.save_tree(os.path.join(tmp, WEIGHTS), tree)
    if verbose:
      total = sum(e["bytes"] for e in manifest["modules"].values())
      print(f"[convert] wrote {total / 1e9:.3f} GB to Orbax in {time.time() - t0:.1f} s",
            file=sys.stderr, flush=True)
    del tree
    for name, (kind, sub, tok) in modules.items():
      if tok:
        shutil.copytree(os.path.join(src, tok), os.path.join(tmp, tok))
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2)
  return manifest


# ----------------------------------------------------------------------------- load

def read_manifest(path: str) -> dict:
  m = os.path.join(path, MANIFEST)
  if not os.path.isfile(m):
    raise ConversionError(f"{path}: not a converted base checkpoint (no {MANIFEST})")
  manifest = _read_json(m)
  fmt = manifest.get("format")
  if fmt == SIDE_BY_SIDE_FORMAT and "transformer" in manifest.get("modules", {}):
    src, bfl_file = manifest.get("source"), manifest.get("transformer_source")
    raise ConversionError(
        f"{m}: converted by an older cotir_jax ({fmt}), whose fused projections this version "
        "would misread; convert the base again: python convert/diffusers_to_orbax.py"
        + ("" if bfl_file and src == bfl_file else f" --src {src}")
        + (f" --transformer {bfl_file}" if bfl_file else "")
        + f" --only {' '.join(manifest['modules'])} --dtype {manifest.get('dtype')} --out <dir>")
  if fmt not in (BASE_FORMAT, SIDE_BY_SIDE_FORMAT):
    raise ConversionError(f"{m}: format {fmt!r}, expected {BASE_FORMAT!r}")
  return manifest


def module_builder(path: str, name: str, *, dtype=None, compute_dtype=None, attention="xla",
                   scan: bool = True):
  """(build() → freshly initialised module, our config) of one module of a base checkpoint;
  `attention`: a text encoder's kernel (`models.attention.AttentionSpec` or name)."""
  manifest = read_manifest(path)
  if name not in manifest["modules"]:
    raise ConversionError(f"{path}: base checkpoint has no module {name!r} "
                          f"(it has {sorted(manifest['modules'])})")
  e = manifest["modules"][name]
  param_dtype = _param_dtype(dtype or manifest["dtype"])
  return _module_builder(e["kind"], e["config"], source=f"{path}/{MANIFEST}:{name}",
                         param_dtype=param_dtype, compute_dtype=compute_dtype,
                         hidden_layers=e.get("hidden_layers"), attention=attention, scan=scan)


def restore_base_params(path: str, modules=None, targets: Mapping | None = None) -> dict:
  """Nested parameter trees {module: {...}} of a base checkpoint (numpy, or sharded jax arrays
  for the modules given in `targets` — nested dicts of ShapeDtypeStructs with shardings)."""
  manifest = read_manifest(path)
  names = tuple(modules or manifest["modules"])
  return orbax_io.restore_tree(os.path.join(path, WEIGHTS), keys=names, targets=targets)


def load_base(path: str, modules=None, *, dtype=None, compute_dtype=None) -> dict[str, nnx.Module]:
  """Rebuilds the modules of a base checkpoint with their weights: {"transformer":
  FluxTransformer, "vae": autoencoder, "text_encoder": Qwen3 / T5 encoder[, "clip": CLIP]}.

  `dtype`: parameter dtype (default: as converted); `compute_dtype`: default float32 for
  float32 parameters, else bfloat16.
  """
  manifest = read_manifest(path)
  names = tuple(modules or manifest["modules"])
  out = {}
  for name in names:  # one module at a time: host memory holds one module's numpy copy
    build, _ = module_builder(path, name, dtype=dtype, compute_dtype=compute_dtype)
    targets = flat_params(nnx.eval_shape(build))
    flat = orbax_io.flatten(restore_base_params(path, (name,))[name])
    missing = sorted(set(targets) - set(flat))
    extra = sorted(set(flat) - set(targets))
    if missing or extra:
      raise ConversionError(f"{path}: module {name!r} does not match its config: missing "
                            f"{missing[:5]}, unexpected {extra[:5]}")
    for k, t in targets.items():
      if tuple(flat[k].shape) != tuple(t.shape):
        raise ConversionError(f"{path}: {name}.{k} has shape {tuple(flat[k].shape)}, its config "
                              f"expects {tuple(t.shape)}")
      flat[k] = np.asarray(flat[k]).astype(t.dtype, copy=False)
    out[name] = materialize(build, flat)
    del flat
  return out


def tokenizer_path(path: str, name: str = "text_encoder") -> str | None:
  """The copied tokenizer directory of a text module of a base checkpoint."""
  tok = read_manifest(path)["modules"].get(name, {}).get("tokenizer")
  return os.path.join(path, tok) if tok else None
