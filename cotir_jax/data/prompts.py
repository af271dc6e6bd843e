"""Upstream's per-sample text rules: answer parsing, label normalisation, prompt picking.

Randomness comes from a numpy Generator the caller seeds per sample, so a prompt draw is a pure
function of (seed, stream position) instead of upstream's per-worker global `random` state.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cotir_jax.cli import UserError

log = logging.getLogger(__name__)

PROMPT_ERRORS = ("stop", "skip")
GEN_WEIGHTS = (0.8, 0.2)          # (random generic line, first question)
SPE_WEIGHTS = (0.3, 0.7)          # (question, special prompt)
LOST_COLOR_SPE_WEIGHTS = (0.8, 0.2)


class PromptError(Exception):
  """A prompt file a sample needs is missing or empty; `reason` is the skip-counter name."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


class PromptFileError(UserError, ValueError):
  """A prompt file is not UTF-8 (data.prompt_errors='stop'); the message names the file and lines."""


def normalize_deg(value: str | None) -> str:
  """strip, lower-case, runs outside [a-z0-9._-] -> '_'; empty -> 'unknown' (upstream `normalize_deg`)."""
  if not value:
    return "unknown"
  out = re.sub(r"[^a-z0-9._-]+", "_", value.strip().lower())
  return out or "unknown"


def _between(text: str, start: str, end: str) -> str:
  i = text.find(start)
  if i == -1:
    return ""
  i += len(start)
  j = text.find(end, i)
  return (text[i:] if j == -1 else text[i:j]).strip()


def parse_answer(text: str) -> tuple[str, str, str]:
  """(scene, degradation, plan) by case-sensitive marker search; the final 'answer:' part is unused."""
  return (_between(text, "scene description:", "degradation description:"),
          _between(text, "degradation description:", "enhancement plan:"),
          _between(text, "enhancement plan:", "answer:"))


def weighted_pick(options: Sequence[tuple[str | None, float]], rng: np.random.Generator) -> str:
  """Drop empty options, r = U * sum(w), first option whose cumulative weight >= r."""
  kept = [(t, w) for t, w in options if t and w > 0]
  if not kept:
    return ""
  total = sum(w for _, w in kept)
  r = rng.random() * total
  acc = 0.0
  for text, w in kept:
    acc += w
    if r <= acc:
      return text
  return kept[-1][0]


def read_lines(path: Path, on_error: str = "stop") -> list[str]:
  """Stripped non-blank lines of a UTF-8 file. Lines that are not UTF-8 raise PromptFileError naming the
  file and lines (on_error='stop') or are dropped with a warning that names them ('skip')."""
  data = path.read_bytes()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    kept, bad = [], []
    for n, raw in enumerate(data.split(b"\n"), 1):  # b"\n" never occurs inside a UTF-8 sequence
      try:
        kept.append(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        bad.append(f"line {n} (byte {raw[e.start:e.start + 1]!r} at column {e.start + 1})")
    where = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more lines" if len(bad) > 5 else "")
    msg = f"prompt file {path} is not UTF-8: {where}"
    if on_error == "stop":
      raise PromptFileError(f"{msg}; re-save it as UTF-8 or set data.prompt_errors='skip'") from None
    log.warning("%s; %s skipped (data.prompt_errors='skip')", msg, "line" if len(bad) == 1 else "lines")
    text = "\n".join(kept)
  return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _has_gen(p: Path) -> bool:
  return p.is_dir() and (p / "gen_prompt.txt").exists()


def detect_prompt_root(candidate: str | Path) -> Path | None:
  """First of candidate, candidate/prompts, candidate/spe_prompt, 3 ancestors (and their prompts/) with gen_prompt.txt."""
  c = Path(candidate).expanduser()
  if not c.exists():
    return None
  order = [c]
  if c.is_dir():
    order += [c / "prompts", c / "spe_prompt"]
  for anc in list(c.parents)[:3]:
    order += [anc, anc / "prompts"]
  for p in order:
    if _has_gen(p):
      return p
  return None


def special_dir_for(root: Path) -> Path | None:
  """root/spe_prompt, root/prompts, root (if named prompts/spe_prompt), root/../spe_prompt, root/../prompts."""
  order = [root / "spe_prompt", root / "prompts"]
  if root.name in ("prompts", "spe_prompt"):
    order.append(root)
  if root.parent != root:
    order += [root.parent / "spe_prompt", root.parent / "prompts"]
  for p in order:
    if p.is_dir():
      return p
  return None


class PromptBank:
  """Generic, per-label and jpeg-type prompt lines (picklable for workers).

  Every prompt file is read here, at start-up, so an undecodable one stops the run before training
  (prompt_errors='stop') instead of inside a data worker; 'skip' drops its bad lines with a warning.
  missing_prompt='skip': a known label whose file is missing/empty raises PromptError
  (the sample is skipped and counted). 'fallback' uses upstream's sentence "Please correct <label> issues.".
  """

  def __init__(self, root: Path, special_dir: Path | None, missing_prompt: str = "skip",
               prompt_errors: str = "stop"):
    if missing_prompt not in ("skip", "fallback"):
      raise ValueError(f"data.missing_prompt={missing_prompt!r}; allowed: 'skip', 'fallback'")
    if prompt_errors not in PROMPT_ERRORS:
      raise ValueError(f"data.prompt_errors={prompt_errors!r}; allowed: {PROMPT_ERRORS}")
    self.root = Path(root)
    self.special_dir = special_dir
    self.missing_prompt = missing_prompt
    gen_file = self.root / "gen_prompt.txt"
    self.generic = read_lines(gen_file, prompt_errors) if gen_file.exists() else []
    files = sorted(f for f in special_dir.glob("*.txt") if f.is_file()) if special_dir else []
    self._files: dict[str, list[str]] = {f.name[:-4]: read_lines(f, prompt_errors) for f in files}

  @classmethod
  def from_lines(cls, generic: Sequence[str], special: dict[str, Sequence[str]]) -> "PromptBank":
    """A bank of in-memory lines instead of prompt files: `generic` as gen_prompt.txt, `special`
    {label: lines} as spe_prompt/<label>.txt (paired data, whose prompts come from the config)."""
    bank = cls.__new__(cls)
    bank.root, bank.special_dir, bank.missing_prompt = None, None, "skip"
    bank.generic = [ln.strip() for ln in generic if ln.strip()]
    bank._files = {label: [ln.strip() for ln in lines if ln.strip()] for label, lines in special.items()}
    return bank

  def sample_generic(self, rng: np.random.Generator) -> str:
    return self.generic[rng.integers(len(self.generic))] if self.generic else ""

  def special_lines(self, label: str) -> list[str]:
    """Lines of spe_prompt/<label>.txt; raises PromptError for a known label without usable lines."""
    lines = self._files.get(label)
    if lines or label == "unknown":
      return lines or []
    if self.missing_prompt == "fallback":
      return []
    f = self.special_dir / f"{label}.txt" if self.special_dir else None
    if lines is None:
      raise PromptError("missing_prompt_file", f"special prompt file not found for degradation '{label}': {f}")
    raise PromptError("empty_prompt_file", f"special prompt file {f} is empty for '{label}'")

  def sample_special(self, label: str, rng: np.random.Generator) -> str | None:
    lines = self.special_lines(label)
    if lines:
      return lines[rng.integers(len(lines))]
    if label != "unknown":
      return f"Please correct {label.replace('_', ' ').replace('-', ' ')} issues."
    return None

  def sample_jpeg(self, jpeg_type: str, rng: np.random.Generator) -> str | None:
    lines = self._files.get(jpeg_type)
    return lines[rng.integers(len(lines))] if lines else None


def pick_prompts(bank: PromptBank, questions: Sequence[str], label: str, label_raw: str | None,
                 jpeg_type, rng: np.random.Generator) -> tuple[str, str]:
  """(prompt_gen, prompt_spe) exactly as upstream `decode_sample`, same order of random draws."""
  generic = bank.sample_generic(rng)
  first_q = questions[0] if questions else None
  prompt_gen = weighted_pick([(generic, GEN_WEIGHTS[0]), (first_q, GEN_WEIGHTS[1])], rng)
  special = bank.sample_special(label, rng)
  if jpeg_type and ("jpeg_compression" in label or "jpeg compression" in (label_raw or "").lower()):
    jp = bank.sample_jpeg(str(jpeg_type), rng)
    if jp:
      special = jp
  wq, ws = LOST_COLOR_SPE_WEIGHTS if "lost_color" in label else SPE_WEIGHTS
  q = questions[1] if len(questions) > 1 else first_q
  prompt_spe = weighted_pick([(q, wq), (special, ws)], rng)
  return prompt_gen, prompt_spe
