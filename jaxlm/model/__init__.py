"""Flax Linen models. `build(...)` is the one way the rest of jaxlm makes a model."""

import ml_collections

from jaxlm.model.transformer import AUX_LOSS, CLASSIFIER_PARAMS, Transformer  # noqa: F401


def build(model_config, causal=True, num_labels=0):
  """The Transformer of `model_config` (config.model): a decoder (causal) or an encoder, with
  a classification head when num_labels > 0 - what the run's objective trains
  (objectives.base.Objective: causal, num_labels)."""
  return Transformer(ml_collections.FrozenConfigDict(model_config), causal=causal,
                     num_labels=num_labels)
