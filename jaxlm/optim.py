"""AdamW with linear warmup and cosine decay, a weight-decay mask and global-norm clipping;
under muP (model.parametrization) each parameter's rate follows its logical axes."""

import flax.linen as nn
import jax
import optax

from jaxlm import parametrization, state

# Parameters that are never decayed: norm scales and biases (GPT-2, Llama and BERT practice).
NO_DECAY = ('scale', 'bias')


def schedule(config):
  """Linear warmup from 0 to the peak, then cosine decay to end_lr_fraction * peak."""
  o = config.optimizer
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.learning_rate, warmup_steps=o.warmup_steps,
      # optax needs a non-empty cosine part, even when warmup fills the whole run.
      decay_steps=max(config.train_steps, o.warmup_steps + 1),
      end_value=o.learning_rate * o.end_lr_fraction)


def decay_mask(params):
  """True for the parameters weight decay applies to, by the leaf's name (not its rank, since
  scanned layers give a norm scale of shape [layers, embed])."""
  def decide(path, _):
    return getattr(path[-1], 'key', None) not in NO_DECAY
  # Boxed (logically partitioned) parameters are leaves too, so the mask is a tree prefix.
  return jax.tree_util.tree_map_with_path(
      decide, params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def rate_multipliers(m, axes):
  """{parameter: factor on its learning rate} from the parameters' logical axes (a tree of
  tuples, state.param_axes), as the parametrization of model config `m` sets them."""
  p = parametrization.get(m)
  return jax.tree.map(lambda names: p.learning_rate_multiplier(m, names), axes,
                      is_leaf=lambda x: isinstance(x, tuple))


def optimizer(config, model=None):
  """The optax transformation and its learning-rate schedule. `model`: the module whose
  parameters' logical axes set each parameter's rate, for a parametrization with per-parameter
  rates (muP); read only then, since it costs a trace of the model's initialisation."""
  o = config.optimizer
  lr = schedule(config)
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  if not parametrization.get(config.model).per_parameter_rates:
    chain.append(optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=decay_mask))
    return optax.chain(*chain), lr
  if model is None:
    raise ValueError(f'model.parametrization={config.model.parametrization!r} sets each '
                     f'parameter\'s rate from its logical axes: pass the model')
  rates = rate_multipliers(config.model, state.param_axes(model, config))
  # optax.adamw with each parameter's Adam step scaled before the decay term is added, so the
  # decay per step stays lr * weight_decay at every width (parametrization.py's table).
  chain += [optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
            optax.stateless(lambda updates, _: jax.tree.map(lambda u, r: u * r, updates, rates)),
            optax.add_decayed_weights(o.weight_decay, decay_mask),
            optax.scale_by_learning_rate(lr)]
  return optax.chain(*chain), lr
