"""Context parallelism (jaxlm/model/context.py) on 8 simulated CPU devices: ring and all-gather
attention, with and without load balancing, causal and bidirectional, over packed documents,
against one device's attention; a model's loss and gradients against one device's; the
errors; a long-context length phase."""

import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import ROOT, one_device, tiny_config
from jaxlm import cli, mesh as mesh_lib, phase_build, run as run_lib, steps, train
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
# (The models below add ring on context 4, balanced, and a masked LM's allgather on the mixed
# mesh.)
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
  prepare = s.objective.prepare()

  def loss(params, batch):
    value, stats = steps.model_loss(s.model, s.objective, params,
                                    prepare(batch, jax.random.key(1)))
    return value / stats['weight']

  if params is None:  # Drawn on the host: no initialisation to compile.
    rng = np.random.default_rng(4)
    params = jax.tree.map(lambda a: (0.05 * rng.normal(size=a.shape)).astype(a.dtype),
                          s.abstract_state.params)
  with s.active():
    params = jax.device_put(params, s.shardings.params)
    value, grads = jax.jit(jax.value_and_grad(loss))(
        params, mesh_lib.to_device(packed_batch(config), s.batch_sharding))
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


def test_splash_blocks_in_interpret_mode_equal_one_device():
  """The Pallas splash kernel as the ring's block kernel (interpret mode on the CPU: slow, so
  one small case): two 128-token chunks, causal, packed."""
  rng = np.random.default_rng(2)
  q, k, v = qkv(rng, 256, heads=2, kv_heads=1, rows=1, head_dim=16)
  segments = packed_segments(1, 256, rng)
  want = attention_and_grads(q, k, v, segments, True, attention_config(head_dim=16))
  mesh, rules = mesh_for(fsdp=4, sequence=2)
  cfg = attention_config(head_dim=16, attention='splash', context_parallel='ring',
                         context_parallel_load_balance=False)
  got = attention_and_grads(q, k, v, segments, True, cfg, mesh, rules)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


CONFIG = os.path.join(ROOT, 'configs', 'gpt_tiny.py')


@pytest.mark.parametrize('overrides,message', [
    (['--config.model.context_parallel=ring'],
     "model.context_parallel='ring' splits each sequence over the mesh's sequence axis, which "
     "has 1 device: set mesh.sequence > 1"),
    (['--config.model.context_parallel=allgather', '--config.mesh.sequence=8',
      '--config.model.max_len=120'],
     'model.max_len=120 must be a multiple of 2 x mesh.sequence = 16 (load balancing'),
    (['--config.model.context_parallel=ring', '--config.mesh.sequence=4',
      '--config.model.attention=cudnn'],
     "model.attention='cudnn' runs 'cudnn' here, which has no context-parallel block form"),
    (['--config.model.context_parallel=ring', '--config.mesh.sequence=4',
      '--config.model.attention=splash'],
     'model.max_len=256 / 2 x mesh.sequence = 8 (load balancing: two chunks per device; '
     'model.context_parallel_load_balance) = 32 tokens per chunk: splash needs a multiple of 128'),
    (['--config.data.phases=((0.5, 64, {"num_layers": 3}), (1.0, 256))'],
     'a phase cannot change model.num_layers'),
    (['--config.data.phases=((0.5, 64), (1.0, 256, {"rope_theta": 5e5}))'],
     'data.phases: the last phase sets rope_theta; set model.rope_theta instead'),
    (['--config.data.phases=((0.5, 64, {"context_parallel": "rings"}), (1.0, 256))'],
     "model.context_parallel='rings' is not one of"),
], ids=['one-device', 'length', 'cudnn', 'splash-chunk', 'phase-field', 'last-phase-rope',
        'phase-value'])
def test_bad_context_settings_exit_2_in_one_line_naming_the_field(overrides, message, capsys):
  code = cli.main(['plan', f'--config={CONFIG}', *overrides])
  err = capsys.readouterr().err
  assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_long_context_phase_trains_with_its_own_rope_and_the_ring(tmp_path, shared_data,
                                                                     caplog):
  """A Llama that trains half its steps on 32 tokens at RoPE theta 1e4 without context
  parallelism, then 64 tokens at 5e5 with the ring over 2 devices (model.* = the end)."""
  config = tiny_config(
      data__cache_dir=str(shared_data / 'data'), data__tokenizer=str(shared_data / 'tokenizer.model'),
      model__family='llama', model__rope_theta=5e5, model__context_parallel='ring',
      mesh__fsdp=4, mesh__sequence=2, train_steps=4, log_every_steps=2, eval_batches=1,
      checkpoint__save_every_steps=4, model__attention='xla',
      data__phases=((0.5, 32, {'rope_theta': 1e4, 'context_parallel': 'none'}), (1.0, 64)))
  s = run_lib.setup(config, jax.devices())
  no_corpus = types.SimpleNamespace(tokenizer=types.SimpleNamespace(token_bytes=lambda n: None))
  stages = phase_build.Phases(s, no_corpus, str(tmp_path))
  short, long = stages.phase_setup(0), stages.phase_setup(1)
  assert (short.model.cfg.rope_theta, short.config.model.context_parallel) == (1e4, 'none')
  assert (long.model.cfg.rope_theta, long.config.model.context_parallel) == (5e5, 'ring')
  assert short.model.cfg.max_len == long.model.cfg.max_len == 64  # The run's parameters.
  caplog.set_level('INFO', logger='jaxlm')
  context._log_plan.cache_clear()  # Logged once per process: an earlier test may have.
  result = train.train(config, str(tmp_path), devices=jax.devices())
  assert np.isfinite(result['loss']) and result['step'] == 4
  assert "length phase 1 of 2: steps 0-2 on rows of 32 tokens, model.rope_theta=10000.0" in (
      caplog.text)
  assert 'context parallelism: ring over 2 sequence shards, xla blocks, load-balanced' in (
      caplog.text)


def test_the_ring_compiles_for_tpu_with_the_transfers_overlapping_the_blocks(monkeypatch):
  """A small Llama with splash blocks in a ring over 4 chips of a v5p, compiled by the TPU
  compiler: the key/value transfers are asynchronous, and in the forward pass each
  transfer's start and end enclose block computations."""
  from jax.experimental import topologies
  monkeypatch.setenv('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # Compiling needs no chip.
  devices = topologies.get_topology_desc(topology_name='v5p:2x2x1', platform='tpu').devices
  config = tiny_config(model__family='llama', model__emb_dim=256, model__num_heads=2,
                       model__head_dim=128, model__attention='splash', model__dtype='bfloat16',
                       model__max_len=1024, mesh__fsdp=1, mesh__sequence=4, batch_size=2,
                       model__context_parallel='ring')
  s = run_lib.setup(config, devices)
  text = run_lib.compile_train_step(s, s.objective.prepare()).as_text()
  assert 'splash' in text and text.count('collective-permute-start') > 0
  assert 'collective-permute(' not in text  # None synchronous.
  monkeypatch.syspath_prepend(os.path.join(ROOT, 'bench'))
  from context_comm_bench import formula, overlapped_transfers, permute_bytes
  assert overlapped_transfers(text) > 0
  # Bytes sent: the bench's formula (the compiler sends the layers' common segment ids once).
  expected, _ = formula(config, dict(s.mesh.shape), recompute=False)
  assert abs(permute_bytes(text) - expected) < 0.01 * expected
