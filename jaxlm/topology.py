"""Cloud TPU slices without the chips: accelerator types -> compile-only devices.

With the libtpu wheel installed, jax can describe the devices of any TPU slice on a machine
that has none (`jax.experimental.topologies`); a step lowered over a mesh of them compiles with
the real TPU compiler, so its memory figure is the TPU's own, not a CPU's estimate.
"""

import dataclasses
import importlib.util
import math
import os
import re

from jaxlm.errors import ConfigError

GiB = 2 ** 30
INSTALL = ("pip install -e '.[tpu]' in a jaxlm checkout (or pip install 'jax[tpu]' for your jax "
           "version)")


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str  # jax's topology-name prefix.
  cores_per_chip: int  # TensorCores that the accelerator type's number counts per chip.
  dims: int  # Torus (3) or 2D mesh (2).
  hbm_bytes: int  # HBM per chip, from Google's data sheets.
  megacore: bool  # Both TensorCores drive one jax device (v4, v5p).


CHIPS = {
    'v4': Chip('v4', 2, 3, 32 * GiB, True),
    'v5p': Chip('v5p', 2, 3, 95 * GiB, True),
    'v5e': Chip('v5e', 1, 2, 16 * GiB, False),
    'v6e': Chip('v6e', 1, 2, 32 * GiB, False),
}
ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6lite': 'v6e'}


@dataclasses.dataclass(frozen=True)
class Slice:
  accelerator_type: str  # As gcloud spells it, e.g. 'v5p-128'.
  chip: Chip
  shape: tuple  # Chips along each torus/mesh dimension.

  @property
  def chips(self):
    return math.prod(self.shape)

  @property
  def topology_name(self):
    return f'{self.chip.generation}:{"x".join(map(str, self.shape))}'


def default_shape(chips, dims):
  """The shape Cloud TPU gives a slice of `chips` chips when none is asked for: from 2x2(x1),
  the smallest dimension doubles (the last of equals), e.g. v5p 64 chips -> 4x4x4, 128 ->
  4x4x8; v5e/v6e 16 -> 4x4, 32 -> 4x8."""
  if chips == 1:
    return (1,) * dims
  shape = [2, 2] + [1] * (dims - 2)
  while math.prod(shape) < chips:
    smallest = min(shape)
    shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
  if math.prod(shape) != chips:
    return None
  return tuple(shape)


MAX_CHIPS = 16384


def parse(accelerator_type):
  """The Slice of a Cloud TPU accelerator type ('v4-32', 'v5litepod-16', 'v5p-128', ...)."""
  known = ', '.join(f'{g}-N' for g in CHIPS) + ', v5litepod-N'
  match = re.fullmatch(r'(v\d+[a-z]*)-(\d+)', accelerator_type.strip().lower())
  generation = match and ALIASES.get(match.group(1), match.group(1))
  if not match or generation not in CHIPS:
    raise ConfigError(f'--topology={accelerator_type!r} is not a Cloud TPU accelerator type '
                      f'this plan knows; use one of {known} (e.g. v5p-128)')
  chip, count = CHIPS[generation], int(match.group(2))
  chips, cores_left = divmod(count, chip.cores_per_chip)
  # The largest slices are 8960 chips (v5p); a compile-only device each costs host memory.
  shape = (default_shape(chips, chip.dims) if chips and not cores_left and chips <= MAX_CHIPS
           else None)
  if shape is None:
    unit = 'TensorCores (2 per chip)' if chip.cores_per_chip == 2 else 'chips'
    raise ConfigError(f'--topology={accelerator_type}: {count} {unit} is not a slice size of '
                      f'{generation}; use a power of two of at most {MAX_CHIPS} chips (e.g. '
                      f'{generation}-{8 * chip.cores_per_chip})')
  return Slice(accelerator_type, chip, shape)


def libtpu_installed():
  return (importlib.util.find_spec('libtpu') is not None
          or bool(os.environ.get('TPU_LIBRARY_PATH')))


def devices(slice_, num_slices=1):
  """The compile-only devices of `num_slices` such slices (slice_index tells them apart)."""
  if not libtpu_installed():
    raise ConfigError(f'--topology compiles with the TPU compiler of the libtpu wheel, which is '
                      f'not installed: {INSTALL}')
  if num_slices < 1:
    raise ConfigError(f'--num_slices={num_slices} must be at least 1')
  # Compiling needs no chip: never take libtpu's one-process-per-machine lock, so plans run
  # side by side (and next to a training run on a TPU VM).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  _quiet_libtpu(slice_)
  from jax.experimental import topologies
  shape = slice_.shape + (1,) * (3 - len(slice_.shape))
  # Cloud TPU hosts hold 2x2 chips (v5e/v6e slices of up to 8 chips: one host, all of them).
  per_host = shape if slice_.chips <= (4 if slice_.chip.dims == 3 else 8) else (2, 2, 1)
  kwargs = dict(chip_config_name='megacore' if slice_.chip.megacore else 'default',
                chips_per_host_bounds=per_host, num_slices=num_slices)
  if slice_.chip.dims == 3:  # Full cubes of 4 chips a side have wrap-around links.
    kwargs['wrap'] = (all(s % 4 == 0 for s in shape),) * 3
  return list(topologies.get_topology_desc(topology_name=slice_.topology_name, platform='tpu',
                                           **kwargs).devices)


def _quiet_libtpu(slice_):
  """Off a TPU VM, libtpu finds no TPU metadata when it loads and says so on stderr ("could
  not determine TPU accelerator type", an INVALID_ARGUMENT about TPU_WORKER_HOSTNAMES and a
  source trace): harmless for a compile-only plan, and alarming. Giving it the values it looks
  for (the planned type, one local worker) silences them; on a machine with TPU chips, the
  real ones are left alone."""
  try:
    from jax._src import hardware_utils  # No public API says whether TPU chips are present.
    if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
      return
  except (ImportError, AttributeError):
    return
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', slice_.accelerator_type)
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_WORKER_ID', '0')
