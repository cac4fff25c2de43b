"""What the training loop (jaxlm/loop.py) does besides stepping, one hook per job.

Metrics (progress bar, log lines, tokens/s, MFU), evaluation, checkpointing, the non-finite
policy and preemption. Each takes what it needs in its constructor, so it can be tested alone
with a stand-in `Loop`.
"""

import logging
import time

import jax
import numpy as np

from jaxlm import errors, flops, metrics
from jaxlm.loop import Hook

log = logging.getLogger('jaxlm')


def interval_row(values):
  """One metrics row for the steps since the last one: means over the steps that were finite
  (the others applied no update), the last learning rate, and how many were not finite."""
  finite = [v for v in values if not v['nonfinite']] or values
  row = {key: float(np.mean([v[key] for v in finite])) for key in values[0]}
  row['learning_rate'] = float(values[-1]['learning_rate'])
  row['nonfinite'] = int(sum(v['nonfinite'] for v in values))
  return row


class Metrics(Hook):
  """Every `log_every_steps` (and at the last step): one row of the interval's mean loss and
  gradient norm, tokens/s and MFU to metrics.jsonl, TensorBoard and the progress bar.

  The steps' metrics stay on the device until the log step, so the host never waits for a
  step in between and the device always has the next one queued.
  """

  bucket = None  # Its time is the wait for the device to finish the interval's steps.

  def __init__(self, writer, num_devices, peak=None):
    self.writer = writer
    self.num_devices = num_devices
    self.peak = peak
    self.pending = []

  def on_start(self, loop):
    config = loop.config
    self.tokens = self.flops = 0  # Since the last row; a length phase changes them per step.
    self.shape = None
    if self.peak is None:
      self.peak, source = flops.device_peak_flops()
      log.info('MFU is relative to %.4g TFLOP/s per device (%s)', self.peak / 1e12, source)
    self.bar = metrics.progress(config.train_steps, loop.start,
                                enabled=jax.process_index() == 0)

  def on_step(self, loop):
    self.pending.append(loop.step_metrics)  # Device arrays: no host sync until the log step.
    shape = loop.setup.config  # The current length phase's rows.
    if shape is not self.shape:
      self.shape, self.flops_per_token = shape, flops.of_run(shape)
    self.tokens += shape.batch_size * shape.model.max_len
    self.flops += shape.batch_size * shape.model.max_len * self.flops_per_token
    self.bar.update(1)
    done, config = loop.step, loop.config
    if done % config.log_every_steps and done != config.train_steps:
      return
    row = interval_row(jax.device_get(self.pending))
    elapsed = time.perf_counter() - loop.interval_start
    row['tokens_per_s'] = self.tokens / elapsed
    row['tflops_per_device'] = self.flops / elapsed / self.num_devices / 1e12
    row['mfu'] = flops.mfu(row['tokens_per_s'], self.flops / self.tokens, self.num_devices,
                           self.peak)
    self.writer.write(done, row)
    self.bar.set_postfix(loss=f'{row["loss"]:.3f}', tok_s=f'{row["tokens_per_s"]:,.0f}')
    if self.bar.disable:  # No bar on screen: say it in the log.
      log.info('step %d: loss %.4f, %.0f tokens/s, MFU %.1f%%', done, row['loss'],
               row['tokens_per_s'], 100 * row['mfu'])
    loop.result.update(row)
    loop.row = row
    self.pending, self.tokens, self.flops = [], 0, 0

  def on_end(self, loop):
    self.bar.close()


class Evaluation(Hook):
  """Held-out metrics before the first step (of a fresh run), every `eval_every_steps`, and at
  the end of a run that trained (not after a preemption)."""

  bucket = 'eval'

  def __init__(self, run_eval, writer):
    self.run_eval = run_eval  # params -> {'eval_loss': ..., ...}
    self.writer = writer

  def evaluate(self, loop, step):
    row = self.run_eval(loop.state.params)
    self.writer.write(step, row)
    log.info('step %d: eval loss %.4f, perplexity %.2f, accuracy %.4f%s', step,
             row['eval_loss'], row['eval_perplexity'], row['eval_accuracy'],
             f", {row['eval_bits_per_byte']:.4f} bits/byte" if 'eval_bits_per_byte' in row else '')
    loop.result.update(row)
    return row

  def on_start(self, loop):
    if loop.start == 0:
      loop.result['initial_eval_perplexity'] = self.evaluate(loop, 0)['eval_perplexity']

  def on_step(self, loop):
    every, done = loop.config.eval_every_steps, loop.step
    if every and done % every == 0 and done != loop.config.train_steps:
      self.evaluate(loop, done)

  def on_end(self, loop):
    if loop.start < loop.config.train_steps and not loop.stop:
      self.evaluate(loop, loop.config.train_steps)


class Checkpointing(Hook):
  """Saves every `checkpoint.save_every_steps` and at the end, and waits for the last save."""

  bucket = 'checkpoint'

  def __init__(self, checkpoints):
    self.checkpoints = checkpoints

  def save(self, loop):
    """Saves the state of the steps done (once: a step already saved is not saved again)."""
    step = loop.step
    if step != self.checkpoints.latest_step():
      self.checkpoints.save(step, loop.state, loop.batches, loop.config)
      blocking = self.checkpoints.last_save_blocking_s
      log.debug('checkpoint %d: the loop waited %.3f s', step, blocking)
      loop.result['checkpoint_blocking_s'] = max(loop.result.get('checkpoint_blocking_s', 0.0),
                                                 blocking)

  def on_step(self, loop):
    if loop.step % loop.config.checkpoint.save_every_steps == 0:
      self.save(loop)

  def on_end(self, loop):
    self.save(loop)
    self.checkpoints.wait()
    loop.result['step'] = loop.step


class LengthPhases(Hook):
  """At the end of a length phase that does not end the run (jaxlm/phases.py): save the
  state, then enter the next phase (its rows packed, its step compiled), so that the next step
  runs at the new length. A resumed run starts in its step's phase (train.py)."""

  bucket = 'compile'

  def __init__(self, stages, checkpointing):
    self.stages = stages  # run.Phases
    self.checkpointing = checkpointing

  def on_step(self, loop):
    if loop.step == self.stages.current.end and loop.step < loop.config.train_steps:
      self.checkpointing.save(loop)  # A resume never repeats the phase's last steps.
      phase = self.stages.enter(loop.step)
      loop.setup, loop.batches, loop.train_step = phase.setup, phase.batches, phase.train_step


class NonFinite(Hook):
  """After a log step that counted non-finite steps (whose updates were never applied): warn
  and go on (nonfinite='skip'), or save the good state and stop with an error ('stop')."""

  bucket = 'checkpoint'

  def __init__(self, checkpointing):
    self.checkpointing = checkpointing
    self.logged, self.trained = None, False  # The last log step; a finite step since start.

  def on_step(self, loop):
    count = loop.row['nonfinite'] if loop.row else 0
    if loop.row:
      since = loop.step - (loop.start if self.logged is None else self.logged)
      self.trained = self.trained or count < since
      self.logged = loop.step
    if not count:
      return
    if not self.trained:  # 'skip' would run to the end having trained nothing, exit 0.
      raise errors.RunError(
          f'every step of this run so far ({loop.start}-{loop.step}) had a non-finite loss or '
          f'gradient: nothing is being trained; lower optimizer.learning_rate (or check '
          f'init_from and the data)')
    if loop.config.nonfinite == 'skip':
      log.warning('%d step(s) before step %d had a non-finite loss or gradient; their updates '
                  'were skipped', count, loop.step)
      return
    self.checkpointing.save(loop)
    self.checkpointing.checkpoints.wait()
    raise errors.RunError(
        f'{count} step(s) before step {loop.step} had a non-finite loss or gradient '
        f'(nonfinite=stop); the last good state is saved as checkpoint {loop.step}; lower '
        f'optimizer.learning_rate or set nonfinite=skip, then run the same command to resume')


class Preemption(Hook):
  """When the scheduler's SIGTERM arrives (jaxlm/preemption.py): save the state at this step
  boundary and stop the run."""

  bucket = 'checkpoint'

  def __init__(self, watcher, checkpointing):
    self.watcher = watcher
    self.checkpointing = checkpointing

  def on_step(self, loop):
    if self.watcher.reached(loop.step, self.checkpointing.checkpoints.manager):
      log.warning('preempted: saving the checkpoint of step %d and stopping', loop.step)
      self.checkpointing.save(loop)
      self.checkpointing.checkpoints.wait()
      loop.result.update(step=loop.step, preempted=True)
      loop.stop = True
