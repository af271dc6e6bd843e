"""`python -m cotir_jax.demo`: restore an uploaded image in a web page (Gradio).

    pip install -e ".[demo]"
    python -m cotir_jax.demo [--config configs/tiny.py] [--weights runs/tiny] [--host 127.0.0.1]
        [--port 7860] [--share] [--examples data/sample_val] [--config.a.b=v ...]

`--config` and `--weights` are restore's (`python -m cotir_jax.restore --help`); without them the
demo serves the quick start: configs/tiny.py with the workdir runs/tiny, or, before that run
exists, the tiny pretrained base alone (which copies the image rather than restoring it). The
page takes an image (upload, paste, or one of the held-out LQ examples), a prompt (upstream's
generic one, a degradation-specific one or any text), Euler steps, seed and a maximum long edge;
it shows the result beside the input, a before/after slider, a PNG download and the time taken.
Everything goes through `cotir_jax.restore.Restorer`: one compile per size bucket, which the
page announces while it runs.

Uploads: larger than `data.max_image_pixels` (read from the header, nothing decoded) or not a
readable image, they are answered with a message. The uploaded file is deleted once its request
is answered (the page keeps the decoded image in memory for further tries in the same session);
what the page displays is served from Gradio's cache, emptied of files older than 10 minutes
every minute and entirely on exit. The server listens on 127.0.0.1 unless `--host` (e.g.
0.0.0.0) or `--share` (a public gradio.live link) says otherwise.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cotir_jax import cli
from cotir_jax import config as config_lib

DEFAULT_CONFIG = "configs/tiny.py"
DEFAULT_WEIGHTS = "runs/tiny"
DEFAULT_EXAMPLES = "data/sample_val"
CACHE_SWEEP = (60, 600)  # every minute, delete cached files older than 10 minutes


class DemoError(cli.UserError, ValueError):
  """A bad argument or upload; the message is what the user reads."""


# ----------------------------------------------------------------------------- images

def read_upload(path: str, max_pixels: int) -> np.ndarray:
  """uint8 RGB [H, W, 3] of an uploaded file, converted as restore converts its inputs; the
  size is checked from the header before anything is decoded."""
  from cotir_jax.restore import to_rgb
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      with Image.open(path) as im:
        w, h = im.size
        if w * h > max_pixels:
          raise DemoError(f"the image is {w}×{h} = {w * h:,} pixels, more than this demo takes "
                          f"(data.max_image_pixels = {max_pixels:,}); shrink it first")
        im.load()
        return np.asarray(to_rgb(im))
  except DemoError:
    raise
  except Image.DecompressionBombError:
    raise DemoError(f"the image has more than {max_pixels:,} pixels; shrink it first") from None
  except Exception as e:  # noqa: BLE001 - whatever PIL raises for a broken or foreign file
    raise DemoError(f"this file is not an image that can be read ({type(e).__name__}: {e})") from None


def extract_examples(bench_dir: str, out_dir: str) -> list[str]:
  """The LQ image of every sample of a CoTIR-Bench directory, as `<out_dir>/<key>.png`."""
  from cotir_jax.data.sources import TarSource, resolve_layout
  root, _ = resolve_layout(bench_dir)
  source = TarSource(root, cache_dir=None)
  paths = []
  for i in range(len(source)):
    record = source[i]
    if record.lq is None:
      continue
    path = os.path.join(out_dir, f"{record.key.replace('/', '_')}.png")
    Path(path).write_bytes(record.lq)
    paths.append(path)
  return paths


def _digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


# ----------------------------------------------------------------------------- the model side

class Demo:
  """The restorer behind the page: requests run one at a time; the first image of each size
  bucket compiles the sampler (`Restorer.compiles` counts them)."""

  def __init__(self, cfg, weights: Sequence[str] | None):
    from cotir_jax.restore import Restorer
    self.cfg = cfg
    self.restorer = Restorer(cfg)
    self.restorer.load(weights)
    self.lock = threading.Lock()

  def bucket(self, height: int, width: int, max_long_edge: int | None) -> tuple[int, int]:
    from cotir_jax.restore import bucket_of, capped_size, work_size
    w, h = capped_size(width, height, max_long_edge)
    return bucket_of(*work_size(h, w))

  def needs_compile(self, image: np.ndarray, max_long_edge: int | None) -> bool:
    return self.bucket(*image.shape[:2], max_long_edge) not in self.restorer.compiles

  def restore(self, image: np.ndarray, prompt: str, *, num_steps: int, seed: int,
              max_long_edge: int | None) -> tuple[np.ndarray, np.ndarray, float]:
    """(input as restored, i.e. capped to max_long_edge, result, seconds) for a uint8 image."""
    from cotir_jax.restore import Job, capped_size
    h, w = image.shape[:2]
    size = capped_size(w, h, max_long_edge)
    shown = image if size == (w, h) else np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))
    with self.lock, tempfile.TemporaryDirectory(prefix="cotir-demo-") as tmp:
      out = os.path.join(tmp, "result.png")
      job = Job(name="upload", open=lambda: Image.fromarray(image), prompt=prompt, out=out, index=0)
      t0 = time.perf_counter()
      summary = self.restorer.restore([job], num_steps=num_steps, seed=seed,
                                      max_long_edge=max_long_edge, progress=False)
      seconds = time.perf_counter() - t0
      if not summary["restored"]:
        reason = summary["skipped"][0][1] if summary["skipped"] else "nothing was restored"
        raise DemoError(f"could not restore this image: {reason}")
      with Image.open(out) as im:
        result = np.asarray(im.convert("RGB"))
    return shown, result, seconds


# ----------------------------------------------------------------------------- the page

def presets(cfg, bench_dir: str | None) -> dict[str, str]:
  """Prompt presets: upstream's generic prompt, then the first specific prompt of each
  degradation type of the examples' prompt folder."""
  out = {f"Generic: {cfg.inference.prompt}": cfg.inference.prompt}
  if bench_dir:
    from cotir_jax.data.sources import resolve_layout
    _, prompts = resolve_layout(bench_dir)
    folder = prompts / "spe_prompt" if prompts is not None else None
    if folder is not None and folder.is_dir():
      for f in sorted(folder.glob("*.txt")):
        lines = [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        if lines:
          out[f"{f.stem.replace('_', ' ')}: {lines[0]}"] = lines[0]
  return out


def build_app(demo: Demo, examples: list[str], prompt_presets: dict[str, str], note: str):
  """The Gradio Blocks of the page; its endpoint `/restore` takes (image, prompt, steps, seed,
  max long edge) and answers (result, (input as restored, result), status)."""
  import gradio as gr
  cfg = demo.cfg
  max_pixels = int(cfg.data.max_image_pixels)
  protected = {_digest(p) for p in examples}  # example files are never deleted
  default_edge = int(cfg.inference.max_long_edge or 512)

  def discard(path: str | None) -> None:
    if path and os.path.isfile(path) and _digest(path) not in protected:
      os.remove(path)

  def run(upload, prompt, steps, seed, max_edge, held):
    """A generator: a status line first (announcing a compile), then the results."""
    path = upload.get("path") if isinstance(upload, dict) else upload
    nothing = (None, None)
    try:
      if not path:
        raise DemoError("upload an image first (or pick an example)")
      if os.path.isfile(path):
        image = read_upload(path, max_pixels)
        held = (path, image)
      elif held is not None and held[0] == path:
        image = held[1]  # this session's image; its file was deleted after the last answer
      else:
        raise DemoError("the uploaded file is gone; upload the image again")
      prompt = (prompt or "").strip() or cfg.inference.prompt
      edge = int(max_edge) if max_edge else None
      if edge is not None and edge < 16:
        raise DemoError("the maximum long edge must be at least 16 pixels")
      steps, seed = int(steps), int(seed)
      if demo.needs_compile(image, edge):
        hb, wb = demo.bucket(*image.shape[:2], edge)
        yield (*nothing, f"Compiling the sampler for {wb}×{hb} images (once per size bucket; "
                         "the next images of this size start at once)…", held)
      shown, result, seconds = demo.restore(image, prompt, num_steps=steps, seed=seed,
                                            max_long_edge=edge)
      h, w = result.shape[:2]
      yield (result, (shown, result),
             f"Restored {w}×{h} in {seconds:.1f} s ({steps} Euler steps, seed {seed}; "
             f"prompt “{prompt}”).", held)
    except DemoError as e:
      yield (*nothing, f"**Cannot restore:** {e}", held)
    finally:
      discard(path)

  with gr.Blocks(title="CoTIR restoration", delete_cache=CACHE_SWEEP) as app:
    gr.Markdown(f"## CoTIR image restoration\n{note}")
    held = gr.State(None)
    with gr.Row():
      upload = gr.Image(label="Input (LQ)", type="filepath", sources=["upload", "clipboard"],
                        elem_id="input")
      result = gr.Image(label="Restored", type="numpy", format="png", interactive=False,
                        buttons=["download"], elem_id="result")
    with gr.Row():
      with gr.Column():
        preset = gr.Dropdown(list(prompt_presets), value=next(iter(prompt_presets)),
                             label="Prompt preset")
        prompt = gr.Textbox(value=next(iter(prompt_presets.values())), label="Prompt", lines=2)
        with gr.Row():
          steps = gr.Slider(1, 50, value=int(cfg.inference.num_steps), step=1,
                            label="Euler steps")
          seed = gr.Number(value=int(cfg.inference.seed), precision=0, label="Seed")
          edge = gr.Slider(16, 2048, value=default_edge, step=16, label="Max long edge (px)")
        button = gr.Button("Restore", variant="primary", elem_id="restore")
        status = gr.Markdown(label="status", elem_id="status")
      slider = gr.ImageSlider(label="Before / after", type="numpy", format="png",
                              interactive=False, elem_id="slider")
    if examples:
      gr.Examples(examples=[[p] for p in examples], inputs=[upload],
                  label="Held-out examples (LQ images of data/sample_val)")
    preset.change(lambda k: prompt_presets.get(k, ""), preset, prompt, api_name=False)
    button.click(run, [upload, prompt, steps, seed, edge, held],
                 [result, slider, status, held], api_name="restore", preprocess=False,
                 concurrency_limit=1)
  return app


# ----------------------------------------------------------------------------- CLI

def _parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m cotir_jax.demo", description=__doc__,
                         config="optional")
  p.add_argument("--weights", nargs="+", default=None,
                 help=f"as restore's --weights (default {DEFAULT_WEIGHTS} when it exists, else "
                      "the base model alone)")
  p.add_argument("--host", default="127.0.0.1",
                 help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: "
                      "every interface)")
  p.add_argument("--port", type=int, default=7860)
  p.add_argument("--share", action="store_true", help="also publish a public gradio.live link")
  p.add_argument("--examples", default=DEFAULT_EXAMPLES,
                 help="CoTIR-Bench directory whose LQ images are offered as examples ('' for none)")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  if not any(a == "--config" or a.startswith("--config=") for a in argv) and not (
      {"-h", "--help"} & set(argv)):
    argv = ["--config", DEFAULT_CONFIG] + argv
  cfg, args = cli.parse(_parser(), argv)
  try:
    import gradio  # noqa: F401
  except ImportError:
    raise DemoError("Gradio is not installed: pip install -e \".[demo]\"") from None
  weights, note = args.weights, ""
  if weights is None:
    if os.path.isdir(DEFAULT_WEIGHTS):
      weights = [DEFAULT_WEIGHTS]
      note = f"Weights: `{DEFAULT_WEIGHTS}` (the quick start's run)."
    else:
      note = (f"`{DEFAULT_WEIGHTS}` does not exist yet: this is the tiny pretrained base "
              "alone, which copies images rather than restoring them. Run the quick start "
              f"(`python -m cotir_jax.train --config {DEFAULT_CONFIG} --workdir "
              f"{DEFAULT_WEIGHTS}`) and start the demo again.")
      print(f"cotir_jax: {DEFAULT_WEIGHTS} not found; serving the base model without "
            "fine-tuned weights", file=sys.stderr)
  else:
    for w in weights:
      if not os.path.exists(w):
        raise DemoError(f"--weights {w!r} does not exist")
    note = f"Weights: `{' '.join(weights)}`."
  bench = args.examples or None
  if bench and not os.path.isdir(bench):
    bench = os.path.join(config_lib.REPO_ROOT, bench)
    if not os.path.isdir(bench):
      raise DemoError(f"--examples {args.examples!r} does not exist")
  from cotir_jax.compiler import configure_compiler
  configure_compiler(cfg)
  demo = Demo(cfg, weights)
  with tempfile.TemporaryDirectory(prefix="cotir-demo-examples-") as tmp:
    examples = extract_examples(bench, tmp) if bench else []
    app = build_app(demo, examples, presets(cfg, bench), note)
    print(f"cotir_jax: demo on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    app.queue().launch(server_name=args.host, server_port=args.port, share=args.share,
                       max_file_size=8 * int(cfg.data.max_image_pixels), show_error=True,
                       allowed_paths=[tmp])
  return 0


if __name__ == "__main__":
  sys.exit(main())
