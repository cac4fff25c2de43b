"""model.parametrization: muP's multipliers and per-parameter learning rates, exactly, for a toy
pair of widths; muP at its base width is the standard model; the coordinate check's slopes."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import ROOT
from jaxlm import config as config_lib
from jaxlm import model as model_lib, objectives, optim, parametrization, state
from jaxlm.errors import ConfigError

BASE, WIDE = 32, 128  # m = 4


def build(config):
  """The model the config's objective trains."""
  objective = objectives.get(config)
  return model_lib.build(config.model, objective.causal, objective.num_labels)


def toy(family='llama', width=BASE, kind='mup', **model):
  c = config_lib.defaults(family)
  c.objective = 'masked' if family in ('bert', 'modernbert') else 'causal'
  c.model.update(dict(num_layers=2, emb_dim=width, num_heads=width // 8, head_dim=8,
                      mlp_dim=2 * width, vocab_size=64, max_len=16, parametrization=kind,
                      mup_base_width=BASE, mup_base_head_dim=8))
  c.model.update(model)
  c.optimizer.warmup_steps = 0
  return config_lib.validate(c)


TOKENS = jnp.zeros((1, 16), jnp.int32)


def init(config, seed=0):
  """The model and its initial parameters (the real initialisers)."""
  model = build(config)
  return model, nn.unbox(jax.jit(model.init)(jax.random.key(seed), TOKENS)['params'])


def random_params(config, seed=0):
  """The model and parameters of its shapes drawn here (no initialiser to compile), norms and
  biases away from 1 and 0."""
  model = build(config)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), TOKENS)['params']))
  rng = np.random.default_rng(seed)
  return model, jax.tree.map(lambda a: rng.normal(0, 0.2, a.shape).astype(np.float32), shapes)


def flat(tree):
  return {jax.tree_util.keystr(p, simple=True, separator='/'): v
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def axes_of(config):
  return flat(state.param_axes(build(config), config))


# The hidden matrices (init std / sqrt(m), rate / m) of a scanned Llama and BERT, by name: what
# the rule on their logical axes must find.
HIDDEN = {'layers/attention/query/kernel', 'layers/attention/key/kernel',
          'layers/attention/value/kernel', 'layers/attention/out/kernel',
          'layers/mlp/wi/kernel', 'layers/mlp/wi_gate/kernel', 'layers/mlp/wo/kernel',
          'head_dense/kernel'}


def test_rates_and_init_follow_the_logical_axes_exactly():
  m = WIDE / BASE
  for family in ('llama', 'bert'):
    wide = toy(family, WIDE)
    rates = flat(optim.rate_multipliers(wide.model, state.param_axes(build(wide),
                                                                     wide)))
    assert {n for n, rate in rates.items() if rate == 1 / m} == HIDDEN & set(rates), family
    assert {rate for n, rate in rates.items() if n not in HIDDEN} == {1.0}, family
  # The same draws as the standard model, hidden kernels scaled by 1/sqrt(m): nothing else.
  _, params = init(toy('llama', WIDE))
  _, standard = init(toy('llama', WIDE, 'standard'))
  for name, value in flat(params).items():
    expected = flat(standard)[name] / (math.sqrt(m) if name in HIDDEN else 1.0)
    np.testing.assert_allclose(value, expected, rtol=1e-6, err_msg=name)
  p = parametrization.get(wide.model)
  alpha = toy('llama', WIDE, mup_output_multiplier=3.0, mup_input_multiplier=2.0).model
  assert (p.output_multiplier(alpha), p.input_multiplier(alpha)) == (3.0 / m, 2.0)
  assert p.query_multiplier(toy('llama', WIDE, head_dim=32).model) == math.sqrt(8 / 32)
  assert p.residual_multiplier(toy('llama', WIDE, mup_base_depth=1).model) == 0.5


def test_the_update_is_adams_times_each_rate_and_decay_does_not_shrink():
  """One AdamW step at 4x the base width: each parameter moves by its rate times Adam's step,
  and the decay term is lr * weight_decay * w for every decayed parameter, as in standard."""
  lr, wd = 1e-2, 0.1
  model, params = random_params(toy('gpt2', WIDE, 'standard'))
  grads = jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)
                                         + 1.0), params)
  updates = {}
  for kind in ('standard', 'mup'):
    config = toy('gpt2', WIDE, kind)
    config.optimizer.learning_rate, config.optimizer.weight_decay = lr, wd
    config.optimizer.grad_clip = 0.0
    tx, _ = optim.optimizer(config, model)
    updates[kind] = flat(tx.update(grads, tx.init(params), params)[0])
  decay, weights = flat(optim.decay_mask(params)), flat(params)
  assert {n for n, v in decay.items() if not v} and {n for n, v in decay.items() if v} - HIDDEN
  for name, standard in updates['standard'].items():
    rate = 1 / 4 if name in HIDDEN else 1.0
    decay_term = -lr * wd * weights[name] * decay[name]
    np.testing.assert_allclose(updates['mup'][name], rate * (standard - decay_term) + decay_term,
                               rtol=1e-5, atol=1e-9, err_msg=name)


@pytest.mark.parametrize('family', ['gpt2', 'llama', 'bert', 'modernbert'])
def test_mup_at_its_base_width_is_the_standard_model(family):
  """Every init std, rate and multiplier muP has is the standard one at the base width (and
  the model skips a multiplier of 1): the same model and the same update."""
  config = toy(family, BASE)
  m, p = config.model, parametrization.get(config.model)
  for name, axes in axes_of(config).items():
    assert p.learning_rate_multiplier(m, axes) == 1.0 and p.init_std(m, axes, 0.02) == 0.02, name
  assert {p.input_multiplier(m), p.output_multiplier(m), p.query_multiplier(m),
          p.residual_multiplier(m)} == {1.0}


def test_to_standard_computes_the_same_logits():
  """Folding the multipliers into the weights (what the Hugging Face export does, checked
  against transformers for untied and post-norm models in test_convert.py) leaves the logits of
  a tied pre-norm model as they were; one with alpha_in != 1 has no standard form."""
  fields = dict(mup_output_multiplier=2.5, head_dim=16, mup_base_depth=1)
  config = toy('gpt2', WIDE, **fields)
  model, params = random_params(config)
  folded = parametrization.to_standard(config.model, params)
  standard = build(toy('gpt2', WIDE, 'standard', **fields))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 5, 64)
  np.testing.assert_allclose(standard.apply({'params': folded}, tokens),
                             model.apply({'params': params}, tokens), rtol=2e-5, atol=2e-5)
  assert flat(folded)['final_norm/scale'] == pytest.approx(flat(params)['final_norm/scale'] * 2.5
                                                           * BASE / WIDE)
  with pytest.raises(ConfigError, match='tied embeddings has no standard'):
    parametrization.to_standard(toy('gpt2', WIDE, mup_input_multiplier=2.0).model, params)


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
  """bench/coord_check.py at three small widths: after an Adam step the change of every
  hidden layer's output and of the logits grows with the width under the standard
  parametrization (slope of log RMS vs log width near 1/2 to 1) and stays flat under muP."""
  monkeypatch.syspath_prepend(f'{ROOT}/bench')
  import coord_check
  widths = (32, 64, 128)
  slopes = {}
  for kind in ('standard', 'mup'):
    # XLA's least optimisation: half the compile time; the measurement is the same.
    table = coord_check.averaged(coord_check.measure(
        'gpt2', kind, widths, steps_=1, compiler_options={'xla_backend_optimization_level': 0}))
    slopes[kind] = {layer: coord_check.slope(table[(kind, layer, 1)])
                    for layer in coord_check.LAYERS if layer != 'token_embed'}
  for layer in slopes['mup']:
    assert abs(slopes['mup'][layer]) < 0.3, (layer, slopes)
    assert slopes['standard'][layer] > 0.4, (layer, slopes)
