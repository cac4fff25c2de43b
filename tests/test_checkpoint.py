"""Checkpoints: exact resume after SIGKILL, preemption, resharding, faults and init_from."""

import glob
import json
import logging
import os
import signal

import flax.struct
import jax
import numpy as np
import pytest

from helpers import (checkpoint_steps, one_device, rows, shared, start, tiny_config,
                     wait_for_step, write_config)
from jaxlm import checkpoint, data, state as state_lib, run as run_lib, train
from jaxlm.config import ConfigError


def test_sigkill_then_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, shared_data,
                                                                      caplog):
  """One `jaxlm train` process killed mid-run; the resume and the uninterrupted reference run
  in this process (the same floats as a `jaxlm train` process on one device)."""
  caplog.set_level(logging.INFO, logger='jaxlm')
  steps = 150
  config = shared(shared_data, train_steps=steps, log_every_steps=1,
                  checkpoint__save_every_steps=20, model__dropout_rate=0.1)
  path = write_config(tmp_path / 'cfg.py', config)
  reference, crashed = tmp_path / 'reference', tmp_path / 'crashed'
  victim = start(path, crashed)
  wait_for_step(crashed, 50, victim)  # Killed wherever it is, mid-save perhaps.
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  saved = checkpoint_steps(crashed)
  assert saved and saved[-1] < steps
  train.train(config, str(reference), devices=one_device())
  caplog.clear()
  train.train(config, str(crashed), devices=one_device())
  assert 'resumed from the checkpoint of step' in caplog.text
  expected, got = rows(reference), rows(crashed)
  for step in range(saved[-1] + 1, steps + 1):  # Bit for bit: the same floats in the JSON.
    assert got[step]['loss'] == expected[step]['loss'], step
    assert got[step]['grad_norm'] == expected[step]['grad_norm'], step
  assert got[steps]['eval_loss'] == expected[steps]['eval_loss']


def test_sigterm_saves_at_the_next_step_and_exits_0(tmp_path, shared_data, caplog):
  caplog.set_level(logging.INFO, logger='jaxlm')
  config = shared(shared_data, train_steps=10_000, log_every_steps=1,
                  checkpoint__save_every_steps=5_000, optimizer__warmup_steps=1)
  path = write_config(tmp_path / 'cfg.py', config)
  workdir = tmp_path / 'run'
  process = start(path, workdir)
  wait_for_step(workdir, 3, process)
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=120)
  assert process.returncode == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert result['preempted'] is True
  assert 'preempted: saving the checkpoint of step' in err
  assert checkpoint_steps(workdir) == [result['step']]
  config.train_steps = result['step'] + 2  # The resume, in this process.
  assert train.train(config, str(workdir), devices=one_device())['step'] == result['step'] + 2
  assert f'resumed from the checkpoint of step {result["step"]}' in caplog.text


def test_a_failed_write_stops_the_run_and_keeps_earlier_checkpoints(tmp_path, shared_data,
                                                                    caplog):
  caplog.set_level(logging.INFO, logger='jaxlm')
  config = shared(shared_data, train_steps=6, checkpoint__save_every_steps=3)
  path = write_config(tmp_path / 'cfg.py', config)
  workdir = tmp_path / 'run'
  train.train(config, str(workdir), devices=one_device())
  second = start(path, workdir, '--config.train_steps=9', full_disk=True)
  _, err = second.communicate(timeout=300)
  assert second.returncode == 1
  last = err.strip().splitlines()[-1]
  assert last.startswith('jaxlm: error: writing the checkpoint of step 9 under ')
  assert 'the earlier checkpoints are intact' in last
  assert checkpoint_steps(workdir) == [3, 6]
  caplog.clear()
  config.train_steps = 9  # Resumes from 6 and finishes (in this process).
  assert train.train(config, str(workdir), devices=one_device())['step'] == 9
  assert 'resumed from the checkpoint of step 6' in caplog.text


def test_unreadable_latest_checkpoint_is_set_aside_and_the_previous_used(tmp_path, shared_data,
                                                                        caplog):
  caplog.set_level(logging.INFO, logger='jaxlm')
  config = shared(shared_data, train_steps=8, checkpoint__save_every_steps=4)
  workdir = str(tmp_path)
  train.train(config, workdir, devices=one_device())
  for f in glob.glob(f'{workdir}/checkpoints/8/state/**/d/*', recursive=True):
    with open(f, 'r+b') as handle:
      handle.write(b'not a checkpoint')
  os.makedirs(f'{workdir}/checkpoints/9/state')  # A half-written one, newer still.
  longer = shared(shared_data, train_steps=10, checkpoint__save_every_steps=4)
  result = train.train(longer, workdir, devices=one_device())
  assert result['step'] == 10
  names = sorted(os.listdir(f'{workdir}/checkpoints'))
  assert [n for n in names if n.isdigit()] == ['10', '4', '8']  # 8 rewritten by the resume.
  assert len([n for n in names if n.startswith('8.unreadable')]) == 1
  assert len([n for n in names if n.startswith('9.unreadable')]) == 1
  assert 'resumed from the checkpoint of step 4' in caplog.text
  assert 'checkpoint 8 in' in caplog.text and 'does not match its checksum' in caplog.text


def test_restore_onto_other_meshes_gives_the_same_values(tmp_path):
  base = dict(model__num_heads=8, model__num_kv_heads=8, model__family='llama')
  saver = run_lib.setup(tiny_config(**base, mesh__fsdp=8), jax.devices())
  config = tiny_config(**base, mesh__fsdp=8)
  with saver.active():
    state = state_lib.initialize(saver.model, saver.tx, config, saver.shardings)
  rows_ = data.packing.PackedRows(data.store.TokenStream(np.arange(4096) % 500,
                                                         np.array([0, 4096])), 64)
  batches = data.train_iterator(data.train_dataset(rows_, config), config)
  next(batches)
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), config)
  ckpt.save(1, state, batches, config)
  ckpt.wait()
  expected = jax.device_get(state)
  for devices, sizes in ((jax.devices(), dict(mesh__data=2, mesh__fsdp=1, mesh__tensor=4)),
                         (one_device(), dict())):
    s = run_lib.setup(tiny_config(**base, **sizes), devices)
    restored, step = ckpt.restore_latest(s.abstract_state, s.shardings)
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)
    kernel = restored.params['layers']['mlp']['wi']['kernel']
    assert kernel.sharding.mesh.shape == s.mesh.shape  # Laid out on the new mesh.
  ckpt.close()


def test_keep_last_n_plus_every_kth(tmp_path):
  config = tiny_config(checkpoint__keep=2, checkpoint__keep_every_steps=4)
  state = {'w': jax.numpy.ones(3)}
  rows_ = data.packing.PackedRows(data.store.TokenStream(np.zeros(640), np.array([0, 640])), 64)
  batches = data.train_iterator(data.train_dataset(rows_, config), config)
  ckpt = checkpoint.Checkpointer(str(tmp_path), config)
  for step in range(2, 13, 2):
    ckpt.save(step, state, batches, config)
  ckpt.wait()
  assert ckpt.all_steps() == [4, 8, 10, 12]
  ckpt.close()


def test_init_from_loads_parameters_only(tmp_path, shared_data, trained_causal):
  source, first = trained_causal.workdir, trained_causal.result
  config = shared(shared_data, train_steps=2, init_from=source, optimizer__warmup_steps=1)
  result = train.train(config, str(tmp_path / 'child'), devices=one_device())
  child = rows(str(tmp_path / 'child'))
  assert child[0]['eval_loss'] == pytest.approx(first['eval_loss'], rel=1e-6)
  assert first['eval_perplexity'] < first['initial_eval_perplexity']  # It did learn...
  assert result['initial_eval_perplexity'] == pytest.approx(first['eval_perplexity'])  # ...and
  assert result['step'] == 2  # the child starts its own count and optimizer state at 0.


def test_init_from_a_different_shape_names_the_parameter(tmp_path, shared_data, trained_causal):
  config = shared(shared_data, train_steps=2,
                  init_from=f'{trained_causal.workdir}/checkpoints/12', model__mlp_dim=96)
  with pytest.raises(ConfigError, match=r"parameter \['layers'\]\['mlp'\]\['wi'\]\['bias'\] "
                                        r'has shape \(2, 128\) in the checkpoint at .* but '
                                        r'\(2, 96\) in this model'):
    train.train(config, str(tmp_path / 'child'), devices=one_device())
  with pytest.raises(ConfigError, match='holds no jaxlm checkpoint'):
    train.train(shared(shared_data, init_from=str(tmp_path / 'nothing')),
                str(tmp_path / 'other'), devices=one_device())


@flax.struct.dataclass
class StateBeforeExtra:
  """TrainState as it was before `extra`: what older checkpoints hold."""
  step: jax.Array
  params: object
  opt_state: object


def test_extra_collections_are_checkpointed_and_older_checkpoints_restore_without_them(
    tmp_path):
  config = tiny_config()
  s = run_lib.setup(config, one_device())
  with s.active():
    state = state_lib.initialize(s.model, s.tx, config, s.shardings)
  assert state.extra == {}  # No layer has a non-parameter collection today.
  rows_ = data.packing.PackedRows(data.store.TokenStream(np.arange(4096) % 500,
                                                         np.array([0, 4096])), 64)
  batches = lambda: data.train_iterator(data.train_dataset(rows_, config), config)
  at_step_1 = batches()
  next(at_step_1)
  scales = {'scales': {'amax': jax.numpy.arange(3.0)}}  # E.g. an fp8 matmul's history.
  replicated = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
  for name, saved, abstract, shardings in (
      ('extra', state.replace(extra=scales),
       s.abstract_state.replace(extra=jax.eval_shape(lambda: scales)),
       s.shardings.replace(extra={'scales': {'amax': replicated}})),
      ('before', StateBeforeExtra(state.step, state.params, state.opt_state),
       s.abstract_state, s.shardings)):
    ckpt = checkpoint.Checkpointer(str(tmp_path / name), config)
    ckpt.save(1, saved, at_step_1, config)
    ckpt.wait()
    restored, step = ckpt.restore_latest(abstract, shardings)
    ckpt.close()
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params),
                 jax.device_get(state.params))
    if name == 'extra':
      np.testing.assert_array_equal(restored.extra['scales']['amax'], [0.0, 1.0, 2.0])
    else:
      assert restored.extra == {}
