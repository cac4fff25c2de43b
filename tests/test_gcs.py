"""gs:// end to end against a local GCS emulator (gcp-storage-emulator, in memory): train,
SIGKILL, resume bit-exact, eval, generate and convert, every location in the bucket.

The emulator serves the GCS JSON API on 127.0.0.1 (tests/gcs_emulator.py: with the generation
header tensorstore needs); gcsfs and epath find it through STORAGE_EMULATOR_HOST, tensorstore
(under Orbax) through TENSORSTORE_GCS_HTTP_URL.
"""

import json
import logging
import os
import signal
import time

import pytest
from tensorboardX import record_writer

from helpers import (CORPUS, ROOT, gcs_emulator, one_device, rows, shared, start, tiny_config,
                     write_config)
from jaxlm import cli, paths, train, workdir as workdir_lib

BUCKET = 'jaxlm-test'


@pytest.fixture(scope='module')
def gcs():
  """The emulator's environment, also set in this process while the module's tests run."""
  server, env = gcs_emulator(BUCKET)
  with pytest.MonkeyPatch.context() as mp:
    for key, value in env.items():
      mp.setenv(key, value)
    yield env
  # tensorboardX's GCS event writers upload again when collected (their __del__, after the
  # run closed them): with the emulator gone, 120 s of retries at this process's exit.
  record_writer.GCSRecordWriter.__del__ = lambda self: None
  server.kill()
  server.wait()


def upload_corpus(root):
  """The test corpus's files under `root`, keeping their paths below the stdlib directory."""
  files = sorted(f for p in CORPUS.split(',') for f in paths.glob(p))
  base = paths.common_dir(files)
  for f in files:
    with open(f, 'rb') as src:
      paths.atomic_write(paths.join(root, paths.relative(f, base)), src.read())
  return ','.join(f'{root}/{p[len(base) + 1:]}' for p in CORPUS.split(','))


def committed_steps(checkpoints):
  """Steps whose checkpoint Orbax finished writing (on GCS: its commit_success.txt)."""
  if not paths.isdir(checkpoints):
    return []
  return sorted(int(n) for n in paths.listdir(checkpoints)
                if n.isdigit() and paths.exists(paths.join(checkpoints, n, 'commit_success.txt')))


def test_a_run_lives_entirely_in_a_bucket(tmp_path, shared_data, gcs, capsys, caplog):
  bucket = f'gs://{BUCKET}'
  tokenizer = f'{bucket}/tokenizer.model'
  paths.atomic_write(tokenizer, (shared_data / 'tokenizer.model').read_bytes())
  steps = 30
  local = shared(shared_data, train_steps=steps, log_every_steps=1,
                 checkpoint__save_every_steps=10, model__dropout_rate=0.1)
  config = tiny_config(train_steps=steps, log_every_steps=1, checkpoint__save_every_steps=10,
                       model__dropout_rate=0.1, data__path=upload_corpus(f'{bucket}/corpus'),
                       data__tokenizer=tokenizer)
  gs_cfg = write_config(tmp_path / 'gs.py', config)
  run = f'{bucket}/run'

  victim = start(gs_cfg, run)
  deadline = time.time() + 600  # Generous: shared CI machines stall.
  while not committed_steps(f'{run}/checkpoints'):
    assert victim.poll() is None, victim.communicate()[1][-3000:]
    assert time.time() < deadline, 'no checkpoint committed in the bucket'
    time.sleep(0.2)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  saved = committed_steps(f'{run}/checkpoints')
  assert saved[-1] < steps
  # The reference and the resume in this process, on 1 of 8 devices like the killed one.
  caplog.set_level(logging.INFO, logger='jaxlm')
  train.train(local, str(tmp_path / 'reference'), devices=one_device())
  caplog.clear()
  resumed = workdir_lib.read_config(run)  # Its config.json is in the bucket.
  assert train.train(resumed, run, devices=one_device())['step'] == steps
  assert 'resumed from the checkpoint of step' in caplog.text
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))  # Nothing went to local disk.

  expected = rows(tmp_path / 'reference')
  with paths.open(f'{run}/metrics.jsonl') as f:
    got = {}
    for line in f:
      row = json.loads(line)
      got.setdefault(row['step'], {}).update(row)
  for step in range(saved[-1] + 1, steps + 1):  # Bit for bit: the same floats in the JSON.
    assert got[step]['loss'] == expected[step]['loss'], step
  assert got[steps]['eval_loss'] == expected[steps]['eval_loss']
  assert paths.glob(f'{run}/data/*/manifest.json')  # The token shards are in the bucket.
  assert paths.glob(f'{run}/tensorboard/*')

  # The other commands in this process (a jax start each would double the test's time).
  def command(*args):
    assert cli.main(args) == 0
    return capsys.readouterr().out

  out = command('eval', f'--workdir={run}')
  assert json.loads(out)['eval_loss'] == pytest.approx(expected[steps]['eval_loss'], rel=1e-5)
  assert command('generate', f'--workdir={run}', '--prompt=def ', '--max_new_tokens=4').strip()
  command('convert', f'--workdir={run}', f'--to-hf={bucket}/hf')
  assert json.loads(paths.read_text(f'{bucket}/hf/config.json'))['n_layer'] == 2
  command('convert', f'--from-hf={bucket}/hf', f'--workdir={bucket}/imported')
  assert committed_steps(f'{bucket}/imported/checkpoints') == [0]
