"""`python -m cotir_jax.plan --config configs/cotir_9b.py --topology v5e:4x4 [--stage N|all]
[--search] [--json FILE] [--config.a.b=v ...]`: will a run fit, and how fast can it go?

Compiles the real train step ahead of time — the same `train.program.Program` that training
runs, so the same function, shardings and donation, with abstract states (no weight is
materialised) — for a TPU topology through libtpu (`pip install -e ".[tpu]"`, any CPU machine)
or for this machine's devices (`--topology local`), and prints per stage: memory per chip
(frozen weights, trainable weights, optimizer state, batch, temporaries, XLA's peak) against
HBM, FLOPs per sample (model FLOPs, the numerator of mfu, in closed form; executed FLOPs, that
of hfu, from the compiled HLO with loop trip counts, next to their closed form), compile time,
the attention kernel of every part (backbone, CoT adapter, text encoders) and a verdict.
Running out of memory at compile time is a result ("out of memory"), not a crash.

For a TPU topology it also asks XLA's TPU cost model how long the step takes (`est_step_s`:
the `optimal_seconds` of the step compiled with its loops unrolled, the deep stacks 1 and 2
blocks deep and extrapolated, which takes three more compiles; `--no-estimate` skips them), the
mfu and hfu that time implies, and each part's share of it (backbone, adapter, text encoders,
VAE, optimizer...). XLA's cost model, not a measurement: `cotir_jax.perf.cost_model`.

`--search` tries mesh layouts (data / fsdp / tensor), remat policies, gradient-accumulation
factors and attention kernels (`auto` with each splash tile size in SPLASH_TILES where it means
splash, then `xla`) in order of expected throughput (fewest FLOPs per sample, then least tensor
parallelism and accumulation, fused kernels first) and recommends the first that fits every
planned stage with ≥ 10% headroom; XLA's estimate is then made for the recommended setting. A
setting that runs out of memory rules out, untried, the same remat policy with less FSDP (more
data or tensor parallelism), the accumulation factors too small for its temporaries, and kernels
that need as much memory or more (xla after splash).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time

from cotir_jax import cli

HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}  # per chip (Cloud TPU system architecture)
PEAK_KEYS = {"v4": "TPU v4", "v5e": "TPU v5e", "v5p": "TPU v5p", "v6e": "TPU v6e"}
HEADROOM = 0.10
GIB = 2 ** 30
# splash tile sizes (model.attention_block_q = _kv) --search tries, in this order: the default,
# then larger tiles (fewer grid steps), then smaller (less VMEM, for a kernel that does not build)
SPLASH_TILES = (512, 1024, 256)


@dataclasses.dataclass
class Target:
  """Devices to compile for, with what one chip offers."""
  name: str
  devices: list
  hbm_bytes: float | None
  peak_flops: float | None


def target(topology: str) -> Target:
  """"v5e:4x4"-style TPU topologies (libtpu, no TPU needed) or "local" (this machine)."""
  import jax
  from cotir_jax.perf import chips
  if topology == "local":
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    peak = chips.device_peak_flops(devices[0]) or chips.measured_peak_flops(devices[0])
    return Target("local", devices, stats.get("bytes_limit"), peak)
  generation = topology.split(":")[0]
  if generation not in HBM_GIB:
    raise cli.UsageError(f"--topology {topology!r}: unknown TPU generation {generation!r}; "
                         f"use one of {sorted(HBM_GIB)} as in v5e:4x4, v5p:2x2x1, or 'local'")
  try:
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(topology, "tpu")
  except Exception as e:  # libtpu missing or a malformed topology
    raise cli.UsageError(f"--topology {topology!r}: cannot describe it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]}); TPU topologies need libtpu: "
                         "pip install -e '.[tpu]'") from None
  return Target(topology, list(desc.devices), HBM_GIB[generation] * GIB,
                chips.PEAK_TFLOPS[PEAK_KEYS[generation]] * 1e12)


@dataclasses.dataclass
class StagePlan:
  stage: int
  patch: int
  global_batch: int
  mesh: dict
  remat: str
  accumulation: int
  verdict: str                  # "fits", "tight" (< 10% headroom), "out of memory", "error"
  attention: dict = dataclasses.field(default_factory=dict)  # kernel per part
  memory_gib: dict = dataclasses.field(default_factory=dict)
  hbm_gib: float | None = None
  model_tflop_per_sample: float | None = None     # closed form: the numerator of mfu
  executed_tflop_per_sample: float | None = None  # compiled program: the numerator of hfu
  analytic_executed_tflop_per_sample: float | None = None  # its closed form (XLA attention)
  executed_tflop_per_device_step: float | None = None
  compile_s: float | None = None
  est_step_s: float | None = None  # XLA's cost model, not a measurement (perf.cost_model)
  est_mfu: float | None = None
  est_hfu: float | None = None
  est_shares: dict = dataclasses.field(default_factory=dict)
  est_note: str = ""
  note: str = ""


def _oom_temporaries(message: str) -> float | None:
  """'... HLO temporaries (260.73G) exceeds ...' (XLA TPU) → bytes, if stated."""
  m = re.search(r"temporaries \(([\d.]+)([KMGT])?\)", message)
  if not m:
    return None
  return float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " ")


def accumulation_needed(p: StagePlan) -> float:
  """After an out-of-memory (or tight) plan: the accumulation factor its temporaries would need
  to fit with headroom next to the arguments, assuming temporaries scale with the micro-batch
  (inf when the arguments alone do not fit)."""
  mem = p.memory_gib
  args = sum(v for k, v in mem.items() if k not in ("peak", "temporaries"))
  budget = (1 - HEADROOM) * p.hbm_gib - args
  temps = mem.get("temporaries")
  if temps is None and "peak" in mem:
    temps = mem["peak"] - args
  if budget <= 0:
    return math.inf
  if temps is None:
    return p.accumulation + 1
  return max(p.accumulation + 1, p.accumulation * temps / budget)


def _oom_used(message: str) -> float | None:
  """'Used 18.5G of 15.75G hbm' (XLA TPU's out-of-memory message) → bytes used, if stated."""
  m = re.search(r"Used ([\d.]+)([KMGT])? of", message)
  if not m:
    return None
  return float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " ")


def plan_stage(cfg, tgt: Target, stage: int, estimate: bool = False) -> StagePlan:
  """Compiles one stage's step for the target and measures it; `estimate`: XLA's cost-model
  time too, if it fits (three more compiles)."""
  from cotir_jax.perf import closed_form, utilization
  from cotir_jax.train.program import Program
  t = cfg.training
  patch, batch = int(t.patch_sizes[stage]), int(t.batch_sizes[stage])
  base = dict(stage=stage, patch=patch, global_batch=batch,
              remat=str(cfg.model.remat_policy), accumulation=int(t.gradient_accumulation_steps),
              hbm_gib=None if tgt.hbm_bytes is None else tgt.hbm_bytes / GIB)
  try:
    prog = Program.build(cfg, devices=tgt.devices)
  except ValueError as e:  # a mesh that does not divide the batch: a result of the search
    return StagePlan(mesh={}, verdict="error", note=str(e), **base)
  mesh = dict(prog.mesh.shape)
  base["attention"] = prog.kernels
  per_sample = lambda count: count.total / batch / 1e12
  tflop = dict(model_tflop_per_sample=per_sample(utilization.model_flops(cfg, patch, batch)),
               analytic_executed_tflop_per_sample=per_sample(
                   closed_form.analytic_flops(cfg, patch, batch)))
  parts = {"frozen weights": prog.bytes_per_device(prog.frozen),
           "trainable weights": prog.bytes_per_device(prog.state["params"]),
           "optimizer state": prog.bytes_per_device(prog.state["opt_state"]),
           "batch": prog.bytes_per_device(prog.batch(stage))}
  t0 = time.perf_counter()
  try:
    compiled = prog.lower(stage).compile()
  except Exception as e:  # XLA: RESOURCE_EXHAUSTED (out of HBM) is a result
    text = str(e)
    oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    used = _oom_used(text)
    mem = {k: v / GIB for k, v in parts.items()}
    if used is not None:
      mem["peak"] = used / GIB
    temps = _oom_temporaries(text)
    if temps is not None:
      mem["temporaries"] = temps / GIB
    return StagePlan(mesh=mesh, verdict="out of memory" if oom else "error",
                     memory_gib=mem, **tflop, compile_s=time.perf_counter() - t0, note=text.splitlines()[0][:400], **base)
  compile_s = time.perf_counter() - t0
  stats = compiled.memory_analysis()
  parts["temporaries"] = stats.temp_size_in_bytes
  parts["peak"] = stats.peak_memory_in_bytes
  count = utilization.StepFlops.of(cfg, stage, compiled)
  peak = parts["peak"]
  if tgt.hbm_bytes is None:
    verdict = "fits"
  elif peak > tgt.hbm_bytes:
    verdict = "out of memory"
  elif peak > (1 - HEADROOM) * tgt.hbm_bytes:
    verdict = "tight"
  else:
    verdict = "fits"
  unresolved = count.executed.unresolved
  note = "" if not unresolved else "not counted exactly: " + "; ".join(unresolved)
  p = StagePlan(mesh=mesh, verdict=verdict, memory_gib={k: v / GIB for k, v in parts.items()},
                executed_tflop_per_sample=count.executed.global_total / batch / 1e12,
                executed_tflop_per_device_step=count.executed_per_device / 1e12, **tflop,
                compile_s=compile_s, note=note, **base)
  if estimate and verdict in ("fits", "tight"):
    estimate_stage(cfg, tgt, p)
  return p


def estimate_stage(cfg, tgt: Target, p: StagePlan) -> None:
  """Fills in XLA's cost-model time of the stage's step (unrolled; `perf.cost_model`: three
  more compiles) and the mfu / hfu it implies; a compile that fails leaves the reason in
  `est_note`."""
  from cotir_jax.perf import cost_model
  from cotir_jax.train.program import Program

  def compile_step(c):
    return Program.build(c, devices=tgt.devices).lower(p.stage).compile()

  t0 = time.perf_counter()
  try:
    est = cost_model.estimate(compile_step, cfg)
  except Exception as e:  # out of memory even shallow, or no cost model for these devices
    p.est_note = f"no estimate: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return
  p.est_step_s, p.est_shares = est.step_s, est.shares
  p.est_note = "; ".join(filter(None, [f"{time.perf_counter() - t0:.0f} s of compiles",
                                       est.note]))
  if est.step_s and tgt.peak_flops:
    per_sample = 1e12 * p.global_batch / (est.step_s * tgt.peak_flops * len(tgt.devices))
    p.est_mfu = p.model_tflop_per_sample * per_sample
    p.est_hfu = p.executed_tflop_per_sample * per_sample


def _stages(cfg, which: str) -> list[int]:
  n = len(cfg.training.iterations)
  if which == "all":
    return list(range(n))
  if not which.isdigit() or not 0 <= int(which) < n:
    raise cli.UsageError(f"--stage {which}: the config has stages 0..{n - 1} (or 'all')")
  return [int(which)]


def _with(cfg, **fields):
  """A copy of the config with dotted fields set ({"mesh.fsdp": 8, ...})."""
  from cotir_jax import config
  c = cfg.copy_and_resolve_references()
  for path, value in fields.items():
    config.apply_override(c, f"{path}={value!r}")
  return config.validate(c)


def kernel_choices(cfg, platform: str) -> list[dict]:
  """The attention settings --search tries, fastest expected first: `auto` (with each splash
  tile size where it means splash), then `xla` where `auto` is something else."""
  from cotir_jax.models import attention
  from cotir_jax.models.spec import COMPUTE_DTYPES
  auto = attention.resolve("auto", platform=platform, dtype=COMPUTE_DTYPES[cfg.mixed_precision])
  if auto != "splash":
    return [{"model.attention": "auto"}] + ([{"model.attention": "xla"}] if auto != "xla" else [])
  return [{"model.attention": "auto", "model.attention_block_q": t,
           "model.attention_block_kv": t} for t in SPLASH_TILES] + [{"model.attention": "xla"}]


def candidates(cfg, n_chips: int, stages: list[int], platform: str = "tpu"):
  """(fields, expected cost) of every setting to try, cheapest expected step first."""
  from cotir_jax import sharding
  from cotir_jax.perf import closed_form
  kernels = kernel_choices(cfg, platform)
  t = cfg.training
  divisors = [d for d in range(1, n_chips + 1) if n_chips % d == 0]
  heads = int(cfg.model.num_heads)
  out = []
  for remat in ("none", "dots", "save_attention", "full"):
    for accum in (1, 2, 4, 8):
      if any(int(b) % accum for b in t.batch_sizes):
        continue
      micro = [int(b) // accum for b in t.batch_sizes]  # training runs every stage
      c = _with(cfg, **{"model.remat_policy": remat, "training.gradient_accumulation_steps": accum})
      cost = max(closed_form.analytic_flops(c, int(t.patch_sizes[s]), int(t.batch_sizes[s])).total
                 / int(t.batch_sizes[s]) for s in stages)  # the same for every mesh
      for tensor in divisors:
        if heads % tensor or tensor > 8:
          continue
        for data in divisors:
          if n_chips % (data * tensor):
            continue
          fsdp = n_chips // (data * tensor)
          try:
            sharding.fit_batches((data, fsdp, tensor), None, micro, heads)
          except ValueError:
            continue
          fields = {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor,
                    "model.remat_policy": remat, "training.gradient_accumulation_steps": accum}
          # FLOPs first; then less tensor parallelism, less accumulation, more FSDP than DP,
          # fused attention kernels before xla
          for i, kernel in enumerate(kernels):
            out.append(({**fields, **kernel}, (round(cost / 1e9), tensor, accum, data, i)))
  out.sort(key=lambda fc: fc[1])
  return out


def _size(gib: float) -> str:
  return f"{gib:.2f} GiB" if gib >= 0.1 else f"{gib * 1024:.1f} MiB"


def _row(p: StagePlan) -> str:
  mesh = "×".join(f"{k}={v}" for k, v in p.mesh.items() if v > 1) or "1 device"
  mem = p.memory_gib
  hbm = f" of {p.hbm_gib:.1f} GiB" if p.hbm_gib else ""
  peak = f"{_size(mem['peak'])}{hbm}" if "peak" in mem else "?"
  parts = ", ".join(f"{k} {_size(v)}" for k, v in mem.items() if k != "peak")
  lines = [f"stage {p.stage}: patch {p.patch}, global batch {p.global_batch}, mesh {mesh}, "
           f"remat {p.remat}, accumulation {p.accumulation}: {p.verdict.upper()}",
           f"  memory per chip: peak {peak} ({parts})"]
  if p.attention:
    lines.append("  attention: " + ", ".join(f"{k} {v}" for k, v in p.attention.items()))
  if p.executed_tflop_per_sample is not None:
    lines.append(f"  TFLOP per sample: model {p.model_tflop_per_sample:.4g} (mfu's), executed "
                 f"{p.executed_tflop_per_sample:.4g} (hfu's; closed form "
                 f"{p.analytic_executed_tflop_per_sample:.4g}); executed per chip per step "
                 f"{p.executed_tflop_per_device_step:.4g}")
  if p.compile_s is not None:
    lines.append(f"  compile: {p.compile_s:.1f} s")
  if p.note:
    lines.append(f"  note: {p.note}")
  return "\n".join(lines + _estimate_lines(p))


def _estimate_lines(p: StagePlan) -> list[str]:
  from cotir_jax.perf import cost_model
  lines = []
  if p.est_step_s is not None:
    use = "".join(f", {k} {v:.1%}" for k, v in (("mfu", p.est_mfu), ("hfu", p.est_hfu))
                  if v is not None)
    shares = ", ".join(f"{k} {v:.0%}" for k, v in p.est_shares.items() if v >= 0.005)
    lines.append(f"  {cost_model.LABEL}: step {p.est_step_s:.3g} s{use}; shares of the "
                 f"estimate: {shares}")
  if p.est_note:
    lines.append(f"  estimate: {p.est_note}")
  return lines


def _parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(prog="python -m cotir_jax.plan", description=__doc__, config=True)
  parser.add_argument("--topology", required=True,
                      help="TPU topology as GENERATION:SHAPE (v5e:2x2, v5e:4x4, v5p:2x2x1, "
                           "v6e:2x4, v4:2x2x1) or 'local' for this machine's devices")
  parser.add_argument("--stage", default="all", help="a stage index or 'all' (default)")
  parser.add_argument("--no-estimate", dest="estimate", action="store_false",
                      help="skip XLA's cost-model step time (three more compiles per stage)")
  parser.add_argument("--search", action="store_true",
                      help="find the fastest mesh / remat / accumulation that fits with ≥10%% "
                           "headroom")
  parser.add_argument("--max_tries", type=int, default=12,
                      help="--search: settings compiled at most (each is a full compile)")
  parser.add_argument("--json", default=None, help="also write every result to this file")
  return parser


def main(argv=None) -> int:
  return cli.run(_main, argv)


def _main(argv) -> int:
  from cotir_jax.models import attention
  parser = _parser()
  cfg, args = cli.parse(parser, argv)
  from cotir_jax.compiler import configure_compiler
  if "--config.compile_effort" not in " ".join(argv):
    cfg.compile_effort = -1.0  # memory and FLOPs as at 0 (measured), minutes less per compile
  if args.topology != "local":  # executables compiled for a topology without a client are not
    cfg.compile_cache_dir = ""  # loadable from the cache
  stages = _stages(cfg, args.stage)
  tgt = target(args.topology)
  configure_compiler(cfg)
  print(f"cotir_jax.plan: {cfg.project_name} on {tgt.name} ({len(tgt.devices)} chips"
        + (f", {tgt.hbm_bytes / GIB:.1f} GiB HBM each" if tgt.hbm_bytes else "") + ")", flush=True)

  results = {"topology": tgt.name, "chips": len(tgt.devices), "plans": []}
  estimate = args.estimate and tgt.devices[0].platform == "tpu"  # XLA's TPU cost model
  if estimate:
    from cotir_jax.perf import cost_model
    results["est_step_s"] = (cost_model.LABEL + ": optimal_seconds of the step compiled for the "
                             "topology with its loops unrolled")
  if not args.search:
    for s in stages:
      p = plan_stage(cfg, tgt, s, estimate)
      print(_row(p), flush=True)
      results["plans"].append(dataclasses.asdict(p))
    ok = all(p["verdict"] == "fits" for p in results["plans"])
  else:
    ok = False
    # the largest stage (most memory) first: a setting that fails there is dropped at once
    order = sorted(stages, key=lambda s: -int(cfg.training.patch_sizes[s]) ** 2
                   * int(cfg.training.batch_sizes[s]))
    # (remat, fsdp, accumulation below which it cannot fit, whether the kernel was xla's)
    tried, pruned = 0, []
    platform = attention.platform_of(tgt.devices[0])
    for fields, _ in candidates(cfg, len(tgt.devices), stages, platform):
      if tried >= args.max_tries:
        break
      remat, fsdp = fields["model.remat_policy"], fields["mesh.fsdp"]
      accum = fields["training.gradient_accumulation_steps"]
      xla = fields["model.attention"] == "xla"  # stores the scores: more memory than a fused kernel
      # memory grows as chips move from fsdp (weights and batch split) to data (replicas) or
      # tensor (activations partly replicated), with the micro-batch (less accumulation), and
      # from a fused attention kernel to xla's
      if any(r == remat and fsdp <= f and accum < a and xla >= x for r, f, a, x in pruned):
        continue
      tried += 1
      trial = _with(cfg, **fields)
      print(f"try: {' '.join(f'--config.{k}={v}' for k, v in fields.items())}", flush=True)
      plans = []
      for s in order:
        p = plan_stage(trial, tgt, s)
        print(_row(p), flush=True)
        plans.append(p)
        if p.verdict != "fits":
          if p.verdict in ("out of memory", "tight") and p.hbm_gib:
            # halved: temporaries shrink less than linearly with the micro-batch
            pruned.append((remat, fsdp, max(accum + 1, accumulation_needed(p) / 2), xla))
          break
      ok = all(p.verdict == "fits" for p in plans) and len(plans) == len(order)
      if ok and estimate:  # the recommended setting only: three more compiles per stage
        for p in plans:
          estimate_stage(trial, tgt, p)
          print("\n".join([f"stage {p.stage}:"] + _estimate_lines(p)), flush=True)
      results["plans"].append({"fields": fields, "stages": [dataclasses.asdict(p) for p in plans]})
      if ok:
        results["recommended"] = fields
        print("recommended: " + " ".join(f"--config.{k}={v}" for k, v in fields.items()),
              flush=True)
        break
    if not ok:
      print(f"no setting tried ({tried}) fits with ≥{HEADROOM:.0%} headroom; raise "
            "--max_tries, use a larger topology or a smaller batch", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1, default=lambda x: None if isinstance(x, float)
                and math.isnan(x) else str(x))
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
