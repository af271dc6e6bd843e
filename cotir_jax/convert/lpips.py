"""LPIPS v0.1 AlexNet weights (lpips / pyiqa, spec §16) → `quality.LPIPS`.

LPIPS needs two files, both torch.save dicts:

- torchvision's ImageNet AlexNet, `alexnet-owt-7be5be79.pth` (what `torchvision.models.alexnet(
  weights="IMAGENET1K_V1")` downloads into `$TORCH_HOME/hub/checkpoints/`): the trunk, keys
  `features.{0,3,6,8,10}.{weight,bias}` (its `classifier.*` is unused);
- the learned linear layers, keys `lin{0..4}.model.1.weight` [1, C, 1, 1]: lpips ships them as
  `lpips/weights/v0.1/alex.pth`, and pyiqa downloads the same bytes (sha256 df73285e…) as
  `$TORCH_HOME/hub/pyiqa/LPIPS_v0.1_alex-df73285e.pth`.

Without explicit paths both are looked up where pyiqa, torchvision and a pip-installed lpips
leave them; a missing file is an error that names every place tried and the option to pass.
"""

from __future__ import annotations

import importlib.util
import os

from flax import nnx

from cotir_jax.convert.core import (CONV, IDENTITY, ConversionError, Rule, flat_params,
                                    import_params, materialize, rule)
from cotir_jax.convert.cotir import read_tensors
from cotir_jax.quality import LPIPS

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/" + ALEXNET_FILE
LPIPS_FILE = "LPIPS_v0.1_alex-df73285e.pth"
ALEXNET_FEATURES = (0, 3, 6, 8, 10)  # indices of the convs in torchvision's `features`
ALEXNET_IGNORE = (r"^classifier\.",)


def alexnet_rules() -> list[Rule]:
  """torchvision AlexNet `features` convs → `convs.{i}`."""
  rules = []
  for i, idx in enumerate(ALEXNET_FEATURES):
    rules += [rule(f"convs.{i}.kernel", f"features.{idx}.weight", t=CONV),
              rule(f"convs.{i}.bias", f"features.{idx}.bias", t=IDENTITY)]
  return rules


def lin_rules() -> list[Rule]:
  """lpips `lin{i}.model.1` (Dropout, then a bias-free 1×1 conv) → `lins.{i}`."""
  return [rule(f"lins.{i}", f"lin{i}.model.1.weight", t=CONV) for i in range(len(ALEXNET_FEATURES))]


def _torch_hub_dir() -> str:
  """torch.hub.get_dir() without importing torch."""
  cache = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
  torch_home = os.environ.get("TORCH_HOME", os.path.join(cache, "torch"))
  return os.path.join(os.path.expanduser(torch_home), "hub")


def default_locations() -> dict[str, list[str]]:
  """Where torchvision, pyiqa and a pip-installed lpips keep the two files, in search order."""
  hub = _torch_hub_dir()
  lin = [os.path.join(hub, "pyiqa", LPIPS_FILE)]
  spec = importlib.util.find_spec("lpips")  # finds the package without importing it (or torch)
  if spec is not None and spec.submodule_search_locations:
    package_dir = next(iter(spec.submodule_search_locations))
    lin.append(os.path.join(package_dir, "weights", "v0.1", "alex.pth"))
  return {"alexnet": [os.path.join(hub, "checkpoints", ALEXNET_FILE)], "lin": lin}


def find_weights(lpips_weights: str | None = None,
                 alexnet_weights: str | None = None) -> tuple[str, str]:
  """(linear-layer file, AlexNet file): the given paths, else the first default that exists."""
  found, problems = {}, []
  places = default_locations()
  lin_what = f"LPIPS v0.1 linear layers (lpips' weights/v0.1/alex.pth, or pyiqa's {LPIPS_FILE})"
  alexnet_what = f"torchvision AlexNet ({ALEXNET_FILE}, {ALEXNET_URL})"
  for key, given, option, what in (("lin", lpips_weights, "--lpips_weights", lin_what),
                                   ("alexnet", alexnet_weights, "--alexnet_weights", alexnet_what)):
    if given is not None:
      if not os.path.isfile(given):
        problems.append(f"{option} {given}: file does not exist ({what})")
      found[key] = given
      continue
    found[key] = next((p for p in places[key] if os.path.isfile(p)), None)
    if found[key] is None:
      problems.append(f"{what} not found; looked in {places[key]}; pass {option} PATH")
  if problems:
    raise ConversionError("LPIPS weights missing: " + "; ".join(problems))
  return found["lin"], found["alexnet"]


def load_lpips(lpips_weights: str | None = None, alexnet_weights: str | None = None) -> LPIPS:
  """The LPIPS module with converted weights (float32); see `find_weights` for the lookup."""
  lin_path, alexnet_path = find_weights(lpips_weights, alexnet_weights)
  build = lambda: LPIPS(rngs=nnx.Rngs(0))
  targets = flat_params(nnx.eval_shape(build))
  params = {}
  for rules, path, ignore in ((alexnet_rules(), alexnet_path, ALEXNET_IGNORE),
                              (lin_rules(), lin_path, ())):
    if not path.endswith(".safetensors") and importlib.util.find_spec("torch") is None:
      raise ConversionError(f"{path}: reading torch.save files needs torch (pip install torch; "
                            "the CPU build is enough)")
    mine = {r.ours: targets[r.ours] for r in rules}
    params.update(import_params(rules, read_tensors(path), mine, source=path, ignore=ignore))
  return materialize(build, params)
