"""python convert/orbax_to_cotir.py --checkpoint <workdir | step dir | cotir_to_orbax out> --out <dir> [--format pt|safetensors] [--ema]

Our LoRA + CoT adapter back to upstream's `lora.pt` / `cot_adapter.pt` (bfloat16 tensors,
upstream key names; `--dtype float32` keeps full precision) or `.safetensors` with the same
keys. With `--config path [--config.a.b=v]`, names and shapes are checked against that model.
`--ema` exports the moving average of the weights that a training checkpoint keeps when the
run had `training.ema_decay` > 0.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from cotir_jax import cli  # noqa: E402  (after the path set-up above)


def _main(argv):
  p = cli.ArgumentParser(prog="convert/orbax_to_cotir.py", description=__doc__,
                         config="optional")
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--format", default="pt", choices=["pt", "safetensors"])
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "keep"])
  p.add_argument("--ema", action="store_true",
                 help="export the moving average of the weights (training.ema_decay > 0)")
  cfg, args = cli.parse(p, argv)
  from cotir_jax.convert import orbax_to_cotir
  written = orbax_to_cotir(args.checkpoint, args.out, args.format,
                           None if args.dtype == "keep" else args.dtype, cfg=cfg, ema=args.ema)
  print("wrote " + ", ".join(written.values()))
  return 0


def main(argv=None):
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
