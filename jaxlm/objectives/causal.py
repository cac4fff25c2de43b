"""Next-token prediction (GPT, Llama): a decoder trained on packed documents."""

import jax.numpy as jnp

from jaxlm.objectives import base


def causal_targets(batch):
  """Next-token targets and weights for a packed batch of tokens [B, T].

  Position t predicts token t+1 of the same document: the last position of a row and the
  last token of each document have weight 0, as do padding (segment 0) and tokens the batch
  masks out with an optional 'loss_mask'.
  """
  tokens, seg = batch['tokens'], batch['segment_ids']
  targets = jnp.roll(tokens, -1, axis=1)
  next_seg = jnp.roll(seg, -1, axis=1).at[:, -1].set(0)
  weights = (next_seg == seg) & (seg > 0)
  if 'loss_mask' in batch:
    weights &= jnp.roll(batch['loss_mask'], -1, axis=1).astype(bool)
  return targets, weights.astype(jnp.float32)


def prepare(batch, rng=None):
  del rng  # Nothing random.
  targets, weights = causal_targets(batch)
  return {**batch, 'targets': targets, 'weights': weights}


class Objective(base.Objective):
  name = 'causal'
  generates = True

  def prepare(self, tokenizer=None, length=None):
    return prepare
