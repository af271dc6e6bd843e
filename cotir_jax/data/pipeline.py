"""The training input pipeline: source -> ordered positions -> per-sample rules -> skip accounting -> batches.

The training loop builds one iterator per stage:

    it = make_iterator(cfg, stage, tokenizers={'qwen': tok}, state=saved_or_None)
    batch = next(it)                 # {'hq','lq': [B,P,P,3] f32, '<field>_<tok>_ids'/'_mask': [B,L] i32,
    meta = batch.pop('meta')         #  'answer_mask': [B,3] i32 (has a scene / degradation / plan
                                     #  answer), 'meta': strings and positions for logging/validation}
    state = merge_states(every_process(it.get_state()))  # JSON-able; save it with the checkpoint
    it.skip_counts                   # {reason: count}, cumulative over the run
    it.bad_shards                    # shards found bad at start-up (paths and why: it.bad_shard_paths)

Multi-host layout: the global stream is cut into global batches of consecutive positions and
process p reads rows [p·b, (p+1)·b) of each (b = its share of the batch), so the global batch
assembled from the processes' shares in process order is the same sequence of samples for any
process count, and a P-process run computes what a 1-process run does.

Resuming and changing stage both go through the run's data state (`merge_states` of every
process's `get_state()`): the global position where the next global batch starts -- a function
of the steps taken, not of the process count -- plus the skip counters. Every sample is a pure
function of (seed, global position) -- the patch size only changes the resize -- so an iterator
built from it for any stage, on any number of processes that divides the global batch,
continues the global stream exactly; with another batch size the new layout of global batches
starts there. A process that skipped corrupt samples has read a little further into its rows;
those per-process offsets are kept too, so a resume on the same process count stays exact; on
another count the stream continues at the next global batch no process had started.
Without a state, `start_position(cfg, step)` gives the global position of an unskipped run.
"""

from __future__ import annotations

import collections
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import grain
import numpy as np

from cotir_jax.config import ConfigError
from cotir_jax.data import paired
from cotir_jax.data import prompts as P
from cotir_jax.data.decode import (ANSWER_MASK, MAX_IMAGE_PIXELS, REASONS, TEXT_FIELDS, RawRecord,
                                   SkipFractionError, SkipSample, process_record)
from cotir_jax.data.mixing import StreamOrder
from cotir_jax.data.sources import DataLayoutError, TarSource, check_bad_shards, resolve_layout

log = logging.getLogger(__name__)

ALL_REASONS = REASONS + ("read_error",)
STATE_VERSION = 3     # the run's state (merge_states); 2: one state per process
_STREAM = ("seed", "mixing", "mixing_seed", "num_records")  # what identifies the stream
Tokenizer = Callable[[list], Mapping[str, np.ndarray]]


def _get(cfg, path: str, default):
  node = cfg
  for part in path.split("."):
    if node is None or part not in node:
      return default
    node = node[part]
  return default if node is None else node


def data_dir(cfg) -> Path:
  """data.data_dir; a relative path missing from the cwd is taken from the repository (as config.load does)."""
  d = Path(cfg.data.data_dir).expanduser()
  if not d.exists() and not d.is_absolute():
    repo = Path(__file__).resolve().parents[2] / d
    if repo.exists():
      return repo
  return d


def source_dir(cfg) -> Path:
  """What the configured source reads: data.tfds_data_dir for an ArrayRecord build when set,
  else data.data_dir (a folder, or a paired layout's JSONL manifest). A missing one raises
  FileNotFoundError naming the field (callers check it before they write anything)."""
  field = "data.tfds_data_dir" if (_get(cfg, "data.source", "tar") == "array_record"
                                   and _get(cfg, "data.tfds_data_dir", None)) else "data.data_dir"
  path = Path(_get(cfg, field, "")).expanduser() if field != "data.data_dir" else data_dir(cfg)
  if not path.exists():
    raise FileNotFoundError(f"{field}={str(path)!r} does not exist")
  return path


def make_source(cfg):
  """TarSource over data.data_dir, the ArrayRecord build when data.source == 'array_record', or
  the pairs of a paired layout (data/paired.py) when data.source == 'paired'.

  Bad shards are warned about here and stop the run above data.max_skip_fraction of all shards."""
  kind = _get(cfg, "data.source", "tar")
  if kind == "tar":
    root, _ = resolve_layout(data_dir(cfg))
    source = TarSource(root, cache_dir=_get(cfg, "data.index_cache_dir", "default"))
  elif kind == "array_record":
    from cotir_jax.data.tfds_builder import ArrayRecordSource
    source = ArrayRecordSource(_get(cfg, "data.tfds_data_dir", None) or data_dir(cfg))
  elif kind == "paired":
    source = paired.PairSource(data_dir(cfg))
  else:
    raise ValueError(f"data.source={kind!r}; allowed: 'tar', 'array_record', 'paired'")
  check_bad_shards(source, float(_get(cfg, "data.max_skip_fraction", 0.01)))
  return source


def is_paired(source) -> bool:
  """The source holds paired records (a paired layout, or its ArrayRecord build)."""
  return getattr(source, "layout", "cotir_bench") == "paired"


def make_prompt_bank(cfg, source=None):
  """Prompt files found from data.data_dir as upstream does (a layout without gen_prompt.txt is a
  config error); for a paired `source`, the texts of its types from data.templates."""
  if source is not None and is_paired(source):
    return paired.make_texts(cfg.data.templates, source.types, cot_answers(cfg))
  _, root = resolve_layout(data_dir(cfg))
  if root is None:
    raise FileNotFoundError(f"no gen_prompt.txt found from data.data_dir={cfg.data.data_dir!r} (upstream's layout: <data_dir>/prompts/)")
  bank = P.PromptBank(root, P.special_dir_for(root), _get(cfg, "data.missing_prompt", "skip"),
                      _get(cfg, "data.prompt_errors", "stop"))
  if not bank.generic:
    raise DataLayoutError(f"{root / 'gen_prompt.txt'} has no prompts")
  return bank


def cot_answers(cfg) -> str:
  return str(_get(cfg, "data.cot_answers", "templates"))


def data_notes(cfg, source, bank) -> list[str]:
  """Start-up lines about the data: for paired data what was found and which text terms are
  masked; for any source, that data.cot_answers='none' trains without the text terms."""
  if is_paired(source):
    return paired.describe(source, bank, cot_answers(cfg))
  if cot_answers(cfg) == "none":
    return ["scene, degradation and plan terms masked (data.cot_answers=none): flow-matching "
            "fine-tuning of the editor alone, lambda stays 0"]
  return []


def mixing_seed(cfg) -> int:
  s = _get(cfg, "data.balanced_seed", None)
  return int(cfg.seed if s is None else s)


class SampleFn:
  """Local position q -> example dict or skip marker; picklable (runs in grain workers).

  `bank` is what `process` makes the texts from: a PromptBank for CoTIR-Bench records
  (process_record), a paired.PairTexts for paired ones (paired.process_pair). `answers=False`
  (data.cot_answers='none') marks every sample as having no CoT answer."""

  def __init__(self, source, order: StreamOrder, bank, *, patch_size: int, seed: int,
               label_from_folder: bool, tokenizers: Mapping[str, Tokenizer], process_index: int,
               process_count: int, max_pixels: int = MAX_IMAGE_PIXELS, block: int = 1,
               base: int = 0, process: Callable = process_record, answers: bool = True):
    self.source, self.order, self.bank = source, order, bank
    self.process, self.answers = process, answers
    self.block, self.base = int(block), int(base)
    self.patch_size, self.seed = int(patch_size), int(seed)
    self.label_from_folder = label_from_folder
    self.tokenizers = dict(tokenizers)
    self.pi, self.pc = process_index, process_count
    self.max_pixels = int(max_pixels)

  def global_position(self, q: int) -> int:
    """Local position q → global: row pi·block + j of global batch n (from `base`)."""
    n, j = divmod(q, self.block)
    return self.base + (n * self.pc + self.pi) * self.block + j

  def __call__(self, q: int) -> dict:
    k = self.global_position(q)
    idx = self.order.record_at(k)
    ident = {"position": q, "global_position": k, "record": idx}
    try:
      rec: RawRecord = self.source[idx]
    except Exception as e:  # I/O failure on a shard: skip, never crash
      return {"_skip": "read_error", "detail": f"{type(e).__name__}: {e}", "key": "?", "shard": "?", **ident}
    rng = np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFFFFFF, k, 0x7072]))
    try:
      ex = self.process(rec, patch_size=self.patch_size, bank=self.bank, rng=rng,
                        label_from_folder=self.label_from_folder, max_pixels=self.max_pixels)
    except SkipSample as e:
      return {"_skip": e.reason, "detail": e.detail, "key": rec.key, "shard": rec.shard, **ident}
    if not self.answers:
      ex[ANSWER_MASK] = np.zeros_like(ex[ANSWER_MASK])
    texts = [ex[t] for t in TEXT_FIELDS]
    for name, tok in self.tokenizers.items():
      out = tok(texts)
      ids, mask = np.asarray(out["ids"], np.int32), np.asarray(out["mask"], np.int32)
      for i, t in enumerate(TEXT_FIELDS):
        ex[f"{t}_{name}_ids"] = ids[i]
        ex[f"{t}_{name}_mask"] = mask[i]
    ex.update(key=rec.key, shard=rec.shard, deg_type=rec.deg_type, **ident)
    return ex


class _PositionStream(grain.MapDataset):
  """MapDataset: element i is fn(start + i); infinite unless `end` is given."""

  def __init__(self, start: int, fn: SampleFn, end: int | None = None):
    super().__init__()
    self._start, self._fn = int(start), fn
    self._end = sys.maxsize if end is None else int(end)

  def __len__(self) -> int:
    return max(0, self._end - self._start)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._fn(self._start + int(index))

  def __str__(self) -> str:
    return f"_PositionStream(start={self._start})"


_META_FIELDS = ("key", "shard", "deg_type", "deg") + TEXT_FIELDS


class CotirIterator:
  """Batches of good samples; counts and logs skips; raises SkipFractionError over the threshold."""

  def __init__(self, fn: SampleFn, *, batch_size: int, start_position: int = 0, num_workers: int = 0,
               read_threads: int = 2, max_skip_fraction: float = 0.01, skip_check_min_samples: int = 500,
               counts: Mapping[str, int] | None = None, examined: int = 0, end_position: int | None = None):
    """end_position: stop (StopIteration, partial batch dropped) there; None = infinite training stream."""
    self.fn = fn
    self.batch_size = int(batch_size)
    self.next_position = int(start_position)
    self.max_skip_fraction = float(max_skip_fraction)
    self.skip_check_min_samples = int(skip_check_min_samples)
    self.skip_counts = collections.Counter({r: 0 for r in ALL_REASONS})
    self.skip_counts.update(dict(counts or {}))
    self.examined = int(examined)
    self.recent_skips: collections.deque = collections.deque(maxlen=32)
    self.bad_shard_paths: dict[str, str] = dict(getattr(fn.source, "bad_shard_paths", {}))
    ds = _PositionStream(self.next_position, fn, end_position).to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, int(read_threads)),
                          prefetch_buffer_size=max(1, 2 * self.batch_size)))
    if num_workers > 0:
      from absl import flags  # grain's workers read absl flags; a loop without absl.app has none parsed
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(num_workers), per_worker_buffer_size=2))
    self._ds = ds
    self._it = None

  @property
  def skipped(self) -> int:
    return sum(self.skip_counts.values())

  @property
  def bad_shards(self) -> int:
    """Shards found bad at start-up (not a sound tar, or no complete sample); see bad_shard_paths."""
    return len(self.bad_shard_paths)

  def __iter__(self):
    return self

  def _record_skip(self, el: dict) -> None:
    self.skip_counts[el["_skip"]] += 1
    self.recent_skips.append({k: el[k] for k in ("_skip", "detail", "shard", "key", "position")})
    log.warning("data: skipped sample shard=%s key=%s position=%d reason=%s (%s)",
                el["shard"], el["key"], el["global_position"], el["_skip"], el["detail"])
    if self.examined >= self.skip_check_min_samples and self.skipped > self.max_skip_fraction * self.examined:
      self._raise_fraction()

  def _raise_fraction(self):
    per = ", ".join(f"{r}={n}" for r, n in self.skip_counts.items() if n)
    last = "; ".join(f"{s['shard']}:{s['key']} {s['_skip']}" for s in list(self.recent_skips)[-5:])
    raise SkipFractionError(
        f"data: {self.skipped} of {self.examined} samples skipped "
        f"({100 * self.skipped / self.examined:.2f}% > data.max_skip_fraction="
        f"{100 * self.max_skip_fraction:.2f}%); by reason: {per}; bad shards: {self.bad_shards}; "
        f"last skipped: {last}. "
        f"Fix or remove the bad shards (or raise data.max_skip_fraction).")

  def __next__(self) -> dict:
    if self._it is None:
      self._it = iter(self._ds)
    good = []
    while len(good) < self.batch_size:
      el = next(self._it)
      self.examined += 1
      self.next_position = el["position"] + 1
      if "_skip" in el:
        self._record_skip(el)
      else:
        good.append(el)
    if self.examined >= self.skip_check_min_samples and self.skipped > self.max_skip_fraction * self.examined:
      self._raise_fraction()
    batch = {k: np.stack([e[k] for e in good]) for k in good[0]
             if k not in _META_FIELDS and k not in ("position", "global_position", "record")}
    meta = {k: [e[k] for e in good] for k in _META_FIELDS}
    for k in ("position", "global_position", "record"):
      meta[k] = np.array([e[k] for e in good], np.int64)
    batch["meta"] = meta
    return batch

  def get_state(self) -> dict:
    """This process's position and counters (JSON-able); `merge_states` of every process's
    makes the state `make_iterator` continues from."""
    return {
        "version": 2,
        "next_position": self.next_position,
        "base": self.fn.base,
        "block": self.fn.block,
        "examined": self.examined,
        "skip_counts": {r: int(n) for r, n in self.skip_counts.items() if n},
        "seed": self.fn.seed,
        "mixing": self.fn.order.mixing,
        "mixing_seed": self.fn.order.seed,
        "num_records": len(self.fn.source),
        "process_index": self.fn.pi,
        "process_count": self.fn.pc,
    }

  def close(self):
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()


def stage_of_step(cfg, step: int) -> int:
  """Index of the progressive stage a global step falls in (training.iterations are stage ends)."""
  for s, end in enumerate(cfg.training.iterations):
    if step < end:
      return s
  return len(cfg.training.iterations) - 1


def per_process_batch(cfg, stage: int, process_count: int) -> int:
  """training.batch_sizes are global (one config fits any slice): per process = global / processes."""
  g = int(cfg.training.batch_sizes[stage])
  if g % process_count:
    raise ConfigError(f"training.batch_sizes[{stage}]={g} is not divisible by {process_count} "
                      "processes")
  return g // process_count


def start_position(cfg, step: int) -> int:
  """Global stream position after `step` steps of an unskipped run (use a saved state when you have one)."""
  pos, prev = 0, 0
  for s, end in enumerate(cfg.training.iterations):
    n = max(0, min(step, end) - prev)
    pos += n * int(cfg.training.batch_sizes[s])
    prev = end
    if step <= end:
      break
  return pos


def merge_states(states: Sequence[Mapping]) -> dict:
  """The run's data state, from every process's `get_state()` in process order.

  `position`: the first global position of a global batch no process has started, where the
  stream continues on any process count. `offsets`: where each process's own stream stands
  relative to its rows of that batch (≤ 0; None when every process has read exactly its rows of
  the batches before, i.e. skipped no sample since the layout began), so that a resume on the
  same process count continues each process exactly."""
  first, count = states[0], len(states)
  block, base = int(first["block"]), int(first["base"])
  for i, s in enumerate(states):
    if (int(s["process_index"]), int(s["process_count"])) != (i, count):
      raise ValueError(f"data states: entry {i} is process {s['process_index']} of "
                       f"{s['process_count']}; pass every process's state in process order")
    if (int(s["block"]), int(s["base"])) != (block, base) or any(s[k] != first[k] for k in _STREAM):
      raise ValueError(f"data states of processes 0 and {i} belong to different streams")
  batches = max(-(-int(s["next_position"]) // block) for s in states)  # started by any process
  offsets = [int(s["next_position"]) - batches * block for s in states]
  return {"version": STATE_VERSION, **{k: first[k] for k in _STREAM},
          "base": base, "global_batch": block * count, "position": base + batches * block * count,
          "process_count": count, "offsets": offsets if any(offsets) else None,
          "examined": [int(s.get("examined", 0)) for s in states],
          "skip_counts": [dict(s.get("skip_counts") or {}) for s in states]}


def load_state(saved: Mapping) -> dict:
  """A checkpoint's data state as `make_iterator` takes it; older checkpoints stored one state
  per process ({"processes": [...]}), which merge into the same form."""
  return merge_states(saved["processes"]) if "processes" in saved else dict(saved)


def _resume(state: Mapping, *, block: int, process_index: int, process_count: int):
  """(base, local start position, examined, skip counts) of this process continuing `state`."""
  same = int(state["process_count"]) == process_count
  if int(state["global_batch"]) != block * process_count:  # another batch size: a new layout
    base, start = int(state["position"]), 0
  else:
    base = int(state["base"])
    start = (int(state["position"]) - base) // int(state["global_batch"]) * block
    if state.get("offsets"):
      if same:
        start += int(state["offsets"][process_index])
      else:
        log.warning("data: the %d-process run skipped corrupt samples, so its processes read "
                    "their rows unevenly; on %d process(es) the stream continues at the next global "
                    "batch none of them had started (position %d)", state["process_count"],
                    process_count, state["position"])
  if same:
    return base, start, state["examined"][process_index], state["skip_counts"][process_index]
  if process_index == 0:  # the run's counters continue on the lead, which logs them
    return base, start, sum(state["examined"]), sum(
        (collections.Counter(c) for c in state["skip_counts"]), collections.Counter())
  return base, start, 0, None


def validation_batch(cfg, patch_size: int, rows: int,
                     tokenizers: Mapping[str, Tokenizer] | None = None) -> dict:
  """The held-out validation batch: the first `rows` samples of data.val_data_dir (a CoTIR-Bench
  tar layout, round-robin over its degradation types) at `patch_size`, with their prompts drawn
  from the run's seed, so every validation step restores the same pairs; `meta` is dropped."""
  held = cfg.copy_and_resolve_references()
  held.data.data_dir = str(cfg.data.val_data_dir)
  held.data.source = "tar"
  if not data_dir(held).is_dir():
    raise FileNotFoundError(f"data.val_data_dir={cfg.data.val_data_dir!r} does not exist")
  it = make_iterator(held, 0, tokenizers=tokenizers, process_index=0, process_count=1,
                     batch_size=rows, patch_size=patch_size, num_workers=0)
  try:
    batch = next(it)
  finally:
    it.close()
  batch.pop("meta")
  return batch


def make_iterator(cfg, stage: int, *, tokenizers: Mapping[str, Tokenizer] | None = None,
                  state: Mapping | None = None, source=None, bank: P.PromptBank | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  batch_size: int | None = None, patch_size: int | None = None,
                  num_workers: int | None = None, end_position: int | None = None) -> CotirIterator:
  """The iterator for progressive stage `stage` (patch/batch from training.*), continuing `state` if given.

  process_index/count default to jax.process_index()/process_count(); batch_size defaults to this
  process's share of the stage's global batch; num_workers to data.num_workers (grain processes).
  """
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  source = source if source is not None else make_source(cfg)
  bank = bank if bank is not None else make_prompt_bank(cfg, source)
  mix = _get(cfg, "data.mixing", "balanced")
  order = StreamOrder(source.type_ranges, mix, mixing_seed(cfg),
                      shuffle_types=bool(_get(cfg, "data.balanced_shuffle", True)))
  seed = int(cfg.seed)
  block = batch_size or per_process_batch(cfg, stage, process_count)
  base, start, examined, counts = 0, 0, 0, None
  if state is not None:
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"data iterator state version {state.get('version')} != {STATE_VERSION} "
                       "(a checkpoint's data state goes through load_state)")
    for k, want in zip(_STREAM, (seed, mix, order.seed, len(source))):
      if state.get(k) != want:
        raise ValueError(f"data iterator state has {k}={state.get(k)!r} but this run has {want!r}; "
                         "the stream would not continue exactly")
    base, start, examined, counts = _resume(state, block=block, process_index=process_index,
                                            process_count=process_count)
  fn = SampleFn(source, order, bank,
                patch_size=patch_size or int(cfg.training.patch_sizes[stage]),
                seed=seed, label_from_folder=bool(_get(cfg, "data.return_deg_type", False)),
                tokenizers=tokenizers or {}, process_index=process_index, process_count=process_count,
                max_pixels=int(_get(cfg, "data.max_image_pixels", MAX_IMAGE_PIXELS)), block=block,
                base=base, answers=cot_answers(cfg) != "none",
                process=paired.process_pair if is_paired(source) else process_record)
  return CotirIterator(
      fn, batch_size=block, start_position=start,
      num_workers=int(_get(cfg, "data.num_workers", 0) if num_workers is None else num_workers),
      read_threads=int(_get(cfg, "data.read_threads", 2)),
      max_skip_fraction=float(_get(cfg, "data.max_skip_fraction", 0.01)),
      skip_check_min_samples=int(_get(cfg, "data.skip_check_min_samples", 500)),
      counts=counts, examined=examined, end_position=end_position)
