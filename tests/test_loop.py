"""The training loop and its hooks: the main job's numbers against a stored reference, and
each hook alone."""

import json
import os

import pytest

from jaxlm import train
from helpers import one_device, tiny_config

REFERENCE = os.path.join(os.path.dirname(__file__), 'data', 'loss_reference.json')
KEYS = ('loss', 'grad_norm', 'learning_rate', 'eval_loss', 'eval_accuracy')


def _numbers(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [{k: r[k] for k in ('step',) + KEYS if k in r} for r in rows if set(KEYS) & set(r)]


def test_losses_equal_the_stored_reference(tmp_path, shared_data):
  """A 6-step run, then a resume to 10 steps (eval every 4, checkpoint every 3), on one CPU
  device: every logged loss, gradient norm and eval figure equals what the trainer wrote
  before the loop was split into hooks (tests/data/loss_reference.json; set
  JAXLM_WRITE_REFERENCE=1 to rewrite it after an intended numerical change).

  Bit for bit on the CPU that wrote it; XLA vectorises reductions for the host's instruction
  set (an AVX-512 host sums in another order than an AVX2 one), which moves the last bits
  (1e-7 relative seen), so other hosts compare to 1e-6. A changed computation moves them by
  orders of magnitude more; bench/step_fingerprint.py checks refactors for an identical
  optimized HLO."""
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
    reference = json.load(f)
  assert [sorted(r) for r in numbers] == [sorted(r) for r in reference]
  for got, want in zip(numbers, reference):
    assert got == pytest.approx(want, rel=1e-6, abs=0), got['step']


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
    self.saved, self.waits, self.last_save_blocking_s = [], 0, 0.25

  def latest_step(self):
    return self.saved[-1] if self.saved else None

  def save(self, step, state, batches, config):
    self.saved.append(step)

  def wait(self):
    self.waits += 1


def fake_phase(end=10, evaluate=None, **fields):
  """A stand-in phase_build.Phase: one step per batch of 8 x 64 tokens."""
  fields = {'batches': iter(()), **fields}
  return types.SimpleNamespace(end=end, tokens_per_step=512, flops_per_token=1e6,
                               batch_sharding={}, evaluate=evaluate, **fields)


def summary(step=0, start=0, total=10, phase=None, seconds=None, **fields):
  """A loop.Summary as hooks see it."""
  return loop_lib.Summary(step, start, total, types.SimpleNamespace(params='params', extra={}),
                          phase or fake_phase(total), types.MappingProxyType(seconds or {}),
                          **fields)


def step_metrics(loss, nonfinite=0):
  return {'loss': np.float32(loss), 'grad_norm': np.float32(1.0),
          'learning_rate': np.float32(0.1), 'nonfinite': np.int32(nonfinite)}


def test_interval_row_averages_only_the_finite_steps():
  row = loop_lib.interval_row([step_metrics(2.0), step_metrics(float('nan'), 1)])
  assert row['loss'] == 2.0 and row['nonfinite'] == 1  # The NaN step applied no update.


def test_metrics_hook_writes_each_logged_interval_with_its_throughput():
  writer = Recorder()
  hook = hooks.Metrics(writer, num_devices=1, peak=1e12)
  hook.on_start(summary(total=5))
  for step, loss in enumerate([4.0, 2.0, 3.0, 1.0, 7.0], 1):
    logged = {'loss': loss, 'nonfinite': 0} if step in (2, 4, 5) else None
    assert hook.on_step(summary(step, total=5, logged=logged,
                                interval_s=0.5 if logged else None)) is None
  hook.on_end(summary(5, total=5))
  assert [(r['step'], r['loss']) for r in writer.rows] == [(2, 2.0), (4, 1.0), (5, 7.0)]
  # 2 steps of 512 tokens in 0.5 s, then 1 step: the tokens since the last row.
  assert [r['tokens_per_s'] for r in writer.rows] == [2048, 2048, 1024]
  assert all(r['mfu'] == pytest.approx(r['tokens_per_s'] * 1e6 / 1e12) for r in writer.rows)
  assert hook.result()['loss'] == 7.0


def test_evaluation_hook_runs_at_start_every_n_and_at_the_end():
  writer = Recorder()
  phase = fake_phase(6, evaluate=lambda params, extra: {'eval_loss': 1.0, 'eval_perplexity': np.e,
                                                 'eval_accuracy': 0.5})
  hook = hooks.Evaluation(writer, every=2)
  hook.on_start(summary(total=6, phase=phase))
  for step in range(1, 7):
    hook.on_step(summary(step, total=6, phase=phase))
  hook.on_end(summary(6, total=6, phase=phase))
  assert [r['step'] for r in writer.rows] == [0, 2, 4, 6]
  assert hook.result()['initial_eval_perplexity'] == np.e


def test_evaluation_hook_skips_the_final_eval_after_a_preemption():
  writer = Recorder()
  hook = hooks.Evaluation(writer, every=0)
  hook.on_start(summary(3, start=3, total=6))  # A resumed run: no step-0 evaluation.
  hook.on_end(summary(4, start=3, total=6, stopped=True))
  assert writer.rows == [] and hook.result() == {}


def test_checkpointing_asks_every_n_and_at_each_phase_end_and_the_saver_saves_once():
  hook = hooks.Checkpointing(every=3)
  phase = fake_phase(end=4)  # A length phase ending at step 4 of 7.
  asked = [step for step in range(1, 8)
           if hook.on_step(summary(step, total=7, phase=phase if step <= 4 else None))]
  assert asked == [3, 4, 6, 7]
  checkpoints = FakeCheckpoints()
  saver = hooks.Saver(checkpoints, tiny_config())
  for step in (3, 3, 4):
    saver.save(summary(step))
  assert checkpoints.saved == [3, 4] and saver.result() == {'checkpoint_blocking_s': 0.25}


def test_nonfinite_hook_skips_with_a_warning_or_asks_to_save_and_fail(caplog):
  counted = summary(4, logged={'nonfinite': 2})
  assert hooks.NonFinite('skip').on_step(counted) is None
  assert '2 step(s) before step 4' in caplog.text
  ask = hooks.NonFinite('stop').on_step(counted)
  assert ask.save and isinstance(ask.error, errors.RunError)
  assert 'saved as checkpoint 4' in str(ask.error)
  assert hooks.NonFinite('stop').on_step(summary(5, logged={'nonfinite': 0})) is None


def test_preemption_hook_asks_to_save_and_stop_at_the_signalled_step():
  watcher = types.SimpleNamespace(reached=lambda step, manager: step == 3)
  hook = hooks.Preemption(watcher, checkpoint_manager=None)
  asks = [hook.on_step(summary(step)) for step in (1, 2, 3)]
  assert asks[:2] == [None, None] and asks[2].save and asks[2].stop
  assert hook.result() == {'preempted': True}


class Spy(loop_lib.Hook):
  def __init__(self, name, calls, ask_at=None, ask=None):
    self.name, self.calls, self.ask_at, self.ask = name, calls, ask_at, ask

  def on_start(self, summary):
    self.calls.append((self.name, 'start'))

  def on_step(self, summary):
    self.calls.append((self.name, summary.step))
    return self.ask if summary.step == self.ask_at else None

  def on_end(self, summary):
    self.calls.append((self.name, 'end'))

  def result(self):
    return {self.name: True}


def run_fake(hook_list, total=5, log_every=2, phases=((5, 5),)):
  """The loop over stand-in phases (end, steps) whose step returns the state unchanged."""
  checkpoints = FakeCheckpoints()
  loop = loop_lib.Loop(hook_list, hooks.Saver(checkpoints, tiny_config()), 0, total, log_every)
  state = types.SimpleNamespace(params='params')
  for end, steps in phases:
    phase = fake_phase(end, batches=iter([{}] * steps),
                       train_step=lambda state, batch: (state, step_metrics(1.0)))
    state = loop.run(phase, state)
    if loop.stopped:
      break
  return loop, loop.end(state, phase), checkpoints


def test_loop_calls_hooks_in_order_and_stops_when_one_asks():
  calls = []
  loop, result, checkpoints = run_fake([Spy('a', calls, 2, loop_lib.Ask(stop=True)),
                                        Spy('b', calls)])
  assert calls == [('a', 'start'), ('b', 'start'), ('a', 1), ('b', 1), ('a', 2),
                   ('a', 'end'), ('b', 'end')]
  assert loop.stopped and result == {'a': True, 'b': True, 'step': 2, 'checkpoint_blocking_s': 0.25}
  assert checkpoints.saved == [2] and checkpoints.waits == 1  # The end saves and waits.


def test_loop_runs_phase_after_phase_and_fulfils_asks():
  seen = []

  class Watch(loop_lib.Hook):
    def on_step(self, summary):
      seen.append((summary.step, summary.phase.end, summary.logged is not None))
      return hooks.SAVE if summary.step == 3 else None

  loop, result, checkpoints = run_fake([Watch()], phases=((2, 2), (5, 3)))
  assert seen == [(1, 2, False), (2, 2, True), (3, 5, False), (4, 5, True), (5, 5, True)]
  assert checkpoints.saved == [3, 5] and result['step'] == 5 and not loop.stopped
  failing = Spy('f', [], 1, loop_lib.Ask(save=True, error=errors.RunError('bad')))
  with pytest.raises(errors.RunError, match='bad'):
    run_fake([failing])


def test_goodput_hook_counts_redone_steps_and_writes_shares_that_sum_to_one(tmp_path):
  from jaxlm import goodput
  metrics_path = tmp_path / 'metrics.jsonl'
  metrics_path.write_text('{"step": 0, "eval_loss": 6.0}\n{"step": 8, "loss": 5.0}\n{"step"')
  writer = Recorder()
  clock = goodput.Clock()
  hook = goodput.Goodput(writer, str(metrics_path), clock)
  hook.on_start(summary(4, start=4, total=12))
  assert hook.redo_until == 8 and hook.redone == 4
  seconds = {'step': 1.0, 'data_wait': 0.5}
  hook.on_step(summary(8, start=4, total=12, seconds=seconds, step_s=0.1))  # Redone: lost.
  seconds = {'step': 3.0, 'data_wait': 0.5}
  hook.on_step(summary(9, start=4, total=12, seconds=seconds, step_s=0.2))
  hook.on_step(summary(9, start=4, total=12, seconds=seconds, step_s=0.3, logged={}))
  row = writer.rows[-1]
  assert sum(row[f'goodput/{b}'] for b in goodput.BUCKETS) == pytest.approx(1.0)
  assert row['goodput/restart_lost_s'] == 1.0 and row['goodput/step_s'] == 2.0
  assert row['goodput/data_wait_s'] == 0.5
  assert row['goodput/redone_steps'] == 4 and row['step_time/max_s'] == 0.3
  assert hook.step_times == []  # The spread is per log interval.


def test_profile_hook_starts_a_window_on_sigusr1(tmp_path):
  import signal
  from jaxlm import profile
  hook = profile.Profiler(tiny_config().profile, str(tmp_path))
  summary_ = types.SimpleNamespace(step=0, state=np.zeros(()), total=10)
  hook.on_start(summary_)
  os.kill(os.getpid(), signal.SIGUSR1)
  summary_.step = 1
  hook.on_step(summary_)
  assert hook.stop_at == 1 + profile.ON_DEMAND_STEPS
  hook.on_end(summary_)
  assert hook.stop_at is None
  assert signal.getsignal(signal.SIGUSR1) is not hook._handle  # The old handler is back.
