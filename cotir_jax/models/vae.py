"""The frozen autoencoders: FLUX.2's `AutoencoderKLFlux2` and FLUX.1's `AutoencoderKL`.

Both share diffusers' Encoder / Decoder (ResNet blocks, a single-head mid-block attention,
asymmetric-pad stride-2 downsampling, nearest ×2 upsampling); they differ only in the latent
post-processing: FLUX.2 patchifies 2×2 and normalises with the stored batch-norm running
statistics, FLUX.1 applies `scaling_factor · (z − shift_factor)`.

Layout is NHWC with HWIO conv kernels (what XLA wants on TPU/GPU); module and parameter names
mirror diffusers' (`encoder.down_blocks.0.resnets.1.conv2.kernel`), so the converter table is a
near one-to-one rename. Convs and matmuls run in the compute `dtype` with float32 accumulation;
GroupNorm, the attention softmax and the latent (un)normalisation run in float32. Latents
come out (and go in) as float32; decoded images come out as float32.

Parameters are replicated (all logical axes None): the whole VAE is 84 M parameters, and
gathering conv kernels over an `fsdp` axis would cost more than holding one copy per device.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import ml_collections
from einops import rearrange
from flax import nnx
from ml_collections import config_dict

from cotir_jax.models.layers import IMAGE, Dense, dtype_of, param, torch_uniform
from cotir_jax.sharding import constrain

FAMILIES = ("flux2", "flux1")


def _dtype(d):
  return dtype_of(d) if isinstance(d, str) else d


class Conv(nnx.Module):
  """2-D convolution, NHWC input, HWIO kernel, PyTorch's default init; `pad` is per-side."""

  def __init__(self, cin: int, cout: int, k: int, *, stride: int = 1,
               pad: tuple[tuple[int, int], tuple[int, int]] | None = None, dtype, param_dtype,
               rngs: nnx.Rngs):
    fan_in = cin * k * k
    self.stride, self.dtype = stride, dtype
    self.pad = pad if pad is not None else ((k // 2, k // 2), (k // 2, k // 2))
    self.kernel = param(torch_uniform(rngs.params(), (k, k, cin, cout), fan_in, param_dtype),
                        (None, None, None, None))
    self.bias = param(torch_uniform(rngs.params(), (cout,), fan_in, param_dtype), (None,))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride, self.stride),
        self.pad, dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
    return (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm over the channel (last) axis, statistics in float32."""

  def __init__(self, channels: int, groups: int, eps: float, *, param_dtype):
    if channels % groups:
      raise ValueError(f"norm_num_groups={groups} does not divide {channels} channels")
    self.groups, self.eps = groups, eps
    self.scale = param(jnp.ones((channels,), param_dtype), (None,))
    self.bias = param(jnp.zeros((channels,), param_dtype), (None,))

  def __call__(self, x: jax.Array, act: bool = False) -> jax.Array:
    """Normalised x in float32 (SiLU applied when `act`); the caller casts.

    Two passes as torch: the group mean, then the mean squared deviation from it. The image is
    only reduced over its spatial axes per channel; the per-channel [B, C] statistics are then
    pooled over each group's channels. (Reshaping the image itself to [..., groups, C/groups]
    costs the TPU compiler minutes per VAE at 512² through relayouts around every conv.)
    """
    x32 = x.astype(jnp.float32)
    spatial = tuple(range(1, x.ndim - 1))
    keep = (x.shape[0],) + (1,) * len(spatial) + (x.shape[-1],)

    def pooled(per_channel):  # [B, C] → each channel's group average, [B, 1, ..., C]
      b, c = per_channel.shape
      g = per_channel.reshape(b, self.groups, c // self.groups).mean(-1, keepdims=True)
      return jnp.broadcast_to(g, (b, self.groups, c // self.groups)).reshape(keep)

    centered = x32 - pooled(jnp.mean(x32, axis=spatial))
    var = pooled(jnp.mean(jnp.square(centered), axis=spatial))
    y = centered * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return jax.nn.silu(y) if act else y


class ResnetBlock(nnx.Module):
  """diffusers ResnetBlock2D without time embedding: x + conv2(σ(gn2(conv1(σ(gn1(x))))))."""

  def __init__(self, cin: int, cout: int, groups: int, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.norm1 = GroupNorm(cin, groups, 1e-6, param_dtype=param_dtype)
    self.conv1 = Conv(cin, cout, 3, **kw)
    self.norm2 = GroupNorm(cout, groups, 1e-6, param_dtype=param_dtype)
    self.conv2 = Conv(cout, cout, 3, **kw)
    self.conv_shortcut = Conv(cin, cout, 1, **kw) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(self.norm1(x, act=True).astype(self.dtype))
    h = self.conv2(self.norm2(h, act=True).astype(self.dtype))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return constrain(x + h, IMAGE)  # each chip convolves its own images


class Attention(nnx.Module):
  """The mid-block self-attention: one head of width C over the H·W positions, residual."""

  def __init__(self, c: int, groups: int, *, dtype, param_dtype, rngs):
    kw = dict(use_bias=True, axes=(None, None), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.group_norm = GroupNorm(c, groups, 1e-6, param_dtype=param_dtype)
    self.to_q, self.to_k, self.to_v = Dense(c, c, **kw), Dense(c, c, **kw), Dense(c, c, **kw)
    self.to_out = Dense(c, c, **kw)

  def __call__(self, x):
    b, h, w, c = x.shape
    t = self.group_norm(x).astype(self.dtype).reshape(b, h * w, 1, c)
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
    o = jax.nn.dot_product_attention(q, k, v)  # head width C (512) rules out the cuDNN kernel
    return x + self.to_out(o).reshape(b, h, w, c)


class Downsample(nnx.Module):
  """diffusers Downsample2D(padding=0): zero-pad right/bottom by one, 3×3 conv stride 2."""

  def __init__(self, c: int, **kw):
    self.conv = Conv(c, c, 3, stride=2, pad=((0, 1), (0, 1)), **kw)

  def __call__(self, x):
    return self.conv(x)


class Upsample(nnx.Module):
  """diffusers Upsample2D: nearest-neighbour ×2, then a 3×3 conv."""

  def __init__(self, c: int, **kw):
    self.conv = Conv(c, c, 3, **kw)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownBlock(nnx.Module):
  def __init__(self, cin, cout, n, groups, add_downsample, **kw):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, **kw)
                             for i in range(n)])
    self.downsamplers = nnx.List([Downsample(cout, **kw)] if add_downsample else [])

  def __call__(self, x):
    for m in (*self.resnets, *self.downsamplers):
      x = m(x)
    return x


class UpBlock(nnx.Module):
  def __init__(self, cin, cout, n, groups, add_upsample, **kw):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, **kw)
                             for i in range(n)])
    self.upsamplers = nnx.List([Upsample(cout, **kw)] if add_upsample else [])

  def __call__(self, x):
    for m in (*self.resnets, *self.upsamplers):
      x = m(x)
    return x


class MidBlock(nnx.Module):
  """resnet, (attention, resnet): diffusers UNetMidBlock2D with one layer."""

  def __init__(self, c, groups, add_attention, **kw):
    self.resnets = nnx.List([ResnetBlock(c, c, groups, **kw) for _ in range(2)])
    self.attentions = nnx.List([Attention(c, groups, **kw)]
                               if add_attention else [])

  def __call__(self, x):
    x = self.resnets[0](x)
    if len(self.attentions):
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Encoder(nnx.Module):
  """Image [B,H,W,in] → moments [B,H/2^(n-1),W/2^(n-1),2·latent] (diffusers Encoder)."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ch, g = tuple(cfg.block_out_channels), cfg.norm_num_groups
    self.dtype = dtype
    self.conv_in = Conv(cfg.in_channels, ch[0], 3, **kw)
    self.down_blocks = nnx.List([
        DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < len(ch) - 1, **kw)
        for i in range(len(ch))])
    self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, **kw)
    self.conv_norm_out = GroupNorm(ch[-1], g, 1e-6, param_dtype=param_dtype)
    self.conv_out = Conv(ch[-1], 2 * cfg.latent_channels, 3, **kw)

  def __call__(self, x):
    x = self.conv_in(x)
    for blk in self.down_blocks:
      x = blk(x)
    x = self.mid_block(x)
    return self.conv_out(self.conv_norm_out(x, act=True).astype(self.dtype))


class Decoder(nnx.Module):
  """Latent [B,h,w,latent] → image [B,h·2^(n-1),w·2^(n-1),out] (diffusers Decoder)."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ch = tuple(cfg.get("decoder_block_out_channels") or cfg.block_out_channels)
    g, rev = cfg.norm_num_groups, tuple(reversed(ch))
    self.dtype = dtype
    self.conv_in = Conv(cfg.latent_channels, ch[-1], 3, **kw)
    self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, **kw)
    self.up_blocks = nnx.List([
        UpBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, i < len(ch) - 1, **kw)
        for i in range(len(ch))])
    self.conv_norm_out = GroupNorm(ch[0], g, 1e-6, param_dtype=param_dtype)
    self.conv_out = Conv(ch[0], cfg.out_channels, 3, **kw)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for blk in self.up_blocks:
      x = blk(x)
    return self.conv_out(self.conv_norm_out(x, act=True).astype(self.dtype))


class LatentBatchNorm(nnx.Module):
  """FLUX.2's affine-free BatchNorm2d, used only with its stored running statistics."""

  def __init__(self, channels: int, eps: float):
    self.eps = eps
    self.running_mean = param(jnp.zeros((channels,), jnp.float32), (None,), nnx.BatchStat)
    self.running_var = param(jnp.ones((channels,), jnp.float32), (None,), nnx.BatchStat)

  def _stats(self):
    mean = self.running_mean[...].astype(jnp.float32)
    return mean, jnp.sqrt(self.running_var[...].astype(jnp.float32) + self.eps)

  def normalize(self, z):
    mean, std = self._stats()
    return (z.astype(jnp.float32) - mean) / std

  def denormalize(self, z):
    mean, std = self._stats()
    return z.astype(jnp.float32) * std + mean


class _AutoEncoderBase(nnx.Module):
  """Shared encoder/decoder plumbing and input checks."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
    dtype, param_dtype = _dtype(dtype), _dtype(param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.in_channels, self.latent_channels = cfg.in_channels, cfg.latent_channels
    self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
    self.encoder = Encoder(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    c2, c = 2 * cfg.latent_channels, cfg.latent_channels
    self.quant_conv = Conv(c2, c2, 1, **kw) if cfg.use_quant_conv else None
    self.post_quant_conv = Conv(c, c, 1, **kw) if cfg.use_post_quant_conv else None

  # The image side must be a multiple of this (16: the pipeline packs latents 2×2).
  @property
  def spatial_factor(self) -> int:
    return self.downsample * 2

  def _check_images(self, images):
    f = self.spatial_factor
    if (images.ndim != 4 or images.shape[-1] != self.in_channels
        or images.shape[1] % f or images.shape[2] % f):
      raise ValueError(f"VAE encode expects images [B, H, W, {self.in_channels}] (NHWC) with H "
                       f"and W multiples of {f}; got shape {tuple(images.shape)}")

  def _check_latents(self, z, channels):
    if z.ndim != 4 or z.shape[-1] != channels:
      raise ValueError(f"VAE decode expects latents [B, h, w, {channels}] (NHWC); got shape "
                       f"{tuple(z.shape)}")

  def _posterior_mean(self, images):
    """encoder (+ quant_conv) → first half of the moments = `latent_dist.mode()`."""
    self._check_images(images)
    h = self.encoder(images.astype(self.dtype))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    return h[..., :self.latent_channels].astype(jnp.float32)

  def _decode_raw(self, z):
    z = z.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)


def patchify(z: jax.Array, p: int = 2) -> jax.Array:
  """[B,H,W,C] → [B,H/p,W/p,C·p·p], channels (c, pi, pj) as diffusers' `_patchify_latents`."""
  return rearrange(z, "b (h pi) (w pj) c -> b h w (c pi pj)", pi=p, pj=p)


def unpatchify(z: jax.Array, p: int = 2) -> jax.Array:
  """Inverse of `patchify`."""
  return rearrange(z, "b h w (c pi pj) -> b (h pi) (w pj) c", pi=p, pj=p)


class Flux2AutoEncoder(_AutoEncoderBase):
  """diffusers `AutoencoderKLFlux2` + the FLUX.2 pipeline's patchify and BN normalisation."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
    super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ph, pw = tuple(cfg.patch_size)
    if ph != pw:
      raise ValueError(f"patch_size={tuple(cfg.patch_size)}: only square patches are supported")
    self.patch = ph
    self.bn = LatentBatchNorm(ph * pw * cfg.latent_channels, cfg.batch_norm_eps)

  @property
  def spatial_factor(self) -> int:
    return self.downsample * self.patch

  def encode(self, images: jax.Array) -> jax.Array:
    """Images [B,H,W,3] in [-1,1] → normalised latents [B,H/16,W/16,128] (float32)."""
    return self.bn.normalize(patchify(self._posterior_mean(images), self.patch))

  def decode(self, latents: jax.Array) -> jax.Array:
    """Normalised latents [B,h,w,128] → images [B,16h,16w,3] (float32)."""
    self._check_latents(latents, self.latent_channels * self.patch ** 2)
    return self._decode_raw(unpatchify(self.bn.denormalize(latents), self.patch))


class Flux1AutoEncoder(_AutoEncoderBase):
  """diffusers `AutoencoderKL` as FLUX.1 uses it: z = scaling_factor · (mean − shift_factor)."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
    super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.scaling_factor = float(cfg.scaling_factor)
    self.shift_factor = float(cfg.shift_factor or 0.0)

  def encode(self, images: jax.Array) -> jax.Array:
    """Images [B,H,W,3] in [-1,1] → scaled latents [B,H/8,W/8,16] (float32)."""
    return self.scaling_factor * (self._posterior_mean(images) - self.shift_factor)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Scaled latents [B,h,w,16] → images [B,8h,8w,3] (float32)."""
    self._check_latents(latents, self.latent_channels)
    return self._decode_raw(latents.astype(jnp.float32) / self.scaling_factor + self.shift_factor)


def _common(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.in_channels = 3
  c.out_channels = 3
  c.layers_per_block = 2
  c.norm_num_groups = 32
  c.mid_block_add_attention = True
  return c


def vae_config(family: str) -> ml_collections.ConfigDict:
  """The upstream full-size autoencoder (diffusers config names) of a backbone family."""
  if family not in FAMILIES:
    raise ValueError(f"VAE family {family!r} is unknown; allowed: {FAMILIES}")
  c = ml_collections.ConfigDict()
  c.family = family
  _common(c)
  c.block_out_channels = (128, 256, 512, 512)
  if family == "flux2":  # FLUX.2-klein `vae/`: AutoencoderKLFlux2 defaults
    c.decoder_block_out_channels = config_dict.placeholder(tuple)
    c.latent_channels = 32
    c.use_quant_conv = True
    c.use_post_quant_conv = True
    c.batch_norm_eps = 1e-4
    c.patch_size = (2, 2)
  else:  # FLUX.1 `vae/`: AutoencoderKL without quant convs
    c.latent_channels = 16
    c.use_quant_conv = False
    c.use_post_quant_conv = False
    c.scaling_factor = 0.3611
    c.shift_factor = 0.1159
  return c


def tiny_vae_config(family: str) -> ml_collections.ConfigDict:
  """Tiny random-weight autoencoder for CPU runs; same 16× spatial factor as the full model.

  Four blocks (three downsamplings) keep latent grids the size the packing, position ids and
  sampler expect; only channel widths and depth shrink.
  """
  c = vae_config(family)
  c.block_out_channels = (16, 32, 32, 32)
  c.layers_per_block = 1
  c.norm_num_groups = 8
  return c


def build_vae(vae_cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
  """The autoencoder class of `vae_cfg.family`; dtypes as jnp dtypes or "float32"/"bfloat16"."""
  cls = {"flux2": Flux2AutoEncoder, "flux1": Flux1AutoEncoder}.get(vae_cfg.family)
  if cls is None:
    raise ValueError(f"vae.family={vae_cfg.family!r} is unknown; allowed: {FAMILIES}")
  return cls(vae_cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
