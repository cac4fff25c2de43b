"""The Transformer: causality, sizes, grouped-query attention, packing, scan and remat."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from jaxlm import flops, model as model_lib
from jaxlm.model import layers

FAMILIES = {
    'gpt2': dict(),
    'llama': dict(model__family='llama', model__num_kv_heads=2),
    'modernbert': dict(model__family='modernbert'),  # Causal here: the stack's causality.
}


def build(**overrides):
  config = tiny_config(**overrides)
  model = model_lib.build(config.model)
  tokens = jax.random.randint(jax.random.key(1), (2, config.model.max_len), 0,
                              config.model.vocab_size)
  init = jax.jit(lambda rng: nn.unbox(model.init(rng, tokens)['params']))
  return config, model, init(jax.random.key(0)), tokens


def logits(model, params, tokens, **kwargs):
  return jax.jit(lambda p, t: model.apply({'params': p}, t, **kwargs))(params, tokens)


@pytest.mark.parametrize('family', FAMILIES)
def test_future_tokens_do_not_change_earlier_logits(family):
  _, model, params, tokens = build(**FAMILIES[family])
  t = 20
  changed = tokens.at[:, t:].set((tokens[:, t:] + 7) % 512)
  before, after = logits(model, params, tokens), logits(model, params, changed)
  np.testing.assert_allclose(before[:, :t], after[:, :t], rtol=1e-5, atol=1e-5)
  assert np.abs(before[:, t:] - after[:, t:]).max() > 1e-3  # The change is visible later on.


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('tied', [True, False])
@pytest.mark.parametrize('scan', [True, False])
def test_shapes_and_parameter_count_match_the_formula(family, tied, scan):
  config = tiny_config(model__tied_embeddings=tied, model__scan_layers=scan, **FAMILIES[family])
  model = model_lib.build(config.model)
  tokens = jnp.zeros((2, config.model.max_len), jnp.int32)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), tokens)['params']))
  out = jax.eval_shape(lambda p: model.apply({'params': p}, tokens), params)
  assert out.shape == (2, config.model.max_len, config.model.vocab_size)
  actual = sum(x.size for x in jax.tree.leaves(params))
  assert actual == flops.param_counts(config.model)['total']


@pytest.mark.parametrize('type_vocab_size', [0, 2])
def test_bert_parameter_count_matches_the_formula(type_vocab_size):
  """Post-norm, MLM head transform, output bias and token types are all counted."""
  config = tiny_config(model__family='bert', objective='masked',
                       model__type_vocab_size=type_vocab_size)
  model = model_lib.build(config.model, causal=False)
  tokens = jnp.zeros((2, config.model.max_len), jnp.int32)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), tokens)['params']))
  assert sum(x.size for x in jax.tree.leaves(params)) == flops.param_counts(config.model)['total']


def test_known_model_sizes():
  from jaxlm import config as config_lib
  sizes = {'configs/gpt2_124m.py': 124.475e6, 'configs/llama_7b.py': 6.738e9}
  for path, expected in sizes.items():
    total = flops.param_counts(config_lib.load(path).model)['total']
    assert abs(total - expected) / expected < 1e-3, (path, total)


def reference_attention(q, k, v, causal=True):
  """Plain multi-head attention written out, each KV head shared by its query group."""
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  scores = jnp.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  if causal:
    t = q.shape[1]
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
  return jnp.einsum('bnts,bsnh->btnh', jax.nn.softmax(scores, axis=-1), v)


@pytest.mark.parametrize('kv_heads', [4, 2, 1])
def test_attention_matches_a_written_out_reference(kv_heads):
  config, model, params, tokens = build(model__family='llama', model__num_kv_heads=kv_heads,
                                        model__num_layers=1)
  x = jax.random.normal(jax.random.key(2), (2, 16, config.model.emb_dim))
  attention = layers.Attention(model.cfg, causal=True)
  p = jax.tree.map(lambda a: a[0], params['layers']['attention'])  # Layer 0 of the scan.
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  out = jax.jit(lambda p: attention.apply({'params': p}, x, positions, None))(p)
  half = config.model.head_dim // 2
  freq = 1e4 ** (-np.arange(half) / half)
  q = layers.rope(jnp.einsum('btd,dnh->btnh', x, p['query']['kernel']), positions, freq)
  k = layers.rope(jnp.einsum('btd,dnh->btnh', x, p['key']['kernel']), positions, freq)
  v = jnp.einsum('btd,dnh->btnh', x, p['value']['kernel'])
  expected = jnp.einsum('btnh,nhd->btd', reference_attention(q, k, v), p['out']['kernel'])
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
  gqa_config, gqa, gqa_params, tokens = build(model__family='llama', model__num_kv_heads=2)
  _, mha, _, _ = build(model__family='llama', model__num_kv_heads=4)
  mha_params = jax.tree.map(lambda x: x, gqa_params)
  for name in ('key', 'value'):  # [layers, embed, kv_heads, head] -> each head twice.
    kernel = gqa_params['layers']['attention'][name]['kernel']
    mha_params['layers']['attention'][name]['kernel'] = jnp.repeat(kernel, 2, axis=2)
  np.testing.assert_allclose(logits(gqa, gqa_params, tokens), logits(mha, mha_params, tokens),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('family', FAMILIES)
def test_packed_documents_do_not_see_each_other(family):
  _, model, params, tokens = build(**FAMILIES[family])
  first, second = tokens[:1, :24], tokens[:1, 24:64]
  segments = jnp.concatenate([jnp.ones((1, 24), jnp.int32), 2 * jnp.ones((1, 40), jnp.int32)], 1)
  positions = jnp.concatenate([jnp.arange(24), jnp.arange(40)])[None]
  packed = logits(model, params, jnp.concatenate([first, second], 1), positions=positions,
                  segment_ids=segments)
  np.testing.assert_allclose(packed[:, :24], logits(model, params, first), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(packed[:, 24:], logits(model, params, second), rtol=1e-4, atol=1e-4)


def stack_to_layers(params, num_layers):
  """Scanned parameters ('layers' stacked on axis 0) -> unrolled ('layers_0', 'layers_1')."""
  out = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(num_layers):
    out[f'layers_{i}'] = jax.tree.map(lambda x: x[i], params['layers'])
  return out


@pytest.mark.parametrize('family', FAMILIES)
def test_scan_and_unrolled_layers_agree(family):
  config, scanned, params, tokens = build(**FAMILIES[family])
  _, unrolled, _, _ = build(model__scan_layers=False, **FAMILIES[family])
  np.testing.assert_allclose(
      logits(scanned, params, tokens),
      logits(unrolled, stack_to_layers(params, config.model.num_layers), tokens),
      rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('policy', ['full', 'dots_saveable', 'dots_with_no_batch_dims',
                                    'minimal', 'save_qkv_proj'])
def test_remat_policies_give_the_same_gradients(policy):
  _, plain, params, tokens = build(model__family='llama')
  _, remat, _, _ = build(model__family='llama', model__remat_policy=policy)

  def grads(model):
    loss = lambda p: model.apply({'params': p}, tokens).astype(jnp.float32).std()
    return jax.jit(jax.grad(loss))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads(plain), grads(remat))


def test_offloading_remat_is_refused_on_cpu_with_a_clear_error():
  from jaxlm import run as run_lib
  from jaxlm.config import ConfigError
  with pytest.raises(ConfigError, match="remat_policy='offload' .* needs a GPU or TPU"):
    run_lib.setup(tiny_config(model__remat_policy='offload'), jax.devices()[:1])


def test_bfloat16_compute_keeps_float32_parameters_and_tracks_float32():
  _, model32, params, tokens = build()
  _, model16, _, _ = build(model__dtype='bfloat16')
  out16 = logits(model16, params, tokens)
  assert out16.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  out32 = logits(model32, params, tokens)
  np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=0.1)


def test_dropout_is_active_only_in_training():
  config, model, params, tokens = build(model__dropout_rate=0.5)
  apply = jax.jit(lambda p, rng: model.apply({'params': p}, tokens, deterministic=False,
                                             rngs={'dropout': rng}))
  train = [apply(params, jax.random.key(s)) for s in (1, 2)]
  assert np.abs(train[0] - train[1]).max() > 1e-3
  np.testing.assert_array_equal(logits(model, params, tokens), logits(model, params, tokens))


# ------------------------------------------------------------- the injectable matmul


MATMUL_KERNELS = []


def doubling_dot_general(lhs, rhs, dimension_numbers, precision=None,
                         preferred_element_type=None):
  """A toy matmul kind: lax.dot_general, doubled, noting the kernel it multiplies by."""
  MATMUL_KERNELS.append(rhs.shape)
  return 2 * jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)


@pytest.mark.parametrize('family', ['llama', 'bert'])
def test_every_dense_layer_runs_the_registered_matmul(family, monkeypatch):
  """A new kind is one function plus one registry line, and every Dense kernel (the blocks',
  an untied output layer's, BERT's head transform) goes through it."""
  from jaxlm import matmuls
  monkeypatch.setitem(matmuls.REGISTRY, 'doubling', f'{__name__}:doubling_dot_general')
  overrides = dict(model__family=family, model__scan_layers=False, model__tied_embeddings=False,
                   model__matmul_keep=())
  _, default, params, tokens = build(**overrides)
  config = tiny_config(model__matmul='doubling', **overrides)
  doubled = model_lib.build(config.model)
  MATMUL_KERNELS.clear()
  out = doubled.apply({'params': params}, tokens)
  kernels = [leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
             if path[-1].key == 'kernel']
  assert sorted(MATMUL_KERNELS) == sorted(kernels) and len(kernels) > 10
  assert np.abs(out - default.apply({'params': params}, tokens)).max() > 1e-3


# ------------------------------------------------------------- the model contract of the step


class SowingAuxLoss(nn.Module):
  """The model, plus an auxiliary loss of 0.5 sown as a layer would (a MoE's balance loss)."""
  inner: nn.Module

  @property
  def cfg(self):  # What the step reads of a model (context parallelism's balancing).
    return self.inner.cfg

  @property
  def causal(self):
    return self.inner.causal

  @nn.compact
  def __call__(self, *args, **kwargs):
    self.sow(model_lib.AUX_LOSS, 'balance', jnp.float32(0.5))
    return self.inner(*args, **kwargs)


def test_a_sown_auxiliary_loss_counts_once_per_target():
  from jaxlm import objectives, steps
  config, model, _, tokens = build()
  objective = objectives.get(config)
  batch = objective.prepare()({'tokens': tokens, 'segment_ids': jnp.ones_like(tokens),
                                    'positions': jnp.broadcast_to(jnp.arange(tokens.shape[1]),
                                                                  tokens.shape)})
  sowing = SowingAuxLoss(model)
  params = nn.unbox(sowing.init(jax.random.key(0), tokens)['params'])
  plain, plain_stats = steps.model_loss(model, objective, params['inner'], batch)
  value, stats = steps.model_loss(sowing, objective, params, batch)
  assert 'aux_loss_sum' not in plain_stats  # Nothing sown: the step is what it was.
  np.testing.assert_allclose(value - plain, 0.5 * stats['weight'], rtol=1e-5)
  np.testing.assert_allclose(stats['aux_loss_sum'], 0.5 * stats['weight'], rtol=1e-6)
