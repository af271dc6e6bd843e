"""The README's "Python API" lines, run as written."""

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cotir_jax import config, convert, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_design_api_lines(tmp_path):
  cfg = config.load(os.path.join(REPO, "configs/tiny.py"), overrides=["training.learning_rate=1e-4"])
  assert cfg.training.learning_rate == 1e-4
  model = models.CoTIR(cfg.model, rngs=nnx.Rngs(0))            # backbone + CoT adapter + LoRA
  b, n, l = 1, 4, 5
  img = jnp.zeros((b, 2 * n, cfg.model.in_channels))
  img_ids = jnp.zeros((b, 2 * n, 4))
  txt = jnp.zeros((b, l, cfg.model.context_in_dim))
  txt_ids = jnp.zeros((b, l, 4))
  timesteps = jnp.full((b,), 0.5)
  velocity, scene, degradation, plan = model(img, img_ids, txt, txt_ids, timesteps,
                                             vec=None, guidance=None)
  velocity2 = model.backbone(img, img_ids, txt, txt_ids, timesteps, vec=None, guidance=None)
  np.testing.assert_array_equal(np.asarray(velocity), np.asarray(velocity2))

  paths = convert.save_cotir_weights(model, str(tmp_path), fmt="pt")
  convert.load_cotir_weights(model, paths["lora"], paths["cot_adapter"])
  for name in ("load_transformer", "load_vae", "load_text_encoder", "load_cotir_weights",
               "save_cotir_weights"):
    assert callable(getattr(convert, name))


def test_cli_config_syntax():
  cfg, rest = config.parse_cli(["--config", os.path.join(REPO, "configs/tiny.py"),
                                "--config.model.lora.rank=4", "--config.compat", "upstream",
                                "--workdir", "x"])
  assert cfg.model.lora.rank == 4 and cfg.compat == "upstream" and cfg.model.compat == "upstream"
  assert rest == ["--workdir", "x"]


def test_tiny_configs_load_the_shipped_base_unless_told_not_to():
  """configs/tiny*.py: the shipped pretrained base and held-out validation pairs by default;
  `--config.model.pretrained=None` (the optional path cleared) gives random frozen weights."""
  import pytest
  for name, family in (("tiny", "flux2"), ("tiny_kontext", "flux1")):
    path = os.path.join(REPO, "configs", f"{name}.py")
    cfg = config.load(path)
    assert os.path.samefile(cfg.model.pretrained, os.path.join(REPO, "assets", "tiny_base", family))
    assert os.path.samefile(cfg.data.val_data_dir, os.path.join(REPO, "data", "sample_val"))
    cfg, _ = config.parse_cli(["--config", path, "--config.model.pretrained=None"])
    assert cfg.model.pretrained is None
  assert config.load(path, ["data.val_data_dir=None"]).data.val_data_dir is None
  with pytest.raises(config.ConfigError, match=r"model\.attention=None is not allowed"):
    config.load(path, ["model.attention=None"])  # a required choice cannot be cleared


def test_bad_config_values_name_the_field():
  import pytest
  for override, field in (("model.lora.nope=1", "model.lora.nope"),
                          ("training.learning_rate=abc", "training.learning_rate"),
                          ("model.lora.init=gaussian", "model.lora.init"),
                          ("training.patch_sizes=(30, 256, 384, 512)", "training.patch_sizes"),
                          ("training.batch_sizes=(1, 2)", "training.batch_sizes"),
                          ("training.gradient_accumulation_steps=7",  # 96 is not a multiple
                           "training.gradient_accumulation_steps"),
                          ("model.remat.single_blocks=some", "model.remat.single_blocks")):
    with pytest.raises(config.ConfigError, match=field.replace(".", r"\.")):
      config.load(os.path.join(REPO, "configs/cotir_4b.py"), [override])


def test_recipes_carry_upstream_values():
  c4, c9, c12 = (config.load(os.path.join(REPO, f"configs/cotir_{n}.py")) for n in ("4b", "9b", "12b"))
  for c in (c4, c9, c12):
    t = c.training
    assert tuple(t.iterations) == (20000, 40000, 60000, 120001)
    assert tuple(t.patch_sizes) == (128, 256, 384, 512)
    assert dict(t.use_gen) == {0: 0.2, 10000: 0.3, 20000: 0.4, 30000: 0.5, 40000: 0.6}
    assert (t.adam_beta1, t.adam_beta2, t.adam_weight_decay, t.adam_epsilon) == (0.9, 0.999, 0.01, 1e-8)
    assert (t.learning_rate, t.min_learning_rate, t.lr_warmup_steps) == (5e-4, 5e-5, 2000)
    assert (t.max_grad_norm, t.lambda_lr, t.delta_s, t.delta_d, t.delta_p) == (1.0, 1e-4, 1e-4, 1e-4, 1e-4)
    assert (t.val_steps, t.save_steps, t.checkpoints_total_limit, t.num_steps) == (1000, 1000, 2, 20)
    a = c.model.cot_adapter
    assert (a.mlp_ratio, a.depth, c.model.lora.rank, c.model.lora.scale) == (4.0, 6, 96, 1.0)
  # global batches of upstream's 8-GPU run: per-GPU batch × 8
  assert tuple(c4.training.batch_sizes) == (96, 80, 48, 32)
  assert tuple(c9.training.batch_sizes) == (48, 32, 16, 8)
  assert tuple(c12.training.batch_sizes) == (48, 40, 24, 16)
  for c in (c4, c9, c12):  # FSDP over every chip by default
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, -1, 1)
  assert [c.model.cot_adapter.out_channels for c in (c4, c9, c12)] == [7680, 12288, 4096]
  assert [c.model.cot_adapter.hidden_size for c in (c4, c9, c12)] == [3072, 4096, 3072]
  assert [c.inference.num_steps for c in (c4, c9, c12)] == [5, 5, 20]
