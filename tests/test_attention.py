"""Attention implementations: the Pallas splash kernel (interpret mode on CPU) against XLA's
attention, in a model, on a mesh, and compiled for TPU; the choice 'auto' makes; cuDNN's
packed-document arguments."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import MASKED, PARTITION, one_device, run_steps, tiny_config
from jaxlm import objectives, run
from jaxlm.errors import ConfigError
from jaxlm.model import attention


def attention_config(name, **fields):
  model = dict(attention=name, splash_block_q=0, splash_block_kv=0, cudnn_max_documents=4,
               context_parallel='none',
               dtype='float32', head_dim=16)
  return ml_collections.FrozenConfigDict({**model, **fields})


def packed_segments(length):
  """Row 0: three documents and trailing padding; row 1: all padding (segment 0)."""
  ids = np.zeros((2, length), np.int32)
  ids[0, :length // 3] = 1
  ids[0, length // 3:length // 2] = 2
  ids[0, length // 2:length - 7] = 3
  return jnp.asarray(ids)


def attend_with_grads(name, q, k, v, segment_ids, causal, **fields):
  cfg = attention_config(name, **fields)
  weights = jnp.linspace(-1, 1, q.size).reshape(q.shape)  # Every output weighs differently.
  loss = lambda q, k, v: jnp.sum(attention.attend(q, k, v, segment_ids, causal, cfg) * weights)
  out = jax.jit(lambda q, k, v: attention.attend(q, k, v, segment_ids, causal, cfg))(q, k, v)
  return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


# (causal, query heads, key/value heads, length, packed): 200 is no multiple of a block (128),
# so it is padded; 256 with a 128 block override runs two blocks each way.
CASES = [(True, 4, 2, 200, True), (False, 4, 2, 200, True), (True, 2, 2, 256, False)]


@pytest.mark.parametrize('causal,heads,kv_heads,length,packed', CASES)
def test_splash_matches_xla_attention_and_its_gradients(causal, heads, kv_heads, length, packed):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, length, n, 16)), jnp.float32)
             for n in (heads, kv_heads, kv_heads))
  segment_ids = packed_segments(length) if packed else None
  blocks = {} if packed else dict(splash_block_q=128, splash_block_kv=128)
  want, want_grads = attend_with_grads('xla', q, k, v, segment_ids, causal)
  got, got_grads = attend_with_grads('splash', q, k, v, segment_ids, causal, **blocks)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=1e-5)


def test_splash_never_attends_across_documents():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 96, 2, 16)), jnp.float32) for _ in range(3))
  segment_ids = packed_segments(96)
  cfg = attention_config('splash')
  out = attention.attend(q, k, v, segment_ids, False, cfg)
  # Changing the third document's keys and values leaves the first two documents' outputs.
  third = (segment_ids == 3)[:, :, None, None]
  out2 = attention.attend(q, jnp.where(third, 5.0, k), jnp.where(third, -3.0, v), segment_ids,
                          False, cfg)
  others = np.asarray(~third[..., 0, 0])
  np.testing.assert_array_equal(np.asarray(out)[others], np.asarray(out2)[others])
  assert not np.allclose(np.asarray(out)[~others], np.asarray(out2)[~others])


@pytest.mark.parametrize('platform,kind,dtype,head_dim,expected', [
    ('tpu', 'TPU v5', 'bfloat16', 128, 'splash'),
    ('tpu', 'TPU v6 lite', 'float32', 64, 'splash'),
    ('gpu', 'NVIDIA H100 80GB HBM3', 'bfloat16', 128, 'cudnn'),
    ('gpu', 'NVIDIA H100 80GB HBM3', 'float32', 128, 'xla'),  # cuDNN flash is 16-bit only.
    ('gpu', 'NVIDIA H100 80GB HBM3', 'bfloat16', 256, 'xla'),
    ('gpu', 'AMD Instinct MI300X', 'bfloat16', 128, 'xla'),
    ('cpu', 'cpu', 'float32', 64, 'xla'),
])
def test_auto_picks_splash_on_tpu_cudnn_on_nvidia_and_xla_elsewhere(platform, kind, dtype,
                                                                     head_dim, expected):
  cfg = attention_config('auto', dtype=dtype, head_dim=head_dim)
  assert attention.choose(cfg, platform, kind, length=2048) == expected
  assert attention.choose(attention_config('xla'), platform, kind, length=2048) == 'xla'
  # Short rows (BERT's 128) on a GPU: XLA's attention, measured faster there.
  assert attention.choose(cfg, platform, kind, length=128) == (
      'splash' if platform == 'tpu' else 'xla')


def test_cudnn_gets_each_document_as_an_offset_and_a_length():
  segment_ids = packed_segments(30)  # Row 0: runs of 10, 5, 8 and 7 padding; row 1: padding.
  lengths, offsets, overflow = attention.document_runs(segment_ids, 4)
  np.testing.assert_array_equal(lengths, [[10, 5, 8, 7], [30, -1, -1, -1]])
  np.testing.assert_array_equal(offsets, [[0, 10, 15, 23, -1], [0, -1, -1, -1, -1]])
  assert not overflow.any()
  *_, overflow = attention.document_runs(segment_ids, 3)  # Four runs do not fit in three.
  np.testing.assert_array_equal(overflow, [True, False])


def lowered_for_cuda(name, length, monkeypatch):
  """The StableHLO of attention's forward and backward pass for an NVIDIA GPU, lowered here
  (no GPU needed to lower; jax.export allows another platform). Lowering the fused cuDNN call
  asks the local cuDNN's version and the GPU's compute capability: a Hopper's are given."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_lib
  monkeypatch.setattr(cudnn_lib, 'check_cudnn_version', lambda: 91000)
  monkeypatch.setattr(cudnn_lib, 'check_compute_capability', lambda capability: True)
  monkeypatch.setattr(cudnn_lib, 'is_cuda_compute_capability_equal', lambda capability: False)
  cfg = attention_config(name, dtype='bfloat16', head_dim=64)
  q = jax.ShapeDtypeStruct((2, length, 4, 64), jnp.bfloat16)
  loss = lambda q, k, v, segment_ids: jnp.sum(
      attention.attend(q, k, v, segment_ids, True, cfg).astype(jnp.float32))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  unchecked = [jax.export.DisabledSafetyCheck.custom_call(f'__cudnn$fmha{kind}')
               for kind in ('Softmax', 'SoftmaxBackward')]
  exported = jax.export.export(grads, platforms=['cuda'], disabled_checks=unchecked)(
      q, q, q, jax.ShapeDtypeStruct((2, length), jnp.int32))
  return exported.mlir_module()


def test_cudnn_packed_attention_for_a_gpu_has_no_length_by_length_tensor(monkeypatch):
  length = 192  # No other dimension is 192: a [.., 192, 192] tensor is a mask, bias or scores.
  square = re.compile(rf'tensor<(\d+x)*{length}x{length}x')
  cudnn = lowered_for_cuda('cudnn', length, monkeypatch)
  assert '__cudnn$fmhaSoftmax(' in cudnn and '__cudnn$fmhaSoftmaxBackward(' in cudnn
  assert not square.search(cudnn)
  assert square.search(lowered_for_cuda('xla', length, monkeypatch))  # What it would be.


def test_splash_block_sizes_follow_the_length_and_the_config():
  sizes = attention.block_sizes(attention_config('splash'), 200, 200)
  assert (sizes.block_q, sizes.block_kv) == (256, 256)
  sizes = attention.block_sizes(attention_config('splash'), 8192, 8192)
  assert (sizes.block_q, sizes.block_kv, sizes.block_q_dkv) == (512, 512, 512)
  sizes = attention.block_sizes(attention_config('splash', splash_block_kv=1024), 8192, 8192)
  assert (sizes.block_q, sizes.block_kv, sizes.block_kv_dq) == (512, 1024, 1024)
  with pytest.raises(ConfigError, match='model.splash_block_q=100 must be a multiple of 128'):
    attention.block_sizes(attention_config('splash', splash_block_q=100), 256, 256)


# Tiny models with grouped-query heads and two documents per row (test_mesh's batches), 3 steps
# on a mesh of 8 devices with fsdp, sequence and tensor axes, against XLA's attention on one
# device: a causal model and a masked one (BERT, bidirectional).
SMALL = dict(PARTITION, batch_size=4, model__num_heads=4, model__num_kv_heads=2)
MESH = dict(mesh__fsdp=2, mesh__sequence=2, mesh__tensor=2)
RUNS = {'causal': SMALL, 'masked': dict(MASKED, **SMALL)}


@pytest.fixture(scope='module')
def xla_losses():
  return {objective: run_steps(tiny_config(**overrides, model__attention='xla'), one_device())[2]
          for objective, overrides in RUNS.items()}


@pytest.mark.parametrize('objective', RUNS)
def test_a_model_trains_to_the_same_losses_with_splash_on_a_mesh(objective, xla_losses):
  config = tiny_config(**RUNS[objective], **MESH, model__attention='splash')
  _, _, losses = run_steps(config, jax.devices())
  np.testing.assert_allclose(losses, xla_losses[objective], rtol=2e-5)


def test_a_small_model_with_splash_compiles_for_tpu(monkeypatch, tpu_compiles):
  from jax.experimental import topologies
  # Compiling needs no chip: do not take libtpu's one-process-per-machine lock.
  monkeypatch.setenv('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  devices = topologies.get_topology_desc(topology_name='v5p:2x2x1', platform='tpu').devices
  small = dict(PARTITION, model__emb_dim=256, model__num_heads=2, model__num_kv_heads=1)
  config = tiny_config(**small, model__attention='auto', model__dtype='bfloat16',
                       model__max_len=256, mesh__fsdp=2, mesh__data=2)
  s = run.setup(config, devices)
  compiled = run.compile_train_step(s, s.objective.prepare())
  assert 'splash' in compiled.as_text()
  assert run.memory_per_device(compiled)['total'] > 0
