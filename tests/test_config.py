"""Config files, command-line overrides and validation: bad input fails early, in one line."""

import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(*overrides, path=os.path.join(ROOT, 'configs', 'gpt_tiny.py')):
  return config_lib.load(path, cli.parse_overrides(list(overrides)))


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))))
def test_every_shipped_config_loads_and_validates(path):
  config = config_lib.load(path)
  assert config.model.head_dim * config.model.num_heads > 0


def test_overrides_are_parsed_by_the_fields_type():
  c = load('--config.model.num_layers=3', '--config.optimizer.learning_rate=1e-2',
           '--config.model.scan_layers=false', '--config.data.path=/tmp/x*.txt',
           '--config.model.dtype', 'bfloat16', '--config.model.family=llama',
           '--config.mesh.rules=(("batch", "data"),)')
  assert c.model.num_layers == 3 and c.optimizer.learning_rate == 0.01
  assert c.model.scan_layers is False and c.data.path == '/tmp/x*.txt'
  assert c.model.dtype == 'bfloat16'
  assert c.mesh.rules == (('batch', 'data'),)


def test_family_fills_unset_architecture_fields_and_explicit_fields_win():
  llama = load('--config.model.family=llama')
  assert (llama.model.norm, llama.model.position, llama.model.gated_mlp) == (
      'rmsnorm', 'rope', True)
  mixed = load('--config.model.position=rope')
  assert (mixed.model.norm, mixed.model.position) == ('layernorm', 'rope')


def test_resolved_config_round_trips_through_json():
  c = load('--config.model.num_kv_heads=2')
  again = config_lib.from_json(config_lib.to_json(c))
  assert again.to_dict() == c.to_dict()



BOOL_FAMILY_FIELDS = sorted(k for k, v in config_lib.FAMILIES['gpt2'].items() if type(v) is bool)


def real_param_count(config):
  import jax
  from jaxlm import model as model_lib
  from jaxlm import state as state_lib
  model = model_lib.build(config.model)
  tokens, positions, segments = state_lib.init_inputs(config)
  shapes = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, tokens, positions,
                                             segments)['params'])
  return sum(leaf.size for leaf in jax.tree.leaves(state_lib.strip_boxes(shapes)))


@pytest.mark.parametrize('family', sorted(config_lib.FAMILIES))
def test_every_bool_family_field_set_false_builds_the_model_without_it(family):
  """'false' on the command line is False (not a truthy string), for every family field that
  a family sets True: the model's parameters change (untied adds an output matrix, the others
  drop weights), as flops.param_counts counts them."""
  from jaxlm import flops
  small = ['--config.model.num_layers=1', '--config.model.emb_dim=32',
           '--config.model.num_heads=2', '--config.model.mlp_dim=64',
           f'--config.model.family={family}']
  on = load(*small)
  fields = [f for f in BOOL_FAMILY_FIELDS if on.model[f]]
  assert fields
  for field in fields:
    off = load(*small, f'--config.model.{field}=false')
    assert off.model[field] is False
    assert real_param_count(off) == flops.param_counts(off.model)['total']
    if field == 'tied_embeddings':
      assert real_param_count(off) == real_param_count(on) + 32 * on.model.vocab_size
    else:
      assert real_param_count(off) < real_param_count(on), field


def test_bool_family_fields_refuse_truthy_strings_everywhere(tmp_path):
  with pytest.raises(ConfigError, match='model.gated_mlp must be true or false'):
    load('--config.model.gated_mlp=no')
  for assignment, message in (("c.model.use_bias = 'false'", "field 'use_bias'"),
                              ('c.batch_size = True', 'field batch_size expects an integer')):
    path = write(tmp_path, 'from jaxlm.config import defaults\ndef get_config():\n'
                           f'  c = defaults()\n  {assignment}\n  return c\n')
    with pytest.raises(ConfigError, match=f'cfg.py: .*{message}'):
      config_lib.load(path)
  saved = load().to_dict()
  saved['model']['tied_embeddings'] = 'false'
  with pytest.raises(ConfigError, match='config.json: field model.tied_embeddings must be true'):
    config_lib.from_json(json.dumps(saved))


@pytest.mark.parametrize('value,message', [
    ('1e400', 'optimizer.learning_rate=inf must be a finite number'),
    ('nan', "optimizer.learning_rate expects a number, got 'nan'"),
    ('True', 'optimizer.learning_rate expects a number, got True'),
])
def test_numbers_are_finite_and_never_bools(value, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    load(f'--config.optimizer.learning_rate={value}')


def test_integers_are_exact_and_in_range():
  with pytest.raises(ConfigError, match='does not fit in 64 bits'):
    load(f'--config.seed={2**64}')
  with pytest.raises(ConfigError, match=re.escape('seed=4294967296 must be in [0, 2**32)')):
    load(f'--config.seed={2**32}')
  with pytest.raises(ConfigError, match='batch_size expects an integer, got 16.0'):
    load('--config.batch_size=16.0')


BAD = [
    (['--config.model.num_layer=3'], "unknown config field 'model.num_layer'; did you mean "
                                     "'model.num_layers'?"),
    (['--config.model.num_layers=two'], 'config field model.num_layers expects an integer'),
    (['--config.model.num_layers=2.5'], 'model.num_layers expects an integer'),
    (['--config.model.num_layers=true'], 'model.num_layers expects an integer'),
    (['--config.model.num_layers=0'], 'model.num_layers=0 must be positive'),
    (['--config.model.scan_layers=maybe'], 'model.scan_layers must be true or false'),
    (['--config.optimizer.learning_rate=fast'], 'optimizer.learning_rate expects a number'),
    (['--config.optimizer.learning_rate=-1'], 'optimizer.learning_rate=-1.0 must be positive'),
    (['--config.model.num_heads=5'], 'model.num_heads=5 must divide model.emb_dim=192'),
    (['--config.model.num_kv_heads=3'], 'model.num_kv_heads=3 must divide model.num_heads=4'),
    (['--config.optimizer.warmup_steps=1000'], 'optimizer.warmup_steps=1000 is longer than '
                                                'train_steps=160'),
    (['--config.optimizer.grad_accum_steps=3'], 'optimizer.grad_accum_steps=3 must divide '
                                                 'batch_size=16'),
    (['--config.model.norm=batchnorm'], "model.norm='batchnorm' is not one of"),
    (['--config.model.family=t5'], "model.family='t5' is not one of 'gpt2', 'llama'"),
    (['--config.objective=diffusion'], "objective='diffusion' is not one of 'causal'"),
    (['--config.model.dropout_rate=1.5'], 'model.dropout_rate=1.5 must be in [0, 1)'),
    (['--config.mesh.fsdp=0'], 'mesh.fsdp=0 must be positive or -1'),
    (['--config.data.validation_fraction=0'], 'data.validation_fraction=0.0 must be in (0, 1)'),
    (['--config.model.head_dim=7', '--config.model.family=llama'],
     'model.head_dim=7 must be even for rotary positions'),
    (['--config.mesh.rules=5'], 'config field mesh.rules expects a tuple'),
    (['--config.model.num_layers'], "override '--config.model.num_layers' has no value"),
]


@pytest.mark.parametrize('args,message', BAD, ids=[a[0].split('=')[0] for a, _ in BAD])
def test_bad_overrides_name_the_field(args, message):
  with pytest.raises(ConfigError) as e:
    load(*args)
  assert message in str(e.value)
  assert '\n' not in str(e.value)


def write(tmp_path, text):
  path = tmp_path / 'cfg.py'
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize('text,message', [
    ('def get_config(:\n', 'line 1: syntax error'),
    ('x = 1\n', 'defines no get_config() function'),
    ('from jaxlm.config import defaults\ndef get_config():\n  c = defaults()\n'
     '  c.model.num_layer = 2\n  return c\n', "num_layer"),
    ('def get_config():\n  return {"a": 1}\n', 'must return jaxlm.config.defaults()'),
    ('def get_config():\n  raise RuntimeError("boom")\n', 'get_config() failed: RuntimeError'),
])
def test_bad_config_files_name_the_file(tmp_path, text, message):
  path = write(tmp_path, text)
  with pytest.raises(ConfigError) as e:
    config_lib.load(path)
  assert message in str(e.value) and path in str(e.value)


def test_missing_config_file():
  with pytest.raises(ConfigError, match="config file 'nope.py' not found"):
    config_lib.load('nope.py')


def run_cli(*args, cwd=ROOT):
  return subprocess.run([sys.executable, '-m', 'jaxlm', *args], capture_output=True, text=True,
                        cwd=cwd, timeout=60)


def test_cli_bad_input_exits_2_with_one_line_before_importing_jax(tmp_path):
  start = time.perf_counter()
  result = run_cli('train', '--config=configs/gpt_tiny.py', '--config.model.num_layer=2',
                   f'--workdir={tmp_path}')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "jaxlm: error: unknown config field 'model.num_layer'; did you mean 'model.num_layers'?"]
  assert os.listdir(tmp_path) == []  # Nothing was written.
  assert time.perf_counter() - start < 20


def test_cli_usage_errors_exit_2(tmp_path):
  for args in (['train', '--config=configs/gpt_tiny.py'],  # No workdir.
               ['train', '--bogus'],
               ['frobnicate'],
               []):
    result = run_cli(*args)
    assert result.returncode == 2, args
    assert len(result.stderr.strip().splitlines()) >= 1


def test_cli_help_lists_the_commands():
  result = run_cli('--help')
  assert result.returncode == 0
  assert 'train' in result.stdout and 'eval' in result.stdout
