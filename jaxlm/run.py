"""The run builder: what every command builds from a config before it runs a step.

The objective, mesh, model, optimizer, abstract state and shardings (`setup`), the same on one
device for the commands that only read or run the model (`inference_setup`), and the one
ahead-of-time compile of a step from shapes (`compile_step`: the train step, the eval step).
Used by train, eval, plan, generate, fill-mask, convert and sweep; it never trains, restores
(jaxlm/resume.py) or evaluates (jaxlm/evaluate.py).
"""

import contextlib
import dataclasses
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import errors, flops, matmuls, objectives, optim, steps
from jaxlm import config as config_lib
from jaxlm import mesh as mesh_lib
from jaxlm.schema import MESH_AXES
from jaxlm import model as model_lib
from jaxlm.model import context
from jaxlm import state as state_lib

log = logging.getLogger('jaxlm')


@dataclasses.dataclass
class Setup:
  """Everything a run builds before its first step, in the order it is built."""
  config: object
  objective: object  # The run's objective (objectives.base.Objective), built here once.
  mesh: object
  rules: tuple
  model: object
  tx: object
  lr_schedule: object
  abstract: object  # The state's shapes with logical axis names (boxed).
  shardings: object  # The state's NamedShardings.
  batch_sharding: dict  # {feature: NamedSharding}

  @property
  def abstract_state(self):
    return state_lib.strip_boxes(self.abstract)

  @contextlib.contextmanager
  def active(self):
    """The mesh and rule table that tracing the model needs (for its sharding constraints)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield


def setup(config, devices=None):
  """Builds the objective, mesh, model, optimizer and the state's shardings (nothing is
  allocated). The objective first completes the config (a classifier's labels: the model's
  size) and checks it.

  Every parameter dimension must split evenly over the mesh axes the rules give it, so a
  mesh that does not fit the model fails here, before anything is compiled.
  """
  objective = objectives.get(config)
  objective.complete()
  objective.check()
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  mesh_lib.check_batch(config, mesh)
  check_context(config, mesh, objective)
  if config.model.remat_policy == 'offload' and mesh.devices.flat[0].platform == 'cpu':
    raise errors.ConfigError("model.remat_policy='offload' keeps activations in pinned host "
                             "memory, which needs a GPU or TPU; use 'minimal' on CPU")
  rules = mesh_lib.rules(config)
  model = model_lib.build(config.model, objective.causal, objective.num_labels)
  tx, lr_schedule = optim.optimizer(config, model)
  with nn.logical_axis_rules(rules):
    abstract = state_lib.abstract_state(model, tx, config)
    shardings = state_lib.state_shardings(abstract, mesh, rules)
  for name, shape, names, spec in state_lib.param_table(abstract, shardings):
    mesh_lib.check_divisible(f'parameter {name}', shape, spec, mesh, names)
  return Setup(config, objective, mesh, rules, model, tx, lr_schedule, abstract, shardings,
               state_lib.batch_shardings(mesh, rules, objective.features()))


def check_context(config, mesh, objective):
  """Context parallelism (model.context_parallel) fits the mesh, rules and objective."""
  context.check(config, mesh, mesh_lib.rules(config), objective.causal, objective.num_labels)


def inference_setup(config, batch_size=1, devices=None):
  """A setup on one device (default: the first local one) for the commands that only run or
  read the model (fill-mask, generate, convert). `config` itself is left unchanged."""
  config = config_lib.from_json(config_lib.to_json(config))
  config.batch_size = batch_size
  for axis in MESH_AXES:
    config.mesh[axis] = config.mesh[f'dcn_{axis}'] = 1
  config.model.context_parallel = 'none'  # Whole sequences on one device.
  return setup(config, devices or jax.local_devices()[:1])


def shapes(tree, shardings):
  """ShapeDtypeStructs with shardings of an abstract tree: what a step is compiled for."""
  return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                      tree, shardings)


def batch_shapes(s):
  """The shapes and shardings of an input batch of `s` (the objective's features, int32)."""
  shape = (s.config.batch_size, s.config.model.max_len)
  return {k: jax.ShapeDtypeStruct(shape[:len(axes)], jnp.int32, sharding=s.batch_sharding[k])
          for k, axes in s.objective.features().items()}


def compile_step(s, step, arguments, compiler_options=None, **jit_options):
  """`step` jit-compiled ahead of time for `arguments`, shapes with shardings (never arrays),
  under the mesh and rules of `s`: the one way jaxlm compiles a step, for training, evaluation
  and plan alike. Lowered from shapes alone, so it also compiles for meshes whose devices are
  not all real (a TPU topology). `compiler_options`: XLA's, e.g. plan.QUICK."""
  jitted = jax.jit(step, **jit_options)
  with s.active():
    return jitted.lower(*arguments).compile(compiler_options)


def compile_train_step(s, prepare, compiler_options=None):
  """The train step of `s` on batches its objective's `prepare` readies, its state donated."""
  step = steps.make_train_step(s.model, s.objective, s.tx, s.lr_schedule, s.config, prepare)
  return compile_step(s, step, (shapes(s.abstract_state, s.shardings), batch_shapes(s)),
                      compiler_options, in_shardings=(s.shardings, s.batch_sharding),
                      out_shardings=(s.shardings, None), donate_argnums=0)


def compile_eval_step(s, prepare, token_bytes=None, compiler_options=None):
  """The eval step of `s` (params, batch) -> summed statistics; with `token_bytes` (the
  tokenizer's byte table) also the bytes the targets stand for (bits per byte)."""
  step = steps.make_eval_step(s.model, s.objective, prepare, token_bytes)
  params = shapes(s.abstract_state.params, s.shardings.params)
  extra = shapes(s.abstract_state.extra, s.shardings.extra)
  return compile_step(s, step, (params, batch_shapes(s), extra), compiler_options,
                      in_shardings=(s.shardings.params, s.batch_sharding, s.shardings.extra))


def memory_per_device(compiled):
  """Bytes one device needs for a compiled step: arguments, outputs, temporaries and their
  total (donated arguments counted once); {} where the backend does not say."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  return {'arguments': m.argument_size_in_bytes, 'outputs': m.output_size_in_bytes,
          'temporaries': m.temp_size_in_bytes,
          'total': (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
                    m.alias_size_in_bytes)}


def matmul_lines(s):
  """Which matmuls run in which precision, the share of the step's FLOPs in 8 bits, and a line
  for each kind this device has no fast path for (the log's and `jaxlm plan`'s)."""
  groups, share = flops.matmul_precisions(s.config, s.objective.predictions())
  lines = [f'matmuls {", ".join(layers)}: {precision}' for layers, precision in groups]
  if share:
    lines.append(f'{100 * share:.1f}% of the step\'s model FLOPs (6N + 12LHQT) run in 8 bits; '
                 f'MFU is still counted against the bf16 peak')
  device = s.mesh.devices.flat[0]
  kinds = {matmuls.kind_of(s.config.model, layer) for layer in matmuls.LAYERS}
  lines += [note for kind in sorted(kinds) if (note := matmuls.fast_path(kind, device))]
  return lines
