"""The training loop and its hooks: the main job's numbers against a stored reference, and
each hook alone."""

import json
import os

import pytest

from jaxlm import train
from conftest import one_device, tiny_config

REFERENCE = os.path.join(os.path.dirname(__file__), 'data', 'loss_reference.json')
KEYS = ('loss', 'grad_norm', 'learning_rate', 'eval_loss', 'eval_accuracy')


def _numbers(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [{k: r[k] for k in ('step',) + KEYS if k in r} for r in rows if set(KEYS) & set(r)]


def test_losses_are_bit_identical_to_the_reference(tmp_path, shared_data):
  """A 6-step run, then a resume to 10 steps (eval every 4, checkpoint every 3), on one CPU
  device: every logged loss, gradient norm and eval figure equals, bit for bit, what the
  trainer wrote before the loop was split into hooks (tests/data/loss_reference.json; set
  JAXLM_WRITE_REFERENCE=1 to rewrite it after an intended numerical change)."""
  common = dict(data__cache_dir=str(shared_data / 'data'),
                data__tokenizer=str(shared_data / 'tokenizer.model'), log_every_steps=1,
                eval_every_steps=4, checkpoint__save_every_steps=3)
  workdir = str(tmp_path)
  train.train(tiny_config(train_steps=6, **common), workdir, devices=one_device())
  train.train(tiny_config(train_steps=10, **common), workdir, devices=one_device())
  numbers = _numbers(workdir)
  if os.environ.get('JAXLM_WRITE_REFERENCE'):
    with open(REFERENCE, 'w') as f:
      json.dump(numbers, f, indent=0)
  with open(REFERENCE) as f:
    assert numbers == json.load(f)


# ------------------------------------------------------------------ each hook alone


import types

import numpy as np

from jaxlm import errors, hooks, loop as loop_lib


class Recorder:
  """A metrics.Writer that keeps its rows."""

  def __init__(self):
    self.rows = []

  def write(self, step, row):
    self.rows.append({'step': step, **row})


class FakeCheckpoints:
  def __init__(self):
    self.saved, self.waits, self.last_save_blocking_s, self.manager = [], 0, 0.0, None

  def latest_step(self):
    return self.saved[-1] if self.saved else None

  def save(self, step, state, batches, config):
    self.saved.append(step)

  def wait(self):
    self.waits += 1


def fake_loop(start=0, **overrides):
  config = tiny_config(**overrides)
  setup = types.SimpleNamespace(config=config, batch_sharding={})
  loop = loop_lib.Loop(setup, types.SimpleNamespace(params='params', extra={}), start, iter(()))
  return loop


def step_metrics(loss, nonfinite=0):
  return {'loss': np.float32(loss), 'grad_norm': np.float32(1.0),
          'learning_rate': np.float32(0.1), 'nonfinite': np.int32(nonfinite)}


def test_metrics_hook_writes_the_interval_mean_every_log_step():
  writer = Recorder()
  hook = hooks.Metrics(writer, num_devices=1, peak=1e12)
  loop = fake_loop(train_steps=5, log_every_steps=2)
  hook.on_start(loop)
  for step, loss in enumerate([4.0, 2.0, 3.0, 1.0, 7.0], 1):
    loop.step, loop.step_metrics, loop.row = step, step_metrics(loss), None
    hook.on_step(loop)
    assert (loop.row is not None) == (step in (2, 4, 5))
  hook.on_end(loop)
  assert [(r['step'], r['loss']) for r in writer.rows] == [(2, 3.0), (4, 2.0), (5, 7.0)]
  assert all(r['tokens_per_s'] > 0 and r['mfu'] > 0 for r in writer.rows)
  assert loop.result['loss'] == 7.0


def test_metrics_hook_averages_only_the_finite_steps():
  writer = Recorder()
  hook = hooks.Metrics(writer, num_devices=1, peak=1e12)
  loop = fake_loop(train_steps=2, log_every_steps=2)
  hook.on_start(loop)
  for step, (loss, bad) in enumerate([(2.0, 0), (float('nan'), 1)], 1):
    loop.step, loop.step_metrics = step, step_metrics(loss, bad)
    hook.on_step(loop)
  assert writer.rows[0]['loss'] == 2.0 and writer.rows[0]['nonfinite'] == 1


def test_evaluation_hook_runs_at_start_every_n_and_at_the_end():
  writer = Recorder()
  hook = hooks.Evaluation(lambda params, extra: {'eval_loss': 1.0, 'eval_perplexity': np.e,
                                                 'eval_accuracy': 0.5}, writer)
  loop = fake_loop(train_steps=6, eval_every_steps=2)
  hook.on_start(loop)
  for loop.step in range(1, 7):
    hook.on_step(loop)
  hook.on_end(loop)
  assert [r['step'] for r in writer.rows] == [0, 2, 4, 6]
  assert loop.result['initial_eval_perplexity'] == np.e


def test_evaluation_hook_skips_the_final_eval_after_a_preemption():
  writer = Recorder()
  hook = hooks.Evaluation(lambda params, extra: {'eval_loss': 1.0, 'eval_perplexity': 1.0,
                                                 'eval_accuracy': 1.0}, writer)
  loop = fake_loop(start=3, train_steps=6, eval_every_steps=0)
  hook.on_start(loop)  # A resumed run: no step-0 evaluation.
  loop.stop = True
  hook.on_end(loop)
  assert writer.rows == []


def test_checkpointing_hook_saves_every_n_once_and_at_the_end():
  checkpoints = FakeCheckpoints()
  hook = hooks.Checkpointing(checkpoints)
  loop = fake_loop(train_steps=7, checkpoint__save_every_steps=3)
  for loop.step in range(1, 8):
    hook.on_step(loop)
  hook.on_end(loop)
  loop.step = 7
  hook.save(loop)  # Already saved: not again.
  assert checkpoints.saved == [3, 6, 7] and checkpoints.waits == 1
  assert loop.result['step'] == 7


def test_nonfinite_hook_skips_with_a_warning_or_saves_and_stops(caplog):
  checkpoints = FakeCheckpoints()
  loop = fake_loop(nonfinite='skip')
  loop.step, loop.row = 4, {'nonfinite': 2}
  hooks.NonFinite(hooks.Checkpointing(checkpoints)).on_step(loop)
  assert '2 step(s) before step 4' in caplog.text and checkpoints.saved == []
  loop = fake_loop(nonfinite='stop')
  loop.step, loop.row = 4, {'nonfinite': 2}
  with pytest.raises(errors.RunError, match='saved as checkpoint 4'):
    hooks.NonFinite(hooks.Checkpointing(checkpoints)).on_step(loop)
  assert checkpoints.saved == [4] and checkpoints.waits == 1


def test_preemption_hook_saves_and_stops_the_loop_at_the_signalled_step():
  checkpoints = FakeCheckpoints()
  watcher = types.SimpleNamespace(reached=lambda step, manager: step == 3)
  hook = hooks.Preemption(watcher, hooks.Checkpointing(checkpoints))
  loop = fake_loop()
  for loop.step in (1, 2, 3):
    hook.on_step(loop)
  assert loop.stop and checkpoints.saved == [3]
  assert loop.result['step'] == 3 and loop.result['preempted']


def test_loop_calls_hooks_in_order_and_stops_when_one_asks():
  calls = []

  class Spy(loop_lib.Hook):
    def __init__(self, name, stop_at=None):
      self.name, self.stop_at = name, stop_at

    def on_start(self, loop):
      calls.append((self.name, 'start'))

    def on_step(self, loop):
      calls.append((self.name, loop.step))
      loop.stop = loop.step == self.stop_at

    def on_end(self, loop):
      calls.append((self.name, 'end'))

  loop = fake_loop(train_steps=5)
  loop.batches = iter([{}] * 5)
  result = loop_lib.run_loop(loop, lambda state, batch: (state, {}),
                             [Spy('a', stop_at=2), Spy('b')])
  assert calls == [('a', 'start'), ('b', 'start'), ('a', 1), ('b', 1), ('a', 2),
                   ('a', 'end'), ('b', 'end')]
  assert result is loop.result and loop.step == 2


def test_goodput_hook_counts_redone_steps_and_writes_shares_that_sum_to_one(tmp_path):
  from jaxlm import goodput
  metrics_path = tmp_path / 'metrics.jsonl'
  metrics_path.write_text('{"step": 0, "eval_loss": 6.0}\n{"step": 8, "loss": 5.0}\n{"step"')
  writer = Recorder()
  hook = goodput.Goodput(writer, str(metrics_path))
  loop = fake_loop(start=4, train_steps=12)
  hook.on_start(loop)
  assert loop.redo_until == 8 and hook.redone == 4
  loop.clock.add('step', 1.0)
  loop.clock.add('data_wait', 0.5)
  loop.step, loop.row, loop.step_times = 9, {'loss': 1.0}, [0.1, 0.2, 0.3]
  hook.on_step(loop)
  row = writer.rows[-1]
  assert sum(row[f'goodput/{b}'] for b in goodput.BUCKETS) == pytest.approx(1.0)
  assert row['goodput/step_s'] == 1.0 and row['goodput/data_wait_s'] == 0.5
  assert row['goodput/redone_steps'] == 4 and row['step_time/max_s'] == 0.3
  assert loop.step_times == []  # The spread is per log interval.
  assert loop.step_bucket() == 'step'
  loop.step = 8
  assert loop.step_bucket() == 'restart_lost' and fake_loop().step_bucket() == 'step'


def test_profile_hook_starts_a_window_on_sigusr1(tmp_path):
  import signal
  from jaxlm import profile
  hook = profile.Profiler(tiny_config().profile, str(tmp_path))
  loop = types.SimpleNamespace(step=0, step_metrics=np.zeros(()),
                               config=types.SimpleNamespace(train_steps=10))
  hook.on_start(loop)
  os.kill(os.getpid(), signal.SIGUSR1)
  loop.step = 1
  hook.on_step(loop)
  assert hook.stop_at == 1 + profile.ON_DEMAND_STEPS
  hook.on_end(loop)
  assert hook.stop_at is None
  assert signal.getsignal(signal.SIGUSR1) is not hook._handle  # The old handler is back.
