"""Training objectives, one module each, looked up by name: the one place `config.objective`
is read (tests/test_objectives.py fails on a branch on it anywhere else in jaxlm/).

An objective (base.Objective) answers every question the rest of jaxlm used to ask by
comparing the objective's name: which features a batch has, how the model is built (attention
direction, a classification head), how documents are framed and which tokenizer pieces that
needs, which command trains it, how a batch is prepared (targets and weights) and scored.

Adding one is a module defining an `Objective` subclass plus one line in REGISTRY. This file
imports nothing heavy: config validation (no jax) takes the allowed names from REGISTRY.
"""

import importlib

# config.objective -> the module whose `Objective` class implements it.
REGISTRY = {
    'causal': 'jaxlm.objectives.causal',
    'masked': 'jaxlm.objectives.masked',
    'classify': 'jaxlm.objectives.classify',
}


def name(config):
  """The objective's name, without importing its module (which imports jax). `config` is a
  ConfigDict or a saved config's dict, which may predate the field: hence the default."""
  return config.get('objective', 'causal')


def get(config):
  """The objective of `config` (see `name`). The run builder (run.setup) makes a run's one
  objective and hands it down; only commands that read another run's saved config make one of
  their own (jaxlm/resume.py)."""
  return importlib.import_module(REGISTRY[name(config)]).Objective(config)
