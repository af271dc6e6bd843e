"""python convert/orbax_to_cotir.py --checkpoint <workdir | step dir | cotir_to_orbax out> --out <dir> [--format pt|safetensors]

Our LoRA + CoT adapter back to upstream's `lora.pt` / `cot_adapter.pt` (bfloat16 tensors,
upstream key names; `--dtype float32` keeps full precision) or `.safetensors` with the same
keys. With `--config path [--config.a.b=v]`, names and shapes are checked against that model.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv=None):
  from cotir_jax import config
  from cotir_jax.convert import ConversionError, orbax_to_cotir
  argv = list(sys.argv[1:] if argv is None else argv)
  cfg = None
  if any(a == "--config" or a.startswith("--config") for a in argv):
    try:
      cfg, argv = config.parse_cli(argv)
    except config.ConfigError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--format", default="pt", choices=["pt", "safetensors"])
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "keep"])
  args = p.parse_args(argv)
  try:
    written = orbax_to_cotir(args.checkpoint, args.out, args.format,
                             None if args.dtype == "keep" else args.dtype, cfg=cfg)
  except (ConversionError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print("wrote " + ", ".join(written.values()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
