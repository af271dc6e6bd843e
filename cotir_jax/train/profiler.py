"""`training.profile_steps = (start, stop)`: a `jax.profiler` trace of the training steps start,
…, stop − 1 (the step numbers of metrics.jsonl) in `<workdir>/profile/`.

The trace starts before the first traced step reads its batch (host input time shows) and
stops once the last traced step's state is computed, so it holds all device work of those
steps; each step is marked with a `StepTraceAnnotation`, which TensorBoard's profile plugin
uses for its step-time breakdown. Choose steps after the first of a stage, whose time is
mostly compilation. Every process writes `plugins/profile/<time>/<host>.xplane.pb`; the lead
also writes `perfetto_trace.json.gz` there. Read them with `tensorboard --logdir
<workdir>/profile` (`pip install tensorboard-plugin-profile`; the Profile tab: trace viewer,
op profile, memory) or open the perfetto file in https://ui.perfetto.dev.
"""

from __future__ import annotations

import os

import jax


class StepProfiler:
  """`at(step, state)` at the top of every step starts, marks and stops the trace; `close()`
  ends one still open when the run ends inside the window."""

  def __init__(self, steps, workdir: str):
    self.window = tuple(int(s) for s in steps) or None
    self.directory = os.path.join(workdir, "profile")
    self._tracing = False
    self._annotation = None

  def at(self, step: int, state) -> None:
    """Before step `step` reads its batch; `state`: the previous step's output."""
    self._end_annotation()
    if self.window is None:
      return
    start, stop = self.window
    if self._tracing and step >= stop:
      jax.block_until_ready(state)  # the last traced step's device work lands in the trace
      self._stop()
    elif not self._tracing and start <= step < stop:
      jax.profiler.start_trace(self.directory, create_perfetto_trace=jax.process_index() == 0)
      self._tracing = True
    if self._tracing:
      self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
      self._annotation.__enter__()

  def close(self) -> None:
    self._end_annotation()
    if self._tracing:
      self._stop()

  def _stop(self) -> None:
    jax.profiler.stop_trace()
    self._tracing = False

  def _end_annotation(self) -> None:
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
      self._annotation = None
