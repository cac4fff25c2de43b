"""Context parallelism: one sequence's attention split over the mesh's `sequence` axis.

At 128k tokens one sequence's activations do not fit a chip whatever the batch, so every
activation is cut along its length over `mesh.sequence` devices (the rule table's `length ->
sequence`: embeddings, norms, MLPs and the loss need nothing else). Attention is the one layer
whose queries need every other shard's keys and values; `model.context_parallel` says how they
meet:

- 'none': jaxlm does nothing special; the compiler gathers what attention needs (keys and
  values of the whole sequence on every shard, and with 'xla' a [T/c, T] score matrix).
- 'allgather': the keys and values of the whole sequence are all-gathered once per layer
  (O(T) memory for them), and each shard's queries visit them block by block; their
  gradients go back around the ring.
- 'ring': key/value blocks travel around the axis with `ppermute`, one neighbour's block per
  step, the next block's transfer running while this block computes: O(T / c) memory.

Both compute one (query chunk, key chunk) block at a time with the block form of the configured
kernel (BLOCKS: the Pallas splash kernel on TPU, XLA's dot products elsewhere; cuDNN has none
yet): each block gives a partial softmax (normalised output and log-sum-exp) that is merged
into the running one. The backward pass walks the same blocks (a custom VJP): with the global
log-sum-exp each block's gradient is exact, and dK, dV travel with K, V back to their owner.
A block that the causal mask or the packed rows' document mask leaves empty is skipped
(`lax.cond`, per device): with documents shorter than a shard most blocks are.

Load balancing (model.context_parallel_load_balance; causal models): with contiguous shards
the last shard's queries see the whole sequence and the first's only themselves, so the ring
waits for the last. Cut into 2c chunks, shard i holds chunks i and 2c-1-i ("zigzag", MaxText's
and Megatron's layout) and every shard does the same work at every step. The batch is put in
that order before the model sees it (`balance`): tokens, positions, segment ids, targets and
weights move together, so every per-token computation is the same and the loss, a sum over
tokens, is unchanged. A bidirectional model (masked LM) has even work already: no reordering.
"""

import dataclasses
import functools
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlm.errors import ConfigError
from jaxlm.model import attention

log = logging.getLogger('jaxlm')

# A block's kind for a (query chunk, key chunk) pair: nothing to see, all of it, or the causal
# triangle (the same chunk).
SKIP, FULL, CAUSAL = 0, 1, 2
# A masked score: what splash uses, so a row with nothing to see has a finite log-sum-exp far
# below any real one, and merges with weight 0.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def shards():
  """How many devices the rule table in effect cuts a sequence into (the mesh's sequence
  axis, 1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return attention._ways(mesh, nn.logical_to_mesh_axes(('length',))[0])


def balanced(cfg, causal):
  """Whether sequences are laid out in zigzag order (only a causal mask is uneven)."""
  return cfg.context_parallel != 'none' and cfg.context_parallel_load_balance and causal


def chunks_per_shard(cfg, causal):
  return 2 if balanced(cfg, causal) else 1


def order(length, num_shards):
  """The zigzag layout: position p of the balanced sequence holds token order[p]. Chunks of
  length / (2 num_shards) tokens; shard i holds chunks i and 2 num_shards - 1 - i."""
  n = length // (2 * num_shards)
  chunk = lambda c: np.arange(c * n, (c + 1) * n)
  return np.concatenate([np.concatenate([chunk(i), chunk(2 * num_shards - 1 - i)])
                         for i in range(num_shards)])


def balance(batch, cfg, causal):
  """`batch` (prepared: targets and weights in place) in the order context parallelism lays
  sequences out over the mesh; itself when there is no load balancing to do."""
  num_shards = shards()
  if not balanced(cfg, causal) or num_shards == 1:
    return batch
  length = batch['tokens'].shape[1]
  new_order = order(length, num_shards)
  return {key: value[:, new_order] if value.shape[1:2] == (length,) else value
          for key, value in batch.items()}


def active(cfg):
  return cfg.context_parallel != 'none' and shards() > 1


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the block loop needs to know, fixed at trace time."""
  strategy: str  # 'allgather' or 'ring'
  kernel: str  # A BLOCKS key.
  axis: str  # The mesh axis the sequence is split over.
  shards: int
  chunks: int  # Chunks per shard: 2 with load balancing.
  causal: bool
  scale: float
  splash_blocks: object = None  # splash's BlockSizes for one chunk.
  interpret: bool = False  # Pallas interpret mode (splash off TPU).

  def chunk_ids(self, shard):
    """Sequence-order indices of the chunks `shard` holds (traced ints)."""
    if self.chunks == 1:
      return [shard]
    return [shard, 2 * self.shards - 1 - shard]

  def kind(self, a, b, own):
    """The kind of block (query chunk a, key/value chunk b) as far as the layout fixes it:
    on the device's own key/value shard (`own`) the causal triangles of the diagonal, the
    chunk 2c-1-i over chunk i, and nothing the other way; on another shard FULL (or
    nothing: `runs` says)."""
    if not self.causal or not own:
      return FULL
    return CAUSAL if a == b else FULL if a > b else SKIP

  def runs(self, q_chunk, kv_chunk, q_segments, kv_segments, own):
    """Whether a block has anything to compute (traced): its key chunk comes first in the
    sequence (causal), and some row shares a document between the chunks (segment ranges
    that do not meet hold no equal ids, whatever their order; padding, segment 0, is a
    document like the 'xla' kernel's)."""
    meet = jnp.any((q_segments.min(1) <= kv_segments.max(1)) &
                   (kv_segments.min(1) <= q_segments.max(1)))
    if self.causal and not own:
      meet &= q_chunk > kv_chunk
    return meet


def attend(q, k, v, segment_ids, causal, cfg, kernel):
  """Attention of sequence-sharded q [B, T, N, H] over k, v [B, T, K, H] by the strategy
  `cfg.context_parallel`, with the block form of `kernel` (a BLOCKS key)."""
  mesh = jax.sharding.get_abstract_mesh()
  q_spec = attention._spec(mesh, q.shape, ('batch', 'length', 'heads', 'kv'))
  kv_spec = attention._spec(mesh, k.shape, ('batch', 'length', 'kv_heads', 'kv'))
  if q_spec[2] != kv_spec[2]:
    raise ConfigError(f'model.context_parallel needs query and key/value heads split alike, got '
                      f'mesh axes {q_spec[2]} and {kv_spec[2]}: model.num_kv_heads must divide '
                      f'over the tensor axis (or change mesh.rules)')
  axis = q_spec[1] if isinstance(q_spec[1], str) else q_spec[1][0]
  num_shards, chunks = shards(), chunks_per_shard(cfg, causal)
  if kernel not in BLOCKS:
    raise ConfigError(f'model.attention={kernel!r} has no block form for model.context_parallel='
                      f'{cfg.context_parallel!r}; use one of {", ".join(BLOCKS)}')
  chunk = q.shape[1] // (num_shards * chunks)
  platform, _ = attention.target()
  plan = Plan(cfg.context_parallel, kernel, axis, num_shards, chunks, causal,
              1 / math.sqrt(q.shape[-1]),
              splash_block_sizes(cfg, chunk) if kernel == 'splash' else None,
              interpret=platform != 'tpu')
  _log_plan(plan.strategy, kernel, num_shards, chunks == 2)
  if segment_ids is None:
    segment_ids = jnp.ones(q.shape[:2], jnp.int32)
  P = jax.sharding.PartitionSpec
  return jax.shard_map(functools.partial(_attention, plan), mesh=mesh,
                       in_specs=(P(*q_spec), P(*kv_spec), P(*kv_spec), P(q_spec[0], q_spec[1])),
                       out_specs=P(*q_spec), check_vma=False)(q, k, v, segment_ids)


@functools.cache
def _log_plan(strategy, kernel, num_shards, balanced_):
  log.info('context parallelism: %s over %d sequence shards, %s blocks%s', strategy, num_shards,
           kernel, ', load-balanced (zigzag)' if balanced_ else '')


# ---- the block loop (per device, inside shard_map)

def _split(x, chunks, axis=1):
  return jnp.split(x, chunks, axis=axis) if chunks > 1 else [x]


def _rotate(plan, tree):
  """Each device's blocks to the next device along the axis (device i then holds the blocks
  that device i - 1 held)."""
  pairs = [(d, (d + 1) % plan.shards) for d in range(plan.shards)]
  return jax.tree.map(lambda x: lax.ppermute(x, plan.axis, pairs), tree)


def _visit_blocks(plan, shard, kv, segments, visit, carry, home=lambda x: x):
  """Calls `visit(local, travelling, j, kv_j, segments_j, own) -> (local, travelling)` for the
  c key/value shards j: first the device's own (j = shard), then at step s shard - s mod c,
  which the ring brings from the neighbour (the next one in flight while this one computes)
  and allgather takes from the gathered blocks. `kv` holds keys and values side by side (one
  transfer); the segment ids, 4 bytes a token, are all-gathered.

  `carry` is (local, travelling): the device's own state, and state that belongs to the
  key/value block being visited (its gradients). That travels around the ring in both
  strategies: what a device adds to block j goes to the neighbour, which visits j next and
  adds its part once both are there (so the transfer overlaps the compute too), and after c
  hops it is home with j's owner, as `home` makes it (the gradients in the compute dtype: half
  the bytes of the last hop)."""
  c = plan.shards
  local, travelling = carry
  ring = plan.strategy == 'ring'
  gathered = None if ring else lax.all_gather(kv, plan.axis)
  all_segments = lax.all_gather(segments, plan.axis)
  zeros = jax.tree.map(jnp.zeros_like, travelling)

  def step(local, mine, held, s, fetch=True):
    j = (shard - s) % c
    incoming = _rotate(plan, held) if ring and fetch else held
    passed = _rotate(plan, mine)
    local, part = visit(local, zeros, j, held if ring else gathered[j], all_segments[j], False)
    return local, jax.tree.map(jnp.add, passed, part), incoming

  held = _rotate(plan, kv) if ring else kv  # In flight while the device's own block computes.
  local, mine = visit(local, travelling, shard, kv, segments, True)
  (local, mine, held), _ = lax.scan(lambda state, s: (step(*state, s), None),
                                    (local, mine, held), jnp.arange(1, c - 1))
  local, mine, _ = step(local, mine, held, c - 1, fetch=False)  # The last: none to fetch.
  return local, _rotate(plan, home(mine))


def _merge(acc, block):
  """Two partial softmax results (output [B, n, N, H], log-sum-exp [B, N, n]) as one."""
  (o1, lse1), (o2, lse2) = acc, block
  lse = jnp.logaddexp(lse1, lse2)
  weight = lambda l: jnp.where(lse == -jnp.inf, 0.0, jnp.exp(l - lse)).transpose(0, 2, 1)
  return o1 * weight(lse1)[..., None] + o2 * weight(lse2)[..., None], lse


def _blocks(plan, own, q_ids, kv_ids, q_segments, kv_segments):
  """(a, b, kind, whether it runs) of the blocks a step may compute."""
  for a in range(plan.chunks):
    for b in range(plan.chunks):
      kind = plan.kind(a, b, own)
      if kind != SKIP:
        yield a, b, kind, plan.runs(q_ids[a], kv_ids[b], q_segments[a], kv_segments[b], own)


def _forward(plan, q, k, v, segments):
  shard = lax.axis_index(plan.axis)
  blocks = BLOCKS[plan.kernel](plan)
  split = lambda x: _split(x, plan.chunks)
  qs, q_segments = split(q), split(segments)
  q_ids = plan.chunk_ids(shard)

  def visit(acc, travelling, j, kv, kv_segments, own):
    (ks, vs), kv_segments = _keys_values(kv, split), split(kv_segments)
    acc = list(acc)
    for a, b, kind, runs in _blocks(plan, own, q_ids, plan.chunk_ids(j), q_segments,
                                    kv_segments):
      compute = lambda acc, *xs, kind=kind: _merge(acc, blocks.forward(kind, *xs))
      acc[a] = lax.cond(runs, compute, lambda acc, *_: acc, acc[a], qs[a], ks[b], vs[b],
                        q_segments[a], kv_segments[b])
    return tuple(acc), travelling

  B, _, N, _ = q.shape
  empty = tuple((jnp.zeros(x.shape, jnp.float32), jnp.full((B, N, x.shape[1]), -jnp.inf))
                for x in qs)
  acc, _ = _visit_blocks(plan, shard, jnp.concatenate([k, v], axis=2), segments, visit,
                         (empty, ()))
  return (jnp.concatenate([o for o, _ in acc], axis=1).astype(q.dtype),
          jnp.concatenate([lse for _, lse in acc], axis=2))


def _backward(plan, res, do):
  q, k, v, segments, o, lse = res
  shard = lax.axis_index(plan.axis)
  blocks = BLOCKS[plan.kernel](plan)
  split = lambda x, axis=1: _split(x, plan.chunks, axis)
  qs, q_segments, os_, dos, lses = split(q), split(segments), split(o), split(do), split(lse, 2)
  q_ids = plan.chunk_ids(shard)

  def visit(dqs, dkv, j, kv, kv_segments, own):
    (ks, vs), kv_segments = _keys_values(kv, split), split(kv_segments)
    dks, dvs = _keys_values(dkv, split)
    dqs = list(dqs)
    for a, b, kind, runs in _blocks(plan, own, q_ids, plan.chunk_ids(j), q_segments,
                                    kv_segments):
      compute = lambda acc, *xs, kind=kind: jax.tree.map(jnp.add, acc,
                                                         blocks.backward(kind, *xs))
      dqs[a], dks[b], dvs[b] = lax.cond(
          runs, compute, lambda acc, *_: acc, (dqs[a], dks[b], dvs[b]), qs[a], ks[b], vs[b],
          q_segments[a], kv_segments[b], os_[a], lses[a], dos[a])
    return tuple(dqs), jnp.concatenate([jnp.concatenate(x, axis=1) for x in (dks, dvs)], axis=2)

  kv = jnp.concatenate([k, v], axis=2)
  dqs, dkv = _visit_blocks(plan, shard, kv, segments, visit,
                           (tuple(jnp.zeros(x.shape, jnp.float32) for x in qs),
                            jnp.zeros(kv.shape, jnp.float32)),
                           home=lambda dkv: dkv.astype(k.dtype))
  dk, dv = jnp.split(dkv, 2, axis=2)
  return jnp.concatenate(dqs, axis=1).astype(q.dtype), dk, dv, None


def _keys_values(kv, split):
  """Keys and values (side by side on the heads axis), each cut into its chunks."""
  return tuple(split(x) for x in jnp.split(kv, 2, axis=2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan, q, k, v, segments):
  return _forward(plan, q, k, v, segments)[0]


def _attention_fwd(plan, q, k, v, segments):
  o, lse = _forward(plan, q, k, v, segments)
  return o, (q, k, v, segments, o, lse)


_attention.defvjp(_attention_fwd, _backward)


# ---- block kernels: forward (normalised output, log-sum-exp) and backward given the
# global output and log-sum-exp. q [B, n, N, H], k and v [B, n, K, H], segments [B, n].

class XlaBlocks:
  """Plain dot products in float32 (CPU, GPU): the [B, N, n, n] scores of one block exist."""

  def __init__(self, plan):
    self.scale = plan.scale

  def scores(self, kind, q, k, q_segments, kv_segments):
    B, n, N, H = q.shape
    K = k.shape[2]
    s = jnp.einsum('bqkgh,bskh->bkgqs', q.reshape(B, n, K, N // K, H), k,
                   preferred_element_type=jnp.float32) * self.scale
    mask = (q_segments[:, :, None] == kv_segments[:, None, :])[:, None, None]
    if kind == CAUSAL:
      mask &= jnp.tril(jnp.ones((n, k.shape[1]), bool))
    return jnp.where(mask, s, MASK_VALUE)

  def forward(self, kind, q, k, v, q_segments, kv_segments):
    B, n, N, H = q.shape
    s = self.scores(kind, q, k, q_segments, kv_segments)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum('bkgqs,bskh->bqkgh', p / total, v.astype(jnp.float32))
    return o.reshape(B, n, N, H), (m + jnp.log(total))[..., 0].reshape(B, N, n)

  def backward(self, kind, q, k, v, q_segments, kv_segments, o, lse, do):
    B, n, N, H = q.shape
    K = k.shape[2]
    group = lambda x: x.astype(jnp.float32).reshape(B, n, K, N // K, H)
    p = jnp.exp(self.scores(kind, q, k, q_segments, kv_segments)
                - lse.reshape(B, K, N // K, n)[..., None])
    do_, o_ = group(do), group(o)
    dv = jnp.einsum('bkgqs,bqkgh->bskh', p, do_)
    dp = jnp.einsum('bqkgh,bskh->bkgqs', do_, v.astype(jnp.float32))
    delta = jnp.sum(do_ * o_, axis=-1).transpose(0, 2, 3, 1)[..., None]  # [B, K, G, n, 1]
    ds = p * (dp - delta) * self.scale
    dq = jnp.einsum('bkgqs,bskh->bqkgh', ds, k.astype(jnp.float32)).reshape(B, n, N, H)
    dk = jnp.einsum('bkgqs,bqkgh->bskh', ds, group(q))
    return dq, dk, dv


class SplashBlocks:
  """The Pallas splash kernel on one block (TPU; interpret mode elsewhere): its forward with
  the log-sum-exp it saves for its own backward, and its backward kernels given the global
  output and log-sum-exp instead of the block's own (jax's splash module keeps that backward
  private: `_splash_attention_bwd`)."""

  def __init__(self, plan):
    self.plan = plan

  @functools.cached_property
  def _module(self):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel
    return splash_attention_kernel

  def kernel(self, kind, heads, n):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    mask = sa.CausalMask((n, n)) if kind == CAUSAL else sa.FullMask((n, n))
    return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads),
                              block_sizes=self.plan.splash_blocks, head_shards=1,
                              q_seq_shards=1, save_residuals=True, interpret=self.plan.interpret)

  @staticmethod
  def heads_first(x):
    return x.transpose(0, 2, 1, 3)

  def forward(self, kind, q, k, v, q_segments, kv_segments):
    sa, hf = self._module, self.heads_first
    kernel = self.kernel(kind, q.shape[2], q.shape[1])
    out, (lse,) = jax.vmap(kernel)(hf(q * self.plan.scale), hf(k), hf(v),
                                   segment_ids=sa.SegmentIds(q_segments, kv_segments))
    return hf(out).astype(jnp.float32), lse

  def backward(self, kind, q, k, v, q_segments, kv_segments, o, lse, do):
    sa, hf = self._module, self.heads_first
    kernel = self.kernel(kind, q.shape[2], q.shape[1])
    args = kernel.kwargs

    def one_row(q, k, v, q_segments, kv_segments, o, lse, do):
      residuals = (q, k, v, sa.SegmentIds(q_segments, kv_segments), None, o, lse,
                   kernel.dq_mask_info, kernel.dkv_mask_info)
      grads = sa._splash_attention_bwd(
          save_residuals=False, mask_value=args['mask_value'], is_mqa=args['is_mqa'],
          block_sizes=args['block_sizes'], residual_checkpoint_name=None,
          mask_function=args['mask_function'],
          attn_logits_soft_cap=args['attn_logits_soft_cap'], interpret=args['interpret'],
          res=residuals, do=do)
      return grads[3:6]

    dq, dk, dv = jax.vmap(one_row)(hf(q * self.plan.scale), hf(k), hf(v), q_segments,
                                   kv_segments, hf(o.astype(q.dtype)), lse, hf(do))
    return (hf(dq).astype(jnp.float32) * self.plan.scale, hf(dk).astype(jnp.float32),
            hf(dv).astype(jnp.float32))


# model.attention -> its block form. cuDNN's would need its fused backward fed the global
# log-sum-exp, and its packed-document offsets per block: not built yet.
BLOCKS = {'xla': XlaBlocks, 'splash': SplashBlocks}


def splash_block_sizes(cfg, chunk):
  """Splash tiles for one chunk: model.splash_block_q/kv, else the largest of 512, 256, 128
  that divides the chunk."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  auto = next((b for b in (512, 256, 128) if chunk % b == 0), 128)
  block_q, block_kv = cfg.splash_block_q or auto, cfg.splash_block_kv or auto
  return sa.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                       block_q_dkv=block_q, block_kv_dkv=block_kv,
                       block_kv_dkv_compute=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)


def check(config, mesh, rules, causal, num_labels=0):
  """One-line ConfigErrors for a context-parallel config that this mesh cannot run."""
  m = config.model
  if m.context_parallel == 'none':
    return
  field = f'model.context_parallel={m.context_parallel!r}'
  axes = nn.logical_to_mesh_axes(('length',), rules)[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  split = [a for a in axes if mesh.shape[a] > 1]
  if not split:
    raise ConfigError(f'{field} splits each sequence over the mesh\'s sequence axis, which has '
                      f'1 device: set mesh.sequence > 1, or model.context_parallel=\'none\'')
  if len(split) > 1:
    raise ConfigError(f'{field} needs the length on one mesh axis; mesh.rules puts it on '
                      f'{split}')
  if num_labels:
    raise ConfigError(f'{field} is for pretraining long sequences; a classifier fine-tunes '
                      f'with model.context_parallel=\'none\'')
  device = mesh.devices.flat[0]
  kernel = attention.choose(m, device.platform, device.device_kind)
  if kernel not in BLOCKS:
    raise ConfigError(f'{field}: model.attention={m.attention!r} runs {kernel!r} here, which '
                      f'has no context-parallel block form; set model.attention to one of '
                      f'{", ".join(BLOCKS)}')
  c, chunks = mesh.shape[split[0]], chunks_per_shard(m, causal)
  pieces = (f'2 x mesh.sequence = {2 * c} (load balancing: two chunks per device; '
            f'model.context_parallel_load_balance)' if chunks == 2 else f'mesh.sequence = {c}')
  if m.max_len % (chunks * c):
    raise ConfigError(f'model.max_len={m.max_len} must be a multiple of {pieces} for {field}')
  chunk = m.max_len // (chunks * c)
  if kernel == 'splash':
    if chunk % 128:
      raise ConfigError(f'model.max_len={m.max_len} / {pieces} = {chunk} tokens per chunk: '
                        f'splash needs a multiple of 128 for {field}')
    for name in ('splash_block_q', 'splash_block_kv'):
      if m[name] and chunk % m[name]:
        raise ConfigError(f'model.{name}={m[name]} must divide the {chunk}-token chunks of '
                          f'{field}')
