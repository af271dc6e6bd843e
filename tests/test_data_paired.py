"""Paired data (data.source=paired): the three layouts built at test time from scikit-image's
photographs with synthetic degradations, the texts from the templates and the manifest, the answer
masks, and the CoTIR-Bench pipeline's guarantees on them (balanced, deterministic, exact resume,
process rows, corrupt pairs counted, the ArrayRecord build)."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cotir_jax import config
from cotir_jax import data as D
from cotir_jax.data import paired
from cotir_jax.data.testing import ByteTokenizer
from data_helpers import SAMPLE, cfg_for, paired_fixture

TOK = {"qwen": ByteTokenizer(32)}
TEMPLATES = config.defaults().data.templates


@pytest.fixture(scope="module")
def cdd(tmp_path_factory):
  """CDD-11 layout: clear/ + low, haze, rain, low_haze_rain and a user's own foggy_night, 3 each."""
  return paired_fixture(tmp_path_factory.mktemp("cdd") / "train")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
  """hq/ + lq/ (flat and lq/rain/) plus a manifest over it giving some answers and a prompt."""
  root = paired_fixture(tmp_path_factory.mktemp("hqlq") / "set", "hq_lq", types={"rain": ["rain"]})
  for f in sorted((root / "lq" / "rain").iterdir()):
    shutil.copy(f, root / "lq" / f.name)  # untyped copies in lq/
  lines = [{"lq": "lq/rain/000.png", "hq": "hq/000.png", "type": "rain", "scene": "A cat.",
            "prompt": "Please derain."},
           {"lq": "lq/rain/001.png", "hq": "hq/001.png", "type": "rain", "degradation": "Streaks."},
           {"lq": "lq/rain/002.png", "hq": "hq/002.png", "type": "rain"},
           {"lq": "lq/000.png", "hq": "hq/000.png", "scene": "A man.", "degradation": "Wet.",
            "plan": "1. dry it."},
           {"lq": "lq/001.png", "hq": "hq/001.png"}, {"lq": "lq/002.png", "hq": "hq/002.png"}]
  path = root / "pairs.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  return root, path


def _it(cfg, *, pi=0, pc=1, bs=5, state=None, source=None):
  source = source or D.make_source(cfg)
  return D.make_iterator(cfg, 0, tokenizers=TOK, state=state, source=source, process_index=pi,
                         process_count=pc, batch_size=bs, patch_size=32)


def _samples(cfg, n):
  """n samples (one per position) as dicts of their texts, mask and type."""
  it = _it(cfg, bs=n)
  b = next(it)
  m = b["meta"]
  return [dict(type=m["deg_type"][i], key=m["key"][i], gen=m["gen"][i], spe=m["spe"][i],
               s=m["ans_s"][i], d=m["ans_d"][i], p=m["ans_p"][i], mask=b["answer_mask"][i].tolist())
          for i in range(n)]


def _sig(b):
  m = b["meta"]
  return ([np.asarray(b[k]).tobytes() for k in sorted(b) if k != "meta"],
          [tuple(m[k]) for k in ("key", "shard", "gen", "spe", "ans_d")], m["global_position"].tolist())


# ----------------------------------------------------------------------------- listing

def test_layouts_are_listed_with_their_partners(cdd, manifest):
  cdd_list = paired.list_pairs(cdd)
  assert cdd_list.layout == "cdd11" and len(cdd_list.pairs) == 15
  assert sorted({p.type for p in cdd_list.pairs}) == ["foggy_night", "haze", "low", "low_haze_rain", "rain"]
  first = cdd_list.pairs[0]
  assert (first.type, first.shard, first.key, first.hq) == ("foggy_night", "foggy_night", "000.png",
                                                            cdd / "clear" / "000.png")
  root, path = manifest
  folders = paired.list_pairs(root)  # hq/ + lq/ wins over the manifest beside them
  assert folders.layout == "hq_lq"
  assert [(p.type, p.shard, p.key) for p in folders.pairs[:4]] == [
      ("", "lq", "000.png"), ("", "lq", "001.png"), ("", "lq", "002.png"), ("rain", "lq/rain", "000.png")]
  listed = paired.list_pairs(path)
  assert listed.layout == "manifest" and [p.type for p in listed.pairs] == [""] * 3 + ["rain"] * 3
  assert listed.pairs[3].hq == root / "hq" / "000.png" and listed.pairs[3].shard == "pairs.jsonl"
  assert listed.pairs[3].texts == {"prompt": "Please derain.", "scene": "A cat."}


def test_layout_errors_name_what_was_found(cdd, tmp_path):
  with pytest.raises(D.DataLayoutError, match=r"found folders train/.*point at one split, e\.g\."):
    paired.list_pairs(cdd.parent)  # the dataset root, not a split
  with pytest.raises(D.DataLayoutError, match="CoTIR-Bench layout: use data.source='tar'"):
    paired.list_pairs(SAMPLE)
  with pytest.raises(FileNotFoundError):
    paired.list_pairs(tmp_path / "nowhere")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"lq": "a.png", "hq": "b.png"}\n{not json\n{"lq": "a.png"}\n{"lq": "a", "hq": "b", "type": "../x"}\n')
  with pytest.raises(D.DataLayoutError, match=r"3 bad lines: line 2: not JSON .*; line 3: hq missing"
                                              r".*line 4: type '\.\./x' is not a folder name"):
    paired.list_pairs(bad)


def test_types_split_into_template_degradations():
  atoms = lambda t: paired.type_atoms(t, TEMPLATES)
  assert atoms("low_haze_rain") == ["low_light", "rain", "haze"]  # restoration order, alias low
  assert atoms("haze_snow") == ["snow", "haze"] and atoms("Low-Light") == ["low_light"]
  assert atoms("noise_blur_jpeg_compression") == ["jpeg_compression", "noise", "blur"]
  assert atoms("foggy_night") is None and atoms("") is None and atoms("haze_smoke") is None


# ----------------------------------------------------------------------------- texts

def test_cdd11_texts_from_the_templates(cdd):
  cfg = cfg_for(cdd, source="paired")
  samples = _samples(cfg, 15)
  generic = set(TEMPLATES.generic_prompts)
  for s in samples:
    assert s["gen"] in generic and s["s"] == ""
    if s["type"] == "foggy_night":  # no template: generic prompts, no degradation / plan answers
      assert s["mask"] == [0, 0, 0] and s["spe"] in generic and s["d"] == s["p"] == ""
    else:
      assert s["mask"] == [0, 1, 1]
  by_type = {s["type"]: s for s in samples}
  low = TEMPLATES.degradations.low_light
  assert by_type["low"]["d"] == low.description and by_type["low"]["p"] == f"1. {low.plan}."
  assert by_type["low"]["spe"] in low.prompts
  composite = by_type["low_haze_rain"]
  assert composite["spe"] == "Please remove the low light, rain and haze from this image."
  assert composite["p"] == ("1. brighten the exposure while keeping shadows clean; then 2. remove the rain "
                            "streaks and fill in the occluded content; then 3. remove the haze to recover "
                            "contrast and saturation.")
  source = D.make_source(cfg)
  notes = D.pipeline.data_notes(cfg, source, D.make_prompt_bank(cfg, source))
  assert notes[0].startswith("15 pairs of 5 types (CDD-11 layout at ")
  assert "scene term masked: no scene descriptions (data.cot_answers=templates)" in notes
  assert "degradation term: 12 of 15 pairs have degradation descriptions; the others are masked in it" in notes
  assert notes[-1].endswith("unless the manifest gives them: 'foggy_night'")
  cfg.data.cot_answers = "none"
  assert all(s["mask"] == [0, 0, 0] for s in _samples(cfg, 15))


@pytest.mark.parametrize("mode", ["templates", "manifest"])
def test_manifest_answers_and_prompts(manifest, mode):
  cfg = cfg_for(manifest[1], source="paired", cot_answers=mode)
  got = {(s["type"], s["key"]): s for s in _samples(cfg, 6)}
  rain = TEMPLATES.degradations.rain
  templ = mode == "templates"
  first = got[("rain", "lq/rain/000.png")]
  assert first["spe"] == "Please derain." and first["s"] == "A cat."
  assert first["mask"] == [1, int(templ), int(templ)] and first["d"] == (rain.description if templ else "")
  second = got[("rain", "lq/rain/001.png")]
  assert second["d"] == "Streaks." and second["mask"] == [0, 1, int(templ)]
  assert second["spe"] in rain.prompts
  untyped = got[("", "lq/000.png")]
  assert (untyped["s"], untyped["d"], untyped["p"], untyped["mask"]) == ("A man.", "Wet.", "1. dry it.", [1, 1, 1])
  assert got[("", "lq/001.png")]["mask"] == [0, 0, 0]
  source = D.make_source(cfg)
  notes = D.pipeline.data_notes(cfg, source, D.make_prompt_bank(cfg, source))
  assert "scene term: 2 of 6 pairs have scene descriptions; the others are masked in it" in notes
  assert ("plan term: 4 of 6 pairs have enhancement plans; the others are masked in it" if templ else
          "plan term: 1 of 6 pairs have enhancement plans; the others are masked in it") in notes


# ----------------------------------------------------------------------------- pipeline

def test_balanced_deterministic_resumable_and_split_over_processes(cdd):
  cfg = cfg_for(cdd, source="paired")
  source = D.make_source(cfg)
  it = _it(cfg, source=source)
  batches = [next(it) for _ in range(3)]
  for b in batches:  # 5 types: each once per batch of 5
    assert sorted(b["meta"]["deg_type"]) == sorted(source.types)
  state = json.loads(json.dumps(_it_state(cfg, source, 1)))
  resumed = _it(cfg, source=source, state=state)
  assert [_sig(next(resumed)) for _ in range(2)] == [_sig(b) for b in batches[1:]]
  ten = next(_it(cfg, source=source, bs=10))
  halves = [next(_it(cfg, source=source, pi=i, pc=2, bs=5)) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["hq"] for h in halves]), ten["hq"])
  np.testing.assert_array_equal(np.concatenate([h["answer_mask"] for h in halves]), ten["answer_mask"])
  assert halves[0]["meta"]["spe"] + halves[1]["meta"]["spe"] == ten["meta"]["spe"]
  cfg.seed = 1
  assert _sig(next(_it(cfg, source=source))) != _sig(batches[0])


def _it_state(cfg, source, n):
  it = _it(cfg, source=source)
  for _ in range(n):
    next(it)
  return it.get_state()


def test_corrupt_pairs_are_skipped_and_counted(tmp_path):
  root = paired_fixture(tmp_path / "set", "hq_lq", types={"haze": ["haze"], "rain": ["rain"]})
  (root / "lq" / "haze" / "001.png").write_bytes(b"\x89PNG not really")
  (root / "lq" / "rain" / "003.png").write_bytes((root / "lq" / "rain" / "000.png").read_bytes())  # no partner
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "lq" / "rain" / "002.png")  # not the clean size
  cfg = cfg_for(root, source="paired", max_skip_fraction=1.0)
  it = _it(cfg, bs=2)
  good = {("lq/haze", "000.png"), ("lq/haze", "002.png"), ("lq/rain", "000.png"), ("lq/rain", "001.png")}
  for _ in range(5):  # 10 good samples: both types' records all seen
    batch = next(it)
    assert set(zip(batch["meta"]["shard"], batch["meta"]["key"])) <= good
  assert {k for k, v in it.skip_counts.items() if v} == {"corrupt_png", "size_mismatch", "missing_member"}
  assert it.skipped == len(it.recent_skips) == it.examined - 10  # every bad pair, each time it comes up
  why = {(s["shard"], s["key"]): s["_skip"] for s in it.recent_skips}
  assert why == {("lq/haze", "001.png"): "corrupt_png", ("lq/rain", "002.png"): "size_mismatch",
                 ("lq/rain", "003.png"): "missing_member"}
  detail = [s["detail"] for s in it.recent_skips if s["_skip"] == "missing_member"][0]
  assert detail == "no clean image"


def test_array_record_build_of_pairs_gives_the_same_samples(cdd, tmp_path):
  from cotir_jax.data.tfds_builder import build
  build(cdd, tmp_path / "tfds", paired=True)
  folders = cfg_for(cdd, source="paired")
  built = cfg_for(cdd, source="array_record", tfds_data_dir=str(tmp_path / "tfds"))
  a, b = _it(folders), _it(built)
  assert [_sig(next(a)) for _ in range(2)] == [_sig(next(b)) for _ in range(2)]
  source = D.make_source(built)
  assert source.layout == "paired" and source.answer_counts["haze"] == [0, 0, 0]
  notes = D.pipeline.data_notes(built, source, D.make_prompt_bank(built, source))
  assert notes[0].startswith("15 pairs of 5 types (ArrayRecord build of a CDD-11 layout at ")
  assert "scene term masked: no scene descriptions (data.cot_answers=templates)" in notes


def test_config_fields_are_checked():
  c = config.defaults()
  c.data.cot_answers = "all"
  with pytest.raises(config.ConfigError, match=r"data.cot_answers='all' is not allowed; choose one of "
                                               r"\['templates', 'manifest', 'none'\]"):
    config.validate(c)
  c = config.defaults()
  c.data.templates.order = ("haze",)
  with pytest.raises(config.ConfigError, match="data.templates.order=.* must list each of"):
    config.validate(c)
  c = config.defaults()
  c.data.templates.degradations.rain.plan = ""
  with pytest.raises(config.ConfigError, match="data.templates.degradations.rain.plan=''"):
    config.validate(c)
  c = config.defaults()
  c.data.templates.composite_prompt = "Fix it."
  with pytest.raises(config.ConfigError, match="composite_prompt"):
    config.validate(c)
