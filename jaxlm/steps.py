"""The train and eval steps: pure functions of (state, batch), jit-compiled by the loop."""

import jax
import jax.numpy as jnp
import optax

from jaxlm import model as model_lib
from jaxlm import objectives
from jaxlm.objectives import base as objectives_base
from jaxlm.model import context, layers


def accumulate_gradients(loss_fn, params, batch, num_micro, rng):
  """Gradients of a batch too large for memory, summed over sequential micro-batches.

  Why a scan and summed losses: the scan keeps one micro-batch's activations alive at a time,
  and because `loss_fn` returns loss *sums* with their token counts, the accumulated gradient
  divided once by the total count equals the full-batch gradient exactly (up to float
  reassociation), however the tokens fall across micro-batches.

  Micro-batch i takes rows i, i+k, i+2k, ... so that each keeps the batch's sharding over the
  data-parallel devices: no row moves between devices.
  """
  grad_fn = jax.grad(loss_fn, has_aux=True)
  if num_micro == 1:
    return grad_fn(params, batch, rng)

  def split(x):
    return x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)

  micro_batches = jax.tree.map(split, batch)

  def body(total, xs):
    index, micro = xs
    length = micro['tokens'].shape[1]  # Features along the sequence are sharded like it.
    micro = {k: layers.constrain(v, ('batch', 'length' if v.shape[1:2] == (length,) else None)
                                 [:v.ndim]) for k, v in micro.items()}
    grads, stats = grad_fn(params, micro, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, total, (grads, stats)), None

  first = jax.tree.map(lambda x: x[0], micro_batches)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(grad_fn, params, first, rng))
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro_batches))
  return total


def apply(model, params, batch, extra=None, **kwargs):
  """The model on a batch; `extra`: its variable collections besides the parameters
  (TrainState.extra)."""
  return model.apply({'params': params, **(extra or {})}, batch['tokens'], batch['positions'],
                     batch['segment_ids'], batch.get('token_types'),
                     predict_positions=batch.get('predict_positions'), **kwargs)


def model_loss(model, params, batch, config, z_loss=0.0, extra=None, **kwargs):
  """(objective, stats) of the model on a prepared batch; with config.loss_chunk the output
  layer and the loss run chunk by chunk (objectives.base.chunked_loss) where the predicted
  positions (max_len, or a masked LM's gathered predictions) make more than one chunk.
  Auxiliary losses the model sows (model.AUX_LOSS), each a mean, count once per target."""
  objective = objectives.get(config)
  # Context parallelism's load-balanced order (model/context.py): every per-token feature moves
  # together, so the summed loss and statistics are those of the batch as it came.
  batch = context.balance(batch, model.cfg, model.causal)
  chunk = objective.loss_chunk(batch)
  out, sown = apply(model, params, batch, extra, project=not chunk, mutable=[model_lib.AUX_LOSS],
                    **kwargs)
  if not chunk:
    value, stats = objective.loss(out, batch, z_loss)
  else:
    kernel, bias = model.apply({'params': params}, method='lm_head')
    value, stats = objectives_base.chunked_loss(out, kernel, bias, batch, z_loss, chunk)
  aux = jax.tree.leaves(sown.get(model_lib.AUX_LOSS, {}))
  if aux:  # Only then: without one, the step is exactly what it was before they existed.
    stats['aux_loss_sum'] = sum(jnp.sum(a) for a in aux) * stats['weight']
    value += stats['aux_loss_sum']
  return value, stats


def all_finite(tree):
  """Whether every element of every leaf is finite (one on-device boolean)."""
  return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]))


# The key of evaluation's random choices (masks): fixed, so evaluations are comparable.
EVAL_KEY = 0x5eed


def make_train_step(model, tx, lr_schedule, config, prepare):
  """(state, batch) -> (state, metrics). `prepare` is the objective's (objectives.build).

  Dropout and masks derive from (seed, step): no RNG state to carry or checkpoint. Masks are
  drawn for the whole batch before it is split into micro-batches, so they do not depend on
  optimizer.grad_accum_steps. The state's extra collections are read, and carried unchanged.
  """
  def train_step(state, batch):
    def loss_fn(params, batch, rng):
      return model_loss(model, params, batch, config, config.z_loss, state.extra,
                        deterministic=False, rngs={'dropout': rng})

    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    dropout_rng, prepare_rng = jax.random.split(rng)
    batch = prepare(batch, prepare_rng)
    grads, stats = accumulate_gradients(loss_fn, state.params, batch,
                                        config.optimizer.grad_accum_steps, dropout_rng)
    weight = jnp.maximum(stats['weight'], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    loss, grad_norm = stats['loss_sum'] / weight, optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss, gradient or updated parameter (a finite gradient times a huge step
    # can still overflow) must not reach the weights: keep the old state instead. Checked
    # here, on device, so the loop needs no per-step host sync to enforce it.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    metrics = {
        'loss': loss,
        'grad_norm': grad_norm,
        'learning_rate': lr_schedule(state.step),
        'nonfinite': 1 - finite.astype(jnp.int32),
    }
    if config.z_loss:
      metrics['z_loss'] = stats['z_loss_sum'] / weight
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model, config, prepare, token_bytes=None):
  """params, batch -> summed statistics (loss_sum, correct, weight) over the batch's targets,
  and with `token_bytes` (Tokenizer.token_bytes) the UTF-8 bytes those targets stand for."""
  def eval_step(params, batch):
    batch = prepare(batch, jax.random.key(EVAL_KEY))
    _, stats = model_loss(model, params, batch, config, deterministic=True)
    if token_bytes is not None:
      stats['bytes'] = jnp.sum(jnp.asarray(token_bytes)[batch['targets']] * batch['weights'])
    return stats

  return eval_step
