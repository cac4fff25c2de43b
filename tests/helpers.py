"""What the test modules share: the tiny config, subprocess runs of `jaxlm`, metrics readers.

Test modules import from here (`from helpers import tiny_config, start, rows`), never from
one another; fixtures live in conftest.py.

How to write a cheap test here (the whole suite must stay under 20 minutes on 2 CPU cores;
most of a tiny test's time is jax compiling, and starting a Python process that imports jax):
- Start from `tiny_config(**overrides)` (GPT-2 style, 2 layers of width 64, rows of 64 tokens,
  batch 8, 12 steps) with the `shared_data` fixture: `shared(shared_data, ...)` reads its
  tokenizer and token cache, built once a session. Training a tokenizer or tokenizing the
  corpus again costs seconds.
- Need a finished run to read (eval, generate, fill-mask, convert, init_from)? Take a session
  fixture of conftest.py: `trained_causal` (tiny_config, 12 steps, checkpoints 6 and 12),
  `trained_masked` (BERT, 400 steps: it fills masks) or `trained_modernbert` (40 steps); each
  is a TrainedRun(config, workdir, result), trained once per session (per xdist worker) when
  first used. Never write into one: `copy_run(run.workdir, tmp_path)` first to resume it,
  corrupt it or extend it.
- Train in this process: `train.train(config, workdir, one_device())` or `cli.main([...])`.
  Start a subprocess only for what needs one: a signal, a crash, a file-size limit, several
  processes (`start`, `run_local`). Check what follows a kill (the resume, the reference
  run) in this process: `start` trains on 1 of 8 devices as this process does, so the two
  give the same floats, bit for bit.
- Save checkpoints only where checkpoints are under test: tiny_config saves at the end only
  (the schema's save_every_steps=1000); set `checkpoint__save_every_steps` where a test needs
  others.
- Every compile goes through one persistent XLA compilation cache per test run (conftest.py),
  subprocesses included: a program compiled by another test or process with the same XLA
  flags is loaded, not compiled. The train step bakes in its schedule (train_steps, warmup,
  learning rate) and shapes, so reuse tiny_config's where the test does not care; the eval
  step and generation depend on the model and the shapes only. A test that compiles for a TPU
  topology in this process takes the `tpu_compiles` fixture.
- Measure: `python -m pytest tests/test_x.py --durations=0` before and after; the summary line
  at the end counts the programs the test processes loaded and compiled.
"""

import json
import os
import socket
import subprocess
import sys
import sysconfig
import time

from jaxlm import cli, config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = sysconfig.get_paths()['stdlib']
# About 1.3 MB of real Python: enough text for a 512-piece tokenizer and a few dozen rows.
CORPUS = ','.join(os.path.join(STDLIB, p) for p in ('json/*.py', 'email/*.py', 'logging/*.py',
                                                    'http/*.py', 'asyncio/*.py'))
LOCAL = os.path.join(ROOT, 'launch', 'local.sh')


def tiny_config(**overrides):
  """A 2-layer GPT-2-style model on the test corpus; overrides are ('a.b', value) keywords."""
  c = config_lib.defaults('gpt2')
  c.train_steps = 12
  c.batch_size = 8
  c.log_every_steps = 4
  c.eval_every_steps = 0
  c.eval_batches = 2
  c.model.num_layers = 2
  c.model.emb_dim = 64
  c.model.num_heads = 4
  c.model.mlp_dim = 128
  c.model.vocab_size = 512
  c.model.max_len = 64
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 2
  c.data.path = CORPUS
  c.data.tokenizer_sample_bytes = 2_000_000
  c.data.validation_fraction = 0.1
  c.data.num_threads = 1
  for name, value in overrides.items():
    *parents, leaf = name.split('__')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config_lib.validate(c)


def shared(shared_data, **overrides):
  """tiny_config reading the session's tokenizer and token cache (the `shared_data` fixture)."""
  return tiny_config(data__cache_dir=str(shared_data / 'data'),
                     data__tokenizer=str(shared_data / 'tokenizer.model'), **overrides)


def one_device():
  import jax
  return jax.devices()[:1]


def write_config(path, config):
  """A config file (for `jaxlm ... --config=`) that returns `config`."""
  path.write_text('from jaxlm import config\n\n\ndef get_config():\n'
                  f'  return config.from_json({config_lib.to_json(config)!r})\n')
  return str(path)


# ------------------------------------------------------------------------ reading a run


def metrics(workdir):
  """metrics.jsonl as a list of rows, in the order written."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def rows(workdir):
  """metrics.jsonl as {step: row}, the last row of a step winning (a resumed run's)."""
  out = {}
  for row in metrics(workdir):
    out.setdefault(row['step'], {}).update(row)
  return out


def checkpoint_steps(workdir):
  """The steps of the checkpoint directories under workdir/checkpoints, in order."""
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())


def snapshot(path):
  """Every file under `path` with its size and modification time (None if absent)."""
  if not os.path.exists(path):
    return None
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      st_ = os.stat(os.path.join(root, f))
      out[os.path.relpath(os.path.join(root, f), path)] = (st_.st_size, st_.st_mtime_ns)
  return out


def write(path, content):
  """Writes text or bytes to `path`, making its directory."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb' if isinstance(content, bytes) else 'w') as f:
    f.write(content)
  return path


def copy_run(run, tmp_path, name='run'):
  """A private copy of a trained run (a session fixture's) to change or resume."""
  import shutil
  target = tmp_path / name
  shutil.copytree(run, target)
  return target


# ------------------------------------------------------------------- bad-input tables

# The tiny model as command-line overrides of configs/gpt_tiny.py.
TINY = ['--config.model.num_layers=2', '--config.model.emb_dim=64', '--config.model.num_heads=4',
        '--config.model.mlp_dim=128', '--config.model.vocab_size=512',
        '--config.model.max_len=64', '--config.batch_size=8', '--config.train_steps=12',
        '--config.optimizer.warmup_steps=2']


def fill_in(text, tmp, work, shared=''):
  """Fills '{tmp}', '{work}', '{shared}', '{host}', '{pid}' and '{now}' into a table's text."""
  for key, value in (('{tmp}', tmp), ('{work}', work), ('{shared}', shared),
                     ('{host}', socket.gethostname()), ('{pid}', str(os.getpid())),
                     ('{now}', str(time.time()))):
    text = text.replace(key, value)
  return text


def file_content(content, fill):
  """'RUN2': the config.json of a previous 2-layer run; ('RUN2', edits): with edits merged
  in; text: '{tmp}'-style names filled in; bytes as they are."""
  if isinstance(content, bytes):
    return content
  if content == 'RUN2' or isinstance(content, tuple):
    previous = json.loads(config_lib.to_json(config_lib.load(
        os.path.join(ROOT, 'configs', 'gpt_tiny.py'), cli.parse_overrides(TINY))))
    for section, value in (content[1].items() if isinstance(content, tuple) else ()):
      if isinstance(value, dict):
        previous[section].update({k: fill(v) if isinstance(v, str) else v
                                  for k, v in value.items()})
      else:
        previous[section] = value
    return json.dumps(previous)
  return fill(content)


# ------------------------------------------------------------------- jaxlm subprocesses


def env(devices=1):
  """The environment of a `jaxlm` subprocess on `devices` simulated CPU devices (the
  compilation cache of the test run, JAXLM_COMPILE_CACHE, comes with os.environ)."""
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')


# `jaxlm train` as the tests train in-process: on the first of 8 simulated CPU devices (the
# environment's XLA_FLAGS, set by conftest.py). XLA:CPU's float results depend on how many
# devices the process has (1 of 8 is not 1 of 1, bit for bit), so this is what lets a killed
# process be resumed, or compared, in this one. With full_disk, no file may grow past 20 kB,
# like a nearly full disk.
TRAIN = """
import resource, signal, sys
import jax
from jaxlm import cli, train
if sys.argv.pop(1) == 'full_disk':
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
on_all = train.train
train.train = lambda config, workdir, devices=None: on_all(config, workdir, jax.devices()[:1])
sys.exit(cli.main(sys.argv[1:]))
"""


def start(config_path, workdir, *extra, full_disk=False):
  """`jaxlm train` in a subprocess, on one CPU device as in-process tests train (a Popen)."""
  environ = dict(os.environ, PYTHONUNBUFFERED='1')
  if full_disk:  # jax writes cache entries in place: it would leave truncated ones behind.
    environ['JAXLM_COMPILE_CACHE'] = ''
  return subprocess.Popen(
      [sys.executable, '-c', TRAIN, 'full_disk' if full_disk else '-', 'train',
       f'--config={config_path}', f'--workdir={workdir}', *extra], cwd=ROOT, env=environ,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(workdir, step, process, timeout=600):
  """Returns once metrics.jsonl has a training row at `step` or later. The timeout is
  generous (shared CI machines stall); the process is killed if it runs out."""
  deadline = time.time() + timeout
  path = os.path.join(workdir, 'metrics.jsonl')
  while time.time() < deadline:
    assert process.poll() is None, process.communicate()
    if os.path.exists(path) and any(r.get('step', -1) >= step and 'loss' in r
                                    for r in rows(workdir).values()):
      return
    time.sleep(0.05)
  process.kill()
  raise TimeoutError(f'step {step} not reached')


def run_local(processes, *args, timeout=300):
  """`launch/local.sh N -- jaxlm ARGS` with 8 devices in all."""
  return subprocess.run(['bash', LOCAL, str(processes), '--devices-per-process',
                         str(8 // processes), '--', *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, env=env(8 // processes))


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def gcs_emulator(bucket):
  """(server, env): tests/gcs_emulator.py serving `bucket` on a free port, and the environment
  that points gcsfs and epath (STORAGE_EMULATOR_HOST) and tensorstore (under Orbax) at it."""
  port = free_port()
  server = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'tests', 'gcs_emulator.py'), str(port), bucket],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 30
  while True:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=0.5).close()
      break
    except OSError:
      if server.poll() is not None or time.time() > deadline:
        server.kill()
        raise RuntimeError('the GCS emulator did not start') from None
      time.sleep(0.1)
  url = f'http://127.0.0.1:{port}'
  # gcsfs's experimental bucket-type probe needs real credentials (it warns on every call).
  return server, {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
                  'GOOGLE_CLOUD_PROJECT': 'test', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}


def launcher(*args, env_=None, path=None):
  """A launch/ script run by bash with only `env_` and PATH=`path` (the bare_path fixture)."""
  import shutil
  return subprocess.run([shutil.which('bash'), *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=60, env=dict(env_ or {}, PATH=path, HOME='/tmp'))


# -------------------------------------------------------------- steps on a mesh, in-process


# 8 heads so that tensor=8 divides them. A small learning rate: Adam's first steps move every
# weight by about lr whatever its gradient's size, so float reassociation noise in near-zero
# gradients (different reduction orders per mesh) becomes parameter noise proportional to lr.
PARTITION = dict(model__num_heads=8, model__num_kv_heads=8, model__emb_dim=64,
                 model__family='llama', optimizer__warmup_steps=0, train_steps=3,
                 optimizer__learning_rate=3e-4)
# A masked LM (BERT family, bidirectional, masks drawn on device).
MASKED = dict(PARTITION, objective='masked', model__family='bert', model__type_vocab_size=2)


def synthetic_batches(config, count=3):
  """Random tokens, two documents per row."""
  import numpy as np
  rng = np.random.default_rng(0)
  shape = (config.batch_size, config.model.max_len)
  segments = np.ones(shape, np.int32)
  segments[:, shape[1] // 2:] = 2
  positions = np.tile(np.arange(shape[1]) % (shape[1] // 2), (shape[0], 1)).astype(np.int32)
  return [{'tokens': rng.integers(0, config.model.vocab_size, shape).astype(np.int32),
           'segment_ids': segments, 'positions': positions} for _ in range(count)]


def run_steps(config, devices):
  """The compiled train step on synthetic batches: (setup, final state, losses)."""
  from jaxlm import mesh as mesh_lib, run as run_lib, state as state_lib
  s = run_lib.setup(config, devices)
  compiled = run_lib.compile_train_step(s, s.objective.prepare())
  with s.active():
    state = state_lib.initialize(s.model, s.tx, config, s.shardings)
    losses = []
    for batch in synthetic_batches(config):
      state, metrics_ = compiled(state, mesh_lib.to_device(batch, s.batch_sharding))
      losses.append(float(metrics_['loss']))
  return s, state, losses


def train_hf_tokenizer(kind, path, vocab_size=512):
  """A Hugging Face tokenizer.json trained on the test corpus with the `tokenizers` library:
  'bytelevel' (byte-level BPE, GPT-2's kind) or 'wordpiece' (BERT's, lowercasing)."""
  import glob

  import tokenizers
  from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
  texts = [open(f, encoding='utf-8').read()
           for pattern in CORPUS.split(',') for f in sorted(glob.glob(pattern))]
  if kind == 'bytelevel':
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
  else:
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token='[UNK]'))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'],
        show_progress=False)
  tok.train_from_iterator(texts, trainer)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tok.save(str(path))
  return path


# ------------------------------------------------------------------- failures, on purpose

# What launch/local.sh runs as its PYTHON (`faulty_python`) to fail a job on purpose: on start
# number JAXLM_RESTART=r of the job, JAXLM_TEST_FAULTS='r=process:step:action;...' makes that
# process SIGKILL itself once `step` is done and its local save begun, having first deleted
# its local checkpoint tier under JAXLM_TEST_LOCAL_DIR if the action is 'wipe' (a host that
# lost its disk). Other commands (local.sh's free-port probe) run as they are.
FAULTY = """
import glob, os, runpy, shutil, signal, sys
sys.path.insert(0, os.getcwd())  # The checkout launch/local.sh runs in, as `python -m` has it.
import jax
from jaxlm import loop
faults = dict(f.split('=') for f in os.environ['JAXLM_TEST_FAULTS'].split(';'))
fault = faults.get(os.environ.get('JAXLM_RESTART', '0'))
if fault:
  process, step, action = fault.split(':')
  after_step = loop.Loop._after_step
  def failing(self, summary):
    after_step(self, summary)  # Step k's local save has begun: k - 1's is complete.
    if jax.process_index() == int(process) and summary.step == int(step):
      if action == 'wipe':
        for d in glob.glob(os.path.join(os.environ['JAXLM_TEST_LOCAL_DIR'], '*', '*',
                                        f'process_{process}')):
          shutil.rmtree(d)
      os.kill(os.getpid(), signal.SIGKILL)
  loop.Loop._after_step = failing
sys.argv = ['jaxlm', *sys.argv[1:]]
runpy.run_module('jaxlm', run_name='__main__', alter_sys=True)
"""


def faulty_python(directory):
  """An executable for launch/local.sh's PYTHON that runs `-m jaxlm ...` under FAULTY."""
  path = os.path.join(directory, 'faulty_python')
  with open(os.path.join(directory, 'faulty.py'), 'w') as f:
    f.write(FAULTY)
  with open(path, 'w') as f:
    f.write(f'#!/bin/sh\nif [ "$1" = -m ]; then shift 2; exec {sys.executable} '
            f'{directory}/faulty.py "$@"; fi\nexec {sys.executable} "$@"\n')
  os.chmod(path, 0o755)
  return path
