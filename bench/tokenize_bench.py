"""`jaxlm tokenize` on a generated JSONL corpus: tokens/s with 1 and N local processes, peak
resident memory of each process at two corpus sizes, the input's start-up time with the
manifest present, and the rates against what llama_1b consumes on an H100 at 50% MFU.

    python bench/tokenize_bench.py [--runs 200x1 200x2 1000x2] [--root DIR] [--keep]

A run `SxP` tokenizes an S MB corpus with P processes (launch/local.sh's way: joined by
jax.distributed on localhost). The corpus is JSONL files of 32 MB, documents drawn from a pool
of stretches of real text; the tokenizer (configs/gpt_tiny.py's: 4096 BPE pieces) is trained once
by the first run, from its bounded sample, and then given to the others.
"""

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from jaxlm.data import sources
from table import print_table  # bench/table.py: scripts run from bench/.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILE_MB = 32
# Runs `jaxlm` (with the jaxlm command's allocator settings) and reports its peak resident
# memory: VmHWM, since ru_maxrss keeps the parent's resident set from before the exec.
MAIN = ('import sys\nfrom jaxlm import cli, host_memory\nhost_memory.keep_host_memory()\n'
        'code = cli.main(sys.argv[1:])\nhwm = [l for l in open("/proc/self/status") '
        'if l.startswith("VmHWM")][0].split()[1]\n'
        'print("PEAK_RSS_MB", int(hwm) / 1024, file=sys.stderr)\nsys.exit(code)\n')


def make_corpus(folder, size_mb, seed=0):
  """JSONL files of FILE_MB until `size_mb`; documents are random stretches (300-8000
  characters) of the Python standard library's source: real text, drawn from a pool."""
  rng = random.Random(seed)
  _, files = sources.stdlib_files()
  text = ''.join(open(f, encoding='utf-8', errors='replace').read() for f in files[:2000])
  pool = []
  for _ in range(3000):
    start, length = rng.randrange(len(text) - 8000), rng.randint(300, 8000)
    pool.append(json.dumps({'text': text[start:start + length]}) + '\n')
  os.makedirs(folder, exist_ok=True)
  written, index = 0, 0
  while written < size_mb * 2**20:
    path = os.path.join(folder, f'part-{index:05d}.jsonl')
    with open(path, 'w') as f:
      size = 0
      while size < min(FILE_MB, size_mb - written / 2**20) * 2**20:
        line = rng.choice(pool)
        size += len(line)
        f.write(line)
    written += size
    index += 1
  return os.path.join(folder, '*.jsonl')


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def jaxlm(processes, args):
  """Runs `jaxlm ARGS` as `processes` processes; (seconds, [peak RSS MB], last stdout line)."""
  port, procs = free_port(), []
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  start = time.perf_counter()
  for i in range(processes):
    extra = {} if processes == 1 else dict(JAXLM_COORDINATOR=f'127.0.0.1:{port}',
                                           JAXLM_NUM_PROCESSES=str(processes),
                                           JAXLM_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, '-c', MAIN, *args], cwd=ROOT,
                                  env=dict(env, **extra), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = [p.communicate() for p in procs]
  seconds = time.perf_counter() - start
  for p, (_, err) in zip(procs, outs):
    if p.returncode:
      raise SystemExit(f'jaxlm {" ".join(args)} failed:\n{err[-3000:]}')
  rss = [float(line.split()[1]) for _, err in outs for line in err.splitlines()
         if line.startswith('PEAK_RSS_MB')]
  return seconds, rss, outs[0][0].strip().splitlines()[-1]


STARTUP = '''
import sys, time
start = time.perf_counter()
from jaxlm import config as config_lib, data, objectives
config = config_lib.load(sys.argv[1], [('data.path', sys.argv[2]), ('data.tokenizer', sys.argv[3]),
                                       ('data.cache_dir', sys.argv[4])])
import jax; jax.process_count()
imported = time.perf_counter()
corpus = data.prepare(config, sys.argv[5], objectives.get(config).frame)
batches = data.train_iterator(data.train_dataset(corpus.train, config), config)
next(batches)
ready = time.perf_counter() - imported
count = 200
t = time.perf_counter()
for _ in range(count):
  next(batches)
rate = count * config.batch_size * config.model.max_len / (time.perf_counter() - t)
print(imported - start, ready, rate)
'''


def startup(config_path, corpus, tokenizer, cache_dir, workdir):
  """Seconds a fresh process spends importing jaxlm and jax, then from there to the first
  training batch (opening the manifest, checking the fingerprint, packing), and the training
  iterator's tokens/s from the shards."""
  out = subprocess.run([sys.executable, '-c', STARTUP, config_path, corpus, tokenizer, cache_dir,
                        workdir], cwd=ROOT, capture_output=True, text=True, check=True,
                       env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'))
  return tuple(map(float, out.stdout.split()[-3:]))


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', nargs='+', default=['200x1', '200x2', '1000x2'])
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'gpt_tiny.py'))
  parser.add_argument('--root', default='')
  parser.add_argument('--keep', action='store_true', help='keep the corpora and shards')
  args = parser.parse_args(argv)
  root = args.root or tempfile.mkdtemp(prefix='tokenize_bench_')
  tokenizer, rows, corpora = '', [], {}
  for run in args.runs:
    size_mb, processes = map(int, run.split('x'))
    if size_mb not in corpora:
      corpora[size_mb] = make_corpus(os.path.join(root, f'corpus{size_mb}'), size_mb)
    workdir = os.path.join(root, f'run{run}')
    flags = [f'--config={args.config}', f'--workdir={workdir}',
             f'--config.data.path={corpora[size_mb]}', '--config.data.shard_bytes=32000000',
             f'--config.data.cache_dir={workdir}/data']
    if tokenizer:
      flags.append(f'--config.data.tokenizer={tokenizer}')
    seconds, rss, last = jaxlm(processes, ['tokenize', *flags])
    result = json.loads(last)
    source = result['sources'][0]
    tokens = source['train']['tokens'] + source['validation']['tokens']
    rows.append({'corpus MB': size_mb, 'processes': processes, 'shards': source['shards'],
                 'tokens': tokens, 'wall s': round(seconds, 1),
                 'tokens/s': round(tokens / seconds),
                 'MB/s': round(size_mb / seconds, 2),
                 'peak RSS MB per process': ' / '.join(f'{r:.0f}' for r in rss),
                 'tokenizer': 'trained here' if not tokenizer else 'given'})
    tokenizer = tokenizer or result['tokenizer']
    print(json.dumps(rows[-1]), flush=True)
  print_table(rows)
  last = args.runs[-1]
  size_mb = int(last.split('x')[0])
  workdir = os.path.join(root, f'run{last}')
  imports, ready, rate = startup(args.config, corpora[size_mb], tokenizer, f'{workdir}/data',
                        os.path.join(root, 'startup'))
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from data_bench import consumers
  need = dict(consumers())['llama_1b on 1 H100 at 50% MFU']
  best = max(r['tokens/s'] for r in rows)
  print()
  print_table([
      {'what': f'start-up to the first batch, manifest present ({size_mb} MB corpus)',
       'value': f'{ready:.2f} s (after {imports:.1f} s of imports)'},
      {'what': 'training iterator from the shards (1 process, 2 threads)',
       'value': f'{rate:,.0f} tokens/s = {rate / need:.1f}x llama_1b on 1 H100 at 50% MFU'},
      {'what': 'llama_1b on 1 H100 at 50% MFU consumes', 'value': f'{need:,.0f} tokens/s'},
      {'what': 'best tokenize rate above', 'value': f'{best:,.0f} tokens/s = '
                                                    f'{best / need:.2f}x that consumption'}])
  if not args.keep and not args.root:
    shutil.rmtree(root)


if __name__ == '__main__':
  main(sys.argv[1:])
