"""Shared test setup: float32 matmuls on CPU, quiet logs."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # both workers may compile for TPUs

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
