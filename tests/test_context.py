"""Context parallelism (jaxlm/model/context.py) on 8 simulated CPU devices: ring and all-gather
attention, with and without load balancing, causal and bidirectional, over packed documents,
against one device's attention; a model's loss and gradients against one device's; the
errors; a long-context length phase."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import one_device, tiny_config
from jaxlm import mesh as mesh_lib, objectives, run as run_lib, steps
from jaxlm.model import attention, context


def packed_segments(rows, length, rng):
  """Documents of random lengths (some shorter than a shard, one longer), numbered from 1 in
  each row, and padding (0) at the end of the first row."""
  ids = np.zeros((rows, length), np.int32)
  for r in range(rows):
    edges = np.sort(rng.choice(np.arange(1, length), 4, replace=False))
    ids[r] = np.searchsorted(edges, np.arange(length), side='right') + 1
  ids[0, -5:] = 0
  return ids


def mesh_for(**sizes):
  config = tiny_config(**{f'mesh__{k}': v for k, v in sizes.items()})
  return mesh_lib.make_mesh(config.mesh, jax.devices()), mesh_lib.rules(config)


def attention_and_grads(q, k, v, segments, causal, cfg, mesh=None, rules=()):
  """Attention's output and the gradients of a weighted sum of it, in the sequence order the
  layout expects (balanced: zigzag), returned in the natural order."""
  weights = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
  perm = np.arange(q.shape[1])
  if mesh is not None and context.balanced(cfg, causal):
    perm = context.order(q.shape[1], mesh.shape['sequence'])
  inverse = np.argsort(perm)

  def loss(q, k, v):
    out = attention.attend(q, k, v, jnp.asarray(segments)[:, perm], causal, cfg)
    return jnp.sum(out * weights[:, perm]), out

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  args = [x[:, perm] for x in (q, k, v)]
  if mesh is None:
    (_, out), grads = fn(*args)
  else:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      (_, out), grads = fn(*args)
  return [np.asarray(x)[:, inverse] for x in (out, *grads)]


def attention_config(**fields):
  model = dict(attention='xla', context_parallel='none', context_parallel_load_balance=True,
               splash_block_q=0, splash_block_kv=0, dtype='float32', head_dim=8)
  return ml_collections.FrozenConfigDict({**model, **fields})


def qkv(rng, length, heads=4, kv_heads=2, rows=2, head_dim=8):
  return [jnp.asarray(rng.normal(size=(rows, length, n, head_dim)), jnp.float32)
          for n in (heads, kv_heads, kv_heads)]


# (strategy, load balancing, causal, mesh): context 4 and context 2 x fsdp 2 x tensor 2.
CONTEXT4, MIXED = dict(fsdp=2, sequence=4), dict(fsdp=2, sequence=2, tensor=2)
# (A model below trains with ring on context 4, balanced, and a masked LM with allgather on
# the mixed mesh.)
CASES = [('ring', False, True, CONTEXT4), ('allgather', True, True, CONTEXT4),
         ('allgather', False, True, MIXED), ('ring', True, True, MIXED),
         ('ring', True, False, MIXED)]


def inputs():
  rng = np.random.default_rng(0)
  return (*qkv(rng, 64), packed_segments(2, 64, rng))


@pytest.fixture(scope='module')
def one_device_attention():
  """{causal: output and gradients of XLA's attention on one device}."""
  return {causal: attention_and_grads(*inputs(), causal, attention_config())
          for causal in (True, False)}


@pytest.mark.parametrize('strategy,balance,causal,sizes', CASES)
def test_context_parallel_attention_equals_one_device(strategy, balance, causal, sizes,
                                                      one_device_attention):
  q, k, v, segments = inputs()
  want = one_device_attention[causal]
  mesh, rules = mesh_for(**sizes)
  cfg = attention_config(context_parallel=strategy, context_parallel_load_balance=balance)
  got = attention_and_grads(q, k, v, segments, causal, cfg, mesh, rules)
  for g, w in zip(got, want):  # Output, dq, dk, dv.
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_zigzag_gives_every_device_the_same_causal_work():
  length, shards = 64, 4
  order = context.order(length, shards)
  assert sorted(order) == list(range(length))
  # Query-key pairs a causal mask keeps, per device: equal with zigzag, not without.
  work = lambda order: [int(np.sum(o[:, None] >= np.arange(length)[None]))
                        for o in np.split(order, shards)]
  assert len(set(work(order))) == 1
  assert len(set(work(np.arange(length)))) == shards


def test_blocks_no_document_reaches_are_never_computed():
  """Documents one chunk long, bidirectional: every block but a device's own is empty, so a
  NaN in one document's values reaches no other document's output."""
  rng = np.random.default_rng(1)
  q, k, v = qkv(rng, 64)
  segments = np.repeat(np.arange(1, 5), 16)[None].repeat(2, 0).astype(np.int32)
  v = v.at[:, 48:].set(jnp.nan)  # The fourth document, on the fourth device.
  mesh, rules = mesh_for(**CONTEXT4)
  cfg = attention_config(context_parallel='ring')
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = np.asarray(jax.jit(lambda q, k, v: attention.attend(
        q, k, v, jnp.asarray(segments), False, cfg))(q, k, v))
  assert np.isfinite(out[:, :48]).all() and np.isnan(out[:, 48:]).all()


# Tiny models with grouped-query heads over packed rows: a causal Llama and a masked BERT.
MODEL = dict(model__family='llama', model__num_heads=4, model__num_kv_heads=2, batch_size=4,
             model__emb_dim=64, model__attention='xla')
MASKED = dict(MODEL, objective='masked', model__family='bert', model__type_vocab_size=2)


def packed_batch(config):
  rng = np.random.default_rng(3)
  shape = (config.batch_size, config.model.max_len)
  segments = packed_segments(*shape, rng)
  starts = np.concatenate([np.ones((shape[0], 1), bool), segments[:, 1:] != segments[:, :-1]], 1)
  index = np.arange(shape[1])[None].repeat(shape[0], 0)
  positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  return {'tokens': rng.integers(7, config.model.vocab_size, shape).astype(np.int32),
          'segment_ids': segments, 'positions': positions.astype(np.int32)}


def loss_and_grads(config, devices, params=None):
  """The mean loss of a packed batch and its gradients; fresh parameters unless given."""
  s = run_lib.setup(config, devices)
  prepare = objectives.build(config)

  def loss(params, batch):
    value, stats = steps.model_loss(s.model, params, prepare(batch, jax.random.key(1)), config)
    return value / stats['weight']

  if params is None:  # Drawn on the host: no initialisation to compile.
    rng = np.random.default_rng(4)
    params = jax.tree.map(lambda a: (0.05 * rng.normal(size=a.shape)).astype(a.dtype),
                          s.abstract_state.params)
  with s.active():
    params = jax.device_put(params, s.shardings.params)
    value, grads = jax.jit(jax.value_and_grad(loss))(
        params, run_lib.to_device(packed_batch(config), s.batch_sharding))
  return float(value), jax.device_get(params), jax.device_get(grads)


@pytest.mark.parametrize('overrides,strategy,sizes', [
    (MODEL, 'ring', CONTEXT4), (MASKED, 'allgather', MIXED)], ids=['causal', 'masked'])
def test_a_model_has_one_devices_loss_and_gradients(overrides, strategy, sizes):
  want, params, want_grads = loss_and_grads(tiny_config(**overrides), one_device())
  config = tiny_config(**overrides, model__context_parallel=strategy,
                       **{f'mesh__{k}': v for k, v in sizes.items()})
  got, _, grads = loss_and_grads(config, jax.devices(), params)
  assert abs(got - want) <= 1e-5 * abs(want)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    assert np.linalg.norm(g - w) <= 1e-5 * np.linalg.norm(w) + 1e-7
