"""Compile time of the train step by component, for a TPU topology (libtpu) or local devices.

    python benchmarks/compile_time.py --config configs/cotir_4b.py --topology v5e:2x2 --stage 3 \
        [--parts step,vae,text,model,optimizer] [--config.a.b=v ...]

Each part is the piece of the real step (`train/step.py`) jitted alone with the step's
shardings and activation constraints, lowered and compiled ahead of time: `vae` (encode of HQ
and LQ), `text` (the text encoder on prompt + 3 answers, plus CLIP for FLUX.1), `model`
(backbone + adapter forward and backward to the trainable weights, losses included),
`optimizer` (the primal-dual update), `step` (everything, with the non-finite guard). Prints HLO
size (characters of the optimized module), lowering and compile seconds per part.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from cotir_jax import cli, latents, sharding
from cotir_jax.plan import target
from cotir_jax.train import objective as obj
from cotir_jax.train import optim
from cotir_jax.compiler import configure_compiler
from cotir_jax.train.program import Program
from cotir_jax.train.step import guidance_for, prepare


def _abstract(fn, *args):
  return jax.eval_shape(fn, *args)


def parts(prog: Program, stage: int) -> dict:
  """name → (function, abstract args) for each component of the stage's step."""
  cfg, g = prog.cfg, prog.graphs
  batch = prog.batch(stage)
  rows = batch["hq"].shape[0]
  use_gen = jax.ShapeDtypeStruct((rows,), jnp.bool_,
                                 sharding=sharding.batch_sharding(prog.mesh, (rows,), prog.rules))

  def vae(frozen, batch):
    m = nnx.merge(g.vae, frozen["vae"])
    return m.encode(batch["hq"]), m.encode(batch["lq"])

  def text(frozen, batch, use_gen):
    return prepare(cfg, g, frozen, batch, use_gen)

  inp = _abstract(lambda f, b, u: prepare(cfg, g, f, b, u), prog.frozen, batch, use_gen)
  spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.batch_sharding(
      prog.mesh, a.shape, prog.rules))
  inp = jax.tree.map(lambda a: spec(a) if a.ndim else a, inp)
  deltas = obj.deltas_from_config(cfg)

  def model(params, frozen, inp, lambdas, key):
    x_t, x_0, t = obj.flow_matching_inputs(key, inp.x_1, cfg.compat, cfg.training.timestep_shift)
    b = inp.x_1.shape[0]
    ids = latents.position_ids(b, inp.grid, inp.txt.shape[1], cfg.model.family)
    args = obj.model_inputs(x_t, inp.x_c, ids[0], ids[1], inp.txt, ids[2], t, cfg.compat)

    def loss_fn(p):
      net = nnx.merge(g.model, p, frozen["model"])
      v, s, d, pl = net(*args, vec=inp.vec, guidance=guidance_for(cfg, b))
      return obj.losses(v, {"s": s, "d": d, "p": pl}, x_0, inp.x_1, inp.targets, lambdas, deltas)

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  def optimizer(state, grads):
    current = {"params": state["params"], "lambdas": state["lambdas"]}
    c = {k: jnp.float32(0.1) for k in "sdp"}
    return prog.tx.update(optim.join_grads(grads, c), state["opt_state"], current)

  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(prog.mesh))
  st = prog.state
  return {
      "vae": (vae, (prog.frozen, batch)),
      "text": (text, (prog.frozen, batch, use_gen)),
      "model": (model, (st["params"], prog.frozen, inp, st["lambdas"], key)),
      "optimizer": (optimizer, (st, st["params"])),
  }


def main(argv=None) -> int:
  return cli.run(_main, argv)


def _main(argv) -> int:
  p = cli.ArgumentParser(prog="benchmarks/compile_time.py", description=__doc__, config=True)
  p.add_argument("--topology", required=True)
  p.add_argument("--stage", type=int, default=-1)
  p.add_argument("--parts", default="vae,text,model,optimizer,step")
  cfg, args = cli.parse(p, argv)
  cfg.compile_cache_dir = ""  # measure compiles, not cache hits
  configure_compiler(cfg)
  tgt = target(args.topology)
  prog = Program.build(cfg, devices=tgt.devices)
  stage = args.stage % len(cfg.training.iterations)
  print(f"{cfg.project_name} on {tgt.name}, mesh {dict(prog.mesh.shape)}, stage {stage} "
        f"(patch {cfg.training.patch_sizes[stage]}, batch {cfg.training.batch_sizes[stage]}), "
        f"remat {cfg.model.remat_policy}", flush=True)
  table = parts(prog, stage)
  for name in args.parts.split(","):
    t0 = time.perf_counter()
    if name == "step":
      lowered = prog.lower(stage)
    else:
      fn, abstract = table[name]

      def run(*a, _fn=fn):
        with sharding.activation_sharding(prog.mesh, prog.rules):
          return _fn(*a)

      with jax.set_mesh(prog.mesh):
        lowered = jax.jit(run).lower(*abstract)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    print(f"{name:<10} lower {t1 - t0:7.1f} s  compile {t2 - t1:7.1f} s  optimized HLO "
          f"{len(compiled.as_text()) / 1e6:6.2f} MB  peak "
          f"{compiled.memory_analysis().peak_memory_in_bytes / 2**30:6.2f} GiB", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
