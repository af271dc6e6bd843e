"""CoTIR in PyTorch for benchmarks/step_throughput.py: diffusers' FLUX.2 / FLUX.1 transformer,
upstream's LoRA and a trainable CoT adapter module with upstream's
parameter names, so our weights load through the converter tables (`cot_adapter.pt` keys).

tests/test_cotir_model.py holds an independent functional adapter that reads our module's
weights on every call; training needs torch Parameters, hence this module. As upstream,
each adapter block computes linear1, attention and the MLP on every row of [txt; img]
and keeps the text rows; ours computes queries and MLP on the text rows only (same numbers,
~5% fewer FLOPs in the wide CPU config's step).

diffusers splits FLUX.1's single-block `linear1` into to_q / to_k / to_v / proj_mlp; upstream's
one LoRA on it becomes one A shared by four slices of B (A·x is computed four times there:
3·in·r extra multiply-adds per token and block, ~1% of the block).
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn


class LoRALinear(nn.Module):
  """base(x) + scale·B(A(x)) with B's bias (upstream's LoRA); base frozen. `rows` uses a slice of a
  shared (A, B) pair (FLUX.1's split linear1)."""

  def __init__(self, base: nn.Linear, rank: int, scale: float, shared=None, rows=None):
    super().__init__()
    self.base, self.scale, self.rows = base, scale, rows
    base.requires_grad_(False)
    if shared is None:
      r = min(rank, base.in_features, base.out_features)
      self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
      self.lora_B = nn.Linear(r, base.out_features, bias=True, device=base.weight.device)
      self._shared = None
    else:
      self._shared = (shared,)  # a tuple: registered once, on its owner

  def forward(self, x):
    if self._shared is None:
      return self.base(x) + self.scale * self.lora_B(self.lora_A(x))
    pair = self._shared[0]
    b = pair.lora_B
    return self.base(x) + self.scale * F.linear(pair.lora_A(x), b.weight[self.rows], b.bias[self.rows])


class LoRAPair(nn.Module):
  """A (in → r) and B (r → out, bias) of one upstream LoRA whose outputs feed several Linears."""

  def __init__(self, in_features: int, out_features: int, rank: int, device):
    super().__init__()
    r = min(rank, in_features, out_features)
    self.lora_A = nn.Linear(in_features, r, bias=False, device=device)
    self.lora_B = nn.Linear(r, out_features, bias=True, device=device)


class RMSNorm(nn.Module):
  def __init__(self, dim: int):
    super().__init__()
    self.scale = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    return F.rms_norm(x.float(), (x.shape[-1],), self.scale.float(), eps=1e-6).to(x.dtype)


class QKNorm(nn.Module):
  def __init__(self, dim: int):
    super().__init__()
    self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)


class Modulation(nn.Module):
  def __init__(self, dim: int):
    super().__init__()
    self.lin = nn.Linear(dim, 3 * dim)

  def forward(self, vec):
    return [m[:, None] for m in self.lin(F.silu(vec)).chunk(3, -1)]


class LastLayer(nn.Module):
  """(shift, scale) = adaLN(SiLU(vec)), shift first; linear((1 + scale)·LN(x) + shift)."""

  def __init__(self, hidden: int, out: int):
    super().__init__()
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
    self.linear = nn.Linear(hidden, out)

  def forward(self, x, vec):
    shift, scale = self.adaLN_modulation(vec).chunk(2, -1)
    return self.linear((1 + scale[:, None]) * _layer_norm(x) + shift[:, None])


def _layer_norm(x):
  return F.layer_norm(x.float(), x.shape[-1:], eps=1e-6)


def _gelu(x):
  return F.gelu(x, approximate="tanh")


class CoTIRBlock(nn.Module):
  def __init__(self, hidden: int, heads: int, mlp_ratio: float):
    super().__init__()
    self.hidden, self.heads, self.mlp = hidden, heads, int(hidden * mlp_ratio)
    self.linear1 = nn.Linear(hidden, 3 * hidden + self.mlp)
    self.linear2 = nn.Linear(hidden + self.mlp, hidden)
    self.norm = QKNorm(hidden // heads)
    self.modulation = Modulation(hidden)

  def forward(self, x, img, vec, rope):
    n = x.shape[1]
    sh, sc, g = self.modulation(vec)
    z = (1 + sc) * _layer_norm(torch.cat([x, img], 1)) + sh
    qkv, m = self.linear1(z).split([3 * self.hidden, self.mlp], -1)
    q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).unbind(2)
    q, k = self.norm.query_norm(q), self.norm.key_norm(k)
    q, k = (apply_rotary_emb(t, rope, sequence_dim=1) for t in (q, k))
    a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    a = a.transpose(1, 2).flatten(2)
    return x + g * self.linear2(torch.cat([a[:, :n], _gelu(m[:, :n])], -1))  # text rows kept


class CoTAdapter(nn.Module):
  """Upstream's CoT adapter with upstream's names; returns (txt residual, scene, degradation,
  plan)."""

  def __init__(self, hidden: int, heads: int, mlp_ratio: float, out: int, depth: int):
    super().__init__()
    self.decoder = nn.ModuleList(CoTIRBlock(hidden, heads, mlp_ratio) for _ in range(depth))
    self.degradation_layer = nn.Linear(hidden, hidden)
    self.sharpness_layer = nn.Linear(hidden, hidden)
    self.planning_layer = nn.Linear(2 * hidden, hidden)
    for name in ("degradation", "sharpness", "planning"):
      setattr(self, f"final_{name}_layer", LastLayer(hidden, out))
      setattr(self, f"scale_{name}", nn.Parameter(torch.zeros(1)))

  def forward(self, txt, img, vec, rope):
    x = txt
    for block in self.decoder:
      x = block(x, img, vec, rope)
    deg, sharp = self.degradation_layer(x), self.sharpness_layer(x)
    plan = self.planning_layer(torch.cat([deg, sharp], -1))
    residual = deg * self.scale_degradation + sharp * self.scale_sharpness + plan * self.scale_planning
    return (residual, self.final_sharpness_layer(_gelu(sharp), vec),
            self.final_degradation_layer(_gelu(deg), vec), self.final_planning_layer(_gelu(plan), vec))


class TorchCoTIR(nn.Module):
  """`model(img, img_ids, txt, txt_ids, t, guidance=None, vec=None)` → (velocity, scene,
  degradation, plan), upstream's CoTIR forward over diffusers' blocks; ids are [L, axes]."""

  def __init__(self, cfg):
    super().__init__()
    m = cfg.model
    self.family = m.family
    common = dict(in_channels=m.in_channels, num_layers=m.depth,
                  num_single_layers=m.depth_single_blocks, attention_head_dim=m.hidden_size // m.num_heads,
                  num_attention_heads=m.num_heads, joint_attention_dim=m.context_in_dim,
                  axes_dims_rope=tuple(m.axes_dim), guidance_embeds=bool(m.guidance_embed))
    if m.family == "flux2":
      from diffusers import Flux2Transformer2DModel
      self.backbone = Flux2Transformer2DModel(mlp_ratio=m.mlp_ratio, rope_theta=int(m.theta), **common)
    else:
      from diffusers import FluxTransformer2DModel
      self.backbone = FluxTransformer2DModel(pooled_projection_dim=m.vec_in_dim, **common)
    self.backbone.requires_grad_(False)
    a = m.cot_adapter
    self.cot_adapter = CoTAdapter(m.hidden_size, m.num_heads, a.mlp_ratio, a.out_channels, a.depth)

  # ------------------------------------------------------------------ LoRA
  def add_lora(self, rank: int, scale: float):
    """Wraps the single blocks' linears and the final layer's two linears."""
    bb = self.backbone
    for blk in bb.single_transformer_blocks:
      if self.family == "flux2":
        blk.attn.to_qkv_mlp_proj = LoRALinear(blk.attn.to_qkv_mlp_proj, rank, scale)
        blk.attn.to_out = LoRALinear(blk.attn.to_out, rank, scale)
      else:
        parts = [blk.attn.to_q, blk.attn.to_k, blk.attn.to_v, blk.proj_mlp]
        out = sum(p.out_features for p in parts)
        blk.linear1_lora = LoRAPair(parts[0].in_features, out, rank, parts[0].weight.device)
        start = 0
        for owner, name, part in ((blk.attn, "to_q", parts[0]), (blk.attn, "to_k", parts[1]),
                                  (blk.attn, "to_v", parts[2]), (blk, "proj_mlp", parts[3])):
          rows = slice(start, start + part.out_features)
          setattr(owner, name, LoRALinear(part, rank, scale, shared=blk.linear1_lora, rows=rows))
          start = rows.stop
        blk.proj_out = LoRALinear(blk.proj_out, rank, scale)
        blk.norm.linear = LoRALinear(blk.norm.linear, rank, scale)
    bb.proj_out = LoRALinear(bb.proj_out, rank, scale)
    bb.norm_out.linear = LoRALinear(bb.norm_out.linear, rank, scale)

  def lora_state_names(self, lora: dict) -> dict:
    """Upstream `lora.pt` keys → this module's names (diffusers' norm_out emits (scale,
    shift): B's rows and bias swap halves)."""
    if self.family == "flux2":
      table = [(r"single_blocks\.(\d+)\.linear1\.", r"single_transformer_blocks.\1.attn.to_qkv_mlp_proj."),
               (r"single_blocks\.(\d+)\.linear2\.", r"single_transformer_blocks.\1.attn.to_out.")]
    else:
      table = [(r"single_blocks\.(\d+)\.linear1\.", r"single_transformer_blocks.\1.linear1_lora."),
               (r"single_blocks\.(\d+)\.linear2\.", r"single_transformer_blocks.\1.proj_out."),
               (r"single_blocks\.(\d+)\.modulation\.lin\.", r"single_transformer_blocks.\1.norm.linear.")]
    table += [(r"final_layer\.linear\.", "proj_out."),
              (r"final_layer\.adaLN_modulation\.1\.", "norm_out.linear.")]
    out = {}
    for key, value in lora.items():
      name = key
      for pattern, repl in table:
        name = re.sub("^" + pattern, repl, name)
      if name == key:
        raise KeyError(f"LoRA key {key!r} has no place in the diffusers model")
      if name.startswith("norm_out.linear.lora_B"):
        value = np.concatenate(np.split(value, 2)[::-1])
      out[f"backbone.{name}"] = value
    return out

  def load_trainable(self, tensors: dict):
    """Loads every trainable tensor (LoRA + adapter), naming any missing or unexpected key."""
    own = {k: p for k, p in self.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
      raise KeyError(f"trainable weights: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
      for k, v in tensors.items():
        if own[k].shape != v.shape:
          raise ValueError(f"{k}: ours {tuple(v.shape)}, torch {tuple(own[k].shape)}")
        own[k].copy_(v)

  # ------------------------------------------------------------------ forward
  def forward(self, img, img_ids, txt, txt_ids, t, guidance=None, vec=None):
    bb = self.backbone
    n_txt = txt.shape[1]
    hs, enc = bb.x_embedder(img), bb.context_embedder(txt)
    if self.family == "flux2":
      temb = bb.time_guidance_embed(t * 1000, None)
      mod_img, mod_txt = bb.double_stream_modulation_img(temb), bb.double_stream_modulation_txt(temb)
      mod_single = bb.single_stream_modulation(temb)
      (c_txt, s_txt), (c_img, s_img) = bb.pos_embed(txt_ids), bb.pos_embed(img_ids)
      rope = (torch.cat([c_txt, c_img]), torch.cat([s_txt, s_img]))
      for blk in bb.transformer_blocks:
        enc, hs = blk(hidden_states=hs, encoder_hidden_states=enc, temb_mod_img=mod_img,
                      temb_mod_txt=mod_txt, image_rotary_emb=rope)
    else:
      temb = bb.time_text_embed(t * 1000, guidance * 1000, vec)
      rope = bb.pos_embed(torch.cat([txt_ids, img_ids]))
      for blk in bb.transformer_blocks:
        enc, hs = blk(hidden_states=hs, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rope)
    residual, scene, degradation, plan = self.cot_adapter(enc, hs, temb, rope)
    enc = enc + residual.to(enc.dtype)
    if self.family == "flux2":
      x = torch.cat([enc, hs], 1)
      for blk in bb.single_transformer_blocks:
        x = blk(hidden_states=x, encoder_hidden_states=None, temb_mod=mod_single, image_rotary_emb=rope)
      hs = x[:, n_txt:]
    else:
      for blk in bb.single_transformer_blocks:
        enc, hs = blk(hidden_states=hs, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rope)
    out = bb.proj_out(bb.norm_out(hs, temb))
    return out.float(), scene.float(), degradation.float(), plan.float()
