"""Text encoders against transformers: float32/bfloat16 parity of random models saved with
`save_pretrained` and loaded by `load_text_encoder`, through the XLA attention and the splash
kernel (Pallas interpret mode on CPU), full-size parameter counts on torch's meta device,
rule-table coverage, and config errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from cotir_jax.convert import text as conv
from cotir_jax.convert.core import ConversionError, check_coverage, flat_params
from cotir_jax.models import text as T
from cotir_jax.models.attention import AttentionSpec

pytestmark = pytest.mark.usefixtures("highest_precision")  # float32 parity

FP32_TOL = 2e-5
# bfloat16: weights rounded to bf16 (already ~2% of the output scale for these random models),
# activations in bf16 (8-bit mantissa). transformers' own bf16 run is ~3% away from float32, and
# ours rounds at other places (float32 RoPE / position bias / softmax), so two bounds:
# |ours − ref| / max|ref| ≤ 5e-2 against both transformers' bf16 run and the float32 run, and
# our distance to float32 at most 1.5× transformers' bf16 distance to float32 (+ 0.5%).
BF16_TOL = 5e-2


def check_bf16(ours, ref_bf16, ref_fp32):
  hf_err = rel_err(ref_bf16, ref_fp32)
  assert rel_err(ours, ref_bf16) <= BF16_TOL
  assert rel_err(ours, ref_fp32) <= min(BF16_TOL, 1.5 * hf_err + 5e-3)


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


# the splash kernel's own code in the Pallas interpreter; its 128-token tiles pad every length
SPLASH = AttentionSpec("splash", block_q=128, block_kv=128, interpret=True)
# An interpreted kernel is a large CPU program: skipping LLVM's optimisations halves its compile.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def apply(model, *args, **kw):
  """One jitted forward (eager op-by-op dispatch is much slower to run on CPU)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a, **kw))
  return fn.lower(state, *args).compile(FAST_COMPILE)(state, *args)


def uses_pallas(model, *args, **kw) -> bool:
  """Whether the traced forward calls a Pallas kernel (splash), not the XLA attention."""
  graphdef, state = nnx.split(model)
  return "pallas_call" in str(jax.make_jaxpr(
      lambda st, *a: nnx.merge(graphdef, st)(*a, **kw))(state, *args))


def perturb(model):
  """Random norms and biases too (transformers initialises norms to 1, biases to 0)."""
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
  return model.eval()


def _ids(shape, vocab, seed):
  return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- Qwen3

QWEN = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=1e6,
            rms_norm_eps=1e-6)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  """Qwen3Model (5 layers) saved in 14 shards, and the same weights as Qwen3ForCausalLM."""
  torch.manual_seed(0)
  cfg = transformers.Qwen3Config(**QWEN, tie_word_embeddings=False)
  lm = perturb(transformers.Qwen3ForCausalLM(cfg))
  base = tmp_path_factory.mktemp("qwen")
  lm.model.save_pretrained(base / "model", max_shard_size="20KB")
  lm.save_pretrained(base / "causal_lm")
  ids = _ids((2, 12), 128, 1)
  mask = torch.ones(2, 12, dtype=torch.long)
  mask[1, 7:] = 0                                     # right padding on row 1
  with torch.no_grad():
    hs = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
  return dict(base=base, lm=lm, ids=ids, mask=mask, hs=[h.numpy() for h in hs])


def _run(model, ids, mask=None, **kw):
  args = (jnp.asarray(ids.numpy(), jnp.int32),)
  if mask is not None:
    args += (jnp.asarray(mask.numpy(), jnp.int32),)
  return np.asarray(apply(model, *args, **kw), np.float32)


def test_qwen3_fp32_parity_sharded(qwen):
  assert len(list((qwen["base"] / "model").glob("*.safetensors"))) > 1
  model = conv.load_text_encoder(str(qwen["base"] / "model"), hidden_layers=(1, 2, 3))
  assert model.cfg.num_layers_built == 3              # layers 4, 5 and the final norm unread
  assert flat_params(model)["layers.self_attn.q_proj.kernel"].shape == (3, 32, 32)
  out = _run(model, qwen["ids"], qwen["mask"])
  ref = np.concatenate([qwen["hs"][k] for k in (1, 2, 3)], axis=-1)
  assert out.shape == (2, 12, 96)
  assert rel_err(out, ref) <= FP32_TOL


def test_qwen3_causal_lm_checkpoint_and_layer_choice(qwen):
  """`model.`-prefixed keys + lm_head; any order of indices, 0 = embeddings; unrolled == scanned."""
  path = str(qwen["base"] / "causal_lm")
  model = conv.load_text_encoder(path, hidden_layers=(4, 0, 2))
  ref = np.concatenate([qwen["hs"][k] for k in (4, 0, 2)], axis=-1)
  out = _run(model, qwen["ids"], qwen["mask"])
  assert rel_err(out, ref) <= FP32_TOL
  unrolled = conv.load_text_encoder(path, hidden_layers=(4, 0, 2), scan=False)
  np.testing.assert_allclose(_run(unrolled, qwen["ids"], qwen["mask"]), out, rtol=0, atol=1e-6)


def test_qwen3_splash_fp32(qwen):
  """Causal + right padding (row 1 from position 7) + grouped queries (4 over 2) through the
  splash kernel: all queries segment 1, real keys 1, padded keys 0 is transformers' mask,
  padded query rows included; the 12 tokens are padded to 128 and sliced back."""
  model = conv.load_text_encoder(str(qwen["base"] / "model"), hidden_layers=(1, 2, 3),
                                 implementation=SPLASH)
  ids, mask = (jnp.asarray(x.numpy(), jnp.int32) for x in (qwen["ids"], qwen["mask"]))
  assert uses_pallas(model, ids, mask)
  ref = np.concatenate([qwen["hs"][k] for k in (1, 2, 3)], axis=-1)
  assert rel_err(_run(model, qwen["ids"], qwen["mask"]), ref) <= FP32_TOL


@pytest.mark.parametrize("implementation", ["xla", SPLASH], ids=["xla", "splash"])
def test_qwen3_bf16(qwen, tmp_path, implementation):
  lm = transformers.Qwen3ForCausalLM(qwen["lm"].config)
  lm.load_state_dict(qwen["lm"].state_dict())
  lm = lm.to(torch.bfloat16).eval()
  lm.save_pretrained(tmp_path)
  with torch.no_grad():
    hs = lm.model(input_ids=qwen["ids"], attention_mask=qwen["mask"],
                  output_hidden_states=True).hidden_states
  ref_bf16 = torch.cat([hs[k] for k in (1, 2, 3)], -1).float().numpy()
  ref_fp32 = np.concatenate([qwen["hs"][k] for k in (1, 2, 3)], axis=-1)
  model = conv.load_text_encoder(str(tmp_path), hidden_layers=(1, 2, 3),
                                 implementation=implementation)
  assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16
  out = apply(model, jnp.asarray(qwen["ids"].numpy()), jnp.asarray(qwen["mask"].numpy()))
  assert out.dtype == jnp.bfloat16
  check_bf16(out, ref_bf16, ref_fp32)


# ---------------------------------------------------------------- T5

T5 = dict(vocab_size=128, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=3,
          feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
          relative_attention_max_distance=20)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
  torch.manual_seed(0)
  model = perturb(transformers.T5EncoderModel(transformers.T5Config(**T5)))
  path = tmp_path_factory.mktemp("t5")
  model.save_pretrained(path, max_shard_size="20KB")
  return dict(path=str(path), model=model, ids=_ids((2, 40), 128, 2))  # 40 > max_distance


def test_t5_fp32_parity(t5):
  model = conv.load_text_encoder(t5["path"])
  with torch.no_grad():
    ref = t5["model"](input_ids=t5["ids"]).last_hidden_state.numpy()
  out = _run(model, t5["ids"])                         # no mask: pads attended, as upstream
  assert rel_err(out, ref) <= FP32_TOL
  mask = torch.ones(2, 40, dtype=torch.long)
  mask[0, 25:] = 0
  with torch.no_grad():
    ref_m = t5["model"](input_ids=t5["ids"], attention_mask=mask).last_hidden_state.numpy()
  assert rel_err(_run(model, t5["ids"], mask), ref_m) <= FP32_TOL


def test_t5_asked_for_splash_runs_xla(t5):
  """Splash has no additive bias: T5's relative positions keep it on the XLA attention."""
  model = conv.load_text_encoder(t5["path"], implementation=SPLASH)
  assert not uses_pallas(model, jnp.asarray(t5["ids"].numpy()))
  with torch.no_grad():
    ref = t5["model"](input_ids=t5["ids"]).last_hidden_state.numpy()
  assert rel_err(_run(model, t5["ids"]), ref) <= FP32_TOL


def test_t5_bf16_and_embed_tokens_only(t5, tmp_path):
  """bf16 run; and a checkpoint holding only `encoder.embed_tokens.weight` (older layout)."""
  sd = {k: v.to(torch.bfloat16) for k, v in t5["model"].state_dict().items()}
  from safetensors.torch import save_file
  sd["encoder.embed_tokens.weight"] = sd.pop("shared.weight").clone()
  save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(t5["model"].config.to_dict()))
  model = conv.load_text_encoder(str(tmp_path))
  bf = t5["model"].to(torch.bfloat16)
  try:
    with torch.no_grad():
      ref_bf16 = bf(input_ids=t5["ids"]).last_hidden_state.float().numpy()
  finally:
    t5["model"].float()
  with torch.no_grad():
    ref_fp32 = t5["model"](input_ids=t5["ids"]).last_hidden_state.numpy()
  out = apply(model, jnp.asarray(t5["ids"].numpy()))
  assert out.dtype == jnp.bfloat16
  check_bf16(out, ref_bf16, ref_fp32)


# ---------------------------------------------------------------- CLIP

CLIP = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0)


@pytest.mark.parametrize("eos", [2, 5])               # 2: legacy argmax rule; 5: first eos id
def test_clip_fp32_parity(eos, tmp_path):
  torch.manual_seed(0)
  model = perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP, eos_token_id=eos)))
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  ids = _ids((2, 16), 100, 3) + 10
  eos_id = 127 if eos == 2 else eos
  ids[0, 5] = ids[1, 9] = ids[1, 12] = eos_id           # pooled at position 5 and 9
  with torch.no_grad():
    ref = model(input_ids=ids)
  ours = conv.load_text_encoder(str(tmp_path))
  pooled, hidden = apply(ours, jnp.asarray(ids.numpy()), return_hidden=True)
  assert rel_err(pooled, ref.pooler_output.numpy()) <= FP32_TOL
  assert rel_err(hidden, ref.last_hidden_state.numpy()) <= FP32_TOL
  np.testing.assert_array_equal(ours.pool_positions(jnp.asarray(ids.numpy())), [5, 9])


def test_clip_length_77_splash_and_xla(tmp_path):
  """CLIP's own 77 tokens, causal only (upstream passes no mask), through the splash kernel
  (padded to 128: keys 77..127 are segment 0) and the XLA attention."""
  torch.manual_seed(0)
  cfg = transformers.CLIPTextConfig(**{**CLIP, "max_position_embeddings": 77}, eos_token_id=2)
  model = perturb(transformers.CLIPTextModel(cfg))
  model.save_pretrained(tmp_path)
  ids = _ids((2, 77), 100, 5) + 10
  ids[0, 20] = ids[1, 76] = 127                           # pooled at 20 and at the last token
  with torch.no_grad():
    ref = model(input_ids=ids)
  for implementation in ("xla", SPLASH):
    ours = conv.load_text_encoder(str(tmp_path), implementation=implementation)
    assert uses_pallas(ours, jnp.asarray(ids.numpy())) == (implementation is SPLASH)
    pooled, hidden = apply(ours, jnp.asarray(ids.numpy()), return_hidden=True)
    assert rel_err(pooled, ref.pooler_output.numpy()) <= FP32_TOL
    assert rel_err(hidden, ref.last_hidden_state.numpy()) <= FP32_TOL


def test_clip_bf16_text_model_prefix(tmp_path):
  """bf16 weights stored under the pre-v5 `text_model.` prefix, with the position_ids buffer."""
  torch.manual_seed(0)
  model = perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP, eos_token_id=2)))
  sd = {f"text_model.{k}": v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
  sd["text_model.embeddings.position_ids"] = torch.arange(16)[None]
  from safetensors.torch import save_file
  save_file(sd, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
  ids = _ids((2, 16), 100, 4)
  ids[:, 7] = 127
  with torch.no_grad():
    ref_fp32 = model(input_ids=ids).pooler_output.numpy()
    ref_bf16 = model.to(torch.bfloat16)(input_ids=ids).pooler_output.float().numpy()
  ours = conv.load_text_encoder(str(tmp_path))
  out = apply(ours, jnp.asarray(ids.numpy()))
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 32)
  check_bf16(out, ref_bf16, ref_fp32)
  f32 = conv.load_text_encoder(str(tmp_path), dtype=jnp.float32)  # bf16 file → float32 params
  assert f32.token_embedding.embedding[...].dtype == jnp.float32


# ---------------------------------------------------------------- full-size shapes

def _count(tree) -> int:
  return sum(int(np.prod(v.shape)) for v in flat_params(tree).values())


def _abstract(cfg):
  return nnx.eval_shape(lambda: T.build_text_encoder(cfg, dtype=jnp.bfloat16,
                                                      param_dtype=jnp.bfloat16,
                                                      rngs=nnx.Rngs(0)))


def _meta(cls, cfg):
  with torch.device("meta"):
    return cls(cfg)


def _shapes(model) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


QWEN_FULL = {
    # (size, hidden, intermediate, tied lm_head): parameters of layers 1..27 + embeddings, i.e. Qwen3Model
    # with num_hidden_layers=27 minus its final norm (the only thing we drop below layer 27)
    # (full Qwen3-4B: 4,022,468,096 with 36 layers and the final norm)
    "4b": (2560, 9728, True, 3_114_088_192),
    "8b": (4096, 12288, False, 5_831_883_520),
}


@pytest.mark.parametrize("size", ["4b", "8b"])
def test_qwen3_full_size(size):
  hidden, inter, tied, expected = QWEN_FULL[size]
  ours = _abstract(T.qwen3_config(size))
  hf = dict(vocab_size=151936, hidden_size=hidden, intermediate_size=inter,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
            rms_norm_eps=1e-6, tie_word_embeddings=tied, max_position_embeddings=40960)
  kept = _meta(transformers.Qwen3Model, transformers.Qwen3Config(**hf, num_hidden_layers=27))
  ref = sum(p.numel() for p in kept.parameters()) - kept.norm.weight.numel()
  assert _count(ours) == ref == expected
  # coverage against the full 36-layer checkpoint layout (Qwen3ForCausalLM, tied lm_head)
  full = _meta(transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**hf, num_hidden_layers=36))
  shapes = _shapes(full)
  rules, ignore = conv.rules_for(T.qwen3_config(size), list(shapes))
  check_coverage(rules, flat_params(ours), shapes, source=f"qwen3-{size}", ignore=ignore)


def test_t5_xxl_full_size():
  ours = _abstract(T.t5_config("xxl"))
  cfg = transformers.T5Config(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240,
                              num_layers=24, feed_forward_proj="gated-gelu")
  ref = _meta(transformers.T5EncoderModel, cfg)
  assert _count(ours) == sum(p.numel() for p in ref.parameters()) == 4_762_310_656
  shapes = _shapes(ref)                                 # holds both copies of the tied table
  rules, ignore = conv.rules_for(T.t5_config("xxl"), list(shapes))
  check_coverage(rules, flat_params(ours), shapes, source="t5-xxl", ignore=ignore)


def test_clip_l_full_size():
  ours = _abstract(T.clip_config("l"))
  cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                    num_hidden_layers=12, num_attention_heads=12,
                                    max_position_embeddings=77, hidden_act="quick_gelu")
  ref = _meta(transformers.CLIPTextModel, cfg)
  assert _count(ours) == sum(p.numel() for p in ref.parameters()) == 123_060_480
  shapes = _shapes(ref)
  rules, ignore = conv.rules_for(T.clip_config("l"), list(shapes))
  check_coverage(rules, flat_params(ours), shapes, source="clip-l", ignore=ignore)


def test_logical_axes():
  model = _abstract(T.qwen3_config("tiny"))
  axes = {".".join(map(str, p)): v.get_metadata().get("out_sharding")
          for p, v in nnx.to_flat_state(nnx.state(model))}
  assert axes["embed_tokens.embedding"] == ("vocab", "embed")
  assert axes["layers.self_attn.q_proj.kernel"] == ("layers", "embed", "heads")
  assert axes["layers.self_attn.k_proj.kernel"] == ("layers", "embed", "kv")
  assert axes["layers.mlp.down_proj.kernel"] == ("layers", "mlp", "embed")
  t5 = _abstract(T.t5_config("tiny"))
  assert t5.blocks.ff.wi_0.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")


# ---------------------------------------------------------------- tiny configs, errors

def test_tiny_configs_forward():
  """Tiny configs build from dataclasses or mappings; output shapes (abstractly, no compile)."""
  ids = jax.ShapeDtypeStruct((2, 8), jnp.int32)

  def out(cfg, **kw):
    model = _abstract(cfg) if not kw else nnx.eval_shape(
        lambda: T.build_text_encoder(cfg, rngs=nnx.Rngs(0), **kw))
    graphdef, state = nnx.split(model)
    return jax.eval_shape(lambda st, i: nnx.merge(graphdef, st)(i), state, ids)

  assert T.qwen3_config("tiny").feature_dim == 96
  q = out(T.qwen3_config("tiny"), dtype=jnp.float32, param_dtype=jnp.float32)
  assert q.shape == (2, 8, 96) and q.dtype == jnp.float32
  t5 = out({"model_type": "t5", "d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64,
            "num_layers": 2, "vocab_size": 1024})
  assert t5.shape == (2, 8, 32) and t5.dtype == jnp.bfloat16
  assert out(T.clip_config("tiny")).shape == (2, 32)
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match="hidden_layers"):
    T.qwen3_config("4b", hidden_layers=(9, 40))
  with pytest.raises(ValueError, match="bert"):
    T.build_text_encoder({"model_type": "bert"}, rngs=rngs)


def test_unsupported_model_type(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
  with pytest.raises(ConversionError, match=r"config\.json: model_type 'bert' is not a supported"):
    conv.load_text_encoder(str(tmp_path))
  with pytest.raises(ConversionError, match="config.json"):
    conv.load_text_encoder(str(tmp_path / "nowhere"))


def test_unexpected_key_is_named(qwen, tmp_path):
  from safetensors.torch import save_file
  sd = {k: v.contiguous() for k, v in qwen["lm"].model.state_dict().items()}
  sd["layers.0.self_attn.extra.weight"] = torch.zeros(2)
  save_file(sd, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(qwen["lm"].config.to_dict()))
  with pytest.raises(ConversionError, match="layers.0.self_attn.extra.weight"):
    conv.load_text_encoder(str(tmp_path), hidden_layers=(1, 2))
