"""Config-file loading, command-line overrides, validation and JSON round trips.

The fields themselves, with their defaults and comments, are declared in `jaxlm/schema.py`;
config files import `defaults` from here (`from jaxlm.config import defaults`).

This module imports nothing heavy (no jax): bad input must fail in milliseconds, before any
device is touched or anything is compiled.
"""

import ast
import difflib
import importlib.util
import json
import math
import os

import ml_collections

from jaxlm import matmuls, parametrization, phases
from jaxlm.errors import ConfigError, first_line  # noqa: F401 (ConfigError re-exported)
# Config files import `defaults` from here, the public place for it.
from jaxlm.schema import CHOICES, FAMILIES, MESH_AXES, defaults, sweep_defaults  # noqa: F401


def load(path, overrides=()):
  """Loads `get_config()` from a Python file, applies `--config.a.b=v` overrides, validates."""
  config = _load_file(path) if path else defaults()
  apply_overrides(config, overrides)
  return validate(config)


def based_on(config_file, name):
  """The config of file `name` beside `config_file` (a config file's __file__), for a config
  that changes a few fields of another: `c = based_on(__file__, 'bert_base.py')`."""
  return _load_file(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))


def load_sweep(path, overrides=()):
  """Loads a sweep file (`sweep_defaults()`, see configs/scaling/) with overrides, validated;
  its base run config is checked as each run's config is built from it (jaxlm/sweep.py)."""
  config = _load_file(path, sweep_defaults)
  apply_overrides(config, overrides)
  validate(config.base)
  return config


def _load_file(path, schema=defaults):
  if not os.path.isfile(path):  # A Python file imported from local disk.
    kind = ('is a directory' if os.path.isdir(path) else
            'is not a regular file' if os.path.exists(path) else 'not found')
    raise ConfigError(f'config file {path!r} {kind}; pass --config=configs/<name>.py')
  spec = importlib.util.spec_from_file_location('_jaxlm_config_file', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f'config file {path}, line {e.lineno}: syntax error: {e.msg}') from e
  except Exception as e:
    raise ConfigError(f'config file {path}: {type(e).__name__}: {e}') from e
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config file {path} defines no get_config() function')
  try:
    config = module.get_config()
  except AttributeError as e:  # A locked ConfigDict names the unknown field here.
    raise ConfigError(f'config file {path}: {first_line(e)}') from e
  except Exception as e:
    raise ConfigError(f'config file {path}: get_config() failed: {type(e).__name__}: {e}') from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'config file {path}: get_config() must return jaxlm.config.'
                      f'{schema.__name__}() (a ConfigDict), got {type(config).__name__}')
  if ('sizes' in config) != (schema is sweep_defaults):
    raise ConfigError(f'config file {path} is a scaling sweep: run it with jaxlm sweep'
                      if 'sizes' in config else
                      f'config file {path} is a run config; jaxlm sweep needs a sweep built from '
                      f'jaxlm.config.sweep_defaults() (see configs/scaling/)')
  unknown = sorted(set(_flat_keys(config)) - set(_flat_keys(schema())))
  if unknown:
    raise ConfigError(f'config file {path}: unknown field {unknown[0]!r}')
  return check_types(config, schema(), f'config file {path}: field')


def _flat_keys(config, prefix=''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _flat_keys(value, f'{prefix}{key}.')
    else:
      yield prefix + key


def parse_override(arg):
  """'--config.a.b=v' -> ('a.b', 'v'). Values are parsed later, against the field's type."""
  body = arg[len('--config.'):]
  if '=' not in body:
    raise ConfigError(f'override {arg!r} has no value; write --config.{body}=VALUE')
  name, value = body.split('=', 1)
  return name, value


def apply_overrides(config, overrides):
  """Sets each (dotted name, text) pair. Text is parsed as a Python literal, never evaluated,
  and must be exactly of the field's type (see `coerce`)."""
  known = list(_flat_keys(config))
  for name, text in overrides:
    if name not in known:
      hint = difflib.get_close_matches(name, known, n=1)
      raise ConfigError(f'unknown config field {name!r}' +
                        (f'; did you mean {hint[0]!r}?' if hint else ''))
    set_field(config, name, _parse_value(name, text, field_type(config, name)))


def field_type(config, name):
  """The declared type of a field: its default's, or a placeholder's (jaxlm/schema.py)."""
  *parents, leaf = name.split('.')
  node = config
  for p in parents:
    node = node[p]
  kind = node.get_type(leaf)
  return tuple if kind is list else kind


def set_field(config, name, value, kind=None, where='config field'):
  """Sets a dotted field to `value`, coerced exactly to its type (or `kind`)."""
  *parents, leaf = name.split('.')
  node = config
  for p in parents:
    node = node[p]
  value = coerce(name, value, kind or field_type(config, name), where)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f'{where} {name}: cannot set {value!r}: {first_line(e)}') from e


_UNSET_ALLOWED = {f'model.{key}' for key in FAMILIES['gpt2']} | {
    f'base.model.{key}' for key in FAMILIES['gpt2']}
# 64-bit signed integers: what jax, numpy and JSON readers elsewhere hold without wrapping.
_INT_RANGE = (-2**63, 2**63 - 1)


def coerce(name, value, kind, where='config field'):
  """`value` as a field of type `kind`, exactly, or a one-line ConfigError naming the field.

  No truthy strings ('false' is not a bool), no rounding (1.5 is not an int), no bool as a
  number, no non-finite float, no integer beyond 64 bits. None stays None only for a
  family field (jaxlm/schema.py's placeholders), which validation fills in."""
  if value is None and name in _UNSET_ALLOWED:
    return None
  if kind is bool:
    if isinstance(value, bool):
      return value
    raise ConfigError(f'{where} {name} must be true or false, got {value!r}')
  if kind is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f'{where} {name} expects an integer, got {value!r}')
    if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
      raise ConfigError(f'{where} {name}={value} does not fit in 64 bits')
    return value
  if kind is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f'{where} {name} expects a number, got {value!r}')
    try:
      value = float(value)
    except OverflowError:
      value = float('inf')
    if not math.isfinite(value):
      raise ConfigError(f'{where} {name}={value!r} must be a finite number')
    return value
  if kind is str:
    if not isinstance(value, str):
      raise ConfigError(f'{where} {name} expects a string, got {value!r}')
    return value
  if kind is tuple:
    if not isinstance(value, (tuple, list)):
      raise ConfigError(f'{where} {name} expects a tuple, got {value!r}')
    return _tuplify(value)
  return value


def _parse_value(name, text, kind):
  """Command-line text -> a value of `kind`: true/false for a bool, a Python literal (never
  evaluated) for numbers and tuples, the text itself (or a quoted literal) for a string."""
  if kind is bool:
    lowered = text.strip().lower()
    if lowered in ('true', 'false'):
      return lowered == 'true'
    raise ConfigError(f'config field {name} must be true or false, got {text!r}')
  if kind is str:
    try:  # Allow quoted strings; anything else is taken verbatim.
      value = ast.literal_eval(text)
      return value if isinstance(value, str) else text
    except (ValueError, SyntaxError, MemoryError, RecursionError):
      return text
  try:
    return ast.literal_eval(text.strip())
  except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
    described = {int: 'an integer', float: 'a number', tuple: 'a tuple'}.get(kind, 'a value')
    raise ConfigError(f'config field {name} expects {described}, got {text!r}') from None


def check_types(config, schema, where='config field'):
  """Coerces every field of `config` to the type `schema` declares for it (config files may
  assign anything; a locked ConfigDict would even turn an int field into a bool)."""
  for name in _flat_keys(config):
    set_field(config, name, get_field(config, name), field_type(schema, name), where)
  return config


def validate(config):
  """Fills family defaults and derived sizes, then checks every rule. Returns the config."""
  m = config.model
  if m.family not in FAMILIES:
    _choice_error('model.family', m.family)
  for key, value in FAMILIES[m.family].items():
    if m[key] is None:
      m[key] = value
  if m.num_kv_heads == 0:
    m.num_kv_heads = m.num_heads
  if m.head_dim == 0 and m.num_heads > 0:
    if m.emb_dim % m.num_heads:
      raise ConfigError(f'model.num_heads={m.num_heads} must divide model.emb_dim={m.emb_dim} '
                        f'(or set model.head_dim)')
    m.head_dim = m.emb_dim // m.num_heads

  for name, allowed in CHOICES.items():
    if get_field(config, name) not in allowed:
      _choice_error(name, get_field(config, name))
  for name in ('train_steps', 'batch_size', 'log_every_steps', 'eval_batches',
               'model.num_layers', 'model.emb_dim', 'model.num_heads', 'model.num_kv_heads',
               'model.head_dim', 'model.mlp_dim', 'model.vocab_size', 'model.max_len',
               'optimizer.grad_accum_steps', 'checkpoint.save_every_steps', 'checkpoint.keep',
               'data.num_threads', 'data.prefetch', 'data.tokenizer_sample_bytes',
               'data.shard_bytes'):
    _check(config, name, lambda v: v > 0, 'must be positive')
  for name in ('eval_every_steps', 'z_loss', 'optimizer.warmup_steps', 'optimizer.weight_decay',
               'optimizer.grad_clip', 'data.max_documents', 'model.norm_eps',
               'checkpoint.keep_every_steps', 'checkpoint.local_every_steps',
               'distributed.num_processes'):
    _check(config, name, lambda v: v >= 0, 'must be >= 0')
  _check(config, 'optimizer.learning_rate', lambda v: v > 0, 'must be positive')
  # Adam divides by sqrt(v) + eps: with eps 0, a parameter whose gradient is 0 (an embedding
  # row never seen) gets 0/0 and every update is non-finite, so nothing would train.
  _check(config, 'optimizer.eps', lambda v: v > 0, 'must be positive (Adam divides by it)')
  ckpt = config.checkpoint
  if bool(ckpt.local_dir) != bool(ckpt.local_every_steps):
    raise ConfigError(f'checkpoint.local_dir={ckpt.local_dir!r} and checkpoint.local_every_steps='
                      f'{ckpt.local_every_steps} go together: set both (a host-local path and '
                      f'a step interval) or neither')
  if ckpt.local_dir and '://' in ckpt.local_dir:
    raise ConfigError(f'checkpoint.local_dir={ckpt.local_dir!r} must be a path on this host '
                      f'(local SSD, /dev/shm); the workdir is the persistent tier')
  # jax.random.key and sentencepiece keep 32 bits of a seed: a larger one would collide.
  _check(config, 'seed', lambda v: 0 <= v < 2**32, 'must be in [0, 2**32)')
  # The train state's step counter is int32.
  _check(config, 'train_steps', lambda v: v < 2**31, 'must be below 2**31')
  # Above 1, float32 initial weights overflow in the first layers and no step is finite.
  _check(config, 'model.init_std', lambda v: 0 < v <= 1, 'must be in (0, 1]')
  parametrization.get(m).check(m)
  for name in ('distributed.heartbeat_timeout_s', 'distributed.barrier_timeout_s'):
    _check(config, name, lambda v: 0 < v <= 10**6, 'must be positive, in seconds (at most 1e6)')
  # Each reading thread, and each batch read ahead, is held at once (see limits.py).
  _check(config, 'data.num_threads', lambda v: v <= 256, 'must be at most 256')
  _check(config, 'data.prefetch', lambda v: v <= 1024, 'must be at most 1024')
  for name in ('model.splash_block_q', 'model.splash_block_kv'):
    _check(config, name, lambda v: v >= 0 and v % 128 == 0,
           'must be a multiple of 128 (or 0 = auto)')
  _check(config, 'model.cudnn_max_documents', lambda v: v > 0, 'must be positive')
  for name in ('model.rope_theta', 'model.rope_scaling_factor', 'model.rope_original_max_len'):
    _check(config, name, lambda v: v > 0, 'must be positive')
  for name in ('model.dropout_rate', 'optimizer.b1', 'optimizer.b2', 'masking.rate'):
    _check(config, name, lambda v: 0 <= v < 1, 'must be in [0, 1)')
  _check(config, 'optimizer.end_lr_fraction', lambda v: 0 <= v <= 1, 'must be in [0, 1]')
  _check(config, 'data.validation_fraction', lambda v: 0 < v < 1, 'must be in (0, 1)')
  _check(config, 'model.type_vocab_size', lambda v: v >= 0, 'must be >= 0')
  for name in ('profile.start_step', 'profile.num_steps', 'profile.every_steps'):
    _check(config, name, lambda v: v >= 0, 'must be >= 0')
  for name in ('lm_eval.every_steps', 'lm_eval.limit'):
    _check(config, name, lambda v: v >= 0, 'must be >= 0')
  _check(config, 'lm_eval.num_fewshot', lambda v: v >= -1, 'must be >= 0, or -1 (the task\'s)')
  _check(config, 'lm_eval.batch_size', lambda v: v > 0, 'must be positive')
  # The profiler holds a window's events in host memory until the window ends.
  _check(config, 'profile.num_steps', lambda v: v <= 1000, 'must be at most 1000')
  _check_mixture(config.data)
  phases.check(config)
  _check_phase_fields(config)
  if config.data.path and config.data.tfds_name:
    raise ConfigError(f'data.path={config.data.path!r} and data.tfds_name='
                      f'{config.data.tfds_name!r} are both set; keep one')
  for name in ('masking.mask_fraction', 'masking.random_fraction'):
    _check(config, name, lambda v: 0 <= v <= 1, 'must be in [0, 1]')
  if config.masking.mask_fraction + config.masking.random_fraction > 1:
    raise ConfigError(f'masking.mask_fraction + masking.random_fraction = '
                      f'{config.masking.mask_fraction + config.masking.random_fraction:g} '
                      f'must be at most 1')
  _check(config, 'masking.max_predictions', lambda v: v >= -1,
         'must be a count of positions per row, 0 (sized from masking.rate) or -1 (all)')

  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f'model.num_kv_heads={m.num_kv_heads} must divide '
                      f'model.num_heads={m.num_heads}')
  if m.position == 'rope' and m.head_dim % 2:
    raise ConfigError(f'model.head_dim={m.head_dim} must be even for rotary positions')
  if m.rope_type == 'llama3' and not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
    raise ConfigError(f'model.rope_low_freq_factor={m.rope_low_freq_factor} must be positive '
                      f'and below model.rope_high_freq_factor={m.rope_high_freq_factor}')
  unknown = [layer for layer in m.matmul_keep if layer not in matmuls.LAYERS]
  if unknown:
    raise ConfigError(f'model.matmul_keep={m.matmul_keep!r} names {unknown[0]!r}, which is not '
                      f'a matmul layer; choose from {", ".join(matmuls.LAYERS)}')
  _check(config, 'loss_chunk', lambda v: v >= 0, 'must be >= 0')
  if config.loss_chunk and m.max_len % config.loss_chunk:
    raise ConfigError(f'loss_chunk={config.loss_chunk} must divide model.max_len={m.max_len}')
  o = config.optimizer
  if o.warmup_steps > config.train_steps:
    raise ConfigError(f'optimizer.warmup_steps={o.warmup_steps} is longer than '
                      f'train_steps={config.train_steps}')
  if config.batch_size % o.grad_accum_steps:
    raise ConfigError(f'optimizer.grad_accum_steps={o.grad_accum_steps} must divide '
                      f'batch_size={config.batch_size}')
  for name in MESH_AXES:
    for field in (f'mesh.{name}', f'mesh.dcn_{name}'):
      _check(config, field, lambda v: v == -1 or v > 0, 'must be positive or -1')
  _check_rules(config.mesh.rules)
  return config


def _check_phase_fields(config):
  """Each phase's model fields (phases.MODEL_FIELDS), checked like the fields themselves."""
  for entry in config.data.phases:
    if len(entry) == 3:
      trial = config.copy_and_resolve_references()
      trial.data.phases = ()
      where = f'data.phases entry {entry!r}:'
      for name, value in entry[2].items():
        set_field(trial, f'model.{name}', value, where=f'{where} field')
      try:
        validate(trial)
      except ConfigError as e:
        raise ConfigError(f'{where} {e}') from e


def _check_rules(rules):
  """Each rule is (logical name, None | mesh axis | tuple of mesh axes)."""
  for rule in rules:
    axes = rule[1] if isinstance(rule, (tuple, list)) and len(rule) == 2 else ()
    axes = axes if isinstance(axes, (tuple, list)) else (axes,)
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str)
        or not all(a is None or a in MESH_AXES for a in axes)):
      raise ConfigError(f'mesh.rules entry {rule!r} must be (logical_name, mesh_axes) with '
                        f'mesh axes from {", ".join(MESH_AXES)} or None')


def _check_mixture(d):
  for entry in d.mixture:
    if (not isinstance(entry, (tuple, list)) or len(entry) != 2
        or isinstance(entry[0], bool) or not isinstance(entry[0], (int, float))
        or not 0 < entry[0] < math.inf or not isinstance(entry[1], str) or not entry[1]):
      raise ConfigError(f'data.mixture entry {entry!r} must be (positive weight, source), e.g. '
                        f"(0.7, '/data/web/*.jsonl') or (0.3, 'tfds:lm1b')")
  if d.mixture and (d.path or d.tfds_name):
    raise ConfigError('data.mixture replaces data.path and data.tfds_name; leave those empty')


def get_field(config, name):
  for part in name.split('.'):
    config = config[part]
  return config


def _check(config, name, ok, rule):
  value = get_field(config, name)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
    raise ConfigError(f'{name}={value!r} {rule}')


def _choice_error(name, value):
  allowed = ', '.join(repr(a) for a in CHOICES[name])
  raise ConfigError(f'{name}={value!r} is not one of {allowed}')


def to_json(config):
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text, where='config.json'):
  """Rebuilds a config written by `to_json` (a workdir's config.json), checked against the
  schema: every value exactly of its field's type."""
  config = defaults()
  flat = {}

  def walk(d, prefix=''):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, f'{prefix}{k}.')
      else:
        flat[prefix + k] = v
  data = json.loads(text)
  if not isinstance(data, dict):
    raise ConfigError(f'{where} must hold a JSON object, not a {type(data).__name__}')
  walk(data)
  known = set(_flat_keys(config))
  for name, value in flat.items():
    if name not in known:
      raise ConfigError(f'{where} has unknown field {name!r}; written by another version?')
    set_field(config, name, value, where=f'{where}: field')
  return validate(config)


def _tuplify(value):
  return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value
