"""Next-token loss: which positions count, and that the others cannot change the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import objectives


def batch_of(segments, loss_mask=None):
  segments = jnp.asarray(segments, jnp.int32)
  batch = {'tokens': jnp.arange(segments.size, dtype=jnp.int32).reshape(segments.shape) % 7,
           'segment_ids': segments}
  if loss_mask is not None:
    batch['loss_mask'] = jnp.asarray(loss_mask, jnp.int32)
  return batch


def test_targets_are_next_tokens_within_a_document_only():
  batch = batch_of([[1, 1, 1, 2, 2, 0, 0]])
  targets, weights = objectives.causal_targets(batch)
  np.testing.assert_array_equal(targets[0, :6], batch['tokens'][0, 1:])
  # Position 2 ends document 1 and 4 ends document 2; padding and the row's end predict nothing.
  np.testing.assert_array_equal(weights[0], [1, 1, 0, 1, 0, 0, 0])


def test_loss_mask_removes_targets():
  batch = batch_of([[1, 1, 1, 1, 1]], loss_mask=[[1, 1, 0, 0, 1]])
  _, weights = objectives.causal_targets(batch)
  np.testing.assert_array_equal(weights[0], [1, 0, 0, 1, 0])  # Targets 2 and 3 are masked out.


def test_masked_positions_cannot_change_the_loss():
  batch = batch_of([[1, 1, 1, 2, 2, 2, 0, 0]])
  logits = jax.random.normal(jax.random.key(0), (1, 8, 7))
  loss, stats = objectives.loss(logits, objectives.causal(batch))
  # Positions with weight 0 (document ends, padding) may predict anything.
  _, weights = objectives.causal_targets(batch)
  noise = jnp.where(weights[..., None] == 0, 100 * jax.random.normal(jax.random.key(1), logits.shape), 0)
  loss2, _ = objectives.loss(logits + noise, objectives.causal(batch))
  assert float(loss) == pytest.approx(float(loss2), rel=1e-6)
  assert float(stats['weight']) == 4


def test_loss_is_the_summed_negative_log_likelihood():
  batch = batch_of([[1, 1, 1]])
  logits = jax.random.normal(jax.random.key(0), (1, 3, 7))
  loss, stats = objectives.loss(logits, objectives.causal(batch))
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  tokens = batch['tokens'][0]
  expected = -(log_probs[0, 0, tokens[1]] + log_probs[0, 1, tokens[2]])
  assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_z_loss_adds_the_squared_log_normaliser():
  batch = batch_of([[1, 1, 1]])
  logits = jax.random.normal(jax.random.key(0), (1, 3, 7)) + 3.0
  plain, _ = objectives.loss(logits, objectives.causal(batch))
  with_z, stats = objectives.loss(logits, objectives.causal(batch), z_loss=1e-2)
  log_z = jax.nn.logsumexp(logits[0, :2], axis=-1)
  assert float(with_z - plain) == pytest.approx(float(1e-2 * jnp.sum(log_z ** 2)), rel=1e-5)
  assert float(stats['z_loss_sum']) == pytest.approx(float(with_z - plain), rel=1e-5)
