"""Configs: ml_collections `get_config()` files plus `a.b=v` overrides.

Every recipe file in `configs/` starts from `defaults()` (upstream's training values)
and a backbone preset, then changes only what differs. Field names follow upstream's YAML
(`model.cot_adapter.*`, `model.lora.*`, `data.data_dir`, `training.iterations`, ...).
Derived values (adapter width = backbone width, trainable dtype under `compat`) are
FieldReferences or computed in code, never written twice.

Command lines everywhere use the same syntax: `--config path/to/file.py --config.a.b=value`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import sys
from collections.abc import Sequence

import ml_collections
from ml_collections import config_dict

from cotir_jax.cli import UserError
from cotir_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLS
from cotir_jax.models.layers import REMAT_POLICIES

FAMILIES = ("flux2", "flux1")
COMPAT_MODES = ("default", "upstream")
LORA_INITS = ("zeros", "upstream")
REMAT_PARTS = ("double_blocks", "single_blocks", "cot_adapter")
DTYPES = ("float32", "bfloat16")
MIXING = ("balanced", "shuffle")
DATA_SOURCES = ("tar", "array_record", "paired")
COT_ANSWERS = ("templates", "manifest", "none")  # data/paired.py
MISSING_PROMPT = ("skip", "fallback")
PROMPT_ERRORS = ("stop", "skip")


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Path fields resolved against the repository when they do not exist relative to the cwd.
PATH_FIELDS = ("data.data_dir", "data.val_data_dir", "model.tokenizer", "model.tokenizer_2",
               "model.pretrained")


REPORT_TO = ("tensorboard", "wandb")
RESUME = ("latest", "never")

# Upstream YAML fields this port does not have, with what to use instead: an override naming
# one fails with this message, not with a bare "unknown field".
REMOVED_FIELDS = {
    "model.base_model_name": "the recipe chooses the backbone: config.defaults('flux.2-klein-4b' "
                             "| 'flux.2-klein-9b' | 'flux-dev-kontext'), as configs/cotir_4b.py, "
                             "cotir_9b.py and cotir_12b.py do",
    "model.base_model_path": "convert the base model with convert/diffusers_to_orbax.py and set "
                             "model.pretrained to its output",
    "model.dtype": "the compute dtype is mixed_precision: 'bf16' or 'no' (float32)",
    "model.cot_adapter.qk_scale": "upstream never uses it: attention always scales by "
                                  "1/sqrt(head dim)",
    "data.output_dir": "the run directory is the --workdir flag (default runs/<project_name>)",
    "data.logging_dir": "metrics and TensorBoard events go to the --workdir (metrics.jsonl, "
                        "tensorboard/)",
    "data.shuffle_buffer": "samples are read in a seeded global permutation (seed, "
                           "data.balanced_seed, data.mixing), which needs no shuffle buffer",
    "data.balanced_target_types": "not supported: point data.data_dir at a folder holding only "
                                  "the degradation types to train on",
    "data.balanced_rounds": "not supported: the stream is as long as training.iterations needs",
    "data.test": "use python -m cotir_jax.restore for test sets",
    "training.txt_weight_s": "upstream never reads it; the text losses are weighted by the learned "
                             "multipliers (training.delta_s, training.lambda_lr)",
    "training.txt_weight_d": "upstream never reads it; the text losses are weighted by the learned "
                             "multipliers (training.delta_d, training.lambda_lr)",
    "training.txt_weight_p": "upstream never reads it; the text losses are weighted by the learned "
                             "multipliers (training.delta_p, training.lambda_lr)",
    "device": "JAX uses every local accelerator; choose the platform with JAX_PLATFORMS",
    "inference.base_model_path": "set model.pretrained (a convert/diffusers_to_orbax.py output)",
    "inference.lora_path": "pass the weights to python -m cotir_jax.restore --weights",
    "inference.cot_adapter_path": "pass the weights to python -m cotir_jax.restore --weights",
}


class ConfigError(UserError, ValueError):
  """A config value or override is invalid; the message names the field."""


def use_encoders(model: ml_collections.ConfigDict, family: str, size: str) -> None:
  """Sets `model.vae`, `model.text_encoder` (and FLUX.1's `model.clip`), replacing old ones.

  size: "4b" / "8b" (Qwen3 width of FLUX.2-klein-4B / 9B), "full" (FLUX.1: T5-XXL, CLIP-L) or
  "tiny" (random-weight CPU models).
  """
  for key, value in encoder_configs(family, size).items():
    model[key] = value


def encoder_configs(family: str, size: str) -> ml_collections.ConfigDict:
  """The frozen encoders of a family: `vae`, `text_encoder` and, for FLUX.1, `clip`.

  size: "4b" / "8b" (Qwen3 width of FLUX.2-klein-4B / 9B), "full" (FLUX.1: T5-XXL, CLIP-L) or
  "tiny" (random-weight CPU models).
  """
  from cotir_jax.models.text import clip_config, qwen3_config, t5_config
  from cotir_jax.models.vae import tiny_vae_config, vae_config
  as_cfg = lambda dc: ml_collections.ConfigDict(dataclasses.asdict(dc))
  tiny = size == "tiny"
  e = ml_collections.ConfigDict()
  e.vae = tiny_vae_config(family) if tiny else vae_config(family)
  if family == "flux2":
    e.text_encoder = as_cfg(qwen3_config(size))
  else:
    e.text_encoder = as_cfg(t5_config("tiny" if tiny else "xxl"))
    e.clip = as_cfg(clip_config("tiny" if tiny else "l"))
  return e


def backbone_preset(name: str) -> ml_collections.ConfigDict:
  """Architecture of an upstream base model: FLUX.2-klein-4B/9B or FLUX.1-Kontext-dev."""
  presets = {
      "flux.2-klein-4b": dict(family="flux2", hidden_size=3072, num_heads=24, depth=5,
                              depth_single_blocks=20, context_in_dim=7680),
      "flux.2-klein-9b": dict(family="flux2", hidden_size=4096, num_heads=32, depth=8,
                              depth_single_blocks=24, context_in_dim=12288),
      "flux-dev-kontext": dict(family="flux1", hidden_size=3072, num_heads=24, depth=19,
                               depth_single_blocks=38, context_in_dim=4096),
  }
  if name not in presets:
    raise ConfigError(f"backbone {name!r} is unknown; allowed: {sorted(presets)}")
  p = presets[name]
  m = ml_collections.ConfigDict()
  m.family = p["family"]
  m.hidden_size = p["hidden_size"]
  m.num_heads = p["num_heads"]
  m.depth = p["depth"]
  m.depth_single_blocks = p["depth_single_blocks"]
  m.context_in_dim = p["context_in_dim"]
  if m.family == "flux2":
    m.in_channels = 128
    m.mlp_ratio = 3.0
    m.axes_dim = (32, 32, 32, 32)
    m.theta = 2000
    m.vec_in_dim = 0  # FLUX.2 has no pooled-text vector
    m.guidance_embed = False
  else:
    m.in_channels = 64
    m.mlp_ratio = 4.0
    m.axes_dim = (16, 56, 56)
    m.theta = 10000
    m.vec_in_dim = 768
    m.guidance_embed = True
  return m


def defaults(base_model_name: str = "flux.2-klein-4b") -> ml_collections.ConfigDict:
  """The upstream training recipe around a backbone preset."""
  c = ml_collections.ConfigDict()
  c.project_name = "CoTIR"
  # "default": float32 RoPE/timesteps, float32 master weights, zero-init LoRA B.
  # "upstream": upstream's bf16 ids/RoPE/timesteps, bf16 trainable weights and Adam moments,
  # default-init LoRA B with bias, lr 0 on the first step: as the released weights saw.
  c.compat = "default"
  # accelerate's names: "bf16" multiplies in bfloat16 (float32 accumulation), "no" in float32
  c.mixed_precision = "bf16"
  c.seed = 0

  c.model = backbone_preset(base_model_name)
  c.model.compat = c.get_ref("compat")
  c.model.mixed_precision = c.get_ref("mixed_precision")  # the same field, seen by the model
  c.model.pretrained = config_dict.placeholder(str)  # converted Orbax base checkpoint
  c.model.param_dtype = "bfloat16"  # frozen base weights
  # backbone, CoT adapter and text encoders: "auto" (splash on TPU, cudnn on NVIDIA GPUs in
  # bf16 / fp16, xla elsewhere), "xla" (any device), "cudnn" or "splash" (models/attention.py)
  c.model.attention = "auto"
  c.model.attention_block_q = 512   # splash query / key tile sizes: upper bounds, multiples of 128
  c.model.attention_block_kv = 512
  c.model.scan_layers = True  # False: every loop of the step unrolled (layer stacks, micro-batches)
  c.model.remat_policy = "full"     # what each scanned block keeps for backward (REMAT_POLICIES)
  c.model.remat = ml_collections.ConfigDict()  # per part; unset = model.remat_policy
  for part in REMAT_PARTS:
    c.model.remat[part] = config_dict.placeholder(str)
  c.model.cot_adapter = ml_collections.ConfigDict()
  c.model.cot_adapter.hidden_size = c.model.get_ref("hidden_size")
  c.model.cot_adapter.num_heads = c.model.get_ref("num_heads")
  c.model.cot_adapter.mlp_ratio = 4.0
  c.model.cot_adapter.out_channels = c.model.get_ref("context_in_dim")
  c.model.cot_adapter.depth = 6
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.enabled = True
  c.model.lora.rank = 96
  c.model.lora.scale = 1.0
  c.model.lora.lora_bias = True  # B's bias (upstream's LoRA always has one); False: none
  c.model.lora.merge_for_inference = False  # restore: fold LoRA into the base weights first
  c.model.lora.init = "zeros"    # "upstream": PyTorch default init of A, B and B's bias
  # Frozen encoders (VAE, text, FLUX.1's CLIP). With model.pretrained they come from the
  # converted checkpoint.
  qwen = {"flux.2-klein-4b": "4b", "flux.2-klein-9b": "8b"}.get(base_model_name, "full")
  use_encoders(c.model, c.model.family, qwen)
  c.model.encoder_dtype = "bfloat16"
  # Tokenizer directories: FLUX.2 `tokenizer/` (Qwen); FLUX.1 `tokenizer/` (CLIP) and
  # `tokenizer_2/` (T5). Unset: the ones stored with model.pretrained.
  c.model.tokenizer = config_dict.placeholder(str)
  if c.model.family == "flux1":
    c.model.tokenizer_2 = config_dict.placeholder(str)

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = "../CoTIR-Bench"  # upstream layout: image/<deg>/*.tar + prompts/
  c.data.balanced_shuffle = True
  c.data.balanced_seed = config_dict.placeholder(int)
  c.data.return_deg_type = False
  c.data.num_workers = 4
  c.data.val_batch_size = 2
  # Held-out pairs (same layout as data_dir) that validation restores, the same fixed batch every
  # time; unset: the first samples of the current training batch, as upstream validates.
  c.data.val_data_dir = config_dict.placeholder(str)
  c.data.max_length = 512          # text tokens per prompt / answer
  c.data.max_skip_fraction = 0.01  # stop the run when more samples (or shards) than this are corrupt
  c.data.skip_check_min_samples = 500  # samples seen before the skip fraction is checked
  c.data.mixing = "balanced"       # round-robin over degradation types, or "shuffle"
  c.data.source = "tar"            # the webdataset tars in place, "array_record", or "paired"
                                   # (folders of degraded / clean images or a manifest: data/paired.py)
  c.data.tfds_data_dir = config_dict.placeholder(str)  # where `cotir_bench` was built
  c.data.index_cache_dir = "default"  # tar member-offset index cache ($XDG_CACHE_HOME/cotir_jax)
  c.data.read_threads = 2
  c.data.missing_prompt = "skip"   # or "fallback": upstream's "Please correct … issues."
  c.data.prompt_errors = "stop"    # a prompt line that is not UTF-8 stops start-up, or "skip": drop it, warn
  c.data.max_image_pixels = 4096 * 4096  # larger PNGs are skipped ('too_large') from their header, undecoded
  # Where the CoT answers come from. "templates": each sample's own (CoTIR-Bench meta.json, a
  # paired manifest's scene / degradation / plan), the degradation description and plan of paired
  # data made from data.templates where it has none; "manifest": the samples' own only; "none":
  # no text terms (plain flow-matching fine-tuning). A missing answer masks its term.
  c.data.cot_answers = "templates"
  c.data.templates = paired_templates()

  c.training = ml_collections.ConfigDict()
  c.training.use_gen = {0: 0.2, 10000: 0.3, 20000: 0.4, 30000: 0.5, 40000: 0.6}
  c.training.iterations = (20000, 40000, 60000, 120001)
  c.training.patch_sizes = (128, 256, 384, 512)
  c.training.batch_sizes = (12, 10, 6, 4)
  c.training.adam_beta1 = 0.9
  c.training.adam_beta2 = 0.999
  c.training.adam_weight_decay = 0.01
  c.training.adam_epsilon = 1e-8
  c.training.lr_scheduler = "cosine"
  c.training.lr_warmup_steps = 2000
  c.training.learning_rate = 5e-4
  c.training.min_learning_rate = 5e-5
  c.training.max_grad_norm = 1.0
  c.training.gradient_accumulation_steps = 1
  # t of the flow-matching draw: sigmoid(N(0, 1)) as upstream (1.0), or shifted towards noise
  # by s·t / (1 + (s − 1)·t), where a few-step sampler spends most of its evaluations
  c.training.timestep_shift = 1.0
  c.training.delta_s = 1e-4
  c.training.delta_d = 1e-4
  c.training.delta_p = 1e-4
  c.training.lambda_lr = 1e-4
  c.training.val_steps = 1000  # validation images at steps 0, val_steps, ... and the last; 0: none
  c.training.save_steps = 1000
  c.training.checkpoints_total_limit = 2
  c.training.num_steps = 20  # Euler steps of the validation sampler
  c.training.guidance = 4.0
  c.training.log_steps = 10
  c.training.peak_tflops = config_dict.placeholder(float)  # per-chip bf16 peak for mfu; unset: device table
  # Start a new run from trained weights (fresh optimizer, λ and step 0): a training workdir or
  # one of its checkpoints/<step>/, a convert/cotir_to_orbax.py output, or upstream's released
  # lora.pt + cot_adapter.pt (their directory, or "lora.pt,cot_adapter.pt"). Used only when
  # the workdir has no checkpoint yet: a resumed run continues from its own.
  c.training.init_from = config_dict.placeholder(str)
  c.training.ema_decay = 0.0  # EMA of the trainable weights (train/ema.py), e.g. 0.999; 0: none
  c.training.profile_steps = ()  # (start, stop): jax.profiler trace of those steps in <workdir>/profile/

  # JAX's persistent compilation cache: a resumed run or a repeated stage does not compile
  # again. "default": <workdir>/compile_cache for training (one cache every host of a slice
  # shares; $JAX_COMPILATION_CACHE_DIR when set), $XDG_CACHE_HOME/cotir_jax/jit for the other
  # tools; "" turns it off.
  c.compile_cache_dir = "default"
  # XLA's exec_time_optimization_effort in [-1, 1]: 0 optimises the step fully; -1 compiles a
  # full-size TPU stage about 3× faster (same memory; speed on a TPU not measured here).
  # `cotir_jax.plan` uses -1 unless told otherwise.
  c.compile_effort = 0.0

  # `python -m cotir_jax.restore` (its flags override these); upstream's test_cotir-*.yaml / test.py
  c.inference = ml_collections.ConfigDict()
  c.inference.num_steps = 20 if c.model.family == "flux1" else 5
  c.inference.seed = 42            # noise seed; not `seed`, which makes the tiny base weights
  c.inference.prompt = "Make this picture clearer."  # upstream's generic prompt (README, samples/)
  c.inference.batch_size = 0       # images per sampler call; 0: one per data-parallel device
  c.inference.max_long_edge = config_dict.placeholder(int)  # shrink larger images first (PIL bicubic)

  # Full-size default: FSDP over every chip (weights, optimizer state and the batch sharded
  # together); -1 = all devices not used by the other axes, fitted to the stages' global
  # batches with the rest as tensor parallelism (sharding.fit_batches). `python -m
  # cotir_jax.plan --search` shows when data parallelism across slices also fits.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  c.report_to = "tensorboard"  # or "wandb" (pip install wandb); metrics.jsonl is always written
  # "latest": continue from the newest checkpoint in --workdir, if any; "never": start at step 0
  # and refuse a workdir that holds checkpoints (another run's work is never overwritten)
  c.resume = "latest"
  return c


def paired_templates() -> ml_collections.ConfigDict:
  """The text tables of paired data (data.source="paired"), in the style of CoTIR's prompt files
  and answers. A degradation type is split into the degradations below (`low_haze_rain` → low
  light, haze, rain, through `aliases`); a type with a part not listed here trains with the
  generic prompts and without degradation / plan answers."""
  t = ml_collections.ConfigDict()
  t.generic_prompts = ("Please restore this image.", "Make this picture clearer.",
                       "Improve the quality of this photo.",
                       "Enhance this image and fix whatever is wrong with it.",
                       "Restore the image to high quality.", "Clean up this photo.")
  t.composite_prompt = "Please remove the {names} from this image."  # a type of several
  # a composite plan's steps: the degradation formed last (compression, sensor noise,
  # illumination, weather layers in front of the haze, optics) is undone first
  t.order = ("jpeg_compression", "noise", "low_light", "snow", "rain", "haze", "blur", "lost_color")
  t.aliases = {"low": "low_light", "dark": "low_light", "fog": "haze", "jpeg": "jpeg_compression"}
  entries = {  # name in prompts; specific prompt lines; degradation description; plan step
      "low_light": ("low light", ("Brighten this dark image.", "Enhance this low-light photo."),
                    "The image is dark and underexposed, with crushed shadows and little visible "
                    "detail.", "brighten the exposure while keeping shadows clean"),
      "haze": ("haze", ("Remove the haze from this image.", "Dehaze this photo.",
                        "Clear the fog from the picture."),
               "A hazy veil lowers the contrast and washes out the colours.",
               "remove the haze to recover contrast and saturation"),
      "rain": ("rain", ("Remove the rain streaks.", "Derain this photo."),
               "Bright rain streaks cover the scene and hide details behind them.",
               "remove the rain streaks and fill in the occluded content"),
      "snow": ("snow", ("Remove the snow from this image.",
                        "Clear the falling snowflakes from this photo."),
               "Falling snowflakes and snow streaks cover the scene and hide details behind them.",
               "remove the snowflakes and fill in the occluded content"),
      "noise": ("noise", ("Denoise this image.", "Remove the grain from this photo.",
                          "Reduce the noise in the picture."),
                "Grainy random noise covers the whole image, most visible in flat regions.",
                "denoise while preserving fine detail"),
      "blur": ("blur", ("Remove the blur from this image.", "Sharpen this blurry photo.",
                        "Deblur the picture."),
               "The image is blurry: edges and fine textures are smeared and lack sharp detail.",
               "deblur to restore sharp edges and textures"),
      "jpeg_compression": ("JPEG compression", ("Remove the JPEG artefacts.",
                                                "Fix the compression blocks in this image."),
                           "Blocky 8x8 artefacts and ringing around edges show strong JPEG compression.",
                           "remove the compression blocks and ringing"),
      "lost_color": ("missing colour", ("Colourise this image.",
                                        "Restore the missing colours of this photo."),
                     "The colours are missing; the photo looks almost grayscale.",
                     "restore natural, plausible colours"),
  }
  t.degradations = {k: dict(name=n, prompts=p, description=d, plan=s)
                    for k, (n, p, d, s) in entries.items()}
  return t


def tiny(base_model_name: str) -> ml_collections.ConfigDict:
  """A tiny model of a family's shape that trains on a CPU on `data/sample` in minutes.

  Shared by `configs/tiny.py` (FLUX.2) and `configs/tiny_kontext.py` (FLUX.1), which add only
  what differs between the families (RoPE axes, text widths, tokenizers, their pretrained
  base). Both families' autoencoders downsample 4× (three blocks: a token covers 8×8 pixels,
  not 16×16; a tiny autoencoder that squeezed 16×16×3 pixels into one token would cap every
  result far below the inputs' quality) into 16 latent channels (64 per 2×2 token: half the
  transformer width, so a token fits in the residual stream to be copied and edited), with no
  mid-block attention (convolutions only: the same at every image size), so one trained
  encoder / decoder serves both (`scripts/pretrain_tiny_base.py`).
  """
  c = defaults(base_model_name)
  m = c.model
  m.hidden_size = 128
  m.num_heads = 4
  m.depth = 2
  m.depth_single_blocks = 2
  c.mixed_precision = "no"
  m.param_dtype = "float32"
  m.remat_policy = "none"  # nothing to save at these sizes; halves the compile time
  c.mesh.data, c.mesh.fsdp = -1, 1  # plain data parallelism is fastest for a model this small
  m.cot_adapter.depth = 2
  m.lora.rank = 32  # a quarter of the width: rank 8 learns the degradations too slowly here
  use_encoders(m, m.family, "tiny")
  m.vae.block_out_channels = (16, 32, 32)
  m.vae.latent_channels = 16
  m.vae.mid_block_add_attention = False
  m.in_channels = 4 * m.vae.latent_channels  # 2×2 latent patches per token in both families
  m.encoder_dtype = "float32"

  d = c.data
  d.data_dir = "data/sample"  # the real-photo sample set shipped in the repository
  d.val_data_dir = "data/sample_val"  # its held-out pairs, four per degradation type
  d.val_batch_size = 32               # all of them
  d.num_workers = 0           # decode in the main process: fine for 32-64 px patches
  d.max_length = 64           # text tokens per prompt / answer

  t = c.training
  t.iterations = (250, 600)   # ≈ 2.5 min on 2 CPU cores, validation included
  t.patch_sizes = (32, 64)
  t.batch_sizes = (16, 8)
  t.learning_rate = 2e-3
  t.lr_warmup_steps = 10
  t.val_steps = 300
  t.save_steps = 300
  t.log_steps = 1
  t.num_steps = 4
  # exp(μ) of the few-step FLUX.2 schedule at 16-256 tokens is ≈ 7: [1, .955, .875, .70, 0] at
  # 4 steps. Upstream's unshifted draw rarely reaches t > 0.9, where this schedule spends its
  # first evaluations; a tiny model does not generalise there from mid-range t.
  t.timestep_shift = 7.0
  return c


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the values that have a closed set of choices or must agree with each other."""
  def choose(field, value, allowed):
    if value not in allowed:
      raise ConfigError(f"{field}={value!r} is not allowed; choose one of {list(allowed)}")

  m = cfg.model
  choose("compat", cfg.compat, COMPAT_MODES)
  from cotir_jax.models.spec import COMPUTE_DTYPES
  if cfg.mixed_precision == "fp16":
    raise ConfigError("mixed_precision='fp16' is not supported (float16 needs loss scaling); "
                      "choose 'bf16' or 'no'")
  choose("mixed_precision", cfg.mixed_precision, COMPUTE_DTYPES)
  choose("report_to", cfg.report_to, REPORT_TO)
  choose("resume", cfg.resume, RESUME)
  choose("model.family", m.family, FAMILIES)
  choose("model.lora.init", m.lora.init, LORA_INITS)
  choose("model.attention", m.attention, ATTENTION_IMPLS)
  for name in ("attention_block_q", "attention_block_kv"):
    if not isinstance(m[name], int) or m[name] < 128 or m[name] % 128:
      raise ConfigError(f"model.{name}={m[name]!r} must be a positive multiple of 128")
  choose("model.remat_policy", m.remat_policy, REMAT_POLICIES)
  for part in REMAT_PARTS:
    if m.remat[part] is not None:
      choose(f"model.remat.{part}", m.remat[part], REMAT_POLICIES)
  choose("model.param_dtype", m.param_dtype, DTYPES)
  choose("model.encoder_dtype", m.encoder_dtype, DTYPES)
  choose("data.mixing", cfg.data.mixing, MIXING)
  choose("data.source", cfg.data.source, DATA_SOURCES)
  choose("data.missing_prompt", cfg.data.missing_prompt, MISSING_PROMPT)
  choose("data.prompt_errors", cfg.data.prompt_errors, PROMPT_ERRORS)
  choose("data.cot_answers", cfg.data.cot_answers, COT_ANSWERS)
  _validate_templates(cfg.data.templates)
  if not isinstance(cfg.data.max_image_pixels, int) or cfg.data.max_image_pixels < 1:
    raise ConfigError(f"data.max_image_pixels={cfg.data.max_image_pixels!r} must be a positive int")
  if not 0 <= cfg.data.max_skip_fraction <= 1:
    raise ConfigError(f"data.max_skip_fraction={cfg.data.max_skip_fraction!r} must be in [0, 1]")
  if m.hidden_size % m.num_heads:
    raise ConfigError(f"model.hidden_size={m.hidden_size} is not a multiple of model.num_heads={m.num_heads}")
  head_dim = m.hidden_size // m.num_heads
  if sum(m.axes_dim) != head_dim:
    raise ConfigError(f"model.axes_dim={tuple(m.axes_dim)} must sum to the head dim {head_dim}")
  if len(m.axes_dim) != (4 if m.family == "flux2" else 3):
    raise ConfigError(f"model.axes_dim needs {4 if m.family == 'flux2' else 3} axes for family {m.family}")
  a = m.cot_adapter
  if a.hidden_size != m.hidden_size:
    raise ConfigError(f"model.cot_adapter.hidden_size={a.hidden_size} must equal model.hidden_size={m.hidden_size}")
  if a.hidden_size % a.num_heads or a.hidden_size // a.num_heads != head_dim:
    raise ConfigError(f"model.cot_adapter.num_heads={a.num_heads} must give the backbone head dim {head_dim}")
  t = cfg.training
  choose("training.lr_scheduler", t.lr_scheduler, ("cosine",))
  n = len(t.iterations)
  for name in ("patch_sizes", "batch_sizes"):
    if len(t[name]) != n:
      raise ConfigError(f"training.{name} has {len(t[name])} entries but training.iterations has {n}")
  if list(t.iterations) != sorted(t.iterations) or min(t.iterations) <= 0:
    raise ConfigError(f"training.iterations={tuple(t.iterations)} must be positive and increasing")
  for p in t.patch_sizes:
    if p % 16:
      raise ConfigError(f"training.patch_sizes contains {p}; every patch size must be a multiple of 16")
  if not -1.0 <= float(cfg.compile_effort) <= 1.0:
    raise ConfigError(f"compile_effort={cfg.compile_effort!r} must be in [-1, 1]")
  if not 0.0 <= float(t.ema_decay) < 1.0:
    raise ConfigError(f"training.ema_decay={t.ema_decay!r} must be in [0, 1); 0 keeps no EMA")
  steps = tuple(t.profile_steps)
  if steps and not (len(steps) == 2 and all(isinstance(x, int) for x in steps)
                    and 0 <= steps[0] < steps[1]):
    raise ConfigError(f"training.profile_steps={steps!r} must be () (no trace) or (start, stop) "
                      "with 0 <= start < stop: the steps start, ..., stop - 1 are traced")
  k = t.gradient_accumulation_steps
  if not isinstance(k, int) or k < 1:
    raise ConfigError(f"training.gradient_accumulation_steps={k!r} must be a positive int")
  for s, b in enumerate(t.batch_sizes):
    if b % k:
      raise ConfigError(f"training.batch_sizes[{s}]={b} is not divisible by "
                        f"training.gradient_accumulation_steps={k} (equal micro-batches)")
  for key in ("data", "fsdp", "tensor"):
    v = cfg.mesh[key]
    if not isinstance(v, int) or (v < 1 and v != -1):
      raise ConfigError(f"mesh.{key}={v!r} must be a positive int or -1")
  shift = cfg.training.timestep_shift
  if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
    raise ConfigError(f"training.timestep_shift={shift!r} must be a number > 0 (1.0: upstream's "
                      "unshifted draw)")
  inf = cfg.inference
  for key, low in (("num_steps", 1), ("batch_size", 0)):
    if not isinstance(inf[key], int) or inf[key] < low:
      raise ConfigError(f"inference.{key}={inf[key]!r} must be an int >= {low}")
  if inf.max_long_edge is not None and inf.max_long_edge < 16:
    raise ConfigError(f"inference.max_long_edge={inf.max_long_edge} must be at least 16")
  return cfg


def _validate_templates(t: ml_collections.ConfigDict) -> None:
  """data.templates: every table entry complete, `order` and `aliases` naming listed degradations."""
  def texts(field, value, allow_empty=False):
    if not isinstance(value, (tuple, list)) or not all(isinstance(x, str) and x.strip() for x in value) \
        or not (value or allow_empty):
      raise ConfigError(f"data.templates.{field}={value!r} must be a non-empty tuple of "
                        "non-empty strings")

  texts("generic_prompts", t.generic_prompts)
  if not isinstance(t.composite_prompt, str) or "{names}" not in t.composite_prompt:
    raise ConfigError(f"data.templates.composite_prompt={t.composite_prompt!r} must be a string "
                      "holding {names} (the degradations' names)")
  known = set(t.degradations)
  for name in known:
    entry = t.degradations[name]
    for key in ("name", "description", "plan"):
      if not isinstance(entry.get(key), str) or not entry[key].strip():
        raise ConfigError(f"data.templates.degradations.{name}.{key}={entry.get(key)!r} must be a "
                          "non-empty string")
    texts(f"degradations.{name}.prompts", entry.get("prompts"))
  order = list(t.order)
  if sorted(order) != sorted(known):
    raise ConfigError(f"data.templates.order={tuple(order)} must list each of data.templates."
                      f"degradations once: {sorted(known)}")
  for alias, target in t.aliases.items():
    if target not in known:
      raise ConfigError(f"data.templates.aliases.{alias}={target!r} is not one of "
                        f"data.templates.degradations: {sorted(known)}")


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # bare strings need no quotes: model.lora.init=upstream


def apply_override(cfg: ml_collections.ConfigDict, override: str) -> None:
  """Applies one `a.b.c=value` override; unknown fields and wrong types name the field."""
  if "=" not in override:
    raise ConfigError(f"override {override!r} must look like field.path=value")
  path, text = override.split("=", 1)
  path = path.strip()
  *parents, leaf = path.split(".")
  node = cfg
  for i, key in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      raise ConfigError(f"unknown config field {'.'.join(parents[: i + 1])!r} (in override {override!r})")
    node = node[key]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    if path in REMOVED_FIELDS:
      raise ConfigError(f"config field {path!r} does not exist here: {REMOVED_FIELDS[path]}")
    known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    raise ConfigError(f"unknown config field {path!r}; fields here: {known}")
  value = _parse_value(text)
  old = node[leaf]
  if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
    value = type(old)(value)
  elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  elif isinstance(old, str) and not isinstance(value, str) and value is not None:
    value = text  # `None` clears an optional path: model.pretrained=None
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config field {path!r} cannot take {text!r}: {e}") from None


def load(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Imports `get_config()` from a config file, applies overrides, validates."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(f"_cotir_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config()")
  cfg = module.get_config()
  for override in overrides:
    apply_override(cfg, override)
  _resolve_paths(cfg)
  return validate(cfg)


def _resolve_paths(cfg: ml_collections.ConfigDict) -> None:
  """Relative paths that do not exist from the cwd but do in the repository (the shipped
  sample data and tiny tokenizers) become absolute, so commands work from any directory."""
  for field in PATH_FIELDS:
    *parents, leaf = field.split(".")
    node = cfg
    for key in parents:
      node = node.get(key) if node is not None else None
    value = node.get(leaf) if node is not None else None
    if isinstance(value, str) and value and not os.path.isabs(value) and not os.path.exists(value):
      candidate = os.path.join(REPO_ROOT, value)
      if os.path.exists(candidate):
        node[leaf] = candidate


def parse_cli(argv: Sequence[str] | None = None) -> tuple[ml_collections.ConfigDict, list[str]]:
  """Reads `--config path` and `--config.a.b=v` from argv; returns (config, other args)."""
  path, overrides, rest = split_cli(sys.argv[1:] if argv is None else argv)
  if path is None:
    raise ConfigError("missing --config path/to/config.py")
  return load(path, overrides), rest


def split_cli(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
  """(`--config` path or None, `a.b=v` overrides, the other arguments) of a command line."""
  argv = list(argv)
  path, overrides, rest = None, [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg == "--config":
      if i + 1 >= len(argv):
        raise ConfigError("--config needs a path")
      path, i = argv[i + 1], i + 2
      continue
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg.startswith("--config."):
      body = arg[len("--config."):]
      if "=" not in body and i + 1 < len(argv):
        body, i = f"{body}={argv[i + 1]}", i + 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  return path, overrides, rest
