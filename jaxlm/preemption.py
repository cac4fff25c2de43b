"""Preemption: TPU and cluster schedulers send SIGTERM some seconds before they kill a job.

One process catches SIGTERM itself and stops at the next step boundary. Several processes
use the jax.distributed preemption service (it owns SIGTERM there) through orbax, which makes
every process agree on the same step to stop at.
"""

import signal

import jax


class Watcher:
  """`watcher.reached(step, manager)` is True at the step where the run should save and stop."""

  def __init__(self):
    self.signalled = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signalled = True

  def reached(self, step, checkpoint_manager):
    if jax.process_count() > 1:
      return checkpoint_manager.reached_preemption(step)
    return self.signalled

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False
