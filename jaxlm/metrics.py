"""Where training metrics go: metrics.jsonl, TensorBoard, and a progress bar on a terminal.

metrics.jsonl keeps the flat names (`loss`, `eval_loss`, `mfu`, ...); TensorBoard groups them
by tag (`train/loss`, `eval/loss`, `perf/mfu`, `goodput/step`, ...), one section each, and
holds the resolved config as text and as hyperparameters (its HParams tab).
"""

import json
import logging
import math
import os
import sys
import time

import tqdm

from jaxlm import paths
from jaxlm import workdir as workdir_lib

log = logging.getLogger('jaxlm')


def _repair_tail(path):
  """Drops a half-written last line (a run killed mid-write), keeping every whole row."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, 'rb+') as f:
    data = f.read()
    if not data.endswith(b'\n'):
      f.truncate(data.rfind(b'\n') + 1)


class _LocalRows:
  """Appends rows to a local file, each fsynced: on a FUSE mount (gcsfuse) or a disk, a row
  written before a hard kill is still there after it."""

  def __init__(self, path):
    _repair_tail(path)
    self.file = open(path, 'a')

  def append(self, line):
    self.file.write(line)  # One write per whole line.
    self.file.flush()
    os.fsync(self.file.fileno())

  def close(self):
    self.file.close()


class _RemoteRows:
  """An object cannot be appended to: the whole file is rewritten (one atomic object write)
  at most every `flush_secs` and at close, so a hard kill loses at most that much."""

  def __init__(self, path, flush_secs):
    self.path, self.flush_secs = path, flush_secs
    text = paths.read_text(path) if paths.isfile(path) else ''
    self.text = text[:text.rfind('\n') + 1]
    self.written = time.monotonic()

  def append(self, line):
    self.text += line
    if time.monotonic() - self.written >= self.flush_secs:
      self.flush()

  def flush(self):
    paths.atomic_write(self.path, self.text)
    self.written = time.monotonic()

  def close(self):
    self.flush()


PERF = ('tokens_per_s', 'tflops_per_device', 'mfu')


def tag(key):
  """The TensorBoard tag of a metrics.jsonl key: names with a group keep it (`goodput/step`),
  `eval_X` is `eval/X`, throughput is `perf/`, the rest `train/`."""
  if '/' in key:
    return key
  if key.startswith('eval_'):
    return 'eval/' + key[len('eval_'):]
  return ('perf/' if key in PERF else 'train/') + key


def flat_config(config):
  """{'model.emb_dim': 64, ...}: the config's leaves, values that are not a number, string or
  bool as their repr (tuples, None)."""
  out = {}

  def walk(prefix, node):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(f'{prefix}{key}.', value)
      else:
        keep = isinstance(value, (bool, int, float, str))
        out[prefix + key] = value if keep else repr(value)

  walk('', config.to_dict() if hasattr(config, 'to_dict') else config)
  return out


class Writer:
  """Appends one JSON object per row to metrics.jsonl and mirrors scalars to TensorBoard.

  Only the chief process (index 0) writes; on the others every method is a no-op.
  """

  def __init__(self, workdir, enabled=True, flush_secs=30):
    self.enabled = enabled
    if not enabled:
      return
    path = workdir_lib.metrics_path(workdir)
    self.rows = (_RemoteRows(path, flush_secs) if paths.is_remote(path) else
                 _LocalRows(path))
    from tensorboardX import SummaryWriter  # Heavy import, chief only.
    self.tensorboard = SummaryWriter(paths.join(workdir, 'tensorboard'), flush_secs=flush_secs)

  def write(self, step, row):
    if not self.enabled:
      return
    row = {'step': int(step), **{k: _plain(v) for k, v in row.items()}}
    self.rows.append(json.dumps(row) + '\n')
    for key, value in row.items():
      if key != 'step' and isinstance(value, (int, float)) and math.isfinite(value):
        self.tensorboard.add_scalar(tag(key), value, step)

  def write_config(self, config, step):
    """The resolved config, at the step this process starts from: as JSON text (TensorBoard's
    text tab) and as hyperparameters against the final losses (its HParams tab)."""
    if not self.enabled:
      return
    from tensorboardX.summary import hparams
    text = json.dumps(config.to_dict(), indent=2, default=repr)
    self.tensorboard.add_text('config', f'```\n{text}\n```', step)
    # The experiment and session-start summaries in this run's own event file (add_hparams
    # would write them to a new sub-run); the metrics named are the scalars above.
    experiment, session_start, _ = hparams(flat_config(config), {'train/loss': 0, 'eval/loss': 0})
    for summary in (experiment, session_start):
      self.tensorboard.file_writer.add_summary(summary, step)

  def close(self):
    if self.enabled:
      self.rows.close()
      self.tensorboard.close()


def _plain(value):
  value = value.item() if hasattr(value, 'item') else value
  return value if not isinstance(value, float) or math.isfinite(value) else str(value)


def progress(total, initial, enabled=True):
  """A progress bar with time left, shown only when stderr is a terminal."""
  return tqdm.tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
                   disable=not (enabled and sys.stderr.isatty()))
