"""`jaxlm plan --topology` for every shipped accelerator config on the slice it is meant for
(its TOPOLOGY), and a table of the TPU compiler's per-chip memory figures.

    python bench/plan_topologies.py [--configs=llama_7b_tpu_v5p,gpt2_124m] [--jobs=2]
    python bench/plan_topologies.py --quick --compare_dir=DIR  # vs full plans kept in DIR

Compiler figures, not measurements: nothing runs on a TPU. Each plan is a process of its own
(`python -m jaxlm plan ... --json=FILE`); a config that does not fit is a row too.
"""

import argparse
import concurrent.futures
import json
import os
import runpy
import subprocess
import sys
import tempfile

from table import print_table  # bench/table.py: scripts run from bench/.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from jaxlm import config as config_lib  # noqa: E402

CONFIGS = ('llama_7b_tpu_v5p', 'llama_1b_tpu_v6e', 'llama_7b', 'llama_1b', 'bert_large',
           'bert_base', 'gpt2_124m')
GiB = 2 ** 30


def intended_topology(name):
  """The TOPOLOGY a shipped config names: the slice it is planned for."""
  return runpy.run_path(os.path.join(ROOT, 'configs', f'{name}.py'))['TOPOLOGY']


def plan(name, out_dir, quick=False):
  topology = intended_topology(name)
  path = os.path.join(out_dir, f'{name}.json')
  if os.path.exists(path):  # Planned before (delete it after changing the config).
    with open(path) as f:
      return json.load(f)
  proc = subprocess.run([sys.executable, '-m', 'jaxlm', 'plan', f'--config=configs/{name}.py',
                         f'--topology={topology}', f'--json={path}'] + ['--quick'] * quick,
                        cwd=ROOT,
                        capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': ROOT})
  if not os.path.exists(path):
    raise RuntimeError(f'{name}: plan failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
  with open(path) as f:
    return json.load(f)


def row(name, r, full=None):
  config = config_lib.load(os.path.join(ROOT, 'configs', f'{name}.py'))
  per_chip = config.batch_size // config.optimizer.grad_accum_steps / r['devices']
  return {
      'config': name, 'topology': r['topology'], 'chips': r['devices'],
      'seqs/chip x len': f'{per_chip:g} x {config.model.max_len}'
                         + (f' (x{config.optimizer.grad_accum_steps} accum)'
                            if config.optimizer.grad_accum_steps > 1 else ''),
      'remat': config.model.remat_policy,
      'state GiB': r['state_bytes_per_device'] / GiB,
      'train step GiB': r['train_step_bytes']['total'] / GiB,
      'eval step GiB': r['eval_step_bytes']['total'] / GiB,
      'HBM GiB': r['hbm_bytes_per_chip'] / GiB,
      'used': f'{100 * r["bytes_needed_per_chip"] / r["hbm_bytes_per_chip"]:.0f}%',
      'fits': r['fits'],
      'compile s (train+eval)': f'{r["compile_s"]:.0f}+{r["eval_compile_s"]:.0f}',
      **(compared(r, full) if full else {}),
  }


def compared(quick, full):
  """A quick plan against the full plan of the same config: memory and compile time."""
  need = lambda r: r['bytes_needed_per_chip']
  seconds = lambda r: r['compile_s'] + r['eval_compile_s']
  return {'full compile GiB': need(full) / GiB,
          'quick/full memory': f'{need(quick) / need(full):.3f}',
          'quick/full compile s': f'{seconds(quick) / seconds(full):.2f}'}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--configs', default=','.join(CONFIGS))
  parser.add_argument('--jobs', type=int, default=1, help='plans compiled side by side')
  parser.add_argument('--json_dir', default='',
                      help="keep each plan's JSON here; one found there is reused")
  parser.add_argument('--quick', action='store_true', help='plan --quick (least compile effort)')
  parser.add_argument('--compare_dir', default='',
                      help='a --json_dir of full plans: compare each quick plan with its own')
  args = parser.parse_args()
  names = args.configs.split(',')
  out_dir = args.json_dir or tempfile.mkdtemp(prefix='plan_topologies_')
  os.makedirs(out_dir, exist_ok=True)
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    futures = [pool.submit(plan, n, out_dir, args.quick) for n in names]
  rows, failures = [], []
  for name, future in zip(names, futures):
    try:
      full = os.path.join(args.compare_dir, f'{name}.json')
      rows.append(row(name, future.result(),
                      json.load(open(full)) if args.compare_dir and os.path.exists(full) else None))
    except RuntimeError as e:
      failures.append(str(e))
  if rows:
    print_table(rows, float_format='.2f')
  for failure in failures:
    print(failure, file=sys.stderr)
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())
