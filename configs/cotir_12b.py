"""CoTIR-12B: FLUX.1-Kontext-dev backbone, upstream `configs/train_cotir-12b.yaml`."""

from cotir_jax.config import defaults


def get_config():
  c = defaults("flux-dev-kontext")
  c.project_name = "CoTIR-12B"
  c.training.batch_sizes = (6, 5, 3, 2)
  return c
