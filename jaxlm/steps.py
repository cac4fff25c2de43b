"""The train and eval steps: pure functions of (state, batch) made from (model, objective,
optimizer), compiled ahead of time by the run builder (run.compile_train_step)."""

import jax
import jax.numpy as jnp
import optax
from flax.linen import fp8_ops

from jaxlm import model as model_lib
from jaxlm.objectives import base as objectives_base
from jaxlm.model import context, layers


def accumulate_gradients(loss_fn, params, batch, num_micro, rng, updated=None):
  """Gradients of a batch too large for memory, summed over sequential micro-batches.

  Why a scan and summed losses: the scan keeps one micro-batch's activations alive at a time,
  and because `loss_fn` returns loss *sums* with their token counts, the accumulated gradient
  divided once by the total count equals the full-batch gradient exactly (up to float
  reassociation), however the tokens fall across micro-batches.

  Micro-batch i takes rows i, i+k, i+2k, ... so that each keeps the batch's sharding over the
  data-parallel devices: no row moves between devices.

  `updated`: model state whose gradient is its new value (model.UPDATED_BY_GRADIENT); given,
  `loss_fn` takes (params, updated, batch, rng) and the result is ((grads, new updated),
  stats). Such values (amax histories) combine by maximum over micro-batches, never by sum.
  """
  argnums = 0 if updated is None else (0, 1)
  args = (params,) if updated is None else (params, updated)
  grad_fn = jax.grad(loss_fn, argnums=argnums, has_aux=True)
  if num_micro == 1:
    return grad_fn(*args, batch, rng)

  def split(x):
    return x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)

  micro_batches = jax.tree.map(split, batch)

  def combine(total, new):
    if updated is None:
      return jax.tree.map(jnp.add, total, new)
    ((grads, state), stats), ((new_grads, new_state), new_stats) = total, new
    return ((jax.tree.map(jnp.add, grads, new_grads),
             jax.tree.map(jnp.maximum, state, new_state)), jax.tree.map(jnp.add, stats, new_stats))

  def body(total, xs):
    index, micro = xs
    length = micro['tokens'].shape[1]  # Features along the sequence are sharded like it.
    micro = {k: layers.constrain(v, ('batch', 'length' if v.shape[1:2] == (length,) else None)
                                 [:v.ndim]) for k, v in micro.items()}
    return combine(total, grad_fn(*args, micro, jax.random.fold_in(rng, index))), None

  first = jax.tree.map(lambda x: x[0], micro_batches)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(grad_fn, *args, first, rng))
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro_batches))
  return total


def apply(model, params, batch, extra=None, **kwargs):
  """The model on a batch; `extra`: its variable collections besides the parameters
  (TrainState.extra)."""
  return model.apply({'params': params, **(extra or {})}, batch['tokens'], batch['positions'],
                     batch['segment_ids'], batch.get('token_types'),
                     predict_positions=batch.get('predict_positions'), **kwargs)


def model_loss(model, objective, params, batch, z_loss=0.0, extra=None, **kwargs):
  """(loss, stats) of the model on a batch `objective` prepared; with config.loss_chunk the
  output layer and the loss run chunk by chunk (objectives.base.chunked_loss) where the
  predicted positions (max_len, or a masked LM's gathered predictions) make more than one
  chunk. Auxiliary losses the model sows (model.AUX_LOSS), each a mean, count once per
  target."""
  # Context parallelism's load-balanced order (model/context.py): every per-token feature moves
  # together, so the summed loss and statistics are those of the batch as it came.
  batch = context.balance(batch, model.cfg, model.causal)
  chunk = objective.loss_chunk(batch)
  out, sown = apply(model, params, batch, extra, project=not chunk, mutable=[model_lib.AUX_LOSS],
                    **kwargs)
  if not chunk:
    value, stats = objective.loss(out, batch, z_loss)
  else:
    variables = {'params': params, **(extra or {})}
    lm_head = lambda h: model.apply(variables, h, method='lm_head')
    value, stats = objectives_base.chunked_loss(out, lm_head, batch, z_loss, chunk)
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


def make_train_step(model, objective, tx, lr_schedule, config, prepare):
  """(state, batch) -> (state, metrics). `prepare` is the objective's batch preparation
  (objectives.base.Objective.prepare).

  Dropout and masks derive from (seed, step): no RNG state to carry or checkpoint. Masks are
  drawn for the whole batch before it is split into micro-batches, so they do not depend on
  optimizer.grad_accum_steps. The state's extra collections (the model's variables besides
  its parameters) are passed to the model; those it updates through their gradient
  (model.UPDATED_BY_GRADIENT: fp8 amax histories) are written back.
  """
  def train_step(state, batch):
    extra = {k: v for k, v in state.extra.items() if k not in model_lib.UPDATED_BY_GRADIENT}
    updated = {k: v for k, v in state.extra.items() if k in model_lib.UPDATED_BY_GRADIENT}

    def loss_fn(params, updated, batch, rng):
      # Read in the dtype whose "gradients" combine by maximum, not by sum, wherever a value is
      # used more than once (the scan over a chunked output layer's chunks).
      updated = jax.tree.map(
          lambda v: jax.lax.convert_element_type(v, fp8_ops.fp32_max_grad), updated)
      return model_loss(model, objective, params, batch, config.z_loss, {**extra, **updated},
                        deterministic=False, rngs={'dropout': rng})

    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    dropout_rng, prepare_rng = jax.random.split(rng)
    batch = prepare(batch, prepare_rng)
    (grads, updated), stats = accumulate_gradients(
        loss_fn, state.params, batch, config.optimizer.grad_accum_steps, dropout_rng, updated)
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
    extra = {**state.extra, **keep(updated, {k: state.extra[k] for k in updated})}
    metrics = {
        'loss': loss,
        'grad_norm': grad_norm,
        'learning_rate': lr_schedule(state.step),
        'nonfinite': 1 - finite.astype(jnp.int32),
    }
    if config.z_loss:
      metrics['z_loss'] = stats['z_loss_sum'] / weight
    return (state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra),
            metrics)

  return train_step


def make_eval_step(model, objective, prepare, token_bytes=None):
  """params, batch, extra -> summed statistics (loss_sum, correct, weight) over the batch's
  targets, and with `token_bytes` (Tokenizer.token_bytes) the UTF-8 bytes those targets stand
  for. `extra`: the model's other variables (TrainState.extra), read, never updated."""
  def eval_step(params, batch, extra=None):
    batch = prepare(batch, jax.random.key(EVAL_KEY))
    _, stats = model_loss(model, objective, params, batch, extra=extra, deterministic=True)
    if token_bytes is not None:
      stats['bytes'] = jnp.sum(jnp.asarray(token_bytes)[batch['targets']] * batch['weights'])
    return stats

  return eval_step
