"""`python -m cotir_jax.evaluate --results DIR --reference DIR [--metrics psnr,ssim,lpips]`.

Full-reference scores of restored images against references, computed in JAX exactly as
upstream's evaluate.py gets them from pyiqa (spec §16, `cotir_jax.quality`): images are paired
by identical file name, loaded as RGB in [0, 1], scored one pair at a time, and averaged.

`--results` is either a folder of images or, as upstream's `discover_methods`, a folder of
method folders (one more level allowed: `<results>/<method>/{vague,precise}/`); the reference
folder is never scored against itself, so `restore`'s `<out>/reference/` can sit beside
`<out>/vague/` and `<out>/precise/`. Each scored folder gets

    metrics.csv           one row per image: name, then the chosen metrics
    metrics_summary.txt   upstream's two lines, "method & psnr & ssim & lpips" and the means
                          (psnr 2 decimals, others 4), restricted to the chosen metrics

and the summary row is printed. The no-reference metrics upstream also reports (clipiqa+,
qalign, liqe, maclip, clipiqa) are not computed here; the README gives the pyiqa command.
Each distinct image size compiles once.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import sys

import numpy as np

from cotir_jax import cli

METRICS = ("psnr", "ssim", "lpips")  # upstream's full-reference columns, in its order
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SUMMARY_NAME = "metrics_summary.txt"
CSV_NAME = "metrics.csv"


class EvaluationError(cli.UserError, ValueError):
  """A folder without pairs, an unreadable image, mismatched sizes or a NaN score (named)."""


@dataclasses.dataclass(frozen=True)
class Run:
  method: str
  image_dir: str


def list_images(folder: str) -> dict[str, str]:
  """File name → path of every image directly inside `folder` (upstream's suffix list)."""
  return {name: os.path.join(folder, name) for name in sorted(os.listdir(folder))
          if name.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, name))}


def discover_runs(results: str, reference: str) -> list[Run]:
  """Upstream's discover_methods: `results` itself, else its image subfolders (two levels)."""
  if list_images(results):
    return [Run(os.path.basename(os.path.normpath(results)), results)]
  ref = os.path.realpath(reference)

  def subdirs(folder):
    paths = (os.path.join(folder, n) for n in sorted(os.listdir(folder)))
    return [p for p in paths if os.path.isdir(p) and os.path.realpath(p) != ref]

  runs = []
  for method_dir in subdirs(results):
    method = os.path.basename(method_dir)
    if list_images(method_dir):
      runs.append(Run(method, method_dir))
      continue
    runs += [Run(method, sub) for sub in subdirs(method_dir) if list_images(sub)]
  return runs


def load_image(path: str) -> np.ndarray:
  """RGB float32 [H, W, 3] in [0, 1], as upstream: PIL `.convert("RGB")`, then / 255."""
  from PIL import Image
  try:
    with Image.open(path) as img:
      return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
  except (OSError, ValueError) as e:
    raise EvaluationError(f"{path}: cannot read image ({e})") from None


def make_scorer(metrics, lpips_model=None):
  """One jitted function (x, ref) [1, H, W, 3] → {metric: [1]} for the chosen metrics."""
  import jax
  from flax import nnx

  from cotir_jax import quality
  graphdef, state = nnx.split(lpips_model) if lpips_model is not None else (None, None)

  @jax.jit
  def score(lpips_state, x, ref):
    out = {}
    if "psnr" in metrics:
      out["psnr"] = quality.psnr(x, ref)
    if "ssim" in metrics:
      out["ssim"] = quality.ssim(x, ref)
    if "lpips" in metrics:
      out["lpips"] = nnx.merge(graphdef, lpips_state)(x, ref)
    return out

  return lambda x, ref: score(state, x, ref)


def evaluate_run(run: Run, reference: str, metrics, scorer) -> tuple[list[dict], dict[str, float]]:
  """Per-image rows and their means for the pairs of `run.image_dir` and `reference`."""
  from tqdm import tqdm
  results, refs = list_images(run.image_dir), list_images(reference)
  names = sorted(set(results) & set(refs))
  if not names:
    raise EvaluationError(f"no image in {run.image_dir} has a namesake in {reference}")
  unmatched = sorted(set(results) - set(refs))
  if unmatched:
    print(f"[warn] {run.image_dir}: {len(unmatched)} image(s) without a reference, skipped "
          f"(e.g. {unmatched[0]})", file=sys.stderr, flush=True)
  rows = []
  for name in tqdm(names, desc=run.method, dynamic_ncols=True):
    x, ref = load_image(results[name]), load_image(refs[name])
    if x.shape != ref.shape:
      raise EvaluationError(f"{name}: result is {x.shape[1]}×{x.shape[0]} but the reference is "
                            f"{ref.shape[1]}×{ref.shape[0]} pixels")
    try:
      scores = scorer(x[None], ref[None])
    except ValueError as e:  # too small for the SSIM window or AlexNet
      raise EvaluationError(f"{name}: {e}") from None
    row = {"name": name, **{m: float(scores[m][0]) for m in metrics}}
    bad = [m for m in metrics if math.isnan(row[m])]
    if bad:
      raise EvaluationError(f"metric {bad[0]} is NaN for {name}")
    rows.append(row)
  means = {m: sum(r[m] for r in rows) / len(rows) for m in metrics}
  return rows, means


def format_row(method: str, means: dict[str, float]) -> str:
  """Upstream's summary row: psnr with 2 decimals, the others with 4."""
  values = [f"{v:.2f}" if m == "psnr" else f"{v:.4f}" for m, v in means.items()]
  return " & ".join([method, *values])


def write_outputs(run: Run, rows: list[dict], means: dict[str, float]) -> str:
  with open(os.path.join(run.image_dir, CSV_NAME), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["name", *means])
    writer.writeheader()
    writer.writerows(rows)
  summary = os.path.join(run.image_dir, SUMMARY_NAME)
  with open(summary, "w", encoding="utf-8") as f:
    f.write("method & " + " & ".join(means) + "\n" + format_row(run.method, means) + "\n")
  return summary


def parse_metrics(text: str) -> tuple[str, ...]:
  chosen = tuple(m.strip() for m in text.split(",") if m.strip())
  unknown = [m for m in chosen if m not in METRICS]
  if unknown or not chosen:
    raise EvaluationError(f"--metrics {text!r}: unknown {unknown}; allowed: {','.join(METRICS)} "
                          "(no-reference metrics: run pyiqa, see the README)")
  return tuple(m for m in METRICS if m in chosen)  # upstream's column order


def main(argv=None) -> int:
  return cli.run(_main, argv)


def _main(argv) -> int:
  parser = cli.ArgumentParser(prog="python -m cotir_jax.evaluate",
                              description=__doc__.splitlines()[0])
  parser.add_argument("--results", required=True, help="restored images (or method folders)")
  parser.add_argument("--reference", required=True, help="reference (HQ) images, same file names")
  parser.add_argument("--metrics", default=",".join(METRICS),
                      help=f"comma-separated subset of {','.join(METRICS)} (default: all)")
  parser.add_argument("--lpips_weights", default=None,
                      help="LPIPS v0.1 linear layers: lpips' weights/v0.1/alex.pth or pyiqa's "
                           "LPIPS_v0.1_alex-df73285e.pth (default: the pyiqa / lpips caches)")
  parser.add_argument("--alexnet_weights", default=None,
                      help="torchvision alexnet-owt-7be5be79.pth (default: the torch hub cache)")
  args = parser.parse_args(argv)
  try:
    metrics = parse_metrics(args.metrics)
    for flag, folder in (("--results", args.results), ("--reference", args.reference)):
      if not os.path.isdir(folder):
        raise EvaluationError(f"{flag} {folder}: not a directory")
    runs = discover_runs(args.results, args.reference)
    if not runs:
      raise EvaluationError(f"no folder with images under {args.results}")
    lpips_model = None
    if "lpips" in metrics:
      from cotir_jax.convert import ConversionError
      from cotir_jax.convert.lpips import load_lpips
      try:
        lpips_model = load_lpips(args.lpips_weights, args.alexnet_weights)
      except ConversionError as e:
        raise EvaluationError(f"{e} (or leave LPIPS out: --metrics psnr,ssim)") from None
    scorer = make_scorer(metrics, lpips_model)
    for run in runs:
      rows, means = evaluate_run(run, args.reference, metrics, scorer)
      summary = write_outputs(run, rows, means)
      print(format_row(run.method, means), flush=True)
      print(f"{len(rows)} image(s); saved {summary} and {CSV_NAME}", flush=True)
  except ValueError as e:  # EvaluationError, ConversionError
    return cli.report(e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
