"""The learning-rate schedule, the weight-decay mask, clipping and gradient accumulation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import tiny_config
from jaxlm import model as model_lib, optim, steps
from jaxlm.objectives import base, causal


def test_schedule_warms_up_linearly_then_decays_to_the_end_fraction():
  config = tiny_config(train_steps=1000, optimizer__learning_rate=1e-3,
                       optimizer__warmup_steps=100, optimizer__end_lr_fraction=0.1)
  lr = optim.schedule(config)
  assert float(lr(0)) == 0.0
  assert float(lr(50)) == pytest.approx(5e-4)
  assert float(lr(100)) == pytest.approx(1e-3)  # Peak at the end of warmup.
  assert float(lr(550)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-5)  # Half-way down the cosine.
  assert float(lr(1000)) == pytest.approx(1e-4)  # The end value at the last step.
  values = [float(lr(s)) for s in range(100, 1001, 50)]
  assert all(a >= b for a, b in zip(values, values[1:]))
  all_warmup = optim.schedule(tiny_config(train_steps=10, optimizer__warmup_steps=10))
  assert float(all_warmup(5)) == pytest.approx(0.5 * 3e-3)


def test_decay_mask_spares_norms_and_biases_even_when_layers_are_stacked():
  config = tiny_config()
  model = model_lib.build(config.model)
  tokens = jnp.zeros((1, config.model.max_len), jnp.int32)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), tokens)['params']))
  mask = optim.decay_mask(params)
  flat = {'/'.join(str(k.key) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat['layers/mlp/wi/kernel'] and flat['layers/attention/query/kernel']
  assert flat['token_embed/embedding'] and flat['position_embed/embedding']
  assert not flat['layers/attention_norm/scale'] and not flat['final_norm/scale']
  assert not flat['layers/mlp/wi/bias'] and not flat['final_norm/bias']
  assert params['layers']['attention_norm']['scale'].ndim == 2  # Stacked, yet not decayed.
  assert sum(flat.values()) == 8 and len(flat) == 20


def test_weight_decay_shrinks_kernels_but_not_norm_scales():
  config = tiny_config(optimizer__weight_decay=0.5, optimizer__learning_rate=0.1,
                       optimizer__warmup_steps=0)
  tx, _ = optim.optimizer(config)
  params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}, 'norm': {'scale': jnp.ones(2)}}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  assert float(new['dense']['kernel'][0, 0]) == pytest.approx(1 - 0.1 * 0.5)
  assert float(new['dense']['bias'][0]) == 1.0 and float(new['norm']['scale'][0]) == 1.0


def test_global_norm_clipping_bounds_the_update():
  config = tiny_config(optimizer__grad_clip=1.0, optimizer__weight_decay=0.0)
  clip = optax.clip_by_global_norm(config.optimizer.grad_clip)
  grads = {'a': jnp.full((4,), 10.0), 'b': jnp.full((3,), -10.0)}
  clipped, _ = clip.update(grads, clip.init(grads))
  assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-5)


def test_gradient_accumulation_equals_the_full_batch():
  config = tiny_config()
  model = model_lib.build(config.model)
  shape = (8, 64)
  rng = np.random.default_rng(0)
  segments = np.ones(shape, np.int32)
  segments[::3, 40:] = 2  # Uneven token counts across micro-batches.
  segments[1, 50:] = 0
  batch = {'tokens': jnp.asarray(rng.integers(0, 512, shape), jnp.int32),
           'segment_ids': jnp.asarray(segments),
           'positions': jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), shape)}
  params = nn.unbox(model.init(jax.random.key(0), batch['tokens'][:1])['params'])

  def loss_fn(p, b, _):
    logits = model.apply({'params': p}, b['tokens'], b['positions'], b['segment_ids'])
    return base.loss(logits, causal.prepare(b))

  def grads(num_micro):
    g, stats = steps.accumulate_gradients(loss_fn, params, batch, num_micro, jax.random.key(0))
    return jax.tree.map(lambda x: x / stats['weight'], g), stats

  full, full_stats = jax.jit(lambda: grads(1))()
  accum, accum_stats = jax.jit(lambda: grads(4))()
  assert float(full_stats['weight']) == float(accum_stats['weight']) == float(
      causal.causal_targets(batch)[1].sum())
  np.testing.assert_allclose(full_stats['loss_sum'], accum_stats['loss_sum'], rtol=1e-6)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(full))
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(accum)):  # float32 reassociation only.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
