"""The matrix multiplication of every layer of the model (model.matmul), by name.

A kind is a function with `jax.lax.dot_general`'s signature, `(lhs, rhs, dimension_numbers,
precision=None, preferred_element_type=None)`, where `lhs` is the activations and `rhs` the
kernel; or, for a kind with state (fp8's delayed scaling keeps a history of each operand's
absolute maximum), a Flax module class whose instances are such a function: each layer makes
one as its child, and its variables are model state (TrainState.extra). A kind may say what
it does through two attributes: `precision` (a phrase for the log and `jaxlm plan`) and
`eight_bit_passes` (how many of a matmul's three passes - forward, input gradient, weight
gradient - run in 8 bits), and its module may define `fast_path(device)`: None where the
device runs the kind natively, else the one line saying it does not.

Names map to 'module:function' so this file imports nothing heavy: config validation (no jax)
takes the allowed names from REGISTRY.
"""

import importlib

REGISTRY = {
    'default': 'jax.lax:dot_general',
    # Symmetric int8 operands in the forward pass (Qwix); backward in the compute dtype, or
    # with the gradients in int8 too.
    'int8': 'jaxlm.matmuls.int8:dot_general',
    'int8_grads': 'jaxlm.matmuls.int8:dot_general_int8_grads',
    # e4m3 forward operands, e5m2 gradients; scales from this step's values (current scaling)
    # or from a history of earlier steps' (delayed scaling: model state).
    'fp8': 'jaxlm.matmuls.fp8:dot_general',
    'fp8_delayed': 'jaxlm.matmuls.fp8:DelayedScaling',
}

# The model's matmuls, by layer (jaxlm/model: the Dense layers' names, and 'output' for the
# output layer: the token projection, tied or not, or a classifier's head). model.matmul_keep
# names those that stay in the compute dtype.
LAYERS = ('query', 'key', 'value', 'out', 'wi', 'wi_gate', 'wo', 'head_dense', 'pooler',
          'output')


def get(name):
  """The function (or module class) `name` (a REGISTRY key) stands for."""
  module, function = REGISTRY[name].split(':')
  return getattr(importlib.import_module(module), function)


def kind_of(cfg, layer):
  """The kind `layer` runs: model.matmul, or 'default' where model.matmul_keep keeps it."""
  return 'default' if layer in cfg.matmul_keep else cfg.matmul


def precision(name, compute_dtype):
  """What kind `name` computes in, in words."""
  return getattr(get(name), 'precision', f'{compute_dtype} (the compute dtype)')


def eight_bit_passes(name):
  """How many of a matmul's three passes kind `name` runs in 8 bits (0-3)."""
  return getattr(get(name), 'eight_bit_passes', 0)


def fast_path(name, device):
  """None where `device` runs kind `name` natively, else one line saying it does not."""
  module = importlib.import_module(REGISTRY[name].split(':')[0])
  check = getattr(module, 'fast_path', None)
  return check(device) if check else None
