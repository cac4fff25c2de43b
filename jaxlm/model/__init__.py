"""Flax Linen models. `build(config)` is the one way the rest of jaxlm makes a model."""

import ml_collections

from jaxlm import objectives
from jaxlm.model.transformer import (AUX_LOSS, CLASSIFIER_PARAMS, UPDATED_BY_GRADIENT,  # noqa: F401
                                     Transformer)


def build(config):
  """The model the config's objective trains: a decoder, an encoder, or either one with a
  classification head (objectives.base.Objective: causal, num_labels)."""
  objective = objectives.get(config)
  return Transformer(ml_collections.FrozenConfigDict(config.model), causal=objective.causal,
                     num_labels=objective.num_labels)
