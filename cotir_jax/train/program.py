"""The training program of a config on a set of devices: the mesh, the abstract (shape, dtype,
sharding) state, frozen weights and batch of every stage, and the jitted step and validation
sampler. `train` runs it; `cotir_jax.plan` compiles it for a TPU topology on a CPU without
materialising a weight. Both go through here, so the plan compiles exactly what training runs.

    prog = Program.build(cfg)                      # or devices=topology.devices
    compiled = prog.step(stage).lower(prog.state, prog.frozen, prog.batch(stage)).compile()
    state, frozen = prog.init_state(), prog.init_frozen()
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from cotir_jax import latents, quality, sharding
from cotir_jax import sample as sampler
from cotir_jax.convert import cotir as cotir_files
from cotir_jax.models import attention
from cotir_jax import modules
from cotir_jax.train import ema
from cotir_jax.train import optim
from cotir_jax.modules import Graphs
from cotir_jax.train.step import make_train_step, text_key


@dataclasses.dataclass
class Program:
  cfg: object
  mesh: Mesh
  rules: dict
  graphs: Graphs
  tx: optax.GradientTransformation
  state: dict            # ShapeDtypeStructs carrying shardings
  frozen: dict
  mesh_note: str | None  # why the mesh differs from the config's, for the start-up line
  kernels: dict          # attention kernel per part (attention.kernels_by_part), said at start-up
  compiles: dict = dataclasses.field(default_factory=dict)  # stage → traces of its step

  @classmethod
  def build(cls, cfg, devices=None) -> "Program":
    """Mesh from `cfg.mesh` over `devices` (default: all), fitted to the stages' batches."""
    devices = list(jax.devices() if devices is None else devices)
    k = int(cfg.training.gradient_accumulation_steps)
    micro = [int(b) // k for b in cfg.training.batch_sizes]
    shape = sharding.mesh_shape(cfg.mesh, len(devices))
    free = next((a for a in sharding.MESH_AXES if int(cfg.mesh[a]) == -1), None)
    shape, note = sharding.fit_batches(shape, free, micro, int(cfg.model.num_heads))
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), devices)
    rules = sharding.rules_from_config(cfg.mesh)

    platform = attention.platform_of(devices[0])  # a TPU topology's when planning on a CPU
    graphs, abstract = modules.abstract_states(cfg, platform)
    shardings = sharding.tree_shardings(abstract, mesh, rules)
    abstract = sharding.abstract_with_shardings(abstract, shardings)
    tx = optim.make_optimizer(cfg)
    state = jax.eval_shape(lambda: _fresh_state(cfg, tx, modules.init_params(cfg)))
    state = sharding.abstract_with_shardings(state, sharding.tree_shardings(state, mesh, rules))
    frozen = {k: v for k, v in abstract.items() if k != "params"}
    return cls(cfg=cfg, mesh=mesh, rules=rules, graphs=graphs, tx=tx, state=state,
               frozen=frozen, mesh_note=note,
               kernels=attention.kernels_by_part(cfg, platform))

  @property
  def attention_summary(self) -> str:
    """The attention kernels for the start-up line: one name, or one per part when they differ."""
    return attention.describe(self.kernels)

  # ------------------------------------------------------------------ shardings and shapes
  @property
  def state_shardings(self):
    return _shardings(self.state)

  @property
  def frozen_shardings(self):
    return _shardings(self.frozen)

  def batch(self, stage: int) -> dict:
    """The stage's global batch as ShapeDtypeStructs sharded over the batch axes."""
    t = self.cfg.training
    spec = modules.batch_spec(self.cfg, int(t.batch_sizes[stage]), int(t.patch_sizes[stage]))
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                    sharding=sharding.batch_sharding(self.mesh, v.shape, self.rules))
            for k, v in spec.items()}

  # ------------------------------------------------------------------ concrete states
  def init_state(self, init_from: str | None = None) -> dict:
    """Fresh training state, created inside jit directly in its shardings (multi-host safe).

    `init_from` (`training.init_from`): the trainable weights come from there instead of the
    random init; the optimizer moments, λ, step, RNG and EMA start fresh as in any new run."""
    cfg, tx = self.cfg, self.tx
    if not init_from:
      return modules.run_init(lambda: _fresh_state(cfg, tx, modules.init_params(cfg)),
                              self.state_shardings)
    return modules.run_init(lambda p: _fresh_state(cfg, tx, p), self.state_shardings,
                            self.read_params(init_from))

  def read_params(self, init_from: str):
    """The trainable state read from `init_from` (one path, or two files joined by a comma:
    any source `convert.cotir.read_trainable` accepts), placed in the params' shardings."""
    paths = [p.strip() for p in init_from.split(",")]
    flat = nnx.to_flat_state(jax.tree.map(lambda x: x, self.state["params"]))  # replaced below
    targets = {".".join(map(str, path)): var.get_value() for path, var in flat}
    values = cotir_files.read_trainable(paths, targets, self.cfg.model.family,
                                        what="training.init_from")
    for path, var in flat:
      want = var.get_value()
      value = np.asarray(values[".".join(map(str, path))]).astype(want.dtype)
      var.set_value(sharding.global_array(value, want.sharding))
    return nnx.from_flat_state(flat)

  def init_frozen(self) -> dict:
    """Frozen weights: random (tiny configs) or restored from `model.pretrained`."""
    return modules.init_frozen(self.cfg, self.frozen)

  # ------------------------------------------------------------------ functions
  def step(self, stage: int):
    """`jit(step)(state, frozen, batch) -> (state, metrics)` for one stage's shapes; the state
    is donated. Tracing counts in `self.compiles[stage]` (one compile per stage)."""
    train_step = make_train_step(self.cfg, self.graphs, self.tx)
    self.compiles.setdefault(stage, 0)

    def fn(state, frozen, batch):
      self.compiles[stage] += 1  # runs at trace time only
      with sharding.activation_sharding(self.mesh, self.rules):
        return train_step(state, frozen, batch)

    return jax.jit(fn, in_shardings=(self.state_shardings, self.frozen_shardings,
                                     _shardings(self.batch(stage))),
                   out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                   donate_argnums=(0,))

  def lower(self, stage: int):
    """The stage's step lowered for its abstract state, frozen weights and batch. Traced under
    the mesh (`jax.set_mesh`), which Pallas kernels' shard_map reads (models/attention.py)."""
    with jax.set_mesh(self.mesh):
      return self.step(stage).lower(self.state, self.frozen, self.batch(stage))

  def val_patch(self, stage: int) -> int:
    """Validation image side: the stage's patch size, or with data.val_data_dir the last
    stage's for every stage (the same held-out batch throughout: comparable figures)."""
    t = self.cfg.training
    return int(t.patch_sizes[-1] if self.cfg.data.get("val_data_dir") else t.patch_sizes[stage])

  def val_rows(self, stage: int) -> int:
    """Validation samples: data.val_batch_size; taken from the training batch (no
    data.val_data_dir), at most what one process reads per step."""
    if self.cfg.data.get("val_data_dir"):
      return int(self.cfg.data.val_batch_size)
    per_process = int(self.cfg.training.batch_sizes[stage]) // jax.process_count()
    return min(int(self.cfg.data.val_batch_size), per_process)

  @property
  def val_weights(self) -> str:
    """The state entry validation samples with: the EMA of the weights when the run keeps one
    (`training.ema_decay` > 0), else the weights."""
    return "ema" if "ema" in self.state else "params"

  def validate(self, stage: int):
    """The compiled `validate(weights, frozen, batch) -> (images, scores)` at
    `val_patch(stage)` (`weights`: `state[self.val_weights]`): images (hq, lq, result_gen,
    result_spe) in [-1, 1], per-image PSNR / SSIM of both results against HQ (what
    `cotir_jax.evaluate` gives for the saved PNGs; named `val_ema_*` when they score the EMA
    weights) and the PSNR of the LQ inputs (`val_psnr_lq`), replicated on every device;
    `batch`: `val_rows(stage)` samples (held-out, or the lead's first), replicated
    (`place_batch`)."""
    fn = make_validate(self.cfg, self.graphs)
    params, weights = self.state["params"], self.state[self.val_weights]
    prefix = "val_ema_" if self.val_weights == "ema" else "val_"

    def run(weights, frozen, batch):
      with sharding.activation_sharding(self.mesh, self.rules):
        images, scores = fn(ema.as_params(weights, params), frozen, batch)
      return images, {k if k == "val_psnr_lq" else prefix + k[len("val_"):]: v
                      for k, v in scores.items()}

    rep = sharding.replicated(self.mesh)
    spec = modules.batch_spec(self.cfg, self.val_rows(stage), self.val_patch(stage))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rep) for k, v in spec.items()}
    with jax.set_mesh(self.mesh):
      return jax.jit(run, out_shardings=rep).lower(weights, self.frozen, batch).compile()

  def place_batch(self, local: dict, stage: int | None = None) -> dict:
    """Per-process numpy rows → global arrays (this process's contiguous share of the batch).

    With `stage`, the batch must have that stage's layout (a clear error otherwise); without,
    a small batch every process holds in full (validation) is replicated."""
    if stage is None:
      rep = sharding.replicated(self.mesh)
      return {k: sharding.global_array(v, rep) for k, v in local.items()}
    want = self.batch(stage)
    if set(local) != set(want):
      raise ValueError(f"data batch has fields {sorted(local)}, the step expects {sorted(want)}")
    out = {}
    for k, v in local.items():
      shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
      if shape != want[k].shape or v.dtype != want[k].dtype:
        raise ValueError(f"data batch field {k!r}: {shape} {v.dtype} across processes, the step "
                         f"expects {want[k].shape} {want[k].dtype}")
      out[k] = jax.make_array_from_process_local_data(want[k].sharding, v, want[k].shape)
    return out

  def bytes_per_device(self, tree) -> int:
    """Bytes one device holds of an abstract tree (its shard of every leaf)."""
    total = 0
    for a in jax.tree.leaves(tree):
      if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        continue  # the RNG key: a few bytes
      shard = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
      total += math.prod(shard) * jnp.dtype(a.dtype).itemsize
    return total


def _fresh_state(cfg, tx, params) -> dict:
  lambdas = optim.init_lambdas()
  state = {"params": params, "lambdas": lambdas,
           "opt_state": tx.init({"params": params, "lambdas": lambdas}),
           "step": jnp.zeros((), jnp.int32), "rng": jax.random.key(cfg.seed),
           "nonfinite_step": jnp.full((), -1, jnp.int32)}
  if cfg.training.ema_decay:
    state["ema"] = ema.init(params)
  return state


def _shardings(abstract):
  return jax.tree.map(lambda a: a.sharding, abstract)


def make_validate(cfg, graphs: Graphs):
  """`validate(params, frozen, batch) -> ((hq, lq, result_gen, result_spe), scores)`: images
  in [-1, 1] from upstream's Euler sampler on the LQ latents with the generic and the
  specific prompt, per-image PSNR / SSIM of the 8-bit results against HQ, and the PSNR of the
  LQ inputs themselves (what restoration has to beat)."""
  family, name = cfg.model.family, text_key(cfg.model.family)

  def validate(params, frozen, batch):
    vae = nnx.merge(graphs.vae, frozen["vae"])
    model = nnx.merge(graphs.model, params, frozen["model"])
    encoder = nnx.merge(graphs.text, frozen["text"])
    lat_lq = vae.encode(batch["lq"])
    x_c = latents.image_tokens(lat_lq, family)
    grid = latents.token_grid(lat_lq.shape, family)
    b = x_c.shape[0]
    results = []
    for which in ("gen", "spe"):
      ids = batch[f"{which}_{name}_ids"]
      txt = encoder(ids, batch[f"{which}_{name}_mask"]) if family == "flux2" else encoder(ids)
      vec = None
      if graphs.clip is not None:
        vec = nnx.merge(graphs.clip, frozen["clip"])(batch[f"{which}_clip_ids"])
      ids_tgt, ids_cnd, txt_ids = latents.position_ids(b, grid, txt.shape[1], family)
      tokens = sampler.euler_sample(
          lambda img, img_ids, t, t_ids, ts, v, g: model(img, img_ids, t, t_ids, ts, vec=v,
                                                         guidance=g)[0],
          x_c, ids_tgt, ids_cnd, txt, txt_ids, num_steps=cfg.training.num_steps, family=family,
          key=jax.random.key(42), vec=vec,
          guidance=cfg.training.guidance if cfg.model.guidance_embed else None,
          dtype=latents.input_dtype(cfg.compat),
          state_dtype=latents.latent_dtype(family, cfg.compat))
      results.append(vae.decode(latents.tokens_to_latents(tokens, grid, family)))
    ref = quality.quantize(batch["hq"])  # the 8-bit PNG values, in [0, 1]
    scores = {"val_psnr_lq": quality.psnr(quality.quantize(batch["lq"]), ref)}  # the bar to beat
    for which, res in zip(("gen", "spe"), results):
      scores[f"val_psnr_{which}"] = quality.psnr(quality.quantize(res), ref)
      scores[f"val_ssim_{which}"] = quality.ssim(quality.quantize(res), ref)
    return (batch["hq"], batch["lq"], results[0], results[1]), scores

  return validate

