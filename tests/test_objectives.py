"""Next-token loss: which positions count, and that the others cannot change the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from jaxlm import objectives
from jaxlm.objectives import base, causal


def batch_of(segments, loss_mask=None):
  segments = jnp.asarray(segments, jnp.int32)
  batch = {'tokens': jnp.arange(segments.size, dtype=jnp.int32).reshape(segments.shape) % 7,
           'segment_ids': segments}
  if loss_mask is not None:
    batch['loss_mask'] = jnp.asarray(loss_mask, jnp.int32)
  return batch


def test_targets_are_next_tokens_within_a_document_only():
  batch = batch_of([[1, 1, 1, 2, 2, 0, 0]])
  targets, weights = causal.causal_targets(batch)
  np.testing.assert_array_equal(targets[0, :6], batch['tokens'][0, 1:])
  # Position 2 ends document 1 and 4 ends document 2; padding and the row's end predict nothing.
  np.testing.assert_array_equal(weights[0], [1, 1, 0, 1, 0, 0, 0])


def test_loss_mask_removes_targets():
  batch = batch_of([[1, 1, 1, 1, 1]], loss_mask=[[1, 1, 0, 0, 1]])
  _, weights = causal.causal_targets(batch)
  np.testing.assert_array_equal(weights[0], [1, 0, 0, 1, 0])  # Targets 2 and 3 are masked out.


def test_masked_positions_cannot_change_the_loss():
  batch = batch_of([[1, 1, 1, 2, 2, 2, 0, 0]])
  logits = jax.random.normal(jax.random.key(0), (1, 8, 7))
  loss, stats = base.loss(logits, causal.prepare(batch))
  # Positions with weight 0 (document ends, padding) may predict anything.
  _, weights = causal.causal_targets(batch)
  noise = jnp.where(weights[..., None] == 0, 100 * jax.random.normal(jax.random.key(1), logits.shape), 0)
  loss2, _ = base.loss(logits + noise, causal.prepare(batch))
  assert float(loss) == pytest.approx(float(loss2), rel=1e-6)
  assert float(stats['weight']) == 4


def test_loss_is_the_summed_negative_log_likelihood():
  batch = batch_of([[1, 1, 1]])
  logits = jax.random.normal(jax.random.key(0), (1, 3, 7))
  loss, stats = base.loss(logits, causal.prepare(batch))
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  tokens = batch['tokens'][0]
  expected = -(log_probs[0, 0, tokens[1]] + log_probs[0, 1, tokens[2]])
  assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_z_loss_adds_the_squared_log_normaliser():
  batch = batch_of([[1, 1, 1]])
  logits = jax.random.normal(jax.random.key(0), (1, 3, 7)) + 3.0
  plain, _ = base.loss(logits, causal.prepare(batch))
  with_z, stats = base.loss(logits, causal.prepare(batch), z_loss=1e-2)
  log_z = jax.nn.logsumexp(logits[0, :2], axis=-1)
  assert float(with_z - plain) == pytest.approx(float(1e-2 * jnp.sum(log_z ** 2)), rel=1e-5)
  assert float(stats['z_loss_sum']) == pytest.approx(float(with_z - plain), rel=1e-5)



# ------------------------------------------------------------- chunked (fused) output layer


def _loss_and_grads(config):
  """The train loss (with z-loss) of a random batch and its gradient, through steps.model_loss."""
  import flax.linen as nn
  from jaxlm import model as model_lib, steps
  objective = objectives.get(config)
  model = model_lib.build(config.model, objective.causal)
  tokens = jax.random.randint(jax.random.key(3), (4, config.model.max_len), 7,
                              config.model.vocab_size)
  batch = {'tokens': tokens, 'segment_ids': jnp.ones_like(tokens),
           'positions': jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)}
  batch = objective.prepare()(batch, jax.random.key(4))
  params = nn.unbox(model.init(jax.random.key(0), tokens)['params'])
  loss = lambda p: steps.model_loss(model, objective, p, batch, z_loss=1e-4)
  (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return value, stats, grads


@pytest.mark.parametrize('family,objective', [('gpt2', 'causal'), ('llama', 'causal'),
                                              ('bert', 'masked')])
def test_chunked_output_layer_matches_the_plain_loss_and_gradients(family, objective):
  """Tied (gpt2) and untied (llama) output layers, and BERT's head transform and output bias."""
  plain = _loss_and_grads(tiny_config(model__family=family, objective=objective))
  chunked = _loss_and_grads(tiny_config(model__family=family, objective=objective,
                                        loss_chunk=16))
  np.testing.assert_allclose(chunked[0], plain[0], rtol=1e-5)
  for key in ('loss_sum', 'z_loss_sum', 'correct', 'weight'):
    np.testing.assert_allclose(chunked[1][key], plain[1][key], rtol=1e-5, err_msg=key)
  # Float32 sums in another order: compared relative to each gradient's largest entry.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5 * np.abs(b).max()),
               chunked[2], plain[2])


def test_chunked_output_layer_never_holds_the_whole_batchs_logits():
  """The compiled train step's temporaries shrink by most of the [B, T, vocab] float32 logits
  (and their gradient) when the loss runs over 32 positions at a time instead of 256."""
  from jaxlm import run as run_lib
  temporaries = {}
  for chunk in (0, 32):
    config = tiny_config(loss_chunk=chunk, model__vocab_size=32768, model__max_len=256,
                         batch_size=4, mesh__fsdp=1)
    s = run_lib.setup(config, jax.devices()[:1])
    compiled = run_lib.compile_train_step(s, s.objective.prepare())
    temporaries[chunk] = compiled.memory_analysis().temp_size_in_bytes
  logits_bytes = 4 * 256 * 32768 * 4
  assert temporaries[0] - temporaries[32] > logits_bytes, temporaries


# ------------------------------------------------------------- objectives as modules


import ast
import os
import textwrap

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'jaxlm')


# Names of what holds a built objective rather than a config: the run builder's Setup
# (`s.objective`), and hf.Layout.objective, the Hugging Face architecture's kind.
HOLDERS = ('s', 'setup', 'layout')


def _name(node):
  return node.id if isinstance(node, ast.Name) else getattr(node, 'attr', None)


def objective_branches(source, where):
  """Places in `source` that read a config's objective or compare against an objective's name:
  outside jaxlm/objectives/ both are branches the objective's module should answer."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if (isinstance(node, ast.Attribute) and node.attr == 'objective'
        and isinstance(node.ctx, ast.Load) and _name(node.value) not in HOLDERS):
      found.append(f'{where}:{node.lineno}: .objective')
    elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and (
        node.slice.value == 'objective'):
      found.append(f'{where}:{node.lineno}: [objective]')
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == 'get' and node.args and isinstance(node.args[0], ast.Constant)
          and node.args[0].value == 'objective'):
      found.append(f"{where}:{node.lineno}: .get('objective')")
    elif isinstance(node, ast.Compare) and any(
        isinstance(x, ast.Constant) and x.value in objectives.REGISTRY
        for x in (node.left, *node.comparators)):
      found.append(f'{where}:{node.lineno}: compares with an objective name')
  return found


def objective_makers(source, where):
  """Places in `source` that make an objective from a config (objectives.get)."""
  return [f'{where}:{node.lineno}' for node in ast.walk(ast.parse(source))
          if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == 'get' and _name(node.func.value) == 'objectives']


# The run builder makes a run's one objective and hands it down (run.setup: s.objective);
# besides it, only the commands above it make one: for another run's saved config (resume),
# to check which command trains a config and how `jaxlm tokenize` frames documents before
# anything is built (cli), and to count a planned run's FLOPs (sweep). Nothing below the
# builder (model, state, steps, data, flops, the loop) makes one.
MAKERS = {'run.py', 'resume.py', 'cli.py', 'sweep.py'}


def test_only_the_objectives_package_reads_or_branches_on_the_objective():
  found, makers = [], []
  for directory, _, files in os.walk(PACKAGE):
    if os.path.relpath(directory, PACKAGE).split(os.sep)[0] == 'objectives':
      continue
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        with open(path) as f:
          source = f.read()
        found += objective_branches(source, os.path.relpath(path, PACKAGE))
        makers += objective_makers(source, os.path.relpath(path, PACKAGE))
  assert not found, 'ask the objective (run.setup builds it: s.objective) instead:\n' + (
      '\n'.join(found))
  assert {m.split(':')[0] for m in makers} <= MAKERS, makers
  assert len([m for m in makers if m.startswith('run.py')]) == 1  # Built once, in setup.
  # And the scans do see what they forbid.
  assert len(objective_branches(textwrap.dedent("""
      if config.objective == 'masked': pass
      if saved.get('objective') != 'x': pass
      backbone = finetune['objective']
      print(s.objective, layout.objective)
      """), 'example')) == 4
  assert len(objective_makers('o = objectives.get(config).frame', 'example')) == 1


TOY = '''
"""A causal LM scored on the second half of each row only: one module, one registry line."""
from jaxlm.objectives import causal


def prepare(batch, rng=None):
  batch = causal.prepare(batch)
  half = batch['tokens'].shape[1] // 2
  return {**batch, 'weights': batch['weights'].at[:, :half].set(0)}


class Objective(causal.Objective):
  name = 'second_half'

  def prepare(self, tokenizer=None):
    return prepare
'''


TOY_KINDS = '''
"""A toy attention kernel and matmul kind: one module, and one registry line each."""
import jax
from jaxlm.model import attention

TRACED = set()


def attend(q, k, v, segment_ids, causal, cfg):
  TRACED.add('attention')
  return attention.xla(q, k, v, segment_ids, causal, cfg)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  TRACED.add('matmul')
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
'''


def test_a_new_objective_kernel_or_matmul_is_one_module_and_one_registry_line(tmp_path,
                                                                               monkeypatch):
  """Each registry owns its names: the config schema reads them (a kind registered here is a
  valid value; an unknown one is refused naming the registered ones), and a tiny model with
  the toy objective, attention kernel and matmul trains and evaluates."""
  import importlib
  from conftest import one_device
  from jaxlm import matmuls, model as model_lib, run as run_lib, state as state_lib
  from jaxlm.config import ConfigError
  (tmp_path / 'second_half_objective.py').write_text(TOY)
  (tmp_path / 'toy_kinds.py').write_text(TOY_KINDS)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setitem(objectives.REGISTRY, 'second_half', 'second_half_objective')
  monkeypatch.setitem(model_lib.ATTENTION, 'toy', 'toy_kinds:attend')
  monkeypatch.setitem(matmuls.REGISTRY, 'toy', 'toy_kinds:dot_general')
  with pytest.raises(ConfigError, match="model.attention='flash' is not one of .*'toy'"):
    tiny_config(model__attention='flash')
  config = tiny_config(objective='second_half', model__attention='toy', model__matmul='toy',
                       batch_size=2, model__max_len=32)
  s = run_lib.setup(config, one_device())
  T = config.model.max_len
  tokens = jax.random.randint(jax.random.key(0), (2, T), 7, 500)
  batch = {'tokens': tokens, 'segment_ids': jnp.ones_like(tokens),
           'positions': jnp.broadcast_to(jnp.arange(T), tokens.shape)}
  with s.active():
    state = state_lib.initialize(s.model, s.tx, config, s.shardings)
  eval_stats = run_lib.compile_eval_step(s, s.objective.prepare())(state.params, batch,
                                                                    state.extra)
  state, metrics = run_lib.compile_train_step(s, s.objective.prepare())(state, batch)
  # Targets T/2 .. T-1 of each row (the last position predicts nothing), and a step trains.
  assert float(eval_stats['weight']) == 2 * (T // 2 - 1)
  assert np.isfinite(float(metrics['loss'])) and int(state.step) == 1
  assert importlib.import_module('toy_kinds').TRACED == {'attention', 'matmul'}
