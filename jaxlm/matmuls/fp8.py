"""fp8 matmuls (model.matmul='fp8' or 'fp8_delayed'), in the XLA pattern that the GPU
compiler turns into cuBLASLt fp8 GEMMs on H100/H200 (flax.linen.fp8_ops' direct form).

Forward: both operands scaled into float8_e4m3fn (max 448), multiplied as f8 x f8 with the
result in the compute dtype, then multiplied by the two scales. Backward: the incoming
gradient scaled into float8_e5m2 (max 57344: gradients need range more than precision) and
multiplied with the forward pass's e4m3 operands, e5m2 x e4m3, for both gradients. Each
tensor has one scale (per-tensor scaling, what the fp8 GEMMs take).

The scales: 'fp8' takes each tensor's absolute maximum in this step (current scaling, as
torchtitan's default); 'fp8_delayed' takes the largest of the last HISTORY steps' maxima
(delayed scaling, as Transformer Engine's and Flax's Fp8DotGeneralOp), which the quantisation
need not wait for. That history is model state: each layer's `DelayedScaling` child keeps it
in the OVERWRITE_WITH_GRADIENT collection (TrainState.extra), and since the gradient's maximum
is known only in the backward pass, the new history comes back as the history's "gradient"
(flax.linen.fp8_ops' convention), which the train step writes back (steps.py). A history of
zeros (a fresh run) falls back to current scaling for the operands it has not seen.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import fp8_ops

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
# The collection whose "gradient" is its new value (model.UPDATED_BY_GRADIENT).
OVERWRITE_WITH_GRADIENT = fp8_ops.OVERWRITE_WITH_GRADIENT
HISTORY = 16  # Steps of amax history (torchao's default; Transformer Engine's is 1024).


def _amax(x):
  return jnp.max(jnp.abs(x)).astype(jnp.float32)


def _scale(amax, history, dtype):
  """Scale (float32 scalar) mapping [-amax, amax] onto `dtype`'s range: amax from the history
  when it has one, else the current one; 1 for an all-zero or non-finite maximum."""
  if history is not None:
    past = jnp.max(jax.lax.convert_element_type(history, jnp.float32))
    amax = jnp.where(past > 0, past, amax)
  scale = amax / jnp.finfo(dtype).max.astype(jnp.float32)
  return jnp.where((amax > 0) & jnp.isfinite(amax), scale, 1.0)


def _quantize(x, dtype, scale):
  limit = jnp.finfo(dtype).max.astype(x.dtype)
  return jnp.clip(x / scale.astype(x.dtype), -limit, limit).astype(dtype)


def _updated(history, amax):
  """The history with this step's maximum first, in the history's own dtype."""
  as_float = jax.lax.convert_element_type(history, jnp.float32)
  return jax.lax.convert_element_type(jnp.roll(as_float, 1).at[0].set(amax), history.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dot(lhs, rhs, histories, dimension_numbers):
  """lhs . rhs in fp8. histories: the amax histories of (lhs, rhs, gradient), each [HISTORY],
  or None for current scaling."""
  return _forward(lhs, rhs, histories, dimension_numbers)[0]


def _forward(lhs, rhs, histories, dimension_numbers):
  histories = histories or (None,) * 3
  amaxes = _amax(lhs), _amax(rhs)
  scales = [_scale(a, h, E4M3) for a, h in zip(amaxes, histories)]
  q_lhs, q_rhs = _quantize(lhs, E4M3, scales[0]), _quantize(rhs, E4M3, scales[1])
  out = jax.lax.dot_general(q_lhs, q_rhs, dimension_numbers, preferred_element_type=lhs.dtype)
  out = out * (scales[0] * scales[1]).astype(lhs.dtype)
  return out, (q_lhs, q_rhs, *scales, histories, *amaxes)


def _backward(dimension_numbers, residuals, g):
  q_lhs, q_rhs, lhs_scale, rhs_scale, histories, lhs_amax, rhs_amax = residuals
  dtype, g_amax = g.dtype, _amax(g)
  g_scale = _scale(g_amax, histories[2], E5M2)
  q_g = _quantize(g, E5M2, g_scale)
  d_lhs = fp8_ops.dot_general_transpose_lhs(
      q_g, q_lhs, q_rhs, dimension_numbers=dimension_numbers, precision=None,
      preferred_element_type=dtype) * (g_scale * rhs_scale).astype(dtype)
  d_rhs = fp8_ops.dot_general_transpose_rhs(
      q_g, q_lhs, q_rhs, dimension_numbers=dimension_numbers, precision=None,
      preferred_element_type=dtype) * (g_scale * lhs_scale).astype(dtype)
  new = None
  if histories[0] is not None:
    new = tuple(_updated(h, a) for h, a in zip(histories, (lhs_amax, rhs_amax, g_amax)))
  return d_lhs, d_rhs, new


_dot.defvjp(_forward, _backward)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """fp8 with current scaling: each tensor's scale from its own maximum in this step."""
  del precision
  out = _dot(lhs, rhs, None, dimension_numbers)
  return out if preferred_element_type is None else out.astype(preferred_element_type)


dot_general.precision = 'fp8: e4m3 operands, e5m2 gradients, current scaling'
dot_general.eight_bit_passes = 3


class DelayedScaling(nn.Module):
  """fp8 with delayed scaling: scales from the maxima of the last HISTORY steps."""
  precision = 'fp8: e4m3 operands, e5m2 gradients, delayed scaling'
  eight_bit_passes = 3

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    histories = tuple(
        self.variable(OVERWRITE_WITH_GRADIENT, f'{operand}_amax_history', jnp.zeros, (HISTORY,),
                      jnp.float32).value for operand in ('lhs', 'rhs', 'grad'))
    out = _dot(lhs, rhs, histories, dimension_numbers)
    return out if preferred_element_type is None else out.astype(preferred_element_type)


@functools.cache
def fast_path(device):
  """fp8 GEMMs: NVIDIA GPUs of compute capability 8.9 and up (Ada, Hopper, Blackwell)."""
  kind, platform = getattr(device, 'device_kind', ''), device.platform
  if platform == 'gpu':
    capability = getattr(device, 'compute_capability', '0')
    if tuple(int(p) for p in str(capability).split('.')[:2]) >= (8, 9):
      return None
    return f'{kind} (compute capability {capability}) has no fp8 tensor cores: fp8 is emulated'
  if platform == 'tpu':
    if kind.startswith('TPU7'):
      return None
    return (f'{kind} has no fp8 matmul unit: fp8 is emulated, slower than bf16; '
            f'model.matmul=int8 is the fast 8-bit path on TPU')
  return f'{platform}: fp8 matmuls are emulated (for their numerics), not faster'
