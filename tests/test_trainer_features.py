"""Trainer features, in-process on the tiny config: `training.init_from` (a training workdir or
step, a cotir_to_orbax output, upstream lora.pt + cot_adapter.pt), `training.ema_decay` (in the
checkpoint, exact resume, validation, restore / export with --ema), `training.profile_steps`
(a trace of the chosen steps) and wandb continuing its own run on resume.

One 4-step run (`runs`) starts from upstream files with an EMA, a profiler window and a fake
`wandb` module; a copy of its workdir without the last checkpoint resumes to the end. Both
compile one program (the second loads it from the session's compile cache)."""

import contextlib
import gzip
import io
import json
import os
import shutil
import sys
import types
from types import SimpleNamespace

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cotir_jax import cli, config, convert
from cotir_jax.convert import cotir as cotir_files
from cotir_jax.convert.core import ConversionError
from cotir_jax.train import checkpoint, ema, loop, metrics
from cotir_jax.train.program import Program
from test_train import JIT_CACHE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
RUN = ["training.iterations=(4,)", "training.patch_sizes=(32,)", "training.batch_sizes=(2,)",
       "training.val_steps=2", "training.save_steps=2", "training.log_steps=1",
       "training.checkpoints_total_limit=3", "training.ema_decay=0.9",
       f"compile_cache_dir={JIT_CACHE}"]


class FakeWandb(types.ModuleType):
  """Stands in for the optional `wandb` package (no network): records what `init` is given."""

  def __init__(self):
    super().__init__("wandb")
    self.inits = []

  def init(self, **kwargs):
    self.inits.append(kwargs)
    return SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)

  @staticmethod
  def Image(array):
    return array


def _flat(state) -> dict[str, np.ndarray]:
  """Dotted path → host copy of every leaf (an nnx.State, a training state, a checkpoint's
  nested dicts; PRNG keys as their key data, abstract leaves as they are)."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    key = ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    out[key.removesuffix(".value")] = x if isinstance(x, jax.ShapeDtypeStruct) else np.array(x)
  return out


def _assert_equal(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _assert_fresh(state: dict, fresh: dict, params: dict):
  """Every leaf of `state` but the weights is a fresh state's: optimizer moments and counts, λ,
  step 0, RNG; optax's snapshot of the weights' norm, taken at init, is that of `params`."""
  snapshot = [k for k in fresh if k.endswith("measurement.grad_norm")]  # optax.snapshot's
  rest = lambda s: {k: v for k, v in s.items()
                    if not k.startswith(("params.", "ema.")) and k not in snapshot}
  _assert_equal(rest(state), rest(fresh))
  norm = np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in params.values()))
  for k in snapshot:
    np.testing.assert_allclose(state[k], norm, rtol=1e-5)


def _checkpoint(workdir, step) -> dict:
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


@pytest.fixture(scope="module")
def cfg():
  return config.load(TINY, RUN)


@pytest.fixture(scope="module")
def prog(cfg):
  return Program.build(cfg)


@pytest.fixture(scope="module")
def source(prog, tmp_path_factory):
  """Trainable weights unlike the random init (init + noise), written as upstream's files
  (float32, so that they hold the weights exactly)."""
  flat = _flat(prog.init_state()["params"])
  rng = np.random.default_rng(7)
  params = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in flat.items()}
  root = tmp_path_factory.mktemp("source")
  files = cotir_files.write_cotir_files(params, str(root / "upstream"), "pt", dtype=None)
  return SimpleNamespace(params=params, dir=str(root / "upstream"), files=files, root=root)


@pytest.fixture(scope="module")
def runs(cfg, prog, source, tmp_path_factory):
  """run 1: 4 steps initialised from the upstream files, EMA, trace of steps 1-2, wandb; run 2:
  a copy of its workdir without checkpoint 4 (as if killed after step 2's), resumed."""
  root = tmp_path_factory.mktemp("runs")
  first, second = str(root / "first"), str(root / "second")
  fake, initial = FakeWandb(), []
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(sys.modules, "wandb", fake)
    init_state = Program.init_state

    def spy(self, *args, **kwargs):  # the loop's starting state, before the step donates it
      state = init_state(self, *args, **kwargs)
      initial.append(_flat(state))
      return state

    mp.setattr(Program, "init_state", spy)
    run_cfg = config.load(TINY, RUN + [f"training.init_from={source.dir}",
                                       "training.profile_steps=(1,3)", "report_to=wandb"])
    out = []
    for workdir in (first, second):
      if workdir == second:
        shutil.copytree(first, second)
        shutil.rmtree(os.path.join(second, "checkpoints", "4"))
      with contextlib.redirect_stdout(io.StringIO()) as said:
        loop.train(run_cfg, workdir)
      out.append(said.getvalue())
  return SimpleNamespace(first=first, second=second, said=out, wandb=fake, initial=initial)


# ----------------------------------------------------------------------------- init_from

def test_init_from_upstream_files_starts_the_loop_at_step_0(runs, source, prog):
  """The loop's first state: the files' weights bit for bit (the EMA too), a fresh optimizer
  and λ, step 0; the start-up line says where the weights came from."""
  assert len(runs.initial) == 1  # the resumed run restored its checkpoint instead
  start, fresh = runs.initial[0], _flat(prog.init_state())
  part = lambda state, name: {k[len(name) + 1:]: v for k, v in state.items()
                              if k.startswith(name + ".")}
  _assert_equal(part(start, "params"), source.params)
  _assert_equal(part(start, "ema"), source.params)
  _assert_fresh(start, fresh, source.params)
  assert int(start["step"]) == 0
  assert f"starting at step 0 of 4, initialised from {source.dir};" in runs.said[0]
  assert ("resuming at step 2 of 4 (training.init_from unused: a resumed run continues from its own "
          "checkpoint)") in runs.said[1]


def test_init_from_every_kind_of_source(runs, source, prog, cfg):
  """A cotir_to_orbax output, the two upstream files, a training workdir and one of its steps:
  the trainable params are the source's bit for bit, everything else is a fresh state's."""
  lora, adapter = source.files["lora"], source.files["cot_adapter"]
  orbax_dir = str(source.root / "orbax")
  convert.cotir_to_orbax(lora, adapter, cfg, orbax_dir)
  fresh = _flat(prog.init_state())
  cases = {orbax_dir: source.params, f"{lora},{adapter}": source.params,
           runs.first: _flat(_checkpoint(runs.first, 4)["params"]),
           os.path.join(runs.first, "checkpoints", "2"): _flat(_checkpoint(runs.first, 2)["params"])}
  for init_from, want in cases.items():
    state = _flat(prog.init_state(init_from))
    got = {k[len("params."):]: v for k, v in state.items() if k.startswith("params.")}
    _assert_equal(got, want)
    _assert_equal({k[len("ema."):]: v for k, v in state.items() if k.startswith("ema.")}, want)
    _assert_fresh(state, fresh, want)


def test_init_from_errors_are_one_line(prog, source, tmp_path, capsys):
  only_adapter = tmp_path / "only_adapter"
  only_adapter.mkdir()
  shutil.copy(source.files["cot_adapter"], only_adapter)
  lora_less = config.load(TINY, ["model.lora.enabled=False"])
  convert.cotir_to_orbax(None, source.files["cot_adapter"], lora_less, str(tmp_path / "no_lora"))
  rank4 = config.load(TINY, ["model.lora.rank=4"])
  flat = _flat(Program.build(rank4).state["params"])
  cotir_files.write_cotir_files({k: np.zeros(v.shape, v.dtype) for k, v in flat.items()},
                                str(tmp_path / "rank4"), "pt", dtype=None)
  convert.cotir_to_orbax(str(tmp_path / "rank4" / "lora.pt"),
                         str(tmp_path / "rank4" / "cot_adapter.pt"), rank4,
                         str(tmp_path / "rank4_orbax"))
  h, r = int(rank4.model.hidden_size), int(config.load(TINY).model.lora.rank)
  for init_from, message in (
      (str(tmp_path / "nope"), f"training.init_from '{tmp_path / 'nope'}' does not exist"),
      (str(only_adapter), "no lora file, but the config has LoRA (model.lora.enabled)"),
      (str(tmp_path / "no_lora"), "holds no LoRA weights, but the config has LoRA"),
      (str(tmp_path / "rank4"), "lora.pt: key(s) {'final_layer.adaLN_modulation.1.lora_A.weight': "
                                f"(4, {h})}} give shape ({h}, 4) for our "
                                "'backbone.final_layer.adaLN_modulation.lora.a', which expects "
                                f"({h}, {r})"),
      (str(tmp_path / "rank4_orbax"), "key 'backbone.final_layer.adaLN_modulation.lora.a' has "
                                      f"shape ({h}, 4), the config expects ({h}, {r})")):
    with pytest.raises(ConversionError) as e:
      prog.read_params(init_from)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert issubclass(ConversionError, cli.UserError)
  # through the command line: one line, exit 2, no traceback, nothing compiled
  from cotir_jax.train.__main__ import main
  code = main(["--config", TINY, "--workdir", str(tmp_path / "w"),
               f"--config.compile_cache_dir={JIT_CACHE}",
               f"--config.training.init_from={only_adapter}"])
  err = capsys.readouterr().err
  assert code == 2 and "Traceback" not in err
  assert [line for line in err.splitlines() if line.startswith("cotir_jax")] == [
      f"cotir_jax: error: training.init_from ['{only_adapter / 'cot_adapter.pt'}']: no lora "
      "file, but the config has LoRA (model.lora.enabled)"]


# ----------------------------------------------------------------------------- EMA

def test_ema_resumes_exactly(runs):
  """The resumed run's step-4 state (weights, EMA, optimizer, λ, RNG) equals the uninterrupted
  run's bit for bit, and the EMA is not the weights."""
  a, b = _flat(_checkpoint(runs.first, 4)), _flat(_checkpoint(runs.second, 4))
  _assert_equal(a, b)
  ema_keys = [k for k in a if k.startswith("ema.")]
  assert ema_keys and all(a[k].dtype == np.float32 for k in ema_keys)
  assert any(not np.array_equal(a[k], a["params." + k[len("ema."):]]) for k in ema_keys)
  values = lambda workdir: [{k: v for k, v in r.items() if k.startswith(("loss", "val_", "lambda_"))}
                           for r in metrics.read_metrics(workdir)]
  assert values(runs.first) == values(runs.second)


def test_validation_scores_the_ema(runs):
  rows = {r["step"]: r for r in metrics.read_metrics(runs.first)}
  for step in (0, 2):
    assert 0 < rows[step]["val_ema_psnr_gen"] < 100 and "val_psnr_gen" not in rows[step]


def test_ema_warm_up_and_update():
  n = np.array([0, 8, 80, 890, 10**6], np.int32)
  np.testing.assert_allclose(ema.decay_at(0.999, n), [0.1, 0.5, 0.9, 0.99, 0.999], rtol=1e-6)
  got = ema.update({"w": np.float32([1.0])}, {"w": np.float32([3.0])}, 0.9, np.int32(80))
  np.testing.assert_allclose(got["w"], [1.0 + 0.1 * 2.0], rtol=1e-6)


def test_export_and_restore_read_the_ema(runs, source, prog, tmp_path):
  ckpt = _flat(_checkpoint(runs.first, 4))
  for use_ema, prefix in ((False, "params."), (True, "ema.")):
    files = convert.orbax_to_cotir(runs.first, str(tmp_path / prefix), dtype=None, ema=use_ema)
    back = cotir_files.read_trainable([files["lora"], files["cot_adapter"]],
                                      _flat(prog.state["params"]), "flux2")
    for k, v in back.items():
      np.testing.assert_array_equal(v, ckpt[prefix + k].astype(v.dtype), err_msg=k)
  targets = _flat(prog.state["params"])
  got = cotir_files.read_trainable([runs.first], targets, "flux2", item="ema")  # restore --ema
  _assert_equal({k: v.astype(np.float32) for k, v in got.items()},
                {k[len("ema."):]: v for k, v in ckpt.items() if k.startswith("ema.")})
  with pytest.raises(ConversionError, match="upstream's files hold no 'ema' weights"):
    cotir_files.read_trainable([source.dir], targets, "flux2", item="ema")
  orbax_dir = str(tmp_path / "orbax")
  convert.cotir_to_orbax(source.files["lora"], source.files["cot_adapter"], config.load(TINY),
                         orbax_dir)
  with pytest.raises(ConversionError, match="trainable-weights checkpoint holds no 'ema'"):
    convert.orbax_to_cotir(orbax_dir, str(tmp_path / "x"), ema=True)


def test_turning_ema_on_or_off_on_resume_is_refused():
  stored = json.loads(config.load(TINY).to_json())
  for old, new, breaks in ((0.0, 0.9, True), (0.9, 0.0, True), (0.9, 0.99, False)):
    stored["training"]["ema_decay"] = old
    breaking, allowed = checkpoint.config_changes(stored, config.load(TINY, [f"training.ema_decay={new}"]))
    assert [c.field for c in (breaking if breaks else allowed)] == ["training.ema_decay"]


@pytest.mark.parametrize("override", ["training.ema_decay=1.0", "training.ema_decay=-0.1",
                                      "training.profile_steps=(3,3)", "training.profile_steps=(1,)"])
def test_bad_values_name_the_field(override):
  with pytest.raises(config.ConfigError, match=override.split("=")[0]):
    config.load(TINY, [override])


# ----------------------------------------------------------------------------- profiler, wandb

def test_profile_trace_of_the_chosen_steps(runs):
  traces = os.path.join(runs.first, "profile", "plugins", "profile")
  (run,) = os.listdir(traces)
  files = os.listdir(os.path.join(traces, run))
  assert any(f.endswith(".xplane.pb") for f in files) and "perfetto_trace.json.gz" in files
  with gzip.open(os.path.join(traces, run, "perfetto_trace.json.gz")) as f:
    events = json.load(f)["traceEvents"]
  steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train")
  assert steps == [1, 2]


def test_wandb_continues_its_run_on_resume(runs, tmp_path):
  first, resumed = runs.wandb.inits
  with open(os.path.join(runs.first, metrics.WANDB_ID_FILE)) as f:
    stored = f.read().strip()
  assert first["id"] == resumed["id"] == stored and first["resume"] == "allow"
  assert len(stored) == 8 and stored.isalnum()
  assert metrics.wandb_run_id(tmp_path) != stored  # another workdir, another run
