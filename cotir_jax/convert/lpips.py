"""LPIPS v0.1 weights (lpips / pyiqa / torchmetrics) → `quality.LPIPS`, AlexNet or VGG16 trunk.

LPIPS needs two files, both torch.save dicts:

- the trunk, torchvision's ImageNet weights (what `torchvision.models.alexnet(weights=
  "IMAGENET1K_V1")` / `vgg16(weights="IMAGENET1K_V1")` download into
  `$TORCH_HOME/hub/checkpoints/`): `alexnet-owt-7be5be79.pth`, keys
  `features.{0,3,6,8,10}.{weight,bias}`, or `vgg16-397923af.pth`, keys
  `features.{0,2,5,…,28}.{weight,bias}` (`classifier.*` is unused);
- the learned linear layers, keys `lin{0..4}.model.1.weight` [1, C, 1, 1]: lpips ships them as
  `lpips/weights/v0.1/{alex,vgg}.pth`, torchmetrics as
  `torchmetrics/functional/image/lpips_models/{alex,vgg}.pth`, and pyiqa downloads the same
  tensors as `$TORCH_HOME/hub/pyiqa/LPIPS_v0.1_{alex-df73285e,vgg-a78928a0}.pth`.

Without explicit paths both are looked up where pyiqa, torchvision and pip-installed lpips /
torchmetrics leave them; a missing file is an error that names every place tried and the
option to pass.
"""

from __future__ import annotations

import importlib.util
import os

from flax import nnx

from cotir_jax.convert.core import (CONV, IDENTITY, ConversionError, Rule, flat_params,
                                    import_params, materialize, rule)
from cotir_jax.convert.cotir import read_tensors
from cotir_jax.quality import LPIPS, LPIPS_TRUNKS

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
VGG16_FILE = "vgg16-397923af.pth"
TRUNK_FILES = {"alex": ALEXNET_FILE, "vgg": VGG16_FILE}
TRUNK_OPTIONS = {"alex": "--alexnet_weights", "vgg": "--vgg_weights"}
TRUNK_NAMES = {"alex": "AlexNet", "vgg": "VGG16"}
LPIPS_FILE = "LPIPS_v0.1_alex-df73285e.pth"
LPIPS_FILES = {"alex": LPIPS_FILE, "vgg": "LPIPS_v0.1_vgg-a78928a0.pth"}  # pyiqa's names
# indices of the convs in torchvision's `features`
TRUNK_FEATURES = {"alex": (0, 3, 6, 8, 10),
                  "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)}
TRUNK_IGNORE = (r"^classifier\.",)


def trunk_rules(net: str = "alex") -> list[Rule]:
  """torchvision AlexNet / VGG16 `features` convs → `convs.{i}`."""
  rules = []
  for i, idx in enumerate(TRUNK_FEATURES[net]):
    rules += [rule(f"convs.{i}.kernel", f"features.{idx}.weight", t=CONV),
              rule(f"convs.{i}.bias", f"features.{idx}.bias", t=IDENTITY)]
  return rules


def lin_rules(net: str = "alex") -> list[Rule]:
  """lpips `lin{i}.model.1` (Dropout, then a bias-free 1×1 conv) → `lins.{i}`."""
  taps = sum(tap for *_, tap in LPIPS_TRUNKS[net])
  return [rule(f"lins.{i}", f"lin{i}.model.1.weight", t=CONV) for i in range(taps)]


def _torch_hub_dir() -> str:
  """torch.hub.get_dir() without importing torch."""
  cache = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
  torch_home = os.environ.get("TORCH_HOME", os.path.join(cache, "torch"))
  return os.path.join(os.path.expanduser(torch_home), "hub")


def _package_dir(name: str) -> str | None:
  """Where a package is installed, found without importing it (or torch)."""
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    return None
  return next(iter(spec.submodule_search_locations))


def default_locations(net: str = "alex") -> dict[str, list[str]]:
  """Where torchvision, pyiqa and pip-installed lpips / torchmetrics keep the two files."""
  hub = _torch_hub_dir()
  lin = [os.path.join(hub, "pyiqa", LPIPS_FILES[net])]
  for package, sub in (("lpips", ("weights", "v0.1")),
                       ("torchmetrics", ("functional", "image", "lpips_models"))):
    where = _package_dir(package)
    if where is not None:
      lin.append(os.path.join(where, *sub, f"{net}.pth"))
  return {"trunk": [os.path.join(hub, "checkpoints", TRUNK_FILES[net])], "lin": lin}


def find_weights(lpips_weights: str | None = None, trunk_weights: str | None = None,
                 net: str = "alex") -> tuple[str, str]:
  """(linear-layer file, trunk file): the given paths, else the first default that exists."""
  found, problems = {}, []
  places = default_locations(net)
  lin_what = (f"LPIPS v0.1 {net} linear layers (lpips' weights/v0.1/{net}.pth, torchmetrics' "
              f"lpips_models/{net}.pth, or pyiqa's {LPIPS_FILES[net]})")
  trunk_what = (f"torchvision {TRUNK_NAMES[net]} ({TRUNK_FILES[net]}, "
                f"https://download.pytorch.org/models/{TRUNK_FILES[net]})")
  for key, given, option, what in (("lin", lpips_weights, "--lpips_weights", lin_what),
                                   ("trunk", trunk_weights, TRUNK_OPTIONS[net], trunk_what)):
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
  return found["lin"], found["trunk"]


def load_lpips(lpips_weights: str | None = None, trunk_weights: str | None = None, *,
               net: str = "alex", unit_norm: str = "lpips") -> LPIPS:
  """The LPIPS module with converted weights (float32); see `find_weights` for the lookup."""
  lin_path, trunk_path = find_weights(lpips_weights, trunk_weights, net)
  build = lambda: LPIPS(net, unit_norm, rngs=nnx.Rngs(0))
  targets = flat_params(nnx.eval_shape(build))
  params = {}
  for rules, path, ignore in ((trunk_rules(net), trunk_path, TRUNK_IGNORE),
                              (lin_rules(net), lin_path, ())):
    if not path.endswith(".safetensors") and importlib.util.find_spec("torch") is None:
      raise ConversionError(f"{path}: reading torch.save files needs torch (pip install torch; "
                            "the CPU build is enough)")
    mine = {r.ours: targets[r.ours] for r in rules}
    params.update(import_params(rules, read_tensors(path), mine, source=path, ignore=ignore))
  return materialize(build, params)
