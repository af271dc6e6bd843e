"""FLUX.2-klein and FLUX.1-Kontext transformers: parity with diffusers on random tiny models."""

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from cotir_jax import convert
from parity import diffusers_forward, rel

pytestmark = pytest.mark.usefixtures("highest_precision")  # float32 parity

# bfloat16 weights and compute against the float32 reference: relative max error bound.
# Observed ~1e-2 on these tiny models; 5e-2 leaves room across platforms.
BF16_BOUND = 5e-2
B, L_TXT, GRID = 2, 13, (3, 5)  # text length not a multiple of 8, non-square image grid


def _randomize(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 0.5 if p.ndim == 1 else 1.0 / np.sqrt(p.shape[-1])
      p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "norm" in name else 0.0))


def _image_ids(t, h, w, axes):
  ids = np.zeros((h * w, axes), np.float32)
  ids[:, 0] = t
  ids[:, 1] = np.repeat(np.arange(h), w)
  ids[:, 2] = np.tile(np.arange(w), h)
  return ids


def _inputs(family, in_ch, ctx, vec_dim, seed=0):
  rng = np.random.default_rng(seed)
  h, w = GRID
  axes = 4 if family == "flux2" else 3
  t_cond = 10 if family == "flux2" else 1
  img_ids = np.concatenate([_image_ids(0, h, w, axes), _image_ids(t_cond, h, w, axes)])
  txt_ids = np.zeros((L_TXT, axes), np.float32)
  if family == "flux2":
    txt_ids[:, 3] = np.arange(L_TXT)
  return dict(
      img=rng.standard_normal((B, 2 * h * w, in_ch)).astype(np.float32),
      txt=rng.standard_normal((B, L_TXT, ctx)).astype(np.float32),
      img_ids=img_ids, txt_ids=txt_ids,
      t=np.array([0.3, 0.85], np.float32),
      vec=rng.standard_normal((B, vec_dim)).astype(np.float32) if vec_dim else None,
      guidance=np.full((B,), 4.0, np.float32) if family == "flux1" else None)


def _ours(model, x):
  batched = lambda ids: jnp.broadcast_to(jnp.asarray(ids), (B, *ids.shape))
  out = model(jnp.asarray(x["img"]), batched(x["img_ids"]), jnp.asarray(x["txt"]),
              batched(x["txt_ids"]), jnp.asarray(x["t"]),
              vec=None if x["vec"] is None else jnp.asarray(x["vec"]),
              guidance=None if x["guidance"] is None else jnp.asarray(x["guidance"]))
  return np.asarray(out, np.float32)


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory):
  from diffusers import Flux2Transformer2DModel
  model = Flux2Transformer2DModel(num_layers=2, num_single_layers=2, attention_head_dim=32,
                                  num_attention_heads=2, joint_attention_dim=96,
                                  axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False)
  _randomize(model, 0)
  path = tmp_path_factory.mktemp("flux2") / "transformer"
  model.save_pretrained(path, max_shard_size="200KB")  # forces an index + several shards
  return model.eval(), str(path)


@pytest.fixture(scope="module")
def flux1_dir(tmp_path_factory):
  from diffusers import FluxTransformer2DModel
  model = FluxTransformer2DModel(in_channels=64, num_layers=2, num_single_layers=2,
                                 attention_head_dim=32, num_attention_heads=2,
                                 joint_attention_dim=32, pooled_projection_dim=24,
                                 axes_dims_rope=(8, 12, 12), guidance_embeds=True)
  _randomize(model, 1)
  path = tmp_path_factory.mktemp("flux1") / "transformer"
  model.save_pretrained(path)
  return model.eval(), str(path)


def test_flux2_float32_parity(flux2_dir):
  ref_model, path = flux2_dir
  x = _inputs("flux2", 128, 96, 0)
  ours = convert.load_transformer(path)
  assert ours.spec.family == "flux2" and ours.spec.depth == 2
  assert rel(_ours(ours, x), diffusers_forward(ref_model, x)) <= 2e-5


def test_flux2_bfloat16_within_bound(flux2_dir):
  ref_model, path = flux2_dir
  x = _inputs("flux2", 128, 96, 0)
  ours = convert.load_transformer(path, dtype=jnp.bfloat16)
  assert ours.img_in.kernel[...].dtype == jnp.bfloat16
  assert rel(_ours(ours, x), diffusers_forward(ref_model, x)) <= BF16_BOUND


def test_flux1_kontext_float32_parity(flux1_dir):
  ref_model, path = flux1_dir
  x = _inputs("flux1", 64, 32, 24)
  ours = convert.load_transformer(path)
  assert ours.spec.family == "flux1" and ours.spec.guidance_embed
  assert rel(_ours(ours, x), diffusers_forward(ref_model, x)) <= 2e-5


def test_flux1_kontext_bfloat16_within_bound(flux1_dir):
  ref_model, path = flux1_dir
  x = _inputs("flux1", 64, 32, 24)
  ours = convert.load_transformer(path, dtype=jnp.bfloat16)
  assert rel(_ours(ours, x), diffusers_forward(ref_model, x)) <= BF16_BOUND


def test_unrolled_equals_scanned(flux2_dir):
  _, path = flux2_dir
  x = _inputs("flux2", 128, 96, 0)
  scanned = _ours(convert.load_transformer(path), x)
  unrolled = _ours(convert.load_transformer(path, scan_layers=False, remat="full"), x)
  np.testing.assert_allclose(unrolled, scanned, rtol=0, atol=1e-5 * np.abs(scanned).max())
