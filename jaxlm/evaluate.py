"""Held-out evaluation: an eval step summed over a fixed list of batches (`evaluate`, the
training loop's periodic evaluation), and `jaxlm eval`: loss, perplexity, bits per byte and
accuracy of a workdir's checkpoint."""

import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import data, resume
from jaxlm import mesh as mesh_lib
from jaxlm import run as run_lib

log = logging.getLogger('jaxlm')


def evaluate(eval_step, params, batches, batch_sharding, extra=None):
  """Loss, perplexity and accuracy (of the objective's targets: next tokens, masked tokens or
  labels) over a fixed list of held-out batches; `extra`: the model's other variables."""
  totals = None
  for batch in batches:
    stats = eval_step(params, mesh_lib.to_device(batch, batch_sharding), extra or {})
    totals = stats if totals is None else jax.tree.map(jnp.add, totals, stats)
  totals = jax.device_get(totals)  # One host sync for the whole evaluation.
  weight = max(float(totals['weight']), 1.0)
  loss = float(totals['loss_sum']) / weight
  row = {'eval_loss': loss, 'eval_perplexity': float(np.exp(min(loss, 80.0))),
         'eval_accuracy': float(totals['correct']) / weight}
  if float(totals.get('bytes', 0)) > 0:  # Nats per target -> bits per byte of their text.
    row['eval_bits_per_byte'] = float(totals['loss_sum']) / np.log(2) / float(totals['bytes'])
  return row


def run(config, workdir, step=None):
  """Evaluates the checkpoint at `step` (default: the latest) on config.eval_batches batches.
  A run without a checkpoint or its tokenizer is refused before anything is written (no
  tokenizer is trained, no corpus tokenized)."""
  s = run_lib.setup(config)
  params, step = resume.restore_params(s, workdir, step)
  data.run_tokenizer(config, workdir)
  corpus = data.prepare(config, workdir, s.objective.frame, s.objective.labeled)
  batches = data.eval_batches(corpus.validation, config, jax.process_index(),
                              jax.process_count())
  extra = resume.restore_extra(s, workdir, step)
  eval_step = run_lib.compile_eval_step(s, s.objective.prepare(corpus.tokenizer),
                                        s.objective.token_bytes(corpus.tokenizer))
  with s.active():
    result = evaluate(eval_step, params, batches, s.batch_sharding, extra)
  return {'step': step, **result}
