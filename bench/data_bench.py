"""Input-pipeline throughput against what training consumes, printed as a table.

    python bench/data_bench.py [--config=configs/gpt_tiny.py] [--batches=200] [--workdir=DIR]

Builds (or reuses, in --workdir) the config's tokenizer and token cache, then times the real
training iterator - grain shuffle, packing, batching, background threads - for 1 and 2 threads.
Beside it: the tokens/s that models consume, from the FLOP count 6N + 12LHQT: the tiny config
at its measured CPU speed (BENCHMARKS.md) and larger configs on one H100 at 50% MFU, with the
number of threads each needs at the measured per-thread rate.
"""

import argparse
import math
import os
import sys
import tempfile
import time

from jaxlm import cli, data, flops, objectives
from jaxlm import config as config_lib
from table import print_table  # bench/table.py: scripts run from bench/.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_TINY_TOKENS_PER_S = 3492  # bench/train_bench.py, gpt_tiny on cpu-2c (BENCHMARKS.md).
H100_PEAK, TARGET_MFU = flops.PEAK_FLOPS['NVIDIA H100'], 0.5


def pipeline_tokens_per_s(corpus, config, num_threads, num_batches):
  config.data.num_threads = num_threads
  batches = data.train_iterator(data.train_dataset(corpus.train, config), config)
  next(batches)  # Starts the threads.
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  return num_batches * config.batch_size * config.model.max_len / (time.perf_counter() - start)


def consumers():
  rows = [('gpt_tiny on cpu-2c (measured)', CPU_TINY_TOKENS_PER_S)]
  for name in ('gpt2_124m', 'llama_1b'):
    config = config_lib.load(os.path.join(ROOT, 'configs', f'{name}.py'))
    rows.append((f'{name} on 1 H100 at 50% MFU', TARGET_MFU * H100_PEAK /
                  flops.of_run(config, objectives.get(config).predictions())))
  return rows


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'gpt_tiny.py'))
  parser.add_argument('--batches', type=int, default=200)
  parser.add_argument('--workdir', default='')
  args, rest = parser.parse_known_args(argv)
  config = config_lib.load(args.config, cli.parse_overrides(rest))
  workdir = args.workdir or tempfile.mkdtemp(prefix='data_bench_')
  corpus = data.prepare(config, workdir, objectives.get(config).frame)
  rates = {n: pipeline_tokens_per_s(corpus, config, n, args.batches) for n in (1, 2)}
  print(f'pipeline: batches of {config.batch_size} x {config.model.max_len} tokens, '
        f'{len(corpus.train):,} packed rows')
  print_table([{'threads': n, 'tokens/s': f'{rate:,.0f}'} for n, rate in rates.items()])
  print()
  print_table([{'consumer': name, 'tokens/s needed': f'{need:,.0f}',
                'pipeline / need (2 threads)': f'{rates[2] / need:,.1f}x',
                'threads needed': max(1, math.ceil(need / rates[1]))}
               for name, need in consumers()])


if __name__ == '__main__':
  main(sys.argv[1:])
