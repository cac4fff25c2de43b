"""`jaxlm fit`: fits scaling laws to a sweep's runs.jsonl and writes fit.json and plots.

DIR/fit.json               the parametric law (E, A, B, alpha, beta with 95% intervals), the
                           isoFLOP exponents, a held-out prediction and, with --budget, the
                           compute-optimal N and D
DIR/loss_vs_compute.png    every run's loss against C, with the law's compute-optimal frontier
DIR/isoflop.png            loss against N per budget with its parabola, and N_opt, D_opt vs C
DIR/residuals.png          log residuals of the law against N and D

Held-out runs (the sweep's `holdout`, rows with holdout=true) are left out of every fit and
predicted by the law, each with the 95% interval of the bootstrap refits' predictions; they
appear in fit.json's 'held_out' and as red marks in loss_vs_compute.png.
"""

import json
import logging

import numpy as np

from jaxlm import laws, paths
from jaxlm import sweep as sweep_lib
from jaxlm.errors import ConfigError

log = logging.getLogger('jaxlm')
MIN_RUNS = 5  # The law has five constants.
MIN_LEVELS = 3  # Distinct N and distinct D: a power law's exponent needs three points.


def run(workdir, budget=None, samples=200, seed=0):
  finished = [r for r in sweep_lib.read_runs(workdir) if np.isfinite(r['eval_loss'])]
  rows = [r for r in finished if not r.get('holdout')]
  held_out = [r for r in finished if r.get('holdout')]
  if len(rows) < MIN_RUNS:
    raise ConfigError(f'{sweep_lib.runs_path(workdir)} has {len(rows)} finished run(s); the fit '
                      f'needs at least {MIN_RUNS}: run (or finish) jaxlm sweep first')
  N, D, C, loss = _columns(rows)
  for name, values in (('N', N), ('D', D)):
    if len(np.unique(values)) < MIN_LEVELS:  # Else E, A, alpha (B, beta) are not determined.
      raise ConfigError(
          f'{sweep_lib.runs_path(workdir)}: its {len(rows)} runs have {len(np.unique(values))} '
          f'distinct {name} ({", ".join(f"{v:.4g}" for v in np.unique(values)[:4])}); fitting '
          f'L(N, D) needs at least {MIN_LEVELS} model sizes N and {MIN_LEVELS} token counts D '
          f'(sweep several sizes over several budgets or tokens)')
  groups = _budget_groups(rows)
  law = laws.fit_parametric(N, D, loss)
  law['intervals'] = laws.bootstrap_parametric(N, D, loss, law, samples, seed,
                                               [(r['N'], r['D']) for r in held_out])
  per_token = _flops_per_token_of(N, C / D)
  result = {
      'law': 'L(N, D) = E + A / N^alpha + B / D^beta  (N: matmul parameters, D: tokens)',
      'runs': len(rows),
      **{k: law[k] for k in ('E', 'A', 'B', 'alpha', 'beta')},
      'intervals': law['intervals'],
      'interval_level': 0.95,
      'bootstrap_samples': samples,
      'huber_delta': laws.HUBER_DELTA,
      'residual_rms': float(np.sqrt(np.mean(np.log(laws.predict(law, N, D) / loss) ** 2))),
      'isoflop': laws.fit_isoflop(groups, samples, seed),
      'holdout': _holdout(rows),
      'held_out': [_held_out(r, law, interval) for r, interval in
                   zip(held_out, law['intervals'].pop('predictions', []))],
  }
  if budget:
    result['budget'] = _optimum(law, result['isoflop'], budget, per_token)
  paths.atomic_write(paths.join(workdir, 'fit.json'), json.dumps(result, indent=2) + '\n')
  result['plots'] = _plot(workdir, (N, D, C, loss), groups, law, result['isoflop'], per_token,
                          result['held_out'])
  _report(result)
  return {k: result[k] for k in ('runs', 'E', 'A', 'B', 'alpha', 'beta', 'intervals')} | (
      {'budget': result['budget']} if budget else {}) | (
      {'held_out': result['held_out']} if held_out else {})


def _held_out(row, law, interval):
  """The law's prediction of a held-out run against its measured loss."""
  predicted = float(laws.predict(law, row['N'], row['D']))
  return {'run': row['name'], 'N': row['N'], 'D': row['D'], 'C': row['C'],
          'predicted_loss': predicted, 'interval': interval, 'actual_loss': row['eval_loss'],
          'relative_error': (predicted - row['eval_loss']) / row['eval_loss'],
          'inside_interval': interval[0] <= row['eval_loss'] <= interval[1]}


def _columns(rows):
  return tuple(np.array([r[k] for r in rows], np.float64) for k in ('N', 'D', 'C', 'eval_loss'))


def _budget_groups(rows):
  groups = {}
  for r in rows:
    if r.get('budget'):
      g = groups.setdefault(r['budget'], ([], [], []))
      for values, key in zip(g, ('N', 'D', 'eval_loss')):
        values.append(r[key])
  return groups


def _flops_per_token_of(N, ratio):
  """FLOPs per token as a function of N: 6N scaled by the runs' own (6N + attention) / 6N,
  interpolated in log N (constant beyond the runs' range), as the sweep's shape rules make it."""
  order = np.argsort(N)
  log_n, overhead = np.log(N[order]), (ratio / (6 * N))[order]
  return lambda n: 6 * n * np.interp(np.log(n), log_n, overhead)


def _holdout(rows):
  """Fits on all runs but the largest (most parameters, then most compute) and predicts it."""
  if len(rows) <= MIN_RUNS:
    return None
  held = max(range(len(rows)), key=lambda i: (rows[i]['N'], rows[i]['C']))
  rest = [r for i, r in enumerate(rows) if i != held]
  N, D, _, loss = _columns(rest)
  law = laws.fit_parametric(N, D, loss)
  predicted = float(laws.predict(law, rows[held]['N'], rows[held]['D']))
  actual = rows[held]['eval_loss']
  return {'run': rows[held]['name'], 'N': rows[held]['N'], 'D': rows[held]['D'],
          'predicted_loss': predicted, 'actual_loss': actual,
          'relative_error': (predicted - actual) / actual,
          'law': {k: law[k] for k in ('E', 'A', 'B', 'alpha', 'beta')}}


def _optimum(law, isoflop, budget, per_token):
  n, d, loss = laws.compute_optimal(law, budget, per_token)
  out = {'C': budget, 'parametric': {'N': n, 'D': d, 'loss': loss}}
  if isoflop:
    out['isoflop'] = {'N': isoflop['k_N'] * budget ** isoflop['a'],
                      'D': isoflop['k_D'] * budget ** isoflop['b']}
  return out


def _report(result):
  iv = result['intervals']
  log.info('L(N, D) = %.3f + %.4g / N^%.3f + %.4g / D^%.3f  (%d runs, log-residual rms %.4f)',
           result['E'], result['A'], result['alpha'], result['B'], result['beta'],
           result['runs'], result['residual_rms'])
  for key in ('E', 'alpha', 'beta'):
    log.info('  %s = %.4g, 95%% interval [%.4g, %.4g]', key, result[key], *iv[key])
  iso = result['isoflop']
  if iso:
    log.info('isoFLOP: N_opt ~ C^%.3f %s, D_opt ~ C^%.3f %s', iso['a'], iso['a_interval'],
             iso['b'], iso['b_interval'])
  if result['holdout']:
    h = result['holdout']
    log.info('held out %s: predicted loss %.4f, actual %.4f (%+.2f%%)', h['run'],
             h['predicted_loss'], h['actual_loss'], 100 * h['relative_error'])
  for h in result['held_out']:
    log.info('held-out run %s (C=%.3g): predicted loss %.4f [%.4f, %.4f], actual %.4f '
             '(%+.2f%%, %s the interval)', h['run'], h['C'], h['predicted_loss'],
             *h['interval'], h['actual_loss'], 100 * h['relative_error'],
             'inside' if h['inside_interval'] else 'outside')
  if 'budget' in result:
    b = result['budget']
    log.info('compute-optimal at C=%.3g: N=%.4g, D=%.4g (loss %.4f)%s', b['C'],
             b['parametric']['N'], b['parametric']['D'], b['parametric']['loss'],
             '; isoFLOP: N=%.4g, D=%.4g' % (b['isoflop']['N'], b['isoflop']['D'])
             if 'isoflop' in b else '')


def _plot(workdir, columns, groups, law, isoflop, per_token, held_out=()):
  """Writes the PNGs (write-then-rename, like every other file here); returns their paths."""
  import matplotlib
  matplotlib.use('Agg')  # No display needed.
  from matplotlib import pyplot as plt

  N, D, C, loss = columns
  paths = []

  fig, ax = plt.subplots(figsize=(6, 4.5))
  points = ax.scatter(C, loss, c=np.log10(N), cmap='viridis', s=25)
  fig.colorbar(points, ax=ax, label='log10 N')
  top = max([C.max()] + [h['C'] for h in held_out])
  grid = np.logspace(np.log10(C.min()) - 0.3, np.log10(top) + 0.3, 60)
  ax.plot(grid, [laws.compute_optimal(law, c, per_token)[2] for c in grid], 'k--',
          label='fitted compute-optimal frontier')
  for i, h in enumerate(held_out):
    low, high = h['interval']
    ax.errorbar([h['C']], [h['predicted_loss']], yerr=[[h['predicted_loss'] - low],
                                                       [high - h['predicted_loss']]],
                fmt='o', mfc='none', color='r', capsize=4,
                label='held out: predicted (95% interval)' if i == 0 else None)
    ax.scatter([h['C']], [h['actual_loss']], marker='x', color='r', s=50, zorder=3,
               label='held out: measured' if i == 0 else None)
  ax.set(xscale='log', xlabel='training FLOPs C', ylabel='eval loss', title='Loss vs compute')
  ax.legend()
  paths.append(_save(fig, workdir, 'loss_vs_compute.png'))

  if isoflop:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(groups)))
    for color, (budget, (n, _, l)) in zip(colors, sorted(groups.items())):
      n, l = np.array(n), np.array(l)
      left.scatter(n, l, color=color, s=20, label=f'C={budget:.2g}')
      if len(np.unique(n)) >= 3:
        x = np.linspace(np.log(n).min(), np.log(n).max(), 50)
        left.plot(np.exp(x), np.polyval(np.polyfit(np.log(n), l, 2), x), color=color)
    for m in isoflop['minima']:  # Hollow: beyond the sizes run, not fitted.
      left.scatter(m['N_opt'], m['loss_opt'], marker='*', s=90, zorder=3, edgecolors='k',
                   facecolors='k' if m['inside'] else 'none')
    left.set(xscale='log', xlabel='N (matmul parameters)', ylabel='eval loss',
             title='isoFLOP curves')
    left.legend(fontsize=7)
    fitted = [m for m in isoflop['minima'] if m['inside']]
    c = np.array([m['C'] for m in fitted])
    line = np.logspace(np.log10(c.min()) - 0.3, np.log10(c.max()) + 0.3, 20)
    right.scatter(c, [m['N_opt'] for m in fitted], color='C0')
    right.plot(line, isoflop['k_N'] * line ** isoflop['a'], 'C0-',
               label=f'N_opt ~ C^{isoflop["a"]:.2f}')
    right.scatter(c, [m['D_opt'] for m in fitted], color='C1')
    right.plot(line, isoflop['k_D'] * line ** isoflop['b'], 'C1-',
               label=f'D_opt ~ C^{isoflop["b"]:.2f}')
    right.set(xscale='log', yscale='log', xlabel='C', title='isoFLOP minima')
    right.legend()
    paths.append(_save(fig, workdir, 'isoflop.png'))

  residual = np.log(laws.predict(law, N, D) / loss)
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  left.scatter(N, residual, c=np.log10(D), cmap='viridis', s=20)
  right.scatter(D, residual, c=np.log10(N), cmap='viridis', s=20)
  for ax, label in ((left, 'N (color: log10 D)'), (right, 'D (color: log10 N)')):
    ax.axhline(0, color='k', lw=0.8)
    ax.set(xscale='log', xlabel=label)
  left.set_ylabel('log(predicted / actual loss)')
  fig.suptitle('Residuals of the fitted law')
  paths.append(_save(fig, workdir, 'residuals.png'))
  return paths


def _save(fig, workdir, name):
  from matplotlib import pyplot as plt
  path = paths.join(workdir, name)
  fig.tight_layout()
  with paths.atomic_file(path) as f:
    fig.savefig(f, dpi=110, format='png')
  plt.close(fig)
  return path
