"""Declarative weight conversion: one table of rules per family drives import, export and coverage.

A `Rule` says which reference tensors (diffusers / transformers / upstream CoTIR names) make
one of our parameters, and how (`Transform`). `{i}` in a reference name marks a stacked layer
axis: rule `single_blocks.linear1.kernel` ← `single_transformer_blocks.{i}.attn.to_qkv_mlp_proj.weight`
fills slice i of our `[layers, in, out]` kernel from block i. The same table drives import
(`import_params`), export (`export_params`) and the shape-only coverage check (`check_coverage`).

Our parameter paths are the dotted `nnx.state` paths of the target module.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cotir_jax.cli import UserError


class ConversionError(UserError, ValueError):
  """A missing, unexpected or mis-shaped key; the message names the key (and both shapes)."""


@dataclasses.dataclass(frozen=True)
class Transform:
  """`to_ours(ref_arrays, xp) -> our array`; `to_ref(our_array, ref_shapes, xp) -> ref arrays`.

  `xp` is numpy for real conversion and jax.numpy for shape-only checks (under eval_shape).
  `regroups`: the (FusedLayout, axis) pairs `to_ours` ends with (see `regroup`).
  """
  name: str
  to_ours: Callable
  to_ref: Callable
  regroups: tuple = ()


def _split_rows(x, shapes, xp):
  sizes = np.cumsum([s[0] for s in shapes])[:-1]
  return xp.split(x, sizes, axis=0)


IDENTITY = Transform("identity", lambda a, xp: a[0], lambda x, s, xp: [x])
# torch Linear weight [out, in] <-> our kernel [in, out]
LINEAR = Transform("linear", lambda a, xp: a[0].T, lambda x, s, xp: [x.T])
# torch Conv2d weight [out, in, kh, kw] <-> our HWIO kernel
CONV = Transform("conv", lambda a, xp: a[0].transpose(2, 3, 1, 0),
                 lambda x, s, xp: [x.transpose(3, 2, 0, 1)])
# several torch Linear weights stacked along `out` (q, k, v[, mlp]) <-> one fused kernel
FUSED_LINEAR = Transform("fused_linear", lambda a, xp: xp.concatenate(a, axis=0).T,
                         lambda x, s, xp: _split_rows(x.T, s, xp))
# several biases concatenated <-> one fused bias
FUSED = Transform("fused", lambda a, xp: xp.concatenate(a, axis=0),
                  lambda x, s, xp: _split_rows(x, s, xp))


def _swap_halves(x, xp):
  a, b = xp.split(x, 2, axis=0)
  return xp.concatenate([b, a], axis=0)


# diffusers AdaLayerNormContinuous emits (scale, shift); BFL / ours (shift, scale)
SWAPPED_LINEAR = Transform("swapped_linear", lambda a, xp: _swap_halves(a[0], xp).T,
                           lambda x, s, xp: [_swap_halves(x.T, xp)])
SWAPPED = Transform("swapped", lambda a, xp: _swap_halves(a[0], xp),
                    lambda x, s, xp: [_swap_halves(x, xp)])


def regroup(t: Transform, layout, axis: int) -> Transform:
  """`t`, then our head-group-major order of a fused projection (`models.layers.FusedLayout`)
  along `axis` of our array (-1: output columns / bias, -2: input rows); export inverts it.
  A mis-shaped input is passed on as it is, for the importer's error naming both shapes."""
  def to_ours(a, xp):
    x = t.to_ours(a, xp)
    return layout.from_parts(x, axis, xp) if x.shape[axis] == sum(layout.sizes) else x
  return Transform(f"{t.name}+groups{layout.groups}{list(layout.sizes)}@{axis}", to_ours,
                   lambda x, s, xp: t.to_ref(layout.to_parts(x, axis, xp), s, xp),
                   t.regroups + ((layout, axis),))


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: str
  ref: tuple[str, ...]
  transform: Transform = LINEAR

  @property
  def stacked(self) -> bool:
    return any("{i}" in r for r in self.ref)

  def ref_keys(self, i: int | None = None) -> list[str]:
    return [r.format(i=i) for r in self.ref]


def rule(ours: str, *ref: str, t: Transform = LINEAR) -> Rule:
  return Rule(ours, tuple(ref), t)


def linear(ours: str, ref: str, bias: bool, *, cols=None, rows=None) -> list[Rule]:
  """A Linear layer: `ours.kernel` ← `ref.weight` (transposed), `ours.bias` ← `ref.bias`.

  `cols` / `rows`: the `FusedLayout` of a fused projection's outputs / inputs, whose reference
  order (parts side by side) is regrouped by head into ours.
  """
  kernel, b = LINEAR, IDENTITY
  if cols is not None:
    kernel, b = regroup(kernel, cols, -1), regroup(b, cols, -1)
  if rows is not None:
    kernel = regroup(kernel, rows, -2)
  rules = [rule(f"{ours}.kernel", f"{ref}.weight", t=kernel)]
  if bias:
    rules.append(rule(f"{ours}.bias", f"{ref}.bias", t=b))
  return rules


def flat_params(module_or_state) -> dict[str, object]:
  """Dotted path → array (or ShapeDtypeStruct) for every variable of a module or state."""
  state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state)
  return {".".join(str(k) for k in path): v.get_value() if hasattr(v, "get_value") else v
          for path, v in nnx.to_flat_state(state)}


def _layer_count(rule_: Rule, target_shape) -> int | None:
  return target_shape[0] if rule_.stacked else None


def _ref_inputs(rule_: Rule, n: int | None) -> list[list[str]]:
  return [rule_.ref_keys(i) for i in range(n)] if n is not None else [rule_.ref_keys()]


def _index_rules(rules: Sequence[Rule], targets: Mapping[str, object], source: str):
  by_ours = {r.ours: r for r in rules}
  missing_rules = [p for p in targets if p not in by_ours]
  if missing_rules:
    raise ConversionError(f"{source}: no conversion rule for our parameter(s) {missing_rules[:5]}"
                          + (" ..." if len(missing_rules) > 5 else ""))
  return by_ours


def import_params(rules: Sequence[Rule], tensors: Mapping[str, np.ndarray],
                  targets: Mapping[str, jax.ShapeDtypeStruct], *, source: str,
                  dtype=None, ignore: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """Builds our arrays (numpy, host memory) for every target path from reference tensors.

  Every target needs a rule, every referenced key must exist, every tensor of the source must
  be used (except names matching an `ignore` regex), and shapes must agree exactly.
  """
  by_ours = _index_rules(rules, targets, source)
  used: set[str] = set()
  out = {}
  for path, target in targets.items():
    r = by_ours[path]
    n = _layer_count(r, target.shape)
    want_dtype = np.dtype(dtype or target.dtype)
    result = np.empty(target.shape, want_dtype)
    for i, keys in enumerate(_ref_inputs(r, n)):
      for k in keys:
        if k not in tensors:
          raise ConversionError(f"{source}: missing key {k!r} (needed for our {path!r})")
      arr = r.transform.to_ours([np.asarray(tensors[k]) for k in keys], np)
      expect = target.shape[1:] if n is not None else target.shape
      if tuple(arr.shape) != tuple(expect):
        shapes = {k: tuple(tensors[k].shape) for k in keys}
        raise ConversionError(f"{source}: key(s) {shapes} give shape {tuple(arr.shape)} for our "
                              f"{path!r}, which expects {tuple(expect)}")
      if n is None:
        result[...] = arr.astype(want_dtype)
      else:
        result[i] = arr.astype(want_dtype)
      used.update(keys)
    out[path] = result
  unexpected = [k for k in tensors if k not in used and not any(re.search(p, k) for p in ignore)]
  if unexpected:
    raise ConversionError(f"{source}: unexpected key(s) {unexpected[:5]}"
                          + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
                          + " match no conversion rule")
  return out


def export_params(rules: Sequence[Rule], params: Mapping[str, np.ndarray],
                  ref_shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
  """Our arrays → reference-named tensors (the inverse of `import_params`)."""
  by_ours = {r.ours: r for r in rules}
  out = {}
  for path, value in params.items():
    if path not in by_ours:
      raise ConversionError(f"no conversion rule for our parameter {path!r}")
    r = by_ours[path]
    value = np.asarray(value)
    n = value.shape[0] if r.stacked else None
    for i, keys in enumerate(_ref_inputs(r, n)):
      part = value[i] if n is not None else value
      shapes = [ref_shapes[k] for k in keys] if ref_shapes is not None else None
      if shapes is None and len(keys) > 1:
        raise ConversionError(f"exporting fused {path!r} needs the reference shapes of {keys}")
      for k, arr in zip(keys, r.transform.to_ref(part, shapes, np)):
        out[k] = np.ascontiguousarray(arr)
  return out


def check_coverage(rules: Sequence[Rule], targets: Mapping[str, jax.ShapeDtypeStruct],
                   ref_shapes: Mapping[str, tuple[int, ...]], *, source: str,
                   ignore: Sequence[str] = ()) -> None:
  """Shape-only import: every reference key maps, every parameter of ours is covered, shapes agree.

  Runs the transforms under `jax.eval_shape`, so full-size models need no memory.
  """
  by_ours = _index_rules(rules, targets, source)
  used = set()
  for path, target in targets.items():
    r = by_ours[path]
    n = _layer_count(r, target.shape)
    for keys in _ref_inputs(r, n):
      for k in keys:
        if k not in ref_shapes:
          raise ConversionError(f"{source}: missing key {k!r} (needed for our {path!r})")
      args = [jax.ShapeDtypeStruct(ref_shapes[k], jnp.float32) for k in keys]
      got = jax.eval_shape(lambda *a, r=r: r.transform.to_ours(list(a), jnp), *args).shape
      expect = target.shape[1:] if n is not None else target.shape
      if tuple(got) != tuple(expect):
        raise ConversionError(f"{source}: key(s) {[(k, ref_shapes[k]) for k in keys]} give shape "
                              f"{tuple(got)} for our {path!r}, which expects {tuple(expect)}")
      used.update(keys)
  unexpected = [k for k in ref_shapes if k not in used and not any(re.search(p, k) for p in ignore)]
  if unexpected:
    raise ConversionError(f"{source}: unexpected key(s) {unexpected[:5]} match no conversion rule")


def materialize(build: Callable[[], nnx.Module], params: Mapping[str, np.ndarray]) -> nnx.Module:
  """Creates the module abstractly (no random init) and fills it with converted arrays."""
  abstract = nnx.eval_shape(build)
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    key = ".".join(str(k) for k in path)
    if key not in params:
      raise ConversionError(f"converted weights lack our parameter {key!r}")
    var.set_value(jnp.asarray(params[key]))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
