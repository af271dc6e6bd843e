#!/usr/bin/env python
"""Train-step throughput of cotir_jax beside a PyTorch CoTIR built from diffusers.

The same step on both sides, from the same pre-computed inputs (VAE latents of HQ / LQ, text
features of the generic and specific prompts and of the three CoT answers), so the frozen
encoders are outside the comparison: prompt pick, flow-matching draws, forward of the backbone
+ CoT adapter, the CoTIR losses, backward to the LoRA + adapter weights only, clip + AdamW on
them and the dual Adam step on the multipliers. Ours is `train.step.make_train_step` itself
with the encoders swapped for the pre-computed inputs; the PyTorch side is diffusers'
`Flux2Transformer2DModel` (`FluxTransformer2DModel` for the Kontext family) with upstream's
LoRA and a CoT adapter module, both loaded with OUR initial weights
through the converter tables. Step 0 is checked first: both sides must give the same losses and
gradient norm from the same draws. Our full step (encoders included) is timed as well.

Implementations run interleaved, one step each per round, in one process (both see the same
machine load); warm-up steps are excluded and the median step time is reported, with samples/s,
the ratio against torch eager, mfu and hfu (`cotir_jax.perf.utilization`: model FLOPs in closed
form, the same for every implementation, and the FLOPs each one executes — the HLO walk of our
compiled step, `torch.utils.flop_counter` on one eager torch step for both torch rows — over the
peak: the device table, or on CPUs a measured float32 matmul peak) and peak memory (CPU: the
process's peak RSS during each implementation's steps, reset before every step through
/proc/self/clear_refs; GPU:
`torch.cuda.max_memory_allocated` / JAX `memory_stats()["peak_bytes_in_use"]`).

  python benchmarks/step_throughput.py                          # wide FLUX.2 config on the CPU
  python benchmarks/step_throughput.py --family flux1           # wide Kontext-family config
  python benchmarks/step_throughput.py --config configs/cotir_4b.py --stage 3 --no-full  # GPU

`--config FILE [--config.a.b=v ...]` benchmarks a recipe at its stage `--stage` (patch and
global batch from `training.patch_sizes` / `batch_sizes`; `--batch` overrides), with random
weights (no checkpoint is read). Without `--config`, the wide CPU preset (`WIDE`): hidden 1024,
head_dim 128, 2 double + 4 single + 2 adapter blocks, LoRA rank 96, 512 text + 2·64 image
tokens (patch 128), batch 1, float32. Threads: `--threads N` pins the process to N CPUs, which
sizes XLA's CPU thread pool, and sets torch's intra-op threads to N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The wide CPU preset: the tiny config of each family widened to real head sizes and lengths.
WIDE = {
    "flux2": ("configs/tiny.py", [
        "model.hidden_size=1024", "model.num_heads=8", "model.axes_dim=(32,32,32,32)",
        "model.depth=2", "model.depth_single_blocks=4", "model.cot_adapter.depth=2",
        "model.lora.rank=96", "model.context_in_dim=1536",
        "model.text_encoder.hidden_size=512", "model.text_encoder.intermediate_size=1536",
        "model.text_encoder.num_attention_heads=8", "model.text_encoder.num_key_value_heads=4",
        "model.text_encoder.head_dim=64"]),
    "flux1": ("configs/tiny_kontext.py", [
        "model.hidden_size=1024", "model.num_heads=8", "model.axes_dim=(16,56,56)",
        "model.depth=2", "model.depth_single_blocks=4", "model.cot_adapter.depth=2",
        "model.lora.rank=96", "model.context_in_dim=512",
        "model.text_encoder.d_model=512", "model.text_encoder.d_ff=1024",
        "model.text_encoder.num_heads=8", "model.text_encoder.d_kv=64"]),
}
WIDE_TRAINING = ["data.max_length=512", "training.patch_sizes=(128,)", "training.batch_sizes=(1,)",
                 "training.iterations=(100,)"]


def parse_args(argv=None):
  from cotir_jax import config
  argv = list(sys.argv[1:] if argv is None else argv)
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--family", choices=sorted(WIDE), default="flux2",
                  help="backbone family of the wide preset (ignored with --config)")
  ap.add_argument("--stage", type=int, default=0, help="training stage: patch and batch size")
  ap.add_argument("--batch", type=int, default=None, help="global batch (default: the stage's)")
  ap.add_argument("--steps", type=int, default=8, help="measured steps per implementation")
  ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (compiles excluded)")
  ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                  help="CPU threads of both frameworks")
  ap.add_argument("--no-compile", dest="torch_compile", action="store_false",
                  help="leave out torch.compile")
  ap.add_argument("--no-full", dest="full", action="store_false",
                  help="leave out our full step with the frozen encoders")
  ap.add_argument("--parity-tol", type=float, default=1e-4,
                  help="max relative difference of the step-0 losses and gradient norm")
  ap.add_argument("--json", default=None, help="also write the results to this file")
  has_config = any(a == "--config" or a.startswith("--config=") for a in argv)
  if has_config:
    cfg, rest = config.parse_cli(argv)
    preset = None
  else:
    rest = [a for a in argv if not a.startswith("--config.")]
    preset = ap.parse_known_args(rest)[0].family
    path, overrides = WIDE[preset]
    user = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    cfg = config.load(REPO / path, overrides + WIDE_TRAINING + user)
  args = ap.parse_args(rest)
  args.preset = preset
  return cfg, args


def pin_threads(n: int) -> None:
  """Pins the process to n CPUs before jax / torch start: XLA sizes its CPU pool from the
  affinity mask; torch's intra-op threads are set to n after import."""
  cpus = sorted(os.sched_getaffinity(0))
  if n > len(cpus):
    raise SystemExit(f"--threads {n}: only {len(cpus)} CPUs are available to this process")
  os.sched_setaffinity(0, cpus[:n])


# --------------------------------------------------------------------------- memory

class PeakMemory:
  """Peak memory of a span: CPU peak RSS (reset through /proc/self/clear_refs) or GPU peaks."""

  def __init__(self, device):
    self.device = device

  def reset(self, torch_side: bool):
    import torch
    if self.device == "cpu":
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    elif torch_side:
      torch.cuda.reset_peak_memory_stats()

  def peak(self, torch_side: bool) -> int:
    import jax
    import torch
    if self.device == "cpu":
      with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    if torch_side:
      return torch.cuda.max_memory_allocated()
    return jax.devices()[0].memory_stats()["peak_bytes_in_use"]  # not resettable: since start


# --------------------------------------------------------------------------- inputs

def make_inputs(cfg, batch: int, patch: int, seed: int = 0) -> dict:
  """Pre-computed step inputs as numpy: latent tokens, text features (and CLIP vectors), and
  every sample marked as having its three CoT answers."""
  import numpy as np
  m = cfg.model
  rng = np.random.default_rng(seed)
  n_img, n_txt = (patch // 16) ** 2, int(cfg.data.max_length)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  out = {"x_1": normal(batch, n_img, m.in_channels), "x_c": normal(batch, n_img, m.in_channels),
         "answer_mask": np.ones((batch, 3), np.int32)}
  for name in ("txt_gen", "txt_spe", "ans_s", "ans_d", "ans_p"):
    out[name] = normal(batch, n_txt, m.context_in_dim)
  if m.family == "flux1":
    out["vec_gen"], out["vec_spe"] = normal(batch, m.vec_in_dim), normal(batch, m.vec_in_dim)
  return out


def make_data_batch(cfg, batch: int, patch: int, seed: int = 0) -> dict:
  """A random data batch of `batch_spec`'s layout: images in [-1, 1], token ids, full masks."""
  import numpy as np
  from cotir_jax import modules
  rng = np.random.default_rng(seed)
  vocab = {"qwen": cfg.model.text_encoder.vocab_size, "t5": cfg.model.text_encoder.vocab_size,
           "clip": cfg.model.clip.vocab_size if "clip" in cfg.model else 0}
  out = {}
  for key, spec in modules.batch_spec(cfg, batch, patch).items():
    if key in ("hq", "lq"):
      out[key] = rng.uniform(-1, 1, spec.shape).astype(np.float32)
    elif key.endswith("_mask"):
      out[key] = np.ones(spec.shape, np.int32)
    else:
      out[key] = rng.integers(0, vocab[key.split("_")[-2]], spec.shape).astype(np.int32)
  return out


# --------------------------------------------------------------------------- ours

def precomputed(grid):
  """A `prepare_inputs` for `make_train_step` that reads the pre-computed inputs."""
  import jax
  import jax.numpy as jnp
  from cotir_jax.train import objective as obj
  from cotir_jax.train.step import Prepared

  def prepare(cfg, graphs, frozen, batch, use_gen):
    pick = lambda gen, spe: jnp.where(use_gen.reshape(-1, *([1] * (gen.ndim - 1))), gen, spe)
    vec = pick(batch["vec_gen"], batch["vec_spe"]) if "vec_gen" in batch else None
    x_1, x_c, txt, s, d, p, vec = jax.lax.stop_gradient(obj.cast_inputs(
        (batch["x_1"], batch["x_c"], pick(batch["txt_gen"], batch["txt_spe"]), batch["ans_s"],
         batch["ans_d"], batch["ans_p"], vec), cfg.compat))
    return Prepared(x_1=x_1, x_c=x_c, grid=grid, txt=txt, targets={"s": s, "d": d, "p": p},
                    vec=vec)
  return prepare


class Ours:
  """Our step on pre-computed inputs (`name="jax"`) or on a data batch (`name="jax_full"`)."""

  def __init__(self, prog, state, frozen, batch, stage: int, full: bool):
    import jax
    from cotir_jax import sharding
    from cotir_jax.train.step import make_train_step
    self.name = "jax_full" if full else "jax"
    t0 = time.perf_counter()
    if full:
      self.compiled = prog.lower(stage).compile()
      self.batch = prog.place_batch(batch, stage)
    else:
      patch = int(prog.cfg.training.patch_sizes[stage])
      step = make_train_step(prog.cfg, prog.graphs, prog.tx,
                             prepare_inputs=precomputed((patch // 16, patch // 16)))
      rep = sharding.replicated(prog.mesh)
      self.batch = {k: jax.device_put(v, rep) for k, v in batch.items()}

      def fn(state, frozen, batch):
        with sharding.activation_sharding(prog.mesh, prog.rules):
          return step(state, frozen, batch)

      jitted = jax.jit(fn, in_shardings=(prog.state_shardings, prog.frozen_shardings, rep),
                       out_shardings=(prog.state_shardings, rep), donate_argnums=(0,))
      self.compiled = jitted.lower(prog.state, prog.frozen, self.batch).compile()
    self.compile_s = time.perf_counter() - t0
    self.state, self.frozen = state, frozen

  def step(self):
    import jax
    self.state, metrics = self.compiled(self.state, self.frozen, self.batch)
    return jax.tree.map(float, jax.block_until_ready(metrics))


# --------------------------------------------------------------------------- PyTorch

def build_torch(cfg, frozen_model, params, device, dtype):
  """diffusers transformer + LoRA + CoT adapter holding our weights."""
  import numpy as np
  import torch
  from torch_cotir import TorchCoTIR  # benchmarks/torch_cotir.py
  from cotir_jax.convert.core import export_params, flat_params
  from cotir_jax.convert.cotir import export_cotir_params
  from cotir_jax.convert.flux import transformer_rules
  from cotir_jax.models import ModelSpec
  m = cfg.model
  with torch.device("meta"):
    model = TorchCoTIR(cfg)
  shapes = {k: tuple(v.shape) for k, v in model.backbone.state_dict().items()}
  rules = transformer_rules(ModelSpec.from_config(m), prefix="backbone.")
  base = export_params(rules, flat_params(frozen_model), shapes)
  to_torch = lambda d, dt: {k: torch.from_numpy(np.asarray(v, np.float32)).to(device, dt)
                            for k, v in d.items()}
  model.backbone.load_state_dict(to_torch(base, dtype), strict=True, assign=True)
  model.cot_adapter.to_empty(device=device)  # filled with our weights below
  model.add_lora(m.lora.rank, m.lora.scale)
  lora, adapter = export_cotir_params({k: v for k, v in flat_params(params).items()}, dtype=None)
  trainable = {**model.lora_state_names(lora), **adapter}
  model.load_trainable(to_torch(trainable, torch.float32))
  left = [k for k, v in model.state_dict().items() if v.is_meta]
  if left:
    raise RuntimeError(f"torch model: no weights for {left[:5]}")
  return model


class Torch:
  """The PyTorch step, eager (`name="torch_eager"`) or with `torch.compile` ("torch_compile")."""

  def __init__(self, cfg, model, inputs, ids, device, autocast, compiled: bool):
    import torch
    t = cfg.training
    self.name = "torch_compile" if compiled else "torch_eager"
    self.cfg, self.model, self.device, self.autocast = cfg, model, device, autocast
    self.x = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
    self.ids = tuple(torch.from_numpy(i).to(device) for i in ids)
    self.deltas = {k: float(t[f"delta_{k}"]) for k in "sdp"}
    self.trainable = [p for p in model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(self.trainable, lr=float(t.learning_rate),
                                 betas=(float(t.adam_beta1), float(t.adam_beta2)),
                                 eps=float(t.adam_epsilon), weight_decay=float(t.adam_weight_decay))
    self.lambdas = torch.zeros(3, device=device, requires_grad=True)
    self.dual = torch.optim.Adam([self.lambdas], lr=float(t.lambda_lr), betas=(0.9, 0.999), eps=1e-8)
    self.forward = torch.compile(self._losses) if compiled else self._losses
    self.compile_s = 0.0
    self.count = 0

  def _losses(self, x_0, t, use_gen):
    """Forward + CoTIR losses from the draws (noise x_0, t, prompt choice)."""
    import torch
    import torch.nn.functional as F
    x = self.x
    pick = lambda gen, spe: torch.where(use_gen.view(-1, *([1] * (gen.ndim - 1))), gen, spe)
    x_1 = x["x_1"]
    tt = t[:, None, None]
    x_t = (1 - tt) * x_1 + tt * x_0
    img = torch.cat([x_t, x["x_c"]], 1)
    vec = pick(x["vec_gen"], x["vec_spe"]) if "vec_gen" in x else None
    guidance = (torch.full_like(t, float(self.cfg.training.guidance))
                if self.cfg.model.guidance_embed else None)
    with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
      v, *heads = self.model(img, self.ids[0], pick(x["txt_gen"], x["txt_spe"]), self.ids[1], t,
                             guidance=guidance, vec=vec)
    n_tgt = x_1.shape[1]
    img_loss = (v[:, :n_tgt].float() - (x_0 - x_1)).square().mean()
    unit = lambda h: F.normalize(h.float(), dim=-1, eps=1e-6)
    txt = torch.stack([(unit(h) - unit(x[f"ans_{k}"])).square().mean()
                       for h, k in zip(heads, "sdp")])
    c = txt - torch.tensor([self.deltas[k] for k in "sdp"], device=txt.device)
    return img_loss + (self.lambdas.detach() * c).sum(), img_loss, txt, c

  def step(self, draws=None):
    """One step; `draws` = (x_0, t, use_gen) as numpy, else drawn here as upstream does."""
    import torch
    from cotir_jax.train import optim
    x_1 = self.x["x_1"]
    if draws is None:
      p_gen = float(optim.use_gen_prob(self.cfg, self.count))
      draws = (torch.randn_like(x_1), torch.sigmoid(torch.randn(x_1.shape[0], device=self.device)),
               torch.rand(x_1.shape[0], device=self.device) < p_gen)
    else:
      draws = tuple(torch.from_numpy(d).to(self.device) for d in draws)
    loss, img_loss, txt, c = self.forward(*draws)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, float(self.cfg.training.max_grad_norm))
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    dual_loss = -(self.lambdas * c.detach()).sum()
    self.dual.zero_grad(set_to_none=True)
    dual_loss.backward()
    self.dual.step()
    with torch.no_grad():
      self.lambdas.clamp_(min=0.0)
    self.count += 1
    values = torch.stack([loss.detach(), img_loss.detach(), *txt.detach(), grad_norm]).tolist()
    return dict(zip(("loss", "img_loss", "txt_s_loss", "txt_d_loss", "txt_p_loss", "grad_norm"),
                    values))


def torch_executed_flops(impl) -> float:
  """Matmul + convolution FLOPs one eager torch step executes (`torch.utils.flop_counter`,
  which counts an SDPA backward as 5 matmuls, the recomputed scores included); the step runs
  once more, uncounted by the timing."""
  from torch.utils.flop_counter import FlopCounterMode
  with FlopCounterMode(display=False) as counter:
    impl.step()
  return float(counter.get_total_flops())


# --------------------------------------------------------------------------- driver

def step_zero_draws(cfg, rng, x_1):
  """The draws our step makes at step 0 (noise, t, prompt choice), to feed the torch step."""
  import jax
  import numpy as np
  from cotir_jax.train import objective as obj
  from cotir_jax.train import optim
  from cotir_jax.train.step import _split_rows
  rows = x_1.shape[0]
  k_prompt, k_fm = _split_rows(jax.random.split(jax.random.fold_in(rng, 0), rows))
  use_gen = jax.vmap(jax.random.uniform)(k_prompt) < optim.use_gen_prob(cfg, 0)
  _, x_0, t = obj.flow_matching_inputs(k_fm, x_1, cfg.compat, cfg.training.timestep_shift)
  return np.asarray(x_0, np.float32), np.asarray(t, np.float32), np.asarray(use_gen)


def main(argv=None):
  cfg, args = parse_args(argv)
  pin_threads(args.threads)
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # two frameworks share a GPU
  import jax
  import numpy as np
  import torch
  sys.path.insert(0, str(Path(__file__).resolve().parent))
  from cotir_jax import latents
  from cotir_jax.perf import chips, hlo, utilization
  from cotir_jax.train.program import Program
  torch.set_num_threads(args.threads)
  # XLA's CPU code flushes denormal results to zero; torch does not by default, and the tiny
  # Adam moments of the barely-trained adapter made its eager CPU step ~20x slower.
  flush_denormal = torch.set_flush_denormal(True)

  t_cfg = cfg.training
  stage = args.stage
  patch = int(t_cfg.patch_sizes[stage])
  batch = args.batch or int(t_cfg.batch_sizes[stage])
  if args.batch:
    with cfg.unlocked():
      sizes = list(t_cfg.batch_sizes)
      sizes[stage] = batch
      t_cfg.batch_sizes = tuple(sizes)
  dev = jax.devices()[0]
  device = torch.device("cuda" if dev.platform == "gpu" else "cpu")
  if dev.platform not in ("cpu", "gpu"):
    raise SystemExit(f"the torch side needs a CPU or a CUDA GPU; JAX runs on {dev.platform}")
  autocast = cfg.mixed_precision == "bf16"
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.param_dtype]
  m = cfg.model
  info = {
      "device": dev.device_kind, "platform": dev.platform, "family": m.family,
      "config": args.preset and f"wide {args.preset} preset" or "from --config",
      "hidden_size": m.hidden_size, "heads": m.num_heads, "depth": m.depth,
      "depth_single_blocks": m.depth_single_blocks, "adapter_depth": m.cot_adapter.depth,
      "lora_rank": m.lora.rank, "context_in_dim": m.context_in_dim,
      "text_tokens": int(cfg.data.max_length), "image_tokens": 2 * (patch // 16) ** 2,
      "patch": patch, "batch": batch, "mixed_precision": cfg.mixed_precision,
      "param_dtype": m.param_dtype, "remat": m.remat_policy, "attention": m.attention,
      "jax_threads (CPU affinity)": len(os.sched_getaffinity(0)),
      "torch_threads": torch.get_num_threads(), "torch_flush_denormal": flush_denormal,
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
      "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
      "jax": jax.__version__, "torch": torch.__version__, "python": platform.python_version(),
      "load_average_start": os.getloadavg()}
  print(json.dumps(info), flush=True)

  prog = Program.build(cfg, devices=[dev])
  frozen = prog.init_frozen()
  params0 = prog.init_state()["params"]  # the initial trainable weights, copied into torch
  inputs = make_inputs(cfg, batch, patch)
  grid = (patch // 16, patch // 16)
  ids = [np.asarray(a[0]) for a in latents.position_ids(1, grid, int(cfg.data.max_length), m.family)]
  img_ids, txt_ids = np.concatenate(ids[:2]), ids[2]

  t0 = time.perf_counter()
  model = build_torch(cfg, frozen["model"], params0, device, torch_dtype)
  print(f"torch model built in {time.perf_counter() - t0:.1f} s", flush=True)
  state = prog.init_state()
  draws = step_zero_draws(cfg, state["rng"], inputs["x_1"])  # before the step donates the state
  impls = [Ours(prog, state, frozen, inputs, stage, full=False),
           Torch(cfg, model, inputs, (img_ids, txt_ids), device, autocast, compiled=False)]
  print(f"jax step compiled in {impls[0].compile_s:.1f} s", flush=True)

  # Step 0 on both from the same draws: the same losses and gradient norm, or no benchmark.
  ours0, theirs0 = impls[0].step(), impls[1].step(draws)
  parity = {k: abs(ours0[k] - theirs0[k]) / max(abs(theirs0[k]), 1e-30) for k in theirs0}
  print("step 0 relative differences (ours vs torch): "
        + ", ".join(f"{k} {v:.1e}" for k, v in parity.items()), flush=True)
  bad = {k: v for k, v in parity.items() if not v <= args.parity_tol}
  if bad:
    raise SystemExit(f"step 0 differs beyond --parity-tol {args.parity_tol}: {bad}\n"
                     f"ours {ours0}\ntorch {theirs0}")

  if args.torch_compile:
    model_c = build_torch(cfg, frozen["model"], params0, device, torch_dtype)
    impls.append(Torch(cfg, model_c, inputs, (img_ids, txt_ids), device, autocast, compiled=True))
    t0 = time.perf_counter()
    impls[-1].step()
    impls[-1].compile_s = time.perf_counter() - t0
    print(f"torch.compile first step (compile included) {impls[-1].compile_s:.1f} s", flush=True)
  if args.full:
    impls.append(Ours(prog, prog.init_state(), frozen, make_data_batch(cfg, batch, patch), stage,
                      full=True))
    print(f"jax full step compiled in {impls[-1].compile_s:.1f} s", flush=True)

  mem = PeakMemory(device.type)
  times = {i.name: [] for i in impls}
  peaks = {i.name: 0 for i in impls}
  for r in range(args.warmup + args.steps):
    for impl in impls:
      torch_side = impl.name.startswith("torch")
      mem.reset(torch_side)
      if device.type == "cuda":
        torch.cuda.synchronize()
      t0 = time.perf_counter()
      impl.step()
      if device.type == "cuda":
        torch.cuda.synchronize()
      dt = time.perf_counter() - t0
      if r >= args.warmup:
        times[impl.name].append(dt)
        peaks[impl.name] = max(peaks[impl.name], mem.peak(torch_side))
    print(f"round {r}: " + ", ".join(f"{n} {v[-1]:.3f} s" for n, v in times.items() if v)
          + ("" if r >= args.warmup else " (warm-up)"), flush=True)

  count = utilization.model_flops(cfg, patch, batch)
  encoders = sum(count.get(c) for c in ("vae", "text_encoder", "clip"))
  peak = chips.device_peak_flops(dev, t_cfg.peak_tflops)
  peak_note = "device table"
  if peak is None:
    peak, peak_note = chips.measured_peak_flops(dev), "measured float32 matmul (jax)"
  executed = {i.name: hlo.hlo_flops(i.compiled).total for i in impls if hasattr(i, "compiled")}
  executed["torch_eager"] = executed["torch_compile"] = torch_executed_flops(impls[1])
  eager = statistics.median(times["torch_eager"])
  results = {}
  for impl in impls:
    med = statistics.median(times[impl.name])
    work = count.total - (0 if impl.name == "jax_full" else encoders)
    done = executed[impl.name]
    results[impl.name] = {
        "median_step_s": round(med, 4), "min_step_s": round(min(times[impl.name]), 4),
        "samples_per_s": round(batch / med, 3),
        "speedup_vs_torch_eager": round(eager / med, 3),
        "model_tflop_per_step": round(work / 1e12, 4),
        "executed_tflop_per_step": round(done / 1e12, 4),
        "mfu": round(utilization.utilization(work, med, peak), 4),
        "hfu": round(utilization.utilization(done, med, peak), 4),
        "peak_memory_gib": round(peaks[impl.name] / 2**30, 3),
        "compile_s": round(impl.compile_s, 1)}
  out = {**info, "steps": args.steps, "warmup": args.warmup, "parity_step0": parity,
         "peak_flops": peak, "peak_source": peak_note,
         "load_average_end": os.getloadavg(), "results": results}
  print(json.dumps(out, indent=1))
  if args.json:
    Path(args.json).write_text(json.dumps(out, indent=1))
  return out


if __name__ == "__main__":
  main()
