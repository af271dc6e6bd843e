"""Turning one raw CoTIR-Bench record into a training example, or a counted skip.

Every way a record can be bad (`REASONS`: truncated tar, missing member, corrupt PNG, wrong size,
bad JSON, ...) maps to one `SkipSample.reason`, so the loop can count and log it with shard and
key instead of crashing (or, as upstream does, silently dropping a type's turn).
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings

import numpy as np
from PIL import Image

try:  # libspng decodes 8-bit RGB PNGs about 1.7x faster than Pillow here; Pillow is the fallback
  import pyspng
except ImportError:  # pragma: no cover - optional speed-up
  pyspng = None

from cotir_jax.cli import UserError
from cotir_jax.data import prompts as P

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_IMAGE_PIXELS = 4096 * 4096  # data.max_image_pixels default: 16x the 1024^2 patch, 48 MiB as uint8 RGB

REASONS = ("truncated_tar", "missing_member", "corrupt_png", "not_rgb", "size_mismatch",
           "invalid_json", "missing_cot_fields", "missing_prompt_file", "empty_prompt_file", "too_large")
TEXT_FIELDS = ("gen", "spe", "ans_s", "ans_d", "ans_p")
# batch key: int32 [3] per sample, 1 where it has the scene / degradation / plan answer (a
# CoTIR-Bench sample has all three; paired data may lack some, and their loss terms are masked)
ANSWER_MASK = "answer_mask"


@dataclasses.dataclass(frozen=True)
class RawRecord:
  """Undecoded bytes of one sample as stored; identical from the tar index and the ArrayRecord build.

  `hq`/`lq`/`meta` are None when the member is absent; `truncated` when the tar ends inside it.
  """
  deg_type: str       # shard folder name
  shard: str          # '<deg_type>/<file>.tar', relative to the image root
  key: str
  hq: bytes | None
  lq: bytes | None
  meta: bytes | None
  truncated: bool = False


class SkipFractionError(UserError, RuntimeError):
  """More samples or shards were skipped than data.max_skip_fraction allows: the dataset needs fixing."""


class SkipSample(Exception):
  def __init__(self, reason: str, detail: str):
    assert reason in REASONS, reason
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


def _has_ihdr(data: bytes) -> bool:
  return len(data) > 33 and data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR"


def _is_rgb8(data: bytes) -> bool:
  """IHDR says 8-bit truecolor (colour type 2): the only kind the fast path decodes."""
  return _has_ihdr(data) and data[24] == 8 and data[25] == 2


def _check_pixels(width: int, height: int, what: str, max_pixels: int) -> None:
  if width * height > max_pixels:
    raise SkipSample("too_large", f"{what} is {width}x{height} = {width * height} pixels "
                                  f"> data.max_image_pixels={max_pixels}")


def decode_png(data: bytes, what: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
  """uint8 HWC RGB; grayscale/RGBA/palette PNGs are skipped ('not_rgb') rather than converted.

  The size is checked from the header before any pixel is decoded ('too_large' above max_pixels),
  so a decompression bomb costs a few header bytes, not gigabytes.
  """
  if _has_ihdr(data):
    _check_pixels(int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), what, max_pixels)
  if pyspng is not None and _is_rgb8(data):
    try:
      img = pyspng.load(data)
    except Exception as e:  # truncated / corrupt stream
      raise SkipSample("corrupt_png", f"{what}: {type(e).__name__}: {e}") from None
    if img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8:
      return img
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      img = Image.open(io.BytesIO(data))
      _check_pixels(*img.size, what, max_pixels)  # other formats Pillow recognises: size before load
      img.load()
  except SkipSample:
    raise
  except Image.DecompressionBombError as e:  # Pillow's own guard, when data.max_image_pixels exceeds it
    raise SkipSample("too_large", f"{what}: {e}") from None
  except Exception as e:  # PIL raises OSError/SyntaxError/ValueError/... for broken files
    raise SkipSample("corrupt_png", f"{what}: {type(e).__name__}: {e}") from None
  if img.mode != "RGB":
    raise SkipSample("not_rgb", f"{what} has mode {img.mode}")
  return np.asarray(img)


def _axis_weights(n_in: int, n_out: int):
  """Source indices/weights of torch bilinear, align_corners=False (half-pixel, clamp < 0, no antialias)."""
  scale = np.float32(n_in / n_out)
  src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  lam = (src - i0.astype(np.float32)).astype(np.float32)
  return i0, i1, lam


def resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
  """HWC float32 -> [size, size, C], what F.interpolate(mode='bilinear', align_corners=False) computes.

  A uint8 image gives resize_bilinear(to_float(x)) bit for bit, but converts only the rows it gathers
  (indexing commutes with the elementwise conversion): no float32 copy of the full-size image.
  """
  as_float = to_float if x.dtype == np.uint8 else (lambda a: a)
  h, w = x.shape[:2]
  if (h, w) == (size, size):
    return as_float(x)
  i0, i1, ly = _axis_weights(h, size)
  ly = ly[:, None, None]
  x = as_float(x[i0]) * (1 - ly) + as_float(x[i1]) * ly
  j0, j1, lx = _axis_weights(w, size)
  lx = lx[None, :, None]
  return (x[:, j0] * (1 - lx) + x[:, j1] * lx).astype(np.float32)


def to_float(img: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1], the same expression upstream uses."""
  return img.astype(np.float32) / 127.5 - 1


def parse_meta(raw: bytes):
  try:
    meta = json.loads(raw.decode("utf-8"))
  except Exception as e:
    raise SkipSample("invalid_json", f"{type(e).__name__}: {e}") from None
  if not isinstance(meta, dict):
    raise SkipSample("invalid_json", f"top level is {type(meta).__name__}, not an object")
  cot = meta.get("cot")
  if not isinstance(cot, dict) or not isinstance(cot.get("answers"), str):
    raise SkipSample("missing_cot_fields", "meta.json lacks cot.answers (string)")
  questions = cot.get("questions") or []
  if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
    raise SkipSample("missing_cot_fields", "cot.questions is not a list of strings")
  return meta, cot, questions


def process_record(rec: RawRecord, *, patch_size: int, bank: P.PromptBank, rng: np.random.Generator,
                   label_from_folder: bool, max_pixels: int = MAX_IMAGE_PIXELS) -> dict:
  """Raw record -> {'hq','lq' [P,P,3] float32, texts, 'answer_mask' (all 1), 'deg'}; raises SkipSample.

  label_from_folder mirrors upstream `return_deg_type`: True takes the label from the shard folder,
  False from meta.json (`deg`, then `degradation`, then `degradation_type`).
  """
  if rec.truncated:
    raise SkipSample("truncated_tar", "the tar ends inside a member of this sample")
  missing = [n for n, v in (("hq.png", rec.hq), ("lq.png", rec.lq), ("meta.json", rec.meta)) if v is None]
  if missing:
    raise SkipSample("missing_member", f"no {', '.join(missing)}")
  meta, cot, questions = parse_meta(rec.meta)
  hq, lq = decode_pair(rec, "hq.png", "lq.png", max_pixels)
  label_raw = rec.deg_type if label_from_folder else (
      meta.get("deg") or meta.get("degradation") or meta.get("degradation_type"))
  label_raw = str(label_raw) if label_raw else None
  label = P.normalize_deg(label_raw)
  try:
    gen, spe = P.pick_prompts(bank, questions, label, label_raw, meta.get("jpeg_type"), rng)
  except P.PromptError as e:
    raise SkipSample(e.reason, str(e)) from None
  ans_s, ans_d, ans_p = P.parse_answer(cot["answers"])
  return example(hq, lq, patch_size, gen=gen, spe=spe, answers=(ans_s, ans_d, ans_p),
                 has=(1, 1, 1), deg=label)


def decode_pair(rec: RawRecord, hq_name: str, lq_name: str, max_pixels: int):
  """(hq, lq) uint8 HWC of a record whose members are present; SkipSample when either does not
  decode or their sizes differ."""
  hq = decode_png(rec.hq, hq_name, max_pixels)
  lq = decode_png(rec.lq, lq_name, max_pixels)
  if hq.shape != lq.shape:
    raise SkipSample("size_mismatch", f"hq {hq.shape[:2]} vs lq {lq.shape[:2]}")
  return hq, lq


def example(hq, lq, patch_size: int, *, gen: str, spe: str, answers, has, deg: str) -> dict:
  """The training example: both images resized to the patch, the texts, the answer mask."""
  ans_s, ans_d, ans_p = answers
  return {
      "hq": resize_bilinear(hq, patch_size),
      "lq": resize_bilinear(lq, patch_size),
      "gen": gen, "spe": spe, "ans_s": ans_s, "ans_d": ans_d, "ans_p": ans_p,
      ANSWER_MASK: np.asarray(has, np.int32), "deg": deg,
  }
