"""`jaxlm train` / `finetune`: wires a run together - builder (jaxlm/run.py), data, checkpoints,
metrics - and walks its length phases (jaxlm/phase_build.py), each run by the loop
(jaxlm/loop.py) with the run's hooks (jaxlm/hooks.py)."""

import logging

import jax

from jaxlm import (checkpoint, data, distributed, goodput, hooks, lock, metrics, paths,
                   phase_build, preemption, profile, resume, tiers)
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
  s = run_lib.setup(config, devices)  # Its objective completes the config (a classifier's).
  distributed.on_chief('workdir check', lambda: workdir_lib.check(workdir, config))
  process = (jax.process_index(), jax.process_count())
  chief = process[0] == 0
  # Resuming? Then the saved state must fit this config, checked before anything is restored.
  resuming = any(paths.name(p).isdigit()
                 for p in paths.glob(paths.join(workdir_lib.checkpoint_dir(workdir), '*')))
  if resuming:
    resume.check_compatible(workdir, config, s.abstract_state)
    data.check_run_tokenizer(config, workdir)  # Before tokenizing anything with another one.
  source = resume.init_source(s)
  # Every process tokenizes its share of the corpus unless its manifest exists (the chief
  # trains the tokenizer first, if there is none), then opens the shards.
  corpus = data.prepare(config, workdir, s.objective.frame, s.objective.labeled)
  if chief:
    held.append(lock.acquire(workdir))
    if not resuming:  # A resumed run's config.json changes once its new save is good.
      workdir_lib.save_config(workdir, config)
    workdir_lib.record_inputs(workdir, corpus.tokenizer)
  distributed.barrier(DATA_PREPARED)
  checkpoints = checkpoint.Checkpointer.for_workdir(workdir, config)
  local = tiers.open_local(config, workdir, s.mesh)
  if chief and resuming:
    checkpoints.on_saved = lambda step: workdir_lib.save_config(workdir, config)
  writer = metrics.Writer(workdir, enabled=chief)
  try:
    with s.active(), preemption.Watcher() as preempted:
      state, start, tier = clock.timed('checkpoint', resume.initial_state, s, checkpoints,
                                       source, local)
      writer.start(config, start)
      phases = phase_build.Phases(s, corpus, workdir, process)
      loop_hooks = [
          hooks.Metrics(writer, s.mesh.size),
          hooks.NonFinite(config.nonfinite),
          hooks.Preemption(preempted, checkpoints.manager),
          hooks.Evaluation(writer, config.eval_every_steps),
          hooks.Checkpointing(config.checkpoint.save_every_steps,
                              config.checkpoint.local_every_steps),
          profile.Profiler(config.profile, workdir, chief),
          goodput.Goodput(writer, workdir_lib.metrics_path(workdir), clock, tier),
      ]
      if config.lm_eval.tasks:  # Downstream tasks (lm-eval-harness), on the training mesh.
        from jaxlm import harness
        loop_hooks.insert(4, harness.DownstreamEval(s, corpus.tokenizer, writer, workdir, chief))
      loop = loop_lib.Loop(loop_hooks, hooks.Saver(checkpoints, config, local), start,
                           config.train_steps, config.log_every_steps)
      for phase in clock.timed_each('compile', phases.walk(start)):
        state = loop.run(phase, state)
        if loop.stopped:
          break
      return loop.end(state, phase)
  finally:
    writer.close()
    checkpoints.close()
    if local is not None:
      local.close()
    if source is not None:
      source[0].close()
