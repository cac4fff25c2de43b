"""Masked-token prediction (BERT): an encoder that attends both ways predicts the tokens its
input hides, drawn anew every step (`Masking`)."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import ConfigError
from jaxlm.objectives import base

log = logging.getLogger('jaxlm')


def max_predictions(config, length=None):
  """Positions per row of `length` tokens (default model.max_len) a masked LM predicts
  (gathered before its head), or None for every position: masking.max_predictions, or with
  0 the mean chosen count plus six standard deviations of it (a binomial's; doubled for whole
  words, whose pieces are chosen together), rounded up to a multiple of 8. A row exceeds that
  about once in 10^9: 48 of 128 positions, 128 of 512 at the usual 15%."""
  if config.masking.max_predictions == -1:
    return None
  length = length or config.model.max_len
  if config.masking.max_predictions:
    return min(config.masking.max_predictions, length)
  rate = config.masking.rate
  spread = 6 * math.sqrt(length * rate * (1 - rate)) * (2 if config.masking.whole_word else 1)
  return min(length, 8 * math.ceil((length * rate + spread) / 8))


class Masking:
  """BERT's dynamic masking, drawn on device from the step's key: the same (seed, step) gives
  the same masks for any mesh, process count or accumulation.

  Each non-special token is chosen with probability `rate` (with `whole_word`, each word: a
  '▁'-initial piece and the pieces after it); a chosen token becomes [MASK] with probability
  `mask_fraction`, a random ordinary token with `random_fraction`, and stays itself otherwise.
  Only chosen tokens are predicted. With a cap on predictions per row (`max_predictions`)
  the chosen positions are gathered into 'predict_positions' [B, cap], and 'targets'/'weights'
  are [B, cap]: the model runs its output head there alone. Choices beyond the cap are
  dropped (the leftmost kept), so a row's inputs never hide a token that is not predicted.
  """

  def __init__(self, config, special, word_start, mask_id, length=None):
    """special, word_start: bool [vocab] tables; random replacements avoid special ids.
    length: of the rows masked (default model.max_len)."""
    m = config.masking
    self.rate, self.whole_word = m.rate, m.whole_word
    self.mask_fraction, self.random_fraction = m.mask_fraction, m.random_fraction
    self.special = np.asarray(special, bool)
    self.word_start = np.asarray(word_start, bool)
    self.ordinary = np.flatnonzero(~self.special).astype(np.int32)
    self.mask_id = mask_id
    self.max_predictions = max_predictions(config, length)

  @classmethod
  def for_tokenizer(cls, config, tokenizer, length=None):
    size = config.model.vocab_size
    word_start = np.zeros(size, bool)
    for i in range(tokenizer.vocab_size):
      word_start[i] = tokenizer.word_start(i)
    return cls(config, tokenizer.special_table(size), word_start,
               tokenizer.special_id('[MASK]'), length)

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


def unigram_accuracy(tokens, special):
  """The accuracy of always guessing the most frequent ordinary token: the floor that a
  masked LM's accuracy must rise above."""
  counts = np.bincount(np.asarray(tokens), minlength=len(special))[:len(special)]
  counts[np.asarray(special)] = 0
  return counts.max() / max(counts.sum(), 1)


class Objective(base.Objective):
  name = 'masked'
  causal = False
  fills_masks = True

  def check(self):
    if self.config.masking.rate == 0:
      raise ConfigError('masking.rate=0 masks nothing: objective=masked needs a rate in (0, 1)')

  def predictions(self, length=None):
    return max_predictions(self.config, length)

  def log_baseline(self, tokens, tokenizer):
    log.info('masked-token accuracy of always guessing the most frequent token: %.4f',
             unigram_accuracy(tokens, tokenizer.special_table(self.config.model.vocab_size)))

  def prepare(self, tokenizer=None, length=None):
    """Masking of the tokenizer's special pieces. Without one, ids 0-6 are special: the same
    computation with stand-in tables."""
    if tokenizer is not None:
      return Masking.for_tokenizer(self.config, tokenizer, length)
    size = self.config.model.vocab_size
    return Masking(self.config, np.arange(size) < 7, np.zeros(size, bool), 6, length)
