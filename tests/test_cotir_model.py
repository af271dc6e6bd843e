"""CoTIR = backbone + CoT adapter + LoRA: full-size shapes, adapter parity, LoRA behaviour, compat."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jax
import jax.numpy as jnp
from flax import nnx

from cotir_jax import config, models
from cotir_jax.convert.core import check_coverage, flat_params
from cotir_jax.convert.flux import transformer_rules
from cotir_jax.models.layers import Dense, rope_angles, timestep_embedding
from parity import cotir_inputs, diffusers_meta

pytestmark = pytest.mark.usefixtures("highest_precision")  # float32 parity

# Full-size parameter counts (transformer, adapter, LoRA in upstream's layout with B's bias):
# the transformer's from diffusers on torch's meta device, the others from upstream's shapes.
COUNTS = {
    "cotir_4b": (3_875_544_576, 1_014_752_259, 90_286_208),
    "cotir_9b": (9_078_581_248, 1_829_062_147, 144_134_272),
    "cotir_12b": (11_901_408_320, 981_711_363, 204_095_552),
}


def _count(state):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_full_size_counts_and_table_coverage(name):
  cfg = config.load(f"configs/{name}.py")
  model = nnx.eval_shape(lambda: models.CoTIR(cfg.model, rngs=nnx.Rngs(0)))
  backbone, adapter, lora = COUNTS[name]
  assert _count(nnx.state(model.backbone, nnx.Not(nnx.LoRAParam))) == backbone
  assert _count(nnx.state(model.cot_adapter)) == adapter
  assert _count(nnx.state(model, nnx.LoRAParam)) == lora
  assert _count(nnx.state(model, models.TRAINABLE)) == adapter + lora

  reference = diffusers_meta(cfg)
  ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  assert sum(int(np.prod(s)) for s in ref_shapes.values()) == backbone
  targets = {k: v for k, v in flat_params(nnx.state(model.backbone, nnx.Not(nnx.LoRAParam))).items()}
  check_coverage(transformer_rules(model.backbone.spec), targets, ref_shapes, source=name)


def _forward(model, x, part=None):
  """Runs the model (or `model.backbone`) under jax.jit: eager op-by-op dispatch is slow."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, x):
    m = nnx.merge(graphdef, state)
    return (m.backbone if part == "backbone" else m)(**x)

  return run(state, x)


def _tiny(name="tiny", **overrides):
  cfg = config.load(f"configs/{name}.py", [f"{k}={v}" for k, v in overrides.items()])
  return cfg, models.CoTIR(cfg.model, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["tiny", "tiny_kontext"])
def test_zero_scales_leave_backbone_unchanged_and_head_shapes(name):
  cfg, model = _tiny(name)
  x = cotir_inputs(cfg)
  velocity, scene, degradation, plan = _forward(model, x)
  np.testing.assert_array_equal(np.asarray(velocity), np.asarray(_forward(model, x, "backbone")))
  for head in (scene, degradation, plan):
    assert head.shape == (2, 11, cfg.model.cot_adapter.out_channels)
    assert head.dtype == jnp.float32
  assert velocity.shape == (2, 24, cfg.model.in_channels)


def test_gradients_reach_the_scales():
  cfg, model = _tiny()
  x = cotir_inputs(cfg)
  graphdef, trainable, rest = nnx.split(model, models.TRAINABLE, ...)

  def loss(tr):
    v, s, d, p = nnx.merge(graphdef, tr, rest)(**x)
    return jnp.mean(v ** 2) + jnp.mean(s ** 2) + jnp.mean(d ** 2) + jnp.mean(p ** 2)

  grads = jax.jit(jax.grad(loss))(trainable)
  for k in ("scale_degradation", "scale_sharpness", "scale_planning"):
    assert float(jnp.abs(grads["cot_adapter"][k][...]).max()) > 0


def _strip_lora(model):
  for _, module in nnx.iter_graph(model):
    if isinstance(module, Dense):
      module.lora = None
  return model


@pytest.mark.parametrize("name", ["tiny", "tiny_kontext"])
def test_zero_init_lora_leaves_output_unchanged(name):
  cfg, model = _tiny(name)
  x = cotir_inputs(cfg)
  with_lora = np.asarray(_forward(model, x, "backbone"))
  np.testing.assert_array_equal(with_lora, np.asarray(_forward(_strip_lora(model), x, "backbone")))


@pytest.mark.parametrize("name", ["tiny", "tiny_kontext"])
def test_merged_equals_unmerged(name):
  cfg, model = _tiny(name, **{"model.lora.init": "upstream"})
  x = cotir_inputs(cfg)
  unmerged = np.asarray(_forward(model, x, "backbone"))
  without = np.asarray(_forward(_strip_lora(_tiny(name, **{"model.lora.init": "upstream"})[1]), x,
                                "backbone"))
  merged = np.asarray(_forward(models.merge_lora(model), x, "backbone"))
  assert not any(isinstance(m, Dense) and m.lora is not None for _, m in nnx.iter_graph(model))
  assert np.abs(merged - unmerged).max() <= 1e-5 * np.abs(unmerged).max()
  assert np.abs(unmerged - without).max() > 1e-3  # upstream init really perturbs the base


@pytest.mark.parametrize("use_bias", [True, False])  # FLUX.1's layers have biases, FLUX.2's not
def test_upstream_merge_rounds_as_upstream(use_bias):
  """merge_lora(upstream=True) = upstream's `_merge_lora_into_base` on bf16 weights, bitwise:
  the float32 update s·B A is rounded to bf16 before it is added; a missing bias starts at
  zero. A and B are multiples of 1/64, so their float32 product is exact in both frameworks
  whatever the summation order. The default rounds W + s·A B once."""
  from cotir_jax.models.spec import LoRASpec
  rng = np.random.default_rng(0)
  a, b = rng.integers(-64, 65, (16, 4)) / 64, rng.integers(-64, 65, (4, 24)) / 64
  b_bias = rng.standard_normal(24)

  def layer():
    d = Dense(16, 24, use_bias=use_bias, axes=(None, None), dtype=jnp.bfloat16,
              param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0),
              lora=LoRASpec(rank=4, scale=0.5, init="upstream"))
    for var, value in ((d.lora.a, a), (d.lora.b, b), (d.lora.b_bias, b_bias)):
      var[...] = jnp.asarray(value, jnp.bfloat16)
    return d

  base, bf16 = layer(), torch.bfloat16
  w = _t(base.kernel[...]).to(bf16).T.clone()  # torch's Linear layout, [out, in]
  bias = _t(base.bias[...]).to(bf16) if use_bias else torch.zeros(24, dtype=bf16)
  lora_a, lora_b, lora_bias = _t(a.T).to(bf16), _t(b.T).to(bf16), _t(b_bias).to(bf16)
  w.add_((torch.matmul(lora_b.to(torch.float32), lora_a.to(torch.float32)) * 0.5).to(w.dtype))
  bias.add_((lora_bias.to(torch.float32) * 0.5).to(bias.dtype))
  upstream = models.merge_lora(layer(), upstream=True)
  np.testing.assert_array_equal(np.asarray(upstream.kernel[...], np.float32), w.T.float().numpy())
  np.testing.assert_array_equal(np.asarray(upstream.bias[...], np.float32), bias.float().numpy())

  once = np.asarray(models.merge_lora(layer()).kernel[...])
  w0 = np.asarray(base.kernel[...], np.float32)
  np.testing.assert_array_equal(once, (w0 + np.float32(0.5) * (np.float32(a) @ np.float32(b)))
                                .astype(jnp.bfloat16))
  assert (once.astype(np.float32) != w.T.float().numpy()).any()


def test_lora_targets_and_ranks():
  cfg = config.load("configs/cotir_12b.py")
  model = nnx.eval_shape(lambda: models.CoTIR(cfg.model, rngs=nnx.Rngs(0)))
  paths = {k for k in flat_params(nnx.state(model, nnx.LoRAParam))}
  prefixes = {p.rsplit(".", 2)[0] for p in paths}
  assert prefixes == {"backbone.single_blocks.linear1", "backbone.single_blocks.linear2",
                      "backbone.single_blocks.modulation.lin", "backbone.final_layer.linear",
                      "backbone.final_layer.adaLN_modulation"}
  assert model.backbone.final_layer.linear.lora.rank == 64  # upstream clamps: min(96, 3072, 64)


def test_trainable_filter_is_lora_plus_adapter():
  cfg, model = _tiny()
  trainable = flat_params(nnx.state(model, models.TRAINABLE))
  lora = flat_params(nnx.state(model, nnx.LoRAParam))
  adapter = flat_params(nnx.state(model.cot_adapter))
  assert set(trainable) == set(lora) | {f"cot_adapter.{k}" for k in adapter}


# --- the CoT adapter against an independent PyTorch implementation of upstream's -----------------

def _t(x):
  return torch.from_numpy(np.array(x, np.float32))


def _torch_linear(x, dense):
  y = x @ _t(dense.kernel[...])
  return y + _t(dense.bias[...]) if dense.bias is not None else y


def _torch_rope(x, ang):  # x [B, H, L, D], interleaved pairs
  cos, sin = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
  x0, x1 = x[..., 0::2], x[..., 1::2]
  return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], -1).flatten(-2)


def _torch_rms(x, scale):
  return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * _t(scale[...])


def _torch_last(x, vec, last):
  shift, scale = _torch_linear(F.silu(vec), last.adaLN_modulation).chunk(2, -1)
  return _torch_linear((1 + scale[:, None]) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift[:, None],
                       last.linear)


def _torch_adapter(adapter, txt, img, vec, ang, heads):
  x = txt
  n_blocks = adapter.decoder.linear1.kernel.shape[0]
  for i in range(n_blocks):
    blk = jax.tree.map(lambda a: a[i], nnx.state(adapter.decoder))
    lin1, lin2, mod = blk["linear1"], blk["linear2"], blk["modulation"]["lin"]
    h = x.shape[-1]
    sh, sc, g = (F.silu(vec) @ _t(mod["kernel"][...]) + _t(mod["bias"][...])).chunk(3, -1)
    z = torch.cat([x, img], 1)
    z = (1 + sc[:, None]) * F.layer_norm(z, z.shape[-1:], eps=1e-6) + sh[:, None]
    parts = lambda x, layout, axis: _t(layout.to_parts(np.asarray(x), axis, np))  # BFL order
    qkv_m = (z @ parts(lin1["kernel"][...], adapter.spec.adapter_linear1_layout, -1)
             + parts(lin1["bias"][...], adapter.spec.adapter_linear1_layout, -1))
    qkv, m = qkv_m[..., :3 * h], qkv_m[..., 3 * h:]
    b, l = qkv.shape[:2]
    q, k, v = qkv.reshape(b, l, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q = _torch_rms(q, blk["norm"]["query_norm"]["scale"])
    k = _torch_rms(k, blk["norm"]["key_norm"]["scale"])
    q, k = _torch_rope(q, ang), _torch_rope(k, ang)
    a = F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3).reshape(b, l, -1)
    n = x.shape[1]
    out = torch.cat([a[:, :n], F.gelu(m[:, :n], approximate="tanh")], -1)
    x = x + g[:, None] * (out @ parts(lin2["kernel"][...], adapter.spec.adapter_linear2_layout, -2)
                          + _t(lin2["bias"][...]))
  deg = _torch_linear(x, adapter.degradation_layer)
  sharp = _torch_linear(x, adapter.sharpness_layer)
  plan = _torch_linear(torch.cat([deg, sharp], -1), adapter.planning_layer)
  gelu = lambda y: F.gelu(y, approximate="tanh")
  residual = (deg * _t(adapter.scale_degradation[...]) + sharp * _t(adapter.scale_sharpness[...])
              + plan * _t(adapter.scale_planning[...]))
  return (residual, _torch_last(gelu(sharp), vec, adapter.final_sharpness_layer),
          _torch_last(gelu(deg), vec, adapter.final_degradation_layer),
          _torch_last(gelu(plan), vec, adapter.final_planning_layer))


def test_adapter_matches_torch_reference_float32():
  cfg, model = _tiny()
  adapter = model.cot_adapter
  for s in ("scale_degradation", "scale_sharpness", "scale_planning"):
    getattr(adapter, s)[...] = jnp.asarray([0.37], jnp.float32)
  rng = np.random.default_rng(3)
  b, l_txt, n_img, hdim = 2, 11, 24, cfg.model.hidden_size
  txt, img = rng.standard_normal((b, l_txt, hdim)), rng.standard_normal((b, n_img, hdim))
  vec = rng.standard_normal((b, hdim))
  ids = np.zeros((b, l_txt + n_img, 4), np.float32)
  ids[:, :l_txt, 3] = np.arange(l_txt)
  ids[:, l_txt:, 1] = np.arange(n_img) % 4
  ids[:, l_txt:, 2] = np.arange(n_img) // 4
  ids[:, l_txt + n_img // 2:, 0] = 10
  ang = rope_angles(jnp.asarray(ids), cfg.model.axes_dim, cfg.model.theta)
  rope = (jnp.cos(ang), jnp.sin(ang))
  ours = adapter(jnp.asarray(txt, jnp.float32), jnp.asarray(img, jnp.float32),
                 jnp.asarray(vec, jnp.float32), rope)
  with torch.no_grad():
    ref = _torch_adapter(adapter, _t(txt), _t(img), _t(vec), _t(ang), cfg.model.num_heads)
  for o, r in zip(ours, ref):
    r = r.numpy()
    assert np.abs(np.asarray(o) - r).max() <= 2e-5 * np.abs(r).max()


# --- compat="upstream" precision quirks --------------------------------------------------------

def test_upstream_rope_positions_quantise_like_bfloat16():
  ids = np.zeros((1, 512, 4), np.float32)
  ids[0, :, 3] = np.arange(512)
  exact = rope_angles(jnp.asarray(ids), (32, 32, 32, 32), 2000.0)
  quirky = rope_angles(jnp.asarray(ids), (32, 32, 32, 32), 2000.0, upstream=True)
  # the slowest text-axis frequency is 1, so its angle is the (bf16-rounded) position itself
  assert len(np.unique(np.asarray(quirky[0, :, 48], np.float32))) == 385
  assert len(np.unique(np.asarray(exact[0, :, 48]))) == 512


def test_upstream_timestep_rounds_in_bfloat16():
  t = jnp.asarray([0.55], jnp.float32)
  quirky = timestep_embedding(t, 256, upstream=True)
  expect = timestep_embedding(jnp.asarray([0.552], jnp.float32), 256)  # bf16(1000·bf16(0.55)) = 552
  np.testing.assert_allclose(np.asarray(quirky), np.asarray(expect.astype(jnp.bfloat16), np.float32),
                             atol=1e-2)
  assert float(jnp.abs(quirky - timestep_embedding(t, 256)).max()) > 1e-2


def test_compat_upstream_trainables_are_bfloat16():
  cfg, model = _tiny(compat="upstream")
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, models.TRAINABLE))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  v, *_ = _forward(model, cotir_inputs(cfg))
  assert np.isfinite(np.asarray(v)).all()
