"""Orbax checkpoints of the train state under <workdir>/checkpoints/<step>/.

Saves are asynchronous: the state is copied off the devices and training continues while the
files are written. Restoring takes the target shardings from the *current* mesh, so a
checkpoint written on one mesh loads onto another.

The data position needs no item of its own: batch s is a pure function of (seed, s), so the
restored step is the data iterator's state, and the dropout keys derive from (seed, step).
"""

import jax
import orbax.checkpoint as ocp

from jaxlm import workdir as workdir_lib


class Checkpointer:

  def __init__(self, workdir, config):
    options = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, create=True,
                                           enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(workdir_lib.checkpoint_dir(workdir), options=options,
                                         item_names=('state',))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state):
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))

  def restore(self, step, abstract_state, shardings):
    """The state saved at `step`, laid out by `shardings` (which may be a different mesh's)."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, shardings)
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return restored['state']

  def restore_params(self, step, abstract_params, shardings):
    """Only the parameters saved at `step` (no optimizer state is read)."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params, shardings)
    restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={'params': target}, restore_args={'params': restore_args}, partial_restore=True)))
    return restored['state']['params']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
