"""The training loop: one compiled step per batch; everything periodic is a hook.

A hook is an object with `on_start(loop)`, `on_step(loop)` (after every step, in the order the
hooks are given) and `on_end(loop)`; `Hook` has no-op defaults. Hooks see and change the
`Loop`: the state, the steps done, the row of metrics logged at this step, the result to return,
and `stop`, which ends the run after the current step (preemption); at a step boundary a hook
may also replace `setup`, `batches` and `train_step` (a length phase, jaxlm/phases.py). The
hooks themselves live in jaxlm/hooks.py, jaxlm/goodput.py and jaxlm/profile.py.

The loop adds every second to a goodput bucket (jaxlm/goodput.py): the wait for the next batch,
the step, and each hook's time to the hook's `bucket` (None: the step's own bucket, for a hook
whose time is the device finishing steps, like the metrics hook's wait for the losses).
"""

import logging
import time

import jax

from jaxlm import run as run_lib

log = logging.getLogger('jaxlm')


class Hook:
  bucket = 'other'

  def on_start(self, loop):
    pass

  def on_step(self, loop):
    pass

  def on_end(self, loop):
    pass


class Loop:
  """What the hooks share: the run's setup, its state and step, and what it has logged."""

  def __init__(self, s, state, start, batches, clock=None, step_setup=None):
    self.config = s.config  # The run's config.
    # The setup the steps now run with: the run's, or its current length phase's (whose
    # config.model.max_len is the phase's row length; run.Phases).
    self.setup = step_setup or s
    self.train_step = None  # The compiled step (set by run_loop; a hook may replace it).
    self.state = state
    self.start = self.step = start  # The first step of this process, then the steps done.
    self.batches = batches  # The data iterator (checkpointed with the state).
    self.step_metrics = None  # The last step's metrics: device arrays, not yet on the host.
    self.row = None  # The metrics row written at this step, if it was a log step.
    self.result = {}  # What `train` returns: the last logged and eval metrics.
    self.stop = False  # Set by a hook to end the run after this step.
    self.interval_start = time.perf_counter()  # Where the current log interval's time began.
    if clock is None:
      from jaxlm import goodput  # Here: goodput's hook subclasses this module's Hook.
      clock = goodput.Clock()
    self.clock = clock  # Seconds per goodput bucket.
    self.redo_until = 0  # Steps up to this one were done before a restart (goodput hook).
    self.step_times = []  # Seconds between finished steps, since the goodput hook's last row.

  def step_bucket(self):
    return 'restart_lost' if self.start < self.step <= self.redo_until else 'step'


def _call(loop, hook, method):
  begin = time.perf_counter()
  getattr(hook, method)(loop)
  spent = time.perf_counter() - begin
  loop.clock.add(hook.bucket or (loop.step_bucket() if method == 'on_step' else 'other'), spent)
  return spent if hook.bucket else 0.0


def run_loop(loop, train_step, hooks):
  """Runs steps `loop.start`..config.train_steps (or until a hook stops it); returns the result."""
  loop.clock.claim_rest('startup')  # Everything before the loop that no bucket claimed.
  loop.train_step = train_step
  for hook in hooks:
    _call(loop, hook, 'on_start')
  if loop.start >= loop.config.train_steps:
    log.info('the run in this workdir is complete (step %d)', loop.start)
  loop.interval_start = time.perf_counter()  # The start's evaluation is not step time.
  previous, last_ready = None, None  # The last step's metrics (in flight); when n-1 ended.
  for step in range(loop.start, loop.config.train_steps):
    begin = time.perf_counter()
    # A step marker in profiler traces: xprof's overview and step-time graph count steps by it.
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      batch = run_lib.to_device(next(loop.batches), loop.setup.batch_sharding)
      queued = time.perf_counter()
      loop.state, loop.step_metrics = loop.train_step(loop.state, batch)
    loop.step, loop.row = step + 1, None
    if previous is not None:  # Step n is queued: waiting for n-1 leaves the device busy.
      jax.block_until_ready(previous)
      ready = time.perf_counter()
      if last_ready is not None:
        loop.step_times.append(ready - last_ready)
      last_ready = ready
    previous = loop.step_metrics
    loop.clock.add('data_wait', queued - begin)
    loop.clock.add(loop.step_bucket(), time.perf_counter() - queued)
    for hook in hooks:
      off_step = _call(loop, hook, 'on_step')
      if last_ready is not None:
        last_ready += off_step  # Eval and checkpoint time is not a step's time.
      if loop.stop:
        break
    if loop.stop:
      break
    if loop.row is not None:
      loop.interval_start = time.perf_counter()  # Eval and checkpoint time is not step time.
  for hook in hooks:
    _call(loop, hook, 'on_end')
  return loop.result
