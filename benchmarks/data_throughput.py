#!/usr/bin/env python
"""Samples/s of one input worker from the tar source on 512x512 stored pairs.

Measures the full per-sample work (tar read, 2 PNG decodes, [-1,1], resize, prompt picking,
tokenization of 5 texts) in one process with one thread: the per-worker rate. Prints JSON.

  python benchmarks/data_throughput.py [--data-dir data/sample] [--samples 200]
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cotir_jax import cli  # noqa: E402
from cotir_jax import data as D  # noqa: E402
from cotir_jax.config import defaults  # noqa: E402


def tokenizer(max_length: int):
  """The tiny Qwen3 tokenizer when the encoder work has landed, else the byte stand-in."""
  path = Path(__file__).resolve().parents[1] / "assets" / "tokenizers" / "tiny_qwen3"
  try:
    from cotir_jax import tokenization  # type: ignore
    if path.exists():
      return "tiny_qwen3", tokenization.QwenChatTokenizer(str(path), max_length=max_length)
  except Exception:
    pass
  from cotir_jax.data.testing import ByteTokenizer
  return "byte_stand_in", ByteTokenizer(max_length)


def run(data_dir: str, patch: int, samples: int, tok) -> float:
  cfg = defaults()
  cfg.data.data_dir = data_dir
  with cfg.unlocked():
    cfg.data.index_cache_dir = tempfile.mkdtemp()
    cfg.data.read_threads = 1
  it = D.make_iterator(cfg, 0, tokenizers={"qwen": tok}, process_index=0, process_count=1, batch_size=1,
                       patch_size=patch, num_workers=0)
  for _ in range(8):  # warm up: index, file handles, permutations
    next(it)
  t = time.perf_counter()
  for _ in range(samples):
    next(it)
  return samples / (time.perf_counter() - t)


def main(argv=None) -> int:
  return cli.run(_main, argv)


def _main(argv) -> int:
  ap = cli.ArgumentParser(prog="benchmarks/data_throughput.py", description=__doc__)
  ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1] / "data" / "sample"))
  ap.add_argument("--samples", type=int, default=200)
  ap.add_argument("--max-length", type=int, default=512)
  a = ap.parse_args(argv)
  name, tok = tokenizer(a.max_length)
  out = {"source": "tar", "data_dir": a.data_dir, "stored_size": 512, "tokenizer": name,
         "samples": a.samples, "cpu_count": os.cpu_count(), "python": platform.python_version()}
  for p in (128, 512):
    out[f"samples_per_s_per_worker_p{p}"] = round(run(a.data_dir, p, a.samples, tok), 1)
  print(json.dumps(out, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
