#!/usr/bin/env python
"""Pretrain the tiny frozen base that `configs/tiny.py` and `configs/tiny_kontext.py` load.

The full-size recipes download FLUX.2-klein / FLUX.1-Kontext-dev and convert them once with
`convert/diffusers_to_orbax.py`; the tiny configs need a base of the same kinds that runs on a
laptop and already knows something, so that a few minutes of CoTIR fine-tuning visibly restore.
This script makes it, deterministically from `--seed`, and takes the same path to the
checkpoint as the real models: it writes a diffusers / transformers repository of the trained
modules (`save_pretrained`, loaded back strictly by diffusers) and converts it with
`convert.diffusers_to_orbax`. Per family:

1. autoencoder: reconstruction (mean squared error) of crops of scikit-image's photographs at
   several scales (Lanczos and aliased bilinear downsampling, colour-channel permutations). Both
   families share one trained encoder / decoder (their tiny configs give them the same
   channels); FLUX.2's quant convs are identities and its batch-norm running statistics, like
   FLUX.1's scaling and shift factors, are measured on the latents so the transformer sees unit
   variance.
2. text encoders: random (seeded, as the random-weight tiny configs make them), frozen.
3. transformer: an instruction-following image *editor* pretrained with the training
   objective's flow matching (the functions of `cotir_jax.train.objective`, with the tiny
   configs' `training.timestep_shift`) on the target latents given the reference image's latents
   and a prompt: a third of the targets are the reference itself under a random sentence, the
   rest one light global edit of EDITS (brighter / darker, more / less contrast or colour,
   warmer / cooler, softer / sharper) under one of its instructions. Such an editor reads its
   prompt and keeps the reference's content, as FLUX.2-klein and Kontext do; restoration is
   what the CoTIR fine-tune adds.

The photographs held out for validation (`scripts/make_sample_dataset.py`: HELD_OUT) are never
used. Needs the test extra (`pip install -e ".[test]"`: scikit-image, torch, diffusers).

  python scripts/pretrain_tiny_base.py          # → assets/tiny_base/{flux2,flux1}
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image, ImageFilter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's cotir_jax, also without `pip install -e .`

from cotir_jax import config as config_lib  # noqa: E402
from cotir_jax import latents  # noqa: E402
from cotir_jax import quality  # noqa: E402
from cotir_jax import sample as sampler  # noqa: E402
from cotir_jax.convert import diffusers_to_orbax  # noqa: E402
from cotir_jax.convert.core import export_params, flat_params  # noqa: E402
from cotir_jax.convert.flux import transformer_rules  # noqa: E402
from cotir_jax.convert.text import clip_rules, qwen3_rules, t5_rules  # noqa: E402
from cotir_jax.convert.vae import vae_rules  # noqa: E402
from cotir_jax.data.decode import resize_bilinear  # noqa: E402
from cotir_jax.models.flux import FluxTransformer  # noqa: E402
from cotir_jax.models.spec import ModelSpec  # noqa: E402
from cotir_jax.models.text import build_text_encoder, text_config  # noqa: E402
from cotir_jax.models.vae import build_vae  # noqa: E402
from cotir_jax.modules import build_tokenizers  # noqa: E402
from cotir_jax.train import objective as obj  # noqa: E402
from cotir_jax.train.step import guidance_for  # noqa: E402

CONFIGS = {"flux2": "configs/tiny.py", "flux1": "configs/tiny_kontext.py"}
OUT = "assets/tiny_base"
# scikit-image photographs: colour ones, and grayscale textures (as RGB) for the autoencoder
COLOUR = ("coffee", "rocket", "immunohistochemistry", "retina", "hubble_deep_field",
          "stereo_motorcycle")
GRAY = ("camera", "brick", "grass", "gravel", "coins", "moon", "page", "text", "cell", "clock")
SCALES = (1, 1.5, 2, 3, 4, 6, 8)  # downsampling factors of the photographs
WORDS = ("a the this picture photo image scene colour light dark bright soft sharp keep make "
         "edit change show turn copy same please now with of in on cat sky room table cup "
         "person tree water road car house red blue green warm cold little more less").split()


def _held_out() -> tuple[str, ...]:
  spec = importlib.util.spec_from_file_location(
      "make_sample_dataset", os.path.join(REPO, "scripts", "make_sample_dataset.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return tuple(module.HELD_OUT)


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def log(msg: str) -> None:
  print(f"[pretrain {time.strftime('%H:%M:%S')} cpu {_cpu_seconds():.0f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- photographs

def load_photo(name: str) -> np.ndarray:
  from skimage import data
  x = getattr(data, name)()
  if isinstance(x, tuple):  # stereo_motorcycle: (left, right, disparity)
    x = x[0]
  if x.ndim == 2:
    x = np.stack([x] * 3, -1)
  return np.asarray(x[..., :3], np.uint8)


def pyramid(names, min_side: int = 64) -> list[np.ndarray]:
  """Each photograph at every downsampling factor of SCALES: Lanczos, and for factors ≥ 2 also
  the data pipeline's aliased bilinear resize (training images are resized that way)."""
  out = []
  for name in names:
    photo = load_photo(name)
    h, w = photo.shape[:2]
    for s in SCALES:
      hh, ww = int(h / s), int(w / s)
      if min(hh, ww) < min_side:
        continue
      out.append(np.asarray(Image.fromarray(photo).resize((ww, hh), Image.LANCZOS)))
      if s >= 2:
        side = min(hh, ww)  # resize_bilinear makes squares: a centred square of the photograph
        y, x = (h - int(side * s)) // 2, (w - int(side * s)) // 2
        square = resize_bilinear(photo[y:y + int(side * s), x:x + int(side * s)], side)
        out.append(sampler.to_uint8(square))
  return out


def crops(pool, rng: np.random.Generator, n: int, size: int) -> np.ndarray:
  """n random size×size crops in [-1, 1], randomly mirrored and colour-channel permuted."""
  out = np.empty((n, size, size, 3), np.float32)
  for i in range(n):
    im = pool[rng.integers(len(pool))]
    while min(im.shape[:2]) < size:
      im = pool[rng.integers(len(pool))]
    y, x = rng.integers(0, im.shape[0] - size + 1), rng.integers(0, im.shape[1] - size + 1)
    c = im[y:y + size, x:x + size]
    if rng.random() < 0.5:
      c = c[:, ::-1]
    c = c[..., rng.permutation(3)]
    out[i] = c.astype(np.float32) / 127.5 - 1.0
  return out


def _psnr(x, ref) -> float:
  return float(np.mean(quality.psnr(quality.quantize(jnp.asarray(x)),
                                    quality.quantize(jnp.asarray(ref)))))


# ----------------------------------------------------------------------------- training

def _adam(lr: float, steps: int):
  return optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps,
                                                       lr / 20))


def train_autoencoder(vae, pool, val, *, steps: int, batch: int, size: int, lr: float, seed: int):
  """Reconstruction MSE through the public encode / decode (the latent normalisation cancels);
  a small latent penalty keeps the unnormalised latents bounded."""
  graph, params, rest = nnx.split(vae, nnx.Param, ...)
  tx = _adam(lr, steps)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x):
    def loss(p):
      m = nnx.merge(graph, p, rest)
      z = m.encode(x)
      return jnp.mean(jnp.square(m.decode(z) - x)) + 1e-4 * jnp.mean(jnp.square(z))
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, value

  reconstruct = jax.jit(lambda p, x: (lambda m: m.decode(m.encode(x)))(nnx.merge(graph, p, rest)))
  rng = np.random.default_rng(seed)
  for i in range(1, steps + 1):
    params, opt, value = step(params, opt, crops(pool, rng, batch, size))
    if i % max(1, steps // 8) == 0 or i == steps:
      log(f"autoencoder step {i}/{steps}: loss {float(value):.5f}, held-out PSNR "
          f"{_psnr(reconstruct(params, val), val):.2f} dB")
  nnx.update(vae, params)
  return vae


def raw_latents(vae, images) -> np.ndarray:
  """Unnormalised latent means [B, h, w, C] (what FLUX.2's batch norm and FLUX.1's scale see)."""
  graph, state = nnx.split(vae)
  fn = jax.jit(lambda s, x: nnx.merge(graph, s)._posterior_mean(x))
  return np.concatenate([np.asarray(fn(state, images[i:i + 64]))
                         for i in range(0, len(images), 64)])


# ----------------------------------------------------------------------------- text

def random_prompts(rng: np.random.Generator, n: int) -> list[str]:
  return [" ".join(rng.choice(WORDS, rng.integers(2, 12))).capitalize() + "."
          for _ in range(n)]


def _gray(x):
  return np.mean(x, axis=-1, keepdims=True)


def _blur(x, radius):
  """Gaussian blur of each image in [0, 1] (PIL, 8-bit); `radius`: one, or one per image."""
  radii = np.broadcast_to(np.asarray(radius, np.float32).reshape(-1), (len(x),))
  return np.stack([np.asarray(Image.fromarray(sampler.to_uint8(im * 2 - 1)).filter(
      ImageFilter.GaussianBlur(float(r))), np.float32) / 255.0 for im, r in zip(x, radii)])


# Light global edits the editor learns to follow from an instruction, in both directions (what
# an instruction editor such as FLUX.2-klein or Kontext does with a photo). `a` ∈ [0.15, 0.4]:
# a visible change, far from a degradation. Functions of images in [0, 1], [B, H, W, 3].
EDITS = {
    "brighter": (("Make it brighter.", "Brighten the picture.", "Increase the exposure.",
                  "Make the photo lighter."), lambda x, a: x ** (1 - a)),
    "darker": (("Make it darker.", "Darken the picture.", "Lower the exposure.",
                "Make the photo dimmer."), lambda x, a: x ** (1 + a)),
    "more_contrast": (("Increase the contrast.", "More contrast please.", "Make it punchier."),
                      lambda x, a: x.mean((1, 2), keepdims=True) * -a + x * (1 + a)),
    "less_contrast": (("Lower the contrast.", "Less contrast please.", "Make it look flat."),
                      lambda x, a: x.mean((1, 2), keepdims=True) * a + x * (1 - a)),
    "more_colour": (("Make the colours stronger.", "Increase the saturation.", "More colour."),
                    lambda x, a: _gray(x) * -a + x * (1 + a)),
    "less_colour": (("Make the colours weaker.", "Desaturate the picture.", "Less colour."),
                    lambda x, a: _gray(x) * a + x * (1 - a)),
    "warmer": (("Make it warmer.", "Give it a warm tone.", "Warm up the colours."),
               lambda x, a: x * np.concatenate([1 + a / 2, np.ones_like(a), 1 - a / 2], -1)),
    "cooler": (("Make it cooler.", "Give it a cold tone.", "Cool down the colours."),
               lambda x, a: x * np.concatenate([1 - a / 2, np.ones_like(a), 1 + a / 2], -1)),
    "softer": (("Soften the picture.", "Make it a little soft.", "Smooth the details."),
               lambda x, a: _blur(x, 2.5 * a * x.shape[1] / 64)),
    "sharper": (("Sharpen the picture.", "Make the details crisper.", "Add some sharpness."),
                lambda x, a: x + 3 * a * (x - _blur(x, x.shape[1] / 64))),
}
COPY_SHARE = 1 / 3  # of the editor's samples: the target is the reference, the prompt random


def edit_pairs(images, rng: np.random.Generator, n_random: int):
  """(targets in [-1, 1], prompt index per image) for images in [-1, 1]: a third are copies
  under one of the first `n_random` prompts of `prompt_list`, the rest one edit of EDITS each
  under one of its instructions (the prompts after the random ones, in EDITS order)."""
  names = list(EDITS)
  offsets = np.cumsum([n_random] + [len(EDITS[k][0]) for k in names])
  kind = np.where(rng.random(len(images)) < COPY_SHARE, -1, rng.integers(len(names), size=len(images)))
  out, prompt = images.copy(), rng.integers(n_random, size=len(images))
  for j, name in enumerate(names):
    sel = np.flatnonzero(kind == j)
    if not len(sel):
      continue
    texts, fn = EDITS[name]
    a = rng.uniform(0.15, 0.4, size=(len(sel), 1, 1, 1)).astype(np.float32)
    x = (images[sel] + 1) / 2
    out[sel] = np.clip(fn(x, a), 0, 1) * 2 - 1
    prompt[sel] = offsets[j] + rng.integers(len(texts), size=len(sel))
  return out.astype(np.float32), prompt


def prompt_list(rng: np.random.Generator, n_random: int) -> list[str]:
  """The editor's prompts: `n_random` random sentences (copies), then every instruction of EDITS."""
  return random_prompts(rng, n_random) + [t for texts, _ in EDITS.values() for t in texts]


def text_bank(cfg, text, clip, prompts):
  """Text features (and FLUX.1's pooled CLIP vectors) of `prompts`, as the training step makes
  them from the tokenized batch."""
  tok = build_tokenizers(cfg)
  if cfg.model.family == "flux2":
    t = tok["qwen"](prompts)
    return np.asarray(jax.jit(lambda i, m: text(i, m))(t["ids"], t["mask"])), None
  ids = tok["t5"](prompts)["ids"]
  vec = np.asarray(jax.jit(lambda i: clip(i))(tok["clip"](prompts)["ids"]))
  return np.asarray(jax.jit(lambda i: text(i))(ids)), vec


# ----------------------------------------------------------------------------- editor

def latent_tokens(vae, images, family: str) -> np.ndarray:
  """Transformer tokens [B, N, C] of images, through the family's normalised `encode`."""
  graph, state = nnx.split(vae)
  fn = jax.jit(lambda s, x: latents.image_tokens(nnx.merge(graph, s).encode(x), family))
  return np.concatenate([np.asarray(fn(state, images[i:i + 32]))
                         for i in range(0, len(images), 32)])


def train_editor(cfg, backbone, vae, pool, bank, val, *, steps: int, sizes, batch: int, lr: float,
                 bank_size: int, n_random: int, shift: float, seed: int):
  """Flow matching (the training step's draws, inputs and loss) of the target latent tokens
  given the reference's and the prompt: a copy under a random sentence, or an EDITS edit under
  its instruction (`edit_pairs`). The latents of `bank_size` crops per image side in `sizes`
  and of their targets are computed once; each step takes `batch` of them, sides cycled."""
  family = cfg.model.family
  txt_bank, vec_bank = bank
  rng = np.random.default_rng(seed)
  count = lambda side: max(1, bank_size * 64 * 64 // (side * side))  # the same pixels per side
  pairs = {}
  for side in sorted(set(sizes)):
    ref = crops(pool, rng, count(side), side)
    tgt, prompt = edit_pairs(ref, rng, n_random)
    pairs[side] = (latent_tokens(vae, ref, family), latent_tokens(vae, tgt, family), prompt)
  log(f"{family}: editor latents of {', '.join(f'{len(p[0])} crops of {s}²' for s, p in pairs.items())}"
      f" and their targets ({COPY_SHARE:.0%} copies, the rest edits of {len(EDITS)} kinds)")
  val_tgt, val_prompt = edit_pairs(val, np.random.default_rng([seed, 98]), n_random)
  graph, params = nnx.split(backbone, nnx.Param)
  tx = optax.chain(optax.clip_by_global_norm(1.0), _adam(lr, steps))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x_c, x_1, txt, vec, key):
    b, n = x_1.shape[:2]
    grid = (int(round(n ** 0.5)),) * 2
    x_t, x_0, t = obj.flow_matching_inputs(key, x_1, shift=shift)
    ids_tgt, ids_cnd, txt_ids = latents.position_ids(b, grid, txt.shape[1], family)
    img, img_ids, txt_in, txt_ids, t_in = obj.model_inputs(x_t, x_c, ids_tgt, ids_cnd, txt,
                                                           txt_ids, t)

    def loss(p):
      v = nnx.merge(graph, p)(img, img_ids, txt_in, txt_ids, t_in, vec=vec,
                              guidance=guidance_for(cfg, b))
      return obj.image_loss(v, x_0, x_1)
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, value

  vgraph, vstate = nnx.split(vae)

  @jax.jit
  def edit(params, images, txt, vec):
    lat = nnx.merge(vgraph, vstate).encode(images)
    x_c, grid = latents.image_tokens(lat, family), latents.token_grid(lat.shape, family)
    ids_tgt, ids_cnd, txt_ids = latents.position_ids(x_c.shape[0], grid, txt.shape[1], family)
    model = nnx.merge(graph, params)
    tokens = sampler.euler_sample(
        lambda i, ii, t, ti, ts, v, g: model(i, ii, t, ti, ts, vec=v, guidance=g),
        x_c, ids_tgt, ids_cnd, txt, txt_ids, num_steps=cfg.inference.num_steps, family=family,
        key=jax.random.key(0), vec=vec,
        guidance=cfg.training.guidance if cfg.model.guidance_embed else None)
    return nnx.merge(vgraph, vstate).decode(latents.tokens_to_latents(tokens, grid, family))

  key = jax.random.key(seed)
  pick = lambda idx, a: None if a is None else a[idx]
  copies = val_prompt < n_random
  rec = _psnr(nnx.merge(vgraph, vstate).decode(nnx.merge(vgraph, vstate).encode(val_tgt)), val_tgt)
  for i in range(1, steps + 1):
    side = sizes[(i - 1) % len(sizes)]
    n = max(1, batch * 64 * 64 // (side * side))  # the same number of image tokens every step
    ref, tgt, prompt = pairs[side]
    idx = rng.integers(len(ref), size=n)
    params, opt, value = step(params, opt, ref[idx], tgt[idx], txt_bank[prompt[idx]],
                              pick(prompt[idx], vec_bank), jax.random.fold_in(key, i))
    if i % max(1, steps // 8) == 0 or i == steps:
      out = np.asarray(edit(params, val, txt_bank[val_prompt], pick(val_prompt, vec_bank)))
      log(f"{family}: editor step {i}/{steps}: loss {float(value):.4f}; held-out PSNR "
          f"({cfg.inference.num_steps} Euler steps) of copies {_psnr(out[copies], val_tgt[copies]):.2f} dB, "
          f"of edits {_psnr(out[~copies], val_tgt[~copies]):.2f} dB (their references: "
          f"{_psnr(val[~copies], val_tgt[~copies]):.2f}; the autoencoder alone: {rec:.2f})")
  nnx.update(backbone, params)
  return backbone


# ----------------------------------------------------------------------------- export

def _load_strict(model, rules, ours, ignore=()):
  """Our weights into a torch model through the converter's rule table (export direction);
  every torch key must be filled except those the converter ignores."""
  import re
  import torch
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  tensors = export_params(rules, flat_params(ours), shapes)
  state = {k: torch.from_numpy(np.asarray(v, np.float32).copy()) for k, v in tensors.items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if not any(re.search(p, k) for p in ignore)]
  if missing or unexpected:
    raise RuntimeError(f"{type(model).__name__}: missing {missing[:5]}, unexpected "
                       f"{unexpected[:5]}")
  return model


def write_repository(cfg, modules: dict, root: str) -> None:
  """A diffusers-layout repository of our modules: what `hf download` gives for the real ones."""
  import diffusers
  import torch
  import transformers
  from cotir_jax.convert.text import CLIP_IGNORE, T5_IGNORE, qwen3_ignore
  from cotir_jax.convert.vae import IGNORE as VAE_IGNORE
  torch.manual_seed(0)  # torch's own init of the keys we do not fill (ignored by the converter)
  m, family = cfg.model, cfg.model.family
  spec = modules["transformer"].spec
  common = dict(in_channels=spec.in_channels, out_channels=spec.out_channels,
                num_layers=spec.depth, num_single_layers=spec.depth_single_blocks,
                attention_head_dim=spec.head_dim, num_attention_heads=spec.num_heads,
                joint_attention_dim=spec.context_in_dim, axes_dims_rope=spec.axes_dim,
                guidance_embeds=spec.guidance_embed)
  if family == "flux2":
    transformer = diffusers.Flux2Transformer2DModel(**common, mlp_ratio=spec.mlp_ratio,
                                                    rope_theta=int(spec.theta))
  else:
    transformer = diffusers.FluxTransformer2DModel(**common, pooled_projection_dim=spec.vec_in_dim)
  _load_strict(transformer, transformer_rules(spec),
               modules["transformer"]).save_pretrained(os.path.join(root, "transformer"))

  vae_cfg = {k: v for k, v in modules["vae_config"].items() if k != "family"}
  n = len(vae_cfg["block_out_channels"])
  blocks = dict(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
  cls = diffusers.AutoencoderKLFlux2 if family == "flux2" else diffusers.AutoencoderKL
  vae = cls(**blocks, **vae_cfg)
  _load_strict(vae, vae_rules(modules["vae_config"]), modules["vae"], VAE_IGNORE)
  vae.save_pretrained(os.path.join(root, "vae"))

  tokenizers = {"tokenizer": m.tokenizer}
  if family == "flux1":
    tokenizers["tokenizer_2"] = m.tokenizer_2
  for sub, src in tokenizers.items():
    shutil.copytree(src, os.path.join(root, sub))
  t = modules["text_config"]
  if family == "flux2":
    hf = transformers.Qwen3Config(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, rope_theta=t.rope_theta,
        rms_norm_eps=t.rms_norm_eps, attention_bias=t.attention_bias, hidden_act=t.hidden_act)
    text = _load_strict(transformers.Qwen3Model(hf), qwen3_rules("", t.attention_bias),
                        modules["text"], qwen3_ignore("", t.num_layers_built, t.num_hidden_layers))
    text.save_pretrained(os.path.join(root, "text_encoder"))
    with open(os.path.join(root, "model_index.json"), "w") as f:
      json.dump({"_class_name": "Flux2KleinPipeline", "transformer": ["diffusers", type(transformer).__name__],
                 "vae": ["diffusers", type(vae).__name__], "text_encoder": ["transformers", "Qwen3Model"],
                 "tokenizer": ["transformers", "Qwen2TokenizerFast"]}, f, indent=2)
    return
  act = "gated-gelu" if t.dense_act_fn == "gelu_new" else f"gated-{t.dense_act_fn}"
  hf = transformers.T5Config(
      vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.d_kv, num_heads=t.num_heads, d_ff=t.d_ff,
      num_layers=t.num_layers, relative_attention_num_buckets=t.relative_attention_num_buckets,
      relative_attention_max_distance=t.relative_attention_max_distance,
      layer_norm_epsilon=t.layer_norm_epsilon, feed_forward_proj=act)
  _load_strict(transformers.T5EncoderModel(hf), t5_rules(), modules["text"], T5_IGNORE
               ).save_pretrained(os.path.join(root, "text_encoder_2"))
  c = modules["clip_config"]
  hf = transformers.CLIPTextConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
      max_position_embeddings=c.max_position_embeddings, layer_norm_eps=c.layer_norm_eps,
      hidden_act=c.hidden_act, bos_token_id=0, eos_token_id=c.eos_token_id)
  clip = transformers.CLIPTextModel(hf)
  prefix = "text_model." if any(k.startswith("text_model.") for k in clip.state_dict()) else ""
  _load_strict(clip, clip_rules(prefix), modules["clip"], CLIP_IGNORE
               ).save_pretrained(os.path.join(root, "text_encoder"))


# ----------------------------------------------------------------------------- per family

def family_vae(cfg, trained, pool, rng):
  """The family's autoencoder around the shared trained encoder / decoder, with latent
  statistics measured on `pool` crops: FLUX.2 batch-norm running mean / variance (quant convs
  identities), FLUX.1 scaling factor and shift."""
  vae_cfg = cfg.model.vae.copy_and_resolve_references()
  sample = crops(pool, rng, 256, 64)
  raw = raw_latents(trained, sample)
  if cfg.model.family == "flux1":
    vae_cfg.shift_factor = float(raw.mean())
    vae_cfg.scaling_factor = float(1.0 / raw.std())
  vae = build_vae(vae_cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  vae.encoder, vae.decoder = trained.encoder, trained.decoder
  if cfg.model.family == "flux2":
    from cotir_jax.models.vae import patchify
    for conv in (vae.quant_conv, vae.post_quant_conv):
      c = conv.kernel.shape[-1]
      conv.kernel.set_value(jnp.eye(c, dtype=jnp.float32).reshape(1, 1, c, c))
      conv.bias.set_value(jnp.zeros((c,), jnp.float32))
    p = np.asarray(patchify(jnp.asarray(raw), vae.patch))
    vae.bn.running_mean.set_value(jnp.asarray(p.mean((0, 1, 2)), jnp.float32))
    vae.bn.running_var.set_value(jnp.asarray(p.var((0, 1, 2)), jnp.float32))
  return vae, vae_cfg


def pretrain_family(cfg, trained_vae, pool, val, args, out: str) -> dict:
  family, m = cfg.model.family, cfg.model
  rng = np.random.default_rng([args.seed, 1 if family == "flux2" else 2])
  vae, vae_cfg = family_vae(cfg, trained_vae, pool, rng)
  z = np.asarray(jax.jit(lambda x: vae.encode(x))(val))
  log(f"{family}: latents of held-out crops: mean {z.mean():+.3f}, std {z.std():.3f}")
  rngs = nnx.Rngs(args.seed)
  kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
  text = build_text_encoder(m.text_encoder, **kw)
  clip = build_text_encoder(m.clip, **kw) if family == "flux1" else None
  bank = text_bank(cfg, text, clip, prompt_list(rng, args.prompts))
  spec = ModelSpec.from_config(m).replace(lora=None, dtype=jnp.float32, param_dtype=jnp.float32)
  backbone = FluxTransformer(spec, rngs=rngs)
  for path, var in nnx.to_flat_state(nnx.state(backbone, nnx.Param)):
    if path[-2:] in (("query_norm", "scale"), ("key_norm", "scale")):
      var.set_value(var.get_value() * args.qk_scale)
  sizes = tuple(int(s) for s in args.editor_sizes.split(","))
  train_editor(cfg, backbone, vae, pool, bank, val, steps=args.editor_steps, sizes=sizes,
               batch=args.editor_batch, lr=args.editor_lr, bank_size=args.editor_bank,
               n_random=args.prompts, shift=float(cfg.training.timestep_shift), seed=args.seed)
  return {"transformer": backbone, "vae": vae, "vae_config": vae_cfg, "text": text,
          "text_config": text_config(m.text_encoder), "clip": clip,
          "clip_config": text_config(m.clip) if family == "flux1" else None}


def write_base(cfg, modules: dict, out: str, dtype: str) -> None:
  """The repository in a temporary directory, converted into the base checkpoint at `out`."""
  with tempfile.TemporaryDirectory() as tmp:
    write_repository(cfg, modules, tmp)
    hidden = getattr(modules["text_config"], "hidden_layers", None)
    diffusers_to_orbax(tmp, out, dtype, hidden_layers=hidden, overwrite=True, verbose=False)
  path = os.path.join(out, "manifest.json")
  with open(path) as f:
    manifest = json.load(f)
  manifest["source"] = "scripts/pretrain_tiny_base.py"  # not the vanished temporary directory
  with open(path, "w") as f:
    json.dump(manifest, f, indent=2)


TRUNK = ("block_out_channels", "layers_per_block", "norm_num_groups", "latent_channels",
         "mid_block_add_attention", "in_channels", "out_channels")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--family", choices=("both", "flux2", "flux1"), default="both")
  ap.add_argument("--out", default=os.path.join(REPO, OUT), help="writes <out>/<family>/")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--dtype", default="bfloat16", help="stored weights (converter's --dtype)")
  ap.add_argument("--vae_steps", type=int, default=3000)
  ap.add_argument("--vae_batch", type=int, default=16)
  ap.add_argument("--vae_size", type=int, default=32)
  ap.add_argument("--vae_lr", type=float, default=3e-3)
  ap.add_argument("--editor_steps", type=int, default=800)
  ap.add_argument("--editor_batch", type=int, default=8)
  ap.add_argument("--editor_sizes", default="32,64",
                  help="image sides of the editor's steps, cycled")
  ap.add_argument("--editor_lr", type=float, default=2e-3)
  ap.add_argument("--editor_bank", type=int, default=1024, help="crops encoded per image side")
  ap.add_argument("--qk_scale", type=float, default=2.0,
                  help="initial query / key norm scales: sharper attention at the start, so "
                       "the editor finds the reference token at its own position sooner")
  ap.add_argument("--prompts", type=int, default=256, help="random sentences the editor sees")
  ap.add_argument("--cache", default=None,
                  help="keep the trained autoencoder here and reuse it when a later run has the "
                       "same seed and autoencoder settings (for work on the editor)")
  args = ap.parse_args(argv)
  t0 = time.time()
  cfgs = {f: config_lib.load(os.path.join(REPO, path), ["model.pretrained=None"])
          for f, path in CONFIGS.items()}
  for key in TRUNK:
    if cfgs["flux2"].model.vae[key] != cfgs["flux1"].model.vae[key]:
      raise SystemExit(f"model.vae.{key} differs between {CONFIGS['flux2']} and "
                       f"{CONFIGS['flux1']}; the families share one trained autoencoder")
  held = _held_out()
  pool = pyramid(COLOUR + GRAY)
  val = crops(pyramid(held), np.random.default_rng([args.seed, 99]), 32, 64)
  log(f"{len(pool)} training images ({sum(p.size for p in pool) / 3e6:.1f} Mpx); held-out "
      f"photographs {held} only measure progress")
  trunk = build_vae(cfgs["flux1"].model.vae, dtype=jnp.float32, param_dtype=jnp.float32,
                    rngs=nnx.Rngs(args.seed))
  settings = (args.seed, args.vae_steps, args.vae_batch, args.vae_size, args.vae_lr,
              {k: cfgs["flux1"].model.vae[k] for k in TRUNK})
  cached = (os.path.join(args.cache, f"autoencoder-{hashlib.sha1(repr(settings).encode()).hexdigest()[:12]}.npz")
            if args.cache else None)
  if cached and os.path.isfile(cached):
    with np.load(cached) as saved:
      for path, var in nnx.to_flat_state(nnx.state(trunk, nnx.Param)):
        var.set_value(jnp.asarray(saved[".".join(map(str, path))]))
    log(f"autoencoder from {cached}")
  else:
    train_autoencoder(trunk, pool, val, steps=args.vae_steps, batch=args.vae_batch,
                      size=args.vae_size, lr=args.vae_lr, seed=args.seed)
    if cached:
      os.makedirs(args.cache, exist_ok=True)
      np.savez(cached, **{k: np.asarray(v) for k, v in flat_params(nnx.state(trunk, nnx.Param)).items()})
  for family in (("flux2", "flux1") if args.family == "both" else (args.family,)):
    modules = pretrain_family(cfgs[family], trunk, pool, val, args,
                              os.path.join(args.out, family))
    write_base(cfgs[family], modules, os.path.join(args.out, family), args.dtype)
    log(f"{family}: wrote {os.path.join(args.out, family)}")
  log(f"done in {time.time() - t0:.0f} s wall")
  return 0


if __name__ == "__main__":
  sys.exit(main())
