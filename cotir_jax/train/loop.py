"""The training loop: stages, one compiled step per stage, metrics, validation, checkpoints.

Reading order: `train` builds the modules and the sharded state (or restores it), then runs
the progressive stages of `training.iterations`; each stage compiles its step once (its batch
and patch shapes are fixed) and loops. Host round trips happen only every `log_steps`, at
checkpoints and at validation.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from cotir_jax import sharding
from cotir_jax import sample as sampler
from cotir_jax.data import pipeline
from cotir_jax.train import objective as obj
from cotir_jax.train import optim
from cotir_jax.train.checkpoint import Checkpointer
from cotir_jax.train.metrics import MetricsWriter
from cotir_jax.train.modules import build_states, build_tokenizers
from cotir_jax.train.step import Graphs, guidance_for, make_train_step, text_key

log = logging.getLogger("cotir_jax.train")


class NonFiniteLossError(RuntimeError):
  """The loss or gradient became NaN/inf; the last good checkpoint is left as it was."""


class _StopRequested:
  """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the next step and exits."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def _guarded(train_step):
  """Leaves the state unchanged when the loss or gradient is not finite, and records the step."""
  def step(state, frozen, batch):
    new, metrics = train_step(state, frozen, batch)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(ok, x, y), a, b)
    new = {**keep(new, state), "step": state["step"] + 1,
           "nonfinite_step": jnp.where((state["nonfinite_step"] < 0) & ~ok, state["step"],
                                       state["nonfinite_step"])}
    return new, metrics
  return step


def _nbytes_per_device(tree) -> int:
  total = 0
  for x in jax.tree.leaves(tree):
    shards = getattr(x, "addressable_shards", None)
    total += shards[0].data.nbytes if shards else np.asarray(x).nbytes
  return total


def _count(tree) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def _global_batch(local: dict, shardings_: dict) -> dict:
  """Per-process numpy batch → global jax.Arrays sharded over ('data', 'fsdp')."""
  return {k: jax.make_array_from_process_local_data(shardings_[k], v) for k, v in local.items()}


def _all_processes(obj) -> list:
  """Every process's JSON-able `obj`, in process order (the checkpoint's JSON is written by the
  primary process only, so per-process data-iterator states travel through it as one list)."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size]))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(rows[i, :n]).decode()) for i, n in enumerate(sizes)]


def make_validate(cfg, graphs: Graphs):
  """`validate(params, frozen, batch) -> (hq, lq, result_gen, result_spe)` images in [-1, 1]."""
  family, name = cfg.model.family, text_key(cfg.model.family)

  def validate(params, frozen, batch):
    vae = nnx.merge(graphs.vae, frozen["vae"])
    model = nnx.merge(graphs.model, params, frozen["model"])
    encoder = nnx.merge(graphs.text, frozen["text"])
    lat_lq = vae.encode(batch["lq"])
    x_c = obj.image_tokens(lat_lq, family)
    grid = obj.token_grid(lat_lq.shape, family)
    b = x_c.shape[0]
    results = []
    for which in ("gen", "spe"):
      ids = batch[f"{which}_{name}_ids"]
      txt = encoder(ids, batch[f"{which}_{name}_mask"]) if family == "flux2" else encoder(ids)
      vec = None
      if graphs.clip is not None:
        vec = nnx.merge(graphs.clip, frozen["clip"])(batch[f"{which}_clip_ids"])
      ids_tgt, ids_cnd, txt_ids = obj.position_ids(b, grid, txt.shape[1], family)
      g = guidance_for(cfg, b)
      tokens = sampler.euler_sample(
          lambda img, img_ids, t, t_ids, ts, v, _g: model(img, img_ids, t, t_ids, ts, vec=v,
                                                          guidance=g)[0],
          x_c, ids_tgt, ids_cnd, txt, txt_ids, num_steps=cfg.training.num_steps, family=family,
          key=jax.random.key(42), vec=vec, guidance=None if g is None else cfg.training.guidance)
      results.append(vae.decode(obj.tokens_to_latents(tokens, grid, family)))
    return batch["hq"], batch["lq"], results[0], results[1]

  return validate


def _write_grid(path: str, images) -> None:
  """One row per sample: [HQ | LQ | result_gen | result_spe] (truncating uint8 cast, as upstream)."""
  cols = [sampler.to_uint8(np.asarray(x)) for x in images]
  rows = [np.concatenate([c[i] for c in cols], axis=1) for i in range(cols[0].shape[0])]
  Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def train(cfg, workdir: str) -> dict:
  """Runs (or resumes) training in `workdir`; returns a summary (steps, compiles per stage)."""
  os.makedirs(workdir, exist_ok=True)
  lead = jax.process_index() == 0
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)

  gd, params, frozen = build_states(cfg, mesh, rules)
  graphs = Graphs(model=gd["model"], vae=gd["vae"], text=gd["text"], clip=gd["clip"])
  tokenizers = build_tokenizers(cfg)

  tx = optim.make_optimizer(cfg)
  lambdas = optim.init_lambdas()
  state = {"params": params, "lambdas": lambdas,
           "opt_state": tx.init({"params": params, "lambdas": lambdas}),
           "step": jnp.zeros((), jnp.int32), "rng": jax.random.key(cfg.seed),
           "nonfinite_step": jnp.full((), -1, jnp.int32)}
  # distinct buffers for every leaf: the step donates the state, and init may share zeros
  state = jax.tree.map(lambda x: x.copy(), state)
  state_sh = sharding.tree_shardings(state, mesh, rules)
  frozen_sh = sharding.tree_shardings(frozen, mesh, rules)
  state = sharding.place(state, state_sh)

  ckpt = Checkpointer(workdir, max_to_keep=cfg.training.checkpoints_total_limit)
  data_state = None
  restored = ckpt.restore(sharding.abstract_with_shardings(state, state_sh))
  if restored is not None:
    state = restored["state"]
    data_state = restored["data_state"]["processes"][jax.process_index()]
  step = int(state["step"])
  total = int(cfg.training.iterations[-1])

  n_params, n_train = _count((params, frozen)), _count(params)
  mem = _nbytes_per_device((state, frozen))
  if lead:
    print(f"cotir_jax: {jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"mesh {dict(mesh.shape)}; parameters {n_params:,} total / {n_train:,} trainable; "
          f"state {mem / 2**20:.1f} MiB per device; "
          + (f"resuming at step {step}" if restored else "starting at step 0")
          + f" of {total}", flush=True)

  validate = jax.jit(make_validate(cfg, graphs))
  os.makedirs(os.path.join(workdir, "validation"), exist_ok=True)
  compiles: dict[int, int] = {}
  writer = MetricsWriter(workdir, start_step=step, report_to=cfg.report_to,
                         project=cfg.project_name, config=cfg.to_dict(), is_lead=lead)
  bar = tqdm(total=total, initial=step, disable=not lead, desc="train", dynamic_ncols=True)

  def save(it):
    ckpt.save(int(state["step"]), state, data_state={"processes": _all_processes(it.get_state())},
              config=cfg)

  try:
    with _StopRequested() as stop:
      while step < total:
        stage = pipeline.stage_of_step(cfg, step)
        stage_end = min(int(cfg.training.iterations[stage]), total)
        it = pipeline.make_iterator(cfg, stage, tokenizers=tokenizers, state=data_state)
        compiles[stage] = 0

        def counted(state, frozen, batch, _stage=stage):
          compiles[_stage] += 1  # runs at trace time only: counts compilations
          return _guarded(make_train_step(cfg, graphs, tx))(state, frozen, batch)

        batch_sh = None
        jstep = None
        t_last, n_since, logged_at = time.perf_counter(), 0, step
        while step < stage_end:
          local = next(it)
          meta = local.pop("meta")
          if jstep is None:
            batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in local.items()}
            jstep = jax.jit(counted, in_shardings=(state_sh, frozen_sh, batch_sh),
                            out_shardings=(state_sh, None), donate_argnums=(0,))
          batch = _global_batch(local, batch_sh)
          state, metrics = jstep(state, frozen, batch)
          n_since += len(meta["key"]) * jax.process_count()
          done = step + 1
          last = done == total or done == stage_end
          if step % cfg.training.log_steps == 0 or last or stop.signal:
            metrics = jax.device_get(metrics)
            if int(state["nonfinite_step"]) >= 0:
              raise NonFiniteLossError(
                  f"non-finite loss or gradient at step {int(state['nonfinite_step'])}; the run "
                  f"stops and the last good checkpoint in {ckpt.directory} is left intact")
            dt = time.perf_counter() - t_last
            metrics.update(step_time=dt / max(1, done - logged_at),
                           samples_per_s=n_since / dt if dt > 0 else 0.0,
                           skipped_samples=it.skipped, stage=stage,
                           patch_size=int(cfg.training.patch_sizes[stage]))
            writer.write(step, {k: float(v) for k, v in metrics.items()})
            bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", stage=stage)
            t_last, n_since, logged_at = time.perf_counter(), 0, done
          if cfg.training.val_steps > 0 and step % cfg.training.val_steps == 0:
            # every process runs the (SPMD) sampler on the lead's first samples; the lead writes
            val = {k: v[:cfg.data.val_batch_size] for k, v in local.items()}
            if jax.process_count() > 1:
              val = multihost_utils.broadcast_one_to_all(val)
            images = validate(state["params"], frozen, val)
            if lead:
              _write_grid(os.path.join(workdir, "validation", f"step_{step:06d}.png"), images)
          step = done
          bar.update(1)
          if done % cfg.training.save_steps == 0 or done == total or stop.signal:
            if int(state["nonfinite_step"]) >= 0:
              raise NonFiniteLossError(
                  f"non-finite loss or gradient at step {int(state['nonfinite_step'])}; no "
                  f"checkpoint written, the last good one in {ckpt.directory} is intact")
            save(it)
          if stop.signal:
            ckpt.wait()
            print(f"cotir_jax: received signal {stop.signal}; saved step {done} to "
                  f"{ckpt.directory}; re-run the same command to resume", flush=True)
            return {"steps": done, "stopped": True, "compiles": compiles}
        data_state = it.get_state()
        it.close()
  finally:
    bar.close()
    writer.close()
    ckpt.close()
  summary = {"steps": step, "stopped": False, "compiles": compiles}
  if lead:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f)
  return summary
