"""Shared test setup: CPU, quiet logs, and the `highest_precision` fixture of the parity tests.

Training tests run at JAX's default matmul precision, as production does (bf16 passes on TPU
and GPU); a parity test compares float32 results with a reference library to ~1e-5, so its
module asks for full float32 matmuls with
`pytestmark = pytest.mark.usefixtures("highest_precision")`.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # both workers may compile for TPUs

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def highest_precision():
  """Full float32 matmuls for a whole module (its module-scoped fixtures included)."""
  with jax.default_matmul_precision("highest"):
    yield
