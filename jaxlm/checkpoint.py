"""Orbax checkpoints under <workdir>/checkpoints/<step>/, and what happens when things break.

Each checkpoint holds three items: `state` (parameters, optimizer state, step), `data` (the
grain iterator's position, one file per process: a record, since batch s is a pure function of
(seed, s), so a resumed run positions its data at its step) and `config` (the resolved
config). The dropout keys need no item: they are `fold_in(key(seed), step)`.

Saves are asynchronous: `save` returns once the arrays are copied off the devices and the files
are written in the background. Orbax writes each checkpoint to a temporary directory and
renames it when complete, and deletes old checkpoints only after a newer one is complete.
Restoring takes its shardings from the *current* mesh, so a run moves between meshes freely.

Each complete checkpoint gets a checksum manifest, and keep-N deletes old checkpoints only
after a newer one is complete and checksummed (jaxlm/integrity.py). A checkpoint that is
provably unusable (incomplete, not matching its checksums, holding non-finite values) is
renamed to `<step>.unreadable.<time>` - kept, never deleted - and the previous one is used;
one that fails to read for another reason stops the run with nothing renamed.

A local checkpointer (`local=True`, the host-local tier of jaxlm/tiers.py) holds the `state`
item alone and writes only this process's shards, every one it holds (replicated ones too),
with its own manifest and no barrier with the other processes: each process can restore its
part from its own disk, as long as the mesh and the process count are those it was saved with.
"""


import logging
import re
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxlm import integrity, paths
from jaxlm import workdir as workdir_lib
from jaxlm.errors import ConfigError, RunError, first_line

log = logging.getLogger('jaxlm')


class CheckpointError(RunError):
  """Writing a checkpoint failed (full disk, lost permissions...). Earlier ones are intact."""


def _grain():
  import grain  # Only the data item needs it.
  return grain


LOCAL_KEEP = 2  # Local copies kept: the newest may be cut short by the failure it is for.


class Checkpointer:

  def __init__(self, directory, config=None, read_only=False, compress=True, local=False):
    """compress=False writes the arrays without zstd: tensorstore compresses every array of a
    save at once in host memory (measured: a transient copy of all the bytes), which a
    one-shot parameter import cannot afford and float weights barely shrink under."""
    # Orbax reads only absolute paths; a gs:// URL goes to it as is, so that it uses its own
    # commit protocol for object stores (a marker file, not a directory rename).
    directory = paths.normalize(directory)
    self.directory = directory
    # keep-N is applied here (see _complete), not by Orbax: Orbax deletes old checkpoints as
    # soon as a new one is written, before it could be checksummed.
    self.keep = config.checkpoint.keep if config else None
    self.keep_every = config.checkpoint.keep_every_steps if config else 0
    self.local = local
    if local:
      self.keep, self.keep_every = LOCAL_KEEP, 0
      me = jax.process_index()
      # Orbax's emergency manager writes its local tier the same way (primary_host=None,
      # replica_id=None), but only for multi-slice meshes: jaxlm uses the pieces.
      processes = ocp.options.MultiprocessingOptions(
          primary_host=None, active_processes={me},
          barrier_sync_key_prefix=f'jaxlm-local-{me}')
      arrays = ocp.type_handlers.create_type_handler_registry((
          jax.Array, ocp.type_handlers.ArrayHandler(primary_host=None, replica_id=None,
                                                    use_replica_parallel=False)))
      items = {'state': ocp.PyTreeCheckpointHandler(
          use_compression=False, multiprocessing_options=processes,
          type_handler_registry=arrays)}
      extra = dict(multiprocessing_options=processes, save_root_metadata=False,
                   enable_per_process_directory_creation=True, create=False)
      if not read_only:
        paths.makedirs(directory)  # Orbax leaves it to the caller with active_processes.
    else:
      items = {'state': ocp.PyTreeCheckpointHandler(use_compression=compress),
               'data': _grain().checkpoint.CheckpointHandler(),
               'config': ocp.JsonCheckpointHandler()}
      extra = {}
    options = ocp.CheckpointManagerOptions(**{
        'max_to_keep': None, 'create': not read_only, 'read_only': read_only,
        'enable_async_checkpointing': True, 'cleanup_tmp_directories': not read_only, **extra})
    self.manager = ocp.CheckpointManager(directory, options=options, item_names=tuple(items),
                                         item_handlers=items)
    self.last_save_blocking_s = 0.0
    self._saving = None  # The step of the newest started save.
    self._pending = None  # A started save not yet checksummed.
    # Called once with the step of the first save of this session that is complete and
    # checksummed (train: the moment a changed config.json may replace the old one).
    self.on_saved = None

  @classmethod
  def for_workdir(cls, workdir, config, compress=True):
    return cls(workdir_lib.checkpoint_dir(workdir), config, compress=compress)

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_iterator, config):
    """Starts an asynchronous save; raises CheckpointError if this or an earlier write failed."""
    start = time.perf_counter()
    try:  # An earlier background write may have failed: that is the step to name.
      self.manager.check_for_errors()
      self.manager.wait_until_finished()  # What manager.save would wait for anyway.
      self._complete()
    except Exception as e:
      raise self._write_error(self._saving, e) from e
    self._saving = step
    items = {'state': ocp.args.PyTreeSave(state)}
    if not self.local:  # The data position and config live in the workdir's copy.
      items.update(data=_grain().checkpoint.CheckpointSave(data_iterator),
                   config=ocp.args.JsonSave(config.to_dict()))
    try:
      self._pending = step
      self.manager.save(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise self._write_error(step, e) from e
    self.last_save_blocking_s = time.perf_counter() - start

  def save_params(self, step, params, config):
    """Saves parameters without an optimizer state (jaxlm convert): training starts from them
    with a fresh one, and the commands that read parameters read them like any checkpoint."""
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave({'params': params}),
          config=ocp.args.JsonSave(config.to_dict())))
    except Exception as e:
      raise self._write_error(step, e) from e
    self._saving = self._pending = step

  def parameters_only_step(self):
    """The latest step if its checkpoint holds parameters alone (see save_params), else None."""
    step = self.latest_step()
    try:
      if step is not None and 'opt_state' not in self.manager.item_metadata(step)['state'].tree:
        return step
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is handled by restore_latest.
      pass
    return None

  def wait(self):
    """Blocks until every started save is complete."""
    try:
      self.manager.wait_until_finished()
      self._complete()
    except Exception as e:
      raise self._write_error(self._saving, e) from e

  def poll(self):
    """Checksums (and applies keep-N after) a save that has finished in the background, without
    waiting for one that has not: a local copy counts once checksummed, and the failure it is
    for may come before the next save."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def _complete(self):
    """After a save has finished: its checksum manifest, then keep-N (never deleting a
    checkpoint before a newer one is complete and checksummed), then `on_saved`."""
    step, self._pending = self._pending, None
    if step is None:
      return
    if self.local or jax.process_index() == 0:
      integrity.write_manifest(paths.join(self.directory, str(step)))
    if self.keep:
      self.manager.reload()
      old = [s for s in self.all_steps() if s < step]
      keep_every = self.keep_every
      for s in old[:max(0, len(old) - (self.keep - 1))]:
        if not (keep_every and s % keep_every == 0):
          self.manager.delete(s)
    if self.on_saved is not None:
      callback, self.on_saved = self.on_saved, None
      callback(step)

  def _write_error(self, step, e):
    # The failing write's own directory, where the error names it, over the step we assume.
    named = re.search(r'/(\d+)\.orbax-checkpoint-tmp', str(e))
    step = int(named.group(1)) if named else step
    return CheckpointError(f'writing the checkpoint of step {step} under {self.directory} '
                           f'failed ({type(e).__name__}: {first_line(e)}); the earlier '
                           f'checkpoints are intact')

  def restore_latest(self, abstract_state, shardings, above=-1):
    """(state, step) from the newest good checkpoint newer than `above`, or (None, 0) if there
    is none.

    A checkpoint that is provably unusable (incomplete, not matching its checksums, non-finite
    values) is set aside and the one before it used; any other failure to read one stops the
    run and renames nothing.
    """
    for step in reversed(self.all_steps()):
      if step <= above:
        break
      if step == self.parameters_only_step():
        return None, 0  # Parameters to start from (see resume.initial_state), not a state.
      step_dir = paths.join(self.directory, str(step))
      verdict = integrity.agreed(lambda: integrity.verify(step_dir))
      if verdict not in ('ok', 'unverified'):
        self._set_aside(step, verdict)
        continue
      state, bad = self.restore(step, abstract_state, shardings)
      if bad:
        self._set_aside(step, f'non-finite values in {bad}')
        continue
      return state, step
    return None, 0

  def restore(self, step, abstract_state, shardings):
    """(the state saved at `step`, None), or (None, the path of a non-finite leaf)."""
    target = self._state_target(step, _target(abstract_state, shardings))
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=_restore_args(target)))
    except Exception as e:  # Orbax/tensorstore raise many types for unreadable files.
      raise RunError(f'checkpoint {step} in {self.directory} cannot be read '
                     f'({type(e).__name__}: {first_line(e)}); nothing was renamed or '
                     f'deleted: move it out of the way to resume from the one before') from e
    bad = integrity.nonfinite_leaf(restored['state'])  # A collective: the same everywhere.
    if bad:
      return None, bad
    state = restored['state']
    if isinstance(state, dict):  # See _state_target.
      state = abstract_state.replace(**state, extra={})
    return state, None

  def _state_target(self, step, target):
    """What to restore of checkpoint `step` into `target` (a TrainState): all of it, or, from a
    checkpoint written before TrainState.extra existed, its other fields as a dict."""
    if 'extra' in self.manager.item_metadata(step)['state'].tree:
      return target
    if jax.tree.leaves(target.extra):
      raise ConfigError(f'checkpoint {step} in {self.directory} predates the model\'s variable '
                        f'collections {", ".join(target.extra)}; start a new --workdir, with '
                        f'init_from pointing at this one for its parameters')
    return {'step': target.step, 'params': target.params, 'opt_state': target.opt_state}

  def _set_aside(self, step, reason):
    log.warning('checkpoint %d in %s is unusable (%s); setting it aside as %d.unreadable.* '
                'and trying the previous one', step, self.directory, reason, step)
    if jax.process_index() == 0:
      path = paths.join(self.directory, str(step))
      paths.rename(path, f'{path}.unreadable.{int(time.time())}')
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'jaxlm checkpoint {step} set aside')
    self.manager.reload()

  def saved_config(self, step):
    """The config dict saved with checkpoint `step`, or None if it cannot be read."""
    try:
      return self.manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))['config']
    except Exception:  # noqa: BLE001 - an unreadable config only skips a consistency check.
      return None

  def saved_params(self, step):
    return self.manager.item_metadata(step)['state'].tree['params']

  def check_params(self, step, abstract_params, optional=()):
    """A ConfigError naming the first parameter whose saved shape differs from the model's.
    Top-level modules named in `optional` (a new classifier head) may be absent."""
    saved = self.saved_params(step)
    check_shapes(saved, _without_absent(abstract_params, saved, optional),
                 f'{self.directory}/{step}')

  def restore_params(self, step, abstract_params, shardings, optional=()):
    """The parameters saved at `step` (no optimizer state is read). Modules in `optional` that
    the checkpoint lacks are left out of the result; saved ones the model lacks are ignored."""
    target = _without_absent(_target(abstract_params, shardings), self.saved_params(step),
                             optional)
    self.check_params(step, target)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=_restore_args({'params': target}, partial=True)))
    return restored['state']['params']

  def restore_extra(self, step, abstract_extra, shardings):
    """The model's other variables (TrainState.extra) saved at `step`, or None where the
    checkpoint has none of them (parameters only, or written before they existed)."""
    saved = self.manager.item_metadata(step)['state'].tree.get('extra')
    if not jax.tree.leaves(abstract_extra) or not saved:
      return None
    target = _target(abstract_extra, shardings)
    check_shapes(saved, target, f'{self.directory}/{step}')
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=_restore_args({'extra': target}, partial=True)))
    return restored['state']['extra']

  def read_params(self, step, abstract_params, batch_bytes=2 ** 26):
    """The parameters saved at `step` as host numpy arrays, read about `batch_bytes` at a
    time (exporting a model that fills the host's memory: a whole-tree restore holds
    transient read buffers of a large part of its size, measured 0.5x)."""
    self.check_params(step, abstract_params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    read = {}
    for batch in _batches(flat, batch_bytes):
      item = _nest(batch)
      as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
      restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item={'params': item}, restore_args={'params': as_numpy}, partial_restore=True)))
      read.update(jax.tree_util.tree_flatten_with_path(restored['state']['params'])[0])
    return jax.tree.unflatten(treedef, [read[path] for path, _ in flat])

  def close(self):
    self.manager.close()


def _batches(flat, max_bytes):
  """Consecutive runs of (path, leaf) of at most `max_bytes` each (or one larger leaf)."""
  batch, size = [], 0
  for path, leaf in flat:
    nbytes = leaf.size * leaf.dtype.itemsize
    if batch and size + nbytes > max_bytes:
      yield batch
      batch, size = [], 0
    batch.append((path, leaf))
    size += nbytes
  if batch:
    yield batch


def _nest(flat):
  """The nested dicts holding the (path, leaf) pairs of `flat`: parameter trees are dicts
  all the way down, so every path is of dict keys."""
  tree = {}
  for path, leaf in flat:
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key.key, {})
    node[path[-1].key] = leaf
  return tree


def _without_absent(params, saved, optional):
  return {k: v for k, v in params.items() if k not in optional or k in saved}


def _target(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _restore_args(target, partial=False):
  """Restore exactly the leaves of `target`, each laid out by its sharding."""
  shardings = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)
  return ocp.args.PyTreeRestore(item=target, restore_args=shardings, partial_restore=partial)


def check_shapes(saved, target, where):
  """A clear error naming the first parameter whose saved shape differs from the model's."""
  flat_saved = {jax.tree_util.keystr(p): leaf for p, leaf in
                jax.tree_util.tree_flatten_with_path(saved)[0]}
  for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    name = jax.tree_util.keystr(path)
    if name not in flat_saved:
      raise ConfigError(f'the checkpoint at {where} has no parameter {name}; it was written '
                        f'by a different model')
    if tuple(flat_saved[name].shape) != tuple(leaf.shape):
      raise ConfigError(f'parameter {name} has shape {tuple(flat_saved[name].shape)} in the '
                        f'checkpoint at {where} but {tuple(leaf.shape)} in this model')


def find(path):
  """(Checkpointer, step) for `init_from`: a workdir, its checkpoints/ dir, or one step's dir."""
  path = paths.normalize(path)
  candidates = [(workdir_lib.checkpoint_dir(path), None), (path, None)]
  if paths.name(path).isdigit():
    candidates.append((paths.parent(path), int(paths.name(path))))
  for directory, step in candidates:
    if paths.isdir(directory):
      checkpointer = Checkpointer(directory, read_only=True)
      steps = checkpointer.all_steps()
      if steps and (step is None or step in steps):
        return checkpointer, step if step is not None else steps[-1]
  raise ConfigError(f'init_from={path!r} holds no jaxlm checkpoint; give a workdir, its '
                    f'checkpoints/ directory or checkpoints/<step>')
