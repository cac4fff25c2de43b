"""The run builder: what every command builds from a config before it runs a step.

Mesh, model, optimizer, abstract state and shardings (`setup`), the same on one device for the
commands that only read or run the model (`inference_setup`, `restore_for_inference`), the
ahead-of-time compiled train step, the starting state of a run (fresh, resumed, or initialised
from another run) and evaluation over held-out batches. Used by train, eval, plan, generate,
fill-mask, convert and sweep; it never trains.
"""

import contextlib
import dataclasses
import logging
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import checkpoint, data, errors, flops, objectives, optim, paths, phases, resume, steps
from jaxlm import config as config_lib
from jaxlm import mesh as mesh_lib
from jaxlm.schema import MESH_AXES
from jaxlm import model as model_lib
from jaxlm import state as state_lib
from jaxlm import workdir as workdir_lib

log = logging.getLogger('jaxlm')


@dataclasses.dataclass
class Setup:
  """Everything a run builds before its first step, in the order it is built."""
  config: object
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
  """Builds the mesh, model, optimizer and the state's shardings (nothing is allocated).

  Every parameter dimension must split evenly over the mesh axes the rules give it, so a
  mesh that does not fit the model fails here, before anything is compiled.
  """
  objectives.get(config).check()
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  mesh_lib.check_batch(config, mesh)
  if config.model.remat_policy == 'offload' and mesh.devices.flat[0].platform == 'cpu':
    raise errors.ConfigError("model.remat_policy='offload' keeps activations in pinned host "
                             "memory, which needs a GPU or TPU; use 'minimal' on CPU")
  rules = mesh_lib.rules(config)
  model = model_lib.build(config)
  tx, lr_schedule = optim.optimizer(config, model)
  with nn.logical_axis_rules(rules):
    abstract = state_lib.abstract_state(model, tx, config)
    shardings = state_lib.state_shardings(abstract, mesh, rules)
  for name, shape, names, spec in state_lib.param_table(abstract, shardings):
    mesh_lib.check_divisible(f'parameter {name}', shape, spec, mesh, names)
  return Setup(config, mesh, rules, model, tx, lr_schedule, abstract, shardings,
               state_lib.batch_shardings(mesh, rules, config))


def phase_config(config, length):
  """The run's config with rows of `length` tokens: what one length phase's steps and data are
  built from (jaxlm/phases.py). Its model is the run's (the longest phase's position table)."""
  config = config_lib.from_json(config_lib.to_json(config))
  config.data.phases, config.model.max_len = (), length
  return config_lib.validate(config)


@dataclasses.dataclass
class Phase:
  """What one length phase (the whole run when it has one) steps with."""
  index: int
  end: int  # The step count at which it ends.
  setup: Setup  # The run's model and state; the phase's config and batch shapes.
  prepare: object  # The objective (a masked LM's predictions per row follow the length).
  batches: object  # Train iterator over the corpus packed at the phase's length.
  eval_set: list
  train_step: object  # Compiled ahead of time for the phase's shapes.
  eval_step: object


class Phases:
  """The run's length phases, each built (data re-packed, steps compiled) when the run enters
  it; only the current one is held."""

  def __init__(self, s, corpus, workdir, token_bytes=None, process=(0, 1)):
    self.s, self.corpus, self.workdir = s, corpus, workdir
    self.token_bytes, self.process = token_bytes, process
    self.spans = phases.spans(s.config)
    self.configs = ([s.config] if len(self.spans) == 1 else
                    [phase_config(s.config, length) for *_, length in self.spans])
    for config in self.configs:  # A mesh that cannot split some phase's rows fails now.
      mesh_lib.check_batch(config, s.mesh)
    self.current = None

  def enter(self, step):
    """The phase that runs step `step` (from 0), its iterator positioned at that step."""
    index = phases.index_at(self.s.config, step)
    if self.current is not None and self.current.index == index:
      return self.current
    self.current = None  # Free the previous phase's iterator and executables first.
    config = self.configs[index]
    start, end, length = self.spans[index]
    if len(self.spans) > 1:
      log.info('length phase %d of %d: steps %d-%d on rows of %d tokens', index + 1,
               len(self.spans), start, end, length)
    corpus = (self.corpus if length == self.s.config.model.max_len else
              data.prepare(config, self.workdir))  # The cached token stream, re-packed.
    s = dataclasses.replace(self.s, config=config, batch_sharding=state_lib.batch_shardings(
        self.s.mesh, self.s.rules, config))
    prepare = objectives.build(config, corpus.tokenizer)
    batches = data.train_iterator(data.train_dataset(corpus.train, config, *self.process),
                                  config)
    batches.set_state({'next_index': step})  # Batch s is element s: a function of the step.
    compile_start = time.perf_counter()
    train_step = compile_train_step(s, prepare)
    log.info('compiled the train step in %.1f s', time.perf_counter() - compile_start)
    log_summary(s, train_step)
    eval_step = jax.jit(steps.make_eval_step(s.model, config, prepare, self.token_bytes),
                        in_shardings=(s.shardings.params, s.batch_sharding))
    self.current = Phase(index, end, s, prepare, batches,
                         data.eval_batches(corpus.validation, config, *self.process),
                         train_step, eval_step)
    return self.current

  def evaluate(self, params):
    """Held-out metrics at the current phase's length."""
    p = self.current
    return evaluate(p.eval_step, params, p.eval_set, p.setup.batch_sharding)


def inference_setup(config, batch_size=1, devices=None):
  """A setup on one device (default: the first local one) for the commands that only run or
  read the model (fill-mask, generate, convert). `config` itself is left unchanged."""
  config = config_lib.from_json(config_lib.to_json(config))
  config.batch_size = batch_size
  for axis in MESH_AXES:
    config.mesh[axis] = config.mesh[f'dcn_{axis}'] = 1
  return setup(config, devices or jax.local_devices()[:1])


def restore_for_inference(config, workdir, step=None, batch_size=1):
  """(setup on one local device, the parameters of checkpoint `step` (default: the latest),
  that step), for the commands that only run the model (fill-mask, generate)."""
  s = inference_setup(config, batch_size)
  return (s, *restore_params(s, workdir, step))


def restore_params(s, workdir, step=None, host=False):
  """(the parameters of the workdir's checkpoint `step`, default the latest, in the shardings
  of `s` - or as host numpy arrays, read a batch of leaves at a time, if `host`; that step)."""
  directory = workdir_lib.checkpoint_dir(workdir)
  if not paths.isdir(directory):
    raise errors.ConfigError(f'--workdir={workdir} has no checkpoint; train first')
  # Read-only: a run still training in `workdir` keeps its in-progress save.
  checkpoints = checkpoint.Checkpointer(directory, read_only=True)
  try:
    saved = checkpoints.all_steps()
    if not saved:
      raise errors.ConfigError(f'--workdir={workdir} has no checkpoint; train first')
    if step is not None and step not in saved:
      raise errors.ConfigError(f'--step={step}: --workdir={workdir} has checkpoints of steps '
                               f'{", ".join(map(str, saved))}')
    for candidate in ([step] if step is not None else reversed(saved)):
      params = resume.read_good_params(s, checkpoints, candidate, host,
                                       explicit=step is not None)
      if params is not None:
        return params, candidate
    raise errors.RunError(f'--workdir={workdir} has no usable checkpoint (see the warnings '
                          f'above); nothing was changed')
  finally:
    checkpoints.close()


def compile_train_step(s, prepare, compiler_options=None):
  """The train step of objective `prepare`, jit-compiled ahead of time for the state and batch
  shardings of `s`. Lowered from shapes alone, so it also plans meshes whose devices are not
  all real. `compiler_options`: XLA's, e.g. plan.QUICK.
  """
  step = jax.jit(steps.make_train_step(s.model, s.tx, s.lr_schedule, s.config, prepare),
                 in_shardings=(s.shardings, s.batch_sharding),
                 out_shardings=(s.shardings, None), donate_argnums=0)
  state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                       s.abstract_state, s.shardings)
  shape = (s.config.batch_size, s.config.model.max_len)
  batch = {k: jax.ShapeDtypeStruct(shape[:len(axes)], jnp.int32, sharding=s.batch_sharding[k])
           for k, axes in state_lib.batch_features(s.config).items()}
  with s.active():
    return step.lower(state, batch).compile(compiler_options)


def memory_per_device(compiled):
  """Bytes one device needs for the compiled step: arguments, outputs and temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return {'arguments': m.argument_size_in_bytes, 'temporaries': m.temp_size_in_bytes,
          'total': (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
                    m.alias_size_in_bytes)}


def to_device(batch, shardings):
  return {k: mesh_lib.global_array(batch[k], sharding) for k, sharding in shardings.items()}


def evaluate(eval_step, params, batches, batch_sharding):
  """Loss, perplexity and accuracy (of the objective's targets: next tokens, masked tokens or
  labels) over a fixed list of held-out batches."""
  totals = None
  for batch in batches:
    stats = eval_step(params, to_device(batch, batch_sharding))
    totals = stats if totals is None else jax.tree.map(jnp.add, totals, stats)
  totals = jax.device_get(totals)  # One host sync for the whole evaluation.
  weight = max(float(totals['weight']), 1.0)
  loss = float(totals['loss_sum']) / weight
  row = {'eval_loss': loss, 'eval_perplexity': float(np.exp(min(loss, 80.0))),
         'eval_accuracy': float(totals['correct']) / weight}
  if float(totals.get('bytes', 0)) > 0:  # Nats per target -> bits per byte of their text.
    row['eval_bits_per_byte'] = float(totals['loss_sum']) / np.log(2) / float(totals['bytes'])
  return row


def log_summary(s, compiled):
  m = s.config.model
  counts = flops.param_counts(m)
  log.info('mesh %s', mesh_lib.describe(s.mesh))
  log.info('parameters: %s total, %s in matmuls, %s embeddings', f'{counts["total"]:,}',
           f'{counts["matmul"]:,}', f'{counts["embedding"]:,}')
  log.info('FLOPs per token: %.4g (6N + 12LHQT), %.4g causal-halved; %.4g per step',
           flops.of_run(s.config), flops.of_run(s.config, causal_halved=True),
           flops.of_run(s.config) * s.config.batch_size * m.max_len)
  log.info('%-36s %-18s %-34s %s', 'parameter', 'shape', 'logical axes', 'mesh axes')
  for name, shape, names, spec in state_lib.param_table(s.abstract, s.shardings):
    log.info('%-36s %-18s %-34s %s', name, shape, names, tuple(spec))
  log.info('train state: %.1f MiB per device', state_lib.bytes_per_device(
      s.abstract_state, s.shardings) / 2 ** 20)
  memory = memory_per_device(compiled)
  if memory is not None:
    log.info('compiled step: %.1f MiB per device (arguments %.1f, temporaries %.1f)',
             memory['total'] / 2 ** 20, memory['arguments'] / 2 ** 20,
             memory['temporaries'] / 2 ** 20)


def init_source(s):
  """(Checkpointer, step) that `init_from` names, checked against the model; or None."""
  if not s.config.init_from:
    return None
  source, step = checkpoint.find(s.config.init_from)
  saved = source.saved_config(step)
  if saved is not None:
    objectives.get(s.config).check_init_from(objectives.get(saved), s.config.init_from)
  source.check_params(step, s.abstract_state.params, model_lib.CLASSIFIER_PARAMS)
  return source, step


def initial_state(s, checkpoints, batches, source):
  """(state, step): the newest readable checkpoint, or a fresh state (`source`'s parameters)."""
  state, step = checkpoints.restore_latest(s.abstract_state, s.shardings, batches)
  if state is not None:
    log.info('resumed from the checkpoint of step %d', step)
    return state, step
  state = state_lib.initialize(s.model, s.tx, s.config, s.shardings)
  imported = checkpoints.parameters_only_step()
  if imported is not None:  # A converted checkpoint (jaxlm convert): parameters, no optimizer.
    source = checkpoints, imported
  if source is not None:
    checkpointer, source_step = source
    log.info('initialising the parameters from %s/%d', checkpointer.directory, source_step)
    restored = checkpointer.restore_params(source_step, s.abstract_state.params,
                                           s.shardings.params, model_lib.CLASSIFIER_PARAMS)
    fresh = sorted(set(state.params) - set(restored))
    if fresh:
      log.info('new parameters (not in the checkpoint): %s', ', '.join(fresh))
    state = state.replace(params={**state.params, **restored})
  return state, imported or 0

