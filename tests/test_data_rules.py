"""Upstream's per-sample rules, one test per rule."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cotir_jax.data import decode as DEC
from cotir_jax.data import prompts as P
from cotir_jax.data.decode import RawRecord, SkipSample, process_record


def test_parse_answer_markers():
  t = ("scene description: A cat. degradation description: Noisy.  enhancement plan: denoise. "
       "answer: done")
  assert P.parse_answer(t) == ("A cat.", "Noisy.", "denoise.")
  assert P.parse_answer("degradation description: only d") == ("", "only d", "")   # no start -> ""
  assert P.parse_answer("scene description: s enhancement plan: p") == ("s enhancement plan: p", "", "p")
  assert P.parse_answer("Scene Description: x") == ("", "", "")                     # case-sensitive


def test_normalize_deg():
  assert P.normalize_deg("  Noise, Blur + JPEG compression ") == "noise_blur_jpeg_compression"
  assert P.normalize_deg("low-light.v2") == "low-light.v2"
  assert P.normalize_deg("") == "unknown" and P.normalize_deg(None) == "unknown"
  assert P.normalize_deg("!!!") == "_"


def _bank(tmp_path, missing="skip", **files):
  root = tmp_path / "prompts"
  (root / "spe_prompt").mkdir(parents=True)
  (root / "gen_prompt.txt").write_text("GEN\n\n")
  for name, text in files.items():
    (root / "spe_prompt" / f"{name}.txt").write_text(text)
  assert P.detect_prompt_root(tmp_path) == root
  return P.PromptBank(root, P.special_dir_for(root), missing)


def _freq(bank, questions, label, raw=None, jpeg=None, n=10_000):
  rng = np.random.default_rng(0)
  gens, spes = zip(*(P.pick_prompts(bank, questions, label, raw, jpeg, rng) for _ in range(n)))
  return {t: gens.count(t) / n for t in set(gens)}, {t: spes.count(t) / n for t in set(spes)}


def test_prompt_probabilities_10k(tmp_path):
  bank = _bank(tmp_path, noise="SPE\n", lost_color="LC\n")
  gen, spe = _freq(bank, ["Q0", "Q1"], "noise")
  assert abs(gen["GEN"] - 0.8) < 0.02 and abs(gen["Q0"] - 0.2) < 0.02
  assert abs(spe["Q1"] - 0.3) < 0.02 and abs(spe["SPE"] - 0.7) < 0.02
  _, spe = _freq(bank, ["Q0"], "lost_color")            # one question: q = questions[0]
  assert abs(spe["Q0"] - 0.8) < 0.02 and abs(spe["LC"] - 0.2) < 0.02


def test_prompt_empty_options_dropped(tmp_path):
  bank = _bank(tmp_path, noise="SPE\n")
  gen, spe = _freq(bank, [], "noise", n=200)
  assert gen == {"GEN": 1.0} and spe == {"SPE": 1.0}
  assert P.weighted_pick([(None, 1.0), ("", 2.0)], np.random.default_rng(0)) == ""


def test_jpeg_type_prompt(tmp_path):
  bank = _bank(tmp_path, jpeg_compression="SPE\n", noise="N\n", heavy_jpeg="HEAVY\n")
  _, spe = _freq(bank, ["Q0", "Q1"], "jpeg_compression", "jpeg compression", "heavy_jpeg", n=2000)
  assert set(spe) == {"Q1", "HEAVY"}
  _, spe = _freq(bank, ["Q0", "Q1"], "noise", "noise", "heavy_jpeg", n=500)        # label without jpeg
  assert set(spe) == {"Q1", "N"}
  _, spe = _freq(bank, ["Q0", "Q1"], "jpeg_compression", "x", "no_such_type", n=500)  # no file: keep special
  assert set(spe) == {"Q1", "SPE"}


def test_missing_prompt_skip_and_fallback(tmp_path):
  bank = _bank(tmp_path, dust="\n")
  with pytest.raises(P.PromptError) as e:
    bank.sample_special("smog", np.random.default_rng(0))
  assert e.value.reason == "missing_prompt_file"
  with pytest.raises(P.PromptError) as e:
    bank.sample_special("dust", np.random.default_rng(0))
  assert e.value.reason == "empty_prompt_file"
  assert bank.sample_special("unknown", np.random.default_rng(0)) is None
  fb = P.PromptBank(bank.root, bank.special_dir, "fallback")
  assert fb.sample_special("heavy_rain-v2", np.random.default_rng(0)) == "Please correct heavy rain v2 issues."


def _png(a):
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, "PNG")
  return buf.getvalue()


def test_png_to_float_hwc_and_no_resize_at_stored_size(tmp_path):
  bank = _bank(tmp_path, noise="SPE\n")
  a = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
  meta = json.dumps({"deg": "noise", "cot": {"questions": ["q"], "answers": "scene description: s"}}).encode()
  ex = process_record(RawRecord("blur", "blur/x.tar", "k", _png(a), _png(a), meta), patch_size=48, bank=bank,
                      rng=np.random.default_rng(0), label_from_folder=False)
  assert ex["hq"].dtype == np.float32 and ex["hq"].shape == (48, 48, 3)
  np.testing.assert_array_equal(ex["hq"], a.astype(np.float32) / 127.5 - 1)
  assert ex["deg"] == "noise" and ex["ans_s"] == "s"
  with pytest.raises(SkipSample):  # label from the folder ('blur') has no prompt file here
    process_record(RawRecord("blur", "blur/x.tar", "k", _png(a), _png(a), meta), patch_size=48, bank=bank,
                   rng=np.random.default_rng(0), label_from_folder=True)


@pytest.mark.parametrize("src,dst", [(512, 128), (512, 256), (512, 384), (100, 128), ((60, 90), 37)])
def test_resize_matches_torch_bilinear(src, dst):
  h, w = src if isinstance(src, tuple) else (src, src)
  x = np.random.default_rng(1).uniform(-1, 1, (h, w, 3)).astype(np.float32)
  ours = DEC.resize_bilinear(x, dst)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=(dst, dst),
                                        mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
  assert ours.shape == (dst, dst, 3) and ours.dtype == np.float32
  assert np.abs(ours - ref).max() <= 1e-5


def test_not_rgb_is_skipped():
  gray = np.zeros((8, 8), np.uint8)
  with pytest.raises(SkipSample) as e:
    DEC.decode_png(_png(gray), "hq.png")
  assert e.value.reason == "not_rgb"
