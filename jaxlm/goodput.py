"""Where the wall time of a run goes: goodput, its breakdown, and the spread of step times.

Every second of a process goes to one bucket: `step` (device compute of new steps, measured
on the host), `data_wait` (waiting for the next batch), `compile`, `checkpoint` (restore at the
start, the blocking part of saves, the wait at the end), `eval`, `restart_lost` (recomputing
steps a killed run had already done), `startup` (mesh, data preparation) and `other` (the
rest: logging, tracing). Goodput is `step`'s share. train.py times what happens before and
between the loop's phases (restore, compiles) on a `Clock`; the `Goodput` hook adds the
seconds the loop reports (loop.Summary.seconds) to it.

Data wait is the time the host waits for the data iterator. The loop keeps one step in flight
(it waits for step n-1 after queuing step n, so the device is never idle for it), so a wait
for data is time the device has nothing to do beyond that queued step.

Each process writes rows of its own cumulative seconds, tagged with `goodput/segment` (its
start time): `summarize` adds up the segments of a run that was stopped and resumed.
"""

import json
import logging
import math
import time

import numpy as np

from jaxlm import paths
from jaxlm.loop import Hook

log = logging.getLogger('jaxlm')

BUCKETS = ('step', 'data_wait', 'compile', 'checkpoint', 'eval', 'restart_lost', 'startup',
           'other')


class Clock:
  """Seconds per bucket since `start`; whatever no bucket claimed is `other`."""

  def __init__(self, start=None):
    self.start = time.perf_counter() if start is None else start
    self.seconds = dict.fromkeys(BUCKETS, 0.0)

  def add(self, bucket, seconds):
    self.seconds[bucket] += seconds

  def timed(self, bucket, function, *args):
    """function(*args), its time added to `bucket`."""
    begin = time.perf_counter()
    try:
      return function(*args)
    finally:
      self.add(bucket, time.perf_counter() - begin)

  def timed_each(self, bucket, iterable):
    """The items of `iterable`, the time taken to make each added to `bucket` (each length
    phase, built as the run reaches it)."""
    items = iter(iterable)
    while True:
      begin = time.perf_counter()
      try:
        item = next(items)
      except StopIteration:
        return
      finally:
        self.add(bucket, time.perf_counter() - begin)
      yield item

  def claim_rest(self, bucket):
    """Adds the wall time that no bucket has claimed yet to `bucket` (startup, before the loop)."""
    self.add(bucket, max(self.wall() - sum(self.seconds.values()), 0.0))

  def wall(self):
    return time.perf_counter() - self.start

  def breakdown(self):
    """{bucket: seconds} over the whole wall time, `other` the unclaimed rest."""
    seconds = dict(self.seconds)
    seconds['other'] += max(self.wall() - sum(seconds.values()), 0.0)
    return seconds


def shares(seconds):
  """{bucket: share of the total} (summing to 1) from {bucket: seconds}."""
  total = sum(seconds.values())
  return {b: (seconds[b] / total if total > 0 else 0.0) for b in seconds}


def spread(samples):
  """p50, p90 and max of step times (seconds)."""
  if not samples:
    return {}
  p50, p90 = np.percentile(samples, [50, 90])
  return {'step_time/p50_s': float(p50), 'step_time/p90_s': float(p90),
          'step_time/max_s': float(max(samples))}


def last_logged_step(metrics_path):
  """The highest step with a train row in metrics.jsonl, 0 if none (or no file)."""
  highest = 0
  if not paths.exists(metrics_path):
    return highest
  with paths.open(metrics_path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue  # A half-written last line of a killed run.
      if 'loss' in row:
        highest = max(highest, int(row['step']))
  return highest


class Goodput(Hook):
  """At every log step (and at the end) a row of this process's time per bucket, their shares
  and the step-time spread since the last row; the end also logs a one-line summary.

  `clock` holds what train.py timed before the loop (restore, compiles); the hook adds the
  loop's seconds to it as they grow. On start it reads the previous processes'
  metrics.jsonl: steps after the resumed checkpoint that were already logged are done again,
  and their compute counts as `restart_lost`.
  """

  def __init__(self, writer, metrics_path, clock, restored_from=None):
    self.writer = writer
    self.restored_from = restored_from or 'none'  # The tier resumed from (jaxlm/tiers.py).
    self.metrics_path = metrics_path
    self.clock = clock
    self.segment = time.time()
    self.seen = {}  # The loop's seconds by kind, as last added to the clock.
    self.step_times = []  # Seconds between finished steps, since the last row.

  def take(self, summary):
    """Adds the loop's seconds since the last look to the clock: a step's compute to
    `restart_lost` while the run redoes steps it had done, else to its kind's bucket."""
    redoing = summary.start < summary.step <= self.redo_until
    for kind, total in summary.seconds.items():
      seconds, self.seen[kind] = total - self.seen.get(kind, 0.0), total
      self.clock.add('restart_lost' if kind == 'step' and redoing else kind, seconds)

  def on_start(self, summary):
    self.redone = max(last_logged_step(self.metrics_path) - summary.start, 0)
    self.redo_until = summary.start + self.redone
    self.take(summary)
    self.clock.claim_rest('startup')  # Everything before the loop that no bucket claimed.
    if self.redone:
      log.warning('resumed at step %d from the %s tier: %d step(s) logged by the previous run '
                  'are lost and done again', summary.start, self.restored_from, self.redone)

  def row(self, summary):
    self.take(summary)
    seconds = self.clock.breakdown()
    row = {'goodput/segment': self.segment, 'goodput/start_step': summary.start,
           'goodput/redone_steps': self.redone, 'goodput/restored_from': self.restored_from,
           'goodput/wall_s': sum(seconds.values())}
    row.update({f'goodput/{b}_s': s for b, s in seconds.items()})
    row.update({f'goodput/{b}': s for b, s in shares(seconds).items()})
    row.update(spread(self.step_times))
    self.step_times = []
    return row

  def on_step(self, summary):
    if summary.step_s is not None:
      self.step_times.append(summary.step_s)
    if summary.logged is not None:
      self.writer.write(summary.step, self.row(summary))
    else:
      self.take(summary)

  def on_end(self, summary):
    row = self.row(summary)
    self.writer.write(summary.step, row)
    log.info('where the time went (this process, %.0f s): %s', row['goodput/wall_s'],
             ', '.join(f'{b} {100 * row[f"goodput/{b}"]:.1f}%' for b in BUCKETS
                       if row[f'goodput/{b}_s'] > 0))


def summarize(rows):
  """The run's time across its processes (segments): {'seconds': {bucket: s}, 'shares': ...,
  'segments': n, 'redone_steps': n, 'restored_from': the tier each segment resumed from}
  from metrics.jsonl rows."""
  last = {}
  for row in rows:
    if 'goodput/segment' in row:
      last[row['goodput/segment']] = row
  seconds = {b: sum(r.get(f'goodput/{b}_s', 0.0) for r in last.values()) for b in BUCKETS}
  return {'seconds': seconds, 'shares': shares(seconds), 'segments': len(last),
          'redone_steps': int(sum(r.get('goodput/redone_steps', 0) for r in last.values())),
          'restored_from': [r.get('goodput/restored_from', 'none')
                            for _, r in sorted(last.items())],
          'wall_s': math.fsum(seconds.values())}
