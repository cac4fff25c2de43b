"""Transformer building blocks shared by every model family.

Each block reads its choices (norm, positions, MLP activation, ...) from the model config, so a
family is a row in `config.FAMILIES`, never a branch here. Parameters and large activations
carry logical axis names; `mesh.rules` maps them to devices.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxlm import matmuls, parametrization
from jaxlm import model as model_lib
from jaxlm.model import attention


def gelu_exact(x):
  return nn.gelu(x, approximate=False)


def activation(cfg):
  """The MLP's activation function, model.mlp_activation (model.ACTIVATIONS)."""
  return model_lib.get(model_lib.ACTIVATIONS, cfg.mlp_activation)


def dtype(name):
  return jnp.dtype(name)


def normal(std, axes):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


class Dense(nn.Module):
  """x[..., *in] @ kernel[*in, *out] (+ bias[*out]), the kernel named by logical axes.

  Flax's DenseGeneral initialises multi-dimensional kernels flat and reshapes them, which
  breaks their logical sharding annotations; this keeps the true shape from the start.
  """
  features: tuple
  kernel_axes: tuple
  std: float
  use_bias: bool
  dtype: str
  param_dtype: str
  matmul: str = 'default'  # The kind of matrix multiplication (jaxlm/matmuls).

  @nn.compact
  def __call__(self, x):
    num_in = len(self.kernel_axes) - len(self.features)
    shape = (*x.shape[-num_in:], *self.features)
    kernel = self.param('kernel', normal(self.std, self.kernel_axes), shape,
                        jnp.dtype(self.param_dtype))
    # One row dimension: XLA's CPU backend runs the backward pass of a dot over [batch,
    # length, ...] almost twice as slowly as over [batch * length, ...]. Not when the length
    # is sharded (sequence parallelism): merging it into the rows costs collectives.
    rows = x.shape[:-num_in]
    if len(rows) > 1 and not _sharded('length'):
      x = x.reshape(-1, *x.shape[-num_in:])
    contract = (tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in)))
    y = dot_general(self.matmul)(x.astype(self.dtype), kernel.astype(self.dtype),
                                 (contract, ((), ())))
    y = y.reshape(*rows, *self.features)
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          nn.initializers.zeros, self.kernel_axes[num_in:]), self.features,
                        jnp.dtype(self.param_dtype))
      y = y + bias.astype(self.dtype)
    return y


def _sharded(logical_axis):
  """Whether the rule table in effect splits `logical_axis` over more than one device."""
  axes = nn.logical_to_mesh_axes((logical_axis,))[0] or ()
  sizes = jax.sharding.get_abstract_mesh().shape
  return any(sizes.get(a, 1) > 1 for a in ((axes,) if isinstance(axes, str) else axes))


def dot_general(kind, name='matmul'):
  """The dot_general of matmul kind `kind` (jaxlm/matmuls): its function, or for a kind with
  state, an instance of its module made here, a child `name` of the calling module."""
  fn = matmuls.get(kind)
  return fn(name=name) if isinstance(fn, type) else fn


def dense(cfg, features, kernel_axes, name, std=None, bias=None, layer=None):
  """A Dense layer configured by the model config. `layer`: its name among matmuls.LAYERS
  (default: `name`), which model.matmul_keep may keep out of the matmul kind."""
  features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
  std = parametrization.get(cfg).init_std(cfg, kernel_axes, cfg.init_std if std is None else std)
  return Dense(features, kernel_axes, std,
               cfg.use_bias if bias is None else bias, cfg.dtype, cfg.param_dtype,
               matmuls.kind_of(cfg, layer or name), name=name)


def norm(cfg, name):
  kwargs = dict(epsilon=cfg.norm_eps, dtype=dtype(cfg.dtype), param_dtype=dtype(cfg.param_dtype),
                scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                name=name)
  if cfg.norm == 'layernorm':  # RMSNorm has no bias by definition.
    kwargs.update(use_bias=cfg.use_bias,
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))
  return model_lib.get(model_lib.NORMS, cfg.norm)(**kwargs)


def rope_frequencies(cfg):
  """The rotation frequency of each pair of a head's dimensions (float32 numpy, [H/2]).

  rope_type='llama3' (Llama 3.1+) stretches a model trained at rope_original_max_len to longer
  inputs: wavelengths longer than that length / rope_low_freq_factor turn rope_scaling_factor
  times slower, those shorter than length / rope_high_freq_factor stay, and the band between
  moves on a linear ramp. Computed in float64 once, at trace time.
  """
  half = cfg.head_dim // 2
  freq = cfg.rope_theta ** (-np.arange(half) / half)
  if cfg.rope_type == 'llama3':
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    ramp = np.clip((cfg.rope_original_max_len * freq / (2 * np.pi) - low) / (high - low), 0, 1)
    freq = (1 - ramp) * freq / cfg.rope_scaling_factor + ramp * freq
  return freq.astype(np.float32)


def rope(x, positions, freq):
  """Rotary position embedding (half-split layout, as in Llama/GPT-NeoX) of x: [B, T, N, H]."""
  angle = positions[:, :, None, None].astype(jnp.float32) * freq  # [B, T, 1, H/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nn.Module):
  """Multi-head attention with grouped-query key/value heads (num_kv_heads <= num_heads).

  decode=True keeps keys and values in a 'cache' collection of [batch, cache length, ...],
  written at each row's `positions`; a query sees the cache up to its own position. The cache
  length is that of the input the cache was created with (see generate.py). Otherwise the
  implementation `model.attention` names runs (attention.py), given segment ids, not a mask.
  """
  cfg: object
  causal: bool
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    cfg = self.cfg
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    q = dense(cfg, (cfg.num_heads, cfg.head_dim), ('embed', 'heads', 'kv'), 'query')(x)
    k = dense(cfg, (cfg.num_kv_heads, cfg.head_dim), ('embed', 'kv_heads', 'kv'), 'key')(x)
    v = dense(cfg, (cfg.num_kv_heads, cfg.head_dim), ('embed', 'kv_heads', 'kv'), 'value')(x)
    if cfg.position == 'rope':
      freq = rope_frequencies(cfg)
      q, k = rope(q, positions, freq), rope(k, positions, freq)
    scale = parametrization.get(cfg).query_multiplier(cfg)
    if scale != 1.0:  # muP's 1/head_dim attention: every kernel keeps its own 1/sqrt(head_dim).
      q = q * scale
    # Names that remat policies ('minimal', 'offload', see transformer.py) keep or offload.
    q = checkpoint_name(constrain(q, ('batch', 'length', 'heads', 'kv')), 'query_proj')
    k = checkpoint_name(constrain(k, ('batch', 'length', 'kv_heads', 'kv')), 'key_proj')
    v = checkpoint_name(constrain(v, ('batch', 'length', 'kv_heads', 'kv')), 'value_proj')
    if self.decode:
      k, v, mask = self.cached(k, v, positions)
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')
    else:
      out = attention.attend(q, k, v, segment_ids, self.causal, cfg)
    out = constrain(out, ('batch', 'length', 'heads', 'kv'))
    out = dense(cfg, cfg.emb_dim, ('heads', 'kv', 'embed'), 'out', std=out_std)(out)
    return checkpoint_name(out, 'out_proj')


  def cached(self, k, v, positions):
    """Writes k, v [B, T, ...] at each row's positions; returns the whole cache and the mask
    of what each query may see (positions up to its own: earlier tokens, never stale ones)."""
    key = self.variable('cache', 'cached_key', jnp.zeros, k.shape, k.dtype)
    value = self.variable('cache', 'cached_value', jnp.zeros, v.shape, v.dtype)
    write = jax.vmap(lambda c, new, p: jax.lax.dynamic_update_slice(c, new, (p, 0, 0)))
    # Sharded like the keys and values of training (rows, heads); whole along its length,
    # which grows one token at a time.
    axes = ('batch', None, 'kv_heads', 'kv')
    key.value = constrain(write(key.value, k, positions[:, 0]), axes)
    value.value = constrain(write(value.value, v, positions[:, 0]), axes)
    length = key.value.shape[1]
    mask = jnp.arange(length)[None, None, None, :] <= positions[:, None, :, None]
    return key.value, value.value, mask


class Mlp(nn.Module):
  """Feed-forward block: act(x W_in) W_out, or act(x W_gate) * (x W_in) W_out when gated."""
  cfg: object

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    act = activation(cfg)
    h = checkpoint_name(dense(cfg, cfg.mlp_dim, ('embed', 'mlp'), 'wi')(x), 'mlp_wi')
    if cfg.gated_mlp:
      gate = checkpoint_name(dense(cfg, cfg.mlp_dim, ('embed', 'mlp'), 'wi_gate')(x), 'mlp_gate')
      h = act(gate) * h
    else:
      h = act(h)
    h = constrain(h, ('batch', 'length', 'mlp'))
    return checkpoint_name(dense(cfg, cfg.emb_dim, ('mlp', 'embed'), 'wo', std=out_std)(h),
                           'mlp_wo')


class Block(nn.Module):
  """Attention and MLP residual branches. The (carry, None) signature lets nn.scan stack it.

  Pre-norm (GPT-2, Llama) normalises each branch's input; post-norm (BERT) normalises the sum.
  """
  cfg: object
  causal: bool
  deterministic: bool
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
    scale = parametrization.get(cfg).residual_multiplier(cfg)  # Depth scaling (CompleteP).

    def residual(x, branch, norm_name):
      scaled = (lambda h: scale * branch(h)) if scale != 1.0 else branch
      if cfg.norm_position == 'pre':
        return x + drop(scaled(norm(cfg, norm_name)(x)))
      return norm(cfg, norm_name)(x + drop(scaled(x)))

    x = residual(x, lambda h: Attention(cfg, self.causal, self.decode, name='attention')(
        h, positions, segment_ids),
                 'attention_norm')
    x = residual(x, Mlp(cfg, name='mlp'), 'mlp_norm')
    return constrain(x, ('batch', 'length', 'embed')), None
