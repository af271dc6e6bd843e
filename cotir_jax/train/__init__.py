"""Training components: objective, primal-dual optax chain, checkpoints, metrics."""
