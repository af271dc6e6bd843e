"""Reading and writing safetensors without torch: memory-mapped, tensor by tensor.

A reader is a lazy `Mapping[key, np.ndarray]` over a file or a directory (single file or
sharded with `*.safetensors.index.json`); arrays are views into the mapped file, so peak
memory during conversion is what the converted copy needs. bfloat16 comes from ml_dtypes.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

from cotir_jax.cli import UserError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsError(UserError, ValueError):
  """A missing, truncated or malformed safetensors file; the message names the file."""


def _read_header(path: str) -> tuple[dict, int]:
  try:
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise SafetensorsError(f"{path}: truncated safetensors file (no header)")
      (n,) = struct.unpack("<Q", raw)
      header = json.loads(f.read(n))
  except FileNotFoundError:
    raise SafetensorsError(f"{path}: file does not exist") from None
  except json.JSONDecodeError as e:
    raise SafetensorsError(f"{path}: malformed safetensors header ({e})") from None
  header.pop("__metadata__", None)
  return header, 8 + n


class SafetensorsFile(Mapping):
  """One safetensors file as a lazy mapping of memory-mapped numpy arrays."""

  def __init__(self, path: str):
    self.path = path
    self._header, self._start = _read_header(path)
    self._size = os.path.getsize(path)
    self._mmap = None

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self._header:
      raise KeyError(key)
    info = self._header[key]
    if info["dtype"] not in DTYPES:
      raise SafetensorsError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    if self._start + end > self._size:
      raise SafetensorsError(f"{self.path}: tensor {key!r} runs past the end of the file (truncated?)")
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    raw = self._mmap[self._start + begin:self._start + end]
    return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._header[key]["shape"])

  def __iter__(self) -> Iterator[str]:
    return iter(self._header)

  def __len__(self) -> int:
    return len(self._header)


class SafetensorsDir(Mapping):
  """All tensors of a diffusers / transformers model directory (one file or an index of shards)."""

  def __init__(self, path: str):
    self.path = path
    if os.path.isfile(path):
      files = {path: None}
    else:
      index = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
      if index:
        with open(index[0]) as f:
          weight_map = json.load(f)["weight_map"]
        files = {}
        for key, name in weight_map.items():
          files.setdefault(os.path.join(path, name), []).append(key)
        for shard in files:
          if not os.path.isfile(shard):
            raise SafetensorsError(f"{index[0]} names shard {os.path.basename(shard)!r}, "
                                   f"which is missing from {path}")
      else:
        found = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not found:
          raise SafetensorsError(f"{path}: no *.safetensors file and no *.safetensors.index.json")
        files = {p: None for p in found}
    self._where: dict[str, SafetensorsFile] = {}
    for shard in files:
      f = SafetensorsFile(shard)
      for key in f:
        self._where[key] = f

  def __getitem__(self, key: str) -> np.ndarray:
    return self._where[key][key]

  def shape(self, key: str) -> tuple[int, ...]:
    return self._where[key].shape(key)

  def file_of(self, key: str) -> str:
    return self._where[key].path

  def __iter__(self):
    return iter(self._where)

  def __len__(self):
    return len(self._where)


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
  """Writes a safetensors file from numpy arrays (bfloat16 included), tensor by tensor."""
  header, offset = {}, 0
  arrays = {}
  for key in sorted(tensors):
    a = np.ascontiguousarray(np.asarray(tensors[key]))
    if a.dtype not in CODES:
      raise SafetensorsError(f"{path}: tensor {key!r} has dtype {a.dtype}, which safetensors cannot store")
    header[key] = {"dtype": CODES[a.dtype], "shape": list(a.shape),
                   "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays[key] = a
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for key in sorted(arrays):
      f.write(arrays[key].tobytes())
