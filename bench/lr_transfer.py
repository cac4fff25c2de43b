"""Learning-rate transfer across widths: a grid of peak learning rates at four widths under each
parametrization, trained on the Python standard library's source; prints the table and writes
the plot. Under muP the best rate should stay put as the width grows; under the standard
parametrization it drifts (Tensor Programs V, figure 1).

    python bench/lr_transfer.py --workdir=/tmp/lr_transfer [--widths=32,64,128,256] \
        [--lrs=0.002,...,0.064] [--steps=250] [--kinds=standard,mup] [--shard=i/n] \
        [--plot=docs/scaling/lr_transfer.png] [--report]

Every run is a `jaxlm sweep` run (bench/../jaxlm/sweep.py: shared tokenizer and token cache,
finished runs skipped, an interrupted one resumed, DIR/runs.jsonl), named
<parametrization>-d<width>-lr<rate>: a 2-layer Llama-style model (head width 16, SwiGLU 8/3),
vocabulary 512, 128-token rows, batch 8, `--steps` steps with 5% warmup and cosine decay to
10%, weight decay 0.1; the same tokens in the same order for every run. The score is the
final held-out loss (16 batches). Rates are a factor of 2 apart: "within one grid step" is
within a factor of 2. muP's base width is --base_width (32), where both parametrizations are
the same model.
"""

import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxlm import config as config_lib, flops, sweep  # noqa: E402
from table import print_table, save_figure  # noqa: E402 (bench/table.py)

LRS = tuple(2.0 ** k * 1e-3 for k in range(1, 7))  # 2e-3 ... 6.4e-2
KINDS = ('standard', 'mup')


def base_config(steps, base_width):
  c = config_lib.defaults('llama')
  c.batch_size, c.train_steps = 8, steps
  c.log_every_steps, c.eval_every_steps, c.eval_batches = 100, 0, 16
  m = c.model
  m.num_layers, m.head_dim, m.vocab_size, m.max_len = 2, 16, 512, 128
  m.mup_base_width, m.mup_base_head_dim = base_width, 16
  c.optimizer.warmup_steps = round(0.05 * steps)
  c.optimizer.weight_decay = 0.1
  c.checkpoint.save_every_steps = steps  # Only the final state.
  c.data.tokenizer_sample_bytes = 4_000_000
  return c


def runs(widths, lrs, steps, kinds=KINDS, base_width=32):
  base = base_config(steps, base_width)
  out = []
  for kind in kinds:
    for width in widths:
      for lr in lrs:
        config = base_config(steps, base_width)
        m = config.model
        m.emb_dim, m.num_heads, m.parametrization = width, width // 16, kind
        m.mlp_dim = 8 * math.ceil(8 / 3 * width / 8)
        config.optimizer.learning_rate = lr
        config = config_lib.validate(config)
        D = steps * config.batch_size * m.max_len
        out.append(sweep.Run(f'{kind}-d{width}-lr{lr:.3g}', config,
                             flops.param_counts(m)["matmul"], D, flops.of_run(config, None) * D, 0.0))
  return base, out


def table(rows, widths, lrs):
  """{(kind, width): {lr: eval_loss}} and the best rate of each."""
  losses = {}
  for r in rows:
    kind, width, lr = r['name'].split('-')
    losses.setdefault((kind, int(width[1:])), {})[float(lr[2:])] = r['eval_loss']
  return losses


def best(by_lr):
  finite = {lr: loss for lr, loss in by_lr.items() if math.isfinite(loss)}
  return min(finite, key=finite.get)


def plot(losses, widths, path):
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  import numpy as np
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(widths)))
  for ax, kind in zip(axes, KINDS):
    for color, width in zip(colors, widths):
      by_lr = dict(sorted(losses.get((kind, width), {}).items()))
      if not by_lr:
        continue
      ax.plot(list(by_lr), list(by_lr.values()), 'o-', color=color, ms=4, label=f'd={width}')
      lr = best(by_lr)
      ax.plot([lr], [by_lr[lr]], '*', color=color, ms=14, mec='k')
    ax.set(xscale='log', xlabel='peak learning rate', title=f'{kind} parametrization')
    ax.legend()
  axes[0].set_ylabel('held-out loss')
  values = [v for by_lr in losses.values() for v in by_lr.values() if math.isfinite(v)]
  axes[0].set_ylim(min(values) - 0.05, min(values) + 1.0)
  save_figure(fig, path)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--widths', default='32,64,128,256')
  parser.add_argument('--lrs', default=','.join(f'{lr:g}' for lr in LRS))
  parser.add_argument('--steps', type=int, default=250)
  parser.add_argument('--plot', default='')
  parser.add_argument('--shard', default='0/1')
  parser.add_argument('--kinds', default=','.join(KINDS), help='parametrizations to train')
  parser.add_argument('--base_width', type=int, default=32, help="muP's base width")
  parser.add_argument('--report', action='store_true', help='only print the table and plot')
  args = parser.parse_args()
  widths = [int(w) for w in args.widths.split(',')]
  lrs = [float(v) for v in args.lrs.split(',')]
  base, grid = runs(widths, lrs, args.steps, args.kinds.split(','), args.base_width)
  if not args.report:
    import logging
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
    s = config_lib.sweep_defaults(base)
    print(json.dumps(sweep.run(s, args.workdir, sweep.parse_shard(args.shard), grid)))
  losses = table(sweep.read_runs(args.workdir), widths, lrs)
  print_table([{'parametrization': kind, 'width': width,
                **{f'{lr:g}': by_lr.get(lr, float('nan')) for lr in lrs},
                'best lr': f'{best(by_lr):g}'}
               for (kind, width), by_lr in sorted(losses.items())], float_format='.3f')
  if args.plot:
    plot(losses, widths, args.plot)
    print(f'wrote {args.plot}')


if __name__ == '__main__':
  main()
