"""Random-access sources of raw CoTIR-Bench records: the upstream tar shards read in place.

Layout (upstream's): `<data_dir>[/image]/<deg_type>/*.tar`, each tar holding `<key>.hq.png`,
`<key>.lq.png`, `<key>.meta.json`. Records are ordered by (sorted type, sorted shard, first
appearance of the key in the tar); the ArrayRecord build (`tfds_builder.py`) writes the same order,
so record i is the same sample in both sources and one sampler drives either.

Start-up checks: entries the loader needs but cannot open (symlink loops, dangling links, permissions)
stop the run with one DataLayoutError listing them; a shard that is not a sound tar (not a tar at all,
cut short, garbage after its members) or holds no complete sample is a *bad shard*: listed in one
warning, exposed as `bad_shard_paths`, and the run stops when they exceed data.max_skip_fraction.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tarfile
import threading
from pathlib import Path

import numpy as np

from cotir_jax.cli import UserError
from cotir_jax.data import prompts as P
from cotir_jax.data.decode import RawRecord, SkipFractionError

log = logging.getLogger(__name__)

MEMBERS = ("hq.png", "lq.png", "meta.json")
_INDEX_VERSION = 2
_MAX_TAIL_READ = 1 << 20  # bytes past the last member checked for being end-of-archive zero padding


class DataLayoutError(UserError, RuntimeError):
  """Entries under the shard root cannot be opened; the message lists every such path and why."""


def resolve_layout(data_dir: str | os.PathLike) -> tuple[Path, Path | None]:
  """(shard root, prompt root or None) following upstream's `_resolve_balanced_root_and_prompts`
  and `_detect_prompt_root`: data_dir may be the dataset root or its `image/` folder."""
  base = Path(data_dir).expanduser()
  if not base.is_dir():
    raise FileNotFoundError(f"data.data_dir={str(data_dir)!r} does not exist")
  candidates: list[Path] = []
  if base.name == "image":
    root = base
    if (base.parent / "prompts").is_dir():
      candidates.append(base.parent / "prompts")
  elif (base / "image").is_dir():
    root = base / "image"
    if (base / "prompts").is_dir():
      candidates.append(base / "prompts")
  else:
    root = base
  candidates.append(root.resolve())
  if root != base:
    candidates.append(base.resolve())
  for c in candidates:
    found = P.detect_prompt_root(c)
    if found is not None:
      return root, found
  return root, None


def list_shards(root: Path) -> dict[str, list[Path]]:
  """{deg_type: sorted *.tar} for every sub-folder that has shards, types sorted by name.

  Every type folder and shard is opened once here; those that cannot be (symlink loops, dangling
  links, permissions) raise one DataLayoutError naming them all instead of a bare OSError later.
  """
  out, problems = {}, []

  def opens(p: Path, is_dir: bool) -> bool:
    try:
      if is_dir:
        os.scandir(p).close()
      else:
        os.close(os.open(p, os.O_RDONLY))
      return True
    except OSError as e:
      problems.append(f"{p}: {e.strerror or e}")
      return False

  for d in sorted(root.iterdir()) if opens(root, True) else []:
    try:
      if not stat.S_ISDIR(d.stat().st_mode):
        continue
    except OSError as e:  # a loop or dangling link where a type folder may be meant
      problems.append(f"{d}: {e.strerror or e}")
      continue
    if opens(d, True):
      tars = [t for t in sorted(d.glob("*.tar")) if opens(t, False)]
      if tars:
        out[d.name] = tars
  if problems:
    raise DataLayoutError(f"{len(problems)} entries under {root} cannot be read: " + "; ".join(problems)
                          + ". Fix or remove them.")
  if not out:
    raise FileNotFoundError(f"no <deg_type>/*.tar shards under {root}")
  return out


def default_cache_dir() -> Path:
  return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cotir_jax" / "tar_index"


def _tail_problem(f, end: int, file_size: int) -> str:
  """Past its last member a tar holds only zero blocks (end marker, record padding): anything else is a
  header cut short, garbage where a header should be, or data appended after the end."""
  if end >= file_size:
    return ""
  f.seek(end)
  if not f.read(min(file_size - end, _MAX_TAIL_READ)).strip(b"\0"):
    return ""
  return f"{file_size - end} bytes from offset {end} are not a tar header (cut header or trailing garbage)"


def scan_tar(path: Path):
  """Member offsets from the tar headers (member data is never read). Returns (keys, offsets[n,3],
  sizes[n,3], truncated[n], problem); size -1 = member absent; problem is '' for a sound shard, else why
  it is bad. A tar cut short keeps what precedes the cut, flagged."""
  file_size = path.stat().st_size
  groups: dict[str, list] = {}
  order: list[str] = []
  problems: list[str] = []
  try:
    with tarfile.open(path, "r:") as tf:
      while True:
        try:
          m = tf.next()
        except tarfile.ReadError as e:  # a cut inside member data, or a broken later header
          if not any(g[2] for g in groups.values()):  # a cut member is reported below
            problems.append(f"header scan stopped at offset {tf.offset}: {e}")
          break
        if m is None:  # tarfile also ends here, silently, on a cut or garbage header
          problems.append(_tail_problem(tf.fileobj, tf.offset, file_size))
          break
        if not m.isfile():
          continue
        name = m.name.rsplit("/", 1)[-1]
        dot = name.find(".")
        if dot <= 0:
          continue
        key = m.name[: len(m.name) - len(name) + dot]
        ext = name[dot + 1:]
        if ext not in MEMBERS:
          continue
        if key not in groups:
          groups[key] = [[-1] * 3, [-1] * 3, False]
          order.append(key)
        g = groups[key]
        j = MEMBERS.index(ext)
        g[0][j], g[1][j] = m.offset_data, m.size
        if m.offset_data + m.size > file_size:
          g[2] = True
          problems.append(f"cut short inside {m.name} ({m.size} bytes from offset {m.offset_data}, "
                          f"file has {file_size})")
  except tarfile.ReadError as e:  # not even a first header
    problems.append(f"not a tar archive ({e})")
  n = len(order)
  keys = np.array(order, dtype=np.str_) if n else np.zeros((0,), dtype="<U1")
  offsets = np.array([groups[k][0] for k in order], dtype=np.int64).reshape(n, 3)
  sizes = np.array([groups[k][1] for k in order], dtype=np.int64).reshape(n, 3)
  truncated = np.array([groups[k][2] for k in order], dtype=bool).reshape(n)
  if not ((sizes >= 0).all(1) & ~truncated).any() and (n or not any(problems)):  # unless said already
    problems.append(f"no complete sample (<key>.{{{','.join(MEMBERS)}}}) among {n} keys")
  return keys, offsets, sizes, truncated, "; ".join(p for p in problems if p)


def load_index(path: Path, cache_dir: Path | None):
  """scan_tar, cached as .npz keyed by absolute path; rebuilt when the shard's size or mtime changes."""
  st = path.stat()
  stamp = np.array([_INDEX_VERSION, st.st_size, st.st_mtime_ns], dtype=np.int64)
  cache = None
  if cache_dir is not None:
    h = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:20]
    cache = Path(cache_dir) / f"{path.stem}-{h}.npz"
    if cache.exists():
      try:
        with np.load(cache) as z:
          if np.array_equal(z["stamp"], stamp):
            return z["keys"], z["offsets"], z["sizes"], z["truncated"], str(z["problem"])
      except Exception as e:  # a broken cache is only a cache
        log.warning("ignoring index cache %s: %s", cache, e)
  keys, offsets, sizes, truncated, problem = scan_tar(path)
  if cache is not None:
    try:
      cache.parent.mkdir(parents=True, exist_ok=True)
      tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
      np.savez(tmp, stamp=stamp, keys=keys, offsets=offsets, sizes=sizes, truncated=truncated,
               problem=np.str_(problem))
      os.replace(tmp, cache)
    except OSError as e:
      log.warning("cannot write index cache %s: %s", cache, e)
  return keys, offsets, sizes, truncated, problem


def check_bad_shards(source, max_fraction: float) -> None:
  """One start-up warning listing the source's bad shards; SkipFractionError when they are more than
  max_fraction (data.max_skip_fraction) of all its shards."""
  bad = getattr(source, "bad_shard_paths", {})
  if not bad:
    return
  total = source.num_shards
  listing = [f"{p}: {why}" for p, why in bad.items()]
  log.warning("data: %d of %d shards are bad (their intact samples are still used): %s", len(bad), total,
              "; ".join(listing))
  if len(bad) > max_fraction * total:
    first = "; ".join(listing[:10]) + ("" if len(bad) <= 10 else f"; ... (all {len(bad)} in the warning above)")
    raise SkipFractionError(
        f"data: {len(bad)} of {total} shards are bad ({100 * len(bad) / total:.2f}% > data.max_skip_fraction="
        f"{100 * max_fraction:.2f}%): {first}. Fix or remove the bad shards (or raise data.max_skip_fraction).")


class TarSource:
  """grain RandomAccessDataSource of RawRecord over the tars in place (one pread per member).

  Attributes used by the sampler: `types` (sorted names) and `type_ranges` {type: (start, count)}:
  records of one type are contiguous. `bad_shard_paths` {path: problem} lists the bad shards found at
  start-up (see scan_tar) out of `num_shards`.
  """

  layout = "cotir_bench"  # records with meta.json (paired.PairSource's are "paired")

  def __init__(self, root: str | os.PathLike, cache_dir: str | os.PathLike | None = "default"):
    self.root = Path(root)
    shards = list_shards(self.root)
    cache = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
    self.shard_paths: list[str] = []
    self.shard_names: list[str] = []
    self.bad_shard_paths: dict[str, str] = {}
    parts = []
    self.type_ranges: dict[str, tuple[int, int]] = {}
    start = 0
    for t, tars in shards.items():
      count = 0
      for tar in tars:
        keys, offsets, sizes, trunc, problem = load_index(tar, cache)
        if problem:
          self.bad_shard_paths[str(tar)] = problem
        sid = len(self.shard_paths)
        self.shard_paths.append(str(tar))
        self.shard_names.append(f"{t}/{tar.name}")
        parts.append((np.full(len(keys), sid, np.int32), keys, offsets, sizes, trunc))
        count += len(keys)
      self.type_ranges[t] = (start, count)
      start += count
    self.types = list(self.type_ranges)
    self.num_shards = len(self.shard_paths)
    self.shard_type = [n.split("/", 1)[0] for n in self.shard_names]
    self._shard = np.concatenate([p[0] for p in parts])
    self._keys = np.concatenate([p[1].astype(np.str_) for p in parts])
    self._offsets = np.concatenate([p[2] for p in parts]).reshape(-1, 3)
    self._sizes = np.concatenate([p[3] for p in parts]).reshape(-1, 3)
    self._truncated = np.concatenate([p[4] for p in parts])
    self._local = threading.local()

  def __len__(self) -> int:
    return len(self._keys)

  def __getstate__(self):
    d = dict(self.__dict__)
    d.pop("_local")
    return d

  def __setstate__(self, d):
    self.__dict__.update(d)
    self._local = threading.local()

  def _fd(self, sid: int) -> int:
    fds = getattr(self._local, "fds", None)
    if fds is None or getattr(self._local, "pid", None) != os.getpid():
      fds = self._local.fds = {}
      self._local.pid = os.getpid()
    if sid not in fds:
      if len(fds) >= 64:
        os.close(fds.pop(next(iter(fds))))
      fds[sid] = os.open(self.shard_paths[sid], os.O_RDONLY)
    return fds[sid]

  def __getitem__(self, i: int) -> RawRecord:
    i = int(i)
    sid = int(self._shard[i])
    fd = self._fd(sid)
    trunc = bool(self._truncated[i])
    data = []
    for off, size in zip(self._offsets[i], self._sizes[i]):
      if size < 0:
        data.append(None)
      else:
        b = os.pread(fd, int(size), int(off))
        trunc = trunc or len(b) != size
        data.append(b)
    return RawRecord(self.shard_type[sid], self.shard_names[sid], str(self._keys[i]),
                     data[0], data[1], data[2], trunc)

  def __repr__(self) -> str:
    return f"TarSource(root={str(self.root)!r}, records={len(self)}, types={len(self.types)})"
