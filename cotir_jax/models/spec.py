"""The resolved, hashable view of `config.model` that module constructors read."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from cotir_jax.models.attention import AttentionSpec
from cotir_jax.models.layers import FusedLayout, dtype_of, fused_groups

# `mixed_precision` (accelerate's names) → the dtype matmuls take their inputs in
COMPUTE_DTYPES = {"bf16": jnp.bfloat16, "no": jnp.float32}


@dataclasses.dataclass(frozen=True)
class LoRASpec:
  rank: int
  scale: float
  init: str
  bias: bool = True  # B's bias


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  family: str              # "flux2" (klein) or "flux1" (Kontext)
  in_channels: int
  out_channels: int
  hidden_size: int
  num_heads: int
  depth: int
  depth_single_blocks: int
  mlp_ratio: float
  axes_dim: tuple[int, ...]
  theta: float
  context_in_dim: int
  vec_in_dim: int
  guidance_embed: bool
  adapter_depth: int
  adapter_mlp_ratio: float
  adapter_out_channels: int
  lora: LoRASpec | None
  dtype: object
  param_dtype: object
  trainable_dtype: object  # LoRA + adapter: float32 masters, bfloat16 under compat="upstream"
  upstream: bool           # compat="upstream": bf16 ids / RoPE / timesteps
  attention: AttentionSpec | str  # a bare name: default block sizes
  remat: str               # remat policy of every scanned stack (layers.REMAT_POLICIES) ...
  scan_layers: bool
  remat_overrides: tuple[tuple[str, str], ...] = ()  # ... except these (part, policy) pairs

  def remat_for(self, part: str) -> str:
    """The remat policy of one scanned stack: double_blocks, single_blocks or cot_adapter."""
    return dict(self.remat_overrides).get(part, self.remat)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def mlp_hidden(self) -> int:
    return int(self.hidden_size * self.mlp_ratio)

  @property
  def use_bias(self) -> bool:
    return self.family == "flux1"

  @property
  def adapter_mlp_hidden(self) -> int:
    return int(self.hidden_size * self.adapter_mlp_ratio)

  # Column layouts of the fused projections (their reference order and head groups), shared
  # by the modules and the converter tables.
  @property
  def qkv_layout(self) -> FusedLayout:
    """Double blocks' `qkv`: [q | k | v]."""
    h = self.hidden_size
    return FusedLayout((h, h, h), fused_groups(self.num_heads, self.mlp_hidden))

  @property
  def mlp_in_layout(self) -> FusedLayout:
    """Double blocks' MLP `fc1`: FLUX.2 [gate | up] (SwiGLU), FLUX.1 one part (GELU)."""
    mh = self.mlp_hidden
    return FusedLayout((mh, mh) if self.family == "flux2" else (mh,),
                       fused_groups(self.num_heads, mh))

  @property
  def linear1_layout(self) -> FusedLayout:
    """Single blocks' `linear1`: [q | k | v | MLP input (FLUX.2: gate | up)]."""
    h = self.hidden_size
    return FusedLayout((h, h, h) + self.mlp_in_layout.sizes, self.mlp_in_layout.groups)

  @property
  def linear2_layout(self) -> FusedLayout:
    """Single blocks' `linear2` rows: [attention | MLP]."""
    return FusedLayout((self.hidden_size, self.mlp_hidden), self.mlp_in_layout.groups)

  @property
  def adapter_linear1_layout(self) -> FusedLayout:
    """CoT-adapter blocks' `linear1`: [q | k | v | MLP input (GELU)]."""
    h, mh = self.hidden_size, self.adapter_mlp_hidden
    return FusedLayout((h, h, h, mh), fused_groups(self.num_heads, mh))

  @property
  def adapter_linear2_layout(self) -> FusedLayout:
    """CoT-adapter blocks' `linear2` rows: [attention | MLP]."""
    h, mh = self.hidden_size, self.adapter_mlp_hidden
    return FusedLayout((h, mh), fused_groups(self.num_heads, mh))

  @classmethod
  def from_config(cls, m, platform: str | None = None) -> "ModelSpec":
    """From `config.model`; `platform`: of the devices it runs on (what model.attention="auto"
    resolves for; None: the default devices)."""
    upstream = m.get("compat", "default") == "upstream"
    lora = m.lora
    return cls(
        family=m.family, in_channels=m.in_channels, out_channels=m.get("out_channels") or m.in_channels,
        hidden_size=m.hidden_size, num_heads=m.num_heads, depth=m.depth,
        depth_single_blocks=m.depth_single_blocks, mlp_ratio=float(m.mlp_ratio),
        axes_dim=tuple(m.axes_dim), theta=float(m.theta), context_in_dim=m.context_in_dim,
        vec_in_dim=m.vec_in_dim, guidance_embed=bool(m.guidance_embed),
        adapter_depth=m.cot_adapter.depth, adapter_mlp_ratio=float(m.cot_adapter.mlp_ratio),
        adapter_out_channels=m.cot_adapter.out_channels,
        lora=(LoRASpec(lora.rank, float(lora.scale), lora.init, bool(lora.lora_bias))
              if lora.enabled else None),
        dtype=COMPUTE_DTYPES[m.mixed_precision], param_dtype=dtype_of(m.param_dtype),
        trainable_dtype=jnp.bfloat16 if upstream else jnp.float32, upstream=upstream,
        attention=AttentionSpec.from_config(m, platform), remat=m.remat_policy, scan_layers=bool(m.scan_layers),
        remat_overrides=tuple((part, policy) for part, policy in m.get("remat", {}).items()
                              if policy))

  def replace(self, **kw) -> "ModelSpec":
    return dataclasses.replace(self, **kw)
