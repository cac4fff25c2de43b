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

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest

from helpers import ROOT, file_content, fill_in, one_device, snapshot, tiny_config, write
from jaxlm import cli, config as config_lib, lock, objectives, steps, train
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
    # Every numeric flag: non-finite, zero, negative or huge is refused by the flag itself.
    ('generate-temperature-nan', ['generate', '--workdir={work}', '--prompt=x',
                                  '--temperature=nan'], {'work/config.json': 'RUN2'},
     '--temperature=nan must be a finite number'),
    ('generate-top-p-nan', ['generate', '--workdir={work}', '--prompt=x', '--top_p=nan'],
     {'work/config.json': 'RUN2'}, '--top_p=nan must be a finite number'),
    ('generate-length-penalty-infinite', ['generate', '--workdir={work}', '--prompt=x',
                                          '--num_beams=2', '--length_penalty=inf'],
     {'work/config.json': 'RUN2'}, '--length_penalty=inf must be a finite number'),
    ('generate-new-tokens-beyond-int32', ['generate', '--workdir={work}', '--prompt=x',
                                          '--max_new_tokens=3000000000'],
     {'work/config.json': 'RUN2'}, '--max_new_tokens=3000000000 must be in [1, 2**31)'),
    ('generate-zero-beams', ['generate', '--workdir={work}', '--prompt=x', '--num_beams=0'],
     {'work/config.json': 'RUN2'}, '--num_beams=0 must be in [1, 2**31)'),
    ('generate-rope-cache-beyond-memory', ['generate', '--workdir={work}', '--prompt=x',
                                           '--max_new_tokens=100000000'],
     {'work/config.json': ('RUN2', {'model': {'position': 'rope'},
                                    'data': {'tokenizer': '{shared}/tokenizer.model'}})},
     'per device, more than the'),
    ('fill-mask-top-k-zero', ['fill-mask', '--workdir={work}', '--text=a [MASK]', '--top_k=0'],
     {'work/config.json': 'RUN2'}, '--top_k=0 must be in [1, 2**31)'),
    ('eval-negative-step', ['eval', '--workdir={work}', '--step=-1'],
     {'work/config.json': 'RUN2'}, '--step=-1 must be a step >= 0'),
    ('eval-without-a-checkpoint-trains-no-tokenizer', ['eval', '--workdir={work}'],
     {'work/config.json': 'RUN2'}, 'has no checkpoint; train first'),
    ('plan-zero-devices', ['plan', '--config={root}/configs/gpt_tiny.py', '--devices=0'], {},
     '--devices=0 must be a positive number of devices'),
    ('plan-devices-beyond-simulation', ['plan', '--config={root}/configs/gpt_tiny.py',
                                        '--devices=100000000'], {}, 'at most 4096'),
    ('plan-slices-beyond-bound', ['plan', '--config={root}/configs/gpt_tiny.py',
                                  '--topology=v5p-8', '--num_slices=100000'], {},
     '--num_slices=100000 must be in [1, 1024]'),
    ('plan-json-is-a-directory', ['plan', '--config={root}/configs/gpt_tiny.py', '--json={tmp}'],
     {}, '--json={tmp} is a directory'),
    ('plan-json-folder-missing', ['plan', '--config={root}/configs/gpt_tiny.py',
                                  '--json={tmp}/none/plan.json'], {}, 'does not exist'),
    ('plan-config-is-a-directory', ['plan', '--config={tmp}'], {}, 'is a directory'),
    ('fit-budget-infinite', ['fit', '--workdir={work}', '--budget=inf'], {},
     '--budget=inf must be a finite number'),
    ('fit-bootstrap-huge', ['fit', '--workdir={work}', '--bootstrap=1000000000'], {},
     'at most 100,000'),
    ('convert-shard-size-nan', ['convert', '--to-hf={tmp}/out', '--workdir={work}',
                                '--max_shard_mb=nan'], {}, '--max_shard_mb=nan must be a finite'),
    ('convert-workdir-not-utf8', ['convert', '--to-hf={tmp}/out', '--workdir={tmp}/w\udcff'], {},
     'is not valid UTF-8'),
    # Settings that would train nothing, or train less than asked.
    ('fit-one-model-size', ['fit', '--workdir={work}'],
     {'work/runs.jsonl': rows(*({'D': 1e7 * k} for k in range(1, 7)))}, 'have 1 distinct N'),
    ('sweep-budgets-round-to-one-name', [*SWEEP, '--config.budgets=(4e11, 4.0001e11)'], {},
     'give the same run name L1-d32-C4e11'),
    ('sweep-infinite-budget', [*SWEEP, '--config.budgets=(1e400,)'], {},
     'must all be positive finite numbers'),
    ('sweep-size-twice', [*SWEEP, '--config.sizes=((1, 32), (1, 32))'], {},
     'sizes lists (1, 32) twice'),
    ('sweep-batch-exponent-huge', [*SWEEP, '--config.batch_compute_exponent=1e300'], {},
     'batch_compute_exponent=1e+300 must be in [0, 1]'),
    ('finetune-label-twice', ['finetune', '--config={root}/configs/finetune_cls.py',
                              '--workdir={work}', '--config.finetune.train={tmp}/t.jsonl',
                              "--config.finetune.labels=('pos', 'neg', 'pos')"], {},
     "names the label 'pos' twice"),
]


@pytest.mark.parametrize('name,argv,files,message', COMMAND_CASES,
                         ids=[c[0] for c in COMMAND_CASES])
def test_every_command_refuses_bad_input_in_one_line_and_changes_nothing(
    name, argv, files, message, tmp_path, capsys, shared_data):
  tmp, work = str(tmp_path), str(tmp_path / 'work')
  fill = lambda text: fill_in(text, tmp, work, str(shared_data)).replace('{root}', ROOT)
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
  from jaxlm import state as state_lib
  config = tiny_config(optimizer__grad_clip=0.0)
  s = run_lib.setup(config, one_device())
  tx = optax.sgd(1e39)  # float32 infinity times a finite gradient.
  step = jax.jit(steps.make_train_step(s.model, s.objective, tx, lambda _: 0.0, config,
                                       s.objective.prepare()))
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


# --- every flag of every command, fuzzed ------------------------------------------------------

def _flags():
  """(command, flag, argparse action) of every option of every command."""
  import argparse
  parser = cli._parser()
  commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
  return [(command, action.option_strings[-1], action)
          for command, sub in commands.choices.items() for action in sub._actions
          if action.option_strings and action.dest != 'help']


NUMERIC = [f for f in _flags() if f[2].type is not None]


def test_every_numeric_flag_checks_its_own_range():
  """A number flag is parsed by cli._number (finite, in its range, one line naming it); none is
  a bare int or float whose NaN, zero, negative or huge values would pass."""
  assert len(NUMERIC) >= 15
  for command, flag, action in _flags():
    numeric = isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
    if numeric or action.type is not None:
      assert action.type.__qualname__.startswith('_number'), (command, flag)


VALUES = st.one_of(st.text(max_size=20), st.integers().map(str), st.floats().map(str),
                   st.sampled_from(['nan', '-inf', '1e400', '0', '-1', '0.0', str(2**31),
                                    str(2**64), '', ' ', '1_000', '0x10', '٣']))


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(flag=st.sampled_from(NUMERIC), value=VALUES)
def test_random_values_of_every_numeric_flag_are_refused_in_one_line_or_in_range(flag, value):
  command, name, action = flag
  try:
    args, _ = cli._parser().parse_known_args([command, f'{name}={value}'])
  except config_lib.ConfigError as e:
    assert '\n' not in str(e) and name in str(e), str(e)
  else:
    parsed = getattr(args, action.dest)
    assert math.isfinite(parsed) and parsed == action.type(value)


READERS = ['eval', 'generate', 'fill-mask', 'report', 'fit']


@hypothesis.settings(max_examples=150, deadline=None,  # capsys is read out in every example.
                    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(command=st.sampled_from(READERS), flag=st.sampled_from(['--workdir', '--config']),
                  value=st.one_of(st.text(max_size=30), st.sampled_from(
                      ['/', '/dev/null', '/proc/self', 'x\udcff', '~', '.', '/dev/zero'])))
def test_random_paths_given_to_the_read_only_commands_are_refused_in_one_line(command, flag,
                                                                              value, capsys):
  hypothesis.assume('://' not in value)  # A bucket URL would ask the network.
  argv = [command, f'{flag}={value}', '--prompt=x', '--text=[MASK]']
  if flag == '--config':
    argv.append('--workdir=/nonexistent/run')
  argv = [a for a in argv if command in ('generate', 'fill-mask') or not a.startswith(
      ('--prompt', '--text'))]
  capsys.readouterr()
  code = cli.main(argv)
  err = capsys.readouterr().err
  assert code == 2 and 'Traceback' not in err, err
  assert len([line for line in err.splitlines() if line.startswith('jaxlm: error:')]) == 1


# --- the workdir lock under a race --------------------------------------------------------------

RACE = '''
import json, os, random, socket, sys, time
from jaxlm import lock
workdir, starters, trials = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
read = lock._holder
def slow(path):  # Widens the gap between reading the lock and acting on it.
  holder = read(path)
  time.sleep(random.random() * 0.02)
  return holder
lock._holder = slow
path = os.path.join(workdir, lock.NAME)
for trial in range(trials):
  dead = os.fork()
  if dead == 0:
    os._exit(0)
  os.waitpid(dead, 0)
  with open(path, 'w') as f:  # A lock left by a process that has exited.
    json.dump({'host': socket.gethostname(), 'pid': dead, 'time': time.time(), 'id': 'x'}, f)
  reader, writer = os.pipe()
  start = time.time() + 0.2
  children = []
  for _ in range(starters):
    pid = os.fork()
    if pid == 0:
      random.seed(os.getpid())
      time.sleep(max(0.0, start - time.time()))
      try:
        held = lock.acquire(workdir)
        span = f'{time.time()} '
        time.sleep(0.05)
        span += f'{time.time()}'
        held.release()
      except Exception as e:  # noqa: BLE001
        span = 'lost' if 'in use by' in str(e) else f'error {e}'
      os.write(writer, (span + '\\n').encode())
      os._exit(0)
    children.append(pid)
  for pid in children:
    os.waitpid(pid, 0)
  os.close(writer)
  print(trial, os.read(reader, 1 << 16).decode().replace('\\n', ';'), flush=True)
  os.close(reader)
'''


def test_a_stale_lock_is_taken_over_by_exactly_one_of_many_racing_processes(tmp_path):
  out = subprocess.run([sys.executable, '-c', RACE, str(tmp_path), '4', '12'],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 0, out.stderr
  for line in out.stdout.splitlines():
    trial, results = line.split(' ', 1)
    results = [r for r in results.split(';') if r]
    assert len(results) == 4 and not [r for r in results if r.startswith('error')], line
    spans = sorted(tuple(map(float, r.split())) for r in results if r != 'lost')
    assert spans, line  # Someone took the stale lock over...
    assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:])), line  # ...one at a time.
  assert len(out.stdout.splitlines()) == 12
  assert os.listdir(tmp_path) == []  # No temporary, claim or lock file left behind.


def test_a_full_disk_leaves_no_lock_file(tmp_path, monkeypatch):
  import errno

  def full(fd):
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(lock.os, 'fsync', full)
  with pytest.raises(OSError):
    lock.acquire(str(tmp_path))
  assert os.listdir(tmp_path) == []  # Not an empty lock.json that reads as stale.


# --- what a run depends on is what it recorded ------------------------------------------------

def test_a_zeroed_token_shard_is_refused_naming_it(trained_run, tmp_path, capsys):
  """Zeros are valid token ids: only the checksum the manifest recorded tells them apart."""
  from jaxlm import data
  run = copy_run(trained_run, tmp_path)
  for split in ('validation', 'train'):
    victim = max(run.glob(f'data/*/shards/*.{split}.tokens'), key=lambda p: p.stat().st_size)
    victim.write_bytes(bytes(victim.stat().st_size))
  before = snapshot(run)
  code, _, err = run_cli(capsys, 'eval', f'--workdir={run}')
  assert code == 2 and f'token file {run}' in err and 'does not match the checksum' in err, err
  assert snapshot(run) == before
  config = tiny_config(data__cache_dir=str(run / 'data'),
                       data__tokenizer=str(run / 'tokenizer.model'))
  corpus = data.prepare(config, str(run), objectives.get(config).frame)  # What train reads.
  with pytest.raises(config_lib.ConfigError, match=r'\.train\.tokens does not match'):
    for i in range(len(corpus.train)):
      corpus.train[i]


def test_a_replaced_tokenizer_is_refused_by_the_commands_that_read_the_run(trained_run, tmp_path,
                                                                            capsys):
  run = copy_run(trained_run, tmp_path)
  record = json.loads((run / 'inputs.json').read_text())
  assert record['tokenizer_sha256'] and record['tokenizer'].endswith('tokenizer.model')
  (run / 'inputs.json').write_text(json.dumps(dict(record, tokenizer_sha256='0' * 64)))
  before = snapshot(run)
  for argv in (['eval'], ['generate', '--prompt=x'], ['convert', f'--to-hf={tmp_path}/hf']):
    code, _, err = run_cli(capsys, *argv, f'--workdir={run}')
    assert code == 2 and 'is not the one' in err and 'was trained with' in err, (argv, err)
  assert snapshot(run) == before and not (tmp_path / 'hf').exists()


def test_readers_read_the_newer_checkpoint_when_one_is_deleted_under_them(trained_run, tmp_path,
                                                                         capsys, monkeypatch):
  """A run rotating its checkpoints (keep=1) deletes the one being read once a newer one is
  complete: eval, generate and convert list them again instead of calling it unusable."""
  from jaxlm import checkpoint
  run = copy_run(trained_run, tmp_path)
  real = checkpoint.Checkpointer.restore_params
  calls = []

  def rotated(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) == 1:  # The trainer saves step 6 and deletes 4 and 2 while 4 is read.
      os.rename(run / 'checkpoints' / '4', run / 'checkpoints' / '6')
      shutil.rmtree(run / 'checkpoints' / '2')
      raise FileNotFoundError(f'{run}/checkpoints/4/state/_METADATA')
    return real(self, step, *args, **kwargs)
  monkeypatch.setattr(checkpoint.Checkpointer, 'restore_params', rotated)
  code, out, err = run_cli(capsys, 'eval', f'--workdir={run}')
  assert code == 0, err
  assert json.loads(out)['step'] == 6 and calls == [4, 6] and 'unusable' not in err


# --- corpus files of every kind ----------------------------------------------------------------

@pytest.fixture
def no_hang():
  """Fails a test that blocks (reading a FIFO waits for a writer forever) instead of hanging."""
  import signal

  def expired(*_):
    raise TimeoutError('blocked: a FIFO was read?')
  previous = signal.signal(signal.SIGALRM, expired)
  signal.alarm(60)
  yield
  signal.alarm(0)
  signal.signal(signal.SIGALRM, previous)


def test_fifos_long_texts_long_lines_and_odd_names_in_a_corpus(tmp_path, shared_data,
                                                                monkeypatch, caplog, no_hang):
  from jaxlm.data import shards, sources
  from jaxlm.data import tokenizer as tokenizer_lib
  monkeypatch.setattr(sources, 'PIECE_CHARS', 1000)
  monkeypatch.setattr(sources, 'MAX_LINE_BYTES', 5000)
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  os.mkfifo(corpus / 'pipe.txt')
  long_text = ''.join(f'line {i} of a long document\n' for i in range(400))  # ~11 kB
  (corpus / 'long.txt').write_text(long_text)
  with open(os.path.join(os.fsencode(corpus), b'caf\xe9.txt'), 'w') as f:  # Not UTF-8.
    f.write('a short document')
  (corpus / 'lines.jsonl').write_text(json.dumps({'text': 'x ' * 4000}) + '\n' +
                                      json.dumps({'text': 'kept'}) + '\n')
  _, files = sources.list_files(str(corpus))
  assert len(files) == 3 and 'skipped 1 entries that are not regular files' in caplog.text
  source = config_lib.defaults().data
  source.path = str(corpus)
  assert sources.fingerprint(source)  # Names that are not UTF-8 hash like any other.
  pieces = list(sources.file_documents(str(corpus / 'long.txt'), 'long.txt', 'text',
                                       sources.Skipped()))
  assert len(pieces) > 10 and ''.join(p.text for p in pieces) == long_text
  assert [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]
  skipped = sources.Skipped()
  assert [d.text for d in sources.file_documents(str(corpus / 'lines.jsonl'), 'lines.jsonl',
                                                 'text', skipped)] == ['kept']
  assert skipped == {'JSONL lines over 0 MB': 1}
  tokenizer = tokenizer_lib.load(str(shared_data / 'tokenizer.model'))
  units = shards.plan(source, 1 << 20)
  index = shards.write_shard(str(tmp_path / 'cache'), units[0], source, tokenizer, (2, 3),
                             'uint16', shards.Progress(1, 'test'))
  assert sum(index[s]['documents'] for s in shards.SPLITS) == 3  # The long text is one.


def test_special_files_given_as_inputs_are_refused_not_waited_on(tmp_path, no_hang):
  from jaxlm.data import tokenizer as tokenizer_lib
  os.mkfifo(tmp_path / 'fifo')
  with pytest.raises(config_lib.ConfigError, match='not a regular file'):
    tokenizer_lib.load(str(tmp_path / 'fifo'))
  with pytest.raises(config_lib.ConfigError, match='is not a regular file'):
    config_lib.load(str(tmp_path / 'fifo'))


def test_an_edited_token_manifest_is_a_one_line_error(shared_data, tmp_path):
  from jaxlm.data import store
  original = json.loads(next(shared_data.glob('data/*/manifest.json')).read_text())
  for edit in ({'dtype': 'float8'}, {'train': {'documents': '12', 'tokens': 5}},
               {'shards': [{**original['shards'][0], 'crc32c': {}}]},
               {'shards': [{'id': '../../etc'}]}, {'starts_crc32c': None}):
    (tmp_path / 'manifest.json').write_text(json.dumps({**original, **edit}))
    with pytest.raises(config_lib.ConfigError, match='cannot be read') as e:
      store.read_manifest(str(tmp_path))
    assert '\n' not in str(e.value)


def test_two_writers_of_one_file_keep_each_others_temporary_files(tmp_path):
  """Two `jaxlm tokenize` on one workdir: neither deletes the file the other is writing; a
  killed writer's is removed."""
  import socket
  from jaxlm import paths
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True).stdout.strip()
  host = socket.gethostname()
  names = [f'x.tokens.tmp.{host}.{os.getpid()}', f'x.tokens.tmp.{host}.{dead}',
           f'x.tokens.tmp.{dead}', 'x.tokens.tmp.elsewhere.1']
  for name in names:
    (tmp_path / name).write_text('')
  paths.remove_abandoned_temporaries(str(tmp_path / 'x.tokens'))
  assert sorted(os.listdir(tmp_path)) == sorted([names[0], names[3]])


# --- commands that would write something wrong ---------------------------------------------------

def test_an_async_save_failure_names_the_step_that_failed(tmp_path):
  from jaxlm import checkpoint
  checkpoints = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))

  class Failed:
    def check_for_errors(self):
      pass

    def wait_until_finished(self):  # The background write of step 6 failed.
      raise OSError(f'No space left: {tmp_path}/checkpoints/6.orbax-checkpoint-tmp-17/state')
  real, checkpoints.manager = checkpoints.manager, Failed()
  checkpoints._saving = 6
  with pytest.raises(checkpoint.CheckpointError, match='checkpoint of step 6 under'):
    checkpoints.save(8, None, None, None)
  checkpoints.manager = real
  checkpoints.close()


def test_convert_refuses_a_nan_weight_and_writes_nothing(tmp_path, shared_data, capsys):
  from safetensors.numpy import save_file
  h, f, v, layers = 64, 128, 512, 2
  rng = np.random.default_rng(0)
  shapes = {'model.embed_tokens.weight': (v, h), 'model.norm.weight': (h,),
            'lm_head.weight': (v, h)}
  for i in range(layers):
    for name, shape in (('self_attn.q_proj', (h, h)), ('self_attn.k_proj', (h, h)),
                        ('self_attn.v_proj', (h, h)), ('self_attn.o_proj', (h, h)),
                        ('mlp.gate_proj', (f, h)), ('mlp.up_proj', (f, h)),
                        ('mlp.down_proj', (h, f)), ('input_layernorm', (h,)),
                        ('post_attention_layernorm', (h,))):
      shapes[f'model.layers.{i}.{name}.weight'] = shape
  tensors = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  tensors['model.layers.1.mlp.up_proj.weight'][3, 5] = np.nan
  (tmp_path / 'hf').mkdir()
  save_file(tensors, str(tmp_path / 'hf' / 'model.safetensors'))
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps(HF_LLAMA))
  code, _, err = run_cli(capsys, 'convert', f'--from-hf={tmp_path}/hf', f'--workdir={tmp_path}/run',
                         f'--config.data.tokenizer={shared_data}/tokenizer.model')
  assert code == 2 and 'tensor model.layers.1.mlp.up_proj.weight holds NaN' in err, err
  assert sorted(os.listdir(tmp_path)) == ['hf']  # No run, no half-built directory.


def test_convert_output_follows_the_umask(tmp_path):
  from jaxlm import convert
  previous = os.umask(0o027)
  try:
    convert._build_then_rename(str(tmp_path / 'out'), lambda tmp: None)
  finally:
    os.umask(previous)
  assert (tmp_path / 'out').stat().st_mode & 0o777 == 0o750


def test_a_run_none_of_whose_steps_is_finite_stops_instead_of_training_nothing():
  from types import SimpleNamespace
  from jaxlm import hooks
  from jaxlm.errors import RunError
  some = SimpleNamespace(start=0, step=4, logged={'nonfinite': 3})
  hooks.NonFinite('skip').on_step(some)  # One of four steps trained: go on.
  none = SimpleNamespace(start=4, step=8, logged={'nonfinite': 4})
  with pytest.raises(RunError, match=r'every step of this run so far \(4-8\)'):
    hooks.NonFinite('skip').on_step(none)
