"""Flax Linen models: `build(...)` is the one way the rest of jaxlm makes one, and the model's
kinds chosen by name, each registry mapping a config value to 'module:attribute'.

A new kind (an attention kernel, a norm, an activation, a remat policy) is one module plus one
line here; the config schema takes the allowed values from these registries. This file imports
nothing heavy (the modules it names import jax): config validation runs without jax.
"""

import functools
import importlib

import ml_collections

# model.attention -> a function (q, k, v, segment_ids, causal, cfg) -> out (the signature and
# 'auto', which picks one per platform: jaxlm/model/attention.py).
ATTENTION = {
    'xla': 'jaxlm.model.attention:xla',
    'cudnn': 'jaxlm.model.attention:cudnn',
    'splash': 'jaxlm.model.attention:splash',
}

# model.norm -> a Flax norm module (epsilon, dtype, param_dtype, scale_init[, use_bias, bias_init]).
NORMS = {
    'layernorm': 'flax.linen:LayerNorm',
    'rmsnorm': 'flax.linen:RMSNorm',
}

# model.mlp_activation -> an elementwise function.
ACTIVATIONS = {
    'gelu': 'flax.linen:gelu',  # The tanh approximation.
    'gelu_exact': 'jaxlm.model.layers:gelu_exact',
    'silu': 'flax.linen:silu',
    'relu': 'flax.linen:relu',
}

# model.remat_policy -> what a rematerialised block keeps for the backward pass instead of
# recomputing (a jax.checkpoint policy); 'none' (not listed) rematerialises nothing.
REMAT_POLICIES = {
    'full': 'jax:checkpoint_policies.nothing_saveable',
    'dots_saveable': 'jax:checkpoint_policies.dots_saveable',
    'dots_with_no_batch_dims': 'jax:checkpoint_policies.dots_with_no_batch_dims_saveable',
    'minimal': 'jaxlm.model.transformer:MINIMAL',
    'save_qkv_proj': 'jaxlm.model.transformer:SAVE_QKV_PROJ',
    'offload': 'jaxlm.model.transformer:OFFLOAD',
}

# Parameters that only a classifier has: fine-tuning initialises them fresh when the
# pretrained checkpoint lacks them.
CLASSIFIER_PARAMS = ('pooler', 'classifier')

# The collection a layer sows auxiliary losses into (`self.sow(AUX_LOSS, name, value)`, e.g. a
# mixture of experts' load balance): each is a mean over the batch, which the step weighs by
# its target count and adds to the objective (steps.model_loss). No layer sows one today.
AUX_LOSS = 'aux_loss'

# Model state whose new value comes back as its gradient (fp8 delayed scaling's amax
# histories, flax.linen.fp8_ops' convention): the train step writes it back (steps.py).
UPDATED_BY_GRADIENT = ('_overwrite_with_gradient',)  # flax.linen.fp8_ops.OVERWRITE_WITH_GRADIENT


def get(registry, name):
  """What `name` stands for in `registry` (one of the dicts above)."""
  module, attribute = registry[name].split(':')
  return functools.reduce(getattr, attribute.split('.'), importlib.import_module(module))


def build(model_config, causal=True, num_labels=0):
  """The Transformer of `model_config` (config.model): a decoder (causal) or an encoder, with
  a classification head when num_labels > 0 - what the run's objective trains
  (objectives.base.Objective: causal, num_labels)."""
  from jaxlm.model.transformer import Transformer  # Here: it imports jax; this file must not.
  return Transformer(ml_collections.FrozenConfigDict(model_config), causal=causal,
                     num_labels=num_labels)
