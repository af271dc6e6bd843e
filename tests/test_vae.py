"""FLUX.2 / FLUX.1 autoencoders: float32 parity with diffusers (encode + pipeline latent
post-processing, decode), bfloat16 within a documented bound, full-size shapes and counts
against diffusers on torch's meta device, and the error paths."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cotir_jax.convert.core import ConversionError, check_coverage, export_params, flat_params
from cotir_jax.convert.vae import IGNORE, load_vae, vae_rules
from cotir_jax.models.vae import build_vae, tiny_vae_config, vae_config
from parity import rel

pytestmark = pytest.mark.usefixtures("highest_precision")  # float32 parity

diffusers = pytest.importorskip("diffusers")

FP32_TOL = 2e-5
# bfloat16 weights and activations (8-bit mantissa, ~4e-3 relative per rounding) through
# ~20 conv/norm layers, compared with the float32 reference: observed 6e-3..1.3e-2 (encode)
# and 1.4e-2..2.6e-2 (decode) on the tiny models; allow 5e-2.
BF16_TOL = 5e-2
SHAPE = (2, 32, 48, 3)  # batch 2, non-square


def _diffusers_kwargs(cfg):
  n = len(cfg.block_out_channels)
  kw = dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
            latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
            use_quant_conv=cfg.use_quant_conv, use_post_quant_conv=cfg.use_post_quant_conv,
            mid_block_add_attention=cfg.mid_block_add_attention)
  if cfg.family == "flux2":
    kw.update(batch_norm_eps=cfg.batch_norm_eps, patch_size=tuple(cfg.patch_size))
  else:
    kw.update(scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor)
  return kw


def _torch_vae(family, **overrides):
  cls = diffusers.AutoencoderKLFlux2 if family == "flux2" else diffusers.AutoencoderKL
  kw = _diffusers_kwargs(tiny_vae_config(family))
  kw.update(overrides)
  torch.manual_seed(0)
  vae = cls(**kw).eval()
  with torch.no_grad():  # norms default to 1/0 and BN stats to 0/1: randomise so they matter
    for name, p in vae.named_parameters():
      if p.ndim == 1:
        p.add_(0.2 * torch.randn_like(p))
    if family == "flux2":
      vae.bn.running_mean.copy_(0.5 * torch.randn_like(vae.bn.running_mean))
      vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) * 2 + 0.1)
  return vae


# diffusers' Flux2 pipelines (_encode_vae_image / decode branch), on NCHW torch tensors
def _patchify(z):
  b, c, h, w = z.shape
  z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
  return z.reshape(b, c * 4, h // 2, w // 2)


def _unpatchify(z):
  b, c, h, w = z.shape
  return z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def _bn_stats(vae, z):
  mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.dtype)
  std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.dtype)
  return mean, std


def _ref_encode(vae, family, x):
  z = vae.encode(x).latent_dist.mode()
  if family == "flux2":
    z = _patchify(z)
    mean, std = _bn_stats(vae, z)
    return (z - mean) / std
  return (z - vae.config.shift_factor) * vae.config.scaling_factor


def _ref_decode(vae, family, z):
  if family == "flux2":
    mean, std = _bn_stats(vae, z)
    z = _unpatchify(z * std + mean)
  else:
    z = z / vae.config.scaling_factor + vae.config.shift_factor
  return vae.decode(z).sample


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _jitted(model):
  graphdef, state = nnx.split(model)
  enc = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
  dec = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
  return (lambda x: enc(state, x)), (lambda z: dec(state, z))


# Parity runs eagerly: op-by-op compilation is cached across the loaded copies, which is
# several times faster on 2 cores than compiling each whole model; `test_jit_matches_eager`
# covers the jitted path.


@pytest.fixture(scope="module", params=["flux2", "flux1"])
def saved(request, tmp_path_factory):
  """A tiny random diffusers VAE saved once whole and once sharded, plus reference outputs."""
  family = request.param
  vae = _torch_vae(family)
  root = tmp_path_factory.mktemp(f"vae_{family}")
  vae.save_pretrained(root / "single")
  vae.save_pretrained(root / "sharded", max_shard_size="40KB")
  assert os.path.exists(root / "sharded" / "diffusion_pytorch_model.safetensors.index.json")
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, SHAPE).astype(np.float32)
  cfg = tiny_vae_config(family)
  f = 2 ** (len(cfg.block_out_channels) - 1)
  if family == "flux2":
    lat_shape = (SHAPE[0], SHAPE[1] // (2 * f), SHAPE[2] // (2 * f), 4 * cfg.latent_channels)
  else:
    lat_shape = (SHAPE[0], SHAPE[1] // f, SHAPE[2] // f, cfg.latent_channels)
  latents = rng.standard_normal(lat_shape).astype(np.float32)
  with torch.no_grad():
    ref_z = _nhwc(_ref_encode(vae, family, _nchw(images)))
    ref_x = _nhwc(_ref_decode(vae, family, _nchw(latents)))
  model = load_vae(str(root / "single"))
  return dict(family=family, vae=vae, root=root, images=images, latents=latents,
              ref_z=ref_z, ref_x=ref_x, model=model)


def test_float32_parity(saved):
  model = saved["model"]
  assert model.encoder.conv_in.kernel[...].dtype == jnp.float32
  z = model.encode(jnp.asarray(saved["images"]))
  assert z.shape == saved["ref_z"].shape and z.dtype == jnp.float32
  x = model.decode(jnp.asarray(saved["latents"]))
  assert x.shape == saved["ref_x"].shape == SHAPE
  ez, ex = rel(z, saved["ref_z"]), rel(x, saved["ref_x"])
  print(f"{saved['family']} fp32 encode {ez:.2e} decode {ex:.2e}")
  assert ez <= FP32_TOL and ex <= FP32_TOL


def test_sharded_checkpoint_loads_the_same(saved):
  a = flat_params(saved["model"])
  b = flat_params(load_vae(str(saved["root"] / "sharded")))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_jit_matches_eager(saved):
  if saved["family"] != "flux2":
    pytest.skip("one family is enough for the jitted path (compile time)")
  encode, decode = _jitted(saved["model"])
  z = encode(jnp.asarray(saved["images"]))
  x = decode(jnp.asarray(saved["latents"]))
  assert rel(z, saved["ref_z"]) <= FP32_TOL and rel(x, saved["ref_x"]) <= FP32_TOL


def test_bfloat16_bound(saved):
  model = load_vae(str(saved["root"] / "single"), dtype=jnp.bfloat16)
  assert model.encoder.conv_in.kernel[...].dtype == jnp.bfloat16
  if saved["family"] == "flux2":
    assert model.bn.running_var[...].dtype == jnp.float32
  ez = rel(model.encode(jnp.asarray(saved["images"])), saved["ref_z"])
  ex = rel(model.decode(jnp.asarray(saved["latents"])), saved["ref_x"])
  print(f"{saved['family']} bf16 encode {ez:.2e} decode {ex:.2e}")
  assert ez <= BF16_TOL and ex <= BF16_TOL


def test_export_round_trip(saved):
  """The same table exports our weights back to the exact diffusers state dict."""
  cfg = tiny_vae_config(saved["family"])
  out = export_params(vae_rules(cfg),
                      {k: np.asarray(v) for k, v in flat_params(saved["model"]).items()})
  ref = {k: v.numpy() for k, v in saved["vae"].state_dict().items()
         if not k.endswith("num_batches_tracked")}
  assert sorted(out) == sorted(ref)
  for k in ref:
    np.testing.assert_array_equal(out[k], ref[k], err_msg=k)


def test_bad_image_shape(saved):
  model = saved["model"]
  with pytest.raises(ValueError, match=r"multiples of 16.*\(2, 40, 48, 3\)"):
    model.encode(jnp.zeros((2, 40, 48, 3)))
  with pytest.raises(ValueError, match=r"\(1, 32, 8, 3\)"):
    model.encode(jnp.zeros((1, 32, 8, 3)))


def test_unsupported_class(saved, tmp_path):
  config = json.loads((saved["root"] / "single" / "config.json").read_text())
  config["_class_name"] = "AutoencoderTiny"
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConversionError, match=r"config\.json.*AutoencoderTiny"):
    load_vae(str(tmp_path))


def _meta_model(family):
  cfg = vae_config(family)
  with torch.device("meta"):
    if family == "flux2":
      return diffusers.AutoencoderKLFlux2(), cfg  # diffusers' defaults are FLUX.2's VAE
    return diffusers.AutoencoderKL(**_diffusers_kwargs(cfg)), cfg


@pytest.mark.parametrize("family,count", [("flux2", 84_046_115), ("flux1", 83_819_683)])
def test_full_size_counts_and_coverage(family, count):
  ref, cfg = _meta_model(family)
  abstract = nnx.eval_shape(lambda: build_vae(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                              rngs=nnx.Rngs(0)))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert n_params == sum(p.numel() for p in ref.parameters()) == count
  ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  check_coverage(vae_rules(cfg), flat_params(abstract), ref_shapes, source=f"meta {family}",
                 ignore=IGNORE)


def test_separate_decoder_widths_coverage():
  """FLUX.2's optional `decoder_block_out_channels` is honoured by the model and the table."""
  cfg = vae_config("flux2")
  cfg.decoder_block_out_channels = (64, 128, 256, 256)
  with torch.device("meta"):
    ref = diffusers.AutoencoderKLFlux2(decoder_block_out_channels=(64, 128, 256, 256))
  abstract = nnx.eval_shape(lambda: build_vae(cfg, dtype="bfloat16", param_dtype="bfloat16",
                                              rngs=nnx.Rngs(0)))
  check_coverage(vae_rules(cfg), flat_params(abstract),
                 {k: tuple(v.shape) for k, v in ref.state_dict().items()}, source="meta",
                 ignore=IGNORE)
