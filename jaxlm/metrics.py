"""Where training metrics go: metrics.jsonl, TensorBoard, and a progress bar on a terminal."""

import json
import logging
import math
import os
import sys

import tqdm

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


class Writer:
  """Appends one JSON object per row to metrics.jsonl and mirrors scalars to TensorBoard.

  Only the chief process (index 0) writes; on the others every method is a no-op.
  """

  def __init__(self, workdir, enabled=True):
    self.enabled = enabled
    if not enabled:
      return
    path = workdir_lib.metrics_path(workdir)
    _repair_tail(path)
    self.file = open(path, 'a')
    from tensorboardX import SummaryWriter  # Heavy import, chief only.
    self.tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'), flush_secs=30)

  def write(self, step, row):
    if not self.enabled:
      return
    row = {'step': int(step), **{k: _plain(v) for k, v in row.items()}}
    self.file.write(json.dumps(row) + '\n')  # One write per whole line.
    self.file.flush()
    for key, value in row.items():
      if key != 'step' and isinstance(value, (int, float)) and math.isfinite(value):
        self.tensorboard.add_scalar(key, value, step)

  def close(self):
    if self.enabled:
      self.file.close()
      self.tensorboard.close()


def _plain(value):
  value = value.item() if hasattr(value, 'item') else value
  return value if not isinstance(value, float) or math.isfinite(value) else str(value)


def progress(total, initial, enabled=True):
  """A progress bar with time left, shown only when stderr is a terminal."""
  return tqdm.tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
                   disable=not (enabled and sys.stderr.isatty()))
