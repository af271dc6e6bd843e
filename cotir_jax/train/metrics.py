"""Metrics to `<workdir>/metrics.jsonl` and TensorBoard event files (wandb when configured).

Only the lead process (jax.process_index() == 0) writes; elsewhere every call is a no-op.
On resume (`start_step` > 0) lines with step ≥ start_step — written by a run that was killed
after its last checkpoint — are dropped and TensorBoard purges the same steps, so a resumed run's
logs read exactly like an uninterrupted run's. wandb continues the workdir's own run: its id is
kept in `<workdir>/wandb_run_id` by the first run and passed back by every resume (wandb itself
keeps the first values it got for steps a killed run logged after its last checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
from collections.abc import Mapping

import jax
import numpy as np

WANDB_ID_FILE = "wandb_run_id"


def _to_python(v):
  """Scalars (jax / numpy / python) → float or int for JSON; non-finite floats kept as str."""
  a = np.asarray(v)
  if a.size != 1:
    raise ValueError(f"metric values must be scalars, got shape {a.shape}")
  x = a.item()
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)  # JSON has no NaN/Inf; keep it readable
  return x


class MetricsWriter:
  """`write(step, {name: scalar})` appends one JSON line and the TensorBoard scalars."""

  def __init__(self, workdir: str | os.PathLike, *, start_step: int = 0, report_to: str | None =
               "tensorboard", project: str = "CoTIR", config: Mapping | None = None,
               is_lead: bool | None = None):
    self.is_lead = jax.process_index() == 0 if is_lead is None else is_lead
    self.path = os.path.join(os.fspath(workdir), "metrics.jsonl")
    self._file = self._tb = self._wandb = None
    if not self.is_lead:
      return
    os.makedirs(os.fspath(workdir), exist_ok=True)
    self._truncate(start_step)
    self._file = open(self.path, "a", encoding="utf-8")
    from tensorboardX import SummaryWriter  # a declared dependency
    self._tb = SummaryWriter(os.path.join(os.fspath(workdir), "tensorboard"),
                             purge_step=start_step if start_step > 0 else None)
    if report_to == "wandb":
      try:
        import wandb  # optional
      except ImportError:
        print("report_to=wandb but wandb is not installed; logging to JSONL/TensorBoard only")
      else:
        self._wandb = wandb.init(project=project, config=dict(config or {}),
                                 id=wandb_run_id(workdir), resume="allow")

  def _truncate(self, start_step: int) -> None:
    if not os.path.exists(self.path):
      return
    keep = []
    with open(self.path, encoding="utf-8") as f:
      for line in f:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by a kill
        if rec.get("step", -1) < start_step:
          keep.append(json.dumps(rec) + "\n")
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: Mapping[str, object]) -> None:
    if not self.is_lead:
      return
    rec = {"step": int(step)}
    rec.update({k: _to_python(v) for k, v in metrics.items()})
    self._file.write(json.dumps(rec) + "\n")
    self._file.flush()
    for k, v in rec.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, int(step))
    if self._wandb is not None:
      self._wandb.log({k: v for k, v in rec.items() if k != "step"}, step=int(step))

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """An HWC uint8 image (e.g. the validation grid) to TensorBoard / wandb."""
    if not self.is_lead:
      return
    self._tb.add_image(name, np.asarray(image), int(step), dataformats="HWC")
    if self._wandb is not None:
      import wandb
      self._wandb.log({name: wandb.Image(np.asarray(image))}, step=int(step))

  def flush(self) -> None:
    if self.is_lead:
      self._file.flush()
      self._tb.flush()

  def close(self) -> None:
    if not self.is_lead or self._file is None:
      return
    self._file.close()
    self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()
    self._file = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def wandb_run_id(workdir: str | os.PathLike) -> str:
  """The workdir's wandb run id: made (wandb's form, 8 of [0-9a-z]) and stored by the first run,
  read by every later one, so a resumed run logs into the same wandb run."""
  path = os.path.join(os.fspath(workdir), WANDB_ID_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return f.read().strip()
  run_id = "".join(secrets.choice(string.digits + string.ascii_lowercase) for _ in range(8))
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(run_id + "\n")
  os.replace(path + ".tmp", path)
  return run_id


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """All records of `<workdir>/metrics.jsonl` in order (for tests and tools)."""
  path = os.path.join(os.fspath(workdir), "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
