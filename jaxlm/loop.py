"""The training loop: one compiled step per batch; everything periodic is a hook.

`Loop.run(phase, state)` runs one length phase's steps (jaxlm/phase_build.py: its compiled
step and its batches, positioned at its first step) until the phase ends; train.py walks the
phases, then `Loop.end` saves, waits and returns the run's result. After every step each hook
sees a read-only `Summary` - the steps done, the state, the step's metrics, at a log step the
interval's means, and the seconds spent so far - and may return an `Ask`: save the state, stop
the run, or fail once the save is done. No hook changes the loop (Levanter's hooks observe a
StepInfo the same way; timings as Flax lm1b's report_progress keeps them). The hooks
themselves live in jaxlm/hooks.py, jaxlm/goodput.py and jaxlm/profile.py.

The loop keeps one step in flight: it waits for step n-1 after queuing step n, so the host
never idles the device, and the steps' metrics stay on the device until a log step, when the
interval's are fetched at once (one host sync per `log_every` steps). It times the wait for
each batch (`data_wait`), the steps (`step`) and each hook (by the hook's `timed_as`), and
hands the totals to the hooks: what they mean (goodput) is a hook's business.
"""

import dataclasses
import logging
import time
import types

import jax
import numpy as np

from jaxlm import mesh as mesh_lib

log = logging.getLogger('jaxlm')


@dataclasses.dataclass(frozen=True)
class Ask:
  """What a hook may ask after a step: save the state of this step (once) to the workdir, or to
  the host-local tier (jaxlm/tiers.py; first, when both), stop the run after this step, or
  raise `error` once the save is complete."""
  save: bool = False
  save_local: bool = False
  stop: bool = False
  error: Exception = None


SAVE = Ask(save=True)
SAVE_LOCAL = Ask(save_local=True)


@dataclasses.dataclass(frozen=True)
class Summary:
  """What a hook sees: read-only."""
  step: int  # Steps done.
  start: int  # This process's first step.
  total: int  # The step count the run ends at (config.train_steps).
  state: object  # The train state after `step` steps (device arrays).
  phase: object  # The phase being run (phase_build.Phase): its end, batches, evaluation.
  seconds: types.MappingProxyType  # Seconds spent by kind since the loop began, kept current.
  metrics: dict = None  # This step's metrics, device arrays; None at the start and end.
  logged: dict = None  # At a log step: the interval's means (`interval_row`), on the host.
  interval_s: float = None  # At a log step: the seconds the interval's steps took.
  step_s: float = None  # Seconds between the last two finished steps, hooks' time excluded.
  stopped: bool = False  # At the end: a hook stopped the run.


class Hook:
  """Observes the run: `on_start` before the first step, `on_step` after each (it may return
  an Ask), `on_end` after the last; `result()` is its part of what train returns.
  `timed_as`: what its time counts as in Summary.seconds ('step' for a hook whose time is the
  device finishing steps, like the metrics hook's wait for the losses)."""
  timed_as = 'other'

  def on_start(self, summary):
    pass

  def on_step(self, summary):
    return None

  def on_end(self, summary):
    pass

  def result(self):
    return {}


def interval_row(values):
  """One metrics row for the steps since the last one: means over the steps that were finite
  (the others applied no update), the last learning rate, and how many were not finite."""
  finite = [v for v in values if not v['nonfinite']] or values
  row = {key: float(np.mean([v[key] for v in finite])) for key in values[0]}
  row['learning_rate'] = float(values[-1]['learning_rate'])
  row['nonfinite'] = int(sum(v['nonfinite'] for v in values))
  return row


class Loop:
  """Steps `start`..`total` phase by phase, calling `hooks` (in order) around them; `saver`
  fulfils their asks to save (hooks.Saver: `save(summary)`, `save_local(summary)`, `poll()`
  after each step, `wait()`, `result()`)."""

  def __init__(self, hooks, saver, start, total, log_every):
    self.hooks, self.saver = hooks, saver
    self.start = self.step = start
    self.total, self.log_every = total, log_every
    self.stopped = False
    self._seconds = {'data_wait': 0.0, 'step': 0.0}
    self._started = False
    self._pending = []  # The interval's step metrics: device arrays until the log step.
    self._previous = self._last_ready = None  # The last step's metrics (in flight); when n-1
    self._interval_start = self._paused = None  # ended; where the interval's time began.

  def summary(self, state, phase, **fields):
    return Summary(self.step, self.start, self.total, state, phase,
                   types.MappingProxyType(self._seconds), **fields)

  def run(self, phase, state):
    """Runs steps from the current one until `phase.end` (or a hook's stop); returns the
    state. The first call starts the hooks."""
    if not self._started:
      self._started = True
      self._call_all('on_start', self.summary(state, phase))
      if self.start >= self.total:
        log.info('the run in this workdir is complete (step %d)', self.start)
      self._interval_start = time.perf_counter()  # The start's evaluation is not step time.
    elif self._paused is not None:  # Building the phase (outside the loop) is not step time.
      paused = time.perf_counter() - self._paused
      self._interval_start += paused
      if self._last_ready is not None:
        self._last_ready += paused
    for step in range(self.step, min(phase.end, self.total)):
      begin = time.perf_counter()
      # A step marker in profiler traces: xprof's overview and step-time graph count steps by it.
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = mesh_lib.to_device(next(phase.batches), phase.batch_sharding)
        queued = time.perf_counter()
        state, metrics = phase.train_step(state, batch)
      self.step, step_s = step + 1, None
      if self._previous is not None:  # Step n is queued: waiting for n-1 leaves the device busy.
        jax.block_until_ready(self._previous)
        ready = time.perf_counter()
        if self._last_ready is not None:
          step_s = ready - self._last_ready
        self._last_ready = ready
      self._previous = metrics
      self._pending.append(metrics)
      logged = interval_s = None
      if self.step % self.log_every == 0 or self.step == self.total:
        logged = interval_row(jax.device_get(self._pending))
        self._pending = []
        interval_s = time.perf_counter() - self._interval_start
      self._seconds['data_wait'] += queued - begin
      self._seconds['step'] += time.perf_counter() - queued
      self._after_step(self.summary(state, phase, metrics=metrics, logged=logged,
                                    interval_s=interval_s, step_s=step_s))
      self.saver.poll()
      if self.stopped:
        break
      if logged is not None:
        self._interval_start = time.perf_counter()  # Eval and checkpoint time is not step time.
    self._paused = time.perf_counter()
    return state

  def end(self, state, phase):
    """After the last step: saves the state (if not yet saved), waits for every save, ends the
    hooks; returns what train returns (the hooks' results, the steps done)."""
    summary = self.summary(state, phase, stopped=self.stopped)
    begin = time.perf_counter()
    self.saver.save(summary)
    self.saver.wait()
    self._add('checkpoint', time.perf_counter() - begin)
    self._call_all('on_end', summary)
    result = {}
    for part in (*self.hooks, self.saver):
      result.update(part.result())
    result['step'] = self.step
    return result

  def _after_step(self, summary):
    """Each hook's on_step, and what it asks, in order; a stop skips the hooks after it."""
    for hook in self.hooks:
      begin = time.perf_counter()
      ask = hook.on_step(summary)
      self._spent(hook.timed_as, time.perf_counter() - begin)
      if ask is None:
        continue
      begin = time.perf_counter()
      if ask.save_local:
        self.saver.save_local(summary)
      if ask.save:
        self.saver.save(summary)
      if ask.error is not None:
        self.saver.wait()
        raise ask.error
      self._spent('checkpoint', time.perf_counter() - begin)
      if ask.stop:
        self.stopped = True
        return

  def _spent(self, kind, seconds):
    self._add(kind, seconds)
    if kind != 'step' and self._last_ready is not None:
      self._last_ready += seconds  # Eval and checkpoint time is not a step's time.

  def _call_all(self, method, summary):
    for hook in self.hooks:  # Only a step's own wait for the device is step time.
      begin = time.perf_counter()
      getattr(hook, method)(summary)
      kind = hook.timed_as if hook.timed_as != 'step' else 'other'
      self._add(kind, time.perf_counter() - begin)

  def _add(self, kind, seconds):
    self._seconds[kind] = self._seconds.get(kind, 0.0) + seconds
