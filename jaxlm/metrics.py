"""Where training metrics go: metrics.jsonl, TensorBoard, and a progress bar on a terminal."""

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
        self.tensorboard.add_scalar(key, value, step)

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
