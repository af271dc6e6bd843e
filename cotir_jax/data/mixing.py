"""The sample order: global stream position k -> record index, a pure function of the seed.

balanced: cycle c = k // n_types visits every type once in an order shuffled per cycle (upstream's
round-robin over types); a type's c-th draw walks a per-epoch permutation of its records (without
replacement, unlike upstream's resampled shards). shuffle: a per-epoch permutation of all records.
Process i of n reads global positions k = q*n + i (q = its local position), so processes are
disjoint and their union is the one-process stream.
"""

from __future__ import annotations

import numpy as np

MIXING = ("balanced", "shuffle")


def _perm(n: int, *words: int) -> np.ndarray:
  return np.random.default_rng(np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in words])).permutation(n)


class StreamOrder:
  """Picklable; caches the few permutations it is currently walking."""

  def __init__(self, type_ranges: dict[str, tuple[int, int]], mixing: str = "balanced", seed: int = 0,
               shuffle_types: bool = True):
    if mixing not in MIXING:
      raise ValueError(f"data.mixing={mixing!r}; allowed: {MIXING}")
    self.ranges = [(t, s, c) for t, (s, c) in type_ranges.items() if c > 0]
    if not self.ranges:
      raise ValueError("the dataset has no records")
    self.mixing = mixing
    self.seed = int(seed)
    self.shuffle_types = shuffle_types
    self.total = sum(c for _, _, c in self.ranges)
    self._cache: dict[tuple, np.ndarray] = {}

  def __getstate__(self):
    d = dict(self.__dict__)
    d["_cache"] = {}
    return d

  def _cached(self, key: tuple, n: int) -> np.ndarray:
    """One live permutation per slot (key[:-1]): streams walk epochs/cycles forward."""
    slot, tag = key[:-1], key[-1]
    hit = self._cache.get(slot)
    if hit is None or hit[0] != tag:
      hit = self._cache[slot] = (tag, _perm(n, self.seed, *key))
    return hit[1]

  def record_at(self, k: int) -> int:
    if self.mixing == "shuffle":
      e, p = divmod(k, self.total)
      return int(self._cached((3, e), self.total)[p])
    n = len(self.ranges)
    c, j = divmod(k, n)
    ti = int(self._cached((1, c), n)[j]) if self.shuffle_types and n > 1 else j
    _, start, count = self.ranges[ti]
    e, p = divmod(c, count)
    return start + int(self._cached((2, ti, e), count)[p])
