"""muP's coordinate check: how the size of every layer's activations, and their change after a
few Adam steps, grows with the width, under each parametrization; prints a table and writes
the plot.

    python bench/coord_check.py [--family=gpt2] [--widths=64,128,256,512,1024] [--steps=3] \
        [--lr=1e-2] [--seeds=2] [--plot=docs/scaling/coord_check.png]

Each width trains its own 2-layer model (4 heads of emb_dim / 4, MLP 4 x emb_dim, vocabulary
512, 64-token rows) on one fixed batch of random tokens with the family's objective, plain
Adam (constant rate, no clipping or weight decay, both of which would couple the widths), from
the same seed. For every layer (a module's output: the embedding, each projection, each block,
the logits) the table gives the RMS of its output at initialisation and of its change after t
steps, averaged over seeds, at each width, and the slope of log RMS against log width: about 0
(flat) under muP, positive under the standard parametrization (Yang et al., Tensor Programs V,
section 7.2; the `mup` package's coord_check). The muP base width is the smallest width.
"""

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxlm import config as config_lib  # noqa: E402
from table import print_table, save_figure  # noqa: E402 (bench/table.py)
from jaxlm import model as model_lib, objectives, optim, state, steps  # noqa: E402

HEADS = 4
# The layers reported: a module path in the captured intermediates (see `activations`).
LAYERS = ('token_embed', 'layers_0/attention/query', 'layers_0/attention', 'layers_0/mlp/wi',
          'layers_0/mlp', 'layers_0', 'layers_1', 'logits')
NUM_LAYERS = 2


def model_config(family, parametrization, width, base_width, objective=None):
  c = config_lib.defaults(family)
  c.objective = objective or ('masked' if family in ('bert', 'modernbert') else 'causal')
  c.batch_size, c.train_steps = 8, 1000
  m = c.model
  m.num_layers, m.emb_dim, m.num_heads, m.mlp_dim = NUM_LAYERS, width, HEADS, 4 * width
  m.vocab_size, m.max_len, m.scan_layers = 512, 64, False
  m.parametrization = parametrization
  m.mup_base_width, m.mup_base_head_dim = base_width, base_width // HEADS
  c.optimizer.warmup_steps, c.optimizer.end_lr_fraction = 0, 1.0  # A constant rate.
  c.optimizer.grad_clip, c.optimizer.weight_decay = 0.0, 0.0
  return config_lib.validate(c)


def activations(model, params, batch):
  """{layer: its output} for the layers of LAYERS (the model's logits under 'logits')."""
  logits, state_ = steps.apply(model, params, batch, capture_intermediates=True,
                               mutable=['intermediates'])
  captured = state_['intermediates']
  out = {'logits': logits}
  for name in LAYERS[:-1]:
    if name.split('/')[0] not in captured:  # A shallower model (the test's).
      continue
    node = captured
    for key in name.split('/'):
      node = node[key]
    value = node['__call__'][0]
    out[name] = value[0] if isinstance(value, tuple) else value  # A block returns (x, None).
  return out


def rms(x):
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def measure(family, parametrization, widths, steps_=3, lr=1e-2, seed=0, objective=None,
            compiler_options=None):
  """Rows {parametrization, width, layer, t, rms}: t = 0 the output at initialisation, t >= 1
  the RMS of its change after t Adam steps. Each width is one compiled program (init, steps
  and measurements); `compiler_options` (XLA's) can make its compilation cheaper for a test."""
  rows = []
  for width in widths:
    config = model_config(family, parametrization, width, widths[0], objective)
    config.optimizer.learning_rate = lr
    built = objectives.get(config)
    model = model_lib.build(config.model, built.causal, built.num_labels)
    tx, _ = optim.optimizer(config, model)
    rng = np.random.default_rng(seed)
    shape = (config.batch_size, config.model.max_len)
    batch = {'tokens': jnp.asarray(rng.integers(8, 512, shape), jnp.int32),
             'positions': jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape),
             'segment_ids': jnp.ones(shape, jnp.int32)}
    batch = built.prepare()(batch, jax.random.key(seed))

    def loss_fn(p):
      value, stats = steps.model_loss(model, built, p, batch)
      return value / stats['weight']

    @jax.jit
    def trajectory(key):
      params = nn.unbox(model.init({'params': key}, *state.init_inputs(config))['params'])
      opt_state = tx.init(params)
      first = activations(model, params, batch)
      sizes = [{k: rms(v) for k, v in first.items()}]
      for _ in range(steps_):
        updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
        params = optax.apply_updates(params, updates)
        now = activations(model, params, batch)
        sizes.append({k: rms(now[k] - first[k]) for k in first})
      return sizes

    key = jax.random.key(seed)
    compiled = trajectory.lower(key).compile(compiler_options)
    for t, sizes in enumerate(jax.device_get(compiled(key))):
      rows += [dict(parametrization=parametrization, width=width, layer=k, t=t, rms=float(v))
               for k, v in sizes.items()]
  return rows


def averaged(rows):
  """Rows averaged over seeds: {(parametrization, layer, t): {width: mean rms}}."""
  table = {}
  for r in rows:
    table.setdefault((r['parametrization'], r['layer'], r['t']), {}).setdefault(
        r['width'], []).append(r['rms'])
  return {k: {w: float(np.mean(v)) for w, v in sorted(by_width.items())}
          for k, by_width in table.items()}


def slope(by_width):
  """The slope of log RMS against log width (least squares)."""
  widths = np.array(list(by_width), np.float64)
  values = np.array(list(by_width.values()), np.float64)
  return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def plot(table, widths, steps_, path):
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  kinds = sorted({k[0] for k in table}, key=lambda p: p != 'standard')
  fig, axes = plt.subplots(len(kinds), steps_ + 1, figsize=(3.2 * (steps_ + 1), 3.0 * len(kinds)),
                           sharex=True, sharey='col', squeeze=False)
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(LAYERS)))
  for row, kind in enumerate(kinds):
    for t in range(steps_ + 1):
      ax = axes[row][t]
      for color, layer in zip(colors, LAYERS):
        by_width = table[(kind, layer, t)]
        ax.plot(list(by_width), list(by_width.values()), 'o-', color=color, ms=3, label=layer)
      ax.set(xscale='log', yscale='log', title=f'{kind}: ' + ('init' if t == 0 else f'change, t={t}'))
      ax.set_xticks(widths, [str(w) for w in widths])
      if t == 0:
        ax.set_ylabel('RMS')
      if row == len(kinds) - 1:
        ax.set_xlabel('width (emb_dim)')
  axes[0][-1].legend(fontsize=6, loc='upper left')
  save_figure(fig, path)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--family', default='gpt2')
  parser.add_argument('--widths', default='64,128,256,512,1024')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--lr', type=float, default=1e-2)
  parser.add_argument('--seeds', type=int, default=2)
  parser.add_argument('--plot', default='')
  args = parser.parse_args()
  widths = [int(w) for w in args.widths.split(',')]
  rows = []
  for kind in ('standard', 'mup'):
    for seed in range(args.seeds):
      rows += measure(args.family, kind, widths, args.steps, args.lr, seed)
  table = averaged(rows)
  print_table([{'parametrization': kind, 'layer': layer,
                'RMS of': 'output' if t == 0 else f'change after {t}',
                **{f'd={w}': v for w, v in by_width.items()}, 'slope': slope(by_width)}
               for (kind, layer, t), by_width in table.items()], float_format='.3g')
  if args.plot:
    plot(table, widths, args.steps, args.plot)
    print(f'wrote {args.plot}')


if __name__ == '__main__':
  main()
