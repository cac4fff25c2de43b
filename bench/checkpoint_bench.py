"""How long a checkpoint save blocks the training loop, and how long the write takes in all.

    python bench/checkpoint_bench.py --config=configs/gpt_tiny.py [--config.a.b=v ...]

Initialises the config's train state on this machine's devices and saves it --saves times
through jaxlm's Checkpointer (async Orbax), timing `save()` (what the loop waits for: the
arrays leave the devices) and `save()` + `wait()` (the files are complete on disk).
"""

import argparse
import shutil
import sys
import tempfile
import time

import numpy as np

from jaxlm import checkpoint, cli, data, flops
from jaxlm import config as config_lib
from jaxlm import state as state_lib
from jaxlm import run as run_lib
from table import print_table  # bench/table.py: scripts run from bench/.


def bench(config, saves):
  s = run_lib.setup(config)
  with s.active():
    state = state_lib.initialize(s.model, s.tx, config, s.shardings)
  rows = data.packing.PackedRows(data.store.TokenStream(
      np.zeros(64 * config.model.max_len, np.uint16), np.array([0, 64 * config.model.max_len])),
      config.model.max_len)
  batches = data.train_iterator(data.train_dataset(rows, config), config)
  directory = tempfile.mkdtemp(prefix='jaxlm_ckpt_bench_')
  ckpt = checkpoint.Checkpointer(directory, config)
  blocking, total = [], []
  try:
    for step in range(1, saves + 1):
      start = time.perf_counter()
      ckpt.save(step, state, batches, config)
      blocking.append(time.perf_counter() - start)
      ckpt.wait()
      total.append(time.perf_counter() - start)
  finally:
    ckpt.close()
    shutil.rmtree(directory)
  state_bytes = state_lib.bytes_per_device(s.abstract_state, s.shardings)
  return {
      'params': flops.param_counts(config.model)['total'],
      'state_mib': state_bytes / 2 ** 20,
      'blocking_s_median': float(np.median(blocking)),
      'blocking_s_max': float(np.max(blocking)),
      'write_s_median': float(np.median(total)),
  }


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--saves', type=int, default=3)
  args, rest = parser.parse_known_args(argv)
  config = config_lib.load(args.config, cli.parse_overrides(rest))
  print_table([bench(config, args.saves)], float_format=',.3f')


if __name__ == '__main__':
  main(sys.argv[1:])
