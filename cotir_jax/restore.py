"""`python -m cotir_jax.restore`: restore images with trained or released CoTIR weights.

    python -m cotir_jax.restore --config configs/cotir_4b.py --weights W --input PATH --out DIR
        [--prompt TEXT] [--num_steps N] [--seed S] [--max_long_edge PX] [--batch_size B] [--ema]

W: a training workdir (its newest checkpoint), one checkpoint step, a trainable-weights
checkpoint of `convert/cotir_to_orbax.py`, a directory holding upstream's `lora.pt` and
`cot_adapter.pt` (or `.safetensors`), or those two files. `--ema` takes the moving average
of the weights that a training checkpoint keeps with `training.ema_decay` > 0 (an error for
any other W). The frozen base comes from
`model.pretrained`; without it (the tiny configs) it is initialised from `seed` exactly as
training initialised it.

PATH: an image; a directory of images (upstream inference.py's suffixes) → `<out>/<stem>.png`;
upstream's test JSONL (`lq_path` or `id`, `gen_prompt`, `spe_prompt`) → `<out>/vague/` (generic
prompt) and `<out>/precise/` (specific prompt), as upstream's test.py; a CoTIR-Bench layout
(`[image/]<type>/*.tar`, e.g. data/sample) → `<out>/restored/<key>.png` plus the HQ images as
`<out>/reference/<key>.png`; or a paired layout (a CDD-11 split, `hq/` + `lq/[<type>/]`, a JSONL
manifest of `lq` / `hq` pairs; data/paired.py) → `<out>/restored/<type>/<stem>.png` per degraded
image and its clean image once as `<out>/reference/<stem>.png`. The last two are ready for
`python -m cotir_jax.evaluate`. Every image of a directory or layout gets `--prompt`, else
`inference.prompt`.

Per image, as upstream's inference.py: converted to RGB (16-bit grayscale scaled to 8 bits),
shrunk to `--max_long_edge` (PIL bicubic) if asked, resized with torch's bicubic to the
multiple of 16 below its size, restored, resized back to its own size and saved with the
truncating uint8 cast. Mixed sizes share compiled programs: the working image is reflect-padded
to the next bucket size of a ladder (16, 32, 48, 64, 80, 96, 112, 128, 160, ...: P, 1.25P,
1.5P, 1.75P per power of two P ≥ 64, at most 25% padding per side) and cropped after decoding,
each image keeping the schedule of its own token count, so a directory compiles once per bucket
(counted; `Restorer.compiles`). Batches are sharded over the mesh's data × fsdp devices; with
`model.lora.merge_for_inference` LoRA is folded into the base weights once, as upstream merges
it (its test configs leave it unmerged, the default here). The noise of image i is drawn from
fold_in(key(seed), i), whatever its batch and position. An unreadable image is reported by name
and skipped.

Multi-host (`--distributed`, the flags of `python -m cotir_jax.train`; every host runs the same
command and sees the same --input and --weights): the mesh spans every chip of the slice, the
base weights are sharded over all of them as in training, and each batch is one SPMD sampler
call in which each host loads and writes only the images its chips hold (an image held by
several hosts is written by the first), so outputs never collide and equal a 1-host run's.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image
from tqdm import tqdm

from cotir_jax import cli
from cotir_jax import config as config_lib
from cotir_jax import models, multihost, sharding
from cotir_jax import sample as sampler
from cotir_jax.convert import cotir as cotir_files
from cotir_jax.data import paired
from cotir_jax.modules import build_states, build_tokenizers
from cotir_jax.compiler import configure_compiler

IMAGE_SUFFIXES = paired.IMAGE_SUFFIXES  # upstream inference.py's
PROMPT_DIRS = {"gen_prompt": "vague", "spe_prompt": "precise"}  # upstream test.py
RESULTS_DIR, REFERENCE_DIR = "restored", "reference"


class RestoreError(cli.UserError, ValueError):
  """Bad arguments or an input that cannot be read at all; the message names it."""


# ----------------------------------------------------------------------------- inputs

@dataclasses.dataclass(frozen=True)
class Job:
  """One restoration: an LQ image, its prompt and where the result goes."""
  name: str                                   # how messages name the image
  open: Callable[[], Image.Image]             # the LQ image (lazy; header first)
  prompt: str
  out: str                                    # result PNG
  index: int                                  # noise stream: one per image, shared by prompts
  reference: tuple[Callable[[], Image.Image], str] | None = None  # (HQ image, its PNG)


def _from_file(path: str) -> Callable[[], Image.Image]:
  return lambda: Image.open(path)


def _from_bytes(get: Callable[[], bytes | None], what: str) -> Callable[[], Image.Image]:
  def open_():
    data = get()
    if data is None:
      raise OSError(f"the record has no {what}")
    return Image.open(io.BytesIO(data))
  return open_


def _read_prompt(prompt: str) -> str:
  """`--prompt` is the text itself or, as in upstream's inference.py, a .txt file holding it."""
  if not os.path.isfile(prompt):
    return prompt
  text = Path(prompt).read_text(encoding="utf-8").strip()
  if not text:
    raise RestoreError(f"--prompt file {prompt!r} is empty")
  return text


def _bench_jobs(path: str, out: str, prompt: str, cache_dir) -> list[Job]:
  from cotir_jax.data.sources import TarSource, resolve_layout
  root, _ = resolve_layout(path)
  source = TarSource(root, cache_dir=cache_dir)
  jobs = []
  for i in range(len(source)):
    record = source[i]
    name = record.key.replace("/", "_")
    jobs.append(Job(name=f"{record.shard}:{record.key}",
                    open=_from_bytes(lambda i=i: source[i].lq, "lq.png"), prompt=prompt,
                    out=os.path.join(out, RESULTS_DIR, f"{name}.png"), index=i,
                    reference=(_from_bytes(lambda i=i: source[i].hq, "hq.png"),
                               os.path.join(out, REFERENCE_DIR, f"{name}.png"))))
  return jobs


def _pair_jobs(path: str, out: str, prompt: str, skipped: list) -> list[Job]:
  """Every degraded image of a paired layout → `restored/<type>/<stem>.png`; its clean image is
  written once, with the first job that has it, as `reference/<stem>.png` (the name the result
  is scored under). A clean image that would take another's reference name is reported."""
  jobs, references = [], {}
  for i, pair in enumerate(paired.list_pairs(path).pairs):
    stem = pair.lq.stem
    reference = None
    if pair.hq is not None:
      ref = os.path.join(out, REFERENCE_DIR, f"{stem}.png")
      new = ref not in references
      first = references.setdefault(ref, pair.hq)
      if first != pair.hq:
        skipped.append((str(pair.lq), f"its reference {ref} is taken by another clean image, {first}"))
        continue
      if new:
        reference = (_from_file(str(pair.hq)), ref)
    jobs.append(Job(name=str(pair.lq), open=_from_file(str(pair.lq)), prompt=prompt,
                    out=os.path.join(out, RESULTS_DIR, pair.type, f"{stem}.png"), index=i,
                    reference=reference))
  return jobs


def _jsonl_jobs(path: str, out: str, lq_dir: str | None, skipped: list) -> list[Job]:
  """Upstream test.py's test set: image from `lq_path` (absolute, relative to the JSONL, or its
  name in `lq_dir`) or `<id>.png` in `lq_dir` (default: `lq/` next to the JSONL)."""
  base = Path(path).parent
  lq_dir = Path(lq_dir) if lq_dir else base / "lq"
  jobs = []
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path}:{n}"
    try:
      entry = json.loads(line)
    except json.JSONDecodeError as e:
      skipped.append((where, f"not JSON ({e})"))
      continue
    rel = entry.get("lq_path") or ""
    candidates = ([Path(rel), base / rel, lq_dir / Path(rel).name] if rel
                  else [lq_dir / f"{entry.get('id', 'sample')}.png"])
    image = next((c for c in candidates if c.is_file()), None)
    if image is None:
      skipped.append((where, f"image not found at {[str(c) for c in candidates]}"))
      continue
    stem = Path(rel).stem if rel else str(entry.get("id", "sample"))
    for field, sub in PROMPT_DIRS.items():
      prompt = entry.get(field)
      if not isinstance(prompt, str) or not prompt.strip():
        skipped.append((f"{where} ({field})", f"missing `{field}`"))
        continue
      jobs.append(Job(name=f"{image} ({sub})", open=_from_file(str(image)), prompt=prompt,
                      out=os.path.join(out, sub, f"{stem}.png"), index=n))
  return jobs


def collect_jobs(path: str, out: str, *, prompt: str | None, default_prompt: str,
                 lq_dir: str | None = None, cache_dir="default") -> tuple[list[Job], list]:
  """(jobs, skipped [(name, reason)]) for an image, a directory of images, a test JSONL, a
  CoTIR-Bench directory or a paired layout; an output name taken twice is kept for the first
  image only."""
  skipped: list = []
  if not os.path.exists(path):
    raise RestoreError(f"--input {path!r} does not exist")
  layout = paired.detect_layout(path)
  if layout is not None:
    try:
      jobs = _pair_jobs(path, out, _read_prompt(prompt) if prompt is not None else default_prompt,
                        skipped)
    except paired.DataLayoutError as e:
      raise RestoreError(f"--input {path!r}: {e}") from None
  elif path.endswith(".jsonl"):
    if prompt is not None:
      raise RestoreError("--prompt does not apply to a JSONL test set: it carries gen_prompt "
                         "and spe_prompt per image")
    jobs = _jsonl_jobs(path, out, lq_dir, skipped)
  else:
    text = _read_prompt(prompt) if prompt is not None else default_prompt
    if os.path.isfile(path):
      files = [Path(path)]
    else:
      files = sorted(p for p in Path(path).iterdir()
                     if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if files:
      jobs = [Job(name=str(f), open=_from_file(str(f)), prompt=text,
                  out=os.path.join(out, f"{f.stem}.png"), index=i) for i, f in enumerate(files)]
    else:
      try:
        jobs = _bench_jobs(path, out, text, cache_dir)
      except FileNotFoundError:
        raise RestoreError(f"--input {path!r} holds no image ({', '.join(IMAGE_SUFFIXES)}) and no "
                           "CoTIR-Bench shards ([image/]<type>/*.tar)") from None
  taken: dict[str, str] = {}
  kept = []
  for job in jobs:
    first = taken.setdefault(job.out, job.name)
    if first != job.name:
      skipped.append((job.name, f"its output {job.out} is already written for {first}"))
    else:
      kept.append(job)
  return kept, skipped


# ----------------------------------------------------------------------------- images

def to_rgb(image: Image.Image) -> Image.Image:
  """RGB as upstream's `convert("RGB")` (alpha dropped, palette expanded), except that 16-bit
  and 32-bit grayscale are scaled to 8 bits first instead of being clipped at 255."""
  if image.mode.startswith("I"):
    image = Image.fromarray(np.clip(np.asarray(image, np.float64) / 257.0 + 0.5, 0, 255)
                            .astype(np.uint8))
  elif image.mode == "F":
    image = Image.fromarray(np.clip(np.asarray(image, np.float64) + 0.5, 0, 255).astype(np.uint8))
  return image.convert("RGB")


def capped_size(width: int, height: int, max_long_edge: int | None) -> tuple[int, int]:
  """(width, height) after upstream's `resize_long_edge`: the long edge shrunk to the cap."""
  if max_long_edge is None or max(width, height) <= max_long_edge:
    return width, height
  scale = max_long_edge / float(max(width, height))
  return max(16, int(round(width * scale))), max(16, int(round(height * scale)))


def work_size(height: int, width: int) -> tuple[int, int]:
  """The multiple of 16 at or below each side (at least 16), as upstream's inference.py."""
  return max(16, height // 16 * 16), max(16, width // 16 * 16)


def bucket_side(n: int) -> int:
  """The smallest ladder size ≥ n (n a multiple of 16): n itself up to 64, then P, 1.25P,
  1.5P, 1.75P for each power of two P ≥ 64."""
  if n <= 64:
    return n
  p = 64
  while True:
    for f in (1.0, 1.25, 1.5, 1.75):
      if n <= p * f:
        return int(p * f)
    p *= 2


def bucket_of(height: int, width: int) -> tuple[int, int]:
  return bucket_side(height), bucket_side(width)


def _load(job: Job, max_long_edge: int | None):
  """(LQ float32 [h16, w16, 3] in [-1, 1], size to restore to, HQ uint8 or None)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # PIL's palette / EXIF chatter; failures raise
    with job.open() as im:
      im.load()
      rgb = to_rgb(im)
    w, h = capped_size(*rgb.size, max_long_edge)
    if (w, h) != rgb.size:
      rgb = rgb.resize((w, h), Image.BICUBIC)
    hq = None
    if job.reference is not None:
      with job.reference[0]() as ref:
        ref.load()
        ref = to_rgb(ref)
      if ref.size != (w, h):
        ref = ref.resize(capped_size(*ref.size, max_long_edge), Image.BICUBIC)
      if ref.size != (w, h):
        raise OSError(f"HQ size {ref.size} differs from the LQ size {(w, h)}")
      hq = np.asarray(ref)
  lq = np.asarray(rgb, np.float32) / 127.5 - 1.0
  hw = work_size(h, w)
  return sampler.resize_bicubic(lq, *hw), (h, w), hq


# ----------------------------------------------------------------------------- the model

def inference_model(cfg, model: models.CoTIR) -> models.CoTIR:
  """The model restore samples with: LoRA folded into the base weights only when
  `model.lora.merge_for_inference` is set (upstream's test configs keep it apart), rounded
  as upstream rounds it under compat="upstream"."""
  if not cfg.model.lora.merge_for_inference:
    return model
  return models.merge_lora(model, upstream=cfg.compat == "upstream")


class Restorer:
  """The frozen modules on the mesh, weights loaded (LoRA merged if the config says so), and
  one jitted `LQ batch → results` program per size bucket."""

  def __init__(self, cfg, *, reloadable: bool = False):
    self.cfg = cfg
    self.family = cfg.model.family
    self.mesh = sharding.make_mesh(cfg.mesh)  # every chip of every host
    self.rules = sharding.rules_from_config(cfg.mesh)
    self.data_parallel = int(self.mesh.shape["data"] * self.mesh.shape["fsdp"])
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(sharding.BATCH_AXES))
    graphs, self._params, frozen = build_states(cfg, self.mesh, self.rules)
    self._model_graph, self._base = graphs.model, frozen.pop("model")
    self.encoders = frozen  # {"vae", "text"[, "clip"]}
    self.encoder_graphs = {k: getattr(graphs, k) for k in frozen}
    self.tokenizers = build_tokenizers(cfg)
    self.reloadable = reloadable
    self.compiles: collections.Counter = collections.Counter()
    self._graph = self._state = self._run = None
    self._programs = {}  # the sampler compiled for each batch shape

  def load(self, weights: Sequence[str] | None, *, ema: bool = False) -> None:
    """Reads the trainable weights (`ema`: their moving average from a training checkpoint)
    into the model; merges its LoRA into the base weights when
    `model.lora.merge_for_inference` is set. None keeps the freshly initialised ones: with
    model.lora.init="zeros" (LoRA's B and the adapter's output start at zero) the model is
    then the base model itself."""
    if self._base is None:
      raise RuntimeError("weights are loaded already; build the Restorer with reloadable=True")
    flat_state = nnx.to_flat_state(self._params)
    if weights is not None:
      multihost.barrier()  # Orbax's reads meet the other processes in a collective
      targets = {".".join(map(str, path)): var.get_value() for path, var in flat_state}
      values = cotir_files.read_trainable(weights, targets, self.family,
                                          item="ema" if ema else "params")
      for path, var in flat_state:
        old = var.get_value()
        var.set_value(sharding.global_array(
            np.asarray(values[".".join(map(str, path))]).astype(old.dtype), old.sharding))
    model = inference_model(self.cfg, nnx.merge(self._model_graph,
                                                nnx.from_flat_state(flat_state), self._base))
    graph, state = nnx.split(model)
    if self._graph is not None and graph != self._graph:
      raise RuntimeError("the merged model changed structure between loads")
    self._graph = graph
    self._state = jax.device_put(state, sharding.tree_shardings(state, self.mesh, self.rules))
    if not self.reloadable:
      self._base = None  # full-size: the unmerged base would double the weights in memory
    if self._run is None:
      self._run = self._jitted_sampler()

  def _jitted_sampler(self):
    """`run(state, encoders, batch, seed) -> images`, one compilation per batch shape."""
    cfg, family = self.cfg, self.family
    guidance = cfg.training.guidance if cfg.model.guidance_embed else None

    def run(state, encoders, batch, seed):
      self.compiles[tuple(batch["lq"].shape[1:3])] += 1  # at trace time: counts compilations
      model = nnx.merge(self._graph, state)
      text = nnx.merge(self.encoder_graphs["text"], encoders["text"])
      txt = text(batch["ids"], batch["mask"]) if family == "flux2" else text(batch["ids"])
      vec = None
      if encoders.get("clip") is not None:
        vec = nnx.merge(self.encoder_graphs["clip"], encoders["clip"])(batch["clip_ids"])
      base = jax.random.key(seed)
      keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(batch["index"])
      return sampler.restore_images(
          model, nnx.merge(self.encoder_graphs["vae"], encoders["vae"]), batch["lq"], txt,
          family=family, num_steps=batch["timesteps"].shape[1] - 1, keys=keys, vec=vec,
          guidance=guidance, timesteps=batch["timesteps"], compat=cfg.compat)

    return jax.jit(run, out_shardings=self.batch_sharding)

  def tokenize(self, prompts: list[str]) -> dict[str, np.ndarray]:
    if self.family == "flux2":
      return dict(self.tokenizers["qwen"](prompts))
    t5 = self.tokenizers["t5"](prompts)
    return {"ids": t5["ids"], "mask": t5["mask"], "clip_ids": self.tokenizers["clip"](prompts)["ids"]}

  def __call__(self, batch: dict[str, np.ndarray], seed: int) -> jax.Array:
    """Restored images [B, H, W, 3] in [-1, 1], sharded over the batch, for a host batch of
    which only this process's rows are read (dispatched asynchronously)."""
    if self._run is None:
      raise RuntimeError("load weights first")
    args = (self._state, self.encoders,
            {k: sharding.global_array(v, self.batch_sharding) for k, v in batch.items()},
            sharding.global_array(np.uint32(seed), sharding.replicated(self.mesh)))
    shape = tuple(v.shape for v in batch.values())
    if shape not in self._programs:
      # traced under the mesh: the splash kernel's shard_map partitions over it (models/attention.py)
      with jax.set_mesh(self.mesh), sharding.activation_sharding(self.mesh, self.rules):
        self._programs[shape] = self._run.lower(*args).compile()
      multihost.barrier()  # hosts compile at their own pace; the sampler runs on all together
    return self._programs[shape](*args)

  # ---------------------------------------------------------------------------- the loop

  def restore(self, jobs: Sequence[Job], *, num_steps: int, seed: int, batch_size: int = 0,
              max_long_edge: int | None = None, progress: bool = True) -> dict:
    """Restores every job, bucket by bucket; returns {"restored", "skipped" [(name, reason)],
    "buckets" {(h, w): images}, "compiles" {(h, w): count}}, counted over all processes."""
    batch_size = batch_size or self.data_parallel
    if batch_size % self.data_parallel:
      raise RestoreError(f"batch size {batch_size} is not a multiple of the "
                         f"{self.data_parallel} data-parallel devices (mesh data × fsdp)")
    bar = tqdm(total=len(jobs), desc="restore", unit="img", dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0)
    skipped = []

    def skip(job, e):  # anything PIL or I/O raises makes a bad image, not a failed run
      skipped.append((job.name, f"{type(e).__name__}: {e}"))
      bar.write(f"skipped {job.name}: {type(e).__name__}: {e}", file=sys.stderr)

    buckets = self._plan(jobs, max_long_edge, skip)
    bar.update(len(jobs) - sum(len(b) for b in buckets.values()))
    held, written = self._rows(batch_size)
    restored, pending = 0, None
    for bucket in sorted(buckets, key=lambda b: (b[0] * b[1], b)):
      members = buckets[bucket]
      for first in range(0, len(members), batch_size):
        batch = [jobs[i] for i in members[first:first + batch_size]]
        loaded = {}
        for r in (r for r in held if r < len(batch)):
          try:
            loaded[r] = (batch[r], *_load(batch[r], max_long_edge))
          except Exception as e:  # noqa: BLE001
            if r in written:
              skip(batch[r], e)
        images = self(self._host_batch(loaded, bucket, batch_size, num_steps), seed)
        if pending is not None:
          restored += _write(*pending, bar)
        pending = (images, {r: v for r, v in loaded.items() if r in written}, len(batch))
    if pending is not None:
      restored += _write(*pending, bar)
    bar.close()
    every = multihost.all_gather({"restored": restored, "skipped": skipped})
    return {"restored": sum(p["restored"] for p in every),
            "skipped": [tuple(s) for p in every for s in p["skipped"]],
            "buckets": {b: len(j) for b, j in buckets.items()}, "compiles": dict(self.compiles)}

  def _plan(self, jobs, max_long_edge, skip) -> dict[tuple[int, int], list[int]]:
    """{size bucket: job indices}, from the images' headers, read by process 0 and the same on
    every process (each batch is one SPMD call); an unreadable header skips its image."""
    buckets = collections.defaultdict(list)
    if jax.process_index() == 0:
      for i, job in enumerate(jobs):
        try:
          with job.open() as im:
            w, h = capped_size(*im.size, max_long_edge)
        except Exception as e:  # noqa: BLE001
          skip(job, e)
          continue
        buckets[bucket_of(*work_size(h, w))].append(i)
    plan = multihost.all_gather(sorted(buckets.items()))[0]
    return {tuple(b): list(members) for b, members in plan}

  def _rows(self, batch_size) -> tuple[list[int], set[int]]:
    """(the batch rows this process's chips hold, those it writes: the rows no process with a
    lower index holds too)."""
    holders = collections.defaultdict(set)
    for device, index in self.batch_sharding.devices_indices_map((batch_size,)).items():
      for r in range(batch_size)[index[0]]:
        holders[r].add(device.process_index)
    me = jax.process_index()
    held = sorted(r for r, procs in holders.items() if me in procs)
    return held, {r for r in held if min(holders[r]) == me}

  def _host_batch(self, loaded, bucket, batch_size, num_steps) -> dict[str, np.ndarray]:
    """The batch with this process's loaded images {row: (job, LQ, size, HQ)} in their rows:
    reflect-padded images, per-image schedules, noise indices, tokens. The other rows (another
    process's, an image that failed to load, the rest of a short batch) stay blank; their
    results are dropped."""
    hb, wb = bucket
    lq = np.zeros((batch_size, hb, wb, 3), np.float32)
    timesteps = np.tile(sampler.schedule(self.family, num_steps, hb * wb // 256),
                        (batch_size, 1)).astype(np.float32)
    index = np.zeros(batch_size, np.int32)
    prompts = [""] * batch_size
    for r, (job, x, _, _) in loaded.items():
      lq[r] = np.pad(x, ((0, hb - x.shape[0]), (0, wb - x.shape[1]), (0, 0)), mode="reflect")
      timesteps[r] = sampler.schedule(self.family, num_steps, x.shape[0] * x.shape[1] // 256)
      index[r] = job.index
      prompts[r] = job.prompt
    return {"lq": lq, "timesteps": timesteps, "index": index, **self.tokenize(prompts)}


def _write(images, loaded, jobs_in_batch, bar) -> int:
  """Crops each of this process's results {row: (job, LQ, size, HQ)} to its working size,
  resizes it back to its image's size and saves it (and a bench record's HQ reference)."""
  rows = {}
  for shard in images.addressable_shards:
    data = np.asarray(shard.data)
    for i, r in enumerate(range(images.shape[0])[shard.index[0]]):
      rows[r] = data[i]
  for r, (job, lq, (h, w), hq) in loaded.items():
    out = sampler.resize_bicubic(rows[r][:lq.shape[0], :lq.shape[1]], h, w)
    os.makedirs(os.path.dirname(os.path.abspath(job.out)), exist_ok=True)
    Image.fromarray(sampler.to_uint8(out)).save(job.out)
    if hq is not None:
      os.makedirs(os.path.dirname(os.path.abspath(job.reference[1])), exist_ok=True)
      Image.fromarray(hq).save(job.reference[1])
  bar.update(jobs_in_batch)
  return len(loaded)


# ----------------------------------------------------------------------------- CLI

def _parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m cotir_jax.restore", description=__doc__, config=True)
  p.add_argument("--weights", nargs="+", required=True,
                 help="training workdir / checkpoint step / cotir_to_orbax output, or upstream "
                      "lora.pt + cot_adapter.pt (two files or their directory)")
  p.add_argument("--ema", action="store_true",
                 help="restore with the moving average of the weights that a training "
                      "checkpoint keeps when training.ema_decay > 0")
  p.add_argument("--input", required=True,
                 help="an image, a directory of images, a test JSONL, a CoTIR-Bench directory or "
                      "a paired layout (CDD-11 split, hq/ + lq/, manifest of lq / hq pairs)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--prompt", default=None, help="text or a .txt file (default inference.prompt)")
  p.add_argument("--lq_dir", default=None, help="JSONL input: image directory (default <jsonl dir>/lq)")
  for flag in ("num_steps", "seed", "max_long_edge", "batch_size"):
    p.add_argument(f"--{flag}", type=int, default=None, help=f"default inference.{flag}")
  multihost.add_arguments(p)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  parser = _parser()
  cfg, args = cli.parse(parser, argv)
  multihost.initialize(args, parser, preemption=False)  # SIGTERM ends a restore on any host
  for flag in ("num_steps", "seed", "max_long_edge", "batch_size"):
    if getattr(args, flag) is not None:
      config_lib.apply_override(cfg, f"inference.{flag}={getattr(args, flag)}")
  config_lib.validate(cfg)
  failure = None
  try:  # on every host: each must see the inputs and weights
    jobs, skipped = collect_jobs(args.input, args.out, prompt=args.prompt,
                                 default_prompt=cfg.inference.prompt, lq_dir=args.lq_dir,
                                 cache_dir=cfg.data.index_cache_dir)
    for w in args.weights:  # before the model is built
      if not os.path.exists(w):
        raise RestoreError(f"--weights {w!r} does not exist")
  except cli.USER_ERRORS as e:
    failure = str(e)
  verdict = multihost.agree(failure)  # every host stops, or none
  if verdict:
    raise RestoreError(verdict)
  for name, reason in skipped:
    print(f"skipped {name}: {reason}", file=sys.stderr)
  configure_compiler(cfg)
  restorer = Restorer(cfg)
  restorer.load(args.weights, ema=args.ema)
  summary = restorer.restore(jobs, num_steps=cfg.inference.num_steps, seed=cfg.inference.seed,
                             batch_size=cfg.inference.batch_size,
                             max_long_edge=cfg.inference.max_long_edge)
  skipped += summary["skipped"]
  print(f"cotir_jax: restored {summary['restored']} image(s) into {args.out}; skipped "
        f"{len(skipped)}; {len(summary['buckets'])} size bucket(s), "
        f"{sum(summary['compiles'].values())} compile(s)", flush=True)
  return 0 if summary["restored"] or not skipped else 1


if __name__ == "__main__":
  sys.exit(main())
