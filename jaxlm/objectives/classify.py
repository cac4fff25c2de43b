"""Sequence classification (`jaxlm finetune`): one label per example, predicted from one
state of a pretrained encoder ([CLS]) or decoder (the last token), see model.Transformer."""

import jax.numpy as jnp

from jaxlm.errors import ConfigError
from jaxlm.objectives import base


def prepare(batch, rng=None):
  """One target per row, its label; rows with a negative label (padding) weigh nothing."""
  del rng
  return {**batch, 'targets': jnp.maximum(batch['label'], 0),
          'weights': (batch['label'] >= 0).astype(jnp.float32)}


class Objective(base.Objective):
  name = 'classify'
  command = 'finetune'
  labeled = True
  direction_field = 'finetune.backbone'

  @property
  def causal(self):
    """The backbone's attention direction (finetune.backbone; a saved config may predate it)."""
    return self.config.get('finetune', {}).get('backbone', 'masked') == 'causal'

  @property
  def num_labels(self):
    return len(self.config.finetune.labels)

  def check(self):
    if self.config.data.get('phases'):
      raise ConfigError('data.phases is for pretraining; leave it empty to fine-tune')

  def complete(self):
    from jaxlm.data import labeled  # Reads the train split: only when fine-tuning.
    labeled.resolve_labels(self.config)

  def features(self):
    return {**super().features(), 'label': ('batch',)}

  def check_tokenizer(self, tokenizer):
    if self.causal:
      tokenizer.check_causal()
    tokenizer.check_specials()

  def token_bytes(self, tokenizer):
    return None  # Its targets are labels, not text.

  def prepare(self, tokenizer=None, length=None):
    return prepare

  def loss_chunk(self, batch):
    return 0  # One target per row: nothing to chunk.
