"""`jaxlm eval`: held-out loss, perplexity, bits per byte and accuracy of a workdir's latest
checkpoint."""

import logging

import jax

from jaxlm import data, steps
from jaxlm import run as run_lib

log = logging.getLogger('jaxlm')


def run(config, workdir, step=None):
  """Evaluates the checkpoint at `step` (default: the latest) on config.eval_batches batches."""
  s = run_lib.setup(config)
  corpus = data.prepare(config, workdir, s.objective.frame, s.objective.labeled)
  batches = data.eval_batches(corpus.validation, config, jax.process_index(),
                              jax.process_count())
  params, step = run_lib.restore_params(s, workdir, step)
  objective = s.objective
  with s.active():
    eval_step = jax.jit(steps.make_eval_step(s.model, objective, objective.prepare(corpus.tokenizer),
                                             objective.token_bytes(corpus.tokenizer)),
                        in_shardings=(s.shardings.params, s.batch_sharding))
    result = run_lib.evaluate(eval_step, params, batches, s.batch_sharding)
  return {'step': step, **result}
