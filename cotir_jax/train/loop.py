"""The training loop: stages, one compiled step per stage, metrics, validation, checkpoints.

Reading order: `train` runs the start-up checks every process agrees on and builds the program
(mesh, abstract state, step; `preflight.py`, `program.py`), restores the state or creates it in
place, then runs the progressive stages of `training.iterations`; each stage compiles its step
once, ahead of the first batch (its batch and patch shapes are fixed), and loops. Host round
trips happen only every `log_steps`, at checkpoints and at validation; a stop signal is agreed
without one (`multihost.StopSignal`). Every process runs this same loop (multi-host): each reads
its share of the batch.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from cotir_jax import multihost
from cotir_jax import sample as sampler
from cotir_jax.cli import UserError
from cotir_jax.data import pipeline
from cotir_jax.perf import chips
from cotir_jax.perf.utilization import StepFlops
from cotir_jax.train import preflight
from cotir_jax.train import workdir as wd
from cotir_jax.train.checkpoint import Checkpointer
from cotir_jax.train.metrics import MetricsWriter
from cotir_jax.train.profiler import StepProfiler

log = logging.getLogger("cotir_jax.train")


class NonFiniteLossError(UserError, RuntimeError):
  """The loss or gradient became NaN/inf; the last good checkpoint is left as it was."""


def _count(tree) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def _grid(images) -> np.ndarray:
  """One row per sample: [HQ | LQ | result_gen | result_spe] (truncating uint8 cast, as upstream)."""
  cols = [sampler.to_uint8(np.asarray(x)) for x in images]
  rows = [np.concatenate([c[i] for c in cols], axis=1) for i in range(cols[0].shape[0])]
  return np.concatenate(rows, axis=0)


def _start_note(step: int, total: int, saved_by: int | None, init_from: str | None) -> str:
  """How the run starts; `saved_by`: the process count of the run that wrote the checkpoint it
  resumes (None: a new run)."""
  if saved_by is not None:
    now = jax.process_count()
    head = (f"resuming at step {step}" if saved_by == now else
            f"resumed a {saved_by}-process run on {now} process{'es' if now > 1 else ''} at step "
            f"{step}")
    return f"{head} of {total}" + (
        " (training.init_from unused: a resumed run continues from its own checkpoint)"
        if init_from else "")
  return f"starting at step 0 of {total}" + (f", initialised from {init_from}" if init_from else "")


def train(cfg, workdir: str, *, take_over_lock: bool = False) -> dict:
  """Runs (or resumes) training in `workdir`; returns a summary (steps, compiles per stage).

  One run per workdir: process 0 holds `<workdir>/train.lock` while it runs (`take_over_lock`:
  take it from a run on another host that is gone; see `workdir.lock`).
  """
  start = preflight.run(cfg, workdir)  # every check that can fail on one host, agreed by all
  with wd.lock(workdir, jax.process_index() == 0, take_over=take_over_lock):
    return _train(cfg, workdir, start)


def _train(cfg, workdir: str, start: preflight.Startup) -> dict:
  lead = jax.process_index() == 0
  prog, data_state = start.prog, start.data_state
  ckpt = Checkpointer(workdir, max_to_keep=cfg.training.checkpoints_total_limit)
  if start.meta:
    state = ckpt.restore(prog.state, start.meta["step"])["state"]
    saved_by = data_state["process_count"] if data_state else jax.process_count()
  else:
    state, saved_by = prog.init_state(cfg.training.init_from), None
  frozen = prog.init_frozen()
  step = int(state["step"])
  total = int(cfg.training.iterations[-1])

  n_train = _count(prog.state["params"])
  n_params = n_train + _count(prog.frozen)
  mem = prog.bytes_per_device((prog.state, prog.frozen))
  if lead:
    print(f"cotir_jax: {jax.process_count()} process(es), {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), mesh {dict(prog.mesh.shape)}"
          + (f" ({prog.mesh_note})" if prog.mesh_note else "")
          + f"; attention {prog.attention_summary}"
          + f"; parameters {n_params:,} total / {n_train:,} trainable; state + frozen weights "
          f"{mem / 2**20:.1f} MiB per device; "
          + _start_note(step, total, saved_by, cfg.training.init_from)
          + f"; workdir {start.disk_free / 2**30:.1f} GiB free"
          + (f"; config changed since the checkpoint: {'; '.join(map(str, start.config_changes))}"
             if start.config_changes else ""), flush=True)
    for note in pipeline.data_notes(cfg, start.source, start.bank):
      print(f"cotir_jax: data: {note}", flush=True)

  peak = chips.device_peak_flops(jax.devices()[0], cfg.training.peak_tflops)
  if peak is None:  # a device without a published peak (CPU): its own best matmul rate
    peak = chips.measured_peak_flops()
  flops_log, utilizations = {}, {}
  os.makedirs(os.path.join(workdir, "validation"), exist_ok=True)
  writer = MetricsWriter(workdir, start_step=step, report_to=cfg.report_to,
                         project=cfg.project_name, config=cfg.to_dict(), is_lead=lead)
  bar = tqdm(total=total, initial=step, disable=not lead, desc="train", dynamic_ncols=True)
  profiler = StepProfiler(cfg.training.profile_steps, workdir)

  def run_data_state(it):  # one process-independent position: resumable on any process count
    return pipeline.merge_states(multihost.all_gather(it.get_state()))

  def save(it):
    ckpt.save(int(state["step"]), state, data_state=run_data_state(it), config=cfg)

  try:
    with multihost.StopSignal() as stop:
      while step < total:
        stage = pipeline.stage_of_step(cfg, step)
        stage_end = min(int(cfg.training.iterations[stage]), total)
        it = pipeline.make_iterator(cfg, stage, tokenizers=start.tokenizers, state=data_state,
                                    source=start.source, bank=start.bank)
        t0 = time.perf_counter()
        jstep = prog.lower(stage).compile()
        validate = prog.validate(stage) if cfg.training.val_steps > 0 else None
        # the held-out batch is the same on every process (same files, same seed): placed once
        held_out = (prog.place_batch(pipeline.validation_batch(
            cfg, prog.val_patch(stage), prog.val_rows(stage), start.tokenizers))
                    if validate and cfg.data.get("val_data_dir") else None)
        count = StepFlops.of(cfg, stage, jstep)  # model (mfu) and executed (hfu) FLOPs
        global_batch = int(cfg.training.batch_sizes[stage])
        flops_log[stage] = count.summary()
        utilizations[stage] = []
        if lead:
          print(f"cotir_jax: stage {stage} (patch {cfg.training.patch_sizes[stage]}, global batch "
                f"{global_batch}) compiled in {time.perf_counter() - t0:.1f} s; per sample "
                f"{count.model.total / global_batch / 1e12:.4g} model TFLOP, "
                f"{count.executed.global_total / global_batch / 1e12:.4g} executed", flush=True)
        multihost.barrier()  # start together: hosts compile at their own pace
        t_last, n_since, logged_at = time.perf_counter(), 0, step
        while step < stage_end:
          profiler.at(step, state)
          local = next(it)
          meta = local.pop("meta")
          batch = prog.place_batch(local, stage)
          state, metrics = jstep(state, frozen, batch)
          n_since += len(meta["key"]) * jax.process_count()
          done = step + 1
          last = done == total or done == stage_end
          scores, stopping = {}, stop.check()
          if cfg.training.val_steps > 0 and (step % cfg.training.val_steps == 0 or done == total):
            # every process runs the (SPMD) sampler on the held-out batch or the lead's first
            # samples; the lead writes
            val = held_out
            if val is None:
              val = {k: v[:prog.val_rows(stage)] for k, v in local.items()}
              if jax.process_count() > 1:
                val = multihost_utils.broadcast_one_to_all(val)
              val = prog.place_batch(val)
            images, scores = validate(state[prog.val_weights], frozen, val)
            scores = {k: float(np.mean(v)) for k, v in jax.device_get(scores).items()}
            if lead:
              grid = _grid(images)
              Image.fromarray(grid).save(os.path.join(workdir, "validation", f"step_{step:06d}.png"))
              writer.write_image(step, "validation", grid)
          if step % cfg.training.log_steps == 0 or last or stopping or scores:
            metrics = jax.device_get(metrics)
            if int(state["nonfinite_step"]) >= 0:
              raise NonFiniteLossError(
                  f"non-finite loss or gradient at step {int(state['nonfinite_step'])}; the run "
                  f"stops and the last good checkpoint in {ckpt.directory} is left intact")
            dt = time.perf_counter() - t_last
            step_time = dt / max(1, done - logged_at)
            use = count.utilizations(step_time, peak)
            utilizations[stage].append(use)
            metrics.update(step_time=step_time,
                           tflops_per_device=count.model_per_device / step_time / 1e12, **use,
                           samples_per_s=n_since / dt if dt > 0 else 0.0,
                           skipped_samples=it.skipped, bad_shards=it.bad_shards, stage=stage,
                           patch_size=int(cfg.training.patch_sizes[stage]), **scores)
            writer.write(step, {k: float(v) for k, v in metrics.items()})
            ckpt.check_for_errors()  # a failed async save (full disk) stops the run now
            bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", stage=stage)
            t_last, n_since, logged_at = time.perf_counter(), 0, done
          step = done
          bar.update(1)
          if done % cfg.training.save_steps == 0 or done == total or stopping:
            if int(state["nonfinite_step"]) >= 0:
              raise NonFiniteLossError(
                  f"non-finite loss or gradient at step {int(state['nonfinite_step'])}; no "
                  f"checkpoint written, the last good one in {ckpt.directory} is intact")
            save(it)
          if stopping:
            ckpt.wait()
            print(f"cotir_jax: {stop.reason}; saved step {done} to {ckpt.directory}; re-run "
                  "the same command (on this or another number of hosts) to resume", flush=True)
            return {"steps": done, "stopped": True, "compiles": dict(prog.compiles)}
        data_state = run_data_state(it)
        it.close()
  finally:
    profiler.close()
    bar.close()
    writer.close()
    ckpt.close()
  for stage, rows in utilizations.items():  # the median of the logged intervals
    flops_log[stage].update({k: float(np.median([r[k] for r in rows])) if rows else None
                             for k in ("mfu", "hfu")})
  summary = {"steps": step, "stopped": False, "compiles": dict(prog.compiles), "flops": flops_log,
             "peak_flops_per_device": peak}
  if lead:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f)
  return summary
