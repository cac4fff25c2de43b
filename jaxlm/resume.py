"""Where a run's state comes from, without ever losing a run to an input mistake.

Resuming the run in a workdir (`initial_state`: the newest good checkpoint, else a fresh
state, with the parameters of `init_from` or of an imported model), and reading a run's
parameters for the commands that evaluate, run or export it (`restore_params`). Three rules,
each enforced here or in what it calls:

1. Before any restore, the requested config is compared with the run's config.json by the
   train state each of them builds (tree structure, shapes and dtypes, from `jax.eval_shape`:
   no hand-kept list of "shape fields"). A change that alters it (optimizer.grad_clip on/off,
   a model size, model.param_dtype) stops with exit 2 naming the fields that differ; a change
   that does not (train_steps, eval intervals, the learning rate) resumes.
2. A checkpoint is read only if it is intact (jaxlm/integrity.py: complete, matching its
   checksums, finite); a provably unusable one is set aside, decided by process 0 for all.
3. Old checkpoints are deleted (keep-N) only after a newer one is complete and checksummed,
   and config.json changes only then (see Checkpointer.on_saved).
"""

import logging

import jax

from jaxlm import checkpoint, errors, integrity, limits, objectives, optim, paths, tiers
from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm import run as run_lib
from jaxlm import state as state_lib
from jaxlm import workdir as workdir_lib
from jaxlm.errors import ConfigError, RunError, first_line

log = logging.getLogger('jaxlm')


def saved_objective(config):
  """The objective of a run's saved config (the run `init_from` names, a workdir being
  resumed): besides the run builder (run.setup), the one place that makes an objective."""
  return objectives.get(config)


def signature(abstract_state):
  """{path: (shape, dtype)} of an (unboxed) abstract train state."""
  return {jax.tree_util.keystr(path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}


def state_signature(config):
  """The signature of the train state a saved `config` builds, without allocating it."""
  objective = saved_objective(config)
  model = model_lib.build(config.model, objective.causal, objective.num_labels)
  tx, _ = optim.optimizer(config, model)
  return signature(state_lib.strip_boxes(state_lib.abstract_state(model, tx, config)))


def check_compatible(workdir, config, abstract_state):
  """A ConfigError (exit 2) if the run saved in `workdir` cannot be resumed with `config`,
  whose (unboxed) abstract state is `abstract_state`: names the first state leaf that differs
  and the config fields that changed."""
  previous = workdir_lib.read_config(workdir)
  if previous is None:
    return
  old = state_signature(previous)
  new = signature(abstract_state)
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
  checkpoints = checkpoint.Checkpointer(workdir_lib.checkpoint_dir(workdir), read_only=True)
  try:
    return checkpoints.parameters_only_step() is not None
  finally:
    checkpoints.close()


def _describe(entry):
  return 'absent' if entry is None else f'{entry[1]}{list(entry[0])}'


GONE = 'gone'  # What read_good_params returns for a checkpoint deleted while it was read.


def read_good_params(s, checkpoints, step, host, explicit):
  """The parameters of checkpoint `step` if it is intact and finite; else None (a warning) for
  the latest, or an error for one the user asked for; GONE if it is being deleted (a run
  rotating its checkpoints: the listing changed, a newer one exists). Reads only: nothing is
  set aside."""
  step_dir = paths.join(checkpoints.directory, str(step))
  try:
    problem = integrity.verify(step_dir)
  except OSError as e:  # A file deleted under the checksum pass.
    problem = f'{type(e).__name__}: {first_line(e)}'
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
      bad = integrity.nonfinite_leaf(params)
      problem = f'non-finite values in {bad}' if bad else None
  if problem is None:
    return params
  gone = not paths.exists(step_dir)
  if not gone and not explicit:  # Half deleted? Then a newer checkpoint is complete.
    listed = checkpoints.all_steps()
    checkpoints.manager.reload()
    gone = checkpoints.all_steps() != listed
  if gone:
    if explicit:
      raise ConfigError(f'--step={step}: checkpoint {step} in {checkpoints.directory} was '
                        f'deleted while it was read (a run keeps only its newest '
                        f'checkpoint.keep); choose another --step')
    return GONE
  if explicit:
    raise RunError(f'checkpoint {step} in {checkpoints.directory} is unusable ({problem}); '
                   f'choose another --step')
  log.warning('checkpoint %d in %s is unusable (%s); using the one before', step,
              checkpoints.directory, problem)
  return None


def restore_for_inference(config, workdir, step=None, batch_size=1):
  """(setup on one local device, the parameters of checkpoint `step` (default: the latest),
  that step), for the commands that only run the model (fill-mask, generate)."""
  s = run_lib.inference_setup(config, batch_size)
  return (s, *restore_params(s, workdir, step))


READ_TRIES = 8


def restore_params(s, workdir, step=None, host=False):
  """(the parameters of the workdir's checkpoint `step`, default the latest, in the shardings
  of `s` - or as host numpy arrays, read a batch of leaves at a time, if `host`; that step)."""
  directory = workdir_lib.checkpoint_dir(workdir)
  if not paths.isdir(directory):
    raise errors.ConfigError(f'--workdir={workdir} has no checkpoint; train first')
  # Read-only: a run still training in `workdir` keeps its in-progress save.
  checkpoints = checkpoint.Checkpointer(directory, read_only=True)
  try:
    saved = checkpoints.all_steps()
    if not saved:
      raise errors.ConfigError(f'--workdir={workdir} has no checkpoint; train first')
    if step is not None and step not in saved:
      raise errors.ConfigError(f'--step={step}: --workdir={workdir} has checkpoints of steps '
                               f'{", ".join(map(str, saved))}')
    for _ in range(READ_TRIES):  # A training run may delete checkpoints (keep-N) meanwhile.
      for candidate in ([step] if step is not None else reversed(saved)):
        params = read_good_params(s, checkpoints, candidate, host, explicit=step is not None)
        if params is GONE:
          break  # A newer one replaced it: list them again.
        if params is not None:
          return params, candidate
      else:
        raise errors.RunError(f'--workdir={workdir} has no usable checkpoint (see the warnings '
                              f'above); nothing was changed')
      checkpoints.manager.reload()
      saved = checkpoints.all_steps()
    raise errors.RunError(f'--workdir={workdir}: its checkpoints were deleted faster than '
                          f'they could be read ({READ_TRIES} tries); try again')
  finally:
    checkpoints.close()


def restore_extra(s, workdir, step):
  """The model's other variables (TrainState.extra: fp8 amax histories) of the workdir's
  checkpoint `step`, in the shardings of `s`; a fresh state's where the checkpoint has none
  (an imported model). What eval, generate and fill-mask run the model with."""
  if not jax.tree.leaves(s.abstract_state.extra):
    return {}
  checkpoints = checkpoint.Checkpointer(workdir_lib.checkpoint_dir(workdir), read_only=True)
  try:
    with s.active():
      extra = checkpoints.restore_extra(step, s.abstract_state.extra, s.shardings.extra)
      return extra if extra is not None else state_lib.initial_extra(s.model, s.tx, s.config,
                                                                     s.shardings)
  finally:
    checkpoints.close()


def init_source(s):
  """(Checkpointer, step) that `init_from` names, checked against the model; or None."""
  if not s.config.init_from:
    return None
  source, step = checkpoint.find(s.config.init_from)
  problem = integrity.verify(paths.join(source.directory, str(step)))
  if problem not in ('ok', 'unverified'):
    raise errors.ConfigError(f'init_from={s.config.init_from!r}: checkpoint {step} is unusable '
                             f'({problem})')
  saved = source.saved_config(step)
  if saved is not None:
    s.objective.check_init_from(saved_objective(saved), s.config.init_from)
  source.check_params(step, s.abstract_state.params, model_lib.CLASSIFIER_PARAMS)
  return source, step


def initial_state(s, checkpoints, source, local=None):
  """(state, step, tier): the newest checkpoint every process can restore, from the local tier
  (`local`, jaxlm/tiers.py) or the workdir's ('local', 'persistent'); or a fresh state
  (`source`'s parameters, tier None). Onto any mesh and process count that fits the state: a
  job restarted on fewer hosts resumes resharded, or stops here in one line. The data needs
  no restoring: batch s is a pure function of (seed, s) (jaxlm/phases.py)."""
  limits.check_devices(state_lib.bytes_per_device(s.abstract_state, s.shardings),
                       list(s.mesh.devices.flat), 'the train state (parameters and optimizer)',
                       'make the model smaller or shard it over more devices (mesh.fsdp)')
  state, step, tier = tiers.restore(s, checkpoints, local)
  if state is not None:
    log.info('resumed from the checkpoint of step %d (%s tier)', step, tier)
    return state, step, tier
  state = state_lib.initialize(s.model, s.tx, s.config, s.shardings)
  imported = checkpoints.parameters_only_step()
  if imported is not None:  # A converted checkpoint (jaxlm convert): parameters, no optimizer.
    source = checkpoints, imported
  if source is not None:
    checkpointer, source_step = source
    log.info('initialising the parameters from %s/%d', checkpointer.directory, source_step)
    restored = checkpointer.restore_params(source_step, s.abstract_state.params,
                                           s.shardings.params, model_lib.CLASSIFIER_PARAMS)
    bad = integrity.nonfinite_leaf(restored)  # Else no step would ever be finite.
    if bad:
      raise errors.ConfigError(f'{checkpointer.directory}/{source_step} holds non-finite values '
                               f'in {bad}; start from another checkpoint')
    fresh = sorted(set(state.params) - set(restored))
    if fresh:
      log.info('new parameters (not in the checkpoint): %s', ', '.join(fresh))
    state = state.replace(params={**state.params, **restored})
  return state, imported or 0, None
