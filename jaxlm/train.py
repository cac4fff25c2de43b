"""`jaxlm train` / `finetune`: wires a run together - builder (jaxlm/run.py), data, checkpoints,
metrics - and hands it to the loop (jaxlm/loop.py) with its hooks (jaxlm/hooks.py)."""

import logging
import time

import jax

from jaxlm import (checkpoint, data, distributed, goodput, hooks, lock, metrics, objectives,
                   paths, preemption, profile, resume, steps)
from jaxlm import loop as loop_lib
from jaxlm import run as run_lib
from jaxlm import workdir as workdir_lib

log = logging.getLogger('jaxlm')
DATA_PREPARED = 'process 0 has prepared the data (tokenizer, token cache)'


def train(config, workdir, devices=None):
  """Trains (or resumes) the run in `workdir`. Returns the last logged and eval metrics.
  The chief holds the workdir's lock (jaxlm/lock.py) from when the input is checked."""
  held = []
  try:
    return _train(config, workdir, devices, held)
  finally:
    for workdir_lock in held:
      workdir_lock.release()


def _train(config, workdir, devices, held):
  clock = goodput.Clock()
  objective = objectives.get(config)
  objective.complete()  # E.g. a classifier's labels, before the model is built.
  s = run_lib.setup(config, devices)
  distributed.on_chief('workdir check', lambda: workdir_lib.check(workdir, config))
  process = (jax.process_index(), jax.process_count())
  chief = process[0] == 0
  # Resuming? Then the saved state must fit this config, checked before anything is restored.
  resuming = any(paths.name(p).isdigit()
                 for p in paths.glob(paths.join(workdir_lib.checkpoint_dir(workdir), '*')))
  if resuming:
    resume.check_compatible(workdir, config)
  source = run_lib.init_source(s)
  # The chief trains the tokenizer and fills the token cache; the others then read them.
  if not chief:
    distributed.barrier(DATA_PREPARED)
  corpus = data.prepare(config, workdir)
  if chief:
    held.append(lock.acquire(workdir))
    if not resuming:  # A resumed run's config.json changes once its new save is good.
      workdir_lib.save_config(workdir, config)
    distributed.barrier(DATA_PREPARED)
  prepare = objective.prepare(corpus.tokenizer)
  batches = data.train_iterator(data.train_dataset(corpus.train, config, *process), config)
  eval_set = data.eval_batches(corpus.validation, config, *process)
  objective.log_baseline(data.eval_tokens(eval_set), prepare)
  checkpoints = checkpoint.Checkpointer.for_workdir(workdir, config)
  if chief and resuming:
    checkpoints.on_saved = lambda step: workdir_lib.save_config(workdir, config)
  writer = metrics.Writer(workdir, enabled=chief)
  try:
    with s.active(), preemption.Watcher() as preempted:
      state, start = clock.timed('checkpoint', run_lib.initial_state, s, checkpoints, batches,
                                 source)
      compile_start = time.perf_counter()
      compiled = clock.timed('compile', run_lib.compile_train_step, s, prepare)
      log.info('compiled the train step in %.1f s', time.perf_counter() - compile_start)
      run_lib.log_summary(s, compiled)
      eval_step = jax.jit(steps.make_eval_step(s.model, config, prepare,
                                               objective.token_bytes(corpus.tokenizer)),
                          in_shardings=(s.shardings.params, s.batch_sharding))
      saving = hooks.Checkpointing(checkpoints)
      loop_hooks = [
          hooks.Metrics(writer, s.mesh.size),
          hooks.NonFinite(saving),
          hooks.Preemption(preempted, saving),
          hooks.Evaluation(lambda params: run_lib.evaluate(eval_step, params, eval_set,
                                                       s.batch_sharding), writer),
          saving,
          profile.Profiler(config.profile, workdir, chief),
          goodput.Goodput(writer, workdir_lib.metrics_path(workdir)),
      ]
      return loop_lib.run_loop(loop_lib.Loop(s, state, start, batches, clock), compiled,
                               loop_hooks)
  finally:
    writer.close()
    checkpoints.close()
    if source is not None:
      source[0].close()
