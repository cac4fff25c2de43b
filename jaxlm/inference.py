"""A trained model on the run's own mesh, for the commands that run it: generate and the
lm-eval-harness adapter (harness.py).

The parameters are restored in their training shardings (FSDP, tensor parallelism), so a
model too large for one device runs on the devices it trained on, and the key/value cache is
sharded like the activations (layers.Attention). Every process holds the same inputs (the
prompts or scoring requests, which each process reads alike) and places its own devices'
part of them (`put`), and every process gets the whole output back (`gather`): all processes
of a multi-host job run the same batches in lockstep.
"""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import mesh as mesh_lib
from jaxlm import resume


@dataclasses.dataclass
class Model:
  setup: object  # run.Setup: mesh, rules, model, shardings.
  params: object  # In the setup's parameter shardings.
  step: int = 0  # The checkpoint's.
  extra: dict = dataclasses.field(default_factory=dict)  # TrainState.extra (fp8 amax histories).

  def splits(self, axis):
    """How many devices a dimension of logical `axis` splits over."""
    spec = nn.logical_to_mesh_axes((axis,), self.setup.rules)
    return mesh_lib.ways(self.setup.mesh, spec[0])

  @property
  def rows(self):
    """A batch's rows must be a multiple of this (the devices its batch axis splits over)."""
    return self.splits('batch')

  def sharding(self, axes):
    return mesh_lib.sharding(self.setup.mesh, self.setup.rules, axes)

  def put(self, array, axes):
    """A global array from the host array `array`, which every process holds whole."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, self.sharding(axes),
                                        lambda index: array[index])

  def padded_rows(self, n):
    return -(-n // self.rows) * self.rows


def load(s, workdir, step=None):
  """The run's model on the mesh of `s` (run.setup: its own mesh, over the devices given) with
  the parameters of checkpoint `step` (default: the latest)."""
  params, step = resume.restore_params(s, workdir, step)
  return Model(s, params, step, resume.restore_extra(s, workdir, step))


def gather(x):
  """A global array as one numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
