"""model.parametrization: muP's multipliers and per-parameter learning rates, exactly, for a toy
pair of widths; muP at its base width is the standard model; the coordinate check's slopes."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT
from jaxlm import config as config_lib
from jaxlm import model as model_lib, optim, parametrization, state
from jaxlm.errors import ConfigError

BASE, WIDE = 32, 128  # m = 4


def toy(family='llama', width=BASE, kind='mup', **model):
  c = config_lib.defaults(family)
  c.objective = 'masked' if family in ('bert', 'modernbert') else 'causal'
  c.model.update(dict(num_layers=2, emb_dim=width, num_heads=width // 8, head_dim=8,
                      mlp_dim=2 * width, vocab_size=64, max_len=16, parametrization=kind,
                      mup_base_width=BASE, mup_base_head_dim=8))
  c.model.update(model)
  c.optimizer.warmup_steps = 0
  return config_lib.validate(c)


def init(config, seed=0):
  model = model_lib.build(config)
  tokens = jnp.zeros((1, config.model.max_len), jnp.int32)
  return model, nn.unbox(model.init(jax.random.key(seed), tokens)['params'])


def flat(tree):
  return {jax.tree_util.keystr(p, simple=True, separator='/'): v
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# Each parameter of a scanned Llama, and of BERT's extra parts, by its role in the table of
# jaxlm/parametrization.py: True = hidden (init std / sqrt(m), rate / m).
HIDDEN = {'layers/attention/query/kernel', 'layers/attention/key/kernel',
          'layers/attention/value/kernel', 'layers/attention/out/kernel',
          'layers/mlp/wi/kernel', 'layers/mlp/wi_gate/kernel', 'layers/mlp/wo/kernel',
          'head_dense/kernel'}


@pytest.mark.parametrize('family', ['llama', 'bert'])
def test_rates_and_init_follow_the_logical_axes_exactly(family):
  wide = toy(family, WIDE)
  model, params = init(wide)
  m = WIDE / BASE
  rates = flat(optim.rate_multipliers(wide.model, state.param_axes(model, wide)))
  assert set(rates) == set(flat(params))
  for name, rate in rates.items():
    assert rate == (1 / m if name in HIDDEN else 1.0), name
  # The same draws as the standard model, hidden kernels scaled by 1/sqrt(m): nothing else.
  _, standard = init(toy(family, WIDE, 'standard'))
  for name, value in flat(params).items():
    expected = flat(standard)[name] / (math.sqrt(m) if name in HIDDEN else 1.0)
    np.testing.assert_allclose(value, expected, rtol=1e-6, err_msg=name)
  p = parametrization.get(wide.model)
  alpha = toy(family, WIDE, mup_output_multiplier=3.0, mup_input_multiplier=2.0).model
  assert (p.output_multiplier(alpha), p.input_multiplier(alpha)) == (3.0 / m, 2.0)
  assert p.query_multiplier(toy(family, WIDE, head_dim=32).model) == math.sqrt(8 / 32)
  assert p.residual_multiplier(toy(family, WIDE, mup_base_depth=1).model) == 0.5


def test_the_update_is_adams_times_each_rate_and_decay_does_not_shrink():
  """One AdamW step at the wide width: each parameter moves by its rate times Adam's step,
  and the decay term is lr * weight_decay * w for every decayed parameter, as in standard."""
  lr, wd = 1e-2, 0.1
  updates = {}
  for kind in ('standard', 'mup'):
    config = toy('gpt2', WIDE, kind, tied_embeddings=True)
    config.optimizer.learning_rate, config.optimizer.weight_decay = lr, wd
    config.optimizer.grad_clip = 0.0
    model, params = init(toy('gpt2', WIDE, 'standard', tied_embeddings=True))  # Same weights.
    tx, _ = optim.optimizer(config, model)
    grads = jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)
                                           + 1.0), params)
    updates[kind] = flat(tx.update(grads, tx.init(params), params)[0])
    decay = flat(optim.decay_mask(params))
    weights = flat(params)
  for name, standard in updates['standard'].items():
    rate = 1 / 4 if name in HIDDEN else 1.0
    decay_term = -lr * wd * weights[name] * decay[name]
    np.testing.assert_allclose(updates['mup'][name], rate * (standard - decay_term) + decay_term,
                               rtol=1e-5, atol=1e-9, err_msg=name)


@pytest.mark.parametrize('family', ['gpt2', 'llama', 'bert', 'modernbert'])
def test_mup_at_its_base_width_is_the_standard_model(family):
  mup, standard = toy(family, BASE), toy(family, BASE, 'standard')
  model, params = init(mup)
  reference, same = init(standard)
  for name, value in flat(params).items():
    np.testing.assert_array_equal(value, flat(same)[name], err_msg=name)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 5, 64)
  np.testing.assert_array_equal(model.apply({'params': params}, tokens),
                                reference.apply({'params': params}, tokens))
  rates = optim.rate_multipliers(mup.model, state.param_axes(model, mup))
  assert set(jax.tree.leaves(rates)) == {1.0}


def test_to_standard_computes_the_same_logits():
  """Folding the multipliers into the weights (what the Hugging Face export does) leaves the
  logits as they were, for tied and untied, pre- and post-norm models with every multiplier
  set; a tied pre-norm model with alpha_in != 1 has no standard form."""
  fields = dict(mup_input_multiplier=1.7, mup_output_multiplier=2.5, head_dim=16,
                mup_base_depth=1)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 5, 64)
  for family, extra in (('llama', {}), ('gpt2', {'mup_input_multiplier': 1.0}),
                        ('bert', {'scan_layers': False}), ('llama', {'tied_embeddings': True,
                                                                     'mup_input_multiplier': 1.0})):
    config = toy(family, WIDE, **{**fields, **extra})
    model, params = init(config)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape),
                          params)  # Norms and biases away from 1 and 0.
    folded = parametrization.to_standard(config.model, params)
    standard = model_lib.build(toy(family, WIDE, 'standard', **{**fields, **extra}))
    np.testing.assert_allclose(standard.apply({'params': folded}, tokens),
                               model.apply({'params': params}, tokens), rtol=2e-5, atol=2e-5)
  tied = toy('gpt2', WIDE, mup_input_multiplier=2.0)
  with pytest.raises(ConfigError, match='tied embeddings has no standard'):
    parametrization.to_standard(tied.model, init(tied)[1])


@pytest.mark.parametrize('field,value,message', [
    ('model.parametrization', 'mu', "is not one of 'standard', 'mup'"),
    ('model.mup_base_width', 0, 'model.mup_base_width=0 must be positive'),
    ('model.mup_output_multiplier', -1.0, 'must be positive'),
    ('model.mup_base_depth', -2, 'must be >= 0'),
])
def test_bad_parametrization_fields_are_one_line_errors(field, value, message):
  config = toy()
  config_lib.set_field(config, field, value)
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config)


def test_coordinate_check_is_flat_under_mup_and_grows_under_standard(monkeypatch):
  """bench/coord_check.py at three small widths: after two Adam steps the change of every
  hidden layer's output and of the logits grows with the width under the standard
  parametrization (slope of log RMS vs log width well above 0) and stays flat under muP."""
  monkeypatch.syspath_prepend(f'{ROOT}/bench')
  import coord_check
  widths = (32, 64, 128)
  slopes = {}
  for kind in ('standard', 'mup'):
    table = coord_check.averaged(coord_check.measure('gpt2', kind, widths, steps_=2))
    slopes[kind] = {layer: coord_check.slope(table[(kind, layer, 2)])
                    for layer in coord_check.LAYERS if layer != 'token_embed'}
  for layer in slopes['mup']:
    assert abs(slopes['mup'][layer]) < 0.4, (layer, slopes)
    assert slopes['standard'][layer] > slopes['mup'][layer] + 0.5, (layer, slopes)
