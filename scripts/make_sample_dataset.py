#!/usr/bin/env python
"""Build the committed CoTIR-Bench-layout sample datasets from scikit-image's bundled photographs.

Two sets from disjoint photographs: the training pairs (`data/sample`) and the held-out pairs
that the tiny configs validate on (`data/sample_val`, `data.val_data_dir`; four per degradation
type). The tiny pretrained base (`scripts/pretrain_tiny_base.py`) never sees the held-out
photographs either. Output (upstream layout), for each set:
  <out>/image/<deg_type>/<deg_type>-NNNNNN.tar   webdataset shards: <key>.hq.png, <key>.lq.png, <key>.meta.json
  <out>/prompts/gen_prompt.txt                   generic prompts
  <out>/prompts/spe_prompt/<deg_type>.txt        specific prompts per degradation label
  <out>/prompts/spe_prompt/<jpeg_type>.txt       prompts for a JPEG quality class

Degradations are synthetic (noise, blur, JPEG, haze, low light, rain, lost colour) plus mixtures,
sized for the 64-pixel images the tiny models train on (stored at that size: a 256-pixel blur
or rain streak resized to 64 mostly vanishes, leaving pairs the tiny autoencoder cannot tell
apart), and every sample carries
questions and a CoT answer in the upstream format. Deterministic for a seed:
tar headers carry fixed times/owners and PNGs are written with fixed settings.

  python scripts/make_sample_dataset.py --out data/sample --val_out data/sample_val
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PHOTOS = {  # skimage.data name -> scene description
    "astronaut": "a portrait of an astronaut in a white spacesuit in front of an American flag",
    "coffee": "a cup of coffee with latte art on a saucer with a spoon on a wooden table",
    "chelsea": "a close-up of a tabby cat with green eyes looking to the side",
    "rocket": "a rocket standing on a launch pad under a blue sky",
    "immunohistochemistry": "a microscopy image of stained tissue with brown and blue cells",
    "retina": "a fundus photograph of a human retina with branching blood vessels",
    "hubble_deep_field": "a deep-space view with many small galaxies on a dark background",
    "stereo_motorcycle": "a red motorcycle parked in a room with shelves and a curtain behind it",
    "coffee_crop": "a wooden table edge beside a white cup and saucer",
}
HELD_OUT = ("astronaut", "chelsea")  # validation only: never trained on, nor pretrained on
TRAIN = tuple(p for p in PHOTOS if p not in HELD_OUT)

# deg_type -> (meta label, components in application order)
TYPES = {
    "blur": ("blur", ["blur"]),
    "haze": ("haze", ["haze"]),
    "jpeg_compression": ("jpeg compression", ["jpeg"]),
    "lost_color": ("lost color", ["lost_color"]),
    "low_light": ("low light", ["low_light"]),
    "noise": ("noise", ["noise"]),
    "rain": ("rain", ["rain"]),
    "noise_blur_jpeg_compression": ("noise, blur, jpeg compression", ["blur", "noise", "jpeg"]),
}

DESCRIBE = {
    "blur": "The image is blurry: edges and fine textures are smeared and lack sharp detail.",
    "haze": "A hazy veil lowers the contrast and washes out the colours, stronger towards the top.",
    "jpeg": "Blocky 8x8 artefacts and ringing around edges show strong JPEG compression.",
    "lost_color": "The colours are missing; the photo looks almost grayscale.",
    "low_light": "The image is dark and underexposed, with crushed shadows and little visible detail.",
    "noise": "Grainy random noise covers the whole image, most visible in flat regions.",
    "rain": "Bright diagonal rain streaks cover the scene and hide details behind them.",
}
PLAN = {
    "blur": "deblur to restore sharp edges and textures",
    "haze": "remove the haze to recover contrast and saturation",
    "jpeg": "remove the compression blocks and ringing",
    "lost_color": "restore natural, plausible colours",
    "low_light": "brighten the exposure while keeping shadows clean",
    "noise": "denoise while preserving fine detail",
    "rain": "remove the rain streaks and fill in the occluded content",
}
NAMES = {"blur": "blur", "haze": "haze", "jpeg": "JPEG compression", "lost_color": "missing colour",
         "low_light": "low light", "noise": "noise", "rain": "rain"}

GEN_PROMPTS = [
    "Please restore this image.",
    "Make this picture clearer.",
    "Improve the quality of this photo.",
    "Enhance this image and fix whatever is wrong with it.",
    "Restore the image to high quality.",
    "Clean up this photo.",
]
SPE_PROMPTS = {
    "blur": ["Remove the blur from this image.", "Sharpen this blurry photo.", "Deblur the picture."],
    "haze": ["Remove the haze from this image.", "Dehaze this photo.", "Clear the fog from the picture."],
    "jpeg_compression": ["Remove the JPEG artefacts.", "Fix the compression blocks in this image."],
    "lost_color": ["Colourise this image.", "Restore the missing colours of this photo."],
    "low_light": ["Brighten this dark image.", "Enhance this low-light photo."],
    "noise": ["Denoise this image.", "Remove the grain from this photo.", "Reduce the noise in the picture."],
    "rain": ["Remove the rain streaks.", "Derain this photo."],
    "noise_blur_jpeg_compression": ["Remove the noise, blur and JPEG artefacts.",
                                    "Denoise, deblur and fix the compression of this image."],
}
JPEG_PROMPTS = {
    "heavy_jpeg": ["Remove the heavy JPEG blocking.", "Fix this badly compressed image."],
    "mild_jpeg": ["Remove the light JPEG artefacts.", "Clean up the mild compression noise."],
}


def load_photo(name: str) -> np.ndarray:
  from skimage import data
  if name == "coffee_crop":
    return data.coffee()[150:400, 0:300]
  x = getattr(data, name)()
  if isinstance(x, tuple):
    x = x[0]
  if x.ndim == 2:
    x = np.stack([x] * 3, -1)
  return x[..., :3].astype(np.uint8)


def square(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """Random square crop of 35-100% of the shorter side (whole scenes and close-ups: many
  different images from few photographs), randomly mirrored, resized (Lanczos) to size x size."""
  h, w = img.shape[:2]
  s = int(min(h, w) * rng.uniform(0.35, 1.0))
  if rng.random() < 0.5:
    img = img[:, ::-1]
  y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
  return np.asarray(Image.fromarray(img[y:y + s, x:x + s]).resize((size, size), Image.LANCZOS))


def degrade(x: np.ndarray, comp: str, rng: np.random.Generator, info: dict) -> np.ndarray:
  f = x.astype(np.float32)
  h, w = x.shape[:2]
  k = w / 64  # sizes in pixels of a 64-pixel image: what the tiny models see
  if comp == "noise":
    f = f + rng.normal(0, rng.uniform(15, 30), f.shape)
  elif comp == "blur":
    f = np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.0) * k)), np.float32)
  elif comp == "jpeg":
    q = int(rng.integers(8, 16)) if rng.random() < 0.5 else int(rng.integers(25, 40))
    info["jpeg_type"] = "heavy_jpeg" if q < 20 else "mild_jpeg"
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "JPEG", quality=q)
    f = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), np.float32)
  elif comp == "haze":
    depth = np.linspace(1.0, 0.2, h, dtype=np.float32)[:, None, None]
    t = np.exp(-rng.uniform(1.0, 1.8) * depth)
    a = rng.uniform(200, 240)
    f = f * t + a * (1 - t)
  elif comp == "low_light":
    f = 255 * (f / 255) ** rng.uniform(1.6, 2.4) * rng.uniform(0.35, 0.55)
  elif comp == "lost_color":
    g = f @ np.array([0.299, 0.587, 0.114], np.float32)
    f = np.repeat(g[..., None], 3, -1)
  elif comp == "rain":
    layer = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(layer)
    angle = rng.uniform(-0.4, 0.4)
    for _ in range(int(rng.integers(30, 50) * k * k)):
      x0, y0 = rng.uniform(0, w), rng.uniform(-20, h)
      ln = rng.uniform(3, 8) * k
      d.line([(x0, y0), (x0 + ln * np.sin(angle), y0 + ln * np.cos(angle))],
             fill=int(rng.integers(120, 220)), width=1)
    streaks = np.asarray(layer.filter(ImageFilter.GaussianBlur(0.3 * k)), np.float32)[..., None]
    f = f + streaks * 0.8
  else:
    raise ValueError(comp)
  return np.clip(np.round(f), 0, 255).astype(np.uint8)


def answer_text(scene: str, comps: list[str]) -> str:
  deg = " ".join(DESCRIBE[c] for c in comps)
  plan = "; then ".join(f"{i + 1}. {PLAN[c]}" for i, c in enumerate(comps))
  final = ", ".join(NAMES[c] for c in comps)
  return (f"scene description: The image shows {scene}. degradation description: {deg} "
          f"enhancement plan: {plan}. answer: The image suffers from {final}; restore it accordingly.")


def questions(comps: list[str]) -> list[str]:
  names = " and ".join(NAMES[c] for c in comps)
  return ["What is wrong with the quality of this image, and how should it be restored?",
          f"Please remove the {names} from this image."]


def png_bytes(x: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(x).save(buf, "PNG", optimize=True)
  return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  ti = tarfile.TarInfo(name)
  ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
  tar.addfile(ti, io.BytesIO(data))


def build_dataset(out: str | Path, *, size: int = 64, per_type: int = 48, per_shard: int = 16,
                  seed: int = 0, types: list[str] | None = None,
                  photos: tuple[str, ...] = TRAIN) -> Path:
  """Write the layout under `out` (replacing image/ and prompts/); returns out."""
  out = Path(out)
  for sub in ("image", "prompts"):
    shutil.rmtree(out / sub, ignore_errors=True)
  photos = list(photos)
  cache: dict[str, np.ndarray] = {}
  n = 0
  for ti, t in enumerate(types or list(TYPES)):
    label, comps = TYPES[t]
    (out / "image" / t).mkdir(parents=True, exist_ok=True)
    samples = []
    for j in range(per_type):
      rng = np.random.default_rng([seed, ti, j])
      photo = photos[(n * 3) % len(photos)]  # spread photos over types
      n += 1
      if photo not in cache:
        cache[photo] = load_photo(photo)
      hq = square(cache[photo], size, rng)
      lq, info = hq, {}
      for c in comps:
        lq = degrade(lq, c, rng, info)
      meta = {"deg": label, **info, "source": f"skimage.data.{photo.replace('_crop', '')}",
              "cot": {"questions": questions(comps), "answers": answer_text(PHOTOS[photo], comps)}}
      samples.append((f"{t}_{j:06d}", hq, lq, meta))
    for s in range(0, per_type, per_shard):
      with tarfile.open(out / "image" / t / f"{t}-{s // per_shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, hq, lq, meta in samples[s:s + per_shard]:
          add_member(tar, f"{key}.hq.png", png_bytes(hq))
          add_member(tar, f"{key}.lq.png", png_bytes(lq))
          add_member(tar, f"{key}.meta.json", json.dumps(meta, indent=1).encode())
  spe = out / "prompts" / "spe_prompt"
  spe.mkdir(parents=True, exist_ok=True)
  (out / "prompts" / "gen_prompt.txt").write_text("\n".join(GEN_PROMPTS) + "\n")
  for name, lines in {**SPE_PROMPTS, **JPEG_PROMPTS}.items():
    (spe / f"{name}.txt").write_text("\n".join(lines) + "\n")
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="data/sample", help="training pairs")
  ap.add_argument("--val_out", default="data/sample_val",
                  help=f"held-out pairs from {', '.join(HELD_OUT)}; '' skips them")
  ap.add_argument("--size", type=int, default=64,
                  help="stored HQ/LQ size (upstream stores 512x512; the tiny models train at 32-64)")
  ap.add_argument("--per-type", type=int, default=48)
  ap.add_argument("--per-shard", type=int, default=16)
  ap.add_argument("--val-per-type", type=int, default=4,
                  help="held-out pairs per type (one shard per type)")
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args(argv)
  sets = [build_dataset(a.out, size=a.size, per_type=a.per_type, per_shard=a.per_shard, seed=a.seed)]
  if a.val_out:
    sets.append(build_dataset(a.val_out, size=a.size, per_type=a.val_per_type,
                              per_shard=a.val_per_type, seed=a.seed + 1, photos=HELD_OUT))
  for out in sets:
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 2**20:.1f} MiB)")


if __name__ == "__main__":
  main()
