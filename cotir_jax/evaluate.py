"""python -m cotir_jax.evaluate --results DIR --reference DIR [--protocol P] [--compare cdd11]

Full-reference scores of restored images against the reference images with the same file
name, computed as one project's evaluation script computes them (`--protocol`; a number is
comparable only with numbers of the same protocol):

  pyiqa       (default) upstream CoTIR's evaluate.py, pyiqa's defaults. PSNR on RGB,
              10·log10(1 / (mse + 1e-8)); SSIM on the rounded YIQ luma ×255, 11×11 Gaussian
              window (σ 1.5), valid filtering; LPIPS v0.1, AlexNet trunk (lpips package).
  onerestore  OneRestore's CDD-11 script (img_file/cal_psnr_ssim.py, which scored every row of
              its CDD-11 table; PromptIR makes the same scikit-image calls). PSNR on RGB,
              10·log10(1 / mse); SSIM per RGB channel, 7×7 uniform window, sample covariance,
              3-pixel border left out, channels averaged. No crop.
  moceir      MoCE-IR's src/test.py. The same PSNR; SSIM per RGB channel with an 11-tap Gaussian
              window (σ 1.5, skimage gaussian_weights=True, sample covariance), 5-pixel border
              left out; LPIPS v0.1, VGG16 trunk, as torchmetrics computes it. On the AiO
              3-task / 5-task sets MoCE-IR and PromptIR crop inputs to a multiple of 16:
              --crop_multiple 16.
  y-channel   BasicSR's basicsr/metrics/psnr_ssim.py with test_y_channel=True (Restormer-style
              single-task papers). Y of ITU-R BT.601 (16..235, unrounded); PSNR
              10·log10(255² / mse); SSIM with the 11×11 Gaussian window (σ 1.5), population
              covariance, valid filtering; --crop_border N as BasicSR's crop_border.

Images are read as RGB in [0, 1] (PIL convert("RGB"), then / 255; 8-bit files), cropped if
asked (--crop_multiple N first: the centred region whose sides are multiples of N, MoCE-IR's
and PromptIR's crop_img; then --crop_border N pixels off every edge), scored one pair at a
time in JAX on any device (each image size compiles once; cotir_jax.quality) and averaged.

pyiqa: --results is a folder of images or, as upstream's discover_methods, of method folders
(one more level allowed: <results>/<method>/{vague,precise}/); each scored folder gets
metrics.csv (one row per image) and metrics_summary.txt (upstream's two lines, "method & psnr
& ssim & lpips" and the means), and the summary row is printed.

onerestore, moceir, y-channel: --results is a folder of images or a folder of degradation-type
folders (CDD-11's layout, what restore writes: restored/<type>/<name>.png scored against
reference/<name>.png). Written into --results and the table printed:

  metrics_<protocol>_images.csv  type, name, one column per metric
  metrics_<protocol>_types.csv   each type's image count and means, then the mean over types
                                 (what CDD-11 tables report: OneRestore's script averages its
                                 11 per-type means) and the mean over all images
  metrics_<protocol>.md          the same as a Markdown table; with --compare cdd11 the
                                 published CDD-11 averages beside this run's, sources named

The reference folder is never scored against itself, so it may sit inside --results.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import sys

import numpy as np

from cotir_jax import cli
from cotir_jax.data.paired import IMAGE_SUFFIXES
from cotir_jax.quality import PROTOCOLS, Protocol

METRICS = ("psnr", "ssim", "lpips")  # upstream's full-reference columns, in its order
SUMMARY_NAME = "metrics_summary.txt"
CSV_NAME = "metrics.csv"
DEFAULT_PROTOCOL = "pyiqa"
MEAN_OVER_TYPES, MEAN_OVER_IMAGES = "mean over types", "mean over images"


class EvaluationError(cli.UserError, ValueError):
  """A user's mistake: a bad flag, a folder without pairs, an unreadable image, mismatched
  sizes, a NaN score or missing LPIPS weights (named)."""


@dataclasses.dataclass(frozen=True)
class Run:
  method: str  # a method or prompt variant (pyiqa layout), or a degradation type
  image_dir: str


@dataclasses.dataclass(frozen=True)
class Published:
  method: str
  psnr: str  # as printed in the source, digits kept
  ssim: str
  protocol: str  # the protocol of `cotir_jax.quality.PROTOCOLS` its number was computed with
  source: int  # index into its benchmark's `sources`


@dataclasses.dataclass(frozen=True)
class Benchmark:
  name: str
  types: tuple[str, ...]  # its degradation-type folders, in its tables' order
  rows: tuple[Published, ...]
  sources: tuple[str, ...]


BENCHMARKS = {
    "cdd11": Benchmark(
        "CDD-11",
        ("low", "haze", "rain", "snow", "low_haze", "low_rain", "low_snow", "haze_rain",
         "haze_snow", "low_haze_rain", "low_haze_snow"),
        (Published("Input (degraded, unrestored)", "16.00", "0.6008", "onerestore", 1),
         Published("AirNet (CVPR 2022)", "23.75", "0.8140", "onerestore", 1),
         Published("PromptIR (NeurIPS 2023)", "25.90", "0.8499", "onerestore", 1),
         Published("OneRestore (ECCV 2024)", "28.47", "0.8784", "onerestore", 1),
         Published("MoCE-IR (CVPR 2025)", "29.05", "0.881", "moceir", 2)),
        ("OneRestore's README, table 'Performance / CDD-11' (github.com/gy65896/OneRestore), "
         "every row scored by its img_file/cal_psnr_ssim.py; each average is the mean of the 11 "
         "per-type means in its img_file/metrics_CDD-11_psnr_ssim.xlsx (200 test images a type)",
         "MoCE-IR's paper (arXiv 2411.18466), CDD-11 table, as later papers quote it; UNVERIFIED "
         "here: neither MoCE-IR's README nor its code states it")),
}


def list_images(folder: str) -> dict[str, str]:
  """File name → path of every image directly inside `folder` (upstream's suffix list)."""
  return {name: os.path.join(folder, name) for name in sorted(os.listdir(folder))
          if name.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, name))}


def discover_runs(results: str, reference: str, nested: bool = True) -> list[Run]:
  """`results` itself if it holds images, else its image subfolders; `nested` also looks one
  level deeper (upstream's discover_methods: <method>/{vague,precise}/)."""
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
    elif nested:
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


def crop(image: np.ndarray, border: int = 0, multiple: int = 0) -> np.ndarray:
  """The centred region whose sides are multiples of `multiple` (MoCE-IR's / PromptIR's
  crop_img), then `border` pixels off every edge (BasicSR's crop_border)."""
  if multiple:
    h, w = image.shape[:2]
    dh, dw = h % multiple, w % multiple
    image = image[dh // 2:h - dh + dh // 2, dw // 2:w - dw + dw // 2]
  if border:
    image = image[border:-border, border:-border]
  return image


def make_scorer(protocol: Protocol, metrics, lpips_model=None):
  """One jitted function (x, ref) [1, H, W, 3] → {metric: [1]} for the chosen metrics."""
  import jax
  from flax import nnx
  graphdef, state = nnx.split(lpips_model) if lpips_model is not None else (None, None)
  functions = {"psnr": protocol.psnr, "ssim": protocol.ssim}

  @jax.jit
  def score(lpips_state, x, ref):
    out = {m: functions[m](x, ref) for m in metrics if m != "lpips"}
    if "lpips" in metrics:
      out["lpips"] = nnx.merge(graphdef, lpips_state)(x, ref)
    return out

  return lambda x, ref: score(state, x, ref)


def evaluate_run(run: Run, reference: str, metrics, scorer, *, crop_border: int = 0,
                 crop_multiple: int = 0) -> tuple[list[dict], dict[str, float]]:
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
    x, ref = crop(x, crop_border, crop_multiple), crop(ref, crop_border, crop_multiple)
    try:
      scores = scorer(x[None], ref[None])
    except ValueError as e:  # smaller than the SSIM window or the LPIPS trunk (after a crop)
      raise EvaluationError(f"{name}: {e}") from None
    row = {"name": name, **{m: float(scores[m][0]) for m in metrics}}
    bad = [m for m in metrics if math.isnan(row[m])]
    if bad:
      raise EvaluationError(f"metric {bad[0]} is NaN for {name}")
    rows.append(row)
  means = {m: sum(r[m] for r in rows) / len(rows) for m in metrics}
  return rows, means


# ----------------------------------------------------------------------------- pyiqa layout

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


# ----------------------------------------------------------------------------- type tables

def type_summary(scored: dict[str, list[dict]], metrics) -> list[tuple[str, int, dict]]:
  """(label, images, means) per type, then the mean over types and over all images when
  there is more than one type."""
  table = [(t, len(rows), {m: float(np.mean([r[m] for r in rows])) for m in metrics})
           for t, rows in scored.items()]
  if len(table) > 1:
    every = [r for rows in scored.values() for r in rows]
    table.append((MEAN_OVER_TYPES, len(every),
                  {m: float(np.mean([means[m] for _, _, means in table])) for m in metrics}))
    table.append((MEAN_OVER_IMAGES, len(every),
                  {m: float(np.mean([r[m] for r in every])) for m in metrics}))
  return table


def _fmt(metric: str, value: float) -> str:
  return f"{value:.2f}" if metric == "psnr" else f"{value:.4f}"


def markdown_table(table, metrics) -> list[str]:
  lines = ["| type | images | " + " | ".join(m.upper() for m in metrics) + " |",
           "|:--|--:|" + "--:|" * len(metrics)]
  for label, n, means in table:
    label = f"**{label}**" if label == MEAN_OVER_TYPES else label
    lines.append(f"| {label} | {n} | " + " | ".join(_fmt(m, means[m]) for m in metrics) + " |")
  return lines


def compare_lines(benchmark: Benchmark, protocol: str, table, metrics) -> list[str]:
  """This run's mean over types beside the benchmark's published averages, sources named."""
  types = [label for label, _, _ in table if label not in (MEAN_OVER_TYPES, MEAN_OVER_IMAGES)]
  label, n, ours = table[-2] if len(table) > 1 else table[0]
  cell = lambda m: _fmt(m, ours[m]) if m in metrics else "-"
  lines = [f"Published {benchmark.name} averages beside this run's mean over types:", "",
           "| method | PSNR | SSIM | protocol | source |", "|:--|--:|--:|:--|:--|",
           f"| **this run** | {cell('psnr')} | {cell('ssim')} | {protocol} | "
           f"{len(types)} type(s), {n} image(s) |"]
  for row in benchmark.rows:
    mark = "" if row.protocol == protocol else " (other protocol)"
    lines.append(f"| {row.method} | {row.psnr} | {row.ssim} | {row.protocol}{mark} | "
                 f"[{row.source}] |")
  lines += ["", *(f"[{i}] {source}" for i, source in enumerate(benchmark.sources, 1))]
  notes = []
  missing = [t for t in benchmark.types if t not in types]
  foreign = [t for t in types if t not in benchmark.types]
  if missing or foreign:
    notes.append(f"this run's folders are not {benchmark.name}'s {len(benchmark.types)} types "
                 f"(missing: {', '.join(missing) or 'none'}; not {benchmark.name}'s: "
                 f"{', '.join(foreign) or 'none'}), so its mean is not comparable")
  others = sorted({r.protocol for r in benchmark.rows} - {protocol})
  if others:
    notes.append(f"rows of another protocol than this run's ({protocol}) were computed "
                 f"differently: compare them with a run of --protocol {' / '.join(others)}")
  return lines + [""] * bool(notes) + [f"note: {n}" for n in notes]


def write_type_outputs(results: str, protocol_name: str, scored: dict[str, list[dict]], metrics,
                       compare: str | None) -> tuple[list[str], list[str]]:
  """The images CSV, the types CSV and the Markdown table in `results`: (paths, printed lines)."""
  table = type_summary(scored, metrics)
  stem = os.path.join(results, f"metrics_{protocol_name}")
  with open(stem + "_images.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["type", "name", *metrics])
    writer.writeheader()
    writer.writerows({"type": t, **row} for t, rows in scored.items() for row in rows)
  with open(stem + "_types.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["type", "images", *metrics])
    writer.writerows([label, n, *(means[m] for m in metrics)] for label, n, means in table)
  lines = [f"Protocol {protocol_name}: {PROTOCOLS[protocol_name].source}", "",
           *markdown_table(table, metrics)]
  if compare:
    lines += ["", *compare_lines(BENCHMARKS[compare], protocol_name, table, metrics)]
  with open(stem + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join(lines).rstrip() + "\n")
  return [stem + "_images.csv", stem + "_types.csv", stem + ".md"], lines


def order_types(runs: list[Run]) -> list[Run]:
  """A known benchmark's type order (its tables' columns) when every folder is one of its
  types, else alphabetical."""
  names = {r.method for r in runs}
  for bench in BENCHMARKS.values():
    if names <= set(bench.types):
      return sorted(runs, key=lambda r: bench.types.index(r.method))
  return runs


# ----------------------------------------------------------------------------- the CLI

def parse_metrics(text: str | None, protocol_name: str) -> tuple[str, ...]:
  offered = PROTOCOLS[protocol_name].metrics
  if text is None:
    return offered
  chosen = tuple(m.strip() for m in text.split(",") if m.strip())
  unknown = [m for m in chosen if m not in offered]
  if unknown or not chosen:
    raise EvaluationError(f"--metrics {text!r}: unknown {unknown}; the {protocol_name} protocol "
                          f"reports {','.join(offered)} (no-reference metrics: run pyiqa, see "
                          "the README)")
  return tuple(m for m in METRICS if m in chosen)  # upstream's column order


def check_flags(args, metrics) -> None:
  """Every flag acts or is refused: weights only for the LPIPS trunk that is computed, the
  comparison only for the type tables, crops non-negative."""
  spec = PROTOCOLS[args.protocol].lpips if "lpips" in metrics else None
  net = spec["net"] if spec else None
  for flag, value, needs in (("--lpips_weights", args.lpips_weights, spec is not None),
                             ("--alexnet_weights", args.alexnet_weights, net == "alex"),
                             ("--vgg_weights", args.vgg_weights, net == "vgg")):
    if value is not None and not needs:
      used = f"its LPIPS uses the {'AlexNet' if net == 'alex' else 'VGG16'} trunk" if net else \
          "LPIPS is not computed"
      raise EvaluationError(f"{flag} {value}: not used with --protocol {args.protocol} and "
                            f"--metrics {','.join(metrics)} ({used})")
  if args.compare and args.protocol == "pyiqa":
    raise EvaluationError(f"--compare {args.compare}: published averages are per-type tables "
                          "of the field's protocols; pass --protocol onerestore (or moceir)")
  for flag, value in (("--crop_border", args.crop_border), ("--crop_multiple", args.crop_multiple)):
    if value < 0:
      raise EvaluationError(f"{flag} {value}: must be >= 0")
  for flag, folder in (("--results", args.results), ("--reference", args.reference)):
    if not os.path.isdir(folder):
      raise EvaluationError(f"{flag} {folder}: not a directory")


def load_lpips_model(args):
  from cotir_jax.convert import ConversionError
  from cotir_jax.convert.lpips import load_lpips
  spec = PROTOCOLS[args.protocol].lpips
  trunk = args.alexnet_weights if spec["net"] == "alex" else args.vgg_weights
  try:
    return load_lpips(args.lpips_weights, trunk, **spec)
  except ConversionError as e:
    raise EvaluationError(f"{e} (or leave LPIPS out: --metrics psnr,ssim)") from None


def _parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m cotir_jax.evaluate", description=__doc__)
  p.add_argument("--results", required=True,
                 help="restored images, or folders of them (methods, or degradation types)")
  p.add_argument("--reference", required=True, help="reference (HQ) images, same file names")
  p.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=sorted(PROTOCOLS),
                 help=f"how the metrics are computed (default: {DEFAULT_PROTOCOL}; see above)")
  p.add_argument("--metrics", default=None,
                 help="comma-separated subset of the protocol's metrics (default: all of them: "
                      "psnr,ssim,lpips for pyiqa and moceir, psnr,ssim for the others)")
  p.add_argument("--crop_border", type=int, default=0,
                 help="pixels cut off every edge before scoring (BasicSR's crop_border)")
  p.add_argument("--crop_multiple", type=int, default=0,
                 help="score the centred region whose sides are multiples of N (MoCE-IR's and "
                      "PromptIR's crop to 16 on the AiO 3-task / 5-task sets)")
  p.add_argument("--compare", choices=sorted(BENCHMARKS), default=None,
                 help="print the benchmark's published averages beside this run's, each with "
                      "its source")
  p.add_argument("--lpips_weights", default=None,
                 help="LPIPS v0.1 linear layers for the protocol's trunk: lpips' weights/v0.1/"
                      "alex.pth (pyiqa) or vgg.pth (moceir; torchmetrics ships the same), or "
                      "pyiqa's LPIPS_v0.1_{alex-df73285e,vgg-a78928a0}.pth (default: the "
                      "pyiqa / lpips / torchmetrics caches)")
  p.add_argument("--alexnet_weights", default=None,
                 help="pyiqa protocol: torchvision alexnet-owt-7be5be79.pth (default: the torch "
                      "hub cache)")
  p.add_argument("--vgg_weights", default=None,
                 help="moceir protocol: torchvision vgg16-397923af.pth (default: the torch hub "
                      "cache)")
  return p


def _score_pyiqa(args, runs, metrics, scorer) -> None:
  for run in runs:
    rows, means = evaluate_run(run, args.reference, metrics, scorer,
                               crop_border=args.crop_border, crop_multiple=args.crop_multiple)
    summary = write_outputs(run, rows, means)
    print(format_row(run.method, means), flush=True)
    print(f"{len(rows)} image(s); saved {summary} and {CSV_NAME}", flush=True)


def _score_types(args, runs, metrics, scorer) -> None:
  scored = {}
  for run in order_types(runs):
    scored[run.method], _ = evaluate_run(run, args.reference, metrics, scorer,
                                         crop_border=args.crop_border,
                                         crop_multiple=args.crop_multiple)
  paths, lines = write_type_outputs(args.results, args.protocol, scored, metrics, args.compare)
  print("\n".join(lines), flush=True)
  print(f"saved {', '.join(paths)}", flush=True)


def main(argv=None) -> int:
  return cli.run(_main, argv)


def _main(argv) -> int:
  args = _parser().parse_args(argv)
  metrics = parse_metrics(args.metrics, args.protocol)
  check_flags(args, metrics)
  pyiqa_layout = args.protocol == "pyiqa"
  runs = discover_runs(args.results, args.reference, nested=pyiqa_layout)
  if not runs:
    raise EvaluationError(f"no images in {args.results} or its subfolders"
                          + (" (nor one level deeper)" if pyiqa_layout else ""))
  lpips_model = load_lpips_model(args) if "lpips" in metrics else None
  scorer = make_scorer(PROTOCOLS[args.protocol], metrics, lpips_model)
  (_score_pyiqa if pyiqa_layout else _score_types)(args, runs, metrics, scorer)
  return 0


if __name__ == "__main__":
  sys.exit(main())
