"""FLOP counting and utilisation (cotir_jax.perf): the HLO walk against XLA's cost analysis on
loop-free programs (CPU and TPU ahead-of-time), loop trip counts, SPMD modules, attention
kernels, the closed-form count against compiled CoTIR train steps, mfu and hfu, device peaks,
and XLA's TPU cost-model step time."""

import functools
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from cotir_jax import config  # noqa: E402
from cotir_jax.perf import chips, closed_form, cost_model, hlo, utilization  # noqa: E402
from cotir_jax.train.program import Program  # noqa: E402

# CPU compile options that halve XLA's compile time (LLVM at -O0, no fusion emitters); the
# optimized HLO — fusion, DCE, loops — and so every count are the same as with the defaults.
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}

NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, k, strides=(1, 1), padding="SAME", **kw):
  return jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=NHWC, **kw)


def _loop_free_programs(dtype):
  """name → (function, argument shapes): dots and convolutions, forward and gradients."""
  s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  grad = lambda f: jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1))
  return {
      "matmul": (lambda a, b: a @ b, (s(64, 96), s(96, 48))),
      "batched einsum": (lambda a, b: jnp.einsum("bhld,bhsd->bhls", a, b),
                         (s(2, 3, 40, 16), s(2, 3, 24, 16))),
      "conv same": (_conv, (s(2, 12, 10, 8), s(3, 3, 8, 16))),
      "conv grouped": (lambda x, k: _conv(x, k, padding="VALID", feature_group_count=4),
                       (s(2, 9, 9, 8), s(3, 3, 2, 16))),
      "conv dilated": (lambda x, k: _conv(x, k, (2, 1), ((2, 1), (1, 3)), lhs_dilation=(2, 1),
                                          rhs_dilation=(1, 2)), (s(2, 16, 13, 8), s(3, 3, 8, 16))),
      "conv gradients": (grad(lambda x, k: _conv(x, k, (2, 2))), (s(2, 16, 16, 8), s(3, 3, 8, 16))),
      "matmul gradients": (grad(lambda a, b: a @ b), (s(32, 64), s(64, 48))),
  }


def _cost_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_loop_free_programs_match_xla_cost_analysis_on_cpu():
  """Without loops XLA's count is right: ours equals it op for op (float32: no converts)."""
  for name, (fn, args) in _loop_free_programs(jnp.float32).items():
    compiled = jax.jit(fn).lower(*args).compile()
    count = hlo.hlo_flops(compiled)
    assert count.total == _cost_flops(compiled), name
    assert count.unresolved == () and count.devices == 1


@pytest.fixture(scope="module")
def tpu_devices():
  """The 4 chips of a v5e:2x2 topology for ahead-of-time compiles (libtpu, no TPU needed)."""
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc("v5e:2x2", "tpu").devices
  except Exception as e:  # libtpu missing or unusable here
    pytest.skip(f"no libtpu for TPU ahead-of-time compiles: {type(e).__name__}: {e}")


def test_tpu_lowering_dots_to_convolutions_in_fusions(tpu_devices):
  """On TPU, bf16 dots become `convolution`s inside fusions; the counts still equal XLA's."""
  one = jax.sharding.SingleDeviceSharding(tpu_devices[0])
  for name, (fn, args) in _loop_free_programs(jnp.bfloat16).items():
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one) for a in args]
    compiled = jax.jit(fn).lower(*args).compile()
    if name == "matmul":
      text = compiled.as_text()
      assert "convolution(" in text and " dot(" not in text and "kind=kOutput" in text
    assert hlo.hlo_flops(compiled).total == _cost_flops(compiled), name


def _stack(scan: bool, remat: bool):
  """A scanned (or unrolled) stack of matmul + attention-like blocks with remat and a gradient,
  under the named scopes the train step uses."""
  def block(c, w):
    with jax.named_scope("single_blocks"):
      h = jnp.tanh(c @ w[0])
      a = jnp.einsum("bld,bsd->bls", h, h)
      return c + (a @ h) @ w[1], None

  body = jax.checkpoint(block, prevent_cse=not scan) if remat else block

  def loss(w, x):
    with jax.named_scope("text_encoder"):  # forward only
      features = jax.lax.stop_gradient(x @ w[0, 1])
    c = x
    if scan:
      c, _ = jax.lax.scan(body, c, w)
    else:
      for i in range(w.shape[0]):
        c, _ = body(c, w[i])
    return (c.astype(jnp.float32).sum() + features.astype(jnp.float32).sum())

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def test_scanned_loops_count_every_iteration_on_tpu_spmd(tpu_devices):
  """TPU modules carry no `known_trip_count`: the trip count comes from the loop itself.
  4-way batch-parallel SPMD module: counts are per device, × 4 = global."""
  mesh = Mesh(np.asarray(tpu_devices), ("d",))
  w = jax.ShapeDtypeStruct((6, 2, 128, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  x = jax.ShapeDtypeStruct((8, 64, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P("d")))
  scanned = _stack(scan=True, remat=True).lower(w, x).compile()
  unrolled = _stack(scan=False, remat=True).lower(w, x).compile()
  assert "known_trip_count" not in scanned.as_text()
  count, reference = hlo.hlo_flops(scanned), hlo.hlo_flops(unrolled)
  assert count.devices == 4 and count.unresolved == ()
  b, l, d, layers = 8 // 4, 64, 128, 6  # per device
  block = b * (2 * l * d * d + 2 * l * l * d + 2 * l * l * d + 2 * l * d * d)
  assert count.get("single_blocks", "forward") == layers * block
  assert count.get("single_blocks", "backward") == 2 * layers * block
  # remat recomputes what the backward reads: tanh(c·w0) and the scores, not the last matmul
  assert count.get("single_blocks", "remat") == layers * (block - b * 2 * l * d * d)
  assert count.get("text_encoder") == b * 2 * l * d * d
  assert count.global_total == 4 * count.total
  assert count.total == reference.total  # the unrolled program: same work (its loss is used)
  assert _cost_flops(scanned) < 0.3 * count.total  # XLA: one iteration per loop


def test_hand_written_hlo_gpu_gemm_conditional_and_loop_shapes():
  """Parser paths no CPU / TPU compile produces here: cuBLAS GEMM custom calls (GPU), a
  conditional (the costlier branch), loops counting down / by 2, and an unknown trip count."""
  text = """HloModule m, replica_count=2

%small (p: f32[8,16]) -> f32[8,4] {
  %p = f32[8,16]{1,0} parameter(0)
  %w = f32[16,4]{1,0} constant({...})
  ROOT %d = f32[8,4]{1,0} dot(%p, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%big (q: f32[8,16]) -> f32[8,4] {
  %q = f32[8,16]{1,0} parameter(0)
  %v = f32[16,4]{1,0} constant({...})
  %e = f32[8,4]{1,0} dot(%q, %v), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %f = f32[8,4]{1,0} dot(%q, %v), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%down_cond (s: (s32[], f32[8,16])) -> pred[] {
  %s = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %zero = s32[] constant(0)
  ROOT %gt = pred[] compare(%i, %zero), direction=GT
}

%down_body (t: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %t = (s32[], f32[8,16]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%t), index=0
  %two = s32[] constant(2)
  %next = s32[] subtract(%j, %two)
  %x = f32[8,16]{1,0} get-tuple-element(%t), index=1
  %m = f32[16,16]{1,0} constant({...})
  %y = f32[8,16]{1,0} dot(%x, %m), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/transpose(jvp(single_blocks))/dot_general"}
  ROOT %out = (s32[], f32[8,16]{1,0}) tuple(%next, %y)
}

%odd_cond (u: (s32[], f32[8,16])) -> pred[] {
  %u = (s32[], f32[8,16]{1,0}) parameter(0)
  %k = s32[] get-tuple-element(%u), index=0
  %n = s32[] get-tuple-element(%u), index=1
  ROOT %lt = pred[] compare(%k, %n), direction=LT
}

ENTRY %main (a: f32[8,16], b: f32[16,32], c: pred[]) -> f32[8,32] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,32]{1,0} parameter(1)
  %c = pred[] parameter(2)
  %g = (f32[8,32]{1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}, metadata={op_name="jit(f)/jvp(cot_adapter)/dot_general"}
  %br = f32[8,4]{1,0} conditional(%c, %a, %a), true_computation=%small, false_computation=%big
  %seven = s32[] constant(7)
  %init = (s32[], f32[8,16]{1,0}) tuple(%seven, %a)
  %loop = (s32[], f32[8,16]{1,0}) while(%init), condition=%down_cond, body=%down_body
  %unknown = (s32[], f32[8,16]{1,0}) while(%init), condition=%odd_cond, body=%down_body
  %pallas = f32[8,16]{1,0} custom-call(%a), custom_call_target="tpu_custom_call"
  ROOT %r = f32[8,32]{1,0} get-tuple-element(%g), index=0
}
"""
  count = hlo.hlo_flops(text)
  matmul = 2 * 8 * 16 * 16
  assert count.devices == 2
  assert count.flops[("cot_adapter", "forward")] == 2 * 8 * 32 * 16  # the GEMM
  assert count.flops[("other", "forward")] == 2 * (2 * 8 * 4 * 16)  # the costlier branch
  # 7, 5, 3, 1 → 4 iterations; the loop with an unknown bound is counted once
  assert count.flops[("single_blocks", "backward")] == (4 + 1) * matmul
  assert count.unresolved == ("custom call tpu_custom_call ×1",
                              "while unknown (trip count unknown, counted once) ×1")


def test_splash_kernels_counted_from_their_shapes_on_tpu(tpu_devices):
  """Splash attention compiles to Mosaic custom calls the FLOP walk cannot look into: they
  count from q and k's shapes, forward 2 matmuls, dq 3 and dkv 4 (the backward's dP, dQ, dK,
  dV plus the 3 it recomputes), in the scope they run under."""
  from cotir_jax.models.attention import splash_attention
  one = jax.sharding.SingleDeviceSharding(tpu_devices[0])
  b, lq, lk, h, d = 2, 256, 384, 2, 128
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=one)

  def loss(q, k, v):
    with jax.named_scope("single_blocks"):
      out = splash_attention(q, k, v, block_q=128, block_kv=128)
    return out.astype(jnp.float32).sum()

  with jax.default_matmul_precision("default"):  # Mosaic takes bf16 matmuls at default only
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        s(b, lq, h, d), s(b, lk, h, d), s(b, lk, h, d)).compile()
  count = hlo.hlo_flops(compiled)
  unit = 2 * b * h * lq * lk * d
  assert count.unresolved == ()
  assert count.flops == {("single_blocks", "forward"): 2 * unit,
                         ("single_blocks", "backward"): 4 * unit,
                         ("single_blocks", "remat"): 3 * unit}


def test_cudnn_kernels_counted_from_their_shapes():
  """cuDNN flash attention (GPU): forward 2 matmuls, backward 5 (dP, dQ, dK, dV and the
  recomputed scores); the key length is the dim of k its dot dimension numbers leave free."""
  dims = lambda lb, lc, rb, rc: (
      f'{{"lhs_contracting_dimensions":["{lc}"],"rhs_contracting_dimensions":["{rc}"],'
      f'"lhs_batch_dimensions":["{lb[0]}","{lb[1]}"],"rhs_batch_dimensions":["{rb[0]}","{rb[1]}"]}}')
  btnh = dims((0, 2), 3, (0, 2), 3)
  fwd = (f'"bmm1_dot_dimension_numbers":{btnh},'
         f'"bmm2_dot_dimension_numbers":{dims((0, 1), 3, (0, 2), 1)}')
  bwd = (f'"bmm1_grad_gemm1_dot_dimension_numbers":{dims((0, 1), 2, (0, 2), 1)},'
         f'"bmm2_grad_gemm2_dot_dimension_numbers":{btnh}')
  text = f"""HloModule m

ENTRY %main (q: bf16[2,256,4,64], k: bf16[2,384,4,64], v: bf16[2,384,4,64]) -> bf16[2,256,4,64] {{
  %q = bf16[2,256,4,64]{{3,2,1,0}} parameter(0)
  %k = bf16[2,384,4,64]{{3,2,1,0}} parameter(1)
  %v = bf16[2,384,4,64]{{3,2,1,0}} parameter(2)
  %f = (bf16[2,4,256,64]{{3,2,1,0}}, f32[2,4,256]{{2,1,0}}, u8[0]{{0}}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax", backend_config={{"cudnn_fmha_backend_config":{{{fwd},"mask_type":"NO_MASK"}}}}, metadata={{op_name="jit(f)/jvp(cot_adapter)/dot_product_attention"}}
  %o = bf16[2,256,4,64]{{3,2,1,0}} parameter(3)
  %s = f32[2,4,256]{{2,1,0}} get-tuple-element(%f), index=1
  %g = (bf16[2,256,4,64]{{3,2,1,0}}, bf16[2,384,4,64]{{3,2,1,0}}, bf16[2,384,4,64]{{3,2,1,0}}, u8[0]{{0}}) custom-call(%q, %k, %v, %s, %o, /*index=5*/%o), custom_call_target="__cudnn$fmhaSoftmaxBackward", backend_config={{"cudnn_fmha_backend_config":{{{bwd}}}}}, metadata={{op_name="jit(f)/transpose(jvp(cot_adapter))/dot_product_attention"}}
  ROOT %r = bf16[2,256,4,64]{{3,2,1,0}} get-tuple-element(%g), index=0
}}
"""
  unit = 2 * 2 * 4 * 256 * 384 * 64
  count = hlo.hlo_flops(text)
  assert count.unresolved == ()
  assert count.flops == {("cot_adapter", "forward"): 2 * unit,
                         ("cot_adapter", "backward"): 4 * unit, ("cot_adapter", "remat"): unit}


# the tiny FLUX.2 config scaled up a bit, with the full-size recipes' remat policy
SCALED = ["model.hidden_size=128", "model.num_heads=4", "model.depth_single_blocks=3",
          "model.remat_policy=full", "training.patch_sizes=(64,)", "training.batch_sizes=(2,)",
          "training.iterations=(10,)"]


def _lowered_step(overrides, config_file="configs/tiny.py"):
  cfg = config.load(config_file, SCALED + list(overrides))
  prog = Program.build(cfg)
  return cfg, prog.step(0).lower(prog.state, prog.frozen, prog.batch(0))


def test_compiled_train_step_scanned_and_unrolled_match_the_analytic_count():
  """The real train step, compiled on CPU with its loops scanned and unrolled: both HLO walks
  equal the closed-form count (unrolled within 2%); XLA's cost analysis undercounts the
  scanned one. Under remat `full` the step executes more than the model FLOPs: hfu > mfu."""
  cfg, lowered = _lowered_step([])
  analytic = closed_form.analytic_flops(cfg, 64, 2)
  scanned = lowered.compile(compiler_options=FAST_CPU_COMPILE)
  counted = hlo.hlo_flops(scanned)
  assert counted.unresolved == ()
  assert set(counted.flops) == set(analytic.flops)
  for key, value in analytic.flops.items():  # per (component, kind), to the FLOP
    assert counted.flops[key] == pytest.approx(value, rel=1e-9), key
  assert counted.get("single_blocks", "remat") > 0 and counted.get("double_blocks", "remat") == 0
  assert _cost_flops(scanned) < 0.7 * counted.total
  step = utilization.StepFlops.of(cfg, 0, scanned)
  assert step.model.total == pytest.approx(analytic.total - analytic.by_kind()["remat"])
  use = step.utilizations(step_time_s=0.5, peak=1e12)
  assert use["hfu"] / use["mfu"] == pytest.approx(analytic.total / step.model.total, rel=1e-9)
  assert use["hfu"] > 1.1 * use["mfu"]

  _, lowered = _lowered_step(["model.scan_layers=False"])
  unrolled = lowered.compile(compiler_options=FAST_CPU_COMPILE)
  reference = hlo.hlo_flops(unrolled)
  assert _cost_flops(unrolled) == pytest.approx(reference.total, rel=0.1)  # + elementwise
  # unrolled, XLA merges part of the adapter's recomputation with the forward pass
  assert reference.total == pytest.approx(analytic.total, rel=0.02)
  for kind in ("forward", "backward"):
    assert reference.by_kind()[kind] == pytest.approx(counted.by_kind()[kind], rel=1e-9)


def test_hfu_equals_mfu_without_remat():
  """Remat `none`, XLA attention: the compiled step executes exactly the model FLOPs."""
  cfg, lowered = _lowered_step(["model.remat_policy=none"])
  step = utilization.StepFlops.of(cfg, 0, lowered.compile(compiler_options=FAST_CPU_COMPILE))
  assert step.executed.by_kind().get("remat", 0.0) == 0.0
  use = step.utilizations(step_time_s=0.5, peak=1e12)
  assert use["hfu"] == pytest.approx(use["mfu"], rel=1e-9) and use["mfu"] > 0


@pytest.mark.parametrize("overrides,config_file", [
    (["model.remat_policy=dots", "model.remat.cot_adapter=save_attention"], "configs/tiny.py"),
    ([], "configs/tiny_kontext.py"),
])
def test_analytic_count_matches_the_lowered_step(overrides, config_file):
  """Other remat policies (per part) and the FLUX.1 family (T5, CLIP, guidance, per-block
  modulation with LoRA): the closed form equals the walk of the step's HLO before optimization
  (lowering only, no compile)."""
  cfg, lowered = _lowered_step(overrides, config_file)
  counted = hlo.hlo_flops(lowered.as_text(dialect="hlo", debug_info=True))
  analytic = closed_form.analytic_flops(cfg, 64, 2)
  assert set(counted.flops) == set(analytic.flops)
  for key, value in analytic.flops.items():
    assert counted.flops[key] == pytest.approx(value, rel=1e-9), key


def test_full_size_4b_count_per_sample():
  """FLUX.2-klein-4B at 512²: 64.8 TFLOP per sample (the issue's HLO walk: 64.9)."""
  count = closed_form.analytic_flops(config.load("configs/cotir_4b.py"), 512, 4).scaled(1 / 4)
  assert count.total / 1e12 == pytest.approx(64.83, abs=0.01)
  assert count.get("text_encoder") / 1e12 == pytest.approx(11.62, abs=0.01)
  assert count.get("single_blocks", "forward") / 1e12 == pytest.approx(14.63, abs=0.01)


def test_device_peaks_and_utilization():
  assert chips.device_peak_flops("TPU v5 lite") == 197e12
  assert chips.device_peak_flops("TPU v5") == 459e12
  assert chips.device_peak_flops("TPU v6 lite") == 918e12
  assert chips.device_peak_flops("TPU v4") == 275e12
  assert chips.device_peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
  assert chips.device_peak_flops("NVIDIA H100 PCIe") == pytest.approx(756.5e12)
  assert chips.device_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert chips.device_peak_flops(jax.devices("cpu")[0]) is None
  assert chips.device_peak_flops(jax.devices("cpu")[0], override=100.0) == 100e12
  assert utilization.utilization(50e12, 2.0, 100e12) == pytest.approx(0.25)
  assert utilization.utilization(50e12, 2.0, None) is None
  with pytest.raises(ValueError, match="step time"):
    utilization.utilization(1.0, 0.0, 1.0)


def _backbone_grad(cfg, devices):
  """The step's backbone + adapter forward and backward to the trainable weights, compiled for
  `devices` (encoders, losses and optimizer left out: the part its layer loops are in)."""
  from flax import nnx
  from cotir_jax import latents
  prog = Program.build(cfg, devices=devices)
  m, b, patch = cfg.model, 2, int(cfg.training.patch_sizes[0])
  n_img, n_txt = (patch // 16) ** 2, int(cfg.data.max_length)
  one = jax.sharding.SingleDeviceSharding(devices[0])
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=one)

  def grads(params, frozen, img, txt, t):
    tgt_ids, cnd_ids, txt_ids = latents.position_ids(b, (patch // 16, patch // 16), n_txt, m.family)

    def loss(p):
      model = nnx.merge(prog.graphs.model, p, frozen["model"])
      outputs = model(img, jnp.concatenate([tgt_ids, cnd_ids], 1), txt, txt_ids, t)
      return sum(x.sum() for x in outputs)
    return jax.grad(loss)(params)

  with jax.set_mesh(prog.mesh):
    return jax.jit(grads).lower(prog.state["params"], prog.frozen, s(b, 2 * n_img, m.in_channels),
                                s(b, n_txt, m.context_in_dim), s(b)).compile()


def test_xla_cost_model_estimate_extrapolates_the_unrolled_step(tpu_devices):
  """XLA's TPU cost-model time of a program whose deep stacks are compiled 1 and 2 blocks deep
  and extrapolated equals that of the program compiled at full depth (all unrolled: the cost
  model's price of a loop is not its trip count times its body); the scanned program's price
  counts the loop body once. The parts' shares come from the per-op cycle estimates."""
  n = 4
  cfg = config.load("configs/tiny.py", [
      "model.depth=1", "model.cot_adapter.depth=2", f"model.depth_single_blocks={n}",
      "model.remat_policy=full", "training.patch_sizes=(64,)", "training.batch_sizes=(2,)",
      "training.iterations=(10,)"])
  compile_step = functools.partial(_backbone_grad, devices=tpu_devices[:1])
  est = cost_model.estimate(compile_step, cfg)
  full = compile_step(cost_model.unrolled(cfg))
  assert est.step_s == pytest.approx(cost_model.xla_seconds(full), rel=0.02)
  assert cost_model.xla_seconds(compile_step(cfg)) < 0.6 * est.step_s  # scanned: bodies once
  assert set(est.shares) == set(cost_model.PARTS) and sum(est.shares.values()) == pytest.approx(1)
  cycles = cost_model.cycles(full)
  assert est.shares["adapter"] == pytest.approx(cycles["cot_adapter"] / sum(cycles.values()),
                                                rel=0.05)
  assert est.shares["backbone"] > est.shares["adapter"] > 0 and est.shares["vae"] == 0
  cost = full.cost_analysis()
  assert cost_model.xla_seconds(full) == (cost["optimal_seconds"]
                                          + full.as_text().count("ConcatBitcast"))
