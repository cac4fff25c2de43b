"""8-bit matmuls against bf16: the same run trained with each model.matmul kind, its final
eval loss against the bf16 run's (issue 31: within 2%), and a table.

    nice python bench/lowp_bench.py [--config=configs/llama_10m_cpu.py] [--steps=300]
        [--kinds=default,int8,int8_grads,fp8,fp8_delayed] [--workdir=/tmp/lowp] [--config.a.b=v]

Every run has the same model.dtype (--dtype, bfloat16 by default), seed, data and schedule;
'default' is the baseline. On a CPU the 8-bit kinds are emulated (their numerics, not their
speed), so the step times only say what the emulation costs; XLA's CPU backend also emulates
bf16 matmuls, several times slower than float32, so CPU runs use --dtype=float32 (a stricter
baseline: the 8-bit kinds quantise from float32). The runs share one tokenizer (the first run
trains it).
"""

import argparse
import json
import os
import sys
import time

from jaxlm import host_memory

host_memory.keep_host_memory()  # Before jax starts its threads, as the jaxlm command does.

from jaxlm import cli, data  # noqa: E402
from jaxlm import config as config_lib  # noqa: E402
from jaxlm import train as train_lib  # noqa: E402
from table import print_table  # noqa: E402 - bench/table.py: scripts run from bench/.


def run(config_path, overrides, kind, steps, workdir, tokenizer, dtype):
  config = config_lib.load(config_path, overrides)
  config.train_steps, config.model.dtype, config.model.matmul = steps, dtype, kind
  config.eval_every_steps = 0  # Only at the start and the end.
  config.checkpoint.save_every_steps = steps
  if tokenizer and not config.data.tokenizer:
    config.data.tokenizer = tokenizer
  config = config_lib.validate(config)
  start = time.perf_counter()
  result = train_lib.train(config, workdir)
  return {'matmul': kind, 'eval_loss': result['eval_loss'],
          'train_loss': result['loss'], 'tokens_per_s': result['tokens_per_s'],
          'wall_s': time.perf_counter() - start}


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/llama_10m_cpu.py')
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--kinds', default='default,int8,int8_grads,fp8,fp8_delayed')
  parser.add_argument('--workdir', default='/tmp/jaxlm_lowp_bench')
  parser.add_argument('--dtype', default='bfloat16', help='model.dtype of every run')
  args, rest = parser.parse_known_args(argv)
  overrides = cli.parse_overrides(rest)
  rows, tokenizer = [], ''
  for kind in args.kinds.split(','):
    workdir = os.path.join(args.workdir, kind)
    rows.append(run(args.config, overrides, kind, args.steps, workdir, tokenizer, args.dtype))
    tokenizer = tokenizer or data.tokenizer_path(workdir)
    print(json.dumps(rows[-1]), flush=True)
  base = next((r['eval_loss'] for r in rows if r['matmul'] == 'default'), rows[0]['eval_loss'])
  for r in rows:
    r[f'vs_{args.dtype}'] = f'{100 * (r["eval_loss"] / base - 1):+.2f}%'
  print_table(rows)


if __name__ == '__main__':
  main(sys.argv[1:])
