"""diffusers repo → Orbax base checkpoint → `load_base`: tiny end-to-end for FLUX.2-klein and
FLUX.1-Kontext (sharded `save_pretrained` sources, the CLI, PyTorch parity), and bad inputs."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cotir_jax import convert
from cotir_jax.convert.base import read_manifest, restore_base_params
from cotir_jax.convert.core import ConversionError, flat_params
from cotir_jax.models.vae import tiny_vae_config
from parity import diffusers_forward, rel

pytestmark = pytest.mark.usefixtures("highest_precision")  # float32 parity

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZERS = os.path.join(ROOT, "assets", "tokenizers")
FP32_TOL = 2e-5
SHARD = "60KB"


def _perturb(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 0.5 if p.ndim == 1 else 1.0 / np.sqrt(p.shape[-1])
      p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "norm" in name else 0.0))
  return model.eval()


def _jit(module, *args, **kw):
  graphdef, state = nnx.split(module)
  return np.asarray(jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a, **kw))(state, *args),
                    np.float32)


def _jit_method(module, method, *args):
  graphdef, state = nnx.split(module)
  return np.asarray(jax.jit(lambda st, *a: getattr(nnx.merge(graphdef, st), method)(*a))(
      state, *args), np.float32)


def _vae(family):
  c = tiny_vae_config(family)
  n = len(c.block_out_channels)
  kw = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(c.block_out_channels),
            layers_per_block=c.layers_per_block, latent_channels=c.latent_channels,
            norm_num_groups=c.norm_num_groups, use_quant_conv=c.use_quant_conv,
            use_post_quant_conv=c.use_post_quant_conv)
  if family == "flux2":
    vae = diffusers.AutoencoderKLFlux2(**kw, batch_norm_eps=c.batch_norm_eps,
                                       patch_size=tuple(c.patch_size))
  else:
    vae = diffusers.AutoencoderKL(**kw, scaling_factor=c.scaling_factor, shift_factor=c.shift_factor)
  vae = _perturb(vae, 3)
  if family == "flux2":
    with torch.no_grad():
      vae.bn.running_var.abs_().add_(0.1)
  return vae


def _build_repo(root, family):
  """A tiny diffusers-layout repository (configs/tiny*.py shapes), every module sharded."""
  torch.manual_seed(0)
  mods = {}
  if family == "flux2":
    mods["transformer"] = _perturb(diffusers.Flux2Transformer2DModel(
        num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=96, axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False), 0)
    qcfg = transformers.Qwen3Config(vocab_size=1024, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8)
    mods["text_encoder"] = _perturb(transformers.Qwen3Model(qcfg), 1)
    tokenizers = {"tokenizer": "tiny_qwen3"}
    index = {"_class_name": "Flux2KleinPipeline", "transformer": ["diffusers", "Flux2Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKLFlux2"], "text_encoder": ["transformers", "Qwen3ForCausalLM"],
             "tokenizer": ["transformers", "Qwen2TokenizerFast"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index))
  else:
    mods["transformer"] = _perturb(diffusers.FluxTransformer2DModel(
        in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(8, 12, 12), guidance_embeds=True), 0)
    mods["text_encoder"] = _perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=2)), 1)
    mods["text_encoder_2"] = _perturb(transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=1024, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
        relative_attention_max_distance=20)), 2)
    tokenizers = {"tokenizer": "tiny_clip", "tokenizer_2": "tiny_t5"}
  mods["vae"] = _vae(family)
  for name, m in mods.items():
    m.save_pretrained(root / name, max_shard_size=SHARD)
  for dst, src in tokenizers.items():
    shutil.copytree(os.path.join(TOKENIZERS, src), root / dst)
  assert list((root / "transformer").glob("*.safetensors.index.json"))
  return mods


@pytest.fixture(scope="module", params=["flux2", "flux1"])
def converted(request, tmp_path_factory):
  family = request.param
  src = tmp_path_factory.mktemp(f"repo_{family}")
  mods = _build_repo(src, family)
  out = tmp_path_factory.mktemp(f"out_{family}") / "base"
  if family == "flux2":  # the CLI once, the function once
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert", "diffusers_to_orbax.py"),
                        "--src", str(src), "--out", str(out), "--dtype", "float32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[convert] transformer:" in r.stderr and "tensors/s" in r.stderr
  else:
    convert.diffusers_to_orbax(str(src), str(out), "float32", verbose=False)
  return dict(family=family, src=src, out=out, mods=mods, loaded=convert.load_base(str(out)))


def test_layout_and_manifest(converted):
  out, family = converted["out"], converted["family"]
  names = {"flux2": {"transformer", "vae", "text_encoder"},
           "flux1": {"transformer", "vae", "text_encoder", "clip"}}[family]
  m = read_manifest(str(out))
  assert set(m["modules"]) == names and m["family"] == family and m["dtype"] == "float32"
  assert m["source"] == str(converted["src"])
  assert sorted(os.listdir(out)) == sorted(["weights", "manifest.json", "tokenizer"]
                                           + (["tokenizer_2"] if family == "flux1" else []))
  for name, e in m["modules"].items():
    ref = converted["mods"][e["subfolder"]]
    assert e["config"]["_class_name" if e["kind"] != "text" else "model_type"]
    n_ref = sum(p.numel() for p in ref.parameters())
    if e["kind"] == "vae" and family == "flux2":
      n_ref += 2 * ref.bn.running_mean.numel()  # BatchNorm statistics are buffers there
    if e.get("hidden_layers"):  # Qwen3: the final norm and deeper layers are never run
      keep = max(e["hidden_layers"])
      n_ref = sum(p.numel() for k, p in ref.named_parameters()
                  if not k.startswith("norm.") and not (k.startswith("layers.")
                                                        and int(k.split(".")[1]) >= keep))
    assert e["parameters"] == n_ref, name
  if family == "flux1":
    assert m["modules"]["text_encoder"]["tokenizer"] == "tokenizer_2"
    assert m["modules"]["clip"]["subfolder"] == "text_encoder"
  else:
    assert m["modules"]["text_encoder"]["hidden_layers"] == [1, 2, 3]
  assert convert.tokenizer_path(str(out)).endswith("tokenizer_2" if family == "flux1" else "tokenizer")
  assert not [p for p in os.listdir(out.parent) if ".tmp-" in p]


def test_weights_equal_the_direct_loaders(converted):
  """Same arrays as loading each diffusers / transformers directory directly (whose float32
  parity with PyTorch the model tests check), bit for bit."""
  src, loaded = converted["src"], converted["loaded"]
  m = read_manifest(str(converted["out"]))
  for name, e in m["modules"].items():
    path = str(src / e["subfolder"])
    if e["kind"] == "transformer":
      direct = convert.load_transformer(path)
    elif e["kind"] == "vae":
      direct = convert.load_vae(path)
    else:
      direct = convert.load_text_encoder(path, **({"hidden_layers": tuple(e["hidden_layers"])}
                                                   if "hidden_layers" in e else {}))
    a, b = flat_params(loaded[name]), flat_params(direct)
    assert sorted(a) == sorted(b), name
    for k in a:
      np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=f"{name}.{k}")


def _transformer_inputs(family, b=2, l_txt=7, grid=(2, 3)):
  rng = np.random.default_rng(0)
  axes = 4 if family == "flux2" else 3
  h, w = grid
  ids = np.zeros((2 * h * w, axes), np.float32)
  ids[:, 1] = np.tile(np.repeat(np.arange(h), w), 2)
  ids[:, 2] = np.tile(np.tile(np.arange(w), h), 2)
  ids[h * w:, 0] = 10 if family == "flux2" else 1
  txt_ids = np.zeros((l_txt, axes), np.float32)
  if family == "flux2":
    txt_ids[:, 3] = np.arange(l_txt)
  in_ch, ctx = (128, 96) if family == "flux2" else (64, 32)
  return dict(img=rng.standard_normal((b, 2 * h * w, in_ch)).astype(np.float32),
              txt=rng.standard_normal((b, l_txt, ctx)).astype(np.float32), img_ids=ids,
              txt_ids=txt_ids, t=np.array([0.3, 0.85], np.float32),
              vec=rng.standard_normal((b, 32)).astype(np.float32) if family == "flux1" else None,
              guidance=np.full((b,), 4.0, np.float32) if family == "flux1" else None)


def _transformer_ours(model, x):
  b = x["img"].shape[0]
  batched = lambda ids: jnp.broadcast_to(jnp.asarray(ids), (b, *ids.shape))
  opt = lambda v: None if v is None else jnp.asarray(v)
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
  return np.asarray(run(state, jnp.asarray(x["img"]), batched(x["img_ids"]), jnp.asarray(x["txt"]),
                        batched(x["txt_ids"]), jnp.asarray(x["t"]), opt(x["vec"]),
                        opt(x["guidance"])), np.float32)


def _ids(shape, vocab, seed):
  return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_pytorch_parity(converted):
  family, mods, loaded = converted["family"], converted["mods"], converted["loaded"]
  x = _transformer_inputs(family)
  ref = diffusers_forward(mods["transformer"], x)
  assert rel(_transformer_ours(loaded["transformer"], x), ref) <= FP32_TOL

  images = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    mean = mods["vae"].encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist.mode()
  # compare the raw posterior mean (the packing / normalisation are tested with the VAE)
  ours = _jit_method(loaded["vae"], "_posterior_mean", jnp.asarray(images))
  assert rel(ours, mean.permute(0, 2, 3, 1).numpy()) <= FP32_TOL

  ids = _ids((2, 12), 1000, 1)
  if family == "flux2":
    with torch.no_grad():
      hs = mods["text_encoder"](input_ids=ids, output_hidden_states=True).hidden_states
    ref = torch.cat([hs[k] for k in (1, 2, 3)], -1).numpy()
    ours = _jit(loaded["text_encoder"], jnp.asarray(ids.numpy(), jnp.int32),
                jnp.ones((2, 12), jnp.int32))
  else:
    with torch.no_grad():
      ref = mods["text_encoder_2"](input_ids=ids).last_hidden_state.numpy()
    ours = _jit(loaded["text_encoder"], jnp.asarray(ids.numpy(), jnp.int32))
  assert rel(ours, ref) <= FP32_TOL


def test_restore_into_sharded_targets(converted):
  """What training does: restore one module straight into abstract targets with shardings."""
  out = str(converted["out"])
  from cotir_jax.convert.base import module_builder
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  build, _ = module_builder(out, "transformer")
  targets = nnx.to_pure_dict(nnx.state(nnx.eval_shape(build)))
  targets = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16, sharding=sharding),
                         targets)
  tree = restore_base_params(out, ("transformer",), targets={"transformer": targets})
  leaf = tree["transformer"]["img_in"]["kernel"]
  assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.bfloat16
  ref = np.asarray(converted["loaded"]["transformer"].img_in.kernel[...])
  np.testing.assert_array_equal(np.asarray(leaf), ref.astype(jnp.bfloat16))


# ----------------------------------------------------------------------------- bad inputs

@pytest.fixture
def small_repo(tmp_path):
  """Just a sharded FLUX.2 transformer in a repo layout (cheap to break in various ways)."""
  src = tmp_path / "repo"
  model = diffusers.Flux2Transformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=32,
                                            num_attention_heads=2, joint_attention_dim=96,
                                            axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False)
  model.save_pretrained(src / "transformer", max_shard_size="100KB")
  return src


def test_unknown_layout(tmp_path, small_repo):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConversionError, match="unknown layout: missing transformer/config.json"):
    convert.diffusers_to_orbax(str(tmp_path / "empty"), str(tmp_path / "o1"))
  with pytest.raises(ConversionError, match=r"missing \['vae/config.json', 'text_encoder/config"
                                            r".json', 'tokenizer/', 'model_index.json'\]"):
    convert.diffusers_to_orbax(str(small_repo), str(tmp_path / "o2"))
  assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_only_transformer_and_bare_dir(tmp_path, small_repo):
  m = convert.diffusers_to_orbax(str(small_repo), str(tmp_path / "a"), only=["transformer"],
                                 verbose=False)
  assert set(m["modules"]) == {"transformer"} and m["dtype"] == "bfloat16"
  m = convert.diffusers_to_orbax(str(small_repo / "transformer"), str(tmp_path / "b"),
                                 verbose=False)
  assert m["layout"] == "transformer-only"
  t = convert.load_base(str(tmp_path / "b"))["transformer"]
  assert t.img_in.kernel[...].dtype == jnp.bfloat16
  with pytest.raises(ConversionError, match="already exists"):
    convert.diffusers_to_orbax(str(small_repo / "transformer"), str(tmp_path / "b"))


def test_missing_shard_leaves_nothing(tmp_path, small_repo):
  shards = sorted((small_repo / "transformer").glob("*-of-*.safetensors"))
  assert len(shards) > 1
  shards[-1].unlink()
  with pytest.raises(ConversionError, match=f"names shard {shards[-1].name!r}, which is missing"):
    convert.diffusers_to_orbax(str(small_repo), str(tmp_path / "o"), only=["transformer"])
  assert os.listdir(tmp_path) == ["repo"]  # no output and no temporary directory


def test_mis_shaped_key_shows_both_shapes(tmp_path, small_repo):
  from cotir_jax.convert.safetensors_io import SafetensorsDir, save_file
  t = small_repo / "transformer"
  sd = {k: np.asarray(v) for k, v in SafetensorsDir(str(t)).items()}
  sd["x_embedder.weight"] = np.zeros((64, 100), np.float32)  # expects [64, 128]
  for f in t.glob("*.safetensors*"):
    f.unlink()
  save_file(sd, str(t / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(ConversionError, match=r"x_embedder\.weight.*\(64, 100\).*expects \(128, 64\)"):
    convert.diffusers_to_orbax(str(small_repo), str(tmp_path / "o"), only=["transformer"])


def test_base_from_before_head_groups_is_refused(tmp_path):
  """A base converted when the fused projections' parts lay side by side (format /1) would be
  misread: refused with the command that converts it again; one without a transformer reads."""
  def manifest(modules):
    (tmp_path / "m").mkdir(exist_ok=True)
    with open(tmp_path / "m" / "manifest.json", "w") as f:
      json.dump({"format": "cotir_jax.base/1", "source": "/hf/klein", "dtype": "bfloat16",
                 "modules": {m: {} for m in modules}}, f)
    return str(tmp_path / "m")
  with pytest.raises(ConversionError, match=r"older cotir_jax \(cotir_jax\.base/1\).*convert the "
                     r"base again: python convert/diffusers_to_orbax\.py --src /hf/klein --only "
                     r"transformer vae --dtype bfloat16 --out <dir>$"):
    read_manifest(manifest(["transformer", "vae"]))
  assert set(read_manifest(manifest(["vae", "text_encoder"]))["modules"]) == {"vae",
                                                                             "text_encoder"}


def test_bad_dtype(tmp_path, small_repo):
  with pytest.raises(ConversionError, match="float16.*cannot be used"):
    convert.diffusers_to_orbax(str(small_repo), str(tmp_path / "o"), "float16", only=["transformer"])


def test_training_starts_from_the_converted_base(converted, tmp_path):
  """`model.pretrained` = the converter's output: frozen weights restored as converted, and a
  short training run on them."""
  if converted["family"] != "flux2":
    pytest.skip("one family is enough for the loop wiring; both are converted above")
  import jax
  from flax import nnx
  from cotir_jax import config, sharding
  from cotir_jax.train.loop import train
  from cotir_jax.modules import build_states
  cfg = config.load(os.path.join(ROOT, "configs", "tiny.py"), [
      f"model.pretrained={converted['out']}", "model.encoder_dtype=float32",
      # the converted repository's transformer: 2 heads of 32, FLUX.2's 128-channel tokens
      "model.hidden_size=64", "model.num_heads=2", "model.in_channels=128",
      "training.iterations=(2,)", "training.patch_sizes=(32,)", "training.batch_sizes=(2,)",
      "training.val_steps=0", "training.save_steps=2"])
  mesh = sharding.make_mesh(cfg.mesh)
  _, params, frozen = build_states(cfg, mesh, sharding.rules_from_config(cfg.mesh))
  loaded = converted["loaded"]
  for ours, theirs in (("vae", "vae"), ("text", "text_encoder")):
    a = jax.tree.leaves(frozen[ours])
    b = jax.tree.leaves(nnx.state(loaded[theirs]))
    assert len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
  backbone = jax.tree.leaves(frozen["model"]["backbone"])
  reference = jax.tree.leaves(nnx.state(loaded["transformer"]))
  assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(backbone, reference))
  assert jax.tree.leaves(params)  # LoRA + adapter initialised
  summary = train(cfg, str(tmp_path / "run"))
  assert summary["steps"] == 2 and os.path.isdir(tmp_path / "run" / "checkpoints" / "2")
