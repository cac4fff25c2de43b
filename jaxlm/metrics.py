"""Where training metrics go: metrics.jsonl, TensorBoard, W&B (optional), and a progress bar on
a terminal.

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
from jaxlm.errors import ConfigError, first_line

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

  def append(self, line, progress=False):
    self.file.write(line)  # One write per whole line.
    self.file.flush()
    os.fsync(self.file.fileno())

  def close(self):
    self.file.close()


class _RemoteRows:
  """An object cannot be appended to: the whole file is rewritten (one atomic object write)
  at most every `flush_secs` and at close, so a hard kill loses at most that much; but the
  first train row of each start goes out at once: launch/supervise.py judges a restarted job's
  progress by it, and the job may fail again within flush_secs."""

  def __init__(self, path, flush_secs):
    self.path, self.flush_secs = path, flush_secs
    text = paths.read_text(path) if paths.isfile(path) else ''
    self.text = text[:text.rfind('\n') + 1]
    self.written = time.monotonic()
    self.progressed = False

  def append(self, line, progress=False):
    self.text += line
    first, self.progressed = progress and not self.progressed, self.progressed or progress
    if first or time.monotonic() - self.written >= self.flush_secs:
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
    self.workdir = workdir
    self.wandb = None  # A WandB once `start` has read the config.

  def write(self, step, row):
    if not self.enabled:
      return
    row = {'step': int(step), **{k: _plain(v) for k, v in row.items()}}
    self.rows.append(json.dumps(row) + '\n', progress='loss' in row)
    for key, value in row.items():
      if key != 'step' and isinstance(value, (int, float)) and math.isfinite(value):
        self.tensorboard.add_scalar(tag(key), value, step)
    if self.wandb is not None:
      self.wandb.log(row)

  def start(self, config, step):
    """Begins this process's part of the run at `step`: the resolved config into TensorBoard
    (as JSON text, its Text tab, and as hyperparameters against the losses, its HParams tab)
    and, with metrics.wandb_project, the workdir's W&B run (resumed if it has one)."""
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
    if config.metrics.wandb_project and self.wandb is None:
      self.wandb = WandB(self.workdir, config)

  def close(self):
    if self.enabled:
      self.rows.close()
      self.tensorboard.close()
      if self.wandb is not None:
        self.wandb.close()


WANDB_ID_FILE = 'wandb_run_id'


class WandB:
  """The run's Weights & Biases run: the config, then every metrics row (train, eval, goodput,
  downstream tasks) under its TensorBoard tag, against the x axis `step` (a resumed run
  redoes steps it had logged; W&B's own step only grows). Its id is kept in the workdir
  (wandb_run_id), so a resumed run continues the same W&B run."""

  def __init__(self, workdir, config):
    try:
      import wandb
    except ImportError as e:
      raise ConfigError('metrics.wandb_project is set but wandb is not installed: '
                        'pip install -e ".[wandb]", or leave metrics.wandb_project empty') from e
    m = config.metrics
    id_file = paths.join(workdir, WANDB_ID_FILE)
    run_id = paths.read_text(id_file).strip() if paths.isfile(id_file) else None
    try:
      self.run = wandb.init(
          project=m.wandb_project, entity=m.wandb_entity or None,
          name=m.wandb_run_name or paths.name(paths.normalize(workdir)), id=run_id,
          resume='allow', dir=None if paths.is_remote(workdir) else paths.normalize(workdir))
    except wandb.errors.Error as e:
      raise ConfigError(f'W&B could not start a run in project {m.wandb_project!r} ('
                        f'{first_line(e)}): run `wandb login`, or set WANDB_MODE=offline') from e
    # A resumed run may change fields (train_steps, to extend it): the latest values win.
    self.run.config.update(config.to_dict(), allow_val_change=True)
    self.run.define_metric('step')
    self.run.define_metric('*', step_metric='step')
    if run_id is None:
      paths.atomic_write(id_file, self.run.id)
    log.info('W&B run %s (%s)', self.run.id, self.run.url or 'offline: `wandb sync` uploads it')

  def log(self, row):
    values = {tag(k): v for k, v in row.items()
              if k != 'step' and isinstance(v, (int, float)) and math.isfinite(v)}
    self.run.log({'step': row['step'], **values})

  def close(self):
    self.run.finish()


def _plain(value):
  value = value.item() if hasattr(value, 'item') else value
  return value if not isinstance(value, float) or math.isfinite(value) else str(value)


def progress(total, initial, enabled=True):
  """A progress bar with time left, shown only when stderr is a terminal."""
  return tqdm.tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
                   disable=not (enabled and sys.stderr.isatty()))
