"""The files of a run directory, and the rules that keep them whole.

<workdir>/config.json     the resolved config of the run
<workdir>/metrics.jsonl   one JSON object per logged step (see metrics.py)
<workdir>/tensorboard/    TensorBoard event files
<workdir>/tokenizer.model the sentencepiece model (unless data.tokenizer names one)
<workdir>/checkpoints/    Orbax checkpoints, one directory per saved step
<workdir>/data/           the tokenized corpus cache (unless data.cache_dir is set)
<workdir>/inputs.json     what the run was started with (its tokenizer's SHA-256): every later
                          command on the run is checked against it
"""

import hashlib
import json
import os

from jaxlm import config as config_lib
from jaxlm import paths
from jaxlm.errors import ConfigError, RunError, io_reason

# Fields that fix the parameters' shapes or meaning: a run's checkpoints only fit these values.
SHAPE_FIELDS = ('objective', 'model.num_layers', 'model.emb_dim', 'model.num_heads',
                'model.num_kv_heads', 'model.head_dim', 'model.mlp_dim', 'model.vocab_size',
                'model.max_len', 'model.norm', 'model.position', 'model.gated_mlp',
                'model.use_bias', 'model.tied_embeddings', 'model.scan_layers',
                'model.norm_position', 'model.head_transform', 'model.output_bias',
                'model.type_vocab_size', 'data.tokenizer')


def config_path(workdir):
  return paths.join(workdir, 'config.json')


def metrics_path(workdir):
  return paths.join(workdir, 'metrics.jsonl')


def checkpoint_dir(workdir):
  return paths.join(workdir, 'checkpoints')


atomic_write = paths.atomic_write  # Readers see the old file or the new one, never half.


def check(workdir, config):
  """Refuses a workdir that cannot be written or holds a run of another model shape.

  Leaves nothing behind: a run writes nothing until its config, mesh and data have all been
  checked. Writability is tried, not inferred (root passes os.access even on /proc).
  """
  check_writable(workdir)
  previous = read_config(workdir)
  if previous is not None:
    for name in SHAPE_FIELDS:
      old, new = config_lib.get_field(previous, name), config_lib.get_field(config, name)
      if old != new:
        raise ConfigError(f'--workdir={workdir} holds a run with {name}={old!r}, this config '
                          f'has {new!r}; use a new --workdir')


def check_writable(workdir):
  """Refuses a workdir that is not a directory (or cannot be made one) or cannot be written."""
  if paths.is_remote(workdir):
    probe = paths.join(workdir, f'.jaxlm-write-test.{os.getpid()}')
  else:
    existing = paths.normalize(workdir)
    while not os.path.exists(existing):  # The nearest part of the path that exists...
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing):  # ...must be a directory we may write in.
      raise ConfigError(f'--workdir={workdir!r} cannot be created: {existing} is not a '
                        f'directory')
    probe = os.path.join(existing, f'.jaxlm-write-test.{os.getpid()}')
  try:
    paths.atomic_write(probe, '')
    paths.remove(probe)
  except Exception as e:  # noqa: BLE001 - OSError, or a storage client's own error types.
    raise ConfigError(f'--workdir={workdir!r} is not writable: {io_reason(e)}') from e


def create(workdir):
  """Makes the workdir (and its parents) with a one-line error if that is impossible."""
  try:
    paths.makedirs(workdir)
  except OSError as e:
    raise ConfigError(f'--workdir={workdir!r} cannot be created: {io_reason(e)}') from e


def save_config(workdir, config):
  create(workdir)
  try:
    atomic_write(config_path(workdir), config_lib.to_json(config))
  except OSError as e:  # The environment (a full disk), not the input: exit status 1.
    raise RunError(f'cannot write {config_path(workdir)}: {io_reason(e)}') from e


def read_config(workdir):
  """The config.json of a workdir, or None if it has none."""
  path = config_path(workdir)
  if not paths.isfile(path):
    return None
  try:
    return config_lib.from_json(paths.read_text(path))
  except ValueError as e:  # json.JSONDecodeError and ConfigError are ValueErrors.
    raise ConfigError(f'{path} is not a valid jaxlm config: {e}') from e


def inputs_path(workdir):
  return paths.join(workdir, 'inputs.json')


def _sha256(data):
  return hashlib.sha256(data).hexdigest()


def read_inputs(workdir):
  """The run's record of its inputs (dict), or None if it has none (a run of an older jaxlm,
  or one not started yet)."""
  path = inputs_path(workdir)
  if not paths.exists(path):
    return None
  try:
    record = json.loads(paths.read_text(path))
    if not isinstance(record, dict) or not isinstance(record.get('tokenizer_sha256'), str):
      raise ValueError('no tokenizer_sha256')
    return record
  except (ValueError, OSError) as e:
    raise ConfigError(f'{path} cannot be read ({e}); it records the run\'s tokenizer: restore '
                      f'it, or delete it to accept the tokenizer there is now') from e


def record_inputs(workdir, tokenizer):
  """Records the tokenizer the run starts with (once: a resumed run keeps its record)."""
  if read_inputs(workdir) is None:
    atomic_write(inputs_path(workdir), json.dumps(
        {'tokenizer': tokenizer.path, 'tokenizer_sha256': _sha256(tokenizer.data)}, indent=1))


def check_tokenizer(workdir, tokenizer):
  """A ConfigError if `tokenizer` is not the one the run in `workdir` recorded."""
  record = read_inputs(workdir)
  if record is not None and record['tokenizer_sha256'] != _sha256(tokenizer.data):
    raise ConfigError(f'tokenizer {tokenizer.path} is not the one --workdir={workdir} was '
                      f'trained with ({record["tokenizer"]}; its SHA-256 is recorded in '
                      f'{inputs_path(workdir)}): restore that file, or train a new run in a new '
                      f'--workdir')
