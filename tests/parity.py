"""Helpers shared by the parity tests (plain functions; torch and diffusers imported on use)."""

import jax.numpy as jnp
import numpy as np


def rel(a, ref) -> float:
  """max |a − ref| / max |ref|: the parity tests' relative error."""
  return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def diffusers_forward(model, x) -> np.ndarray:
  """A diffusers FLUX transformer on numpy inputs `x` (img, txt, t, img_ids, txt_ids [L, axes],
  vec and guidance where the family has them)."""
  import torch
  kw = {}
  if x["vec"] is not None:
    kw["pooled_projections"] = torch.from_numpy(x["vec"])
  if x["guidance"] is not None:
    kw["guidance"] = torch.from_numpy(x["guidance"])
  with torch.no_grad():
    return model(hidden_states=torch.from_numpy(x["img"]),
                 encoder_hidden_states=torch.from_numpy(x["txt"]),
                 timestep=torch.from_numpy(x["t"]), img_ids=torch.from_numpy(x["img_ids"]),
                 txt_ids=torch.from_numpy(x["txt_ids"]), return_dict=False, **kw)[0].numpy()


def diffusers_meta(cfg):
  """The diffusers transformer of a config's backbone on torch's `meta` device (shapes only)."""
  import torch
  from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel
  m = cfg.model
  with torch.device("meta"):
    if m.family == "flux2":
      return Flux2Transformer2DModel(num_layers=m.depth, num_single_layers=m.depth_single_blocks,
                                     attention_head_dim=m.hidden_size // m.num_heads,
                                     num_attention_heads=m.num_heads,
                                     joint_attention_dim=m.context_in_dim,
                                     axes_dims_rope=tuple(m.axes_dim), guidance_embeds=False)
    return FluxTransformer2DModel(guidance_embeds=True)  # other defaults are FLUX.1-Kontext-dev


def cotir_inputs(cfg, seed=0, b=2, l_txt=11, n=12, t=(0.2, 0.7)) -> dict:
  """Keyword inputs of a CoTIR / backbone call for `cfg`: b samples of n target and n
  conditioning tokens on a 3-wide grid, l_txt text tokens, timesteps t (one per sample)."""
  m = cfg.model
  rng = np.random.default_rng(seed)
  axes = len(m.axes_dim)
  ids = np.zeros((b, 2 * n, axes), np.float32)
  ids[:, :, 1] = np.arange(2 * n) % 3
  ids[:, :, 2] = np.arange(2 * n) // 3
  ids[:, n:, 0] = 10 if m.family == "flux2" else 1
  txt_ids = np.zeros((b, l_txt, axes), np.float32)
  if m.family == "flux2":
    txt_ids[:, :, 3] = np.arange(l_txt)
  return dict(
      img=jnp.asarray(rng.standard_normal((b, 2 * n, m.in_channels)), jnp.float32),
      img_ids=jnp.asarray(ids),
      txt=jnp.asarray(rng.standard_normal((b, l_txt, m.context_in_dim)), jnp.float32),
      txt_ids=jnp.asarray(txt_ids), timesteps=jnp.asarray(t, jnp.float32),
      vec=jnp.asarray(rng.standard_normal((b, m.vec_in_dim)), jnp.float32) if m.vec_in_dim else None,
      guidance=jnp.full((b,), 4.0) if m.guidance_embed else None)
