"""Each length phase's data and compiled steps, built when the run reaches it.

jaxlm/phases.py says which steps run at which length, from the config alone; here each phase
(the whole run, when it has one) gets its rows packed at its length, its batches positioned at
its first step, and its train and eval steps compiled for its shapes (run.compile_step).
train.py walks them: `for phase in phases.walk(start): loop.run(phase, state)`.
"""

import dataclasses
import logging
import time

import ml_collections

from jaxlm import data, evaluate, flops, limits, phases
from jaxlm import config as config_lib
from jaxlm import mesh as mesh_lib
from jaxlm import run as run_lib
from jaxlm import state as state_lib

log = logging.getLogger('jaxlm')


def phase_config(config, length, model_fields=None):
  """The run's config with rows of `length` tokens and the phase's `model_fields` (RoPE,
  context parallelism): what one length phase's steps and data are built from
  (jaxlm/phases.py). Its parameters are the run's (the longest phase's position table)."""
  config = config_lib.from_json(config_lib.to_json(config))
  config.data.phases, config.model.max_len = (), length
  for name, value in (model_fields or {}).items():
    config_lib.set_field(config, f'model.{name}', value)
  return config_lib.validate(config)


@dataclasses.dataclass
class Phase:
  """What one length phase (the whole run when it has one) steps with."""
  index: int
  start: int  # The first step this process runs in it.
  end: int  # The step count at which it ends.
  setup: run_lib.Setup  # The run's model and state; the phase's config and batch shapes.
  batches: object  # Train iterator over the corpus packed at the phase's length, at `start`.
  eval_set: list
  train_step: object  # Compiled ahead of time for the phase's shapes.
  flops_per_token: float  # Of the model on rows of the phase's length (flops.of_run).
  prepare: object  # The objective's batch preparation at the phase's length.
  token_bytes: object  # The tokenizer's byte table (bits per byte), or None.
  eval_step: object = None  # Compiled at the phase's first evaluation (a phase may have none).

  @property
  def batch_sharding(self):
    return self.setup.batch_sharding

  @property
  def tokens_per_step(self):
    return self.setup.config.batch_size * self.setup.config.model.max_len

  def evaluate(self, params, extra):
    """Held-out metrics at the phase's length."""
    if self.eval_step is None:
      self.eval_step = run_lib.compile_eval_step(self.setup, self.prepare, self.token_bytes)
    return evaluate.evaluate(self.eval_step, params, self.eval_set, self.batch_sharding, extra)


class Phases:
  """The run's length phases, each built (data re-packed, steps compiled) when the run enters
  it; only the current one is held."""

  def __init__(self, s, corpus, workdir, process=(0, 1)):
    self.s, self.corpus, self.workdir, self.process = s, corpus, workdir, process
    self.token_bytes = s.objective.token_bytes(corpus.tokenizer)
    self.spans = phases.spans(s.config)
    self.configs = ([s.config] if len(self.spans) == 1 else
                    [phase_config(s.config, length, phases.model_fields(s.config, i))
                     for i, (*_, length) in enumerate(self.spans)])
    for config in self.configs:  # A mesh that cannot split some phase's rows fails now.
      mesh_lib.check_batch(config, s.mesh)
      run_lib.check_context(config, s.mesh, s.objective)
    self.current = None

  def phase_setup(self, index):
    """The run's setup with phase `index`'s config and model fields (a long phase's RoPE theta
    or context parallelism; the parameters stay the run's)."""
    config, fields = self.configs[index], phases.model_fields(self.s.config, index)
    model = (self.s.model.clone(cfg=ml_collections.FrozenConfigDict(
        {**self.s.config.model.to_dict(), **fields})) if fields else self.s.model)
    return dataclasses.replace(self.s, config=config, model=model)

  def walk(self, start):
    """The phases from the one that runs step `start` to the last, each entered (built) when
    the walk reaches it. The first also logs what a trivial predictor scores on its held-out
    tokens (where the objective finds that telling)."""
    first = phases.index_at(self.s.config, start)
    for index in range(first, len(self.spans)):
      phase = self.enter(max(start, self.spans[index][0]))
      if index == first:
        self.s.objective.log_baseline(data.eval_tokens(phase.eval_set), self.corpus.tokenizer)
      yield phase

  def enter(self, step):
    """The phase that runs step `step` (from 0), its iterator positioned at that step."""
    index = phases.index_at(self.s.config, step)
    if self.current is not None and self.current.index == index:
      return self.current
    self.current = None  # Free the previous phase's iterator and executables first.
    config = self.configs[index]
    start, end, length = self.spans[index]
    if len(self.spans) > 1:
      fields = phases.model_fields(self.s.config, index)
      log.info('length phase %d of %d: steps %d-%d on rows of %d tokens%s', index + 1,
               len(self.spans), start, end, length,
               ''.join(f', model.{k}={v!r}' for k, v in fields.items()))
    corpus = (self.corpus if length == self.s.config.model.max_len else
              data.prepare(config, self.workdir, self.s.objective.frame))  # Re-packed.
    s = self.phase_setup(index)
    prepare = s.objective.prepare(corpus.tokenizer, length)
    batches = data.train_iterator(data.train_dataset(corpus.train, config, *self.process),
                                  config)
    batches.set_state({'next_index': step})  # Batch s is element s: a function of the step.
    compile_start = time.perf_counter()
    train_step = run_lib.compile_train_step(s, prepare)
    log.info('compiled the train step in %.1f s', time.perf_counter() - compile_start)
    memory = run_lib.memory_per_device(train_step)
    if memory:  # Refused before its buffers are allocated, not OOM-killed.
      limits.check_devices(memory['total'], list(s.mesh.devices.flat), 'the train step',
                           'lower batch_size, raise optimizer.grad_accum_steps, or set '
                           "model.remat_policy='full' or loss_chunk")
    log_summary(s, train_step)
    self.current = Phase(index, step, end, s, batches,
                         data.eval_batches(corpus.validation, config, *self.process),
                         train_step, flops.of_run(config, s.objective.predictions(length)),
                         prepare, self.token_bytes)
    return self.current


def log_summary(s, compiled):
  """Logs what was built for a phase: mesh, sizes, FLOPs, the parameter table, memory."""
  m = s.config.model
  counts = flops.param_counts(m)
  log.info('mesh %s', mesh_lib.describe(s.mesh))
  log.info('parameters: %s total, %s in matmuls, %s embeddings', f'{counts["total"]:,}',
           f'{counts["matmul"]:,}', f'{counts["embedding"]:,}')
  predictions = s.objective.predictions(m.max_len)
  per_token = flops.of_run(s.config, predictions)
  log.info('FLOPs per token: %.4g (6N + 12LHQT), %.4g causal-halved; %.4g per step',
           per_token, flops.of_run(s.config, predictions, causal_halved=True),
           per_token * s.config.batch_size * m.max_len)
  for line in run_lib.matmul_lines(s):
    log.info('%s', line)
  log.info('%-36s %-18s %-34s %s', 'parameter', 'shape', 'logical axes', 'mesh axes')
  for name, shape, names, spec in state_lib.param_table(s.abstract, s.shardings):
    log.info('%-36s %-18s %-34s %s', name, shape, names, tuple(spec))
  log.info('train state: %.1f MiB per device', state_lib.bytes_per_device(
      s.abstract_state, s.shardings) / 2 ** 20)
  memory = run_lib.memory_per_device(compiled)
  if memory:
    log.info('compiled step: %.1f MiB per device (arguments %.1f, temporaries %.1f)',
             memory['total'] / 2 ** 20, memory['arguments'] / 2 ** 20,
             memory['temporaries'] / 2 ** 20)
