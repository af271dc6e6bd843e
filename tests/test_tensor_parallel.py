"""Tensor parallelism without resharding: on 8 simulated devices with `mesh.tensor=2`, the
compiled tiny train step's scanned block bodies hold only Megatron's collectives, and the
losses equal those of `mesh.tensor=1`.

Why it holds: the fused projections store their columns grouped by head (q, k, v of a head
with its gate / up columns, `models.layers.FusedLayout`), so the contiguous split over `tensor`
gives every shard whole heads; attention and the MLP then run shard-locally between a
column-parallel input projection and a row-parallel output projection.
"""

import collections
import json
import math
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny config with the shared runs' shapes (batch 8 of 32 px, 64 text tokens); 2 heads, so
# tensor 2 puts one head (and its MLP columns) on each shard.
MESHES = {"tensor1": (8, 1, 1), "data4_tensor2": (4, 1, 2), "fsdp4_tensor2": (1, 4, 2)}
STEPS = 3
LOSSES = ("loss", "img_loss", "txt_s_loss", "txt_d_loss", "txt_p_loss")

RUN = """
import json, sys
import jax, numpy as np
from cotir_jax import config
from cotir_jax import modules
from cotir_jax.train.program import Program
meshes, steps, out_dir = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)

def host_random(a):  # frozen weights drawn on the host: quicker than compiling the initialisers
  x = rng.standard_normal(a.shape).astype(np.float32)
  return jax.device_put((1 + 0.05 * x if x.ndim == 1 else 0.05 * x).astype(a.dtype), a.sharding)

shared, losses = None, {}
for name, (data, fsdp, tensor) in meshes.items():
  cfg = config.load("configs/tiny.py", [
      "training.iterations=(8,)", "training.patch_sizes=(32,)", "training.batch_sizes=(8,)",
      f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"])
  prog = Program.build(cfg)
  assert tuple(prog.mesh.shape.values()) == (data, fsdp, tensor), prog.mesh.shape
  # LLVM's optimisations off: half the compile time; the HLO (partitioning, collectives) and
  # the float semantics are the same
  step = prog.lower(0).compile(compiler_options={"xla_backend_optimization_level": 0})
  with open(f"{out_dir}/{name}.hlo", "w") as f:
    f.write(step.as_text())
  if shared is None:  # one initial state, frozen weights and batch, resharded for every mesh
    vocab = int(cfg.model.text_encoder.vocab_size)
    batch = {k: (rng.uniform(-1, 1, v.shape).astype(np.float32) if k in ("hq", "lq") else
                 np.ones(v.shape, np.int32) if k.endswith("_mask") else
                 rng.integers(0, vocab, v.shape).astype(np.int32))
             for k, v in modules.batch_spec(cfg, 8, 32).items()}
    shared = prog.init_state(), jax.tree.map(host_random, prog.frozen), batch
  state = jax.device_put(shared[0], prog.state_shardings, may_alias=False)
  frozen = jax.device_put(shared[1], prog.frozen_shardings)
  batch = prog.place_batch(shared[2], 0)
  rows = []
  for _ in range(steps):
    state, metrics = step(state, frozen, batch)
    rows.append({k: float(v) for k, v in metrics.items() if k.endswith("loss")})
  losses[name] = rows
print(json.dumps(losses))
"""

# Per scanned block body (forward; backward = the transposed loop), the collectives over the
# `tensor` axis, as (kind, count of arrays reduced / gathered); with data 4 x tensor 2 and with
# fsdp 4 x tensor 2 alike. Megatron's minimum, derived:
# - forward: one all-reduce of the partial sums of each row-parallel projection (attention
#   `proj` / single-block `linear2` / adapter `linear2`, MLP `fc2`). Double blocks: proj + fc2
#   for each of the img and txt streams = 4 (frozen: no backward). Single blocks: linear2 and
#   its LoRA's rank-r product x·A (A's rows are split like linear2's) = 2. Adapter: linear2 = 1,
#   plus one all-gather of its adaLN modulation [B, 3h] (a column-parallel Linear whose small
#   output every shard needs whole).
# - backward: one all-reduce of the input gradient of each column-parallel projection (the
#   partial sums of dy·Wᵀ over the shards' columns). Single blocks: linear1 and its LoRA's
#   rank-r dy·Bᵀ = 2. Adapter: linear1's two column subsets (q and MLP input on the text rows,
#   k and v on all rows) = 2, and its two QK-norm scales, whose gradients sum over heads that
#   the shards split = 2; 4 in all.
# Anything else over `tensor` (an all-gather, all-to-all or permute of activations, more
# all-reduces) would be resharding.
TENSOR = {
    ("double_blocks", "forward"): {"all-reduce": 4},
    ("single_blocks", "forward"): {"all-reduce": 2},
    ("single_blocks", "backward"): {"all-reduce": 2},
    ("cot_adapter", "forward"): {"all-reduce": 1, "all-gather": 1},
    ("cot_adapter", "backward"): {"all-reduce": 4},
}
# Trainable elements of one layer of each stack (per layer, all shards): what data parallelism
# reduces in the backward bodies at most (the gradients of LoRA on linear1 / linear2; the
# adapter block's linear1, linear2, modulation and QK-norm).
# configs/tiny.py: width H, LoRA rank R, head width 32; linear1 9H wide, linear2 4H deep.
H, R = 128, 32
TRAINABLE = {"single_blocks": H * R + R * 9 * H + 9 * H + 4 * H * R + R * H + H,
             "cot_adapter": H * 7 * H + 7 * H + 5 * H * H + H + H * 3 * H + 3 * H + 2 * 32}

COLLECTIVE = re.compile(r"= (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|"
                        r"collective-permute)(?:-start)?\(")


def _computations(hlo: str) -> dict[str, list[str]]:
  comps, name = {}, None
  for line in hlo.split("\n"):
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m:
      name = m.group(1)
      comps[name] = []
    elif name is not None:
      comps[name].append(line)
  return comps


def _group_size(line: str) -> int:
  """Devices per replica group, from any of XLA's spellings of `replica_groups` (0 for a
  collective-permute's source-target pairs)."""
  if "source_target_pairs=" in line:
    return 0
  if m := re.search(r"replica_groups=\{\{([\d,]+)\}", line):
    return len(m.group(1).split(","))
  if m := re.search(r"replica_groups=\[[\d,]*?(\d+)\]<=", line):
    return int(m.group(1))
  if m := re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\S+)? \{([^}]*)\}", line):
    sizes = {a: int(n) for a, n in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
    return math.prod(sizes[a] for a in re.findall(r"'(\w+)'", m.group(2)))
  raise AssertionError(f"unparsed replica groups: {line[:300]}")


def block_collectives(hlo: str, axis_of: dict[int, str]):
  """{(stack, "forward" | "backward"): [(kind, axis, shapes)]} of the scanned block loops,
  each collective's devices-per-group mapped to a mesh axis by `axis_of`."""
  comps = _computations(hlo)

  def walk(name, seen):
    if name in seen or name not in comps:
      return []
    seen.add(name)
    found = []
    for line in comps[name]:
      if m := COLLECTIVE.search(line):
        shapes = [tuple(int(d) for d in dims.split(",") if d)
                  for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1))]
        found.append((m.group(2), axis_of[_group_size(line)], shapes))
      for called in re.findall(r"(?:to_apply|calls|body|condition)=%?([\w.\-]+)", line):
        found += walk(called, seen)
    return found

  out = {}
  for line in hlo.split("\n"):
    m = re.search(r' while\(.*body=%?([\w.\-]+).*op_name="([^"]*)"', line)
    if m and (stack := re.search(r"(double_blocks|single_blocks|cot_adapter)\)*/while$",
                                 m.group(2))):
      key = (stack.group(1), "backward" if "transpose(" in m.group(2) else "forward")
      assert key not in out, key
      out[key] = walk(m.group(1), set())
  return out


def test_collectives_are_megatrons_and_losses_match_tensor_1(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(MESHES), str(STEPS),
                         str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  losses = json.loads(proc.stdout.strip().splitlines()[-1])

  for name, (data, fsdp, tensor) in MESHES.items():
    if tensor == 1:
      continue
    axis_of = {tensor: "tensor", data * fsdp: "data" if data > 1 else "fsdp",
               data * fsdp * tensor: "all", 0: "pairs"}
    with open(tmp_path / f"{name}.hlo") as f:
      bodies = block_collectives(f.read(), axis_of)
    assert set(bodies) == set(TENSOR), (name, sorted(bodies))
    for (stack, direction), found in bodies.items():
      where = (name, stack, direction, found)
      counts = collections.Counter()
      for kind, axis, shapes in found:
        assert kind not in ("all-to-all", "collective-permute") and axis != "all", where
        if axis == "tensor":
          counts[kind] += len(shapes)
        elif axis == "data":  # the weight gradients, in the backward pass only
          assert kind == "all-reduce" and direction == "backward", where
      assert dict(counts) == TENSOR[stack, direction], where
      grads = sum(math.prod(s) for kind, axis, shapes in found if axis == "data" for s in shapes)
      assert grads <= TRAINABLE.get(stack, 0), where

  ref = losses["tensor1"]
  for name in MESHES:
    assert len(losses[name]) == STEPS
    for step, (a, b) in enumerate(zip(ref, losses[name])):
      for k in LOSSES:
        assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (name, step, k, a[k], b[k])
