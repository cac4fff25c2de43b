"""Flax Linen models. `build(config)` is the one way the rest of jaxlm makes a model."""

import ml_collections

from jaxlm.config import is_causal
from jaxlm.model.transformer import CLASSIFIER_PARAMS, Transformer, output_layer  # noqa: F401


def build(config):
  """The model `config.objective` trains: a decoder ('causal'), an encoder ('masked'), or
  either one with a classification head ('classify', one class per finetune.labels)."""
  num_labels = len(config.finetune.labels) if config.objective == 'classify' else 0
  return Transformer(ml_collections.FrozenConfigDict(config.model), causal=is_causal(config),
                     num_labels=num_labels)
