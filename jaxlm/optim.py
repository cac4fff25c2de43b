"""AdamW with linear warmup and cosine decay, a weight-decay mask and global-norm clipping."""

import flax.linen as nn
import jax
import optax

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


def optimizer(config):
  """The optax transformation and its learning-rate schedule."""
  o = config.optimizer
  lr = schedule(config)
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  chain.append(optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mask=decay_mask))
  return optax.chain(*chain), lr
