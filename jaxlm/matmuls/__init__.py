"""The matrix multiplication of every Dense layer (model.matmul), by name.

Each kind is a function with `jax.lax.dot_general`'s signature, `(lhs, rhs, dimension_numbers,
precision=None, preferred_element_type=None)`, where `lhs` is the activations and `rhs` the
kernel: a quantised (int8) or fp8 matmul is a module with one such function plus one line
here. Names map to 'module:function' so this file imports nothing heavy: config validation
(no jax) takes the allowed names from REGISTRY.
"""

import importlib

REGISTRY = {
    'default': 'jax.lax:dot_general',
}


def get(name):
  """The function `name` (a REGISTRY key) stands for."""
  module, function = REGISTRY[name].split(':')
  return getattr(importlib.import_module(module), function)
