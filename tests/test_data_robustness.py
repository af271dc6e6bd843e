"""Inputs that crashed a run or vanished uncounted -- a decompression-bomb PNG, prompt files that
are not UTF-8, unreadable entries under image/, shards that are not sound tars -- are each skipped and
counted with reason and path, or stop start-up with one clear error. Fixtures are generated here."""

import io
import logging
import os
import re
import struct
import tarfile
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from cotir_jax import data as D
from cotir_jax.config import ConfigError, defaults, validate
from cotir_jax.data import decode as DEC
from cotir_jax.data import sources as S
from data_helpers import SAMPLE, _add, _meta, _png, cfg_for

RGB = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
GOOD = {"hq.png": _png(RGB), "lq.png": _png(RGB), "meta.json": _meta()}


def _chunk(tag: bytes, body: bytes) -> bytes:
  return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def zero_png(width: int, height: int, *, depth: int = 8, colour: int = 2, rows: int = 50) -> bytes:
  """A valid all-zero PNG whose pixels never exist here: `rows` zero scanlines deflated once with a full
  flush (so the block stands alone) and repeated; the adler32 of n zero bytes is (n % 65521) << 16 | 1."""
  assert height % rows == 0
  line = 1 + (width * depth * (3 if colour == 2 else 1) + 7) // 8
  z = zlib.compressobj(9)
  block = bytes(line * rows)
  first = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
  rest = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
  end = b"\x03\x00" + struct.pack(">I", ((line * height) % 65521) << 16 | 1)  # empty final block, adler32
  idat = first + rest * (height // rows - 1) + end
  ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _tar(path, samples) -> dict:
  """Write [(key, {member: bytes})] as a tar at path; returns {member name: TarInfo} (offsets to cut at)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
    for key, members in samples:
      for ext, data in members.items():
        _add(t, f"{key}.{ext}", data)
  with tarfile.open(path) as t:
    return {m.name: m for m in t.getmembers()}


def _cut(path, at: int):
  path.write_bytes(path.read_bytes()[:at])


def _dataset(root, shards: dict, gen: bytes = b"GEN one\nGEN two\n", noise: bytes = b"NOISE\n"):
  """image/<type>/<name>.tar from {'<type>/<name>': samples}, prompts/gen_prompt.txt, spe_prompt/{noise,blur}.txt."""
  for name, samples in shards.items():
    _tar(root / "image" / f"{name}.tar", samples)
  spe = root / "prompts" / "spe_prompt"
  spe.mkdir(parents=True)
  (root / "prompts" / "gen_prompt.txt").write_bytes(gen)
  (spe / "noise.txt").write_bytes(noise)
  (spe / "blur.txt").write_bytes(b"BLUR\n")
  return root


def _drain(cfg, source=None):
  """Every position once, batch 1; returns (iterator, delivered keys)."""
  src = source or D.make_source(cfg)
  it = D.make_iterator(cfg, 0, source=src, process_index=0, process_count=1, batch_size=1, patch_size=32,
                       end_position=len(src))
  return it, [b["meta"]["key"][0] for b in it]


def test_decompression_bomb_skipped_from_header(tmp_path, caplog):
  bomb = zero_png(20000, 20000)  # 1.2 GB of pixels, 4.5 GiB as float32, ~1 MB on disk
  root = _dataset(tmp_path / "ds", {"noise/noise-0": [("a", GOOD), ("bomb", {**GOOD, "hq.png": bomb}),
                                                     ("b", GOOD)]})
  cfg = cfg_for(root, tmp_cache=tmp_path / "idx", mixing="shuffle")
  with caplog.at_level(logging.WARNING, logger="cotir_jax.data.pipeline"):
    it, keys = _drain(cfg)
  assert sorted(keys) == ["a", "b"]
  assert {r: n for r, n in it.skip_counts.items() if n} == {"too_large": 1}
  assert ("shard=noise/noise-0.tar key=bomb" in caplog.text and "reason=too_large" in caplog.text
          and "20000x20000" in caplog.text and "data.max_image_pixels=16777216" in caplog.text)


def test_pixel_limit_applies_to_every_decoder_and_is_validated():
  small = np.zeros((64, 65, 3), np.uint8)
  assert DEC.decode_png(_png(small), "hq.png", 65 * 64).shape == (64, 65, 3)
  with pytest.raises(DEC.SkipSample, match="too_large: hq.png is 65x64 = 4160 pixels"):
    DEC.decode_png(_png(small), "hq.png", 64 * 64)
  bmp = io.BytesIO()
  Image.fromarray(small).save(bmp, "BMP")  # not a PNG: Pillow's lazy header gives the size before decoding
  with pytest.raises(DEC.SkipSample, match="too_large: lq.png is 65x64"):
    DEC.decode_png(bmp.getvalue(), "lq.png", 64 * 64)
  with pytest.raises(DEC.SkipSample, match="too_large: hq.png: .*decompression bomb"):  # Pillow's own guard
    DEC.decode_png(zero_png(20000, 20000, depth=1, colour=0), "hq.png", 10**9)
  for field, value in (("max_image_pixels", 0), ("prompt_errors", "ignore"), ("max_skip_fraction", 2.0)):
    cfg = defaults()
    cfg.data[field] = value
    with pytest.raises(ConfigError, match=f"data.{field}="):
      validate(cfg)


def test_uint8_resize_bit_exact_without_full_float_copy():
  img = np.random.default_rng(1).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
  tracemalloc.start()
  out = D.resize_bilinear(img, 64)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  np.testing.assert_array_equal(out, D.resize_bilinear(DEC.to_float(img), 64))
  assert peak < img.size * 4 // 4, peak  # a float32 copy of the image would be img.size * 4 bytes
  small = img[:60, :90]
  for size in (37, 128):
    np.testing.assert_array_equal(D.resize_bilinear(small, size), D.resize_bilinear(DEC.to_float(small), size))
  np.testing.assert_array_equal(D.resize_bilinear(img[:64, :64], 64), DEC.to_float(img[:64, :64]))


def test_prompt_files_not_utf8_stop_or_skip(tmp_path, caplog):
  root = _dataset(tmp_path / "ds", {"noise/noise-0": [("a", GOOD), ("b", GOOD)]},
                  gen=b"GEN one\ncaf\xe9 au lait\nGEN two\n", noise=b"bruit \xe0 corriger\n")
  cfg = cfg_for(root, tmp_cache=tmp_path / "idx", max_skip_fraction=1.0, skip_check_min_samples=1)
  with pytest.raises(D.PromptFileError, match=r"gen_prompt\.txt is not UTF-8: line 2 \(byte b'\\xe9' at column 4\)"):
    D.make_prompt_bank(cfg)
  (root / "prompts" / "gen_prompt.txt").write_bytes(b"GEN one\n")
  with pytest.raises(D.PromptFileError, match=r"spe_prompt/noise\.txt is not UTF-8: line 1 .*prompt_errors='skip'"):
    D.make_prompt_bank(cfg)

  (root / "prompts" / "gen_prompt.txt").write_bytes(b"GEN one\ncaf\xe9 au lait\nGEN two\n")
  cfg.data.prompt_errors = "skip"
  with caplog.at_level(logging.WARNING):
    bank = D.make_prompt_bank(cfg)
    it, keys = _drain(cfg)
  assert bank.generic == ["GEN one", "GEN two"]
  assert "gen_prompt.txt is not UTF-8: line 2" in caplog.text and "noise.txt is not UTF-8: line 1" in caplog.text
  # noise.txt lost its only line: its samples are skipped as an empty prompt file, with shard and key
  assert keys == [] and it.skip_counts["empty_prompt_file"] == 2
  assert "shard=noise/noise-0.tar key=a" in caplog.text and "reason=empty_prompt_file" in caplog.text


def test_unreadable_entries_one_error_naming_each(tmp_path):
  root = _dataset(tmp_path / "ds", {"noise/noise-0": [("a", GOOD)], "blur/blur-0": [("b", GOOD)]})
  image = root / "image"
  os.symlink("loop.tar", image / "noise" / "loop.tar")
  os.symlink("nowhere.tar", image / "blur" / "gone.tar")
  os.symlink("cycle", image / "cycle")
  cfg = cfg_for(root, tmp_cache=tmp_path / "idx")
  with pytest.raises(D.DataLayoutError) as e:
    D.make_source(cfg)
  msg = str(e.value)
  assert not isinstance(e.value, OSError) and msg.startswith(f"3 entries under {image} cannot be read")
  assert f"{image / 'noise' / 'loop.tar'}: Too many levels of symbolic links" in msg
  assert f"{image / 'cycle'}: Too many levels of symbolic links" in msg
  assert f"{image / 'blur' / 'gone.tar'}: No such file or directory" in msg


def _bad_shards_dataset(root):
  """2 sound shards and 6 bad ones: {relative path: pattern of its problem}."""
  root = _dataset(root, {"noise/noise-0": [("n0", GOOD)], "blur/blur-0": [("b0", GOOD)]})
  image = root / "image"
  (image / "blur" / "empty.tar").write_bytes(b"")
  (image / "blur" / "text.tar").write_bytes(b"<html>503 Service Unavailable</html>\n" * 40)
  members = _tar(image / "noise" / "cuthdr.tar", [("h0", GOOD), ("h1", GOOD)])
  _cut(image / "noise" / "cuthdr.tar", members["h1.lq.png"].offset + 100)  # inside a header: h1 keeps hq.png only
  _tar(image / "noise" / "garbage.tar", [("g0", GOOD), ("g1", GOOD)])
  with open(image / "noise" / "garbage.tar", "ab") as f:
    f.write(b"\x07trailing junk" * 50)
  _tar(image / "noise" / "onlymeta.tar", [("m0", {"meta.json": _meta()}), ("m1", {"meta.json": _meta()})])
  members = _tar(image / "noise" / "cutdata.tar", [("x0", GOOD), ("x1", GOOD)])
  _cut(image / "noise" / "cutdata.tar", members["x0.lq.png"].offset_data + 10)
  bad = {"blur/empty.tar": r"not a tar archive \(empty file\)", "blur/text.tar": "not a tar archive",
         "noise/cuthdr.tar": r"bytes from offset \d+ are not a tar header",
         "noise/garbage.tar": r"bytes from offset \d+ are not a tar header",
         "noise/onlymeta.tar": r"no complete sample .* among 2 keys",
         "noise/cutdata.tar": r"cut short inside x0\.lq\.png"}
  return root, bad


def test_bad_shards_listed_counted_and_stop_over_threshold(tmp_path, caplog, monkeypatch):
  root, bad = _bad_shards_dataset(tmp_path / "ds")
  image = root / "image"
  cfg = cfg_for(root, tmp_cache=tmp_path / "idx", mixing="shuffle", max_skip_fraction=0.75)
  with caplog.at_level(logging.WARNING, logger="cotir_jax.data"):
    src = D.make_source(cfg)
  warned = [r.getMessage() for r in caplog.records if r.name == "cotir_jax.data.sources"]
  assert len(warned) == 1 and warned[0].startswith("data: 6 of 8 shards are bad")
  assert set(src.bad_shard_paths) == {str(image / n) for n in bad}
  for name, why in bad.items():
    assert str(image / name) in warned[0]
    assert re.search(why, src.bad_shard_paths[str(image / name)]), (name, src.bad_shard_paths)

  it, keys = _drain(cfg, src)
  assert it.bad_shards == 6 and it.bad_shard_paths == src.bad_shard_paths
  assert sorted(keys) == ["b0", "g0", "g1", "h0", "n0"]  # intact samples of damaged shards are still used
  assert {r: n for r, n in it.skip_counts.items() if n} == {"missing_member": 3, "truncated_tar": 1}

  cfg.data.max_skip_fraction = 0.5
  with pytest.raises(D.SkipFractionError, match=r"6 of 8 shards are bad \(75\.00% > data\.max_skip_fraction=50\.00%\)"
                                               r".*empty\.tar: not a tar archive"):
    D.make_source(cfg)
  assert S.TarSource(SAMPLE / "image", cache_dir=tmp_path / "idx2").bad_shard_paths == {}  # sound tars pass

  calls = []
  monkeypatch.setattr(S, "scan_tar", lambda p: calls.append(p))
  assert S.TarSource(image, cache_dir=tmp_path / "idx").bad_shard_paths == src.bad_shard_paths and not calls


def test_bad_shards_carried_into_the_array_record_build(tmp_path):
  from cotir_jax.data.tfds_builder import build
  root, bad = _bad_shards_dataset(tmp_path / "ds")
  build(root, tmp_path / "tfds", tar_index_cache=str(tmp_path / "idx"))
  cfg = cfg_for(root, source="array_record", tfds_data_dir=str(tmp_path / "tfds"), max_skip_fraction=0.75)
  src = D.make_source(cfg)
  assert len(src) == 9 and src.num_shards == 8
  assert set(src.bad_shard_paths) == {str(root / "image" / n) for n in bad}
  cfg.data.max_skip_fraction = 0.5
  with pytest.raises(D.SkipFractionError, match="6 of 8 shards are bad"):
    D.make_source(cfg)
