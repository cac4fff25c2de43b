"""`jaxlm eval`: held-out loss, perplexity, bits per byte and accuracy of a workdir's latest
checkpoint."""

import logging

import jax

from jaxlm import data, objectives, steps
from jaxlm import run as run_lib

log = logging.getLogger('jaxlm')


def run(config, workdir, step=None):
  """Evaluates the checkpoint at `step` (default: the latest) on config.eval_batches batches."""
  s = run_lib.setup(config)
  corpus = data.prepare(config, workdir)
  batches = data.eval_batches(corpus.validation, config, jax.process_index(),
                              jax.process_count())
  params, step = run_lib.restore_params(s, workdir, step)
  extra = run_lib.restore_extra(s, workdir, step)
  objective = objectives.get(config)
  with s.active():
    eval_step = jax.jit(steps.make_eval_step(s.model, config, objective.prepare(corpus.tokenizer),
                                             objective.token_bytes(corpus.tokenizer)),
                        in_shardings=(s.shardings.params, s.batch_sharding, s.shardings.extra))
    result = run_lib.evaluate(eval_step, params, batches, s.batch_sharding, extra)
  return {'step': step, **result}
