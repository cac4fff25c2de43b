"""Training objectives: what the model sees, which tokens it predicts, and the loss over them.

Every objective is a `prepare(batch, rng) -> batch` that adds 'targets' and 'weights' (and may
change the input 'tokens'); the loss is then the same weighted cross-entropy for all of them.
Losses are returned as sums with their weight, never as means, so gradient accumulation and
multi-batch evaluation divide once by the true total.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config as config_lib


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


def causal(batch, rng=None):
  del rng  # Nothing random.
  targets, weights = causal_targets(batch)
  return {**batch, 'targets': targets, 'weights': weights}


def classify(batch, rng=None):
  """One target per row, its label; rows with a negative label (padding) weigh nothing."""
  del rng
  return {**batch, 'targets': jnp.maximum(batch['label'], 0),
          'weights': (batch['label'] >= 0).astype(jnp.float32)}


class Masking:
  """BERT's dynamic masking, drawn on device from the step's key: the same (seed, step) gives
  the same masks for any mesh, process count or accumulation.

  Each non-special token is chosen with probability `rate` (with `whole_word`, each word: a
  '▁'-initial piece and the pieces after it); a chosen token becomes [MASK] with probability
  `mask_fraction`, a random ordinary token with `random_fraction`, and stays itself otherwise.
  Only chosen tokens are predicted. With a cap on predictions per row (config.max_predictions)
  the chosen positions are gathered into 'predict_positions' [B, cap], and 'targets'/'weights'
  are [B, cap]: the model runs its output head there alone. Choices beyond the cap are
  dropped (the leftmost kept), so a row's inputs never hide a token that is not predicted.
  """

  def __init__(self, config, special, word_start, mask_id):
    """special, word_start: bool [vocab] tables; random replacements avoid special ids."""
    m = config.masking
    self.rate, self.whole_word = m.rate, m.whole_word
    self.mask_fraction, self.random_fraction = m.mask_fraction, m.random_fraction
    self.special = np.asarray(special, bool)
    self.word_start = np.asarray(word_start, bool)
    self.ordinary = np.flatnonzero(~self.special).astype(np.int32)
    self.mask_id = mask_id
    self.max_predictions = config_lib.max_predictions(config)

  @classmethod
  def for_tokenizer(cls, config, tokenizer):
    size = config.model.vocab_size
    special, word_start = np.ones(size, bool), np.zeros(size, bool)
    for i in range(tokenizer.vocab_size):
      special[i], word_start[i] = tokenizer.is_special(i), tokenizer.word_start(i)
    return cls(config, special, word_start, tokenizer.special_id('[MASK]'))

  def __call__(self, batch, rng):
    tokens, seg = batch['tokens'], batch['segment_ids']
    special = jnp.asarray(self.special)[tokens] | (seg == 0)
    choose_key, kind_key, random_key = jax.random.split(rng, 3)
    u = jax.random.uniform(choose_key, tokens.shape)
    if self.whole_word:
      # Every piece takes the draw of its word's first piece; a word never spans documents.
      starts = jnp.asarray(self.word_start)[tokens] | special
      starts |= seg != jnp.pad(seg, ((0, 0), (1, 0)))[:, :-1]
      first = jax.lax.cummax(jnp.where(starts, jnp.arange(tokens.shape[1]), 0), axis=1)
      u = jnp.take_along_axis(u, first, axis=1)
    chosen = (u < self.rate) & ~special
    if self.max_predictions is not None:
      chosen &= jnp.cumsum(chosen, axis=1) <= self.max_predictions
    kind = jax.random.uniform(kind_key, tokens.shape)
    random_tokens = jnp.asarray(self.ordinary)[
        jax.random.randint(random_key, tokens.shape, 0, len(self.ordinary))]
    inputs = jnp.where(chosen & (kind < self.mask_fraction), self.mask_id, tokens)
    inputs = jnp.where(chosen & (kind >= self.mask_fraction)
                       & (kind < self.mask_fraction + self.random_fraction), random_tokens, inputs)
    if self.max_predictions is None:
      return {**batch, 'tokens': inputs, 'targets': tokens, 'weights': chosen.astype(jnp.float32)}
    # The chosen positions in order (a stable sort puts them first), then unchosen fillers
    # that weigh nothing.
    positions = jnp.argsort((~chosen).astype(jnp.int32), axis=1, stable=True)
    positions = positions[:, :self.max_predictions].astype(jnp.int32)
    take = lambda x: jnp.take_along_axis(x, positions, axis=1)
    return {**batch, 'tokens': inputs, 'predict_positions': positions, 'targets': take(tokens),
            'weights': take(chosen).astype(jnp.float32)}


def build(config, tokenizer=None):
  """The `prepare` function of `config.objective`. Without a tokenizer (planning a run that
  has no data yet), masking treats ids 0-6 as special: the same computation, stand-in tables."""
  if config.objective == 'causal':
    return causal
  if config.objective == 'classify':
    return classify
  if tokenizer is not None:
    return Masking.for_tokenizer(config, tokenizer)
  size = config.model.vocab_size
  return Masking(config, np.arange(size) < 7, np.zeros(size, bool), 6)


def cross_entropy(logits, targets, weights, z_loss=0.0):
  """Summed cross-entropy in float32 over logits [..., V]. Returns (loss_sum, z_loss_sum,
  correct_sum).

  z_loss adds z_loss * log(Z)^2 per token (PaLM), keeping the softmax normaliser near 1.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  loss_sum = jnp.sum((log_z - target_logit) * weights)
  z_sum = z_loss * jnp.sum(jnp.square(log_z) * weights)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
  return loss_sum, z_sum, correct


def loss(logits, batch, z_loss=0.0):
  """The loss of a prepared batch. Returns (objective_sum, stats), stats summed over targets."""
  return _objective(*cross_entropy(logits, batch['targets'], batch['weights'], z_loss), batch)


def _objective(loss_sum, z_sum, correct, batch):
  """(loss + z-loss, the summed statistics that steps and evaluation divide once)."""
  stats = {'loss_sum': loss_sum, 'z_loss_sum': z_sum, 'correct': correct,
           'weight': jnp.sum(batch['weights'])}
  return loss_sum + z_sum, stats


def chunked_loss(hidden, kernel, bias, batch, z_loss, chunk):
  """`loss` of the output layer applied to `hidden` [B, T, embed], without ever holding the
  [B, T, vocab] logits: the layer and the cross-entropy run over `chunk` positions at a time,
  and the backward pass recomputes each chunk's logits instead of keeping them.

  Why: at vocab 128k and 8k tokens per device, float32 logits alone are 4 GiB (and their
  gradient as much again); chunks of 512 positions cut that by the number of chunks for the
  price of one extra output-layer matmul in the backward pass.
  """
  B, T, d = hidden.shape

  def split(x):  # [B, T, ...] -> [T / chunk, B, chunk, ...], the batch axis kept in place.
    return jnp.swapaxes(x.reshape(B, T // chunk, chunk, *x.shape[2:]), 0, 1)

  @jax.checkpoint
  def body(totals, xs):
    h, targets, weights = xs
    logits = jnp.einsum('bcd,dv->bcv', h, kernel.astype(h.dtype))
    if bias is not None:
      logits += bias.astype(logits.dtype)
    return jax.tree.map(jnp.add, totals, cross_entropy(logits, targets, weights, z_loss)), None

  zeros = (jnp.zeros((), jnp.float32),) * 3
  sums, _ = jax.lax.scan(
      body, zeros, (split(hidden), split(batch['targets']), split(batch['weights'])))
  return _objective(*sums, batch)


def unigram_accuracy(tokens, special):
  """The accuracy of always guessing the most frequent ordinary token: the floor that a
  masked LM's accuracy must rise above."""
  counts = np.bincount(np.asarray(tokens), minlength=len(special))[:len(special)]
  counts[np.asarray(special)] = 0
  return counts.max() / max(counts.sum(), 1)
