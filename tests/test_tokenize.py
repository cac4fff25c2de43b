"""`jaxlm tokenize`: token shards written in parallel by every process, the same whatever their
number; resumed after a kill; bounded memory; a changed corpus refused; compressed inputs."""

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, run_local, tiny_config, write_config
from jaxlm import data, objectives
from jaxlm.config import ConfigError
from jaxlm.data import packing, shards, sources

WORDS = ('the of and a to in is you that it he was for on are as with his they I at be this '
         'have from or one had by word but not what all were we when your can said there use '
         'an each which she do how their if will up other about out many then them these so '
         'def return import class self None True False 0 1 2 3 42 1999 café naïve').split()


def write_corpus(folder, files, docs_per_file, seed=0, compress=()):
  """JSONL files of random-word documents (some gzip-compressed); returns the glob."""
  rng = random.Random(seed)
  os.makedirs(folder, exist_ok=True)
  for i in range(files):
    lines = ''.join(json.dumps({'text': ' '.join(rng.choice(WORDS)
                                                 for _ in range(rng.randint(20, 300)))}) + '\n'
                    for _ in range(docs_per_file))
    name = os.path.join(folder, f'part-{i:03d}.jsonl')
    if i in compress:
      with gzip.open(name + '.gz', 'wt') as f:
        f.write(lines)
    else:
      with open(name, 'w') as f:
        f.write(lines)
  return os.path.join(folder, '*')


def files_of(directory):
  """{relative path: bytes} of every file below `directory`."""
  out = {}
  for root, _, names in os.walk(directory):
    for n in names:
      with open(os.path.join(root, n), 'rb') as f:
        out[os.path.relpath(os.path.join(root, n), directory)] = f.read()
  return out


@pytest.fixture(scope='module')
def corpus(tmp_path_factory, shared_data):
  """A 12-file JSONL corpus (two files gzipped) in 6 shards, tokenized by one process."""
  root = tmp_path_factory.mktemp('tokenize')
  path = write_corpus(str(root / 'corpus'), 12, 60, compress=(3, 7))
  config = tiny_config(data__path=path, data__tokenizer=str(shared_data / 'tokenizer.model'),
                       data__shard_bytes=60_000, data__cache_dir=str(root / 'one'))
  data.tokenize(config, str(root / 'run1'), objectives.get(config).frame)
  return root, config


def cached_in(config, cache_dir):
  """A copy of the config with its shards in `cache_dir`."""
  config = config.copy_and_resolve_references()
  config.data.cache_dir = str(cache_dir)
  return config


def test_two_processes_write_the_shards_of_one_and_batches_match_for_1_2_4(corpus):
  root, config = corpus
  [one] = [os.path.join(root, 'one', d) for d in os.listdir(root / 'one')]
  manifest = json.loads(open(os.path.join(one, 'manifest.json')).read())
  assert len(manifest['shards']) >= 4 and manifest['train']['documents'] > 600
  config = cached_in(config, root / 'two')
  path = write_config(root / 'cfg.py', config)
  result = run_local(2, 'tokenize', f'--config={path}', f'--workdir={root}/run2', timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.splitlines()[-1])['sources'][0]['train'] == manifest['train']
  assert 'tokens/s' in result.stderr and ' left' in result.stderr  # The progress line...
  assert f'train {manifest["train"]["documents"]:,} documents' in result.stderr  # ... counts.
  [two] = [os.path.join(root, 'two', d) for d in os.listdir(root / 'two')]
  assert files_of(one) == files_of(two)  # Byte for byte, manifest included.

  # Opens the manifest: nothing to do.
  corpus_ = data.prepare(config, str(root / 'run2'), objectives.get(config).frame)
  whole = data.train_dataset(corpus_.train, config)
  for count in (2, 4):
    parts = [data.train_dataset(corpus_.train, config, p, count) for p in range(count)]
    for step in (0, 7, 50):
      np.testing.assert_array_equal(
          np.concatenate([part[step]['tokens'] for part in parts]), whole[step]['tokens'])
  # The documents, in order, are those of the corpus (gzip read like plain JSONL).
  names = [d.name for d in sources.iter_documents(config.data)]
  train = [n for n in names if not sources.sampled(n, config.data.validation_fraction)]
  assert corpus_.train.stream.num_documents == len(train) and 'part-003.jsonl.gz:1' in names


SLOW_WRITER = '''
import sys, time
from jaxlm import cli
from jaxlm.data import shards
shards.BATCH_BYTES_PER_THREAD = 4_000
batches = shards._batches
def slow(documents):
  for batch in batches(documents):
    time.sleep(0.05)
    yield batch
shards._batches = slow
sys.exit(cli.main(sys.argv[1:]))
'''


def test_an_interrupted_tokenize_resumes_keeping_finished_shards(corpus):
  root, config = corpus
  config = cached_in(config, root / 'killed')
  path = write_config(root / 'cfg_killed.py', config)
  args = ['tokenize', f'--config={path}', f'--workdir={root}/run3']
  victim = subprocess.Popen([sys.executable, '-c', SLOW_WRITER, *args], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  index_files = lambda: sorted(str(p) for p in (root / 'killed').glob('*/shards/*.json'))
  while len(index_files()) < 2:
    assert victim.poll() is None and time.time() < deadline
    time.sleep(0.02)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  [directory] = list((root / 'killed').iterdir())
  assert not (directory / 'manifest.json').exists()
  finished = {}
  for index_path in index_files():  # Every finished shard is whole.
    index = json.loads(open(index_path).read())
    for split in shards.SPLITS:
      base = index_path[:-len('.json')]
      assert os.path.getsize(f'{base}.{split}.tokens') == 2 * index[split]['tokens']
      assert os.path.getsize(f'{base}.{split}.ends') == 8 * index[split]['documents']
      finished.update({f: os.stat(f).st_mtime_ns for f in (f'{base}.{split}.tokens', index_path)})
  assert len(finished) < 3 * 6  # Killed before the end.

  data.tokenize(config, str(root / 'run3'), objectives.get(config).frame)  # Resumes.
  assert {f: os.stat(f).st_mtime_ns for f in finished} == finished  # Not rewritten.
  [one] = list((root / 'one').iterdir())
  assert files_of(directory) == files_of(one)  # As if never interrupted; no temporary left.


def test_a_file_changed_after_tokenizing_is_refused_then_only_its_shard_redone(
    corpus, capsys, tmp_path):
  import shutil
  root, config = corpus
  shutil.copytree(root / 'corpus', tmp_path / 'corpus')
  config = cached_in(config, tmp_path / 'changed')
  config.data.path = str(tmp_path / 'corpus' / '*')
  data.tokenize(config, str(root / 'run4'), objectives.get(config).frame)
  [directory] = list((tmp_path / 'changed').iterdir())
  before = {p.name: p.stat().st_mtime_ns for p in (directory / 'shards').iterdir()}
  victim = tmp_path / 'corpus' / 'part-005.jsonl'
  victim.write_text(victim.read_text().replace('the', 'THE', 3))
  with pytest.raises(ConfigError, match=r'changed since it was tokenized into .*\(part-005.jsonl '
                                        r'is new or changed\); run `jaxlm tokenize`'):
    data.prepare(config, str(root / 'run4'), objectives.get(config).frame)
  path = write_config(tmp_path / 'cfg_changed.py', config)
  from jaxlm import cli
  assert cli.main(['tokenize', f'--config={path}', f'--workdir={root}/run4']) == 0
  out = json.loads(capsys.readouterr().out)
  assert out['sources'][0]['train']['documents'] > 600
  after = {p.name: p.stat().st_mtime_ns for p in (directory / 'shards').iterdir()}
  kept = [n for n in before if after.get(n) == before[n]]
  assert len(after) - len(before) == 5 and len(kept) == len(before)  # One new shard.
  corpus_ = data.prepare(config, str(root / 'run4'), objectives.get(config).frame)
  assert corpus_.train.stream.num_documents > 0


MEMORY_PROBE = '''
import json, os, sys, threading, time
from jaxlm import host_memory
host_memory.keep_host_memory()  # As the jaxlm command does on a CPU host: one malloc arena.
from jaxlm import config as config_lib, data, objectives
import jax; jax.process_count()
config = config_lib.from_json(open(sys.argv[1]).read())
data.get_tokenizer(config, sys.argv[2]).encode(['warm up the threads'] * 64)
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
before, peak, done = rss(), [0], threading.Event()
def watch():  # The peak of the resident set while tokenizing, sampled every 5 ms.
  while not done.is_set():
    peak[0] = max(peak[0], rss())
    time.sleep(0.005)
watcher = threading.Thread(target=watch)
watcher.start()
data.tokenize(config, sys.argv[2], objectives.get(config).frame)
done.set()
watcher.join()
print(json.dumps({'growth_mb': (peak[0] - before) / 2**20}))
'''


def test_memory_stays_bounded_on_a_corpus_larger_than_the_limit(tmp_path, shared_data):
  """The resident set grows by less than a limit while tokenizing a corpus larger than it, and
  by about as much as for a corpus a sixth of its size."""
  from jaxlm import config as config_lib
  limit_mb, growth = 12, {}
  for files in (2, 12):  # About 1.6 MB of JSONL each: 19 MB at most.
    path = write_corpus(str(tmp_path / f'c{files}'), files, 2400, seed=files)
    size_mb = sum(os.path.getsize(p) for p in (tmp_path / f'c{files}').iterdir()) / 2**20
    config = tiny_config(data__path=path, data__tokenizer=str(shared_data / 'tokenizer.model'),
                  data__shard_bytes=4_000_000, data__cache_dir=str(tmp_path / f'cache{files}'))
    (tmp_path / 'config.json').write_text(config_lib.to_json(config))
    out = subprocess.run([sys.executable, '-c', MEMORY_PROBE, str(tmp_path / 'config.json'),
                          str(tmp_path / f'run{files}')], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    growth[files] = json.loads(out.stdout.splitlines()[-1])['growth_mb']
  assert size_mb > limit_mb, (size_mb, growth)
  assert growth[12] < limit_mb and growth[12] < growth[2] + 4, growth


def test_first_fit_layouts_are_stored_per_row_length(corpus):
  root, config = corpus
  config = cached_in(config, root / 'one')
  config.data.packing = 'first_fit'
  frame = objectives.get(config).frame
  first = data.prepare(config, str(root / 'run1'), frame)
  [directory] = list((root / 'one').iterdir())
  assert (directory / 'first_fit-64.train.npy').exists()
  again = data.prepare(config, str(root / 'run1'), frame)  # From the stored layout.
  computed = packing.FirstFitRows(again.train.stream, 64)
  for i in (0, len(computed) // 2, len(computed) - 1):
    for k in ('tokens', 'segment_ids', 'positions'):
      np.testing.assert_array_equal(again.train[i][k], computed[i][k])
  assert len(first.train) == len(computed)
  shorter = data.repack(again.train, config, 32)  # A sequence-length phase: computed, stored.
  assert len(shorter) > len(computed) and (directory / 'first_fit-32.train.npy').exists()
  for i in (0, len(shorter) - 1):
    np.testing.assert_array_equal(data.repack(again.train, config, 32)[i]['tokens'],
                                  packing.FirstFitRows(again.train.stream, 32)[i]['tokens'])


def test_the_tokenizer_sample_reads_prefixes_of_a_few_seeded_files(tmp_path, monkeypatch):
  write_corpus(str(tmp_path), 200, 30)  # About 6 MB.
  real, opened = sources.file_documents, []

  def counting(path, *args):
    opened[-1].append(path)
    yield from real(path, *args)
  monkeypatch.setattr(sources, 'file_documents', counting)
  config = tiny_config(data__path=str(tmp_path / '*'))
  texts = {}
  for run, seed in enumerate((0, 0, 1)):
    opened.append([])
    texts[run] = [d.text for d in sources.sample_documents(config.data, 200_000, seed)]
  assert 32 < len(opened[0]) <= sources.MAX_SAMPLE_FILES  # A few files...
  assert 190_000 < sum(map(len, texts[0])) < 204_000  # ... the budget read from their starts.
  assert opened[0] == opened[1] and texts[0] == texts[1]  # Chosen by the seed.
  assert opened[2] != opened[0]


def test_compressed_jsonl_is_read_and_zstd_needs_its_module(tmp_path):
  with gzip.open(tmp_path / 'a.jsonl.gz', 'wt') as f:
    f.write('{"text": "inside gzip"}\n')
  whole = gzip.compress(''.join(f'{{"text": "line {i}"}}\n' for i in range(5000)).encode())
  (tmp_path / 'b.jsonl.gz').write_bytes(whole[:len(whole) // 2])  # Cut short in a copy.
  config = tiny_config(data__path=str(tmp_path / '*.gz'))
  skipped = sources.Skipped()
  texts = [d.text for d in sources.iter_documents(config.data, skipped)]
  assert texts[0] == 'inside gzip' and 1 < len(texts) < 5001  # The lines before the cut.
  assert texts[1:] == [f'line {i}' for i in range(len(texts) - 1)]
  assert list(skipped) == ['compressed files cut short or corrupt (EOFError)']
  try:
    import zstandard
  except ImportError:
    (tmp_path / 'c.jsonl.zst').write_bytes(b'\x28\xb5\x2f\xfd')
    with pytest.raises(ConfigError, match='zstd-compressed and the zstandard module is not '
                                          'installed: pip install zstandard'):
      list(sources.iter_documents(tiny_config(data__path=str(tmp_path / '*.zst')).data))
  else:
    (tmp_path / 'c.jsonl.zst').write_bytes(
        zstandard.ZstdCompressor().compress(b'{"text": "inside zstd"}\n'))
    docs = sources.iter_documents(tiny_config(data__path=str(tmp_path / '*.zst')).data)
    assert [d.text for d in docs] == ['inside zstd']


def test_tfds_record_ranges_are_units_and_give_the_stream_of_one(tmp_path, shared_data,
                                                                   monkeypatch):
  import tensorflow_datasets as tfds
  config = tiny_config(data__path='', data__tfds_name='lm1b', model__max_len=16,
                       data__validation_fraction=0.2,
                       data__tokenizer=str(shared_data / 'tokenizer.model'))
  streams = {}
  with tfds.testing.mock_data(num_examples=60, policy=tfds.testing.MockPolicy.USE_CODE):
    for per_unit in (16, 1000):
      monkeypatch.setattr(shards, 'TFDS_RECORDS_PER_UNIT', per_unit)
      config.data.cache_dir = str(tmp_path / str(per_unit))
      frame = objectives.get(config).frame
      _, [(_, _, manifest)] = data.tokenize(config, str(tmp_path), frame)
      corpus_ = data.prepare(config, str(tmp_path), frame)
      streams[per_unit] = (len(manifest['shards']), np.asarray(corpus_.train.stream.tokens))
  assert streams[16][0] == 4 and streams[1000][0] == 1
  np.testing.assert_array_equal(streams[16][1], streams[1000][1])
