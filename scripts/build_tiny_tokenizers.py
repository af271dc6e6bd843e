"""Builds the tiny tokenizer directories used by the tiny configs and the tests (no downloads).

Three transformers-loadable directories under `assets/tokenizers/` (vocabularies of at most
1000 entries, within the tiny encoders' 1024 embedding rows), BPE learned on a small generated corpus
of image-restoration text. The `tokenizers` library supplies the normalizers, pre-tokenizers,
BPE models and post-processors; the merges are learned by `learn_bpe` below, deterministic,
so a rebuild reproduces the committed files byte for byte.

- `tiny_qwen3`: byte-level BPE with Qwen's special tokens and a chat template rendering
  `<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`
  (with `enable_thinking=False`); pad `<|endoftext|>`, no BOS, right padding.
- `tiny_t5`: SentencePiece-style pieces (metaspace), `<pad>` = 0, `</s>` = 1, `<unk>` = 2,
  `</s>` appended to every text.
- `tiny_clip`: lower-cased byte-level BPE with `</w>` word ends (CLIP's split pattern),
  `<|startoftext|> … <|endoftext|>` around every text, pad = `<|endoftext|>`; the end-of-text
  token has the largest id, as in openai's CLIP vocabulary (the legacy pooling rule takes the
  argmax of the ids).

Usage: python scripts/build_tiny_tokenizers.py [--out assets/tokenizers]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import random

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 1000  # the tiny text encoders have 1024 embedding rows

QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}")

SCENES = ["a city street at night", "a mountain lake at dawn", "a portrait of an old man",
          "a cat sleeping on a sofa", "a crowded market", "a forest path in autumn",
          "a red car parked by a wall", "a beach with small waves", "a kitchen with wooden shelves",
          "a bridge over a river", "a field of yellow flowers", "a child playing with a ball",
          "an office with large windows", "a snowy village", "a bowl of fruit on a table",
          "a train station platform", "a dog running on grass", "a building with glass facade"]
DEGRADATIONS = ["gaussian noise", "motion blur", "defocus blur", "jpeg compression artifacts",
                "low light", "haze", "rain streaks", "snow", "low resolution", "color cast",
                "overexposure", "sensor noise", "raindrops on the lens", "underwater color shift",
                "moire patterns", "banding"]
ACTIONS = ["remove the noise while keeping fine texture", "deblur the edges and restore detail",
           "remove the compression blocks and ringing", "brighten the shadows without clipping",
           "remove the haze and restore contrast", "remove the rain streaks",
           "upscale and sharpen the details", "correct the white balance",
           "recover the highlights", "restore natural colors", "reduce the grain",
           "clean the lens artifacts"]
EXTRA = [
    "Describe the image content in detail.",
    "What degradations are present in this photo?",
    "Plan the steps needed to restore the image.",
    "The image is slightly soft and the colors are faded.",
    "Strong noise hides the texture of the wall.",
    "Faces should look natural, with skin texture preserved.",
    "Keep the sky smooth and avoid halos around the trees.",
    "Restore the image to a clean, sharp, high quality photo.",
    "The picture was taken with a phone in a dark room.",
    "Text on the sign should become readable again.",
    "Edges are jagged because the image was upscaled badly.",
    "It's the camera's fault: don't over-sharpen what you can't see.",
    "Numbers 1, 2, 3 and symbols like %, &, (x) also appear: 50% done; f/2.8; ISO-3200!",
]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
  """A few hundred lines of generic image-restoration prompts, scene and plan descriptions."""
  rng = random.Random(seed)
  lines = list(EXTRA)
  combos = list(itertools.product(SCENES, DEGRADATIONS, ACTIONS))
  rng.shuffle(combos)
  for scene, deg, act in combos[:n]:
    form = rng.randrange(4)
    if form == 0:
      lines.append(f"The photo shows {scene}, degraded by {deg}.")
    elif form == 1:
      lines.append(f"Degradation: {deg}. Plan: {act}.")
    elif form == 2:
      lines.append(f"Restore this image of {scene}: {act}.")
    else:
      lines.append(f"Scene: {scene}. The main problem is {deg}, so we {act}.")
  return lines


def learn_bpe(words: list[list[str]], num_merges: int) -> list[tuple[str, str]]:
  """Greedy BPE merges over pre-tokenized words (lists of initial symbols).

  Written out here rather than using `tokenizers`' trainers: those break count ties by
  hash-map order, so two runs give different files; here ties go to the smallest pair.
  """
  counts = collections.Counter(tuple(w) for w in words if w)
  vocab = dict(counts)
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for word, n in vocab.items():
      for pair in zip(word, word[1:]):
        pairs[pair] += n
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))
    if pairs[best] < 2:
      break
    merges.append(best)
    merged = {}
    for word, n in vocab.items():
      out, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      merged[tuple(out)] = merged.get(tuple(out), 0) + n
    vocab = merged
  return merges


def _words(tok: Tokenizer, lines: list[str], suffix: str = "") -> list[list[str]]:
  """Each line normalized and pre-tokenized by `tok`'s own pipeline, split into symbols."""
  out = []
  for line in lines:
    text = tok.normalizer.normalize_str(line) if tok.normalizer is not None else line
    for word, _ in tok.pre_tokenizer.pre_tokenize_str(text):
      symbols = list(word)
      if symbols and suffix:
        symbols[-1] += suffix
      out.append(symbols)
  return out


def _bpe_vocab(base: list[str], merges: list[tuple[str, str]]) -> dict[str, int]:
  vocab: dict[str, int] = {}
  for token in base + [a + b for a, b in merges]:
    vocab.setdefault(token, len(vocab))
  return vocab


def _save(tok: Tokenizer, out: str, *, chat_template: str | None = None, **special) -> None:
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512,
                                 padding_side="right", **special)
  if chat_template is not None:
    fast.chat_template = chat_template
  os.makedirs(out, exist_ok=True)
  fast.save_pretrained(out, save_jinja_files=False)
  # A class name every transformers version resolves (≥ 5 maps it onto its tokenizers backend).
  cfg_path = os.path.join(out, "tokenizer_config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
  with open(cfg_path, "w") as f:
    json.dump(cfg, f, indent=2, ensure_ascii=False, sort_keys=True)
    f.write("\n")


def build_qwen(lines: list[str], out: str) -> None:
  """Byte-level BPE (every byte is a symbol, nothing is unknown), Qwen's specials first."""
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
  probe = Tokenizer(models.BPE())
  probe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  merges = learn_bpe(_words(probe, lines), VOCAB_SIZE - len(specials) - len(alphabet))
  tok = Tokenizer(models.BPE(_bpe_vocab(specials + alphabet, merges), merges))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(specials)
  _save(tok, out, chat_template=QWEN_CHAT_TEMPLATE, pad_token="<|endoftext|>",
        eos_token="<|im_end|>", additional_special_tokens=specials[1:])


def build_t5(lines: list[str], out: str) -> None:
  """SentencePiece-like pieces (metaspace `▁` word starts); `<pad>` 0, `</s>` 1, `<unk>` 2."""
  specials = ["<pad>", "</s>", "<unk>"]
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.Sequence([normalizers.NFKC(),
                                         normalizers.Replace(Regex(" {2,}"), " ")])
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
  words = _words(tok, lines)
  chars = sorted({c for w in words for c in w})
  merges = learn_bpe(words, VOCAB_SIZE - len(specials) - len(chars))
  model = models.BPE(_bpe_vocab(specials + chars, merges), merges, unk_token="<unk>")
  tok.model = model
  tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
  tok.add_special_tokens(specials)
  tok.post_processor = processors.TemplateProcessing(
      single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
  _save(tok, out, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
              r"""[^\s\p{L}\p{N}]+""")


def build_clip(lines: list[str], out: str) -> None:
  """openai's layout: every byte symbol alone and word-final (nothing unknown), the merges,
  then `<|startoftext|>` and `<|endoftext|>` last, so end-of-text has the largest id."""
  bos, eos = "<|startoftext|>", "<|endoftext|>"
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.Sequence([normalizers.NFC(),
                                         normalizers.Replace(Regex(r"\s+"), " "),
                                         normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  base = alphabet + [c + "</w>" for c in alphabet]
  merges = learn_bpe(_words(tok, lines, suffix="</w>"), VOCAB_SIZE - len(base) - 2)
  vocab = _bpe_vocab(base, merges)
  vocab[bos] = len(vocab)
  vocab[eos] = len(vocab)
  tok.model = models.BPE(vocab, merges, end_of_word_suffix="</w>")
  tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " "),
                                   decoders.Strip(" ", 0, 1)])
  tok.add_special_tokens([bos, eos])
  tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
      special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
  _save(tok, out, bos_token=bos, eos_token=eos, pad_token=eos, unk_token=eos)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "assets",
                                                 "tokenizers"))
  args = ap.parse_args()
  lines = corpus()
  for name, build in (("tiny_qwen3", build_qwen), ("tiny_t5", build_t5), ("tiny_clip", build_clip)):
    path = os.path.normpath(os.path.join(args.out, name))
    build(lines, path)
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
