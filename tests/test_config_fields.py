"""Every config field acts or is refused.

`test_every_shipped_field_is_read` walks every leaf of every shipped config (configs/*.py) and
fails on a field that nothing reads. A field counts as read when

1. the code reads it while building what a run runs, recorded in-process: every
   `ConfigDict.__getitem__` (attribute access, `.get`, `[]`, `items()` all go through it) is
   noted with the field's path while, for each tiny config (one per family), the train program
   is built (mesh, abstract state, optimizer), its step and validation sampler are traced
   (`jax.eval_shape`: no compile), the data iterator yields a batch, the compiler is
   configured and restore's inference model is assembled. Reads by `config.validate` (which
   only checks values) and ml_collections' bulk conversions (`to_dict` / `to_json`, as the
   checkpoint's stored config and wandb's copy) do not count; or
2. the source reads it by its full path from the root config (`cfg.training.val_steps`,
   `self.cfg.data.val_batch_size`, `_get(cfg, "data.tfds_data_dir", None)`): code that only
   runs inside a long job (the train loop after its compiles, restore's and plan's command
   lines) or for another setting (the ArrayRecord source), found by an AST scan of the
   package outside config.py; or
3. it is one value with a field that is read: a FieldReference shared by several paths
   (`model.cot_adapter.hidden_size` is `model.hidden_size`, `model.compat` is `compat`).

Full-size recipes are checked against the tiny config of their family (same `defaults()`
tree, so a field a recipe adds must be read too). A new field that nothing reads, say
`c.training.foo = 1` in `defaults()`, is in no recorded read and in no `cfg.training.foo`
chain, so the test fails naming it; `test_an_unread_field_is_caught` proves the machinery can
fail: the exercised configs carry an extra `training.unread_probe` leaf, which must come out
unread.
"""

import ast
import contextlib
import functools
import glob
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from ml_collections.config_dict import FieldReference

from cotir_jax import cli, compiler, config, convert, models, restore
from cotir_jax.convert import cotir as cotir_files
from cotir_jax.models.layers import LoRA
from cotir_jax.models.spec import LoRASpec
from cotir_jax.data import paired, pipeline
from cotir_jax.train import checkpoint, loop, program
from cotir_jax.modules import batch_spec, build_tokenizers
from cotir_jax.train.workdir import WorkdirError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
TINY = {"flux2": os.path.join(REPO, "configs/tiny.py"),
        "flux1": os.path.join(REPO, "configs/tiny_kontext.py")}
PROBE = "training.unread_probe"
# ml_collections methods that copy a whole config: their reads are not the code using a field
BULK = {"to_dict", "to_json", "to_json_best_effort", "_json_dumps_wrapper",
        "copy_and_resolve_references", "__eq__", "__repr__", "__str__", "__deepcopy__"}


def _is_node(value) -> bool:
  """A sub-config (a ConfigDict keyed by names); `training.use_gen` (step → value) is a leaf."""
  return isinstance(value, ml_collections.ConfigDict) and all(isinstance(k, str) for k in value)


def leaves(cfg, prefix="") -> dict[str, object]:
  """Dotted path → identity of its value: the FieldReference it shares, or the path itself."""
  out = {}
  for key in cfg:
    value = cfg[key]
    if _is_node(value) and len(value):
      out.update(leaves(value, f"{prefix}{key}."))
    else:
      field = cfg._fields[key]
      out[f"{prefix}{key}"] = id(field) if isinstance(field, FieldReference) else f"{prefix}{key}"
  return out


def _nodes(cfg, prefix=""):
  yield id(cfg), prefix
  for key in cfg:
    if _is_node(cfg[key]):
      yield from _nodes(cfg[key], f"{prefix}{key}.")


@contextlib.contextmanager
def recorded_reads(cfg):
  """Collects the dotted paths of `cfg`'s fields read inside the block (see the module doc)."""
  prefixes = dict(_nodes(cfg))
  reads: set[str] = set()
  original = ml_collections.ConfigDict.__getitem__
  validate = config.validate.__code__

  def counted():
    frame = sys._getframe(2)
    while frame is not None:
      code = frame.f_code
      if code is validate or (code.co_name in BULK and "ml_collections" in code.co_filename):
        return False
      frame = frame.f_back
    return True

  def getitem(self, key):
    value = original(self, key)
    prefix = prefixes.get(id(self))
    if prefix is not None and isinstance(key, str) and "." not in key and counted():
      reads.add(prefix + key)
    return value

  ml_collections.ConfigDict.__getitem__ = getitem
  try:
    yield reads
  finally:
    ml_collections.ConfigDict.__getitem__ = original


def exercise(cfg) -> None:
  """What a run builds from a config, without compiling: program, traced step and validation,
  a data batch, the compiler settings, restore's inference model."""
  saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                           "jax_exec_time_optimization_effort")}
  try:
    compiler.configure_compiler(cfg)
  finally:
    for k, v in saved.items():
      jax.config.update(k, v)
  prog = program.Program.build(cfg)
  jax.eval_shape(prog.step(0), prog.state, prog.frozen, prog.batch(0))
  rows, patch = prog.val_rows(0), int(cfg.training.patch_sizes[0])
  jax.eval_shape(program.make_validate(cfg, prog.graphs), prog.state["params"], prog.frozen,
                 batch_spec(cfg, rows, patch))
  it = pipeline.make_iterator(cfg, 0, tokenizers=build_tokenizers(cfg))
  try:
    next(it)
  finally:
    it.close()
  # a paired source's texts (the sample data is CoTIR-Bench): every template degradation alone
  # and all of them in one composite type
  atoms = list(cfg.data.templates.degradations)
  paired.make_texts(cfg.data.templates, atoms + ["_".join(atoms)], "templates")
  nnx.eval_shape(lambda: restore.inference_model(cfg, models.CoTIR(cfg.model,
                                                                   rngs=nnx.Rngs(0))))


@functools.cache
def qualified_reads() -> frozenset[str]:
  """Dotted paths read as `cfg.a.b` / `self.cfg.a.b`, or as `f(cfg, "a.b", ...)` (a helper
  reading a path, e.g. pipeline's `_get`), anywhere in the package but config.py."""
  found = set()
  for path in glob.glob(os.path.join(REPO, "cotir_jax", "**", "*.py"), recursive=True):
    if os.path.basename(path) == "config.py":
      continue
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if (isinstance(node, ast.Call) and len(node.args) > 1 and isinstance(node.args[0], ast.Name)
          and node.args[0].id == "cfg" and isinstance(node.args[1], ast.Constant)
          and isinstance(node.args[1].value, str)):
        found.add(node.args[1].value)
        continue
      chain = []
      while isinstance(node, ast.Attribute):
        chain.append(node.attr)
        node = node.value
      if isinstance(node, ast.Name) and node.id == "self" and chain and chain[-1] == "cfg":
        chain.pop()
      elif not (isinstance(node, ast.Name) and node.id == "cfg"):
        continue
      found.add(".".join(reversed(chain)))
  return frozenset(found)


@pytest.fixture(scope="module")
def reads():
  """family → (the exercised config, its recorded reads); the config carries PROBE."""
  out = {}
  for family, path in TINY.items():
    # random frozen weights: the path that builds the encoders from model.vae / text_encoder /
    # clip (with the shipped base, model.pretrained, they come from its manifest instead)
    cfg = config.load(path, ["data.index_cache_dir=", "model.pretrained=None"])
    cfg.training.unread_probe = 1  # read by nothing: must come out unread
    with recorded_reads(cfg) as got:
      exercise(cfg)
    out[family] = (cfg, got)
  return out


def unread(cfg, recorded: set[str], static: set[str]) -> list[str]:
  """The leaves of `cfg` that are read neither directly nor through a shared reference."""
  fields = leaves(cfg)
  read_values = {fields[p] for p in fields if p in recorded or p in static}
  return sorted(p for p, v in fields.items() if v not in read_values)


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_every_shipped_field_is_read(reads, path):
  cfg = config.load(path)
  exercised, recorded = reads[cfg.model.family]
  missing = sorted(set(leaves(cfg)) - set(leaves(exercised)))
  assert not missing, f"fields the tiny {cfg.model.family} config lacks, so never exercised: {missing}"
  assert unread(cfg, recorded, qualified_reads()) == []


def test_an_unread_field_is_caught(reads):
  for cfg, recorded in reads.values():
    assert PROBE not in recorded
    assert unread(cfg, recorded, qualified_reads()) == [PROBE]


# ----------------------------------------------------------------------------- refused fields

@pytest.mark.parametrize("field", sorted(config.REMOVED_FIELDS))
def test_a_removed_upstream_field_says_what_to_use(field):
  with pytest.raises(config.ConfigError) as e:
    config.load(TINY["flux2"], [f"{field}=1"])
  assert f"{field!r}" in str(e.value) and config.REMOVED_FIELDS[field] in str(e.value)


@pytest.mark.parametrize("override,message", [
    ("mixed_precision=fp16", "not supported"), ("mixed_precision=fp32", "'bf16', 'no'"),
    ("resume=step", "'latest', 'never'"), ("report_to=mlflow", "'tensorboard', 'wandb'"),
    ("training.lr_scheduler=linear", "'cosine'")])
def test_values_without_a_meaning_are_refused(override, message):
  with pytest.raises(config.ConfigError, match=override.split("=")[0]) as e:
    config.load(TINY["flux2"], [override])
  assert message in str(e.value)


# ----------------------------------------------------------------------------- acting fields

def test_mixed_precision_is_the_compute_dtype():
  for value, dtype in (("bf16", jax.numpy.bfloat16), ("no", jax.numpy.float32)):
    cfg = config.load(TINY["flux2"], [f"mixed_precision={value}"])
    assert cfg.model.mixed_precision == value  # one field, seen by the model config too
    assert models.ModelSpec.from_config(cfg.model).dtype == dtype


def test_resume_never_refuses_a_workdir_with_checkpoints(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, {"step": np.zeros((), np.int32)})
  cfg = config.load(TINY["flux2"], ["resume=never"])
  with pytest.raises(WorkdirError, match="resume='never'.*step 3.*new --workdir"):
    loop.train(cfg, str(tmp_path))


def _lora_count(cfg) -> tuple[int, int]:
  """(LoRA modules, of which with a bias) of the model restore samples with (abstract)."""
  model = nnx.eval_shape(lambda: restore.inference_model(cfg, models.CoTIR(cfg.model,
                                                                           rngs=nnx.Rngs(0))))
  loras = [m for _, m in nnx.iter_graph(model) if isinstance(m, LoRA)]
  return len(loras), sum(m.b_bias is not None for m in loras)


def test_merge_for_inference_and_lora_bias_act():
  assert _lora_count(config.load(TINY["flux2"])) == (4, 4)  # upstream's test configs: unmerged
  assert _lora_count(config.load(TINY["flux2"], ["model.lora.lora_bias=False"])) == (4, 0)
  assert _lora_count(config.load(TINY["flux2"], ["model.lora.merge_for_inference=True"])) == (0, 0)


def test_lora_without_bias_computes_and_merges_without_one():
  from cotir_jax.models.layers import Dense, merge_lora
  spec = LoRASpec(rank=2, scale=0.5, init="upstream", bias=False)
  make = lambda: Dense(6, 5, use_bias=False, axes=(None, None), dtype=jax.numpy.float32,
                       param_dtype=jax.numpy.float32, rngs=nnx.Rngs(0), lora=spec)
  merged = nnx.eval_shape(lambda: merge_lora(make()))
  assert merged.lora is None and merged.bias is None  # nothing to fold into a bias

  @jax.jit
  def outputs(x):  # one compile for all of it
    layer = make()
    want = x @ layer.kernel[...] + 0.5 * (x @ layer.lora.a[...] @ layer.lora.b[...])
    return want, layer(x), merge_lora(layer)(x)

  with jax.default_matmul_precision("highest"):  # three orders of the same float32 products
    want, with_lora, after_merge = outputs(jax.random.normal(jax.random.key(1), (3, 6)))
  np.testing.assert_allclose(with_lora, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(after_merge, want, rtol=1e-5, atol=1e-6)


def test_lora_without_bias_round_trips_upstream_files(tmp_path):
  """Export writes zeros for upstream's always-present lora_B.bias; import drops zero biases
  and refuses a nonzero one instead of losing it."""
  cfg = config.load(TINY["flux2"], ["model.lora.lora_bias=False"])
  model = nnx.eval_shape(lambda: models.CoTIR(cfg.model, rngs=nnx.Rngs(0)))
  lora_t, adapter_t = cotir_files.trainable_targets(model)
  assert not any(k.endswith("b_bias") for k in lora_t)
  rng = np.random.default_rng(0)
  params = {k: rng.standard_normal(v.shape).astype(np.float32)
            for k, v in {**lora_t, **adapter_t}.items()}
  files = cotir_files.write_cotir_files(params, str(tmp_path), "safetensors", dtype=None)
  tensors = {k: np.array(v) for k, v in cotir_files.read_tensors(files["lora"]).items()}
  biases = [k for k in tensors if k.endswith(".lora_B.bias")]
  assert biases and all(not tensors[k].any() for k in biases)
  back = cotir_files.import_cotir_params("flux2", lora_t, adapter_t, files["lora"],
                                         files["cot_adapter"])
  for k, v in params.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  tensors[biases[0]] = np.ones_like(tensors[biases[0]])
  biased = str(tmp_path / "biased.safetensors")
  cotir_files.write_tensors(tensors, biased, "safetensors")
  with pytest.raises(convert.ConversionError, match="lora_bias=False"):
    cotir_files.import_cotir_params("flux2", lora_t, adapter_t, biased, files["cot_adapter"])
  assert issubclass(convert.ConversionError, cli.UserError)
