"""BFL single-file transformers (flux-2-klein-*.safetensors, flux1-kontext-dev.safetensors) →
our FluxTransformer: a random diffusers transformer saved in BFL key layout converts to exactly
the parameters of its diffusers layout; full-size coverage on torch's `meta` device; the base
converter and its CLI with a BFL file; bad inputs."""

import os
import re
import runpy
import shutil

import numpy as np
import pytest
import torch
from flax import nnx

from cotir_jax import config, convert, models
from cotir_jax.convert import bfl
from cotir_jax.convert.core import ConversionError, check_coverage, flat_params
from cotir_jax.convert.flux import spec_from_diffusers
from cotir_jax.convert.safetensors_io import save_file
from parity import diffusers_meta

pytestmark = pytest.mark.usefixtures("highest_precision")  # float32 parity

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders import single_file_utils  # noqa: E402
from test_convert_base import _build_repo, _perturb  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# diffusers name → BFL name, read backwards from diffusers' single-file conversion
# (convert_flux_transformer_checkpoint_to_diffusers / convert_flux2_...); `slot` ≥ 0 places the
# tensor in a fused BFL tensor (q, k, v[, mlp] stacked on the output axis). The table under
# test (`convert.bfl`) is not used here.
_D, _S = r"^transformer_blocks\.(\d+)\.", r"^single_transformer_blocks\.(\d+)\."
COMMON = [
    (r"^x_embedder\.", "img_in.", -1), (r"^context_embedder\.", "txt_in.", -1),
    (r"^proj_out\.", "final_layer.linear.", -1),
    (r"^norm_out\.linear\.", "final_layer.adaLN_modulation.1.", -1),
    (_D + r"attn\.to_q\.", r"double_blocks.\1.img_attn.qkv.", 0),
    (_D + r"attn\.to_k\.", r"double_blocks.\1.img_attn.qkv.", 1),
    (_D + r"attn\.to_v\.", r"double_blocks.\1.img_attn.qkv.", 2),
    (_D + r"attn\.add_q_proj\.", r"double_blocks.\1.txt_attn.qkv.", 0),
    (_D + r"attn\.add_k_proj\.", r"double_blocks.\1.txt_attn.qkv.", 1),
    (_D + r"attn\.add_v_proj\.", r"double_blocks.\1.txt_attn.qkv.", 2),
    (_D + r"attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale", -1),
    (_D + r"attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale", -1),
    (_D + r"attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale", -1),
    (_D + r"attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale", -1),
    (_D + r"attn\.to_out\.0\.", r"double_blocks.\1.img_attn.proj.", -1),
    (_D + r"attn\.to_add_out\.", r"double_blocks.\1.txt_attn.proj.", -1),
    (_S + r"attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale", -1),
    (_S + r"attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale", -1),
]
RENAMES = {
    "flux2": COMMON + [
        (r"^time_guidance_embed\.timestep_embedder\.linear_1\.", "time_in.in_layer.", -1),
        (r"^time_guidance_embed\.timestep_embedder\.linear_2\.", "time_in.out_layer.", -1),
        (r"^time_guidance_embed\.guidance_embedder\.linear_1\.", "guidance_in.in_layer.", -1),
        (r"^time_guidance_embed\.guidance_embedder\.linear_2\.", "guidance_in.out_layer.", -1),
        (r"^(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)"
         r"\.linear\.", r"\1.lin.", -1),
        (_D + r"ff\.linear_in\.", r"double_blocks.\1.img_mlp.0.", -1),
        (_D + r"ff\.linear_out\.", r"double_blocks.\1.img_mlp.2.", -1),
        (_D + r"ff_context\.linear_in\.", r"double_blocks.\1.txt_mlp.0.", -1),
        (_D + r"ff_context\.linear_out\.", r"double_blocks.\1.txt_mlp.2.", -1),
        (_S + r"attn\.to_qkv_mlp_proj\.", r"single_blocks.\1.linear1.", -1),
        (_S + r"attn\.to_out\.", r"single_blocks.\1.linear2.", -1),
    ],
    "flux1": COMMON + [
        (r"^time_text_embed\.timestep_embedder\.linear_1\.", "time_in.in_layer.", -1),
        (r"^time_text_embed\.timestep_embedder\.linear_2\.", "time_in.out_layer.", -1),
        (r"^time_text_embed\.guidance_embedder\.linear_1\.", "guidance_in.in_layer.", -1),
        (r"^time_text_embed\.guidance_embedder\.linear_2\.", "guidance_in.out_layer.", -1),
        (r"^time_text_embed\.text_embedder\.linear_1\.", "vector_in.in_layer.", -1),
        (r"^time_text_embed\.text_embedder\.linear_2\.", "vector_in.out_layer.", -1),
        (_D + r"norm1\.linear\.", r"double_blocks.\1.img_mod.lin.", -1),
        (_D + r"norm1_context\.linear\.", r"double_blocks.\1.txt_mod.lin.", -1),
        (_D + r"ff\.net\.0\.proj\.", r"double_blocks.\1.img_mlp.0.", -1),
        (_D + r"ff\.net\.2\.", r"double_blocks.\1.img_mlp.2.", -1),
        (_D + r"ff_context\.net\.0\.proj\.", r"double_blocks.\1.txt_mlp.0.", -1),
        (_D + r"ff_context\.net\.2\.", r"double_blocks.\1.txt_mlp.2.", -1),
        (_S + r"attn\.to_q\.", r"single_blocks.\1.linear1.", 0),
        (_S + r"attn\.to_k\.", r"single_blocks.\1.linear1.", 1),
        (_S + r"attn\.to_v\.", r"single_blocks.\1.linear1.", 2),
        (_S + r"proj_mlp\.", r"single_blocks.\1.linear1.", 3),
        (_S + r"proj_out\.", r"single_blocks.\1.linear2.", -1),
        (_S + r"norm\.linear\.", r"single_blocks.\1.modulation.lin.", -1),
    ],
}


def _to_bfl(sd, family, prefix=""):
  """A diffusers transformer state dict (torch tensors, `meta` ones too) in BFL key layout."""
  out, fused = {}, {}
  for key, value in sd.items():
    hits = [(re.sub(p, r, key), slot) for p, r, slot in RENAMES[family] if re.match(p, key)]
    assert len(hits) == 1, (key, hits)
    name, slot = hits[0]
    if name.startswith("final_layer.adaLN_modulation.1."):  # diffusers (scale, shift) → (shift, scale)
      scale, shift = value.chunk(2, dim=0)
      value = torch.cat([shift, scale], dim=0)
    if slot < 0:
      out[prefix + name] = value
    else:
      fused.setdefault(prefix + name, {})[slot] = value
  for name, parts in fused.items():
    out[name] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
  return out


def _from_bfl(bfl_sd, family):
  fn = {"flux2": single_file_utils.convert_flux2_transformer_checkpoint_to_diffusers,
        "flux1": single_file_utils.convert_flux_transformer_checkpoint_to_diffusers}[family]
  return fn(dict(bfl_sd))


def _tiny(family):
  if family == "flux2":
    return _perturb(diffusers.Flux2Transformer2DModel(
        num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=96, axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False), 0)
  return _perturb(diffusers.FluxTransformer2DModel(
      in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
      num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
      axes_dims_rope=(8, 12, 12), guidance_embeds=True), 0)


def _save_bfl(model, family, path, prefix=""):
  save_file({k: v.detach().numpy() for k, v in _to_bfl(model.state_dict(), family, prefix).items()},
            str(path))
  return str(path)


def _assert_same_params(a, b):
  fa, fb = flat_params(a), flat_params(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_rekeying_is_the_inverse_of_diffusers_conversion():
  """The test's BFL layout is what diffusers' own single-file loader maps back, value for value
  (FLUX.2; diffusers' FLUX.1 loader hard-codes the 3072 width, checked at full size below)."""
  sd = _tiny("flux2").state_dict()
  back = _from_bfl(_to_bfl(sd, "flux2"), "flux2")
  assert sorted(back) == sorted(sd)
  for k in sd:
    assert torch.equal(back[k], sd[k]), k


@pytest.mark.parametrize("family,prefix", [("flux2", ""), ("flux1", "model.diffusion_model.")])
def test_bfl_file_gives_the_diffusers_parameters(tmp_path, family, prefix):
  model = _tiny(family)
  model.save_pretrained(tmp_path / "diffusers")
  path = _save_bfl(model, family, tmp_path / "bfl.safetensors", prefix)
  # FLUX.2's config follows from the file alone; FLUX.1's RoPE axes of this tiny model do not
  # (BFL's are (16, 56, 56) of a 128-wide head), so its diffusers config.json is passed
  cfg = None if family == "flux2" else dict(model.config)
  ours = convert.load_bfl_transformer(path, config=cfg)
  _assert_same_params(ours, convert.load_transformer(str(tmp_path / "diffusers")))


@pytest.mark.parametrize("name", ["cotir_4b", "cotir_9b", "cotir_12b"])
def test_full_size_coverage_and_config(name):
  """klein-4B / klein-9B / Kontext at full size, shapes only: diffusers maps the BFL layout back
  to its own keys and shapes, the table covers every parameter of ours and every BFL key, and
  the config derived from the file is the recipe's architecture."""
  cfg = config.load(os.path.join(ROOT, "configs", f"{name}.py"))
  m = cfg.model
  sd = diffusers_meta(cfg).state_dict()
  bfl_sd = _to_bfl(sd, m.family)
  back = _from_bfl(bfl_sd, m.family)
  assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}

  shapes = {k: tuple(v.shape) for k, v in bfl_sd.items()}
  model = nnx.eval_shape(lambda: models.CoTIR(m, rngs=nnx.Rngs(0)))
  targets = flat_params(nnx.state(model.backbone, nnx.Not(nnx.LoRAParam)))
  check_coverage(bfl.transformer_rules(model.backbone.spec), targets, shapes, source=name)

  spec = spec_from_diffusers(bfl.transformer_config(shapes, name))
  want = models.ModelSpec.from_config(m)
  for field in ("family", "in_channels", "out_channels", "hidden_size", "num_heads", "depth",
                "depth_single_blocks", "mlp_ratio", "axes_dim", "theta", "context_in_dim",
                "vec_in_dim", "guidance_embed"):
    assert getattr(spec, field) == getattr(want, field), field


def test_base_converter_takes_the_transformer_from_a_bfl_file(tmp_path):
  """`convert/diffusers_to_orbax.py --src <repo without transformer/> --transformer <BFL file>`:
  the base checkpoint holds the BFL transformer and the repository's other modules."""
  src = tmp_path / "repo"
  src.mkdir()
  mods = _build_repo(src, "flux2")
  shutil.move(str(src / "transformer"), str(tmp_path / "diffusers_transformer"))
  (src / "transformer").mkdir()  # config.json only (as a snapshot without the diffusers weights)
  shutil.copy(tmp_path / "diffusers_transformer" / "config.json", src / "transformer")
  path = _save_bfl(mods["transformer"], "flux2", tmp_path / "flux-2-klein-tiny.safetensors")
  out = tmp_path / "base"
  cli = runpy.run_path(os.path.join(ROOT, "convert", "diffusers_to_orbax.py"))
  assert cli["main"](["--src", str(src), "--transformer", path, "--out", str(out),
                      "--dtype", "float32"]) == 0
  manifest = convert.read_manifest(str(out))
  assert manifest["layout"] == "flux2-klein+bfl" and manifest["transformer_source"] == path
  assert set(manifest["modules"]) == {"transformer", "vae", "text_encoder"}
  assert manifest["modules"]["text_encoder"]["hidden_layers"] == [1, 2, 3]
  assert "_diffusers_version" in manifest["modules"]["transformer"]["config"]  # the repo's
  _assert_same_params(convert.load_base(str(out), ("transformer",))["transformer"],
                      convert.load_transformer(str(tmp_path / "diffusers_transformer")))


def test_bad_bfl_inputs(tmp_path):
  model = _tiny("flux2")
  path = _save_bfl(model, "flux2", tmp_path / "bfl.safetensors")
  with pytest.raises(ConversionError, match=r"a BFL file holds only the transformer; \['text_encoder', "
                                            r"'vae'\] must come from a diffusers flux2-klein"):
    convert.diffusers_to_orbax(None, str(tmp_path / "o1"), transformer=path)
  m = convert.diffusers_to_orbax(None, str(tmp_path / "o2"), "float32", transformer=path,
                                 only=["transformer"], verbose=False)
  assert m["layout"] == "bfl-transformer-only" and set(m["modules"]) == {"transformer"}

  model.save_pretrained(tmp_path / "diffusers")  # diffusers names are not BFL names
  diffusers_file = next((tmp_path / "diffusers").glob("*.safetensors"))
  with pytest.raises(ConversionError, match="not a BFL FLUX transformer checkpoint"):
    convert.load_bfl_transformer(str(diffusers_file))

  sd = {k: v.detach().numpy() for k, v in _to_bfl(model.state_dict(), "flux2").items()}
  del sd["double_blocks.1.txt_attn.proj.weight"]
  save_file(sd, str(tmp_path / "cut.safetensors"))
  with pytest.raises(ConversionError, match=r"missing key 'double_blocks\.1\.txt_attn\.proj\.weight'"):
    convert.load_bfl_transformer(str(tmp_path / "cut.safetensors"))

  kontext = _tiny("flux1")
  path1 = _save_bfl(kontext, "flux1", tmp_path / "kontext.safetensors")
  with pytest.raises(ConversionError, match=r"head dimension 32 does not fit the flux1 RoPE axes"):
    convert.load_bfl_transformer(path1)
  with pytest.raises(ConversionError, match=r"num_layers 3 vs 2"):
    convert.load_bfl_transformer(path1, config={**kontext.config, "num_layers": 3})
