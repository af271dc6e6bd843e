"""Peak host memory of `convert/diffusers_to_orbax.py` on a ≥ 1 GB transformer.

Builds a random FLUX.2-style diffusers transformer directory (hidden 2048, a few wide blocks,
sharded safetensors written tensor by tensor; no torch model) in a temporary directory,
converts it under `/usr/bin/time -v`, and prints the checkpoint size, the peak RSS and their
ratio (target ≤ 1.5).

    python benchmarks/convert_rss.py [--gb 1.2] [--dtype bfloat16|float32] [--keep DIR]
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import ml_dtypes
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cotir_jax.convert.safetensors_io import save_file  # noqa: E402

H, HEADS, MLP = 2048, 16, 3.0


def shapes(n_double: int, n_single: int, in_ch=128, ctx=2048) -> dict[str, tuple[int, ...]]:
  """diffusers `Flux2Transformer2DModel` key → shape (bias-free, no guidance embedder)."""
  mh = int(H * MLP)
  s = {"x_embedder.weight": (H, in_ch), "context_embedder.weight": (H, ctx),
       "time_guidance_embed.timestep_embedder.linear_1.weight": (H, 256),
       "time_guidance_embed.timestep_embedder.linear_2.weight": (H, H),
       "double_stream_modulation_img.linear.weight": (6 * H, H),
       "double_stream_modulation_txt.linear.weight": (6 * H, H),
       "single_stream_modulation.linear.weight": (3 * H, H),
       "norm_out.linear.weight": (2 * H, H), "proj_out.weight": (in_ch, H)}
  for i in range(n_double):
    d = f"transformer_blocks.{i}"
    for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
      s[f"{d}.attn.{p}.weight"] = (H, H)
    s[f"{d}.attn.to_out.0.weight"] = (H, H)
    s[f"{d}.attn.to_add_out.weight"] = (H, H)
    for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
      s[f"{d}.attn.{n}.weight"] = (H // HEADS,)
    for ff in ("ff", "ff_context"):
      s[f"{d}.{ff}.linear_in.weight"] = (2 * mh, H)
      s[f"{d}.{ff}.linear_out.weight"] = (H, mh)
  for i in range(n_single):
    b = f"single_transformer_blocks.{i}"
    s[f"{b}.attn.to_qkv_mlp_proj.weight"] = (3 * H + 2 * mh, H)
    s[f"{b}.attn.to_out.weight"] = (H, H + mh)
    s[f"{b}.attn.norm_q.weight"] = (H // HEADS,)
    s[f"{b}.attn.norm_k.weight"] = (H // HEADS,)
  return s


def build(path: str, gb: float, dtype) -> int:
  """Writes config.json + shards of about 500 MB; returns the total tensor bytes."""
  itemsize = np.dtype(dtype).itemsize
  n_single = 1
  while sum(int(np.prod(v)) for v in shapes(1, n_single).values()) * itemsize < gb * 1e9:
    n_single += 1
  table = shapes(1, n_single)
  os.makedirs(path)
  config = {"_class_name": "Flux2Transformer2DModel", "in_channels": 128, "out_channels": None,
            "num_layers": 1, "num_single_layers": n_single, "attention_head_dim": H // HEADS,
            "num_attention_heads": HEADS, "joint_attention_dim": 2048, "mlp_ratio": MLP,
            "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000, "guidance_embeds": False,
            "timestep_guidance_channels": 256}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  rng = np.random.default_rng(0)
  shards, cur, size = [], {}, 0
  for k, s in table.items():
    cur[k] = s
    size += int(np.prod(s)) * itemsize
    if size > 5e8:
      shards.append(cur)
      cur, size = {}, 0
  if cur:
    shards.append(cur)
  weight_map, total = {}, 0
  for j, shard in enumerate(shards):
    name = f"diffusion_pytorch_model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
    arrays = {k: (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(dtype)
              for k, s in shard.items()}
    save_file(arrays, os.path.join(path, name))
    total += sum(a.nbytes for a in arrays.values())
    weight_map.update({k: name for k in shard})
    del arrays
  with open(os.path.join(path, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  print(f"built {path}: 1 double + {n_single} single blocks, {len(table)} tensors, "
        f"{total / 1e9:.3f} GB in {len(shards)} shards", flush=True)
  return total


def du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gb", type=float, default=1.2)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--keep", default=None, help="work directory to keep (default: a temp dir)")
  args = p.parse_args()
  dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32
  work = args.keep or tempfile.mkdtemp(prefix="convert_rss_")
  try:
    src, out = os.path.join(work, "transformer"), os.path.join(work, "orbax")
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    size = build(src, args.gb, dtype)
    cmd = ["/usr/bin/time", "-v", sys.executable, os.path.join(ROOT, "convert", "diffusers_to_orbax.py"),
           "--src", src, "--out", out, "--dtype", args.dtype]
    print("$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(r.stdout.strip())
    print("\n".join(l for l in r.stderr.splitlines() if l.startswith("[convert]")))
    if r.returncode:
      print(r.stderr[-4000:])
      sys.exit(r.returncode)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", r.stderr).group(1)
    ck = du(os.path.join(out, "weights"))
    print(f"source safetensors: {size / 1e9:.3f} GB ({args.dtype})")
    print(f"orbax checkpoint:   {ck / 1e9:.3f} GB")
    print(f"peak RSS:           {rss / 1e9:.3f} GB  (wall {wall})")
    print(f"ratio peak RSS / checkpoint: {rss / ck:.2f}  (target <= 1.5)")
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
