"""python convert/cotir_to_orbax.py --lora lora.pt --adapter cot_adapter.pt --config configs/<x>.py --out <dir>

Released upstream CoTIR files (spec §13 key names; .pt or .safetensors) → a trainable-weights
Orbax checkpoint (`<out>/params/` + `<out>/cotir.json`, see `cotir_jax.convert.orbax_io`) in
the dtypes of the config's trainable variables. `--config.a.b=v` overrides work as in training.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv=None):
  from cotir_jax import config
  from cotir_jax.convert import ConversionError, cotir_to_orbax
  argv = list(sys.argv[1:] if argv is None else argv)
  if "-h" in argv or "--help" in argv:
    print(__doc__)
    return 0
  try:
    cfg, rest = config.parse_cli(argv)
  except config.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lora", default=None, help="upstream lora.pt (or .safetensors)")
  p.add_argument("--adapter", required=True, help="upstream cot_adapter.pt (or .safetensors)")
  p.add_argument("--out", required=True)
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(rest)
  try:
    params = cotir_to_orbax(args.lora, args.adapter, cfg, args.out, overwrite=args.overwrite)
  except (ConversionError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  n = sum(int(v.size) for v in params.values())
  print(f"wrote {args.out}: {len(params)} arrays, {n:,} trainable parameters")
  return 0


if __name__ == "__main__":
  sys.exit(main())
