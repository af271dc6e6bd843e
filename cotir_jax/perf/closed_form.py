"""The FLOPs of one CoTIR train step in closed form, from a config: what `train/step.py` runs,
per (component, kind), counted as `perf.hlo` counts a compiled program so the two can be
compared op for op.

One step: VAE encode of HQ and LQ, the text encoder on 4·batch sequences (prompt + three
answers) of `data.max_length` tokens (plus CLIP on the prompt for FLUX.1), the backbone over
`max_length` text + 2·N image tokens, the CoT adapter on the text rows, the backward pass
through what the trainable LoRA + adapter weights need, and the recomputation of
`model.remat_policy`; `analytic_flops` documents the accounting. Its "forward" + "backward"
kinds are the model FLOPs of the step (`perf.utilization`).
"""

from __future__ import annotations

import collections
import dataclasses

from cotir_jax.perf.flop_count import FlopCount, valid_taps

@dataclasses.dataclass(frozen=True)
class _Op:
  """One matmul of a block, per sample: forward FLOPs, backward FLOPs, and what remat needs.

  needed: its output is read by the backward pass (a residual); deps: ops whose outputs it
  reads; batched: a dot with batch dims (attention), which the "dots" policy does not save;
  name "pv" is the attention output that the save_* / offload_* policies keep.
  """
  name: str
  fwd: float
  bwd: float = 0.0
  needed: bool = False
  deps: tuple = ()
  batched: bool = False


# what each remat policy saves (models/layers.py REMAT_POLICIES); the rest is recomputed
_SAVED = {
    "full": lambda op: False,
    "dots": lambda op: not op.batched,
    "save_attention": lambda op: op.name == "pv",
    "save_qkv_attention": lambda op: op.name == "pv",  # q/k/v are not matmul outputs
    "offload_attention": lambda op: op.name == "pv",
}


def _remat(ops: list[_Op], policy: str) -> float:
  """Forward FLOPs the backward pass recomputes under a remat policy: every op whose output is
  needed (by the backward or by another recomputed op) and not saved."""
  if policy == "none":
    return 0.0
  if policy not in _SAVED:
    raise ValueError(f"remat policy {policy!r} is unknown to closed_form.analytic_flops; "
                     f"known: {['none', *_SAVED]}")
  saved = _SAVED[policy]
  by_name = {op.name: op for op in ops}
  todo = [op.name for op in ops if op.needed and not saved(op)]
  redo = set()
  while todo:
    name = todo.pop()
    if name in redo:
      continue
    redo.add(name)
    todo.extend(d for d in by_name[name].deps if not saved(by_name[d]))
  return sum(by_name[n].fwd for n in redo)


def _dense(name, rows, fan_in, fan_out, *, weight_grad=False, input_grad=False, needed=False,
           deps=(), lora_rank=None):
  """A Dense layer on `rows` tokens (+ its LoRA x·A·B): forward, and backward for the weight
  gradient (trainable) and/or the input gradient (something upstream is trainable)."""
  f = 2.0 * rows * fan_in * fan_out
  ops = [_Op(name, f, f * (weight_grad + input_grad), needed, deps)]
  if lora_rank:
    r = min(lora_rank, fan_in, fan_out)
    fa, fb = 2.0 * rows * fan_in * r, 2.0 * rows * r * fan_out
    # backward: dB = uᵀ·dy and du = dy·Bᵀ (fb each), dA = xᵀ·du (fa), dx += du·Aᵀ (fa if needed)
    ops += [_Op(f"{name}.lora_a", fa, fa * (1 + input_grad), True, deps),
            _Op(f"{name}.lora_b", fb, 2 * fb, needed, (f"{name}.lora_a",))]
  return ops


def _attention(q_rows, k_rows, width, *, grad, deps):
  """Softmax attention (QKᵀ then PV, all heads: width = heads·head_dim); backward 2× each."""
  f = 2.0 * q_rows * k_rows * width
  g = 2 * f if grad else 0.0
  return [_Op("qk", f, g, grad, deps, batched=True), _Op("pv", f, g, grad, ("qk",) + deps,
                                                          batched=True)]


def _double_block(s, n_txt, n_img):
  """FLUX double-stream block: nothing in it or before it is trainable → forward only."""
  h, mh = s.hidden_size, s.mlp_hidden
  width = mh * (2 if s.family == "flux2" else 1)
  ops = []
  for stream, rows in (("txt", n_txt), ("img", n_img)):
    if s.family == "flux1":
      ops += _dense(f"{stream}_mod", 1, h, 6 * h)
    ops += (_dense(f"{stream}_qkv", rows, h, 3 * h) + _dense(f"{stream}_proj", rows, h, h)
            + _dense(f"{stream}_fc1", rows, h, width) + _dense(f"{stream}_fc2", rows, mh, h))
  return ops + _attention(n_txt + n_img, n_txt + n_img, h, grad=False, deps=())


def _single_block(s, rows):
  """FLUX single-stream block with LoRA on linear1 / linear2 (and FLUX.1's modulation).

  Base weights are frozen: input gradients only. linear1's output feeds nonlinearities and
  the attention (needed by the backward); linear2's output feeds the residual through the gate,
  which is frozen on FLUX.2 (not needed: "full" remat skips it) and comes from the LoRA'd
  modulation on FLUX.1 (needed for the gate's gradient); LoRA's x·A is needed for dB.
  """
  h, mh, r = s.hidden_size, s.mlp_hidden, s.lora.rank if s.lora else None
  width = mh * (2 if s.family == "flux2" else 1)
  ops = []
  if s.family == "flux1":
    ops += _dense("mod", 1, h, 3 * h, needed=True, lora_rank=r)
  ops += _dense("linear1", rows, h, 3 * h + width, input_grad=True, needed=True, lora_rank=r)
  ops += _attention(rows, rows, h, grad=True, deps=("linear1", "linear1.lora_b"))
  ops += _dense("linear2", rows, h + mh, h, input_grad=True, needed=s.family == "flux1",
                deps=("pv", "linear1"), lora_rank=r)
  return ops


def _adapter_block(s, n_txt, rows):
  """CoT adapter block: every weight trainable; queries, MLP and output on the text rows only,
  keys / values over [txt; img]. All outputs are needed (the gate g is trainable too)."""
  h, amh = s.hidden_size, int(s.hidden_size * s.adapter_mlp_ratio)
  train = dict(weight_grad=True, input_grad=True, needed=True)
  ops = (_dense("mod", 1, h, 3 * h, weight_grad=True, needed=True)
         + _dense("q", n_txt, h, h, **train) + _dense("kv", rows, h, 2 * h, **train)
         + _dense("m", n_txt, h, amh, **train)
         + _attention(n_txt, rows, h, grad=True, deps=("q", "kv"))
         + _dense("linear2", n_txt, h + amh, h, deps=("pv", "m"), **train))
  return ops


def _encoder_layer(rows, d, qkv_out, kv_out, mlp, mlp_in_layers, attn_width):
  """A frozen text-encoder layer (forward only): q/k/v/o projections, attention, MLP."""
  return (_dense("q", rows, d, qkv_out) + _dense("k", rows, d, kv_out)
          + _dense("v", rows, d, kv_out) + _dense("o", rows, qkv_out, d)
          + _attention(rows, rows, attn_width, grad=False, deps=())
          + [op for i in range(mlp_in_layers) for op in _dense(f"in{i}", rows, d, mlp)]
          + _dense("out", rows, mlp, d))


def _text_encoder(t, rows):
  """Forward FLOPs of one sequence of `rows` tokens through a frozen Qwen3 / T5 / CLIP."""
  if t.model_type == "qwen3":
    layer = _encoder_layer(rows, t.hidden_size, t.num_attention_heads * t.head_dim,
                           t.num_key_value_heads * t.head_dim, t.intermediate_size, 2,
                           t.num_attention_heads * t.head_dim)
    return t.num_layers_built * sum(op.fwd for op in layer)
  if t.model_type == "t5":
    inner = t.num_heads * t.d_kv
    layer = _encoder_layer(rows, t.d_model, inner, inner, t.d_ff, 2, inner)
    return t.num_layers * sum(op.fwd for op in layer)
  layer = _encoder_layer(rows, t.hidden_size, t.hidden_size, t.hidden_size,
                         t.intermediate_size, 1, t.hidden_size)
  return t.num_hidden_layers * sum(op.fwd for op in layer)


def _conv(size, cin, cout, k, stride=1, pad=None):
  """(FLOPs, output size) of a k×k conv on a size×size map, counting valid taps only."""
  lo, hi = pad if pad is not None else (k // 2, k // 2)
  out = (size + lo + hi - k) // stride + 1
  taps = valid_taps(size, out, k, stride, lo) ** 2
  return 2.0 * taps * cin * cout, out


def _vae_encode(vcfg, size):
  """Forward FLOPs of one image through the VAE encoder (+ quant_conv) at size × size."""
  ch, g = tuple(vcfg.block_out_channels), vcfg.layers_per_block
  total, _ = _conv(size, vcfg.in_channels, ch[0], 3)

  def resnet(cin, cout, size):
    f = _conv(size, cin, cout, 3)[0] + _conv(size, cout, cout, 3)[0]
    return f + (_conv(size, cin, cout, 1)[0] if cin != cout else 0.0)

  for i, cout in enumerate(ch):
    cin = ch[max(i - 1, 0)]
    for j in range(g):
      total += resnet(cin if j == 0 else cout, cout, size)
    if i < len(ch) - 1:
      f, size = _conv(size, cout, cout, 3, stride=2, pad=(0, 1))
      total += f
  c, tokens = ch[-1], size * size
  total += 2 * resnet(c, c, size)
  if vcfg.mid_block_add_attention:
    total += 4 * 2.0 * tokens * c * c + 4.0 * tokens * tokens * c
  total += _conv(size, c, 2 * vcfg.latent_channels, 3)[0]
  if vcfg.use_quant_conv:
    total += _conv(size, 2 * vcfg.latent_channels, 2 * vcfg.latent_channels, 1)[0]
  return total


def analytic_flops(cfg, patch_size: int, batch: int) -> FlopCount:
  """Matmul + convolution FLOPs of one train step (`batch` samples of patch_size²) by
  (component, kind), in closed form from the config. Counts as `hlo_flops` does (2 per
  multiply-add, convolution taps on padding left out) so the two can be compared.

  What runs (train/step.py): VAE encode of HQ and LQ; the text encoder on 4·batch sequences
  (prompt + three answers) of `data.max_length` tokens; CLIP on the prompt (FLUX.1); the
  backbone over T = max_length text + 2·N image tokens (target + conditioning, N = (P/16)²
  with FLUX's four-block autoencoders, (P/8)² with the tiny configs' three blocks):
  embedders and FLUX.2's shared modulations ("other"), double blocks, the CoT adapter (queries,
  MLP and heads on the text rows, keys / values over all T), single blocks, final layer on the
  2·N image rows.

  Backward (the base is frozen; LoRA on single blocks + final layer and the adapter train):
  - nothing before the adapter depends on a trainable weight: encoders, embedders and double
    blocks run forward only;
  - frozen matmuls behind a trainable one (single blocks, final layer) need the input
    gradient only: backward = 1× forward; attention needs dQ, dK, dV: 2× forward;
  - trainable matmuls (adapter, LoRA factors) need weight and input gradients: 2× forward;
    matmuls on the pooled vector (modulations) need the weight gradient only (vec is frozen).
  Remat (`model.remat_policy`, per part `model.remat.<part>`): the backward pass recomputes
  each block's forward ops whose outputs it needs and the policy did not save — "full" skips
  FLUX.2's single-block linear2 (its output only feeds a residual with a frozen gate), "dots"
  recomputes only the attention matmuls, the save_* / offload_* policies everything but the
  attention output's PV. Double blocks have no backward and so no recomputation.

  This is what the scanned step executes, per (component, kind) to the FLOP (tested against
  compiled and lowered CPU steps). Unrolled (`model.scan_layers=False`) XLA shares part of the
  adapter's recomputation with the forward pass (~2% less in total). With `model.attention` =
  splash / cudnn the attention runs in kernels the HLO walk cannot see, but counts here. The
  VAE and encoders are taken from the config (`model.vae`, ...), which with `model.pretrained`
  describes the upstream architecture the checkpoint holds.
  """
  from cotir_jax.models.spec import ModelSpec
  from cotir_jax.models.text import text_config
  from cotir_jax.modules import CLIP_LENGTH
  s = ModelSpec.from_config(cfg.model)
  n_img = 2 * (patch_size // 2 ** len(cfg.model.vae.block_out_channels)) ** 2  # 16 px per token
  n_txt = int(cfg.data.max_length)
  rows = n_txt + n_img
  h, r = s.hidden_size, s.lora.rank if s.lora else None
  flops = collections.Counter()

  def add(component, ops, times=1, remat_policy="none"):
    flops[(component, "forward")] += times * sum(op.fwd for op in ops)
    flops[(component, "backward")] += times * sum(op.bwd for op in ops)
    flops[(component, "remat")] += times * _remat(ops, remat_policy)

  m = cfg.model
  flops[("vae", "forward")] += 2 * _vae_encode(m.vae, patch_size)
  flops[("text_encoder", "forward")] += 4 * _text_encoder(text_config(m.text_encoder), n_txt)
  if "clip" in m:
    flops[("clip", "forward")] += _text_encoder(text_config(m.clip), CLIP_LENGTH)

  embed = (_dense("img_in", n_img, s.in_channels, h) + _dense("txt_in", n_txt, s.context_in_dim, h)
           + _dense("time_in", 1, 256, h) + _dense("time_out", 1, h, h))
  if s.guidance_embed:
    embed += _dense("guidance_in", 1, 256, h) + _dense("guidance_out", 1, h, h)
  if s.family == "flux1":
    embed += _dense("vector_in", 1, s.vec_in_dim, h) + _dense("vector_out", 1, h, h)
  else:
    embed += _dense("mod_img", 1, h, 6 * h) + _dense("mod_txt", 1, h, 6 * h)
    embed += _dense("mod_single", 1, h, 3 * h)
  add("other", embed)
  add("double_blocks", _double_block(s, n_txt, n_img), s.depth)

  add("cot_adapter", _adapter_block(s, n_txt, rows), s.adapter_depth,
      s.remat_for("cot_adapter"))
  out = s.adapter_out_channels
  train = dict(weight_grad=True, input_grad=True)
  heads = (_dense("degradation", n_txt, h, h, **train) + _dense("sharpness", n_txt, h, h, **train)
           + _dense("planning", n_txt, 2 * h, h, **train))
  for _ in range(3):
    heads += _dense("adaLN", 1, h, 2 * h, weight_grad=True) + _dense("linear", n_txt, h, out,
                                                                      **train)
  add("cot_adapter", heads)

  add("single_blocks", _single_block(s, rows), s.depth_single_blocks,
      s.remat_for("single_blocks"))
  add("final_layer", _dense("adaLN", 1, h, 2 * h, lora_rank=r)
      + _dense("linear", n_img, h, s.out_channels, input_grad=True, lora_rank=r))
  scaled = {k: batch * v for k, v in flops.items() if v}
  return FlopCount(flops=scaled, devices=1)


