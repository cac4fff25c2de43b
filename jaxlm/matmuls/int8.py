"""int8 matmuls (model.matmul='int8' or 'int8_grads'), through Qwix, MaxText's quantization
library.

Forward: both operands quantised to symmetric int8 on the fly, with a scale per row of the
activations (per token) and per output channel of the kernel, from their absolute maxima;
the product accumulates in int32 (an s8 x s8 -> s32 dot, which the MXUs of TPU v5e, v5p and
v6e run at twice their bf16 rate) and is rescaled to the compute dtype.
Backward: 'int8' computes both gradients in the compute dtype from the unquantised operands
(the straight-through estimator: AQT's and Qwix's default for training); 'int8_grads'
quantises the incoming gradient per channel as well and reuses the forward pass's int8
operands, so all three passes run in int8.

Qwix's quantised-training dot_general (what its QtProvider calls for each matmul it
intercepts) is used directly: every matmul of the model already comes through here, so there
is nothing to intercept.
"""

import functools

from qwix._src.core import dot_general_qt

_FORWARD = dot_general_qt.DotGeneralQtConfig(
    lhs_qtype='int8', rhs_qtype='int8', use_original_residuals=True)
_ALL_PASSES = dot_general_qt.DotGeneralQtConfig(
    lhs_qtype='int8', rhs_qtype='int8', dlhs_grad_qtype='int8', drhs_grad_qtype='int8')


def _make(config, precision, passes):
  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    del precision  # Quantised operands have one precision.
    out = dot_general_qt.dot_general_qt(lhs, rhs, dimension_numbers, config)
    return out if preferred_element_type is None else out.astype(preferred_element_type)

  dot_general.precision, dot_general.eight_bit_passes = precision, passes
  return dot_general


dot_general = _make(_FORWARD, 'int8 forward (int32 accumulation), backward in the compute '
                    'dtype', 1)
dot_general_int8_grads = _make(_ALL_PASSES, 'int8 forward and gradients (int32 accumulation)',
                               3)


@functools.cache
def fast_path(device):
  """TPU v5e, v5p and v6e run int8 at twice their bf16 rate; elsewhere it only emulates."""
  kind, platform = getattr(device, 'device_kind', ''), device.platform
  if platform == 'tpu':
    if any(kind.startswith(k) for k in ('TPU v5', 'TPU v6', 'TPU7')):
      return None
    return f'{kind} has no int8 rate above its bf16 one: int8 matmuls save memory, not time'
  if platform == 'gpu':
    return (f'{kind}: int8 matmuls run through XLA\'s int8 GEMM where it has one; the fast '
            f'8-bit path on NVIDIA GPUs is model.matmul=fp8')
  return f'{platform}: int8 matmuls are emulated (for their numerics), not faster'
