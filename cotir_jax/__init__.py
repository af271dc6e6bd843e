"""cotir_jax: JAX/Flax training of CoTIR on TPU pods and GPUs."""

__version__ = "0.1.0"
