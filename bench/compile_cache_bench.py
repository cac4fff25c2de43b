"""The second start with the persistent compilation cache: `jaxlm plan` (which compiles the
train step as a run does) three times in fresh processes - cache off, cold cache, warm cache -
and a table of wall time and the compile's time.

    python bench/compile_cache_bench.py [--configs=gpt_tiny,llama_10m_cpu] [--repeats=1]

On the CPU (a TPU topology plan is not cached: see jaxlm/compile_cache.py). Timings on a
shared machine are noisy; the compile-time ratio is the figure to read.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from table import print_table  # bench/table.py: scripts run from bench/.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(config, cache):
  """(wall seconds of the whole process, seconds its train-step compile took)."""
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAXLM_COMPILE_CACHE': cache, 'JAX_PLATFORMS': 'cpu'}
  begin = time.perf_counter()
  proc = subprocess.run([sys.executable, '-m', 'jaxlm', 'plan', f'--config=configs/{config}.py'],
                        cwd=ROOT, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - begin
  if proc.returncode:
    raise RuntimeError(proc.stderr[-2000:])
  return wall, json.loads(proc.stdout.splitlines()[-1])['compile_s']


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--configs', default='gpt_tiny,llama_10m_cpu')
  parser.add_argument('--repeats', type=int, default=1)
  args = parser.parse_args()
  rows = []
  for config in args.configs.split(','):
    for _ in range(args.repeats):
      with tempfile.TemporaryDirectory() as cache:
        for label, directory in (('off', ''), ('cold (first start)', cache),
                                 ('warm (second start)', cache)):
          wall, compile_s = start(config, directory)
          rows.append({'config': config, 'cache': label, 'process wall s': wall,
                       'train step compile s': compile_s})
  print_table(rows, float_format='.1f')


if __name__ == '__main__':
  main()
