"""Hostile input to every command, and random bytes in every file a command reads: refused in
one line (exit 2) or a runtime failure (exit 1), never a traceback, never exit 0 with a
non-finite result, and never a changed file of the run."""

import json
import math
import os
import random
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import ROOT, file_content, fill_in, one_device, snapshot, tiny_config, write
from jaxlm import cli, config as config_lib, lock, steps, train
from jaxlm import run as run_lib

HF_LLAMA = {'model_type': 'llama', 'hidden_size': 64, 'intermediate_size': 128,
            'num_attention_heads': 4, 'num_hidden_layers': 2, 'vocab_size': 512,
            'max_position_embeddings': 64, 'num_key_value_heads': 4}
ROW = {'name': 'L1-d32-C1e12', 'N': 1e6, 'D': 1e7, 'C': 6e13, 'budget': 1e12, 'eval_loss': 3.0}


def rows(*edits):
  return ''.join(json.dumps({**ROW, **edit}) + '\n' for edit in edits)


SWEEP = ['sweep', '--config={root}/configs/scaling/cpu_tiny.py', '--workdir={work}']

# (id, argv, files to create first {relative path: content}, expected message). Every case
# exits 2 with that message on one line and leaves every file under the test's folder as it was.
COMMAND_CASES = [
    ('plan-negative-devices', ['plan', '--config={root}/configs/gpt_tiny.py', '--devices=-3'],
     {}, '--devices=-3 must be a positive number of devices'),
    ('plan-truthy-bool', ['plan', '--config={root}/configs/gpt_tiny.py',
                          '--config.model.use_bias=maybe'], {}, 'model.use_bias must be true'),
    ('generate-top-k-above-vocabulary',
     ['generate', '--workdir={work}', '--prompt=x', '--top_k=100000'],
     {'work/config.json': 'RUN2'}, '--top_k=100000 is above the vocabulary (model.vocab_size=512)'),
    ('generate-negative-seed', ['generate', '--workdir={work}', '--prompt=x', '--seed=-1'],
     {'work/config.json': 'RUN2'}, '--seed=-1 must be in [0, 2**32)'),
    ('generate-seed-beyond-64-bits',
     ['generate', '--workdir={work}', '--prompt=x', f'--seed={2**70}'],
     {'work/config.json': 'RUN2'}, 'must be in [0, 2**32)'),
    ('generate-truthy-override',
     ['generate', '--workdir={work}', '--prompt=x', '--config.model.scan_layers=yes'],
     {'work/config.json': 'RUN2'}, 'model.scan_layers must be true or false'),
    ('fill-mask-top-k-above-vocabulary',
     ['fill-mask', '--workdir={work}', '--text=a [MASK]', '--top_k=100000'],
     {'work/config.json': 'RUN2'}, '--top_k=100000 is above the vocabulary'),
    ('eval-config-json-truthy', ['eval', '--workdir={work}'],
     {'work/config.json': ('RUN2', {'model': {'gated_mlp': 'no'}})},
     'model.gated_mlp must be true or false'),
    ('eval-config-json-list', ['eval', '--workdir={work}'], {'work/config.json': '[]'},
     'must hold a JSON object, not a list'),
    ('sweep-head-dim-zero', [*SWEEP, '--config.head_dim=0'], {}, 'head_dim=0 must be positive'),
    ('sweep-truthy-base-field', [*SWEEP, '--config.base.model.gated_mlp=nope'], {},
     'base.model.gated_mlp must be true or false'),
    ('sweep-nan-ratio', [*SWEEP, '--config.mlp_ratio=nan'], {}, 'mlp_ratio expects a number'),
    ('sweep-infinite-lr', [*SWEEP, '--config.learning_rate=1e400'], {},
     'learning_rate=inf must be a finite number'),
    ('sweep-size-zero', [*SWEEP, '--config.sizes=((0, 32),)'], {}, 'sizes entry (0, 32)'),
    ('fit-row-not-json', ['fit', '--workdir={work}'], {'work/runs.jsonl': 'not json\n'},
     'runs.jsonl, line 1 is not JSON'),
    ('fit-row-without-name', ['fit', '--workdir={work}'],
     {'work/runs.jsonl': rows({}, {'name': None})}, 'line 2: the row has no name'),
    ('fit-string-loss', ['fit', '--workdir={work}'],
     {'work/runs.jsonl': rows({'eval_loss': '3.2'})}, "eval_loss='3.2' must be a number"),
    ('fit-bool-tokens', ['fit', '--workdir={work}'], {'work/runs.jsonl': rows({'D': True})},
     'D=True must be a number'),
    ('fit-negative-parameters', ['fit', '--workdir={work}'],
     {'work/runs.jsonl': rows({'N': -5})}, 'N=-5 must be a positive number'),
    ('fit-row-is-a-list', ['fit', '--workdir={work}'], {'work/runs.jsonl': '[1, 2]\n'},
     'a row must be a JSON object, not list'),
    ('fit-binary-runs', ['fit', '--workdir={work}'], {'work/runs.jsonl': b'\xff\xfe\x00\x01'},
     'is not UTF-8 text'),
    ('fit-broken-result-never-rewrites-runs-jsonl', ['fit', '--workdir={work}'],
     {'work/runs/a/result.json': '{oops', 'work/runs.jsonl': rows({}, {}, {}, {}, {})},
     'result.json is not valid JSON'),
    ('convert-hf-config-list', ['convert', '--from-hf={tmp}/hf', '--workdir={work}'],
     {'hf/config.json': '[1]'}, 'config.json must hold a JSON object, not a list'),
    ('convert-hf-config-binary', ['convert', '--from-hf={tmp}/hf', '--workdir={work}'],
     {'hf/config.json': b'\xff\xfe'}, 'is not valid JSON'),
    ('convert-hf-rope-not-an-object', ['convert', '--from-hf={tmp}/hf', '--workdir={work}'],
     {'hf/config.json': json.dumps({**HF_LLAMA, 'rope_scaling': 5})},
     'rope_parameters / rope_scaling must be a JSON object'),
    ('convert-hf-truthy-string', ['convert', '--from-hf={tmp}/hf', '--workdir={work}'],
     {'hf/config.json': json.dumps({**HF_LLAMA, 'tie_word_embeddings': 'false'})},
     "tie_word_embeddings='false' is not valid for model.tied_embeddings"),
    ('convert-hf-fractional-layers', ['convert', '--from-hf={tmp}/hf', '--workdir={work}'],
     {'hf/config.json': json.dumps({**HF_LLAMA, 'num_hidden_layers': 2.5})},
     'num_hidden_layers=2.5 is not valid for model.num_layers'),
]


@pytest.mark.parametrize('name,argv,files,message', COMMAND_CASES,
                         ids=[c[0] for c in COMMAND_CASES])
def test_every_command_refuses_bad_input_in_one_line_and_changes_nothing(
    name, argv, files, message, tmp_path, capsys):
  tmp, work = str(tmp_path), str(tmp_path / 'work')
  fill = lambda text: fill_in(text, tmp, work).replace('{root}', ROOT)
  for rel, content in files.items():
    write(os.path.join(tmp, rel), file_content(content, fill))
  before = snapshot(tmp)
  capsys.readouterr()
  code = cli.main([fill(a) for a in argv])
  err = capsys.readouterr().err
  errors_ = [line for line in err.splitlines() if line.startswith('jaxlm: error:')]
  assert code == 2, err
  assert len(errors_) == 1 and fill(message) in errors_[0], err
  assert 'Traceback' not in err
  assert snapshot(tmp) == before


def test_over_a_hundred_bad_inputs_across_commands():
  from test_reliability import CASES
  assert len(CASES) + len(COMMAND_CASES) >= 100


def test_a_nonfinite_parameter_update_is_never_applied():
  """A finite loss and gradient with an overflowing step: the guard checks the new weights."""
  import optax
  from jaxlm import objectives, state as state_lib
  config = tiny_config(optimizer__grad_clip=0.0)
  s = run_lib.setup(config, one_device())
  tx = optax.sgd(1e39)  # float32 infinity times a finite gradient.
  step = jax.jit(steps.make_train_step(s.model, tx, lambda _: 0.0, config,
                                       objectives.build(config)))
  with s.active():
    params = state_lib.initialize(s.model, tx, config, None).params
    state = state_lib.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                                 opt_state=tx.init(params))
    shape = (config.batch_size, config.model.max_len)
    batch = {'tokens': np.random.default_rng(0).integers(0, 512, shape, np.int32),
             'positions': np.tile(np.arange(shape[1], dtype=np.int32), (shape[0], 1)),
             'segment_ids': np.ones(shape, np.int32)}
    new, metrics = step(state, batch)
  assert int(metrics['nonfinite']) == 1 and np.isfinite(float(metrics['grad_norm']))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new.params),
                                                  jax.tree.leaves(params)))


def test_a_second_train_on_one_workdir_is_refused_while_the_first_runs(tmp_path):
  held = lock.acquire(str(tmp_path))
  try:
    program = ('from jaxlm import lock; import sys\n'
               'try:\n  lock.acquire(sys.argv[1])\nexcept Exception as e:\n  print(e)\n')
    out = subprocess.run([sys.executable, '-c', program, str(tmp_path)], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, PYTHONPATH=ROOT)).stdout
    assert f'is in use by process {os.getpid()}' in out
  finally:
    held.release()
  assert not (tmp_path / lock.NAME).exists()


def test_a_lock_whose_process_has_exited_is_taken_over(tmp_path):
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True).stdout.strip()
  import socket
  (tmp_path / lock.NAME).write_text(json.dumps(
      {'host': socket.gethostname(), 'pid': int(dead), 'time': time.time()}))
  lock.acquire(str(tmp_path)).release()


def test_symlink_loops_in_a_data_folder_neither_hang_nor_duplicate(tmp_path):
  from jaxlm.data import sources
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'a.txt').write_text('a')
  (tmp_path / 'sub' / 'b.txt').write_text('b')
  os.symlink(tmp_path, tmp_path / 'sub' / 'up')
  os.symlink(tmp_path, tmp_path / 'self')
  os.symlink(tmp_path / 'a.txt', tmp_path / 'sub' / 'same.txt')
  for pattern in (str(tmp_path), f'{tmp_path}/**/*.txt'):
    _, files = sources.list_files(pattern)
    assert sorted(os.path.realpath(f) for f in files) == [str(tmp_path / 'a.txt'),
                                                         str(tmp_path / 'sub' / 'b.txt')]


# --- one trained run, then resumes and random bytes ------------------------------------------

@pytest.fixture(scope='module')
def trained_run(tmp_path_factory, shared_data):
  """A 4-step run (checkpoints 2 and 4) with its own tokenizer and token cache."""
  workdir = tmp_path_factory.mktemp('trained') / 'run'
  workdir.mkdir()
  shutil.copy(shared_data / 'tokenizer.model', workdir / 'tokenizer.model')
  shutil.copytree(shared_data / 'data', workdir / 'data')
  config = tiny_config(train_steps=4, checkpoint__save_every_steps=2, eval_batches=1)
  train.train(config, str(workdir), devices=one_device())
  return workdir


def copy_run(trained_run, tmp_path):
  target = tmp_path / 'run'
  shutil.copytree(trained_run, target)
  return target


def run_cli(capsys, *argv):
  capsys.readouterr()
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def test_a_resume_that_changes_the_state_keeps_every_checkpoint(trained_run, tmp_path, capsys):
  run = copy_run(trained_run, tmp_path)
  before = snapshot(run)
  code, _, err = run_cli(capsys, 'train', f'--workdir={run}', '--config.optimizer.grad_clip=0',
                         '--config.train_steps=6')
  assert code == 2 and 'optimizer.grad_clip=1.0 -> 0.0' in err
  assert snapshot(run) == before


def test_corrupted_checkpoint_bytes_fall_back_to_the_newest_good_one(trained_run, tmp_path,
                                                                      capsys):
  run = copy_run(trained_run, tmp_path)
  for path in (run / 'checkpoints' / '4' / 'state').rglob('*'):
    if path.is_file() and path.parent.name == 'd':
      data = bytearray(path.read_bytes())
      data[len(data) // 2] ^= 0xFF
      path.write_bytes(bytes(data))
  before = snapshot(run)
  code, out, err = run_cli(capsys, 'eval', f'--workdir={run}')
  assert code == 0, err
  assert json.loads(out)['step'] == 2 and math.isfinite(json.loads(out)['eval_loss'])
  assert 'checkpoint 4' in err and 'does not match its checksum' in err
  assert snapshot(run) == before  # A reader sets nothing aside.


def corrupt(path, rng, how):
  data = path.read_bytes()
  if how == 'replace':
    data = rng.randbytes(max(1, len(data)))
  elif how == 'truncate':
    data = data[:rng.randrange(len(data) + 1)]
  else:
    data = bytearray(data)
    for _ in range(8):
      data[rng.randrange(len(data))] = rng.randrange(256)
    data = bytes(data)
  path.write_bytes(data)


# (file of the run, the command that reads it, corruptions tried).
FUZZ = [
    ('config.json', ['eval'], ('replace', 'truncate', 'flip') * 3),
    ('tokenizer.model', ['eval'], ('replace', 'truncate')),
    ('data/*/shards/*.tokens', ['eval'], ('replace', 'truncate')),
    ('checkpoints/4/state/**/d/*', ['eval'], ('replace', 'flip')),
    ('runs.jsonl', ['fit'], ('replace', 'truncate', 'flip') * 3),
]


@pytest.mark.parametrize('target,command,corruptions', FUZZ, ids=[f[0] for f in FUZZ])
def test_random_bytes_in_a_file_a_command_reads(target, command, corruptions, trained_run,
                                                tmp_path, capsys):
  """No traceback, no exit 0 with a non-finite result, no file of the run changed."""
  for i, how in enumerate(corruptions):
    run = copy_run(trained_run, tmp_path / str(i))
    if target == 'runs.jsonl':
      (run / 'runs.jsonl').write_text(rows(*({'N': 1e6 * k} for k in range(1, 7))))
    rng = random.Random(f'{target}{i}')
    victims = sorted(p for p in run.glob(target) if p.is_file())
    corrupt(rng.choice(victims), rng, how)
    before = snapshot(run)
    code, out, err = run_cli(capsys, *command, f'--workdir={run}')
    assert code in (0, 1, 2) and 'Traceback' not in err, (how, err)
    if code == 0:
      result = json.loads(out)
      assert all(math.isfinite(v) for v in _numbers(result)), (how, result)
    else:
      assert err.strip().splitlines()[-1].startswith('jaxlm: error:'), err
    assert snapshot(run) == before, how
    shutil.rmtree(run)


def _numbers(value):
  if isinstance(value, dict):
    for v in value.values():
      yield from _numbers(v)
  elif isinstance(value, (list, tuple)):
    for v in value:
      yield from _numbers(v)
  elif isinstance(value, (int, float)) and not isinstance(value, bool):
    yield float(value)


def test_config_json_changes_only_after_the_resumed_run_saves(trained_run, tmp_path,
                                                              monkeypatch):
  run = copy_run(trained_run, tmp_path)
  saved = (run / 'config.json').read_text()
  config = config_lib.from_json(saved)
  config.train_steps = 6
  calls = []
  real = train.checkpoint.Checkpointer.save

  def failing_save(self, step, *args):
    calls.append(step)
    raise train.checkpoint.CheckpointError('disk gone')
  monkeypatch.setattr(train.checkpoint.Checkpointer, 'save', failing_save)
  with pytest.raises(train.checkpoint.CheckpointError):
    train.train(config, str(run), devices=one_device())
  assert calls and (run / 'config.json').read_text() == saved  # Still the run's own.
  monkeypatch.setattr(train.checkpoint.Checkpointer, 'save', real)
  train.train(config, str(run), devices=one_device())
  assert config_lib.from_json((run / 'config.json').read_text()).train_steps == 6
