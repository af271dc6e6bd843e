"""Attention kernels behind `model.attention` (models/attention.py) against the XLA path.

Splash runs its real Pallas kernel code on CPU in interpret mode (small shapes: the interpreter
is slow); the TPU tests compile it ahead of time for a v5e topology (libtpu, no TPU needed); the
cuDNN test needs a CUDA GPU. The kernel choice ("auto", fallbacks per part) is plain Python.
"""

import math
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cotir_jax import config
from cotir_jax.models import attention
from parity import rel

pytestmark = pytest.mark.usefixtures("highest_precision")  # float32 parity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XLA = attention.AttentionSpec("xla")
SPLASH = attention.AttentionSpec("splash", block_q=128, block_kv=128, interpret=True)
# An interpreted kernel is a large CPU program: skipping LLVM's optimisations halves its compile.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _qkv(b, lq, lk, h, d, dtype):
  rng = np.random.default_rng(0)
  return tuple(jnp.asarray(rng.normal(size=(b, n, h, d)), dtype) for n in (lq, lk, lk))


def _value_and_grads(spec, q, k, v, **kw):
  """attention.attend's output and the gradients of a fixed random projection of it."""
  w = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)

  def loss(q, k, v):
    out = attention.attend(q, k, v, spec, **kw)
    return jnp.sum(out.astype(jnp.float32) * w), out
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)).lower(q, k, v)
  (_, out), grads = step.compile(FAST_COMPILE)(q, k, v)
  return [np.asarray(x, np.float32) for x in (out, *grads)]


def test_resolve():
  """"auto" is the platform's fused kernel where one serves the compute dtype, else xla."""
  assert attention.resolve("auto", platform="tpu", dtype=jnp.float32) == "splash"
  assert attention.resolve("auto", platform="cuda", dtype=jnp.bfloat16) == "cudnn"
  assert attention.resolve("auto", platform="gpu", dtype="float16") == "cudnn"
  assert attention.resolve("auto", platform="cuda", dtype="float32") == "xla"
  assert attention.resolve("auto", platform="cpu", dtype="bfloat16") == "xla"
  for name in ("xla", "cudnn", "splash"):
    assert attention.resolve(name, platform="cpu", dtype="float32") == name
  with pytest.raises(ValueError, match="model.attention='flash'.*'auto'"):
    attention.resolve("flash", platform="tpu", dtype="bfloat16")


def test_kernels_by_part():
  """Per part, for the target platform: T5's position bias keeps FLUX.1's T5 on xla under
  splash; float32 keeps the tiny models off cuDNN; an explicit kernel the platform lacks is xla."""
  load = lambda name, *o: config.load(os.path.join(REPO, "configs", name), list(o))
  klein, kontext, tiny = load("cotir_4b.py"), load("cotir_12b.py"), load("tiny.py")
  splash = {"backbone": "splash", "cot_adapter": "splash", "text_encoder": "splash"}
  assert attention.kernels_by_part(klein, "tpu") == splash
  assert attention.kernels_by_part(klein, "cuda") == {k: "cudnn" for k in splash}
  assert attention.kernels_by_part(klein, "cpu") == {k: "xla" for k in splash}
  assert attention.kernels_by_part(kontext, "tpu") == {
      **splash, "text_encoder": "xla (T5 relative-position bias: no splash support)",
      "clip": "splash"}
  assert set(attention.kernels_by_part(kontext, "cuda").values()) == {"cudnn"}
  assert attention.kernels_by_part(tiny, "cuda") == {k: "xla" for k in splash}
  assert attention.kernels_by_part(load("tiny.py", "model.attention=cudnn"), "cuda")[
      "backbone"] == "xla (float32: cudnn takes bf16 / fp16)"
  assert attention.kernels_by_part(load("tiny.py", "model.attention=splash"), "cpu")[
      "text_encoder"] == "xla (splash needs a TPU, this is cpu)"
  assert attention.describe(attention.kernels_by_part(klein, "tpu")) == "splash"
  assert attention.describe(attention.kernels_by_part(kontext, "tpu")).startswith(
      "backbone splash, cot_adapter splash, text_encoder xla (T5")


# Lengths 200 and 72 are not multiples of the 128 block: keys and queries are padded.
@pytest.mark.parametrize("lq,lk", [(200, 200), (72, 200)], ids=["self", "cross"])
def test_splash_matches_xla_float32(lq, lk):
  q, k, v = _qkv(1, lq, lk, 2, 64, jnp.float32)
  for name, a, ref in zip(("out", "dq", "dk", "dv"), _value_and_grads(SPLASH, q, k, v),
                          _value_and_grads(XLA, q, k, v)):
    assert a.shape == ref.shape
    assert rel(a, ref) <= 2e-5, (name, rel(a, ref))


def test_splash_matches_xla_bfloat16():
  """In bf16 both paths round; splash must be as close to the float32 result as XLA is."""
  q, k, v = _qkv(1, 72, 200, 1, 64, jnp.bfloat16)
  exact = _value_and_grads(XLA, *(x.astype(jnp.float32) for x in (q, k, v)))
  for name, a, ref, truth in zip(("out", "dq", "dk", "dv"), _value_and_grads(SPLASH, q, k, v),
                                 _value_and_grads(XLA, q, k, v), exact):
    assert rel(a, truth) <= 2 * rel(ref, truth) + 1e-3, (name, rel(a, truth), rel(ref, truth))


def test_splash_causal_padding_grouped_queries_float32():
  """The text encoders' case: causal, right-padded keys per row (lengths 200 and 75) and 4 query
  heads over 2 key / value heads; every query row (padded ones too) as XLA computes it."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 200, n, 64)), jnp.float32) for n in (4, 2, 2))
  kw = dict(causal=True, kv_lengths=jnp.asarray([200, 75], jnp.int32))
  for name, a, ref in zip(("out", "dq", "dk", "dv"), _value_and_grads(SPLASH, q, k, v, **kw),
                          _value_and_grads(XLA, q, k, v, **kw)):
    assert rel(a, ref) <= 2e-5, (name, rel(a, ref))


def test_splash_residuals_are_named_for_remat():
  """A policy saving attention.RESIDUALS keeps the kernel's output and log-sum-exp."""
  q, k, v = _qkv(1, 128, 128, 1, 64, jnp.float32)
  policy = jax.checkpoint_policies.save_only_these_names(attention.RESIDUALS)
  f = jax.checkpoint(lambda q, k, v: jnp.sum(attention.attend(q, k, v, SPLASH)), policy=policy)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(f))(q, k, v)
  assert str(jaxpr).count(f"name={attention.RESIDUALS}") == 2  # out and logsumexp


def test_fit_block():
  assert attention.fit_block(2560, 512) == 512
  assert attention.fit_block(640, 512) == 128   # 640 = 5·128: no padding beyond 128 tokens
  assert attention.fit_block(1024, 512) == 512
  assert attention.fit_block(256, 512) == 256   # short sequences: one block
  with pytest.raises(ValueError, match="multiple of 128"):
    attention.fit_block(256, 100)


def test_kernel_partition():
  mesh = jax.sharding.AbstractMesh((1, 2, 2), ("data", "fsdp", "tensor"))
  assert attention.kernel_partition(mesh, 4, 24) == P(("data", "fsdp"), None, "tensor")
  assert attention.kernel_partition(mesh, 3, 5) == P(None, None, None)  # not divisible: replicated
  assert attention.kernel_partition(mesh, 4, 24, head_axis=None) == P(("data", "fsdp"), None, None)


def test_config_fields():
  cfg = config.load(os.path.join(REPO, "configs/tiny.py"),
                    ["model.attention=splash", "model.attention_block_q=256"])
  spec = attention.AttentionSpec.from_config(cfg.model)
  assert (spec.implementation, spec.block_q, spec.block_kv) == ("splash", 256, 512)
  with pytest.raises(config.ConfigError, match="model.attention='flash'.*splash"):
    config.load(os.path.join(REPO, "configs/tiny.py"), ["model.attention=flash"])
  with pytest.raises(config.ConfigError, match="model.attention_block_kv=200"):
    config.load(os.path.join(REPO, "configs/tiny.py"), ["model.attention_block_kv=200"])


_SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from cotir_jax.models import attention
    mesh = Mesh(np.array(jax.devices()).reshape(1, 2, 2), ("data", "fsdp", "tensor"))
    rng = np.random.default_rng(0)
    sh = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q, k, v = (jax.device_put(rng.normal(size=(2, n, 2, 64)).astype(np.float32), sh)
               for n in (72, 200, 200))
    def run(spec):
      loss = lambda q, k, v: jnp.sum(jnp.sin(attention.attend(q, k, v, spec)))
      step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v)
      return step.compile({"xla_backend_optimization_level": 0})(q, k, v)
    with jax.set_mesh(mesh):  # the ambient mesh: the kernel is shard_mapped over it
      got = run(attention.AttentionSpec("splash", 128, 128, interpret=True))
    want = run(attention.AttentionSpec("xla"))
    assert got[1][0].sharding.spec == sh.spec, got[1][0].sharding
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
      assert err <= 2e-5, err
    print("SHARDED_OK")
""")


def test_splash_under_a_mesh_on_4_devices():
  """Batch over fsdp and heads over tensor: shard_map runs the kernel per shard."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run([sys.executable, "-c", "import jax; jax.config.update("
                      "'jax_default_matmul_precision', 'highest')\n" + _SHARDED],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and "SHARDED_OK" in r.stdout, r.stdout + r.stderr[-3000:]


FULL = (2, 2560, 24, 128)  # B, L (512 text + 2·(512/16)² image tokens), heads, head dim


def _compile_for_v5e(monkeypatch, fn, shape, mesh_shape=(1, 2, 2)):
  """AOT-compiles `fn(q, k, v)` on bf16 [B, L, H, D] = `shape` for v5e chips: batch over
  (data, fsdp), heads over tensor."""
  pytest.importorskip("libtpu", reason="libtpu is needed to compile for a TPU topology")
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's host probing
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip is used: share libtpu's lock
  topo = topologies.get_topology_desc("v5e:2x2", "tpu")
  devices = np.array(topo.devices[:math.prod(mesh_shape)]).reshape(mesh_shape)
  mesh = Mesh(devices, ("data", "fsdp", "tensor"))
  sh = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sh)] * 3
  # conftest's "highest" would ask Mosaic for fp32 contraction of bf16 operands, which it rejects.
  with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
    return jax.jit(fn).lower(*args).compile()


def _full_attention(monkeypatch, implementation: str, grad: bool, mesh_shape=(1, 2, 2)):
  """One attention at the FULL shape; `grad`: forward + backward to q, k, v. The spec names no
  platform: "auto" resolves for the mesh the program is traced under, not this CPU."""
  spec = attention.AttentionSpec(implementation)
  fn = lambda q, k, v: attention.attend(q, k, v, spec)
  if grad:
    fn = jax.grad(lambda q, k, v: jnp.sum(attention.attend(q, k, v, spec).astype(jnp.float32)),
                  argnums=(0, 1, 2))
  return _compile_for_v5e(monkeypatch, fn, FULL, mesh_shape)


def test_splash_compiles_for_tpu_v5e(monkeypatch):
  """Forward + backward compile for real TPUs on a 2x2 mesh, with no [B, H, L, L] scores."""
  compiled = _full_attention(monkeypatch, "auto", grad=True)
  assert "tpu_custom_call" in compiled.as_text()
  b, l, h, _ = FULL
  scores_per_chip = b * h * l * l * 4 // 4  # float32 scores of one chip's quarter
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < scores_per_chip // 16, (temp, scores_per_chip)


@pytest.mark.parametrize("policy,forward_runs", [("full", 2), ("save_attention", 1),
                                                 ("offload_attention", 1)])
def test_splash_remat_policies_compile_for_v5e(monkeypatch, policy, forward_runs):
  """Splash forward + backward under shard_map on a 2x2 mesh, rematerialised with a policy:
  those that save its residuals (layers.REMAT_POLICIES) run the forward kernel once, `full`
  runs it again in the backward pass."""
  from cotir_jax.models import layers
  spec = attention.AttentionSpec("splash")
  block = jax.checkpoint(lambda q, k, v: jnp.sum(jnp.sin(attention.attend(q, k, v, spec))
                                                 .astype(jnp.float32)),
                         policy=layers.REMAT_POLICIES[policy]())
  hlo = _compile_for_v5e(monkeypatch, jax.value_and_grad(block, argnums=(0, 1, 2)),
                         (4, 256, 4, 128)).as_text()
  kernels = [re.search(r"splash_mha_(fwd|dq|dkv)", line).group(1) for line in hlo.splitlines()
             if 'custom_call_target="tpu_custom_call"' in line]
  assert kernels.count("fwd") == forward_runs and {"dq", "dkv"} <= set(kernels), kernels


@pytest.mark.benchmark
def test_attention_memory_on_v5e(monkeypatch):
  """Compiled temp memory of one FULL attention on one v5e chip, xla vs splash."""
  for grad in (False, True):
    temp = {impl: _full_attention(monkeypatch, impl, grad, (1, 1, 1)).memory_analysis()
            .temp_size_in_bytes for impl in ("xla", "splash")}
    print(f"{'fwd+bwd' if grad else 'fwd'}: " + ", ".join(f"{k} {v / 2**20:.1f} MiB"
                                                          for k, v in temp.items()))
    assert temp["splash"] < temp["xla"] // 8, temp


def _has_cuda() -> bool:
  try:
    return bool(jax.devices("cuda"))
  except RuntimeError:
    return False


@pytest.mark.skipif(not _has_cuda(), reason="cuDNN attention needs a CUDA GPU visible to JAX "
                    "(conftest pins JAX_PLATFORMS=cpu unless set: run with JAX_PLATFORMS=cuda,cpu)")
@pytest.mark.parametrize("case", ["cross", "causal_padding_grouped", "bias"])
def test_cudnn_matches_xla(case):
  """The backbone's cross attention, the text encoders' causal + right padding + grouped
  queries (kv_lengths → cuDNN's padding mode), and T5's additive bias, in bf16."""
  cuda = jax.devices("cuda")[0]
  spec = attention.AttentionSpec("cudnn")
  assert attention.select(spec, dtype=jnp.bfloat16, head_dim=64)[0] == "cudnn"
  rng = np.random.default_rng(2)
  if case == "cross":
    q, k, v = _qkv(2, 72, 200, 2, 64, jnp.bfloat16)
    kw = {}
  else:
    q, k, v = (jnp.asarray(rng.normal(size=(2, 200, n, 64)), jnp.bfloat16) for n in (4, 2, 2))
    kw = (dict(causal=True, kv_lengths=jnp.asarray([200, 75], jnp.int32))
          if case == "causal_padding_grouped"
          else dict(scale=1.0 / 8, bias=jnp.asarray(rng.normal(size=(1, 4, 200, 200)), jnp.float32)))
  q, k, v, kw = jax.device_put((q, k, v, kw), cuda)
  exact = _value_and_grads(XLA, *(x.astype(jnp.float32) for x in (q, k, v)), **kw)
  for name, a, ref, truth in zip(("out", "dq", "dk", "dv"), _value_and_grads(spec, q, k, v, **kw),
                                 _value_and_grads(XLA, q, k, v, **kw), exact):
    assert rel(a, truth) <= 2 * rel(ref, truth) + 1e-3, (name, rel(a, truth), rel(ref, truth))
