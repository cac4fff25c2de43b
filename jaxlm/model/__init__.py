"""Flax Linen models. `build(config)` is the one way the rest of jaxlm makes a model."""

import ml_collections

from jaxlm.model.transformer import Transformer


def build(config):
  """The model for `config.objective`: a causal decoder for 'causal'."""
  return Transformer(ml_collections.FrozenConfigDict(config.model),
                     causal=config.objective == 'causal')
