"""What predicting only the masked positions saves: a masked LM's train step compiled with the
head on every position (masking.max_predictions=-1) and on the gathered predictions (0, the
default), for the TPU slice each config is planned for, and prints a table.

    python bench/mlm_head_bench.py [--configs=bert_base,bert_large] [--topology=v5p-8]

Compiler figures (jaxlm plan --topology: the TPU compiler's own memory and cost analysis,
compiled on this machine without a TPU), not measured step times. XLA's cost analysis
counts a scanned layer stack's body once; the head is outside that loop, so the difference
between the rows is the head's whole saving.
"""

import argparse
import contextlib
import importlib.util
import io
import os
import sys

from jaxlm import cli, objectives, plan
from jaxlm import config as config_lib
from jaxlm.errors import ConfigError
from table import print_table  # bench/table.py: scripts run from bench/.

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
GiB = 2 ** 30


def planned_topology(name):
  """The TOPOLOGY a shipped config names (the slice it is planned for)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.TOPOLOGY


def measure(name, max_predictions, topology, overrides):
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  config = config_lib.load(path, [('masking.max_predictions', str(max_predictions)),
                                  *overrides])
  row = {'config': name,
         'max_predictions': objectives.get(config).predictions() or f'all {config.model.max_len}',
         'topology': topology}
  try:
    with contextlib.redirect_stdout(io.StringIO()):  # plan's own report; the table is ours.
      report = plan.run(config, topology=topology)
  except ConfigError as e:  # Does not fit: the compiler's own words are the figure.
    return {**row, 'train step (GiB/chip)': str(e).split(';')[0],
            'temporaries (GiB/chip)': '', 'XLA FLOPs/chip (loop bodies once)': '',
            'model FLOPs/step (formula)': '', 'compile (s)': ''}
  train = report['train_step_bytes']
  return {
      **row,
      'train step (GiB/chip)': train['total'] / GiB,
      'temporaries (GiB/chip)': train['temporaries'] / GiB,
      'XLA FLOPs/chip (loop bodies once)': report['xla_flops_per_step_per_device'],
      'model FLOPs/step (formula)': report['flops_per_step'],
      'compile (s)': report['compile_s'],
  }


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--configs', default='bert_base,bert_large')
  parser.add_argument('--topology', default='', help="default: each config's own TOPOLOGY")
  args, rest = parser.parse_known_args(argv)
  overrides = cli.parse_overrides(rest)
  rows = []
  for name in args.configs.split(','):
    topology = args.topology or planned_topology(name)
    for max_predictions in (-1, 0):
      rows.append(measure(name, max_predictions, topology, overrides))
  print_table(rows)


if __name__ == '__main__':
  main(sys.argv[1:])
