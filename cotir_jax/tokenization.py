"""Host-side tokenizers for the frozen text encoders, loaded offline.

Each wraps the tokenizer a model repository ships (`tokenizer/`, `tokenizer_2/`) through
transformers, and reproduces upstream's call exactly: fixed-length right padding
(`padding="max_length"`, `truncation=True`), so every batch has one static shape for `jit`.
Calling one on a list of strings returns numpy int32 `ids` and `mask`, both [N, max_length].

- `QwenChatTokenizer` (FLUX.2-klein): each string becomes one user turn of the chat template
  with `add_generation_prompt=True, enable_thinking=False`, rendered as text, then tokenized
  (max_length 512).
- `T5TextTokenizer` (FLUX.1 text_encoder_2; max_length 512) and `CLIPTextTokenizer` (FLUX.1
  text_encoder; max_length 77) tokenize the strings as they are.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from cotir_jax.cli import UserError


class TokenizerError(UserError, ValueError):
  """A missing or unusable tokenizer directory; the message names the path."""


def _load(path: str):
  if not os.path.isdir(path):
    raise TokenizerError(f"tokenizer directory {path!r} does not exist")
  from transformers import AutoTokenizer  # heavy import, only where a tokenizer is built
  try:
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError) as e:
    raise TokenizerError(f"{path}: cannot load a tokenizer from this directory ({e})") from e


class _Tokenizer:
  def __init__(self, path: str, max_length: int):
    self.path, self.max_length = os.fspath(path), int(max_length)
    self.tokenizer = _load(self.path)
    if self.tokenizer.pad_token is None:
      raise TokenizerError(f"{self.path}: the tokenizer defines no pad token")

  def texts(self, strings: Sequence[str]) -> list[str]:
    return list(strings)

  def __call__(self, strings: Sequence[str]) -> dict[str, np.ndarray]:
    if isinstance(strings, str):
      strings = [strings]
    enc = self.tokenizer(self.texts(strings), padding="max_length", truncation=True,
                         max_length=self.max_length, return_attention_mask=True)
    return {"ids": np.asarray(enc["input_ids"], np.int32).reshape(len(strings), self.max_length),
            "mask": np.asarray(enc["attention_mask"], np.int32).reshape(len(strings),
                                                                        self.max_length)}


class QwenChatTokenizer(_Tokenizer):
  """Qwen3 chat-template tokenizer: `tok(strings) -> {'ids', 'mask'}` int32 [N, max_length]."""

  def __init__(self, path: str, max_length: int = 512):
    super().__init__(path, max_length)
    if not self.tokenizer.chat_template:
      raise TokenizerError(f"{self.path}: the tokenizer has no chat template")

  def texts(self, strings: Sequence[str]) -> list[str]:
    return [self.tokenizer.apply_chat_template([{"role": "user", "content": s}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False)
            for s in strings]


class T5TextTokenizer(_Tokenizer):
  """T5 tokenizer (appends `</s>`, pads with id 0): `tok(strings) -> {'ids', 'mask'}`."""

  def __init__(self, path: str, max_length: int = 512):
    super().__init__(path, max_length)


class CLIPTextTokenizer(_Tokenizer):
  """CLIP tokenizer (`<|startoftext|> … <|endoftext|>`, padded): `tok(strings) -> {'ids', 'mask'}`."""

  def __init__(self, path: str, max_length: int = 77):
    super().__init__(path, max_length)
