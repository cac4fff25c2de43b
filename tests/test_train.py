"""End to end: the real training function (the one `jaxlm train` calls) on the tiny config."""

import json
import os

import pytest

from jaxlm import cli, train, workdir as workdir_lib
from jaxlm.config import ConfigError
from conftest import one_device, tiny_config

REQUIRED = {'step', 'loss', 'learning_rate', 'grad_norm', 'tokens_per_s', 'mfu'}


def read_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def trained(tmp_path_factory, shared_data):
  """One 12-step run shared by the tests below."""
  workdir = tmp_path_factory.mktemp('run')
  config = tiny_config(data__cache_dir=str(shared_data / 'data'),
                       data__tokenizer=str(shared_data / 'tokenizer.model'))
  result = train.train(config, str(workdir), devices=one_device())
  return config, str(workdir), result


def test_training_lowers_the_loss_and_held_out_perplexity(trained):
  _, workdir, result = trained
  rows = read_rows(workdir)
  train_rows = [r for r in rows if 'loss' in r]
  assert [r['step'] for r in train_rows] == [4, 8, 12]
  assert all(REQUIRED <= set(r) for r in train_rows)
  assert train_rows[-1]['loss'] < train_rows[0]['loss'] - 0.5
  assert all(r['tokens_per_s'] > 0 and 0 < r['mfu'] < 1 for r in train_rows)
  evals = [r for r in rows if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [0, 12]
  assert evals[-1]['eval_perplexity'] < evals[0]['eval_perplexity'] / 2
  assert result['eval_perplexity'] == evals[-1]['eval_perplexity']


def test_workdir_holds_the_run(trained):
  config, workdir, _ = trained
  saved = workdir_lib.read_config(workdir)
  assert saved.to_dict() == config.to_dict()
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['12', '6']
  assert any(f.startswith('events.out.tfevents') for f in
             os.listdir(os.path.join(workdir, 'tensorboard')))


def test_eval_command_reads_the_latest_checkpoint(trained, capsys):
  _, workdir, result = trained
  assert cli.main(['eval', f'--workdir={workdir}']) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed['step'] == 12
  assert printed['eval_loss'] == pytest.approx(result['eval_loss'], rel=1e-5)


def test_train_command_resumes_and_extends_the_run(trained, capsys):
  """Through the CLI, on all 8 devices: the 1-device checkpoint is resharded onto FSDP."""
  _, workdir, _ = trained
  assert cli.main(['train', f'--workdir={workdir}', '--config.train_steps=16']) == 0
  rows = read_rows(workdir)
  assert [r['step'] for r in rows if 'loss' in r][-2:] == [12, 16]  # 4 new steps, no replay.
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['step'] == 16


def test_a_workdir_of_another_model_shape_is_refused(trained):
  _, workdir, _ = trained
  with pytest.raises(ConfigError, match='holds a run with model.num_layers=2, this config has 3'):
    train.train(tiny_config(model__num_layers=3), workdir, devices=one_device())
