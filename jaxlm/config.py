"""The config schema, config-file loading, command-line overrides and validation.

Every field jaxlm reads is declared in `defaults()` with a comment; config files under
`configs/` start from it and change what they need. The returned ConfigDict is locked, so a
misspelt field in a config file or on the command line is an error, never a silent no-op.

This module imports nothing heavy (no jax): bad input must fail in milliseconds, before any
device is touched or anything is compiled.
"""

import ast
import difflib
import importlib.util
import json
import os

import ml_collections

from jaxlm.errors import ConfigError  # noqa: F401 (re-exported: config errors live here)


# Architecture presets. A model field left as None takes its family's value, so
# `--config.model.family=llama` turns a GPT-2 config into a Llama-style one, while an explicit
# field (for example `--config.model.position=rope` on a gpt2 model) still wins.
FAMILIES = {
    'gpt2': dict(norm='layernorm', norm_position='pre', position='learned', mlp_activation='gelu',
                 gated_mlp=False, use_bias=True, tied_embeddings=True, norm_eps=1e-5,
                 head_transform=False, output_bias=False),
    'llama': dict(norm='rmsnorm', norm_position='pre', position='rope', mlp_activation='silu',
                  gated_mlp=True, use_bias=False, tied_embeddings=False, norm_eps=1e-5,
                  head_transform=False, output_bias=False),
    # BERT/RoBERTa: post-norm blocks, a normed embedding, and an MLM head that transforms the
    # final state (dense, GELU, LayerNorm) before the tied output layer with its own bias.
    'bert': dict(norm='layernorm', norm_position='post', position='learned',
                 mlp_activation='gelu_exact', gated_mlp=False, use_bias=True, tied_embeddings=True,
                 norm_eps=1e-12, head_transform=True, output_bias=True),
}

CHOICES = {
    'objective': ('causal', 'masked', 'classify'),
    'nonfinite': ('skip', 'stop'),
    'model.family': tuple(FAMILIES),
    'model.norm': ('layernorm', 'rmsnorm'),
    'model.norm_position': ('pre', 'post'),
    'model.position': ('learned', 'rope'),
    'model.mlp_activation': ('gelu', 'gelu_exact', 'silu', 'relu'),
    'model.dtype': ('float32', 'bfloat16', 'float16'),
    'model.param_dtype': ('float32', 'bfloat16'),
    'model.attention': ('auto', 'xla', 'cudnn'),
    'model.remat_policy': ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims'),
    'data.tokenizer_type': ('bpe', 'unigram'),
    'data.packing': ('split', 'first_fit'),
    'finetune.backbone': ('masked', 'causal'),
}


def defaults(family='gpt2'):
  """The complete config schema with its default values, as a locked ConfigDict."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # One seed for parameter init, dropout and data order.
  # 'causal' (next-token prediction), 'masked' (BERT-style masked tokens, see `masking`) or
  # 'classify' (sequence classification, see `finetune`; run it with `jaxlm finetune`).
  c.objective = 'causal'
  c.train_steps = 1000  # Number of optimizer updates.
  c.batch_size = 32  # Global batch, in sequences of model.max_len tokens, over all devices.
  c.log_every_steps = 50  # Write a metrics.jsonl row (and TensorBoard scalars) this often.
  c.eval_every_steps = 500  # Evaluate on held-out data this often; 0 = only at start and end.
  c.eval_batches = 8  # Held-out batches per evaluation (fewer if the split is smaller).
  c.z_loss = 0.0  # Weight of the log(Z)^2 penalty that keeps output logits small (PaLM: 1e-4).
  # A step whose loss or gradient norm is not finite never applies its update; then 'skip'
  # goes on with the next batch, 'stop' saves the (good) state and stops with an error.
  c.nonfinite = 'skip'
  c.init_from = ''  # Start from the parameters of this checkpoint (a workdir or checkpoints/N).

  c.model = ml_collections.ConfigDict()
  m = c.model
  m.family = family  # Architecture preset: 'gpt2', 'llama' or 'bert'; fills the None fields.
  m.num_layers = 12  # Transformer blocks.
  m.emb_dim = 768  # Residual stream width.
  m.num_heads = 12  # Query heads.
  m.num_kv_heads = 0  # Key/value heads (grouped-query attention); 0 = num_heads.
  m.head_dim = 0  # Width of each head; 0 = emb_dim // num_heads.
  m.mlp_dim = 3072  # Hidden width of the MLP.
  m.vocab_size = 50304  # Output vocabulary; at least the tokenizer's size.
  m.max_len = 1024  # Training sequence length (and size of a learned position table).
  m.norm = None  # 'layernorm' or 'rmsnorm'; None = family default.
  m.norm_eps = None  # Epsilon of the norms; None = family default.
  m.norm_position = None  # 'pre' (norm, then attention/MLP) or 'post' (BERT); None = family.
  m.position = None  # 'learned' absolute embeddings or 'rope'; None = family default.
  m.rope_theta = 10000.0  # RoPE base frequency (Llama 2: 1e4, Llama 3: 5e5).
  m.mlp_activation = None  # 'gelu' (tanh approximation), 'gelu_exact', 'silu', 'relu'; None = family.
  m.gated_mlp = None  # True for GLU-style MLPs (SwiGLU = silu + gated); None = family default.
  m.use_bias = None  # Biases in dense layers and LayerNorm; None = family default.
  m.tied_embeddings = None  # Share the input embedding with the output layer; None = family.
  m.head_transform = None  # Dense + activation + norm before the output layer (BERT); None = family.
  m.output_bias = None  # A bias on the output logits (BERT); None = family default.
  m.type_vocab_size = 0  # Token-type (segment A/B) embeddings, as in BERT; 0 = none.
  m.dropout_rate = 0.0  # Dropout on embeddings and residual branches during training.
  m.init_std = 0.02  # Std of the normal init; residual output projections get /sqrt(2 L).
  m.dtype = 'float32'  # Compute dtype of activations ('bfloat16' on accelerators).
  m.param_dtype = 'float32'  # Storage dtype of parameters (the optimizer's master copy).
  m.attention = 'auto'  # jax.nn.dot_product_attention implementation: 'auto', 'xla', 'cudnn'.
  m.scan_layers = True  # Stack the blocks with scan: compile time independent of depth.
  m.remat_policy = 'none'  # Activation recomputation: 'none', 'full', 'dots_saveable', ...

  c.optimizer = ml_collections.ConfigDict()
  o = c.optimizer
  o.learning_rate = 3e-4  # Peak learning rate, reached at the end of warmup.
  o.warmup_steps = 100  # Linear warmup from 0 to the peak.
  o.end_lr_fraction = 0.1  # The cosine decays to this fraction of the peak at train_steps.
  o.b1 = 0.9  # AdamW first-moment decay.
  o.b2 = 0.95  # AdamW second-moment decay.
  o.eps = 1e-8  # AdamW epsilon.
  o.weight_decay = 0.1  # Decoupled weight decay; never applied to norms and biases.
  o.grad_clip = 1.0  # Clip the global gradient norm to this; 0 = no clipping.
  o.grad_accum_steps = 1  # Split each batch into this many sequential micro-batches.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # Data-parallel axis (replicated parameters). -1 = all remaining devices.
  c.mesh.fsdp = -1  # Fully sharded data-parallel axis (ZeRO-3 parameter sharding).
  c.mesh.tensor = 1  # Tensor-parallel axis (Megatron-style heads/MLP/vocab split).
  c.mesh.sequence = 1  # Sequence axis: activations split along the length dimension.
  # The same axes across slices (TPU multi-slice) or nodes (GPU), over the slower network.
  c.mesh.dcn_data = -1  # Data parallelism across slices: -1 = all slices.
  c.mesh.dcn_fsdp = 1  # FSDP across slices (more traffic than data parallelism).
  c.mesh.dcn_sequence = 1  # Sequence parallelism across slices (rarely useful).
  c.mesh.dcn_tensor = 1  # Tensor parallelism across slices (almost never useful).
  # Logical axis -> mesh axes. The first rule whose mesh axes are still free in an array wins.
  c.mesh.rules = (
      ('batch', ('data', 'fsdp')),
      ('length', 'sequence'),
      ('embed', 'fsdp'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('mlp', 'tensor'),
      ('vocab', 'tensor'),
      ('kv', None),
      ('layers', None),
  )

  c.data = ml_collections.ConfigDict()
  d = c.data
  d.path = ''  # Globs (comma-separated) of text, .jsonl and .parquet files; '' = Python stdlib.
  d.tfds_name = ''  # A TFDS dataset (e.g. 'lm1b', 'wikipedia/20230601.en') instead of data.path.
  d.tfds_split = 'train'  # Its split that documents come from (validation is held out of it).
  d.text_field = 'text'  # The JSONL field, Parquet column or TFDS feature of a document's text.
  # Several sources mixed by weight, replacing path/tfds_name: ((weight, source), ...), a
  # source being globs as in data.path or 'tfds:NAME[:SPLIT]'. () = no mixture.
  d.mixture = ()
  d.tokenizer = ''  # A sentencepiece .model to use; '' = train one, cached in the workdir.
  d.tokenizer_type = 'bpe'  # Sentencepiece algorithm when training one: 'bpe' or 'unigram'.
  d.tokenizer_sample_bytes = 20_000_000  # Text sampled from the corpus to train it.
  d.validation_fraction = 0.02  # Share of documents held out (chosen by a hash of their name).
  d.cache_dir = ''  # Where the tokenized corpus is cached; '' = <workdir>/data.
  # How documents fill rows: 'split' concatenates and cuts (no padding, most documents cut);
  # 'first_fit' places whole documents (long ones in max_len pieces) first-fit decreasing.
  d.packing = 'split'
  d.max_documents = 0  # Use at most this many documents (0 = all); for quick experiments.
  d.num_threads = 2  # Threads reading and assembling batches ahead of the step.
  d.prefetch = 4  # Batches prepared ahead of the step.

  c.masking = ml_collections.ConfigDict()  # For objective='masked'; drawn anew every step.
  c.masking.rate = 0.15  # Share of (non-special) tokens chosen for prediction.
  c.masking.mask_fraction = 0.8  # Of the chosen tokens, the share replaced by [MASK] ...
  c.masking.random_fraction = 0.1  # ... and by a random token; the rest stay unchanged.
  c.masking.whole_word = False  # Choose whole words (a word starts at a '▁' piece), not pieces.

  c.finetune = ml_collections.ConfigDict()  # For objective='classify' (`jaxlm finetune`).
  c.finetune.train = ''  # Labeled .jsonl/.csv file(s) (glob), or 'tfds:NAME:SPLIT' (glue/sst2).
  c.finetune.validation = ''  # The same for the split that accuracy is reported on.
  c.finetune.text_field = 'text'  # Field (JSONL key, CSV column, TFDS feature) of the text.
  c.finetune.label_field = 'label'  # Field of the label (a class name or an integer).
  c.finetune.labels = ()  # Class names in id order; () = the sorted labels of the train split.
  # The pretraining objective of the model being fine-tuned: 'masked' classifies from the
  # first ([CLS]) token of a bidirectional model, 'causal' from the last token of a decoder.
  c.finetune.backbone = 'masked'

  c.distributed = ml_collections.ConfigDict()  # Multi-process runs; see jaxlm/distributed.py.
  c.distributed.coordinator = ''  # host:port of process 0; '' = environment or cluster.
  c.distributed.num_processes = 0  # Processes in the run; 0 = environment or cluster.
  c.distributed.heartbeat_timeout_s = 300  # A process whose peer died exits after this long.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.save_every_steps = 1000  # Save the train state this often (and at the end).
  c.checkpoint.keep = 3  # Keep the newest N checkpoints.
  c.checkpoint.keep_every_steps = 0  # Also keep every checkpoint whose step is a multiple; 0 = no.
  c.lock()
  return c


def load(path, overrides=()):
  """Loads `get_config()` from a Python file, applies `--config.a.b=v` overrides, validates."""
  config = _load_file(path) if path else defaults()
  apply_overrides(config, overrides)
  return validate(config)


def _load_file(path):
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} not found; pass --config=configs/<name>.py')
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
    raise ConfigError(f'config file {path}: {_first_line(e)}') from e
  except Exception as e:
    raise ConfigError(f'config file {path}: get_config() failed: {type(e).__name__}: {e}') from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'config file {path}: get_config() must return jaxlm.config.defaults() '
                      f'(a ConfigDict), got {type(config).__name__}')
  unknown = sorted(set(_flat_keys(config)) - set(_flat_keys(defaults())))
  if unknown:
    raise ConfigError(f'config file {path}: unknown field {unknown[0]!r}')
  return config


def _first_line(e):
  return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


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
  """Sets each (dotted name, text) pair. Text is parsed as a Python literal, never evaluated."""
  known = list(_flat_keys(config))
  for name, text in overrides:
    if name not in known:
      hint = difflib.get_close_matches(name, known, n=1)
      raise ConfigError(f'unknown config field {name!r}' +
                        (f'; did you mean {hint[0]!r}?' if hint else ''))
    *parents, leaf = name.split('.')
    node = config
    for p in parents:
      node = node[p]
    value = _parse_value(name, text, node[leaf])
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f'config field {name}: cannot set {text!r}: {_first_line(e)}') from e


def _parse_value(name, text, current):
  kind = {bool: 'true or false', int: 'an integer', float: 'a number', tuple: 'a tuple',
          list: 'a tuple'}.get(type(current))
  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered in ('true', '1', 'yes'):
      return True
    if lowered in ('false', '0', 'no'):
      return False
    raise ConfigError(f'config field {name} must be true or false, got {text!r}')
  if isinstance(current, str):
    try:  # Allow quoted strings; anything else is taken verbatim.
      value = ast.literal_eval(text)
      return value if isinstance(value, str) else text
    except (ValueError, SyntaxError, MemoryError, RecursionError):
      return text
  try:
    value = ast.literal_eval(text.strip())
  except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
    if current is None:
      return text  # An untyped (None) field takes a bare word as a string.
    raise ConfigError(f'config field {name} expects {kind}, got {text!r}') from None
  ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        tuple: lambda v: isinstance(v, (tuple, list)),
        list: lambda v: isinstance(v, (tuple, list))}.get(type(current), lambda v: True)
  if not ok(value):
    raise ConfigError(f'config field {name} expects {kind}, got {text!r}')
  return float(value) if isinstance(current, float) else value


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
               'data.num_threads', 'data.prefetch', 'data.tokenizer_sample_bytes'):
    _check(config, name, lambda v: v > 0, 'must be positive')
  for name in ('eval_every_steps', 'z_loss', 'optimizer.warmup_steps', 'optimizer.weight_decay',
               'optimizer.grad_clip', 'optimizer.eps', 'data.max_documents', 'model.norm_eps',
               'checkpoint.keep_every_steps', 'distributed.num_processes'):
    _check(config, name, lambda v: v >= 0, 'must be >= 0')
  _check(config, 'optimizer.learning_rate', lambda v: v > 0, 'must be positive')
  _check(config, 'model.init_std', lambda v: v > 0, 'must be positive')
  _check(config, 'distributed.heartbeat_timeout_s', lambda v: v > 0, 'must be positive')
  _check(config, 'model.rope_theta', lambda v: v > 0, 'must be positive')
  for name in ('model.dropout_rate', 'optimizer.b1', 'optimizer.b2', 'masking.rate'):
    _check(config, name, lambda v: 0 <= v < 1, 'must be in [0, 1)')
  _check(config, 'optimizer.end_lr_fraction', lambda v: 0 <= v <= 1, 'must be in [0, 1]')
  _check(config, 'data.validation_fraction', lambda v: 0 < v < 1, 'must be in (0, 1)')
  _check(config, 'model.type_vocab_size', lambda v: v >= 0, 'must be >= 0')
  _check_mixture(config.data)
  if config.data.path and config.data.tfds_name:
    raise ConfigError(f'data.path={config.data.path!r} and data.tfds_name='
                      f'{config.data.tfds_name!r} are both set; keep one')
  for name in ('masking.mask_fraction', 'masking.random_fraction'):
    _check(config, name, lambda v: 0 <= v <= 1, 'must be in [0, 1]')
  if config.masking.mask_fraction + config.masking.random_fraction > 1:
    raise ConfigError(f'masking.mask_fraction + masking.random_fraction = '
                      f'{config.masking.mask_fraction + config.masking.random_fraction:g} '
                      f'must be at most 1')
  if config.objective == 'masked' and config.masking.rate == 0:
    raise ConfigError('masking.rate=0 masks nothing: objective=masked needs a rate in (0, 1)')

  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f'model.num_kv_heads={m.num_kv_heads} must divide '
                      f'model.num_heads={m.num_heads}')
  if m.position == 'rope' and m.head_dim % 2:
    raise ConfigError(f'model.head_dim={m.head_dim} must be even for rotary positions')
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


# Outermost first: 'data' changes slowest over the device list, 'tensor' fastest, so tensor
# parallelism (the most communication per step) lands on the closest devices.
MESH_AXES = ('data', 'fsdp', 'sequence', 'tensor')


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
        or isinstance(entry[0], bool) or not isinstance(entry[0], (int, float)) or entry[0] <= 0
        or not isinstance(entry[1], str) or not entry[1]):
      raise ConfigError(f'data.mixture entry {entry!r} must be (positive weight, source), e.g. '
                        f"(0.7, '/data/web/*.jsonl') or (0.3, 'tfds:lm1b')")
  if d.mixture and (d.path or d.tfds_name):
    raise ConfigError('data.mixture replaces data.path and data.tfds_name; leave those empty')


def is_causal(config):
  """Whether the model attends only to the past: causal LMs and classifiers built on them.
  Works on a ConfigDict or on a saved config's dict (which may predate the finetune fields)."""
  objective = config.get('objective', 'causal')
  if objective == 'classify':
    return config.get('finetune', {}).get('backbone', 'masked') == 'causal'
  return objective == 'causal'


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


def from_json(text):
  """Rebuilds a config written by `to_json` (a workdir's config.json), checked against the schema."""
  config = defaults()
  flat = {}

  def walk(d, prefix=''):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, f'{prefix}{k}.')
      else:
        flat[prefix + k] = v
  walk(json.loads(text))
  known = set(_flat_keys(config))
  for name, value in flat.items():
    if name not in known:
      raise ConfigError(f'config.json has unknown field {name!r}; written by another version?')
    *parents, leaf = name.split('.')
    node = config
    for p in parents:
      node = node[p]
    if isinstance(node[leaf], tuple) and isinstance(value, list):
      value = _tuplify(value)
    node[leaf] = value
  return validate(config)


def _tuplify(value):
  return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value
