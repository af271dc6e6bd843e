"""python convert/cotir_to_orbax.py --lora lora.pt --adapter cot_adapter.pt --config configs/<x>.py --out <dir>

Released upstream CoTIR files (spec §13 key names; .pt or .safetensors) → a trainable-weights
Orbax checkpoint (`<out>/params/` + `<out>/cotir.json`, see `cotir_jax.convert.orbax_io`) in
the dtypes of the config's trainable variables. `--config.a.b=v` overrides work as in training.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from cotir_jax import cli  # noqa: E402  (after the path set-up above)


def _main(argv):
  p = cli.ArgumentParser(prog="convert/cotir_to_orbax.py", description=__doc__, config=True)
  p.add_argument("--lora", default=None, help="upstream lora.pt (or .safetensors)")
  p.add_argument("--adapter", required=True, help="upstream cot_adapter.pt (or .safetensors)")
  p.add_argument("--out", required=True)
  p.add_argument("--overwrite", action="store_true")
  cfg, args = cli.parse(p, argv)
  from cotir_jax.convert import cotir_to_orbax
  params = cotir_to_orbax(args.lora, args.adapter, cfg, args.out, overwrite=args.overwrite)
  n = sum(int(v.size) for v in params.values())
  print(f"wrote {args.out}: {len(params)} arrays, {n:,} trainable parameters")
  return 0


def main(argv=None):
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
