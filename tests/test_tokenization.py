"""Host tokenizers: ids equal transformers' own calls on the tiny tokenizer directories,
the Qwen chat template renders as upstream's, fixed shapes / dtypes, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

from cotir_jax.tokenization import (CLIPTextTokenizer, QwenChatTokenizer, T5TextTokenizer,
                                    TokenizerError)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets", "tokenizers")
TEXTS = ["Remove the haze and restore contrast.",
         "",
         "A dog on the beach, degraded by JPEG artifacts at 50% quality; ünïcode 🙂 too!",
         " ".join(["Restore this image of a snowy village: remove the rain streaks."] * 40)]


def _reference(path, texts, max_length, chat=False):
  tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
  if chat:
    texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                     add_generation_prompt=True, enable_thinking=False)
             for t in texts]
  enc = tok(texts, padding="max_length", truncation=True, max_length=max_length)
  return np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"]), tok


@pytest.mark.parametrize("cls,name,max_length,chat", [
    (QwenChatTokenizer, "tiny_qwen3", 64, True),
    (T5TextTokenizer, "tiny_t5", 48, False),
    (CLIPTextTokenizer, "tiny_clip", 77, False),
])
def test_ids_match_transformers(cls, name, max_length, chat):
  path = os.path.join(ASSETS, name)
  tok = cls(path, max_length=max_length)
  out = tok(TEXTS)
  ids, mask, ref_tok = _reference(path, TEXTS, max_length, chat)
  assert out["ids"].dtype == np.int32 and out["mask"].dtype == np.int32
  assert out["ids"].shape == out["mask"].shape == (len(TEXTS), max_length)
  np.testing.assert_array_equal(out["ids"], ids)
  np.testing.assert_array_equal(out["mask"], mask)
  assert out["mask"][-1].all()                       # the long text is truncated, not padded
  pad = out["ids"][out["mask"] == 0]
  assert pad.size and (pad == ref_tok.pad_token_id).all()
  assert len(ref_tok) <= 1024                         # fits the tiny encoders' vocabularies


def test_default_lengths():
  assert QwenChatTokenizer(os.path.join(ASSETS, "tiny_qwen3")).max_length == 512
  assert T5TextTokenizer(os.path.join(ASSETS, "tiny_t5")).max_length == 512
  assert CLIPTextTokenizer(os.path.join(ASSETS, "tiny_clip")).max_length == 77


def test_qwen_template_and_specials():
  tok = QwenChatTokenizer(os.path.join(ASSETS, "tiny_qwen3"), max_length=32)
  assert tok.texts(["deblur it"]) == [
      "<|im_start|>user\ndeblur it<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"]
  hf = tok.tokenizer
  assert hf.pad_token == "<|endoftext|>" and hf.padding_side == "right"
  ids = tok(["deblur it"])["ids"][0]
  assert ids[0] == hf.convert_tokens_to_ids("<|im_start|>")   # no BOS, like Qwen


def test_t5_and_clip_specials():
  t5 = T5TextTokenizer(os.path.join(ASSETS, "tiny_t5"), max_length=16)
  out = t5(["remove the noise"])
  n = int(out["mask"][0].sum())
  assert t5.tokenizer.pad_token_id == 0 and out["ids"][0, n - 1] == t5.tokenizer.eos_token_id
  assert (out["ids"][0, n:] == 0).all()
  clip = CLIPTextTokenizer(os.path.join(ASSETS, "tiny_clip"), max_length=16)
  out = clip(["Remove the noise"])
  hf = clip.tokenizer
  n = int(out["mask"][0].sum())
  assert out["ids"][0, 0] == hf.bos_token_id and out["ids"][0, n - 1] == hf.eos_token_id
  # the end-of-text token has the largest id: the legacy pooling rule (argmax) finds it
  assert hf.eos_token_id == max(hf.get_vocab().values())
  assert int(np.argmax(out["ids"][0])) == n - 1


def test_missing_directory_is_named(tmp_path):
  missing = str(tmp_path / "no_tokenizer_here")
  for cls in (QwenChatTokenizer, T5TextTokenizer, CLIPTextTokenizer):
    with pytest.raises(TokenizerError, match="no_tokenizer_here"):
      cls(missing)


def test_build_script_reproduces_assets(tmp_path):
  """The committed tiny tokenizers are exactly what the script builds."""
  subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_tiny_tokenizers.py"),
                  "--out", str(tmp_path)], check=True, capture_output=True)
  for name in ("tiny_qwen3", "tiny_t5", "tiny_clip"):
    for f in sorted(os.listdir(os.path.join(ASSETS, name))):
      with open(os.path.join(ASSETS, name, f), "rb") as a, open(tmp_path / name / f, "rb") as b:
        assert a.read() == b.read(), f"{name}/{f} differs from a fresh build"
