"""What the training loop (jaxlm/loop.py) does besides stepping, one hook per job.

Metrics (progress bar, log lines, tokens/s, MFU), evaluation, the non-finite policy,
preemption and when to checkpoint; and `Saver`, which writes the checkpoints the hooks ask for.
Each hook takes what it needs in its constructor and sees only the loop's read-only
`Summary`, so it can be tested alone with a stand-in one.
"""

import logging

import jax

from jaxlm import errors, flops, metrics
from jaxlm.loop import SAVE, SAVE_LOCAL, Ask, Hook  # noqa: F401 - SAVE: tests compare with it.

log = logging.getLogger('jaxlm')


class Metrics(Hook):
  """At every log step (every `log_every_steps`, and the last): one row of the interval's mean
  loss and gradient norm (the loop's), tokens/s and MFU to metrics.jsonl, TensorBoard and the
  progress bar."""

  timed_as = 'step'  # Its time is the wait for the device to finish the interval's steps.

  def __init__(self, writer, num_devices, peak=None):
    self.writer = writer
    self.num_devices = num_devices
    self.peak = peak
    self.row = {}

  def on_start(self, summary):
    self.tokens = self.flops = 0  # Since the last row; a length phase changes them per step.
    if self.peak is None:
      self.peak, source = flops.device_peak_flops()
      log.info('MFU is relative to %.4g TFLOP/s per device (%s)', self.peak / 1e12, source)
    self.bar = metrics.progress(summary.total, summary.start, enabled=jax.process_index() == 0)

  def on_step(self, summary):
    phase = summary.phase  # The current length phase's rows.
    self.tokens += phase.tokens_per_step
    self.flops += phase.tokens_per_step * phase.flops_per_token
    self.bar.update(1)
    if summary.logged is None:
      return
    row = dict(summary.logged)
    row['tokens_per_s'] = self.tokens / summary.interval_s
    row['tflops_per_device'] = self.flops / summary.interval_s / self.num_devices / 1e12
    row['mfu'] = flops.mfu(row['tokens_per_s'], self.flops / self.tokens, self.num_devices,
                           self.peak)
    self.writer.write(summary.step, row)
    self.bar.set_postfix(loss=f'{row["loss"]:.3f}', tok_s=f'{row["tokens_per_s"]:,.0f}')
    if self.bar.disable:  # No bar on screen: say it in the log.
      log.info('step %d: loss %.4f, %.0f tokens/s, MFU %.1f%%', summary.step, row['loss'],
               row['tokens_per_s'], 100 * row['mfu'])
    self.row = row
    self.tokens = self.flops = 0

  def on_end(self, summary):
    self.bar.close()

  def result(self):
    return self.row


class Evaluation(Hook):
  """Held-out metrics (the current phase's, phase_build.Phase.evaluate) before the first
  step of a fresh run, every `every` steps (0: never between), and at the end of a run that
  trained (not after a preemption)."""

  timed_as = 'eval'

  def __init__(self, writer, every):
    self.writer, self.every = writer, every
    self.row = {}

  def evaluate(self, summary, step):
    row = summary.phase.evaluate(summary.state.params, summary.state.extra)
    self.writer.write(step, row)
    log.info('step %d: eval loss %.4f, perplexity %.2f, accuracy %.4f%s', step,
             row['eval_loss'], row['eval_perplexity'], row['eval_accuracy'],
             f", {row['eval_bits_per_byte']:.4f} bits/byte" if 'eval_bits_per_byte' in row else '')
    self.row.update(row)
    return row

  def on_start(self, summary):
    if summary.start == 0:
      self.row['initial_eval_perplexity'] = self.evaluate(summary, 0)['eval_perplexity']

  def on_step(self, summary):
    if self.every and summary.step % self.every == 0 and summary.step != summary.total:
      self.evaluate(summary, summary.step)

  def on_end(self, summary):
    if summary.start < summary.total and not summary.stopped:
      self.evaluate(summary, summary.total)

  def result(self):
    return self.row


class Checkpointing(Hook):
  """Asks for a save every `every` steps and at the end of each length phase (a resume never
  repeats a phase's last steps), and for a local one every `local_every` (0: never) between;
  the loop saves the last step itself."""

  def __init__(self, every, local_every=0):
    self.every, self.local_every = every, local_every

  def on_step(self, summary):
    local = bool(self.local_every) and summary.step % self.local_every == 0
    if summary.step % self.every == 0 or summary.step == summary.phase.end:
      return Ask(save=True, save_local=local)  # The local copy first: it is the quick one.
    return SAVE_LOCAL if local else None


class Saver:
  """Writes the checkpoints the hooks ask for (the loop calls it, it is no hook): the state of
  a step once, asynchronously, with the data position of the phase's iterator; to `local`
  too (a local-tier checkpoint.Checkpointer, or None) where asked."""

  def __init__(self, checkpoints, config, local=None):
    self.checkpoints, self.config, self.local = checkpoints, config, local
    self.blocking_s = None  # The longest the loop waited for a save to start.

  def save_local(self, summary):
    if self.local is not None and summary.step != self.local.latest_step():
      # Never while a workdir save is being written: Orbax (0.12.8) mixes up two managers'
      # concurrent saves across processes (seen: a commit before a peer's files existed).
      self.checkpoints.wait()
      self.local.save(summary.step, summary.state, None, self.config)

  def save(self, summary):
    """Saves the state of the steps done (once: a step already saved is not saved again)."""
    step = summary.step
    if self.local is not None:  # A preempted run's local copy is complete before this starts.
      self.local.wait()
    if step != self.checkpoints.latest_step():
      self.checkpoints.save(step, summary.state, summary.phase.batches, self.config)
      blocking = self.checkpoints.last_save_blocking_s
      log.debug('checkpoint %d: the loop waited %.3f s', step, blocking)
      self.blocking_s = max(self.blocking_s or 0.0, blocking)

  def poll(self):
    """After each step: completes a local save that has finished meanwhile."""
    if self.local is not None:
      self.local.poll()

  def wait(self):
    self.checkpoints.wait()
    if self.local is not None:
      self.local.wait()

  def result(self):
    return {} if self.blocking_s is None else {'checkpoint_blocking_s': self.blocking_s}


class NonFinite(Hook):
  """After a log step that counted non-finite steps (whose updates were never applied): warn
  and go on (policy 'skip', config.nonfinite), or ask to save the good state and fail
  ('stop')."""

  timed_as = 'checkpoint'

  def __init__(self, policy):
    self.policy = policy
    self.logged, self.trained = None, False  # The last log step; a finite step since start.

  def on_step(self, summary):
    count = summary.logged['nonfinite'] if summary.logged else 0
    if summary.logged:
      since = summary.step - (summary.start if self.logged is None else self.logged)
      self.trained = self.trained or count < since
      self.logged = summary.step
    if not count:
      return None
    if not self.trained:  # 'skip' would run to the end having trained nothing, exit 0.
      raise errors.RunError(
          f'every step of this run so far ({summary.start}-{summary.step}) had a non-finite loss '
          f'or gradient: nothing is being trained; lower optimizer.learning_rate (or check '
          f'init_from and the data)')
    if self.policy == 'skip':
      log.warning('%d step(s) before step %d had a non-finite loss or gradient; their updates '
                  'were skipped', count, summary.step)
      return None
    return Ask(save=True, error=errors.RunError(
        f'{count} step(s) before step {summary.step} had a non-finite loss or gradient '
        f'(nonfinite=stop); the last good state is saved as checkpoint {summary.step}; lower '
        f'optimizer.learning_rate or set nonfinite=skip, then run the same command to resume'))


class Preemption(Hook):
  """When the scheduler's SIGTERM arrives (jaxlm/preemption.py): ask to save the state at this
  step boundary - to the local tier first (seconds), then to the workdir (minutes at pod
  scale: the grace period may end before it does) - and stop the run."""

  timed_as = 'checkpoint'

  def __init__(self, watcher, checkpoint_manager):
    self.watcher, self.checkpoint_manager = watcher, checkpoint_manager
    self.preempted = False

  def on_step(self, summary):
    if self.watcher.reached(summary.step, self.checkpoint_manager):
      log.warning('preempted: saving the checkpoint of step %d and stopping', summary.step)
      self.preempted = True
      return Ask(save=True, save_local=True, stop=True)
    return None

  def result(self):
    return {'preempted': True} if self.preempted else {}
