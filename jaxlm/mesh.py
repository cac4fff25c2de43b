"""The device mesh and the logical-axis rule table.

Model code names array dimensions with logical axes ('batch', 'embed', 'heads', ...). The rule
table in `config.mesh.rules` maps those names to the mesh axes below, so the same model runs
data-parallel, FSDP, tensor-parallel or any mix by changing the config only.

Each mesh axis has an in-slice size (`mesh.<axis>`, over the fast interconnect: ICI on a TPU
slice, NVLink within a GPU node) and a cross-slice size (`mesh.dcn_<axis>`, over the data-centre
network between TPU slices or GPU nodes). The mesh axis is their product. Put data parallelism
on DCN and keep tensor parallelism inside a slice.
"""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding

from jaxlm.schema import MESH_AXES as AXES  # Outermost first: see schema.MESH_AXES.
from jaxlm.errors import ConfigError


def _fill(sizes, total, what):
  """Resolves one -1 in `sizes` so that their product is `total`."""
  sizes = dict(sizes)
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ConfigError(f'only one {what} axis may be -1, got {", ".join(fill)}')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if total % fixed:
      raise ConfigError(f'{what} axes {_describe(sizes)} need a multiple of {fixed} devices, '
                        f'but there are {total}')
    sizes[fill[0]] = total // fixed
  if math.prod(sizes.values()) != total:
    raise ConfigError(f'{what} axes {_describe(sizes)} make {math.prod(sizes.values())} '
                      f'devices, but there are {total}; make the product match or use -1')
  return sizes


def _describe(sizes):
  return 'x'.join(f'{a}={s}' for a, s in sizes.items())


def num_slices(devices):
  """TPU slices (devices carry slice_index); elsewhere every device is in one 'slice'."""
  return len({getattr(d, 'slice_index', 0) for d in devices})


def mesh_shape(mesh_config, num_devices, slices=1):
  """(in-slice sizes, cross-slice sizes) per axis, with -1 resolved and products checked."""
  dcn = {a: mesh_config[f'dcn_{a}'] for a in AXES}
  if slices == 1 and all(s in (1, -1) for s in dcn.values()):
    dcn = {a: 1 for a in AXES}
  dcn = _fill(dcn, slices, 'mesh.dcn_*')
  if num_devices % slices:
    raise ConfigError(f'{num_devices} devices do not split into {slices} equal slices')
  ici = _fill({a: mesh_config[a] for a in AXES}, num_devices // slices, 'mesh.*')
  return ici, dcn


def make_mesh(mesh_config, devices=None):
  """The Mesh for the configured axes over `devices` (default: all of them)."""
  devices = jax.devices() if devices is None else list(devices)
  dcn_requested = math.prod(abs(mesh_config[f'dcn_{a}']) for a in AXES) > 1
  slices = num_slices(devices)
  # Outside TPU slices, the cross-slice unit is the process (one GPU node, say).
  by_process = slices == 1 and dcn_requested
  if by_process:
    slices = len({d.process_index for d in devices})
  ici, dcn = mesh_shape(mesh_config, len(devices), slices)
  ici_shape, dcn_shape = [ici[a] for a in AXES], [dcn[a] for a in AXES]
  if slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                process_is_granule=by_process)
  else:
    # Orders devices by the physical topology (TPU torus, NVLink islands) where it knows it.
    grid = mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
  # Auto axes: shardings come from the rule table via GSPMD, not from explicit axis types.
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def rules(config):
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.mesh.rules)


def sharding(mesh, rules_, logical_axes):
  """NamedSharding of an array whose dimensions carry these logical names."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_axes, rules_))


def ways(mesh, spec_entry):
  """How many shards a dimension is cut into by one PartitionSpec entry."""
  if spec_entry is None:
    return 1
  axes = spec_entry if isinstance(spec_entry, tuple) else (spec_entry,)
  return math.prod(mesh.shape[a] for a in axes)


def check_divisible(name, shape, spec, mesh, logical=None):
  """Every dimension must split evenly over the mesh axes it is sharded over."""
  for dim, (size, entry) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
    n = ways(mesh, entry)
    if size % n:
      label = f' ({logical[dim]})' if logical and logical[dim] else ''
      raise ConfigError(f'{name} dimension {dim}{label} of size {size} does not split over '
                        f'mesh axes {entry} of {n} devices; change the mesh or the model size')


def check_batch(config, mesh):
  """The micro-batch must split evenly over the devices that share out the batch dimension."""
  spec = nn.logical_to_mesh_axes(('batch', 'length'), rules(config))
  micro = config.batch_size // config.optimizer.grad_accum_steps
  if micro % ways(mesh, spec[0]):
    raise ConfigError(f'batch_size={config.batch_size} / optimizer.grad_accum_steps='
                      f'{config.optimizer.grad_accum_steps} = {micro} sequences do not split '
                      f'over the {ways(mesh, spec[0])} devices of mesh axes {spec[0]}')
  if config.model.max_len % ways(mesh, spec[1]):
    raise ConfigError(f'model.max_len={config.model.max_len} does not split over the '
                      f'{ways(mesh, spec[1])} devices of mesh axes {spec[1]}')
  if config.batch_size % jax.process_count():
    raise ConfigError(f'batch_size={config.batch_size} does not split over '
                      f'{jax.process_count()} processes')


def describe(mesh):
  return ' x '.join(f'{a}={mesh.shape[a]}' for a in AXES) + f' ({mesh.size} devices)'


def global_array(local, sharding_):
  """Assembles a global jax.Array from this process's contiguous rows of a global batch."""
  return jax.make_array_from_process_local_data(sharding_, np.asarray(local))


def to_device(batch, shardings):
  """This process's share of a batch {feature: rows} as global arrays, laid out by
  `shardings` {feature: NamedSharding}."""
  return {k: global_array(batch[k], sharding) for k, sharding in shardings.items()}
