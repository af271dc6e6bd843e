"""Paired data: folders of degraded / clean images, or a JSONL manifest, as a source of RawRecord.

Three layouts (`list_pairs` finds which):

* CDD-11: `clear/` plus one folder per degradation type (`low`, `haze`, `low_haze_rain`, ...); a
  degraded image has its clear image's file name. The path is one split (`CDD-11/train`).
* `hq/` + `lq/`: clean images in `hq/`, degraded ones of the same name in `lq/` or in
  `lq/<type>/` (images directly in `lq/` have no type).
* a JSONL manifest (the `.jsonl` file, or a folder holding exactly one): one pair per line,
  `{"lq": ..., "hq": ...}` with paths relative to the manifest, and optionally `type`, `prompt`
  and the CoT answers `scene`, `degradation`, `plan`.

`PairSource` serves the pairs exactly as `TarSource` serves CoTIR-Bench samples (records of a
type contiguous, `type_ranges`, `bad_shard_paths`), each record holding the two image files'
bytes and a small JSON description of the pair in place of meta.json, so mixing, skip accounting,
multi-process rows, resuming and the ArrayRecord build are the CoTIR-Bench pipeline's own. The
texts are made per sample (`process_pair`): a generic prompt, a specific one from the type's
templates in `data.templates` (or the manifest's `prompt`), and the answers the manifest gives,
the degradation description and plan made from the templates where it gives none
(`data.cot_answers`). An answer that is missing masks that text term out of the loss.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cotir_jax.data import prompts as P
from cotir_jax.data.decode import RawRecord, SkipSample, decode_pair, example
from cotir_jax.data.sources import DataLayoutError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
CLEAN_DIR = "clear"                                   # CDD-11's folder of clean images
ANSWER_FIELDS = ("scene", "degradation", "plan")      # manifest fields of the s, d, p answers
MANIFEST_TEXTS = ("prompt",) + ANSWER_FIELDS
LAYOUT_NAMES = {"cdd11": "CDD-11 layout", "hq_lq": "hq/ + lq/ layout", "manifest": "JSONL manifest"}


@dataclasses.dataclass(frozen=True)
class Pair:
  """One degraded image and its clean partner."""
  lq: Path
  hq: Path | None   # None: no clean image of that name was found
  type: str         # degradation type: folder name or manifest `type`; "" when none is given
  shard: str        # where it was listed: type folder relative to the root, or the manifest
  key: str          # the degraded image's file name (manifest: its path as written)
  texts: dict = dataclasses.field(default_factory=dict)  # manifest prompt / answers given


@dataclasses.dataclass(frozen=True)
class Listing:
  layout: str       # "cdd11", "hq_lq" or "manifest"
  root: Path        # the folder (or the manifest file) that was listed
  pairs: list[Pair]  # sorted by type, then as listed (file names in order, manifest lines)


# ----------------------------------------------------------------------------- listing

def _images(folder: Path) -> list[Path]:
  """Image files of a folder, sorted by name; a folder that cannot be read is a layout error."""
  try:
    with os.scandir(folder) as it:
      names = sorted(e.name for e in it if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
  except OSError as e:
    raise DataLayoutError(f"{folder}: {e.strerror or e}") from None
  return [folder / n for n in names]


def _subdirs(folder: Path) -> list[Path]:
  try:
    return sorted(p for p in folder.iterdir() if p.is_dir())
  except OSError as e:
    raise DataLayoutError(f"{folder}: {e.strerror or e}") from None


class _Clean:
  """Clean images by file name, else by stem when that is unique (a degraded .jpg of a .png)."""

  def __init__(self, files: list[Path]):
    self.by_name = {f.name: f for f in files}
    stems = collections.defaultdict(list)
    for f in files:
      stems[f.stem].append(f)
    self.by_stem = {s: fs[0] for s, fs in stems.items() if len(fs) == 1}

  def partner(self, degraded: Path) -> Path | None:
    return self.by_name.get(degraded.name) or self.by_stem.get(degraded.stem)


def _folder_pairs(root: Path, clean_dir: Path, typed: list[tuple[str, Path]]) -> list[Pair]:
  clean = _Clean(_images(clean_dir))
  pairs = []
  for deg_type, folder in typed:
    for f in _images(folder):
      pairs.append(Pair(lq=f, hq=clean.partner(f), type=deg_type,
                        shard=folder.relative_to(root).as_posix(), key=f.name))
  return pairs


def _is_pair_manifest(path: Path) -> bool:
  """A JSONL whose first record names `lq` and `hq` (upstream's test JSONL has `lq_path`)."""
  try:
    with open(path, encoding="utf-8") as f:
      for line in f:
        if line.strip():
          first = json.loads(line)
          return isinstance(first, dict) and "lq" in first and "hq" in first
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return False
  return False


def detect_layout(path: str | os.PathLike) -> str | None:
  """"cdd11", "hq_lq" or "manifest" when `path` is one of the paired layouts, else None."""
  p = Path(path).expanduser()
  if p.is_file():
    return "manifest" if p.suffix == ".jsonl" and _is_pair_manifest(p) else None
  if not p.is_dir():
    return None
  if (p / CLEAN_DIR).is_dir():
    return "cdd11"
  if (p / "hq").is_dir() and (p / "lq").is_dir():
    return "hq_lq"
  manifests = list(p.glob("*.jsonl"))
  if len(manifests) == 1 and _is_pair_manifest(manifests[0]):
    return "manifest"
  return None


def _manifest_pairs(path: Path) -> list[Pair]:
  base, problems, pairs = path.parent, [], []
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      entry = json.loads(line)
    except json.JSONDecodeError as e:
      problems.append(f"line {n}: not JSON ({e})")
      continue
    if not isinstance(entry, dict):
      problems.append(f"line {n}: not a JSON object")
      continue
    bad = [k for k in ("lq", "hq") if not isinstance(entry.get(k), str) or not entry[k].strip()]
    bad += [k for k in ("type",) + MANIFEST_TEXTS if k in entry and not isinstance(entry[k], str)]
    if bad:
      problems.append(f"line {n}: {', '.join(bad)} missing or not a string")
      continue
    deg_type = entry.get("type", "").strip()
    if deg_type in (".", "..") or "/" in deg_type or "\\" in deg_type:
      problems.append(f"line {n}: type {deg_type!r} is not a folder name")
      continue
    pairs.append(Pair(lq=base / entry["lq"], hq=base / entry["hq"], type=deg_type, shard=path.name,
                      key=entry["lq"], texts={k: entry[k].strip() for k in MANIFEST_TEXTS
                                              if entry.get(k, "").strip()}))
  if problems:
    listing = "; ".join(problems[:10]) + (f"; ... ({len(problems)} in all)" if len(problems) > 10
                                           else "")
    raise DataLayoutError(
        f"manifest {path} has {len(problems)} bad lines: {listing}. Each line is a JSON object with "
        f"\"lq\" and \"hq\" (image paths relative to the manifest) and optionally \"type\", "
        f"{', '.join(repr(k) for k in MANIFEST_TEXTS)} (strings)")
  if not pairs:
    raise DataLayoutError(f"manifest {path} lists no pairs")
  return pairs


def _what_is_there(p: Path) -> str:
  """What a folder that matches no paired layout holds, and the likely fix."""
  dirs = [d.name for d in _subdirs(p)]
  files = len(_images(p))
  manifests = [m.name for m in p.glob("*.jsonl")]
  hint = ""
  if manifests:
    hint = (f" Not a manifest: {', '.join(manifests)} (a manifest is the folder's only .jsonl and "
            "its lines name \"lq\" and \"hq\").")
  if "image" in dirs or any(p.glob("*/*.tar")):
    hint = " It looks like a CoTIR-Bench layout: use data.source='tar'."
  elif any((p / d / CLEAN_DIR).is_dir() for d in dirs):
    splits = [d for d in dirs if (p / d / CLEAN_DIR).is_dir()]
    hint = (f" Its {', '.join(d + '/' for d in splits)} hold clear/: point at one split, e.g. "
            f"{p / splits[0]}.")
  return (f"folders {', '.join(d + '/' for d in dirs[:12]) or 'none'}"
          f"{' ...' if len(dirs) > 12 else ''}, {files} image files.{hint}")


def list_pairs(path: str | os.PathLike) -> Listing:
  """Every degraded image under `path` with its clean partner, in any of the three layouts.

  Raises FileNotFoundError when `path` does not exist and DataLayoutError when it matches no
  layout (naming what it holds), a folder cannot be read, a manifest line is malformed, or no
  degraded image is found. A degraded image without a clean one is listed with `hq=None`.
  """
  p = Path(path).expanduser()
  if not p.exists():
    raise FileNotFoundError(f"{p} does not exist")
  layout = detect_layout(p)
  if layout == "manifest":
    manifest = p if p.is_file() else next(p.glob("*.jsonl"))
    pairs = _manifest_pairs(manifest)
  elif layout == "cdd11":
    typed = [(d.name, d) for d in _subdirs(p) if d.name != CLEAN_DIR]
    pairs = _folder_pairs(p, p / CLEAN_DIR, typed)
  elif layout == "hq_lq":
    typed = [("", p / "lq")] + [(d.name, d) for d in _subdirs(p / "lq")]
    pairs = _folder_pairs(p, p / "hq", typed)
  else:
    what = ("a file that is not a .jsonl whose lines name \"lq\" and \"hq\"" if p.is_file()
            else _what_is_there(p))
    raise DataLayoutError(
        f"{p} is none of the paired layouts (CDD-11: clear/ + one folder per degradation type; "
        f"hq/ + lq/ or lq/<type>/; a JSONL manifest of {{\"lq\", \"hq\"}} lines): found {what}")
  if not pairs:
    raise DataLayoutError(f"{p} ({LAYOUT_NAMES[layout]}) holds no degraded image "
                          f"({', '.join(IMAGE_SUFFIXES)})")
  pairs.sort(key=lambda q: q.type)  # stable: file names / manifest lines stay in order per type
  return Listing(layout=layout, root=p, pairs=pairs)


# ----------------------------------------------------------------------------- source

class PairSource:
  """grain RandomAccessDataSource of RawRecord over a paired layout (TarSource's interface).

  A record's `shard` is the folder (or manifest) it was listed from, its `key` the degraded
  image's name, its `meta` the pair's JSON (`{"pair": {"type", "hq", ...manifest texts}}`).
  `answer_counts` {type: [scene, degradation, plan]} counts the answers the manifest gives.
  """

  layout = "paired"

  def __init__(self, path: str | os.PathLike):
    listing = list_pairs(path)
    self.root, self.pair_layout = listing.root, listing.layout
    self.pairs = listing.pairs
    self._base = self.root if self.root.is_dir() else self.root.parent  # manifest paths' folder
    self.type_ranges: dict[str, tuple[int, int]] = {}
    for i, pair in enumerate(self.pairs):
      start, count = self.type_ranges.get(pair.type, (i, 0))
      self.type_ranges[pair.type] = (start, count + 1)
    self.types = list(self.type_ranges)
    self.answer_counts = {t: [sum(1 for q in self.pairs[s:s + c] if q.texts.get(f))
                              for f in ANSWER_FIELDS] for t, (s, c) in self.type_ranges.items()}
    self.num_shards = len({q.shard for q in self.pairs})
    self.bad_shard_paths: dict[str, str] = {}  # a folder or manifest that cannot be read stops start-up

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, i: int) -> RawRecord:
    pair = self.pairs[int(i)]
    hq = "" if pair.hq is None else os.path.relpath(pair.hq, self._base)
    meta = json.dumps({"pair": {"type": pair.type, "hq": hq, **pair.texts}}).encode()
    return RawRecord(pair.type, pair.shard, pair.key, _read(pair.hq), _read(pair.lq), meta)

  def __repr__(self) -> str:
    return (f"PairSource(root={str(self.root)!r}, layout={self.pair_layout!r}, records={len(self)}, "
            f"types={len(self.types)})")


def _read(path: Path | None) -> bytes | None:
  """The file's bytes; None when there is no such file (a missing partner, counted as such)."""
  if path is None:
    return None
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    return None


# ----------------------------------------------------------------------------- texts

def type_atoms(deg_type: str, templates) -> list[str] | None:
  """The template degradations a type is made of, in `templates.order` (restoration order), or
  None when any part of its name has no template: `low_haze_rain` → [low_light, rain, haze]
  through the alias low → low_light; the longest known name wins (`jpeg_compression`)."""
  tokens = [t for t in re.split(r"[_\-]+", P.normalize_deg(deg_type or None)) if t]
  known, aliases = set(templates.degradations), dict(templates.aliases)
  atoms, i = [], 0
  while i < len(tokens):
    for j in range(len(tokens), i, -1):
      name = "_".join(tokens[i:j])
      name = aliases.get(name, name)
      if name in known:
        atoms.append(name)
        i = j
        break
    else:
      return None
  order = list(templates.order)
  return sorted(set(atoms), key=order.index) or None


def _english(names: Sequence[str]) -> str:
  return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


@dataclasses.dataclass(frozen=True)
class PairTexts:
  """What paired samples' texts are made from (picklable for grain workers): a prompt bank with
  one label per type, and the degradation description and plan of each type with templates."""
  prompts: P.PromptBank
  answers: dict            # type -> (degradation description, plan); types with templates only
  use_templates: bool      # data.cot_answers == "templates"
  unknown: tuple = ()      # types without templates

  def cot(self, deg_type: str, given: dict) -> tuple[tuple[str, str, str], tuple[int, int, int]]:
    """(scene, degradation, plan) answers and which of them exist: the manifest's, else (for the
    degradation and plan) the type's templates."""
    texts = [given.get(f, "") for f in ANSWER_FIELDS]
    if self.use_templates and deg_type in self.answers:
      texts[1] = texts[1] or self.answers[deg_type][0]
      texts[2] = texts[2] or self.answers[deg_type][1]
    return tuple(texts), tuple(int(bool(t)) for t in texts)


def make_texts(templates, types: Sequence[str], cot_answers: str) -> PairTexts:
  """PairTexts for `types` from the `data.templates` tables. A type with templates gets its
  degradation's prompt lines (a composite one the composite sentence) and answers built in the
  style of CoTIR's: descriptions joined, the plan as `1. ...; then 2. ...`. A type without gets the
  generic prompts as its specific ones and no degradation / plan answers."""
  generic = list(templates.generic_prompts)
  special, answers, unknown = {}, {}, []
  for deg_type in types:
    atoms = type_atoms(deg_type, templates)
    label = P.normalize_deg(deg_type or None)
    if atoms is None:
      special[label] = generic
      unknown.append(deg_type)
      continue
    entries = [templates.degradations[a] for a in atoms]
    special[label] = (list(entries[0].prompts) if len(entries) == 1 else
                      [templates.composite_prompt.format(names=_english([e.name for e in entries]))])
    answers[deg_type] = (" ".join(e.description for e in entries),
                         "; then ".join(f"{n}. {e.plan}" for n, e in enumerate(entries, 1)) + ".")
  return PairTexts(P.PromptBank.from_lines(generic, special), answers,
                   cot_answers == "templates", tuple(unknown))


def process_pair(rec: RawRecord, *, patch_size: int, bank: PairTexts, rng, label_from_folder: bool,
                 max_pixels: int) -> dict:
  """A paired record → training example (process_record's, from the pair's own rules); raises
  SkipSample. The type is the label either way (`label_from_folder` has nothing to choose)."""
  del label_from_folder
  try:
    info = json.loads(rec.meta.decode("utf-8"))["pair"]
  except Exception as e:  # noqa: BLE001 - a record that is not a pair's is a corrupt record
    raise SkipSample("invalid_json",
                     f"not a paired record's description: {type(e).__name__}: {e}") from None
  missing = [what for what, data in (("clean image", rec.hq), ("degraded image", rec.lq))
             if data is None]
  if missing:
    where = f" (expected {info['hq']})" if info.get("hq") and rec.hq is None else ""
    raise SkipSample("missing_member", f"no {' or '.join(missing)}{where}")
  hq, lq = decode_pair(rec, f"clean image {info.get('hq') or '?'}", f"degraded image {rec.key}",
                       max_pixels)
  label = P.normalize_deg(rec.deg_type or None)
  gen, spe = P.pick_prompts(bank.prompts, [], label, rec.deg_type, None, rng)
  answers, has = bank.cot(rec.deg_type, info)
  return example(hq, lq, patch_size, gen=gen, spe=info.get("prompt") or spe, answers=answers,
                 has=has, deg=label)


def describe(source, texts: PairTexts, cot_answers: str) -> list[str]:
  """Start-up lines: what was found, and which text terms are masked for how many pairs."""
  n = len(source)
  layout = LAYOUT_NAMES.get(source.pair_layout, "paired layout")
  where = (f"{layout} at {source.root}" if isinstance(source, PairSource) else
           f"ArrayRecord build of a {layout} at {source.data_dir}")
  lines = [f"{n:,} pairs of {len(source.types)} types ({where}); data.cot_answers={cot_answers}"]
  counts = [0, 0, 0]
  for t, (_, c) in source.type_ranges.items():
    given = source.answer_counts.get(t, [0, 0, 0])
    for k in range(3):
      templated = k > 0 and texts.use_templates and t in texts.answers
      counts[k] += 0 if cot_answers == "none" else (c if templated else given[k])
  for k, term, what in ((0, "scene", "scene descriptions"),
                        (1, "degradation", "degradation descriptions"), (2, "plan", "enhancement plans")):
    if counts[k] == 0:
      lines.append(f"{term} term masked: no {what} (data.cot_answers={cot_answers})")
    elif counts[k] < n:
      lines.append(f"{term} term: {counts[k]:,} of {n:,} pairs have {what}; the others are masked in it")
  if texts.unknown:
    lines.append("types without templates (data.templates) train with the generic prompts, their "
                 "degradation and plan terms masked unless the manifest gives them: "
                 + ", ".join(repr(t) if t else "'' (no type)" for t in texts.unknown))
  return lines
