"""TFDS builder `cotir_bench`: the upstream tar layout (or a paired one) -> ArrayRecord, and a
source that reads it back.

Records are written unshuffled in TarSource order and hold the raw PNG/JSON bytes (absent members as
empty bytes plus a presence mask, a cut tar as `truncated`), so decoding, prompt picking and skip
accounting are the same code for both sources and give identical samples; the tars' bad shards (see
sources.py) are warned about at build time and kept in the metadata, so a run on the build reports and
checks them as a run on the tars does. `--paired` reads a folder of pairs instead (paired.py: CDD-11,
hq/ + lq/, a JSONL manifest) into the same record format: the two image files and the pair's JSON
in place of meta.json; the metadata says so (`layout`), and a run on the build makes its texts from
the config as a run on the folders does. Works without TensorFlow (TFDS's array_record path). Build:

  python -m cotir_jax.data.tfds_builder --source data/sample --out ~/tensorflow_datasets
  python -m cotir_jax.data.tfds_builder --paired --source /data/CDD-11/train --out /data/cdd11_tfds
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from cotir_jax import cli
from cotir_jax.data.decode import RawRecord
from cotir_jax.data.paired import PairSource
from cotir_jax.data.sources import TarSource, check_bad_shards, resolve_layout


class CotirBench(tfds.core.GeneratorBasedBuilder):
  """CoTIR-Bench image pairs with CoT metadata, one record per tar sample."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Raw bytes of <key>.{hq.png,lq.png,meta.json} from the upstream tar layout."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the CoTIR-Bench root (holding image/<deg_type>/*.tar and prompts/) as "
      "download_config=tfds.download.DownloadConfig(manual_dir=...).")
  # TFDS derives this through `importlib_resources`, which a TF-free install may lack.
  code_path = epath.Path(__file__)

  def __init__(self, *args, tar_index_cache: str | None = None, paired: bool = False, **kwargs):
    self._tar_index_cache = tar_index_cache
    self._paired = paired
    self._source: TarSource | PairSource | None = None
    super().__init__(*args, **kwargs)

  def _read_source(self, manual_dir) -> TarSource | PairSource:
    if self._source is None and self._paired:
      self._source = PairSource(os.fspath(manual_dir))
    elif self._source is None:
      root, _ = resolve_layout(os.fspath(manual_dir))
      self._source = TarSource(root, cache_dir=self._tar_index_cache or "default")
      check_bad_shards(self._source, max_fraction=1.0)  # warn only: the run applies data.max_skip_fraction
    return self._source

  def _info(self) -> tfds.core.DatasetInfo:
    blob = tfds.features.Tensor(shape=(), dtype=np.object_)
    return tfds.core.DatasetInfo(
        builder=self,
        description="CoTIR-Bench: degraded/clean 512x512 pairs with chain-of-thought answers.",
        features=tfds.features.FeaturesDict({
            "deg_type": tfds.features.Text(),
            "shard": tfds.features.Text(),
            "key": tfds.features.Text(),
            "hq_png": blob, "lq_png": blob, "meta_json": blob,
            "present": tfds.features.Tensor(shape=(3,), dtype=np.bool_),
            "truncated": np.bool_,
        }),
        disable_shuffling=True,   # keep TarSource order: record i is the same sample in both sources
        metadata=tfds.core.MetadataDict(),
        homepage="https://github.com/gy65896/CoTIR",
    )

  def _split_generators(self, dl_manager):
    src = self._read_source(dl_manager.manual_dir)
    self.info.metadata["types"] = list(src.types)
    self.info.metadata["counts"] = [src.type_ranges[t][1] for t in src.types]
    self.info.metadata["num_shards"] = src.num_shards
    self.info.metadata["bad_shards"] = dict(src.bad_shard_paths)
    self.info.metadata["layout"] = src.layout
    if self._paired:
      self.info.metadata["pair_layout"] = src.pair_layout
      self.info.metadata["answer_counts"] = dict(src.answer_counts)
    return {"train": self._generate_examples(src)}

  def _generate_examples(self, src: TarSource | PairSource):
    for i in range(len(src)):
      r = src[i]
      yield i, {
          "deg_type": r.deg_type, "shard": r.shard, "key": r.key,
          "hq_png": r.hq or b"", "lq_png": r.lq or b"", "meta_json": r.meta or b"",
          "present": np.array([r.hq is not None, r.lq is not None, r.meta is not None]),
          "truncated": r.truncated,
      }


def build(source_dir: str | os.PathLike, data_dir: str | os.PathLike,
          tar_index_cache: str | None = None, paired: bool = False) -> CotirBench:
  """download_and_prepare `cotir_bench` from the tar layout (or with `paired`, a paired layout)
  at source_dir into data_dir."""
  b = CotirBench(data_dir=os.fspath(data_dir), file_format="array_record",
                 tar_index_cache=tar_index_cache, paired=paired)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(source_dir)))
  return b


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


class ArrayRecordSource:
  """grain RandomAccessDataSource of RawRecord over a built `cotir_bench` (same interface as TarSource,
  or as PairSource for a paired build: `layout`, `pair_layout`, `answer_counts`)."""

  def __init__(self, data_dir: str | os.PathLike, split: str = "train"):
    self.data_dir = os.fspath(data_dir)
    self.split = split
    self._open()

  def _open(self):
    b = CotirBench(data_dir=self.data_dir, file_format="array_record")
    self._ds = b.as_data_source(split=self.split)
    types, counts = list(b.info.metadata["types"]), list(b.info.metadata["counts"])
    self.num_shards = int(b.info.metadata.get("num_shards", 0))
    self.bad_shard_paths = dict(b.info.metadata.get("bad_shards", {}))
    self.layout = b.info.metadata.get("layout", "cotir_bench")
    self.pair_layout = b.info.metadata.get("pair_layout", "")
    self.answer_counts = {t: list(c) for t, c in b.info.metadata.get("answer_counts", {}).items()}
    self.types = types
    self.type_ranges, start = {}, 0
    for t, c in zip(types, counts):
      self.type_ranges[t] = (start, int(c))
      start += int(c)
    if start != len(self._ds):
      raise ValueError(f"cotir_bench metadata counts {start} != {len(self._ds)} records")

  def __getstate__(self):
    return {"data_dir": self.data_dir, "split": self.split}

  def __setstate__(self, d):
    self.__dict__.update(d)
    self._open()

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, i: int) -> RawRecord:
    x = self._ds[int(i)]
    present = np.asarray(x["present"])
    blobs = [bytes(x[k]) if present[j] else None for j, k in enumerate(("hq_png", "lq_png", "meta_json"))]
    return RawRecord(_text(x["deg_type"]), _text(x["shard"]), _text(x["key"]), *blobs,
                     truncated=bool(x["truncated"]))

  def __repr__(self) -> str:
    return f"ArrayRecordSource(data_dir={self.data_dir!r}, records={len(self)}, types={len(self.types)})"


def main(argv=None) -> int:
  return cli.run(_main, argv)


def _main(argv) -> int:
  ap = cli.ArgumentParser(prog="python -m cotir_jax.data.tfds_builder", description=__doc__)
  ap.add_argument("--source", required=True,
                  help="CoTIR-Bench root (image/ + prompts/), or with --paired a folder of pairs")
  ap.add_argument("--out", required=True, help="TFDS data_dir to write cotir_bench/1.0.0 into")
  ap.add_argument("--paired", action="store_true",
                  help="--source is a folder of pairs (CDD-11 split, hq/ + lq/, or one holding a JSONL "
                       "manifest); train on the build with data.source=array_record as on the folder")
  a = ap.parse_args(argv)
  if not os.path.isdir(a.source):  # before TFDS creates anything under --out
    raise cli.UsageError(f"--source {a.source!r} is not a directory")
  b = build(a.source, a.out, paired=a.paired)
  print(Path(b.data_dir))
  return 0


if __name__ == "__main__":
  sys.exit(main())
