"""Attention implementations, chosen by `model.attention` in one place.

Each implementation is a function (q, k, v, segment_ids, causal, cfg) -> out with q [B, T, N, H],
k and v [B, T, K, H] (K divides N: grouped-query heads) and out like q. Packed rows are
described by segment ids [B, T] (documents numbered from 1, 0 = padding), never by a dense
[T, T] mask: only 'xla' builds one, inside. A new kernel is one such function, in a module of
its own, and one line in model.ATTENTION (jaxlm/model/__init__.py), the registry that config
validation reads too.

'auto' picks 'splash' on TPU, 'cudnn' on NVIDIA GPUs for rows of CUDNN_MIN_LENGTH tokens or
more when dtype and head size allow, and 'xla' elsewhere; the choice is logged once per
(implementation, platform).
"""

import functools
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import model as model_lib
from jaxlm.errors import ConfigError

log = logging.getLogger('jaxlm')


def target():
  """(platform, device kind) of the devices being compiled for: the mesh's when one is set (an
  ahead-of-time compile for TPU runs on a CPU host), else the default backend's."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  if device is not None:
    return device.platform, device.device_kind
  return jax.default_backend(), jax.devices()[0].device_kind


# Rows shorter than this use XLA's attention on GPU under 'auto': measured on an H200
# (BENCHMARKS.md), BERT-large's rows of 128 train 1.9x faster with XLA's (its [T, T] scores
# are small) while packed rows of 2048 train 2.4x faster with cuDNN's.
CUDNN_MIN_LENGTH = 1024


def choose(cfg, platform, device_kind, length=None):
  """The implementation `cfg.attention` names, with 'auto' resolved for this platform and
  rows of `length` tokens (default model.max_len)."""
  if cfg.attention != 'auto':
    return cfg.attention
  if platform == 'tpu':
    return 'splash'
  # cuDNN's flash attention: NVIDIA only, 16-bit compute, head sizes it has kernels for.
  if (platform in ('gpu', 'cuda') and 'nvidia' in device_kind.lower()
      and (length or cfg.max_len) >= CUDNN_MIN_LENGTH
      and cfg.dtype in ('bfloat16', 'float16') and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128):
    return 'cudnn'
  return 'xla'


@functools.cache
def _log_choice(name, platform, configured):
  log.info('attention: %s on %s (model.attention=%s)', name, platform, configured)


def attend(q, k, v, segment_ids, causal, cfg):
  """Attention of q over k, v within each row's documents (causal: only earlier tokens)."""
  from jaxlm.model import context  # It builds on this module.
  platform, kind = target()
  name = choose(cfg, platform, kind, q.shape[1])
  _log_choice(name, platform, cfg.attention)
  if context.active(cfg):  # A sequence split over devices: model.context_parallel.
    return context.attend(q, k, v, segment_ids, causal, cfg, name)
  return model_lib.get(model_lib.ATTENTION, name)(q, k, v, segment_ids, causal, cfg)


def document_mask(segment_ids):
  """[B, 1, T, T]: a token sees only its own document of a packed row."""
  if segment_ids is None:
    return None
  return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]


def xla(q, k, v, segment_ids, causal, cfg):
  """XLA's dot-product attention: materialises the [B, N, T, T] scores (the reference)."""
  return jax.nn.dot_product_attention(q, k, v, mask=document_mask(segment_ids), is_causal=causal,
                                      implementation='xla')


def cudnn(q, k, v, segment_ids, causal, cfg):
  """cuDNN flash attention (NVIDIA GPUs). Packed rows use cuDNN's packed ("THD") layout, each
  document a sequence given by its offset and length, so no mask or bias exists.

  The public jax.nn.dot_product_attention takes only per-row lengths, so packed rows go through
  the function it wraps (jax._src.cudnn). cuDNN needs a static count of documents per row:
  `model.cudnn_max_documents`; a batch with a row holding more turns the output NaN, which the
  step's non-finite guard skips or stops on (config.nonfinite) rather than train on a wrong
  mask. Packed layout needs a Hopper GPU or newer (cuDNN's rule).
  """
  if segment_ids is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation='cudnn')
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_lib
  lengths, offsets, overflow = document_runs(segment_ids, cfg.cudnn_max_documents)
  mask_type = cudnn_lib.MaskType.PADDING_CAUSAL if causal else cudnn_lib.MaskType.PADDING
  out = cudnn_lib.dot_product_attention(
      q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
      scale=1 / math.sqrt(q.shape[-1]), mask_type=mask_type)
  return jnp.where(overflow[:, None, None, None], jnp.nan, out)


def document_runs(segment_ids, max_documents):
  """Each row's documents as runs of equal segment ids (padding is a run too, as in 'xla'):
  lengths [B, M] and start offsets [B, M + 1], -1 past the last run, and whether a row has
  more than M = max_documents runs."""
  rows, length = segment_ids.shape
  starts = jnp.concatenate([jnp.ones((rows, 1), bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  run = jnp.cumsum(starts, axis=1) - 1  # [B, T]: each token's run index.
  count = run[:, -1] + 1
  row = jnp.arange(rows)[:, None]
  slot = jnp.where(run < max_documents, run, max_documents)  # Overflowing runs: a dropped slot.
  lengths = jnp.zeros((rows, max_documents + 1), jnp.int32).at[row, slot].add(1)
  position = jnp.broadcast_to(jnp.arange(length), (rows, length))
  offsets = jnp.full((rows, max_documents + 1), length, jnp.int32).at[row, slot].min(position)
  used = jnp.arange(max_documents + 1)[None] < count[:, None]
  lengths = jnp.where(used, lengths, -1)[:, :max_documents]
  offsets = jnp.where(used, offsets, -1)
  return lengths, offsets, count > max_documents


PAD_SEGMENT = -1  # Segment id of positions added to reach a whole block: no real token's.


def splash(q, k, v, segment_ids, causal, cfg):
  """JAX's Pallas splash-attention kernel for TPU: scores live in VMEM one block at a time, and
  whole blocks outside the causal triangle are skipped. Off TPU it runs in Pallas interpret
  mode (slow; for tests of the same kernel).

  Grouped-query heads go to the kernel as they are: its multi-head variant indexes key/value
  head h // (N / K) itself and sums their gradients over the group; repeating k and v N / K
  times before the kernel would cost that many times their memory and bandwidth.
  Under a mesh it runs in shard_map, each device on its own rows and heads; a sharded sequence
  splits the queries, and every device sees all keys and values (gathered by the compiler).
  Lengths that no block divides are padded to one with a segment of their own.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  platform, _ = target()
  if platform == 'gpu':
    raise ConfigError("model.attention='splash' is a TPU kernel; use 'cudnn' or 'xla' on GPU")
  mesh = jax.sharding.get_abstract_mesh()
  q_spec = _spec(mesh, q.shape, ('batch', 'length', 'heads', 'kv'))
  kv_spec = _spec(mesh, k.shape, ('batch', 'length', 'kv_heads', 'kv'))
  if q_spec[2] != kv_spec[2] or q_spec[1] != kv_spec[1]:
    raise ConfigError(f'splash attention needs queries and keys/values sharded alike, got mesh '
                      f'axes {q_spec} and {kv_spec}: change mesh.rules (heads, kv_heads)')
  seq_shards, head_shards = _ways(mesh, q_spec[1]), _ways(mesh, q_spec[2])
  length = q.shape[1]
  sizes = block_sizes(cfg, -(-length // seq_shards), length)
  padded = _round_up(length, math.lcm(sizes.block_q * seq_shards, sizes.block_kv))
  if segment_ids is None and padded != length:
    segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
  if padded != length:
    pad = lambda x, value=0: jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2),
                                     constant_values=value)
    q, k, v, segment_ids = pad(q), pad(k), pad(v), pad(segment_ids, PAD_SEGMENT)
  # A causal mask differs between query shards, so the kernel splits it (q_seq_shards); a full
  # one is the same for each, and is built for one shard's rows (the kernel's splitting fails
  # on a mask without partial blocks in jax 0.10.2).
  if causal:
    mask, mask_shards = sa.CausalMask((padded, padded)), seq_shards
  else:
    mask, mask_shards = sa.FullMask((padded // seq_shards, padded)), 1
  kernel = sa.make_splash_mha(sa.MultiHeadMask([mask] * q.shape[2]), block_sizes=sizes,
                              head_shards=head_shards, q_seq_shards=mask_shards,
                              interpret=platform != 'tpu')
  scale = 1 / math.sqrt(q.shape[-1])  # The kernel does not scale the scores itself.

  def run(kernel, q, k, v, *segments):
    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    ids = sa.SegmentIds(*segments) if segments else None
    out = jax.vmap(kernel)(heads_first(q * scale), heads_first(k), heads_first(v),
                           segment_ids=ids)
    return heads_first(out)

  segments = () if segment_ids is None else (segment_ids, segment_ids)
  if mesh.empty:
    out = run(kernel, q, k, v, *segments)
  else:
    P = jax.sharding.PartitionSpec
    batch, seq, heads = q_spec[:3]
    kernel_spec = kernel.manual_sharding_spec(
        jax.sharding.NamedSharding(mesh, P(heads, seq if causal else None)))
    kv = P(batch, None, heads, None)
    segment_specs = () if segment_ids is None else (P(batch, seq), P(batch, None))
    out = jax.shard_map(run, mesh=mesh,
                        in_specs=(kernel_spec, P(*q_spec), kv, kv, *segment_specs),
                        out_specs=P(*q_spec), check_vma=False)(kernel, q, k, v, *segments)
  return out[:, :length]


def block_sizes(cfg, q_length, kv_length):
  """Splash tiles: 512 (MaxText's default on v5p/v6e) or the length rounded up to a multiple of
  128 when shorter, for queries and keys alike and for the backward kernels;
  model.splash_block_q / model.splash_block_kv override (multiples of 128)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  for field in ('splash_block_q', 'splash_block_kv'):
    if cfg[field] % 128:
      raise ConfigError(f'model.{field}={cfg[field]} must be a multiple of 128 (or 0 = auto)')
  block_q = cfg.splash_block_q or min(512, _round_up(q_length, 128))
  block_kv = cfg.splash_block_kv or min(512, _round_up(kv_length, 128))
  return sa.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                       block_q_dkv=block_q, block_kv_dkv=block_kv,
                       block_kv_dkv_compute=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)


def _spec(mesh, shape, logical_axes):
  """The mesh axes of each dimension, as the rule table gives them; a dimension they do not
  divide (the one-row batch that initialisation traces) stays whole."""
  if mesh.empty:
    return (None,) * len(logical_axes)
  spec = nn.logical_to_mesh_axes(logical_axes)
  return tuple(None if size % _ways(mesh, entry) else entry for size, entry in zip(shape, spec))


def _ways(mesh, entry):
  axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
  return math.prod(mesh.shape[a] for a in axes)


def _round_up(n, multiple):
  return -(-n // multiple) * multiple
