"""`jaxlm train` / `finetune`: wires a run together - builder (jaxlm/run.py), data, checkpoints,
metrics - and hands it to the loop (jaxlm/loop.py) with its hooks (jaxlm/hooks.py)."""

import logging

import jax

from jaxlm import (checkpoint, data, distributed, goodput, hooks, lock, metrics, objectives,
                   paths, preemption, profile, resume)
from jaxlm import loop as loop_lib
from jaxlm import run as run_lib
from jaxlm import workdir as workdir_lib

log = logging.getLogger('jaxlm')
DATA_PREPARED = 'the data is prepared (tokenizer, token shards) and the workdir locked'


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
    data.check_run_tokenizer(config, workdir)  # Before tokenizing anything with another one.
  source = run_lib.init_source(s)
  # Every process tokenizes its share of the corpus unless its manifest exists (the chief
  # trains the tokenizer first, if there is none), then opens the shards.
  corpus = data.prepare(config, workdir)
  if chief:
    held.append(lock.acquire(workdir))
    if not resuming:  # A resumed run's config.json changes once its new save is good.
      workdir_lib.save_config(workdir, config)
    workdir_lib.record_inputs(workdir, corpus.tokenizer)
  distributed.barrier(DATA_PREPARED)
  # What a checkpoint's data position is restored into; each length phase (run.Phases) then
  # makes its own iterator at that position.
  batches = data.train_iterator(data.train_dataset(corpus.train, config, *process), config)
  checkpoints = checkpoint.Checkpointer.for_workdir(workdir, config)
  if chief and resuming:
    checkpoints.on_saved = lambda step: workdir_lib.save_config(workdir, config)
  writer = metrics.Writer(workdir, enabled=chief)
  try:
    with s.active(), preemption.Watcher() as preempted:
      state, start = clock.timed('checkpoint', run_lib.initial_state, s, checkpoints, batches,
                                 source)
      stages = run_lib.Phases(s, corpus, workdir, objective.token_bytes(corpus.tokenizer),
                              process)
      phase = clock.timed('compile', stages.enter, start)
      objective.log_baseline(data.eval_tokens(phase.eval_set), phase.prepare)
      saving = hooks.Checkpointing(checkpoints)
      loop_hooks = [
          hooks.Metrics(writer, s.mesh.size),
          hooks.NonFinite(saving),
          hooks.Preemption(preempted, saving),
          hooks.Evaluation(stages.evaluate, writer),
          saving,
          hooks.LengthPhases(stages, saving),
          profile.Profiler(config.profile, workdir, chief),
          goodput.Goodput(writer, workdir_lib.metrics_path(workdir)),
      ]
      return loop_lib.run_loop(loop_lib.Loop(s, state, start, phase.batches, clock, phase.setup),
                               phase.train_step, loop_hooks)
  finally:
    writer.close()
    checkpoints.close()
    if source is not None:
      source[0].close()
