"""The tar index (cached, rebuilt on change, reads in place) and the TFDS/ArrayRecord build."""

import io
import os
import tarfile

import numpy as np

from cotir_jax import data as D
from cotir_jax.data import sources as S
from cotir_jax.data.testing import ByteTokenizer
from data_helpers import SAMPLE, cfg_for, sample_script


def test_sample_dataset_layout():
  root, prompts = S.resolve_layout(SAMPLE)
  assert root == SAMPLE / "image" and prompts == SAMPLE / "prompts"
  shards = S.list_shards(root)
  assert len(shards) >= 6
  for t in shards:
    assert (prompts / "spe_prompt" / f"{t}.txt").exists()
  with tarfile.open(shards["noise"][0]) as t:
    names = t.getnames()
  assert names[:3] == ["noise_000000.hq.png", "noise_000000.lq.png", "noise_000000.meta.json"]


def test_tar_source_reads_members_in_place(tmp_path):
  src = S.TarSource(SAMPLE / "image", cache_dir=tmp_path)
  assert len(src) == sum(c for _, c in src.type_ranges.values())
  rec = src[src.type_ranges["rain"][0]]
  with tarfile.open(SAMPLE / "image" / "rain" / "rain-000000.tar") as t:
    assert rec.hq == t.extractfile(f"{rec.key}.hq.png").read()
    assert rec.meta == t.extractfile(f"{rec.key}.meta.json").read()
  assert rec.deg_type == "rain" and rec.shard == "rain/rain-000000.tar" and not rec.truncated


def test_index_cache_reused_and_rebuilt_on_change(tmp_path, monkeypatch):
  mod = sample_script()
  root = mod.build_dataset(tmp_path / "ds", size=32, per_type=2, per_shard=1, types=["blur", "noise"])
  calls = []
  real = S.scan_tar
  monkeypatch.setattr(S, "scan_tar", lambda p: calls.append(p) or real(p))
  S.TarSource(root / "image", cache_dir=tmp_path / "c")
  assert len(calls) == 4
  S.TarSource(root / "image", cache_dir=tmp_path / "c")
  assert len(calls) == 4                       # all from the cache
  shard = root / "image" / "blur" / "blur-000001.tar"
  with tarfile.open(shard, "a") as t:          # the shard changes: one more sample
    data = b'{"x": 1}'
    ti = tarfile.TarInfo("extra.meta.json")
    ti.size = len(data)
    t.addfile(ti, io.BytesIO(data))
  os.utime(shard, ns=(1, 10**18))
  src = S.TarSource(root / "image", cache_dir=tmp_path / "c")
  assert calls[4:] == [shard] and len(src) == 5


def test_tar_and_array_record_sources_identical(tmp_path):
  from cotir_jax.data.tfds_builder import ArrayRecordSource, build
  build(SAMPLE, tmp_path / "tfds", tar_index_cache=str(tmp_path / "idx"))
  tar_src = S.TarSource(SAMPLE / "image", cache_dir=tmp_path / "idx")
  ar_src = ArrayRecordSource(tmp_path / "tfds")
  assert len(ar_src) == len(tar_src) and ar_src.type_ranges == tar_src.type_ranges
  for i in range(len(tar_src)):
    assert ar_src[i] == tar_src[i]
  cfg = cfg_for(SAMPLE)
  bank = D.make_prompt_bank(cfg)
  tok = {"t5": ByteTokenizer(16), "clip": ByteTokenizer(8)}
  its = [D.make_iterator(cfg, 0, tokenizers=tok, source=s, bank=bank, process_index=0, process_count=1,
                         batch_size=8, patch_size=64) for s in (tar_src, ar_src)]
  for _ in range(2):
    a, b = (next(it) for it in its)
    assert sorted(a) == sorted(b) and "ans_p_clip_mask" in a
    for k in a:
      if k != "meta":
        np.testing.assert_array_equal(a[k], b[k])
    assert a["meta"]["key"] == b["meta"]["key"] and a["meta"]["spe"] == b["meta"]["spe"]


def test_make_source_array_record_kind(tmp_path):
  from cotir_jax.data.tfds_builder import build
  build(SAMPLE, tmp_path / "tfds", tar_index_cache=str(tmp_path / "idx"))
  cfg = cfg_for(SAMPLE, source="array_record", tfds_data_dir=str(tmp_path / "tfds"))
  assert len(D.make_source(cfg)) == len(S.TarSource(SAMPLE / "image", cache_dir=tmp_path / "idx"))
