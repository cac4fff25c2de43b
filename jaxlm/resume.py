"""Resuming a run without ever losing it to an input mistake.

Three rules, each enforced here:

1. Before any restore, the requested config is compared with the run's config.json by the
   train state each of them builds (tree structure, shapes and dtypes, from `jax.eval_shape`:
   no hand-kept list of "shape fields"). A change that alters it (optimizer.grad_clip on/off,
   a model size, model.param_dtype) stops with exit 2 naming the fields that differ; a change
   that does not (train_steps, eval intervals, the learning rate) resumes.
2. A checkpoint gets a checksum manifest (`jaxlm_checksums.json`: a CRC-32 per file) once its
   save is complete, and is checked against it at restore. Only a checkpoint that is provably
   unusable - incomplete (Orbax's metadata missing), not matching its manifest, or holding
   non-finite values - is set aside, decided by process 0 for all processes.
3. Old checkpoints are deleted (keep-N) only after a newer one is complete and checksummed,
   and config.json changes only then (see Checkpointer.on_saved).
"""

import json
import logging
import math
import zlib

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm import optim, paths
from jaxlm import model as model_lib
from jaxlm import state as state_lib
from jaxlm import workdir as workdir_lib
from jaxlm.errors import ConfigError, RunError, first_line

log = logging.getLogger('jaxlm')
MANIFEST = 'jaxlm_checksums.json'
# Written by Orbax when a step (and its state item) is complete.
REQUIRED = ('_CHECKPOINT_METADATA', 'state/_METADATA')


def state_signature(config):
  """{path: (shape, dtype)} of the train state `config` builds, without allocating it."""
  model = model_lib.build(config)
  tx, _ = optim.optimizer(config, model)
  abstract = state_lib.strip_boxes(state_lib.abstract_state(model, tx, config))
  return {jax.tree_util.keystr(path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}


def check_compatible(workdir, config, new_signature=None):
  """A ConfigError (exit 2) if the run saved in `workdir` cannot be resumed with `config`:
  names the first state leaf that differs and the config fields that changed."""
  previous = workdir_lib.read_config(workdir)
  if previous is None:
    return
  old = state_signature(previous)
  new = new_signature or state_signature(config)
  if _parameters_only(workdir):  # An imported model (jaxlm convert): no optimizer state yet.
    old, new = ({k: v for k, v in sig.items() if k.startswith('.params')} for sig in (old, new))
  if old == new:
    return
  leaf = next((k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)))
  changed = [f'{name}={config_lib.get_field(previous, name)!r} -> '
             f'{config_lib.get_field(config, name)!r}'
             for name in config_lib._flat_keys(config)
             if config_lib.get_field(previous, name) != config_lib.get_field(config, name)]
  raise ConfigError(
      f'--workdir={workdir} holds a run whose train state does not fit this config (state '
      f'{leaf}: {_describe(old.get(leaf))} saved, {_describe(new.get(leaf))} now; changed: '
      f'{", ".join(changed[:4]) or "none"}); resume with the run\'s own settings (jaxlm train '
      f'--workdir={workdir}) or start a new run in a new --workdir')


def _parameters_only(workdir):
  from jaxlm import checkpoint  # Not at import time: checkpoint.py imports this module.
  checkpoints = checkpoint.Checkpointer(workdir_lib.checkpoint_dir(workdir), read_only=True)
  try:
    return checkpoints.parameters_only_step() is not None
  finally:
    checkpoints.close()


def _describe(entry):
  return 'absent' if entry is None else f'{entry[1]}{list(entry[0])}'


def _files(step_dir):
  """Every file of a checkpoint but the manifest, as paths relative to `step_dir`."""
  root = str(step_dir).rstrip('/')
  found = paths.files_under(root)
  return sorted(p[len(root) + 1:] for p in found if not p.endswith(MANIFEST))


def _crc(path):
  crc = 0
  with paths.open(path, 'rb') as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def write_manifest(step_dir):
  """Records a CRC-32 of every file of a complete checkpoint (process 0 only)."""
  sums = {name: _crc(paths.join(step_dir, name)) for name in _files(step_dir)}
  paths.atomic_write(paths.join(step_dir, MANIFEST), json.dumps(sums, sort_keys=True))


def verify(step_dir):
  """'ok', 'unverified' (no manifest: saved by an older jaxlm or interrupted right after the
  save), or the reason the checkpoint is provably unusable."""
  for name in REQUIRED:
    if not paths.exists(paths.join(step_dir, name)):
      return f'incomplete: {name} is missing'
  manifest = paths.join(step_dir, MANIFEST)
  if not paths.exists(manifest):
    return 'unverified'
  try:
    sums = json.loads(paths.read_text(manifest))
    assert isinstance(sums, dict)
  except (ValueError, AssertionError, UnicodeDecodeError):
    return f'its {MANIFEST} is not readable'
  present = set(_files(step_dir))
  for name, crc in sorted(sums.items()):
    if name not in present:
      return f'{name} is missing'
    if _crc(paths.join(step_dir, name)) != crc:
      return f'{name} does not match its checksum'
  return 'ok'


def read_good_params(s, checkpoints, step, host, explicit):
  """The parameters of checkpoint `step` if it is intact and finite; else None (a warning) for
  the latest, or an error for one the user asked for. Reads only: nothing is set aside."""
  problem = verify(paths.join(checkpoints.directory, str(step)))
  params = None
  if problem in ('ok', 'unverified'):
    try:
      if host:
        params = checkpoints.read_params(step, s.abstract_state.params)
      else:
        with s.active():
          params = checkpoints.restore_params(step, s.abstract_state.params,
                                              s.shardings.params)
    except ConfigError:
      raise
    except Exception as e:  # Orbax/tensorstore raise many types for unreadable files.
      problem = f'{type(e).__name__}: {first_line(e)}'
    else:
      bad = nonfinite_leaf(params)
      problem = f'non-finite values in {bad}' if bad else None
  if problem is None:
    return params
  if explicit:
    raise RunError(f'checkpoint {step} in {checkpoints.directory} is unusable ({problem}); '
                   f'choose another --step')
  log.warning('checkpoint %d in %s is unusable (%s); using the one before', step,
              checkpoints.directory, problem)
  return None


def nonfinite_leaf(tree):
  """The path of the first floating-point leaf with a non-finite value, or None."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating):
      continue
    if isinstance(leaf, np.ndarray):  # Host parameters (convert): no device copy of a leaf.
      # A sum is finite exactly when every element is (float64: no overflow of sane weights).
      finite = math.isfinite(float(np.sum(leaf, dtype=np.float64)))
    else:
      finite = bool(jax.device_get(jax.numpy.isfinite(leaf).all()))
    if not finite:
      return jax.tree_util.keystr(path)
  return None


def agreed(decide):
  """decide() as process 0 computes it, the same on every process (one decision for all)."""
  if jax.process_count() == 1:
    return decide()
  from jax.experimental import multihost_utils
  verdict = decide() if jax.process_index() == 0 else ''
  data = np.frombuffer(verdict.encode()[:255].ljust(256, b'\0'), np.uint8)
  data = multihost_utils.broadcast_one_to_all(data)
  return bytes(np.asarray(data)).rstrip(b'\0').decode(errors='replace')
