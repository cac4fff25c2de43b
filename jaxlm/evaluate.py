"""`jaxlm eval`: held-out loss, perplexity, bits per byte and accuracy of a workdir's latest
checkpoint."""

import logging

import jax

from jaxlm import data, objectives, steps
from jaxlm import run as run_lib

log = logging.getLogger('jaxlm')


def run(config, workdir, step=None):
  """Evaluates the checkpoint at `step` (default: the latest) on config.eval_batches batches.
  A run without a checkpoint or its tokenizer is refused before anything is written (no
  tokenizer is trained, no corpus tokenized)."""
  s = run_lib.setup(config)
  params, step = run_lib.restore_params(s, workdir, step)
  data.run_tokenizer(config, workdir)
  corpus = data.prepare(config, workdir)
  batches = data.eval_batches(corpus.validation, config, jax.process_index(),
                              jax.process_count())
  objective = objectives.get(config)
  with s.active():
    eval_step = jax.jit(steps.make_eval_step(s.model, config, objective.prepare(corpus.tokenizer),
                                             objective.token_bytes(corpus.tokenizer)),
                        in_shardings=(s.shardings.params, s.batch_sharding))
    result = run_lib.evaluate(eval_step, params, batches, s.batch_sharding)
  return {'step': step, **result}
