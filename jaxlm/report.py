"""`jaxlm report`: where a run's time went and how it learned, from its metrics.jsonl alone.

Works on a finished or a running run, across restarts (each process's goodput rows are added
up, see jaxlm/goodput.py). Prints a summary and writes PNG plots to <workdir>/report/.
"""

import json

import numpy as np

from jaxlm import goodput, paths
from jaxlm import workdir as workdir_lib
from jaxlm.errors import ConfigError


def read_rows(workdir):
  path = workdir_lib.metrics_path(workdir)
  if not paths.exists(path):
    raise ConfigError(f'--workdir={workdir} has no metrics.jsonl; train first')
  rows = []
  try:
    with paths.open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:
          pass  # The half-written last line of a run killed mid-write (or still writing).
  except (OSError, UnicodeDecodeError) as e:  # A directory, a FIFO, bytes that are not text.
    raise ConfigError(f'{path} cannot be read ({e})') from e
  return rows


def summary(rows):
  """The figures `report` prints, as a dict."""
  train = [r for r in rows if 'loss' in r]
  evals = [r for r in rows if 'eval_loss' in r]
  spreads = [r for r in rows if 'step_time/p50_s' in r]
  time = goodput.summarize(rows)
  result = {'step': max((r['step'] for r in train), default=0),
            'segments': time['segments'], 'redone_steps': time['redone_steps'],
            'wall_s': time['wall_s'], 'goodput': time['shares'], 'seconds': time['seconds']}
  if train:
    result['loss'] = train[-1]['loss']
    result['tokens_per_s_median'] = float(np.median([r['tokens_per_s'] for r in train]))
    result['mfu_median'] = float(np.median([r['mfu'] for r in train]))
  if evals:
    result['eval_loss'] = evals[-1]['eval_loss']
    result['best_eval_loss'] = min(r['eval_loss'] for r in evals)
  if spreads:
    result['step_time'] = {k: spreads[-1][f'step_time/{k}_s'] for k in ('p50', 'p90', 'max')}
    result['step_time_worst_max_s'] = max(r['step_time/max_s'] for r in spreads)
  return result


def print_summary(s, out):
  out.write(f"step {s['step']}, {s['segments']} segment(s) (one per process start), "
            f"{s['wall_s']:.0f} s of wall time accounted, {s['redone_steps']} step(s) redone "
            f"after restarts\n")
  if 'loss' in s:
    out.write(f"loss {s['loss']:.4f}; median {s['tokens_per_s_median']:,.0f} tokens/s, "
              f"MFU {100 * s['mfu_median']:.1f}%\n")
  if 'eval_loss' in s:
    out.write(f"eval loss {s['eval_loss']:.4f} (best {s['best_eval_loss']:.4f})\n")
  if 'step_time' in s:
    t = s['step_time']
    out.write(f"step time (last interval) p50 {1e3 * t['p50']:.1f} ms, p90 {1e3 * t['p90']:.1f} "
              f"ms, max {1e3 * t['max']:.1f} ms; worst max {1e3 * s['step_time_worst_max_s']:.1f}"
              f" ms\n")
  out.write('where the time went:\n')
  for bucket in goodput.BUCKETS:
    out.write(f"  {bucket:13} {100 * s['goodput'][bucket]:5.1f}%  {s['seconds'][bucket]:9.1f} s\n")


def segments(rows):
  """The last goodput row of each process (restart segment) of the run, in start order."""
  last = {}
  for r in rows:
    if 'goodput/segment' in r:
      last[r['goodput/segment']] = r
  return [last[k] for k in sorted(last)]


def _increasing_runs(steps):
  """[(begin, end), ...]: the index ranges over which `steps` increases; a resumed run that
  redoes logged steps starts a new one."""
  starts = [0] + [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
  return list(zip(starts, starts[1:] + [len(steps)]))


def plot(rows, directory):
  """Writes loss.png (train and eval loss), throughput.png (tokens/s and MFU, a panel each)
  and goodput.png (the breakdown of each restart segment's time and of the whole run), with
  the steps where a restart resumed marked. Returns the paths."""
  import matplotlib
  matplotlib.use('Agg')  # No display needed.
  from matplotlib import pyplot as plt
  paths.makedirs(directory)
  train = [r for r in rows if 'loss' in r]
  evals = [r for r in rows if 'eval_loss' in r]
  parts = segments(rows)
  restarts = [r['goodput/start_step'] for r in parts[1:] if 'goodput/start_step' in r]
  written = []

  def save(fig, name):
    fig.tight_layout()
    written.append(paths.join(directory, name))
    with paths.atomic_file(written[-1]) as f:  # A local file or an object in a bucket.
      fig.savefig(f, format='png', dpi=100)
    plt.close(fig)

  def panel(ax, ylabel, *series):
    for steps, values, style, label in series:
      runs = _increasing_runs(steps)  # A restart's redone steps: a line of their own.
      for k, (begin, end) in enumerate(runs):
        ax.plot(steps[begin:end], values[begin:end], style, alpha=1.0 if k == len(runs) - 1
                else 0.5, label=f'{label}, segment {k + 1}' if len(runs) > 1 else label)
    for i, step in enumerate(restarts):
      ax.axvline(step, color='grey', linestyle='--', linewidth=1,
                 label='restart (resumed at)' if i == 0 else None)
    ax.set(xlabel='step', ylabel=ylabel)
    ax.legend(loc='best', fontsize='small')

  steps = [r['step'] for r in train]
  fig, ax = plt.subplots(figsize=(7, 4))
  panel(ax, 'loss', (steps, [r['loss'] for r in train], '-', 'train loss'),
        ([r['step'] for r in evals], [r['eval_loss'] for r in evals], 'o-', 'eval loss'))
  save(fig, 'loss.png')

  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
  panel(top, 'tokens/s', (steps, [r['tokens_per_s'] for r in train], '-', 'tokens/s'))
  panel(bottom, 'MFU (%)', (steps, [100 * r['mfu'] for r in train], '-C1', 'MFU'))
  save(fig, 'throughput.png')

  labels = [f'segment {i + 1}\n(steps {r.get("goodput/start_step", "?")}-{r["step"]})'
            for i, r in enumerate(parts)]
  seconds = [[r.get(f'goodput/{b}_s', 0.0) for b in goodput.BUCKETS] for r in parts]
  total = goodput.summarize(rows)['seconds']
  labels.append('whole run')
  seconds.append([total[b] for b in goodput.BUCKETS])
  fig, ax = plt.subplots(figsize=(7, 1.5 + 0.6 * len(labels)))
  left = np.zeros(len(labels))
  for i, bucket in enumerate(goodput.BUCKETS):
    share = np.array([s[i] / max(sum(s), 1e-9) for s in seconds])
    ax.barh(labels, 100 * share, left=100 * left, label=bucket)
    left += share
  ax.set(xlabel='% of wall time', xlim=(0, 100))
  ax.legend(ncol=4, fontsize='small', loc='upper center', bbox_to_anchor=(0.5, -0.35))
  save(fig, 'goodput.png')
  return written


def run(workdir, out):
  rows = read_rows(workdir)
  s = summary(rows)
  print_summary(s, out)
  written = plot(rows, paths.join(workdir, 'report'))
  out.write('plots: ' + ', '.join(written) + '\n')
  return s
