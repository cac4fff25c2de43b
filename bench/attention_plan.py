"""XLA attention against Pallas splash on a TPU slice, by the TPU compiler's own figures: the
train step of a config compiled ahead of time for `--topology` (libtpu's compile-only devices)
at several sequence lengths, per-chip HBM and XLA's cost analysis.

    python bench/attention_plan.py --config=configs/llama_7b_tpu_v5p.py --topology=v5p-128 \
        --lengths=4096,8192 [--override=model.remat_policy=minimal ...]

Compiler figures, not measurements: nothing runs on a TPU. The batch keeps the config's tokens
per step (sequences x length). Each case compiles in a process of its own.
"""

import argparse
import json
import os
import subprocess
import sys

from table import print_table  # bench/table.py: scripts run from bench/.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30


def compile_case(config_path, topology, overrides):
  """Runs in the child process: {memory, cost} of the compiled train step."""
  sys.path.insert(0, ROOT)
  from jaxlm import config as config_lib, run, topology as topology_lib
  config = config_lib.load(config_path, overrides)
  slice_ = topology_lib.parse(topology)
  s = run.setup(config, topology_lib.devices(slice_))
  compiled = run.compile_train_step(s, s.objective.prepare())
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  return {'total': run.memory_per_device(compiled)['total'],
          'temporaries': memory.temp_size_in_bytes, 'hbm': slice_.chip.hbm_bytes,
          'flops': cost.get('flops'), 'bytes_accessed': cost.get('bytes accessed'),
          'per_chip_batch': config.batch_size / s.mesh.size}


def run_case(args, length, attention):
  tokens = args.tokens_per_step
  overrides = [('model.max_len', str(length)), ('batch_size', str(tokens // length)),
               ('model.attention', repr(attention))] + [tuple(o.split('=', 1)) for o in args.override]
  program = (f'import json, sys; sys.path.insert(0, {os.path.join(ROOT, "bench")!r}); '
             f'import attention_plan as a; '
             f'print(json.dumps(a.compile_case({args.config!r}, {args.topology!r}, '
             f'{overrides!r})))')
  proc = subprocess.run([sys.executable, '-c', program], capture_output=True, text=True,
                        cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT,
                                       'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'})
  if proc.returncode:
    return {'error': proc.stderr.strip().splitlines()[-1]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/llama_7b_tpu_v5p.py')
  parser.add_argument('--topology', default='v5p-128')
  parser.add_argument('--lengths', default='4096,8192')
  parser.add_argument('--attention', default='xla,splash')
  parser.add_argument('--tokens_per_step', type=int, default=256 * 4096)
  parser.add_argument('--override', action='append', default=[],
                      help='a config override without --config., e.g. model.remat_policy=minimal')
  args = parser.parse_args()
  rows = []
  for length in map(int, args.lengths.split(',')):
    for attention in args.attention.split(','):
      r = run_case(args, length, attention)
      row = {'length': length, 'attention': attention,
             'overrides': ' '.join(args.override) or '-'}
      if 'error' in r:
        rows.append({**row, 'seqs/chip': '', 'step GiB/chip': r['error'][:80], 'temp GiB': '',
                     'fits': False, 'XLA TFLOP/chip': '', 'XLA GB accessed/chip': ''})
        continue
      rows.append({**row, 'seqs/chip': r['per_chip_batch'], 'step GiB/chip': r['total'] / GiB,
                   'temp GiB': r['temporaries'] / GiB,
                   'fits': f'{r["total"] <= r["hbm"]} ({100 * r["total"] / r["hbm"]:.0f}%)',
                   'XLA TFLOP/chip': (r['flops'] or 0) / 1e12,
                   'XLA GB accessed/chip': (r['bytes_accessed'] or 0) / 1e9})
      print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  print_table(rows, float_format='.2f')


if __name__ == '__main__':
  main()
