"""The interface every objective implements, and the weighted cross-entropy they share.

Every objective prepares a batch - `prepare(tokenizer)(batch, rng) -> batch` adds 'targets'
and 'weights' (and may change the input 'tokens') - and is then scored by the same weighted
cross-entropy. Losses are returned as sums with their weight, never as means, so gradient
accumulation and multi-batch evaluation divide once by the true total.
"""

import jax
import jax.numpy as jnp

from jaxlm.errors import ConfigError

TOKEN_FEATURES = ('tokens', 'segment_ids', 'positions')


class Objective:
  """A next-token-style objective over packed token rows; subclasses change what differs.

  Built from a config (a ConfigDict, or a saved config's dict for the few questions asked of
  a checkpoint's config: `causal`)."""
  name = ''  # Its REGISTRY name, the value of config.objective.
  command = 'train'  # The jaxlm command that trains it.
  labeled = False  # Trains on labeled examples (finetune.train), not on a token corpus.
  generates = False  # A decoder `jaxlm generate` continues text with.
  fills_masks = False  # An encoder `jaxlm fill-mask` fills [MASK]s with.
  causal = True  # The model attends to the past only (else both ways).
  direction_field = 'objective'  # The config field that chooses `causal`.
  num_labels = 0  # > 0: the model classifies sequences instead of predicting tokens.

  def __init__(self, config):
    self.config = config

  # ---- config

  def check(self):
    """ConfigErrors for field combinations this objective cannot train (run.setup calls it)."""

  def check_init_from(self, saved, init_from):
    """A ConfigError unless `saved` (the objective of the run `init_from` names) built a model
    that attends the same way."""
    if saved.causal != self.causal:
      kind = 'causal' if saved.causal else 'masked'
      raise ConfigError(f'init_from={init_from!r} was trained with objective {kind!r}; set '
                        f'--config.{self.direction_field}={kind} (its attention direction '
                        f'must match)')

  def complete(self):
    """Fills the config fields this objective derives from its data, before the model is
    built (a classifier's labels)."""

  def features(self):
    """{feature: logical axes} of an input batch (all int32)."""
    return {k: ('batch', 'length') for k in TOKEN_FEATURES}

  def predictions(self, length=None):
    """Positions per row of `length` tokens (default model.max_len) the output head runs on,
    or None for every position (flops.of_run)."""
    return None

  # ---- data

  def frame(self, tokenizer):
    """The ids around every document: BOS/EOS for a decoder; [CLS]/[SEP] for an encoder,
    whose first token is the one a classifier reads. A clear error first unless the tokenizer
    has every piece the objective uses (`check_tokenizer`). The data pipeline takes this as
    its document framing (data.prepare)."""
    self.check_tokenizer(tokenizer)
    if self.causal:
      return tokenizer.bos_id, tokenizer.eos_id
    return tokenizer.special_id('[CLS]'), tokenizer.special_id('[SEP]')

  def check_tokenizer(self, tokenizer):
    """A clear error unless the tokenizer has the pieces `frame` and `prepare` use."""
    if self.causal:
      tokenizer.check_causal()
    else:
      tokenizer.check_specials()

  def token_bytes(self, tokenizer):
    """The byte table of bits per byte (targets that are tokens), or None."""
    return tokenizer.token_bytes(self.config.model.vocab_size)

  def log_baseline(self, tokens, tokenizer):
    """Logs what a trivial predictor scores on the held-out tokens, where that is telling."""

  # ---- device

  def prepare(self, tokenizer=None, length=None):
    """`fn(batch, rng) -> batch` with 'targets' and 'weights', for rows of `length` tokens
    (default model.max_len; a length phase's are shorter). Without a tokenizer (planning a run
    that has no data yet) the same computation with stand-in special ids."""
    raise NotImplementedError

  def loss_chunk(self, batch):
    """Positions per chunk of a chunked output layer (config.loss_chunk), or 0 for none."""
    chunk, positions = self.config.loss_chunk, batch['targets'].shape[1]
    # One chunk or fewer: chunking would only add the backward pass's recomputation (the TPU
    # compiler also gave BERT's 128 gathered predictions more memory in one chunk than none).
    return chunk if chunk and positions > chunk and positions % chunk == 0 else 0

  def loss(self, logits, batch, z_loss=0.0):
    return loss(logits, batch, z_loss)


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


def chunked_loss(hidden, lm_head, batch, z_loss, chunk):
  """`loss` of the output layer `lm_head` (states [B, C, embed] -> logits [B, C, vocab]: the
  model's, with its matmul kind) applied to `hidden` [B, T, embed], without ever holding the
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
    logits = lm_head(h)
    return jax.tree.map(jnp.add, totals, cross_entropy(logits, targets, weights, z_loss)), None

  zeros = (jnp.zeros((), jnp.float32),) * 3
  sums, _ = jax.lax.scan(
      body, zeros, (split(hidden), split(batch['targets']), split(batch['weights'])))
  return _objective(*sums, batch)
