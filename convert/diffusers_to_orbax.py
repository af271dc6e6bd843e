"""python convert/diffusers_to_orbax.py --src <HF repo dir> [--transformer <BFL file>] --out <dir> [--dtype bfloat16|float32]

Converts a FLUX.2-klein or FLUX.1-Kontext diffusers repository (or, with a bare transformer
directory, just the transformer) into one Orbax checkpoint of the frozen base weights plus
manifest.json and the tokenizers (layout: `cotir_jax.convert.base`). `--transformer` reads the
transformer from BFL's single file instead (flux-2-klein-4b.safetensors, flux-2-klein-9b.safetensors,
flux1-kontext-dev.safetensors); the VAE, text encoders and tokenizers still come from --src.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work

from cotir_jax import cli  # noqa: E402  (after the path set-up above)


def _main(argv):
  p = cli.ArgumentParser(prog="convert/diffusers_to_orbax.py", description=__doc__)
  p.add_argument("--src", default=None, help="diffusers repo dir (or bare transformer/ dir)")
  p.add_argument("--transformer", default=None,
                 help="BFL single-file transformer used instead of <src>/transformer/")
  p.add_argument("--out", required=True, help="output directory (must not exist)")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--only", nargs="+", default=None,
                 help="convert only these modules (transformer vae text_encoder clip)")
  p.add_argument("--hidden-layers", type=int, nargs="+", default=None,
                 help="Qwen3 hidden states fed to the transformer (default 9 18 27)")
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)
  if args.src is None and args.transformer is None:
    p.error("give --src (a diffusers repository) and/or --transformer (a BFL single file)")
  from cotir_jax.convert import diffusers_to_orbax
  m = diffusers_to_orbax(args.src, args.out, args.dtype, transformer=args.transformer,
                         only=args.only, hidden_layers=args.hidden_layers,
                         overwrite=args.overwrite)
  counts = ", ".join(f"{k} {v['parameters']:,}" for k, v in m["modules"].items())
  print(f"wrote {args.out} ({m['layout']}, {m['dtype']}): {counts}")
  return 0


def main(argv=None):
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
