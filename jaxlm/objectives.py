"""Training objectives: which tokens are predicted, and the loss summed over them.

Losses are returned as sums together with their token count (the weight), never as means, so
gradient accumulation and multi-batch evaluation divide once by the true total.
"""

import jax
import jax.numpy as jnp


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


def cross_entropy(logits, targets, weights, z_loss=0.0):
  """Summed token cross-entropy in float32. Returns (loss_sum, z_loss_sum, correct_sum).

  z_loss adds z_loss * log(Z)^2 per token (PaLM), keeping the softmax normaliser near 1.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  loss_sum = jnp.sum((log_z - target_logit) * weights)
  z_sum = z_loss * jnp.sum(jnp.square(log_z) * weights)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
  return loss_sum, z_sum, correct


def causal_lm(logits, batch, z_loss=0.0):
  """Next-token loss. Returns (objective_sum, stats) with stats summed over tokens."""
  targets, weights = causal_targets(batch)
  loss_sum, z_sum, correct = cross_entropy(logits, targets, weights, z_loss)
  stats = {'loss_sum': loss_sum, 'z_loss_sum': z_sum, 'correct': correct,
           'weight': jnp.sum(weights)}
  return loss_sum + z_sum, stats
