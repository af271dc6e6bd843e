"""Shared fixtures of the data tests: the sample-dataset script as a module, configs, the corruption fixture."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from cotir_jax.config import defaults

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


def sample_script():
  spec = importlib.util.spec_from_file_location("make_sample_dataset", REPO / "scripts" / "make_sample_dataset.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def cfg_for(data_dir, *, tmp_cache=None, **data):
  c = defaults()
  c.data.data_dir = str(data_dir)
  c.data.num_workers = 0
  with c.unlocked():
    c.data.index_cache_dir = str(tmp_cache) if tmp_cache else None
    for k, v in data.items():
      c.data[k] = v
  return c


def _png(arr, mode=None) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr, mode).save(buf, "PNG") if mode else Image.fromarray(arr).save(buf, "PNG")
  return buf.getvalue()


def _meta(deg="noise", **extra) -> bytes:
  m = {"deg": deg, "cot": {"questions": ["q0?", "q1?"],
                           "answers": "scene description: s. degradation description: d. enhancement plan: p. answer: a"}}
  m.update(extra)
  return json.dumps(m).encode()


def _add(tar, name, data):
  ti = tarfile.TarInfo(name)
  ti.size = len(data)
  tar.addfile(ti, io.BytesIO(data))


# reason -> how many fixture samples carry it
EXPECTED_SKIPS = {"corrupt_png": 2, "truncated_tar": 1, "missing_member": 1, "invalid_json": 1,
                  "missing_cot_fields": 1, "size_mismatch": 1, "not_rgb": 2, "missing_prompt_file": 1,
                  "empty_prompt_file": 1}


def corruption_fixture(root: Path) -> tuple[Path, set[str]]:
  """Good 64x64 samples of 3 types plus one sample per kind of corruption. Returns (root, good keys)."""
  mod = sample_script()
  mod.build_dataset(root, size=64, per_type=6, per_shard=3, seed=1, types=["blur", "haze", "noise"])
  good = set()
  for tar in (root / "image").rglob("*.tar"):
    with tarfile.open(tar) as t:
      good |= {m.name.split(".")[0] for m in t.getmembers()}
  (root / "prompts" / "spe_prompt" / "dust.txt").write_text("\n\n")
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
  ok = _png(rgb)
  bad = [
      ("bad_garbage", {"hq.png": b"\x89PNG not really", "lq.png": ok, "meta.json": _meta()}),
      ("bad_cutpng", {"hq.png": ok, "lq.png": ok[: len(ok) // 2], "meta.json": _meta()}),
      ("bad_nolq", {"hq.png": ok, "meta.json": _meta()}),
      ("bad_json", {"hq.png": ok, "lq.png": ok, "meta.json": b"{'deg': 'noise',"}),
      ("bad_nocot", {"hq.png": ok, "lq.png": ok, "meta.json": json.dumps({"deg": "noise"}).encode()}),
      ("bad_size", {"hq.png": ok, "lq.png": _png(rgb[:32, :32]), "meta.json": _meta()}),
      ("bad_gray", {"hq.png": _png(rgb[..., 0]), "lq.png": ok, "meta.json": _meta()}),
      ("bad_rgba", {"hq.png": ok, "lq.png": _png(np.concatenate([rgb, rgb[..., :1]], -1)), "meta.json": _meta()}),
      ("bad_noprompt", {"hq.png": ok, "lq.png": ok, "meta.json": _meta("smog")}),
      ("bad_emptyprompt", {"hq.png": ok, "lq.png": ok, "meta.json": _meta("dust")}),
  ]
  with tarfile.open(root / "image" / "noise" / "noise-bad.tar", "w", format=tarfile.USTAR_FORMAT) as t:
    for key, members in bad:
      for ext, data in members.items():
        _add(t, f"{key}.{ext}", data)
  cut = root / "image" / "haze" / "haze-cut.tar"
  with tarfile.open(cut, "w", format=tarfile.USTAR_FORMAT) as t:
    for ext, data in (("hq.png", ok), ("lq.png", ok), ("meta.json", _meta())):
      _add(t, f"bad_cuttar.{ext}", data)
  raw = cut.read_bytes()
  cut.write_bytes(raw[: 512 * 2 + len(ok) + 512 * 2 + len(ok) // 3])  # inside the lq.png data
  return root, good


CDD11_TYPES = {"low": ["low_light"], "haze": ["haze"], "rain": ["rain"],
               "low_haze_rain": ["haze", "rain", "low_light"], "foggy_night": ["haze", "low_light"]}


def paired_fixture(root: Path, layout: str = "cdd11", *, size: int = 40, height: int | None = None,
                   n: int = 3, seed: int = 0, types=CDD11_TYPES) -> Path:
  """A tiny paired set built now from scikit-image's photographs and the sample script's synthetic
  degradations: `cdd11` (clear/ + type folders) or `hq_lq` (hq/ + lq/<type>/), images `size`
  wide and `height` (default `size`) high. Returns root."""
  mod = sample_script()
  rng = np.random.default_rng(seed)
  photos = [mod.square(mod.load_photo(p), size, rng)[:height] for p in list(mod.PHOTOS)[:n]]
  clean_dir, type_dir = (root / "clear", root) if layout == "cdd11" else (root / "hq", root / "lq")
  clean_dir.mkdir(parents=True, exist_ok=True)
  for i, hq in enumerate(photos):
    Image.fromarray(hq).save(clean_dir / f"{i:03d}.png")
  for deg_type, comps in types.items():
    (type_dir / deg_type).mkdir(parents=True, exist_ok=True)
    for i, hq in enumerate(photos):
      lq, info = hq, {}
      for c in comps:
        lq = mod.degrade(lq, c, np.random.default_rng([seed, i, len(deg_type)]), info)
      Image.fromarray(lq).save(type_dir / deg_type / f"{i:03d}.png")
  return root
