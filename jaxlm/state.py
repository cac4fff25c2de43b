"""The train state and its creation directly in its sharding.

The state is built from shapes first (`jax.eval_shape`): the parameters' logical axis names
give every leaf a mesh sharding, and the real initialisation is jit-compiled with those output
shardings, so no device ever holds the whole model.
"""

import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxlm import mesh as mesh_lib
from jaxlm.model import AUX_LOSS


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # Number of optimizer updates applied so far.
  params: Any
  opt_state: Any
  # The model's other variable collections (e.g. an fp8 matmul's scales), checkpointed with
  # the parameters; none today. Checkpoints written before it existed restore with it empty.
  extra: Any = flax.struct.field(default_factory=dict)


def _is_box(x):
  return isinstance(x, nn.LogicallyPartitioned)


def strip_boxes(tree):
  """The values inside logical-axis boxes (unlike nn.unbox, adds no sharding constraint)."""
  return jax.tree.map(lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box)


def init_inputs(config, batch=1):
  """Placeholder inputs that fix the model's shapes at initialisation."""
  tokens = jnp.zeros((batch, config.model.max_len), jnp.int32)
  return tokens, jnp.zeros_like(tokens), jnp.ones_like(tokens)


def boxed_state(model, tx, config, rng):
  """A fresh state whose parameters (and optimizer moments) carry logical axis names."""
  tokens, positions, segments = init_inputs(config)
  variables = dict(model.init({'params': rng}, tokens, positions, segments))
  params = variables.pop('params')
  variables.pop(AUX_LOSS, None)  # Outputs of a step, not state.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    extra=variables)


def abstract_state(model, tx, config):
  """Shapes and logical axis names of the state, without allocating it."""
  rng = jax.random.key(config.seed)
  return jax.eval_shape(lambda r: boxed_state(model, tx, config, r), rng)


def initial_extra(model, tx, config, shardings):
  """The model's other variables (TrainState.extra) as a fresh state has them, in their
  shardings (the parameters' initialisation is computed and dropped by the compiler)."""
  init = jax.jit(lambda r: nn.unbox(boxed_state(model, tx, config, r)).extra,
                 out_shardings=shardings.extra)
  return init(jax.random.key(config.seed))


def state_shardings(abstract, mesh, rules):
  """A tree of NamedShardings matching the (unboxed) state."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)


def initialize(model, tx, config, shardings):
  """A fresh state, each leaf created directly on the devices its sharding names."""
  init = jax.jit(lambda r: nn.unbox(boxed_state(model, tx, config, r)), out_shardings=shardings)
  return init(jax.random.key(config.seed))


def batch_shardings(mesh, rules, features):
  """{feature: NamedSharding} of a batch whose features have these logical axes (the
  objective's, objectives.base.Objective.features): the rule table shards batch rows (and
  sequence positions)."""
  return {k: mesh_lib.sharding(mesh, rules, axes) for k, axes in features.items()}


def param_table(abstract, shardings):
  """Rows (path, shape, logical axes, mesh spec) for every parameter, for the start-up log."""
  boxed = jax.tree_util.tree_flatten_with_path(abstract.params, is_leaf=_is_box)[0]
  specs = jax.tree.leaves(shardings.params)
  rows = []
  for (path, leaf), sharding in zip(boxed, specs):
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    names = getattr(leaf, 'names', ())
    rows.append((name, tuple(strip_boxes(leaf).shape), names, sharding.spec))
  return rows


def bytes_per_device(abstract_state, shardings):
  """Bytes of the (unboxed) state that the most loaded device holds."""
  def shard_bytes(a, sharding):
    return math.prod(sharding.shard_shape(a.shape)) * a.dtype.itemsize
  return sum(jax.tree.leaves(jax.tree.map(shard_bytes, abstract_state, shardings)))


def param_axes(model, config):
  """The logical axis names of every parameter (a tree of tuples, like the parameters): what
  a parametrization reads each parameter's role from (jaxlm/parametrization.py)."""
  tokens, positions, segments = init_inputs(config)
  boxed = jax.eval_shape(
      lambda: model.init({'params': jax.random.key(0)}, tokens, positions, segments)['params'])
  return jax.tree.map(lambda box: tuple(box.names), boxed, is_leaf=_is_box)
