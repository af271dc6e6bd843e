"""Upstream CoTIR `lora.pt` / `cot_adapter.pt` ↔ our CoTIR: full-size table coverage, tiny
import reproducing the forward, bit-exact round trips, Orbax trainable checkpoints, errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cotir_jax import config, convert, models
from cotir_jax.convert import cotir as C
from cotir_jax.convert.core import ConversionError, check_coverage, flat_params
from cotir_jax.convert.orbax_io import load_trainable
from cotir_jax.models.layers import Dense
from parity import cotir_inputs

pytestmark = pytest.mark.usefixtures("highest_precision")  # float32 parity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Full-size parameter counts of upstream's files: (adapter, LoRA in upstream layout)
COUNTS = {"cotir_4b": (1_014_752_259, 90_286_208), "cotir_9b": (1_829_062_147, 144_134_272),
          "cotir_12b": (981_711_363, 204_095_552)}


def upstream_shapes(cfg_model) -> dict[str, tuple[int, ...]]:
  """Reference key → shape of upstream's files, computed from the config as upstream builds its
  LoRA and adapter: independent of the conversion table under test."""
  m = cfg_model
  h, family = m.hidden_size, m.family
  mh = int(h * m.mlp_ratio)
  l1 = 3 * h + (2 * mh if family == "flux2" else mh)
  out_ch = m.get("out_channels") or m.in_channels
  shapes: dict[str, tuple[int, ...]] = {}

  def lora(name, i, o):
    r = min(m.lora.rank, i, o)
    shapes.update({f"{name}.lora_A.weight": (r, i), f"{name}.lora_B.weight": (o, r),
                   f"{name}.lora_B.bias": (o,)})

  if m.lora.enabled:
    for i in range(m.depth_single_blocks):
      lora(f"single_blocks.{i}.linear1", h, l1)
      lora(f"single_blocks.{i}.linear2", h + mh, h)
      if family == "flux1":
        lora(f"single_blocks.{i}.modulation.lin", h, 3 * h)
    lora("final_layer.linear", h, out_ch)
    lora("final_layer.adaLN_modulation.1", h, 2 * h)

  a = m.cot_adapter
  ah, amh, out = a.hidden_size, int(a.hidden_size * a.mlp_ratio), a.out_channels
  hd = ah // a.num_heads

  def lin(name, i, o):
    shapes.update({f"{name}.weight": (o, i), f"{name}.bias": (o,)})

  for i in range(a.depth):
    d = f"cot_adapter.decoder.{i}"
    lin(f"{d}.linear1", ah, 3 * ah + amh)
    lin(f"{d}.linear2", ah + amh, ah)
    shapes[f"{d}.norm.query_norm.scale"] = (hd,)
    shapes[f"{d}.norm.key_norm.scale"] = (hd,)
    lin(f"{d}.modulation.lin", ah, 3 * ah)
  for n in C.HEADS:
    lin(f"cot_adapter.{n}_layer", 2 * ah if n == "planning" else ah, ah)
    lin(f"cot_adapter.final_{n}_layer.linear", ah, out)
    lin(f"cot_adapter.final_{n}_layer.adaLN_modulation.1", ah, 2 * ah)
    shapes[f"cot_adapter.scale_{n}"] = (1,)
  return shapes


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_full_size_coverage(name):
  """Every upstream key (from upstream's shapes) maps, every trainable param is covered."""
  cfg = config.load(f"configs/{name}.py")
  model = nnx.eval_shape(lambda: models.CoTIR(cfg.model, rngs=nnx.Rngs(0)))
  ref = upstream_shapes(cfg.model)
  lora_ref = {k: v for k, v in ref.items() if not k.startswith("cot_adapter.")}
  adapter_ref = {k: v for k, v in ref.items() if k.startswith("cot_adapter.")}
  count = lambda shapes: sum(int(np.prod(s)) for s in shapes.values())
  assert (count(adapter_ref), count(lora_ref)) == COUNTS[name]
  lora_t, adapter_t = C.trainable_targets(model)
  assert set(lora_t) | set(adapter_t) == set(flat_params(nnx.state(model, models.TRAINABLE)))
  check_coverage(C.lora_rules(model.backbone.spec), lora_t, lora_ref, source=f"{name} lora")
  check_coverage(C.adapter_rules(model.backbone.spec), adapter_t, adapter_ref,
                 source=f"{name} adapter")
  if cfg.model.family == "flux1":
    assert "single_blocks.37.modulation.lin.lora_B.bias" in lora_ref
    assert lora_ref["final_layer.linear.lora_A.weight"] == (64, 3072)  # r = min(96, 64)


def _upstream_files(cfg, tmp, dtype=torch.bfloat16, seed=0, fmt="pt"):
  """Random tensors under upstream names/shapes, saved as upstream does (torch.save dicts)."""
  g = torch.Generator().manual_seed(seed)
  shapes = upstream_shapes(cfg.model)
  sd = {k: (torch.randn(s, generator=g) * 0.2).to(dtype) for k, s in shapes.items()}
  lora = {k: v for k, v in sd.items() if not k.startswith("cot_adapter.")}
  adapter = {k: v for k, v in sd.items() if k.startswith("cot_adapter.")}
  paths = (os.path.join(tmp, f"lora.{fmt}"), os.path.join(tmp, f"cot_adapter.{fmt}"))
  if fmt == "pt":
    torch.save(lora, paths[0])
    torch.save(adapter, paths[1])
  else:
    from safetensors.torch import save_file
    save_file(lora, paths[0])
    save_file(adapter, paths[1])
  return lora, adapter, paths


def _np(t):
  return C.torch_to_numpy(t).astype(np.float32)


def _tiny(name, *overrides):
  cfg = config.load(f"configs/{name}.py", list(overrides))
  return cfg, models.CoTIR(cfg.model, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["tiny", "tiny_kontext"])
def test_keys_land_on_the_right_arrays(name, tmp_path):
  cfg, model = _tiny(name)
  lora, adapter, paths = _upstream_files(cfg, tmp_path)
  convert.load_cotir_weights(model, *paths)
  b = model.backbone
  assert b.single_blocks.linear1.lora.a[...].dtype == jnp.float32  # cast to our dtype
  np.testing.assert_array_equal(np.asarray(b.single_blocks.linear1.lora.a[1]),
                                _np(lora["single_blocks.1.linear1.lora_A.weight"]).T)
  np.testing.assert_array_equal(np.asarray(b.single_blocks.linear2.lora.b[0]),
                                _np(lora["single_blocks.0.linear2.lora_B.weight"]).T)
  np.testing.assert_array_equal(np.asarray(b.final_layer.adaLN_modulation.lora.b_bias[...]),
                                _np(lora["final_layer.adaLN_modulation.1.lora_B.bias"]))
  if cfg.model.family == "flux1":
    np.testing.assert_array_equal(np.asarray(b.single_blocks.modulation.lin.lora.a[1]),
                                  _np(lora["single_blocks.1.modulation.lin.lora_A.weight"]).T)
  a = model.cot_adapter
  np.testing.assert_array_equal(  # in the reference order of the fused projection's parts
      b.spec.adapter_linear1_layout.to_parts(np.asarray(a.decoder.linear1.kernel[1]), xp=np),
      _np(adapter["cot_adapter.decoder.1.linear1.weight"]).T)
  np.testing.assert_array_equal(np.asarray(a.decoder.norm.key_norm.scale[0]),
                                _np(adapter["cot_adapter.decoder.0.norm.key_norm.scale"]))
  np.testing.assert_array_equal(
      np.asarray(a.final_planning_layer.adaLN_modulation.bias[...]),
      _np(adapter["cot_adapter.final_planning_layer.adaLN_modulation.1.bias"]))
  np.testing.assert_array_equal(np.asarray(a.scale_sharpness[...]),
                                _np(adapter["cot_adapter.scale_sharpness"]))


def _forward(model, x):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda st, x: nnx.merge(graphdef, st)(**x))(state, x)


@pytest.mark.parametrize("name", ["tiny", "tiny_kontext"])
def test_import_reproduces_the_forward(name, tmp_path):
  """Imported model == a copy whose LoRA is folded into the base weights the PyTorch way
  (W' = W + (B A)ᵀ, b' = b + B.bias, from the upstream tensors) and whose adapter variables are
  set one by one from the upstream dict — an independent path to the same numbers."""
  cfg, model = _tiny(name)
  lora, adapter, paths = _upstream_files(cfg, tmp_path, dtype=torch.float32)
  convert.load_cotir_weights(model, *paths)
  x = cotir_inputs(cfg, b=1, l_txt=5, n=6, t=(0.4,))
  got = _forward(model, x)

  _, ref = _tiny(name)  # same base weights (same seed), LoRA stripped and folded by hand
  targets = {"single_blocks.{i}.linear1": ref.backbone.single_blocks.linear1,
             "single_blocks.{i}.linear2": ref.backbone.single_blocks.linear2,
             "final_layer.linear": ref.backbone.final_layer.linear,
             "final_layer.adaLN_modulation.1": ref.backbone.final_layer.adaLN_modulation}
  if cfg.model.family == "flux1":
    targets["single_blocks.{i}.modulation.lin"] = ref.backbone.single_blocks.modulation.lin
  spec = ref.backbone.spec  # ours: the fused projections' parts interleaved by head group
  layouts = {"single_blocks.{i}.linear1": (spec.linear1_layout, -1),  # output columns
             "single_blocks.{i}.linear2": (spec.linear2_layout, -2)}  # input rows
  for key, dense in targets.items():
    kernel = np.array(dense.kernel[...])
    bias = np.array(dense.bias[...]) if dense.bias is not None else None
    layers = range(kernel.shape[0]) if "{i}" in key else [None]
    for i in layers:
      k = key.format(i=i)
      delta = (_np(lora[f"{k}.lora_B.weight"]) @ _np(lora[f"{k}.lora_A.weight"])).T
      db = _np(lora[f"{k}.lora_B.bias"])
      if key in layouts:
        layout, axis = layouts[key]
        delta = layout.from_parts(delta, axis, np)
        db = layout.from_parts(db, -1, np) if axis == -1 else db
      if i is None:
        kernel += delta
        bias = db if bias is None else bias + db
      else:
        kernel[i] += delta
        bias = (np.zeros(kernel.shape[:1] + kernel.shape[2:], np.float32) if bias is None
                else bias)
        bias[i] += db
    dense.kernel[...] = jnp.asarray(kernel)
    dense.bias = nnx.data(nnx.Param(jnp.asarray(bias)))
    dense.lora = None
  for _, mod in nnx.iter_graph(ref):
    if isinstance(mod, Dense):
      mod.lora = None
  ad = ref.cot_adapter
  for k, v in adapter.items():
    parts = k.split(".")[1:]
    v = _np(v)
    node, i, prev = ad, None, None
    for p in parts:
      if p == "1" and prev == "adaLN_modulation":  # adaLN_modulation.1 is our adaLN_modulation
        continue
      prev = p
      if p.isdigit():
        i = int(p)
        continue
      if p == "weight":
        p, v = "kernel", v.T
      node = getattr(node, p)
    if ".linear1." in k:
      v = spec.adapter_linear1_layout.from_parts(v, -1, np)
    elif ".linear2.weight" in k:
      v = spec.adapter_linear2_layout.from_parts(v, -2, np)
    if i is None:
      node[...] = jnp.asarray(v)
    else:
      node[...] = node[...].at[i].set(jnp.asarray(v))
  want = _forward(ref, x)
  for g, w in zip(got, want):
    g, w = np.asarray(g), np.asarray(w)
    assert np.abs(g - w).max() <= 2e-5 * np.abs(w).max()
  assert float(np.abs(np.asarray(model.cot_adapter.scale_planning[...])).max()) > 0


def _bits(t):
  return C.torch_to_numpy(t).view(np.uint8)


@pytest.mark.parametrize("name", ["tiny", "tiny_kontext"])
@pytest.mark.parametrize("dtype,overrides", [("bf16", ("compat=upstream",)), ("fp32", ())])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_round_trip_bit_exact(name, dtype, overrides, fmt, tmp_path):
  cfg, model = _tiny(name, *overrides)
  tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
  lora, adapter, paths = _upstream_files(cfg, tmp_path, dtype=tdtype, fmt=fmt)
  convert.load_cotir_weights(model, *paths)
  out = tmp_path / "out"
  written = convert.save_cotir_weights(model, str(out), fmt=fmt, dtype=None)
  assert sorted(os.path.basename(p) for p in written.values()) == [f"cot_adapter.{fmt}",
                                                                     f"lora.{fmt}"]
  for ref, path in ((lora, written["lora"]), (adapter, written["cot_adapter"])):
    back = C.read_tensors(path)
    assert sorted(back) == sorted(ref)
    for k in ref:
      a = np.asarray(back[k])
      assert a.dtype == C.torch_to_numpy(ref[k]).dtype, k
      np.testing.assert_array_equal(a.view(np.uint8), _bits(ref[k]), err_msg=k)
  if fmt == "pt":  # upstream's format: a plain dict of tensors
    sd = torch.load(written["lora"], weights_only=True)
    assert isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())


def test_default_export_is_bfloat16(tmp_path):
  cfg, model = _tiny("tiny")  # float32 masters
  lora, adapter, paths = _upstream_files(cfg, tmp_path)  # bf16 files
  convert.load_cotir_weights(model, *paths)
  written = convert.save_cotir_weights(model, str(tmp_path / "o"))
  sd = torch.load(written["cot_adapter"], weights_only=True)
  assert {v.dtype for v in sd.values()} == {torch.bfloat16}
  for k, v in adapter.items():  # bf16 → float32 → bf16 is exact
    assert torch.equal(sd[k], v), k
  with pytest.raises(ConversionError, match="int8 cannot be represented"):
    convert.save_cotir_weights(model, str(tmp_path / "o2"), dtype=jnp.int8)


def test_errors_name_file_key_and_shapes(tmp_path):
  cfg, model = _tiny("tiny")
  lora, adapter, (lora_p, adapter_p) = _upstream_files(cfg, tmp_path)
  bad = dict(adapter)
  bad["cot_adapter.decoder.1.linear2.weight"] = torch.zeros(64, 7, dtype=torch.bfloat16)
  torch.save(bad, tmp_path / "bad.pt")
  h = int(cfg.model.hidden_size)  # linear2 reads the attention output and the 4h-wide MLP
  with pytest.raises(ConversionError, match=rf"bad\.pt.*decoder\.1\.linear2\.weight.*\(64, 7\).*"
                                            rf"expects \({5 * h}, {h}\)"):
    convert.load_cotir_weights(model, None, str(tmp_path / "bad.pt"))
  missing = {k: v for k, v in lora.items() if k != "single_blocks.1.linear1.lora_B.bias"}
  torch.save(missing, tmp_path / "missing.pt")
  with pytest.raises(ConversionError, match=r"missing\.pt: missing key 'single_blocks\.1\.linear1"
                                            r"\.lora_B\.bias'"):
    convert.load_cotir_weights(model, str(tmp_path / "missing.pt"))
  extra = dict(lora, **{"single_blocks.0.linear1.lora_C.weight": torch.zeros(1)})
  torch.save(extra, tmp_path / "extra.pt")
  with pytest.raises(ConversionError, match=r"extra\.pt: unexpected key.*lora_C"):
    convert.load_cotir_weights(model, str(tmp_path / "extra.pt"))
  with pytest.raises(ConversionError, match="nope.pt: file does not exist"):
    convert.load_cotir_weights(model, str(tmp_path / "nope.pt"))


def _cli(script, *args):
  r = subprocess.run([sys.executable, os.path.join(ROOT, "convert", script), *args],
                     capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


def test_cli_round_trip_through_orbax(tmp_path):
  """cotir_to_orbax (with a --config override) → orbax_to_cotir gives back the same files."""
  cfg = config.load("configs/tiny_kontext.py", ["compat=upstream"])
  lora, adapter, (lora_p, adapter_p) = _upstream_files(cfg, tmp_path)
  ck = tmp_path / "ck"
  _cli("cotir_to_orbax.py", "--lora", lora_p, "--adapter", adapter_p, "--config",
       "configs/tiny_kontext.py", "--config.compat=upstream", "--out", str(ck))
  assert sorted(os.listdir(ck)) == ["cotir.json", "params"]
  params, meta = load_trainable(str(ck))
  assert meta["family"] == "flux1" and meta["format"] == "cotir_jax.trainable/1"
  model = nnx.eval_shape(lambda: models.CoTIR(cfg.model, rngs=nnx.Rngs(0)))
  want = flat_params(nnx.state(model, models.TRAINABLE))
  assert sorted(params) == sorted(want)
  assert all(params[k].shape == want[k].shape and params[k].dtype == want[k].dtype for k in want)
  _cli("orbax_to_cotir.py", "--checkpoint", str(ck), "--out", str(tmp_path / "back"),
       "--config", "configs/tiny_kontext.py")
  for ref, f in ((lora, "lora.pt"), (adapter, "cot_adapter.pt")):
    sd = torch.load(tmp_path / "back" / f, weights_only=True)
    assert sorted(sd) == sorted(ref)
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_checkpoints_from_before_head_groups_convert_on_load(tmp_path):
  """A training checkpoint written when the fused projections' parts lay side by side (no
  `fused_layout` in its meta) restores in our layout, its optimizer moments too, and exports
  the upstream files it was trained from."""
  cfg, model = _tiny("tiny")
  lora, adapter, paths = _upstream_files(cfg, tmp_path)
  convert.load_cotir_weights(model, *paths)
  ours = flat_params(nnx.state(model, models.TRAINABLE))
  fused = {r.ours: r.transform.regroups for r in C.cotir_rules(model.backbone.spec)
           if r.transform.regroups}
  assert len(fused) == 6  # LoRA: linear1 b, b_bias, linear2 a; adapter: linear1 (2), linear2
  old = dict(ours)
  for path, regroups in fused.items():
    for layout, axis in reversed(regroups):
      old[path] = layout.to_parts(old[path], axis, jnp)
  from cotir_jax.convert.orbax_io import flatten, nest
  from cotir_jax.train.checkpoint import Checkpointer
  state = lambda flat: {"params": nest(flat), "opt_state": {"mu": nest(flat)}, "step": jnp.int32(3)}
  with Checkpointer(tmp_path / "work", async_save=False) as ck:
    ck.save(3, state(old))
  meta_file = tmp_path / "work" / "checkpoints" / "3" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  assert meta.pop("fused_layout") == "head_groups"
  meta_file.write_text(json.dumps(meta))
  with Checkpointer(tmp_path / "work", async_save=False) as ck:
    restored = ck.restore(state(ours))["state"]
  for tree in (restored["params"], restored["opt_state"]["mu"]):
    for path, value in flatten(tree).items():
      np.testing.assert_array_equal(np.asarray(value), np.asarray(ours[path]), err_msg=path)
  convert.orbax_to_cotir(str(tmp_path / "work"), str(tmp_path / "x"), dtype=None)
  back = C.read_tensors(str(tmp_path / "x" / "cot_adapter.pt"))
  for k, v in adapter.items():
    np.testing.assert_array_equal(np.asarray(back[k]).astype(np.float32), _np(v), err_msg=k)


def test_reads_training_checkpoints(tmp_path):
  """A workdir written by the training Checkpointer ({'params': trainable pure dict, ...} in
  item 'state') and a step directory with an item 'params' both export."""
  cfg, model = _tiny("tiny")
  lora, adapter, paths = _upstream_files(cfg, tmp_path)
  convert.load_cotir_weights(model, *paths)
  pure = nnx.to_pure_dict(nnx.state(model, models.TRAINABLE))
  from cotir_jax.train.checkpoint import Checkpointer
  with Checkpointer(tmp_path / "work", async_save=False) as ck:
    ck.save(3, {"params": pure, "opt": {"mu": pure}, "step": jnp.int32(3)})
    _, state, _ = nnx.split(model, models.TRAINABLE, ...)  # the train loop saves the nnx.State
    ck.save(7, {"params": state, "opt": {"mu": state}, "step": jnp.int32(7)})
  for src in (tmp_path / "work", tmp_path / "work" / "checkpoints",
              tmp_path / "work" / "checkpoints" / "7"):
    out = tmp_path / f"x_{src.name}"
    convert.orbax_to_cotir(str(src), str(out), fmt="safetensors")
    back = C.read_tensors(str(out / "cot_adapter.safetensors"))
    for k, v in adapter.items():
      np.testing.assert_array_equal(np.asarray(back[k]).view(np.uint16),
                                    C.torch_to_numpy(v).view(np.uint16), err_msg=k)
  from cotir_jax.convert.orbax_io import save_tree
  step = tmp_path / "step" / "12"
  os.makedirs(step)
  save_tree(str(step / "params"), jax.tree.map(np.asarray, pure))
  params, _ = load_trainable(str(tmp_path / "step"))
  assert sorted(params) == sorted(flat_params(nnx.state(model, models.TRAINABLE)))
  with pytest.raises(ConversionError, match="found no trainable weights"):
    load_trainable(str(tmp_path))
