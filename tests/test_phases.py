"""Sequence-length phases: config checks, each phase's batch shapes, and a run that switches
length mid-way resuming bit-exactly after SIGKILL on either side of the switch."""

import json
import logging
import shutil
import signal

import numpy as np
import pytest

from helpers import (checkpoint_steps, one_device, rows, shared, start, wait_for_step,
                     write_config)
from jaxlm import config as config_lib, data, phase_build, phases, run as run_lib, train
from jaxlm.config import ConfigError

PHASES = ((0.5, 32), (1.0, 64))


def phased(shared_data, **overrides):
  return shared(shared_data, objective='masked', model__family='bert', data__phases=PHASES,
                **overrides)


def test_phase_spans_split_train_steps_by_fraction(shared_data):
  config = phased(shared_data, train_steps=12)
  assert phases.spans(config) == [(0, 6, 32), (6, 12, 64)]
  assert [phases.index_at(config, s) for s in (0, 5, 6, 11, 12)] == [0, 0, 1, 1, 1]
  config.data.phases = ()
  assert phases.spans(config) == [(0, 12, 64)]


@pytest.mark.parametrize('override, message', [
    (('data.phases', '((0.5, 32), (1.0, 128))'),
     'data.phases: the longest phase is 128 tokens; set model.max_len=128'),
    (('data.phases', '((0.5, 32), (0.9, 64))'), 'data.phases ends [0.5, 0.9] must increase'),
    (('data.phases', '((0.5, 32), (0.5, 64), (1.0, 64))'), 'must increase'),
    (('data.phases', '((0.5, -32), (1.0, 64))'), 'data.phases entry (0.5, -32) must be'),
    (('data.phases', '(128, 512)'), 'data.phases entry 128 must be'),
    (('data.phases', '((0.01, 32), (1.0, 64))'),
     'data.phases: the phase of 32-token rows has no steps at train_steps=12'),
    (('loss_chunk', '64'), 'loss_chunk=64 must divide every phase\'s length (32)'),
])
def test_bad_phases_are_one_line_errors_naming_the_field(shared_data, override, message):
  config = phased(shared_data)
  with pytest.raises(ConfigError) as raised:
    config_lib.apply_overrides(config, [override])
    config_lib.validate(config)
  assert message in str(raised.value) and '\n' not in str(raised.value)


def test_each_phase_steps_on_its_own_rows_and_batch_s_is_element_s(tmp_path, shared_data):
  config = phased(shared_data, train_steps=12)
  s = run_lib.setup(config, one_device())
  corpus = data.prepare(config, str(tmp_path), s.objective.frame)
  stages = phase_build.Phases(s, corpus, str(tmp_path))
  for step, length in ((0, 32), (7, 64)):
    phase = stages.enter(step)
    batch = next(phase.batches)
    assert batch['tokens'].shape == (8, length)
    assert phase.setup.config.model.max_len == length
    assert phase.eval_set[0]['tokens'].shape == (8, length)
    # Element `step` of the phase's rows, packed at its length: the same whatever the route.
    rows_at_length = data.prepare(phase_build.phase_config(config, length), str(tmp_path),
                                  s.objective.frame).train
    expected = data.train_dataset(rows_at_length, phase.setup.config)[step]
    np.testing.assert_array_equal(batch['tokens'], expected['tokens'])
  assert s.abstract_state.params['position_embed']['embedding'].shape[0] == 64


def test_sigkill_on_either_side_of_the_switch_resumes_bit_exactly(tmp_path, shared_data, caplog):
  """A `jaxlm train` process killed in phase 1 resumes across the switch at step 20; a run
  stopped in phase 2 (the reference's checkpoint 24, later ones lost) resumes within it. Both
  resumes and the uninterrupted reference run in this process."""
  caplog.set_level(logging.INFO, logger='jaxlm')
  steps = 40
  config = phased(shared_data, train_steps=steps, log_every_steps=1,
                  checkpoint__save_every_steps=8, checkpoint__keep=10, model__dropout_rate=0.1)
  path = write_config(tmp_path / 'cfg.py', config)
  reference, crashed, stopped = tmp_path / 'reference', tmp_path / 'crashed', tmp_path / 'stopped'
  victim = start(path, crashed)
  wait_for_step(crashed, 17, victim)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  saved = checkpoint_steps(crashed)[-1]
  assert 0 < saved < 20
  train.train(config, str(reference), devices=one_device())
  assert 'length phase 2 of 2: steps 20-40 on rows of 64 tokens' in caplog.text
  assert 20 in checkpoint_steps(reference) and 24 in checkpoint_steps(reference)
  shutil.copytree(reference, stopped)
  for step in checkpoint_steps(stopped):
    if step > 24:
      shutil.rmtree(stopped / 'checkpoints' / str(step))
  logged = (stopped / 'metrics.jsonl').read_text().splitlines()
  (stopped / 'metrics.jsonl').write_text(  # What the later steps logged is lost too.
      ''.join(f'{line}\n' for line in logged if json.loads(line)['step'] <= 24))
  expected = rows(reference)
  for workdir, resumed_from, first in ((crashed, saved, 1), (stopped, 24, 25)):
    caplog.clear()
    train.train(config, str(workdir), devices=one_device())
    assert f'resumed from the checkpoint of step {resumed_from}' in caplog.text
    got = rows(workdir)
    for step in range(first, steps + 1):  # Bit for bit: the same floats in the JSON.
      assert got[step]['loss'] == expected[step]['loss'], step
      assert got[step]['grad_norm'] == expected[step]['grad_norm'], step
    assert got[steps]['eval_loss'] == expected[steps]['eval_loss']
