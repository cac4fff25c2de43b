"""`jaxlm eval`: held-out loss, perplexity, bits per byte and accuracy of a workdir's latest
checkpoint."""

import logging

import jax

from jaxlm import checkpoint, data, objectives, steps
from jaxlm import train as train_lib
from jaxlm.config import ConfigError

log = logging.getLogger('jaxlm')


def run(config, workdir, step=None):
  """Evaluates the checkpoint at `step` (default: the latest) on config.eval_batches batches."""
  s = train_lib.setup(config)
  corpus = data.prepare(config, workdir)
  batches = data.eval_batches(corpus.validation, config, jax.process_index(),
                              jax.process_count())
  checkpoints = checkpoint.Checkpointer.for_workdir(workdir, config)
  step = checkpoints.latest_step() if step is None else step
  if step is None:
    raise ConfigError(f'--workdir={workdir} has no checkpoint to evaluate; train first')
  with s.active():
    params = checkpoints.restore_params(step, s.abstract_state.params, s.shardings.params)
    eval_step = jax.jit(steps.make_eval_step(s.model, config,
                                             objectives.build(config, corpus.tokenizer),
                                             train_lib.token_bytes(config, corpus.tokenizer)),
                        in_shardings=(s.shardings.params, s.batch_sharding))
    result = train_lib.evaluate(eval_step, params, batches, s.batch_sharding)
  checkpoints.close()
  return {'step': step, **result}
