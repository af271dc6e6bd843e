"""Every command line answers `--help` without a config and reports a user's mistake (a bad
config value, a missing path, an unknown flag) as one `cotir_jax: error: ...` line on stderr
with exit code 2 and no traceback, before anything is built: each runs in-process through its
`main(argv)`, so a run that built a model or compiled would show in the test's time."""

import importlib.util
import os
import subprocess
import sys

import pytest
from PIL import Image

from cotir_jax import cli, config
from cotir_jax import evaluate, plan, restore
from cotir_jax.data import tfds_builder
from cotir_jax.train import __main__ as train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs/tiny.py")
SAMPLE = os.path.join(REPO, "data/sample")
MISSING = "/nonexistent/cotir"
IMAGE = "<a PNG made by the test>"


def _script(name):
  spec = importlib.util.spec_from_file_location(f"_convert_{name}",
                                                os.path.join(REPO, "convert", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


CONVERT = {name: _script(name) for name in ("diffusers_to_orbax", "cotir_to_orbax",
                                            "orbax_to_cotir")}
RESTORE = ["--weights", SAMPLE, "--input", IMAGE, "--out", MISSING]

# CLI → (main, [(argv, text the one line must hold)]): a bad value, a missing path, an
# unknown flag, each before anything is built
CASES = {
    "train": (train.main, [
        (["--config", TINY, "--config.model.num_heads=3"], "model.num_heads=3"),
        (["--config", TINY, "--config.data.shuffle_buffer=50"], "data.shuffle_buffer"),
        (["--config", os.path.join(REPO, "configs/nope.py")], "configs/nope.py"),
        (["--config", TINY, f"--config.data.data_dir={MISSING}", "--workdir", MISSING],
         MISSING),
        (["--config", TINY, "--bogus"], "--bogus"),
        ([], "missing --config")]),
    "plan": (plan.main, [
        (["--config", TINY, "--topology", "local", "--config.training.patch_sizes=(30,64)"],
         "training.patch_sizes"),
        (["--config", TINY, "--topology", "v9x:2x2"], "v9x"),
        (["--config", MISSING, "--topology", "local"], MISSING),
        (["--config", TINY, "--topology", "local", "--bogus"], "--bogus")]),
    "restore": (restore.main, [
        (["--config", TINY, *RESTORE, "--num_steps", "0"], "inference.num_steps"),
        (["--config", TINY, "--weights", SAMPLE, "--input", MISSING, "--out", MISSING],
         f"--input {MISSING!r}"),
        (["--config", TINY, "--weights", MISSING, "--input", IMAGE, "--out", MISSING],
         f"--weights {MISSING!r}"),
        (["--config", TINY, *RESTORE, "--bogus"], "--bogus")]),
    "evaluate": (evaluate.main, [
        (["--results", SAMPLE, "--reference", SAMPLE, "--metrics", "psnr,niqe"], "niqe"),
        (["--results", MISSING, "--reference", SAMPLE], MISSING),
        (["--results", SAMPLE, "--reference", SAMPLE, "--bogus"], "--bogus")]),
    "tfds_builder": (tfds_builder.main, [  # no config: two paths, no value to get wrong
        (["--source", MISSING, "--out", MISSING], MISSING),
        (["--source", SAMPLE], "--out"),
        (["--source", SAMPLE, "--out", MISSING, "--bogus"], "--bogus")]),
    "diffusers_to_orbax": (CONVERT["diffusers_to_orbax"].main, [
        (["--src", SAMPLE, "--out", MISSING, "--dtype", "float8"], "float8"),
        (["--src", MISSING, "--out", MISSING], MISSING),
        (["--src", SAMPLE, "--out", MISSING, "--bogus"], "--bogus")]),
    "cotir_to_orbax": (CONVERT["cotir_to_orbax"].main, [
        (["--config", TINY, "--config.model.lora.rank=abc", "--adapter", MISSING, "--out",
          MISSING], "model.lora.rank"),
        (["--config", TINY, "--lora", MISSING, "--adapter", MISSING, "--out", MISSING],
         MISSING),
        (["--config", TINY, "--adapter", MISSING, "--out", MISSING, "--bogus"], "--bogus")]),
    "orbax_to_cotir": (CONVERT["orbax_to_cotir"].main, [
        (["--checkpoint", SAMPLE, "--out", MISSING, "--format", "zip"], "zip"),
        (["--checkpoint", MISSING, "--out", MISSING], MISSING),
        (["--checkpoint", SAMPLE, "--out", MISSING, "--bogus"], "--bogus")]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_help_needs_no_config(name, capsys):
  main, _ = CASES[name]
  # a broken config next to --help is not even read
  assert main(["--config", os.path.join(REPO, "configs/nope.py"), "--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: ") and "--debug" in out


@pytest.fixture(scope="module")
def image(tmp_path_factory):
  path = tmp_path_factory.mktemp("lq") / "lq.png"
  Image.new("RGB", (20, 18)).save(path)
  return str(path)


@pytest.mark.parametrize("name", sorted(CASES))
def test_user_errors_are_one_line_and_exit_2(name, image, capsys):
  main, cases = CASES[name]
  for argv, text in cases:
    argv = [image if a == IMAGE else a for a in argv]
    assert main(argv) == cli.EXIT_USER_ERROR, argv
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err, (argv, err)
    (line,) = err.splitlines()
    assert line.startswith("cotir_jax: error: ") and text in line, (argv, line)
  assert not os.path.exists(MISSING)  # nothing was written


def test_debug_shows_the_traceback():
  with pytest.raises(config.ConfigError, match="num_heads=3"):
    train.main(["--config", TINY, "--config.model.num_heads=3", "--debug"])


def test_a_bad_value_from_the_shell():
  """The real process: exit status 2 and the single line, nothing else on stderr."""
  proc = subprocess.run([sys.executable, "-m", "cotir_jax.train", "--config", "configs/tiny.py",
                         "--config.model.num_heads=3"], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr == ("cotir_jax: error: model.hidden_size=128 is not a multiple of "
                         "model.num_heads=3\n")
