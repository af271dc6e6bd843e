"""Mesh fitting, logical-axis rules and activation sharding (FSDP shards the batch, not the
hidden width): the compiled step on 8 simulated devices computes attention for its own samples
only."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cotir_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Mesh:
  def __init__(self, **shape):
    self.shape = shape


def test_fit_batches_moves_the_rest_to_tensor():
  # 9B on v5e-16: the last stage's batch of 8 cannot use 16-way FSDP
  shape, note = sharding.fit_batches((1, 16, 1), "fsdp", (48, 32, 16, 8), num_heads=32)
  assert shape == (1, 8, 2) and "tensor" in note
  # 4B: every batch divides 16
  assert sharding.fit_batches((1, 16, 1), "fsdp", (96, 80, 48, 32), 24) == ((1, 16, 1), None)
  # 12B: 40 needs a divisor of 8
  assert sharding.fit_batches((1, 16, 1), "fsdp", (48, 40, 24, 16), 24)[0] == (1, 8, 2)
  # a fixed mesh is not changed: the error names one that works
  with pytest.raises(ValueError, match=r"--config.mesh.data=1 --config.mesh.fsdp=8 "
                                       r"--config.mesh.tensor=2"):
    sharding.fit_batches((1, 16, 1), None, (48, 32, 16, 8), num_heads=32)


def test_logical_to_spec_keeps_the_axes_that_divide():
  mesh = _Mesh(data=2, fsdp=4, tensor=2)
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_to_spec(("batch", None), (8, 5), mesh, rules) == P(("data", "fsdp"))
  assert sharding.logical_to_spec(("batch", None), (2, 5), mesh, rules) == P(("data",))
  assert sharding.logical_to_spec(("batch", None), (3, 5), mesh, rules) == P()
  assert sharding.logical_to_spec(("embed", "mlp"), (8, 6), mesh, rules) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("embed", "mlp"), (6, 6), mesh, rules) == P(None, "tensor")


COMPILE = """
import sys
from cotir_jax import config
from cotir_jax.train.program import Program
cfg = config.load("configs/tiny.py", ["training.iterations=(1,)", "training.patch_sizes=(32,)",
                  "training.batch_sizes=(8,)", "mesh.data=1", "mesh.fsdp=8"])
prog = Program.build(cfg)
print(dict(prog.mesh.shape))
sys.stdout.write(prog.lower(0).compile().as_text())
"""


def test_attention_scores_hold_only_the_per_device_batch():
  """FSDP over 8 devices, global batch 8: every attention-score dot of the compiled per-device
  program covers one sample (× heads); without the activation constraints XLA computes the
  whole batch's scores on every device (f32[8,4,96,96] on this config)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-c", COMPILE], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  first, hlo = out.stdout.split("\n", 1)
  assert first == "{'data': 1, 'fsdp': 8, 'tensor': 1}"
  heads, lengths = 4, {64, 96}  # tiny: 4 heads; 64 text tokens, 64 + 2·16 image tokens (32 px)
  scores = 0
  for m in re.finditer(r"= f32\[([\d,]+)\]\{[\d,]*\} dot\([^\n]*", hlo):
    dims = [int(d) for d in m.group(1).split(",")]
    if len(dims) < 3 or not set(dims[-2:]) <= lengths:
      continue
    scores += 1
    rows = 4 if "text_encoder" in m.group(0) else 1  # the encoder runs prompt + 3 answers
    assert int(np.prod(dims[:-2])) <= rows * heads, m.group(0)[:300]
  assert scores >= 3  # forward and backward attention of the backbone and the adapter
