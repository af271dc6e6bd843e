"""A deterministic stand-in tokenizer with the encoder issue's interface, for tests and the benchmark
until `cotir_jax.tokenization` lands: tok(list[str]) -> {'ids','mask': int32 [N, max_length]}."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes + offset, right-padded with pad_id and truncated to max_length."""

  def __init__(self, max_length: int = 512, offset: int = 3, pad_id: int = 0):
    self.max_length, self.offset, self.pad_id = max_length, offset, pad_id

  def __call__(self, texts):
    n = len(texts)
    ids = np.full((n, self.max_length), self.pad_id, np.int32)
    mask = np.zeros((n, self.max_length), np.int32)
    for i, t in enumerate(texts):
      b = np.frombuffer(t.encode("utf-8")[: self.max_length], np.uint8).astype(np.int32) + self.offset
      ids[i, : len(b)] = b
      mask[i, : len(b)] = 1
    return {"ids": ids, "mask": mask}
