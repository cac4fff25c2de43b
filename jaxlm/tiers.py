"""Two checkpoint tiers: host-local copies saved often, the workdir's saved rarely.

At pod scale the workdir is a bucket: writing a 7B state there takes minutes, so it is saved
rarely (checkpoint.save_every_steps). With checkpoint.local_dir each process also saves its
own shards to a host-local path every checkpoint.local_every_steps, under

    <local_dir>/<run id>/<layout>/process_<i>/<step>/

the run id naming the workdir (two runs sharing a host never collide) and the layout the
process count and mesh the copies were written on: a process can read back only the shards
it held, so a copy is usable only on the layout that wrote it. Local copies carry checksums
like the workdir's (checkpoint.Checkpointer(local=True)).

A restart resumes from the newest step that *every* process can restore (`restore`): each
process lists its local steps whose checksums match, all processes agree on the newest step
they all have (one all-gather), and that step is used if it is at least as new as the
workdir's newest; else the workdir's tier, with its own rules (a corrupt checkpoint set
aside, the one before used). A lost or corrupt local copy on one host costs only a read of
the workdir's copy; the workdir is never written to for it.

Orbax's emergency CheckpointManager does this for multi-slice meshes (a replica axis of 2 or
more, peers broadcasting a slice's copy), keeps only the `state` item and checks no checksums;
jaxlm runs on one slice too, so it builds on Orbax's pieces (see checkpoint.Checkpointer) and
has no cross-host replica: a host that lost its disk means a restore from the workdir.
"""

import hashlib
import logging
import os

import jax
import numpy as np

from jaxlm import checkpoint, integrity, paths

log = logging.getLogger('jaxlm')

# The most local steps one process reports in the agreement: more than it keeps.
REPORTED = 8


def run_id(workdir):
  """The workdir's name and a hash of its full path: readable, and unique per workdir."""
  path = paths.normalize(workdir).rstrip('/')
  return f'{paths.name(path)}-{hashlib.sha256(path.encode()).hexdigest()[:12]}'


def layout(mesh):
  """'p2-data2-fsdp4': the process count and the mesh's axis sizes (its non-trivial ones)."""
  axes = '-'.join(f'{name}{size}' for name, size in mesh.shape.items() if size > 1)
  return f'p{jax.process_count()}' + (f'-{axes}' if axes else '')


def local_directory(config, workdir, mesh):
  return os.path.join(os.path.abspath(config.checkpoint.local_dir), run_id(workdir),
                      layout(mesh), f'process_{jax.process_index()}')


def open_local(config, workdir, mesh):
  """This process's local checkpointer, or None when the run has no local tier."""
  if not config.checkpoint.local_dir:
    return None
  return checkpoint.Checkpointer(local_directory(config, workdir, mesh), config, local=True)


def intact_steps(local):
  """This process's local steps whose checksums match, oldest first. A copy with no manifest
  was cut short by the failure it was saved for: it does not count."""
  steps = []
  for step in local.all_steps():
    verdict = integrity.verify(paths.join(local.directory, str(step)))
    if verdict == 'ok':
      steps.append(step)
    else:
      log.warning('local checkpoint %d in %s is unusable (%s); skipping it', step,
                  local.directory, verdict)
  return steps


def newest_common(steps):
  """The newest of `steps` (this process's) that every process has, or None: one decision,
  the same on every process."""
  if jax.process_count() == 1:
    return max(steps, default=None)
  from jax.experimental import multihost_utils
  row = np.full(REPORTED, -1, np.int32)
  newest = sorted(steps)[-REPORTED:]
  row[:len(newest)] = newest
  table = np.asarray(multihost_utils.process_allgather(row))
  common = set.intersection(*(set(r.tolist()) for r in table)) - {-1}
  return max(common, default=None)


def restore(s, checkpoints, local):
  """(state, step, tier) from the newest step every process can restore: 'local',
  'persistent', or (None, 0, None) when neither tier has one. This process's local copies
  newer than that step are deleted: the run saves those steps again (Orbax saves no step
  older than its newest), and they are the same bits, trained again from the same step."""
  state, step, tier = _restore(s, checkpoints, local)
  if local is not None:
    for newer in [n for n in local.all_steps() if n > step]:
      log.info('deleting local checkpoint %d of %s: not every process has it', newer,
               local.directory)
      local.manager.delete(newer)
  return state, step, tier


def _restore(s, checkpoints, local):
  best = None
  if local is not None:
    mine = intact_steps(local)
    best = newest_common(mine)
    log.info('local checkpoints of this process: %s; of every process: %s',
             ', '.join(map(str, mine)) or 'none', 'none' if best is None else best)
  persistent = checkpoints.all_steps()
  # The workdir's tier first, if it is newer: a corrupt newest one there is set aside and the
  # ones down to the local step tried, by its own rules.
  state, step = checkpoints.restore_latest(s.abstract_state, s.shardings,
                                           above=-1 if best is None else best)
  if state is not None:
    if local is not None:
      log.info('the workdir holds a newer step (%d) than every host\'s local copies (%s)',
               step, 'none' if best is None else best)
    return state, step, 'persistent'
  if best is not None:
    state, bad = local.restore(best, s.abstract_state, s.shardings)
    if state is not None:
      log.info('resuming from step %d of the local tier (%s on each host); the workdir\'s '
               'newest is %s', best, local.directory,
               max(persistent) if persistent else 'none')
      return state, best, 'local'
    log.warning('local checkpoint %d holds non-finite values in %s; using the workdir\'s',
                best, bad)
    state, step = checkpoints.restore_latest(s.abstract_state, s.shardings)
    if state is not None:
      return state, step, 'persistent'
  return None, 0, None
