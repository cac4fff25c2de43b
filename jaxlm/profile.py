"""A jax.profiler trace of a window of steps: on a schedule (config.profile) or on demand.

Traces go to <workdir>/tensorboard/plugins/profile/<time>/<host>.xplane.pb, where TensorBoard's
profile tab and xprof find them (`tensorboard --logdir=<workdir>/tensorboard`). On demand: a
file named PROFILE in the workdir (checked at most once a second, removed when the trace
starts) or SIGUSR1 to the process starts a window at the next step boundary, without a restart.
"""

import logging
import signal
import threading
import time

import jax

from jaxlm import paths
from jaxlm.loop import Hook

log = logging.getLogger('jaxlm')

ON_DEMAND_STEPS = 3  # The window of an on-demand trace when profile.num_steps is 0.


class Profiler(Hook):

  def __init__(self, options, workdir, chief=True):
    self.options = options  # config.profile
    self.enabled = chief or options.all_hosts
    self.log_dir = paths.join(workdir, 'tensorboard')
    self.trigger = paths.join(workdir, 'PROFILE')
    self.stop_at = None  # The step where the running trace ends; None = not tracing.
    self.signalled = False
    self._next_check = 0.0
    self._previous_handler = None

  def _handle(self, signum, frame):
    self.signalled = True

  def scheduled(self, step):
    o = self.options
    if not o.num_steps or step < o.start_step:
      return False
    return (step - o.start_step) % o.every_steps == 0 if o.every_steps else step == o.start_step

  def requested(self):
    """A SIGUSR1 or a PROFILE file since the last trace (the file read at most once a second)."""
    if self.signalled:
      self.signalled = False
      return True
    now = time.monotonic()
    if now < self._next_check:
      return False
    self._next_check = now + 1.0
    if not paths.exists(self.trigger):
      return False
    paths.remove(self.trigger)
    return True

  def start(self, summary, steps):
    jax.profiler.start_trace(self.log_dir)
    self.stop_at = summary.step + steps
    log.info('profiling steps %d-%d into %s', summary.step + 1, self.stop_at, self.log_dir)

  def stop(self, summary):
    jax.block_until_ready(summary.state)  # The trace holds the window's device work.
    jax.profiler.stop_trace()
    self.stop_at = None
    log.info('profile written under %s/plugins/profile (TensorBoard: profile tab)', self.log_dir)

  def on_start(self, summary):
    if not self.enabled:
      return
    if threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGUSR1, self._handle)
    if self.scheduled(summary.step):
      self.start(summary, self.options.num_steps)

  def on_step(self, summary):
    if not self.enabled:
      return
    if self.stop_at is not None and summary.step >= self.stop_at:
      self.stop(summary)
    if self.stop_at is None and summary.step < summary.total:
      if self.scheduled(summary.step):
        self.start(summary, self.options.num_steps)
      elif self.requested():
        self.start(summary, self.options.num_steps or ON_DEMAND_STEPS)

  def on_end(self, summary):
    if self.stop_at is not None:
      self.stop(summary)
    if self._previous_handler is not None:
      signal.signal(signal.SIGUSR1, self._previous_handler)
      self._previous_handler = None
