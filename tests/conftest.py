"""Shared fixtures: a small real corpus (part of the Python standard library), one tokenizer
trained on it once per session, a tiny model config that compiles in seconds, eight simulated
CPU devices, and one persistent compilation cache for the whole test run.

Plain helpers (tiny_config, subprocess runs, metrics readers) are in helpers.py, with notes on
how to write a cheap test; the names below are imported from there for older tests."""

import collections
import os
import shutil
import tempfile

# Eight simulated CPU devices for the partitioning tests; set before anything imports jax.
# Single-device tests pass `devices=jax.devices()[:1]`.
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache (jaxlm/compile_cache.py) per test run, never the user's:
# the same tiny programs compile in many tests and `jaxlm` subprocesses, and are loaded from
# it after their first compile. The first process to load this file (pytest itself, or the
# xdist controller) makes the directory; xdist workers and every subprocess inherit it
# through JAXLM_COMPILE_CACHE. A test of the cache itself sets its own directory.
# JAXLM_TEST_COMPILE_CACHE=DIR keeps one across runs instead (while editing a test, say).
_OWN_CACHE = None
if os.environ.get('JAXLM_TEST_COMPILE_CACHE'):
  os.environ['JAXLM_COMPILE_CACHE'] = os.environ['JAXLM_TEST_COMPILE_CACHE']
elif 'PYTEST_XDIST_WORKER' not in os.environ:
  os.environ['JAXLM_COMPILE_CACHE'] = _OWN_CACHE = tempfile.mkdtemp(prefix='jaxlm-test-xla-')
os.environ['JAXLM_PEAK_CACHE'] = ''  # Nor the measured CPU peak (jaxlm/flops.py).

import pytest

from helpers import (CORPUS, ROOT, STDLIB, one_device, shared, tiny_config,  # noqa: F401
                     train_hf_tokenizer)


# Programs loaded from the cache ('hits') and compiled ('misses') by the test processes, for
# the summary line at the end of a run (subprocesses use the cache too, uncounted).
_CACHE_EVENTS = collections.Counter()


def _count_cache_event(event, **_):
  if event in ('/jax/compilation_cache/cache_hits', '/jax/compilation_cache/cache_misses'):
    _CACHE_EVENTS[event.rsplit('_', 1)[1]] += 1


def pytest_configure(config):
  """In-process compiles use the run's cache too (the CLI enables it for subprocesses)."""
  if getattr(config.option, 'numprocesses', None) and not hasattr(config, 'workerinput'):
    return  # The xdist controller runs no test: it need not import jax.
  from jax._src import monitoring
  from jaxlm import compile_cache
  compile_cache.enable(tiny_config())
  monitoring.register_event_listener(_count_cache_event)


def pytest_sessionfinish(session):
  if hasattr(session.config, 'workeroutput'):  # An xdist worker: hand the counts over.
    session.config.workeroutput['compile_cache'] = dict(_CACHE_EVENTS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  _CACHE_EVENTS.update(getattr(node, 'workeroutput', {}).get('compile_cache', {}))


def pytest_terminal_summary(terminalreporter):
  path = os.environ['JAXLM_COMPILE_CACHE']
  if _CACHE_EVENTS and os.path.isdir(path):
    entries = sum(name.endswith('-cache') for name in os.listdir(path))
    terminalreporter.write_line(
        f'compilation cache {path}: {entries} programs; the test processes loaded '
        f'{_CACHE_EVENTS["hits"]} and compiled {_CACHE_EVENTS["misses"]}')


@pytest.fixture
def tpu_compiles():
  """For a test that compiles for a TPU topology (libtpu's compile-only devices) in this
  process: jax 0.10.2 cannot load such an executable back, so none is written to the run's
  compilation cache (a 7B model's would be large, and of no use)."""
  import jax
  from jaxlm import compile_cache
  jax.config.update('jax_persistent_cache_min_compile_time_secs', float('inf'))
  yield
  jax.config.update('jax_persistent_cache_min_compile_time_secs', compile_cache.MIN_COMPILE_S)


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope='session')
def shared_data(tmp_path_factory):
  """A tokenizer and token cache built once and reused by every test's workdir."""
  root = tmp_path_factory.mktemp('shared_data')
  config = tiny_config()
  from jaxlm import data, objectives
  # Trains tokenizer.model and fills root/data.
  data.prepare(config, str(root), objectives.get(config).frame)
  return root


@pytest.fixture(scope='session')
def hf_tokenizers(tmp_path_factory):
  """{'bytelevel': path, 'wordpiece': path} of tokenizer.json files, trained once."""
  root = tmp_path_factory.mktemp('hf_tokenizers')
  return {kind: train_hf_tokenizer(kind, root / kind / 'tokenizer.json')
          for kind in ('bytelevel', 'wordpiece')}


TOOLS = ('bash', 'sed', 'tar', 'dirname', 'cat', 'env', 'python3', 'mkdir', 'sleep')


@pytest.fixture(scope='session')
def bare_path(tmp_path_factory):
  """A PATH holding only basic tools: no gcloud, srun or sbatch, whatever this machine has
  (for helpers.launcher)."""
  bin_dir = tmp_path_factory.mktemp('bin')
  for tool in TOOLS:
    found = shutil.which(tool)
    if found:
      os.symlink(found, bin_dir / tool)
  return str(bin_dir)


@pytest.fixture
def workdir(tmp_path, shared_data):
  """A fresh workdir pre-seeded with the shared tokenizer (as a finished run would have it)."""
  shutil.copy(shared_data / 'tokenizer.model', tmp_path / 'tokenizer.model')
  return tmp_path


@pytest.fixture
def config(shared_data):
  """The tiny config, reading the shared token cache."""
  return tiny_config(data__cache_dir=str(shared_data / 'data'))


# ------------------------------------------------------------------------- trained runs
# Finished runs that many tests read (eval, generate, fill-mask, convert, init_from, resume).
# Each is trained once per session (per xdist worker) on first use. Read them only: a test
# that changes or resumes one works on `helpers.copy_run(run.workdir, tmp_path)`.


TrainedRun = collections.namedtuple('TrainedRun', 'config workdir result')  # workdir: a str.


def _train_once(tmp_path_factory, shared_data, name, config):
  from jaxlm import train
  workdir = tmp_path_factory.mktemp(name)
  shutil.copy(shared_data / 'tokenizer.model', workdir / 'tokenizer.model')
  return TrainedRun(config, str(workdir), train.train(config, str(workdir), one_device()))


@pytest.fixture(scope='session')
def trained_causal(tmp_path_factory, shared_data):
  """tiny_config (GPT-2 style) trained 12 steps on the shared token cache: checkpoints 6, 12;
  evaluated at steps 0 and 12."""
  return _train_once(tmp_path_factory, shared_data, 'trained_causal',
                     shared(shared_data, checkpoint__save_every_steps=6))


@pytest.fixture(scope='session')
def trained_masked(tmp_path_factory, shared_data):
  """A BERT masked LM trained 400 steps (batch 16): it learns enough to fill masks. Evaluated
  at steps 0, 200 and 400; one checkpoint, 400; its token cache in its workdir."""
  config = tiny_config(objective='masked', model__family='bert', train_steps=400,
                       log_every_steps=100, eval_every_steps=200, eval_batches=4,
                       batch_size=16, optimizer__learning_rate=3e-3,
                       optimizer__warmup_steps=10)
  return _train_once(tmp_path_factory, shared_data, 'trained_masked', config)


@pytest.fixture(scope='session')
def trained_modernbert(tmp_path_factory, shared_data):
  """model.family='modernbert' (pre-norm, RoPE, gated GELU, no biases) trained as a masked LM
  for 40 steps at a masking rate of 0.3; one checkpoint, 40; its token cache in its workdir."""
  config = tiny_config(objective='masked', model__family='modernbert', masking__rate=0.3,
                       train_steps=40, log_every_steps=20)
  return _train_once(tmp_path_factory, shared_data, 'trained_modernbert', config)
