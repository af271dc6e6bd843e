"""CoTIR-12B: FLUX.1-Kontext-dev backbone, upstream `configs/train_cotir-12b.yaml`."""

from cotir_jax.config import defaults


def get_config():
  c = defaults("flux-dev-kontext")
  c.project_name = "CoTIR-12B"
  # global batches: upstream's per-GPU (6, 5, 3, 2) × the 8 GPUs of its README run
  c.training.batch_sizes = tuple(8 * b for b in (6, 5, 3, 2))
  return c
