"""The Hugging Face layouts of jaxlm's families (Llama, GPT-2, BERT), as data.

A `Layout` says how a Hugging Face `config.json` maps onto `config.model` and how each
safetensors tensor maps onto a jaxlm parameter; `jaxlm/convert.py` reads these tables in both
directions, so adding a family is adding a row here, not a branch there.
"""

import dataclasses
import math

import numpy as np

from jaxlm import objectives
from jaxlm.errors import ConfigError
from jaxlm.schema import FAMILIES

# Which jaxlm leaf of a module is which Hugging Face tensor suffix, by kind of module.
LEAVES = {'linear': {'kernel': 'weight', 'bias': 'bias'},  # torch Linear: weight [out, in]
          'conv1d': {'kernel': 'weight', 'bias': 'bias'},  # GPT-2's Conv1D: weight [in, out]
          'norm': {'scale': 'weight', 'bias': 'bias'},
          'embed': {'embedding': 'weight'},
          'param': {None: None}}  # A bare parameter (BERT's output bias): names are complete.
# Legacy suffixes still found in published checkpoints (TF-era BERT LayerNorms).
LEGACY_SUFFIX = {'.weight': '.gamma', '.bias': '.beta'}


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One Hugging Face module and the jaxlm module(s) holding the same weights.

  `jaxlm` is a module path ('/'-separated; inside a block for per-layer tensors); several paths
  are one fused tensor split along its output axis (GPT-2's c_attn holds query, key and value).
  `in_dims` counts the kernel's leading input axes (2 for the attention output [heads, kv, embed]).
  """
  hf: str
  jaxlm: tuple
  kind: str
  in_dims: int = 1


def t(hf, jaxlm, kind, in_dims=1):
  return Tensor(hf, jaxlm if isinstance(jaxlm, tuple) else (jaxlm,), kind, in_dims)


@dataclasses.dataclass(frozen=True)
class Layout:
  family: str  # jaxlm's model.family
  architecture: str  # the transformers class written to config.json
  model_type: str
  objective: str
  # jaxlm model field -> (HF config key, value when the key is absent; a callable of the HF
  # config computes it). jaxlm's 0 for num_kv_heads/head_dim means "derived", as in HF.
  fields: dict
  requires: dict  # HF key -> (allowed values, value when absent): what jaxlm implements.
  constants: dict  # Written to an exported config.json as they are.
  top: tuple  # Tensors outside the blocks.
  layer_prefix: str  # '{i}' = the block's index.
  layer: tuple
  base_prefix: str  # The prefix that headless checkpoints (GPT2Model, BertModel) lack.
  ignored: tuple  # Buffers and unused heads that checkpoints may carry (name substrings).
  # HF key -> the key it must equal, one jaxlm field standing for both (Llama's mlp_bias
  # follows attention_bias: jaxlm has one use_bias for every dense layer).
  twins: dict = dataclasses.field(default_factory=dict)

  def fixed(self):
    """jaxlm model fields this layout cannot represent otherwise: the family preset minus the
    fields read from config.json, and no token types for the decoders."""
    values = {k: v for k, v in FAMILIES[self.family].items() if k not in self.fields}
    if 'type_vocab_size' not in self.fields:
      values['type_vocab_size'] = 0
    return values


LLAMA = Layout(
    family='llama', architecture='LlamaForCausalLM', model_type='llama', objective='causal',
    fields={'num_layers': ('num_hidden_layers', None), 'emb_dim': ('hidden_size', None),
            'num_heads': ('num_attention_heads', None),
            'num_kv_heads': ('num_key_value_heads', 0), 'head_dim': ('head_dim', 0),
            'mlp_dim': ('intermediate_size', None), 'vocab_size': ('vocab_size', None),
            'max_len': ('max_position_embeddings', 2048), 'norm_eps': ('rms_norm_eps', 1e-6),
            'rope_theta': ('rope_theta', 10000.0), 'rope_type': ('rope_type', 'default'),
            'rope_scaling_factor': ('rope_factor', 8.0),
            'rope_low_freq_factor': ('rope_low_freq_factor', 1.0),
            'rope_high_freq_factor': ('rope_high_freq_factor', 4.0),
            'rope_original_max_len': ('rope_original_max_position_embeddings', 8192),
            'use_bias': ('attention_bias', False),
            'tied_embeddings': ('tie_word_embeddings', False)},
    requires={'hidden_act': (('silu',), 'silu'),
              'rope_type': (('default', 'llama3'), 'default'),
              'pretraining_tp': ((1,), 1)},
    constants={'hidden_act': 'silu', 'pretraining_tp': 1},
    top=(t('model.embed_tokens', 'token_embed', 'embed'), t('model.norm', 'final_norm', 'norm'),
         t('lm_head', 'unembed', 'linear')),
    layer_prefix='model.layers.{i}.',
    layer=(t('self_attn.q_proj', 'attention/query', 'linear'),
           t('self_attn.k_proj', 'attention/key', 'linear'),
           t('self_attn.v_proj', 'attention/value', 'linear'),
           t('self_attn.o_proj', 'attention/out', 'linear', 2),
           t('mlp.gate_proj', 'mlp/wi_gate', 'linear'), t('mlp.up_proj', 'mlp/wi', 'linear'),
           t('mlp.down_proj', 'mlp/wo', 'linear'),
           t('input_layernorm', 'attention_norm', 'norm'),
           t('post_attention_layernorm', 'mlp_norm', 'norm')),
    base_prefix='model.', ignored=('rotary_emb.inv_freq', 'lm_head.weight'),
    twins={'mlp_bias': 'attention_bias'})

GPT2 = Layout(
    family='gpt2', architecture='GPT2LMHeadModel', model_type='gpt2', objective='causal',
    fields={'num_layers': ('n_layer', None), 'emb_dim': ('n_embd', None),
            'num_heads': ('n_head', None), 'mlp_dim': ('n_inner', lambda hf: 4 * hf['n_embd']),
            'vocab_size': ('vocab_size', None), 'max_len': ('n_positions', 1024),
            'norm_eps': ('layer_norm_epsilon', 1e-5),
            'tied_embeddings': ('tie_word_embeddings', True)},
    requires={'activation_function': (('gelu_new', 'gelu_pytorch_tanh'), 'gelu_new'),
              'scale_attn_weights': ((True,), True),
              'scale_attn_by_inverse_layer_idx': ((False,), False)},
    constants={'activation_function': 'gelu_new', 'scale_attn_weights': True,
               'scale_attn_by_inverse_layer_idx': False},
    top=(t('transformer.wte', 'token_embed', 'embed'),
         t('transformer.wpe', 'position_embed', 'embed'),
         t('transformer.ln_f', 'final_norm', 'norm'), t('lm_head', 'unembed', 'linear')),
    layer_prefix='transformer.h.{i}.',
    layer=(t('attn.c_attn', ('attention/query', 'attention/key', 'attention/value'), 'conv1d'),
           t('attn.c_proj', 'attention/out', 'conv1d', 2), t('mlp.c_fc', 'mlp/wi', 'conv1d'),
           t('mlp.c_proj', 'mlp/wo', 'conv1d'), t('ln_1', 'attention_norm', 'norm'),
           t('ln_2', 'mlp_norm', 'norm')),
    base_prefix='transformer.', ignored=('.attn.bias', '.attn.masked_bias', 'lm_head.weight'))

BERT = Layout(
    family='bert', architecture='BertForMaskedLM', model_type='bert', objective='masked',
    fields={'num_layers': ('num_hidden_layers', None), 'emb_dim': ('hidden_size', None),
            'num_heads': ('num_attention_heads', None), 'mlp_dim': ('intermediate_size', None),
            'vocab_size': ('vocab_size', None), 'max_len': ('max_position_embeddings', 512),
            'type_vocab_size': ('type_vocab_size', 2), 'norm_eps': ('layer_norm_eps', 1e-12)},
    # Untied BERT keeps a second output bias (decoder.bias) whose use varies by transformers
    # version; published BERTs are tied, and jaxlm converts only those.
    requires={'hidden_act': (('gelu',), 'gelu'), 'tie_word_embeddings': ((True,), True),
              'position_embedding_type': (('absolute',), 'absolute'),
              'is_decoder': ((False,), False)},
    constants={'hidden_act': 'gelu', 'position_embedding_type': 'absolute', 'is_decoder': False,
               'tie_word_embeddings': True},
    top=(t('bert.embeddings.word_embeddings', 'token_embed', 'embed'),
         t('bert.embeddings.position_embeddings', 'position_embed', 'embed'),
         t('bert.embeddings.token_type_embeddings', 'type_embed', 'embed'),
         t('bert.embeddings.LayerNorm', 'embed_norm', 'norm'),
         t('cls.predictions.transform.dense', 'head_dense', 'linear'),
         t('cls.predictions.transform.LayerNorm', 'head_norm', 'norm'),
         t('cls.predictions.bias', 'output_bias', 'param')),
    layer_prefix='bert.encoder.layer.{i}.',
    layer=(t('attention.self.query', 'attention/query', 'linear'),
           t('attention.self.key', 'attention/key', 'linear'),
           t('attention.self.value', 'attention/value', 'linear'),
           t('attention.output.dense', 'attention/out', 'linear', 2),
           t('attention.output.LayerNorm', 'attention_norm', 'norm'),
           t('intermediate.dense', 'mlp/wi', 'linear'), t('output.dense', 'mlp/wo', 'linear'),
           t('output.LayerNorm', 'mlp_norm', 'norm')),
    base_prefix='bert.',
    ignored=('position_ids', 'cls.predictions.decoder.', 'bert.pooler.', 'cls.seq_relationship.'))

LAYOUTS = {layout.model_type: layout for layout in (LLAMA, GPT2, BERT)}
BY_FAMILY = {layout.family: layout for layout in LAYOUTS.values()}


# --- config.json <-> config.model -----------------------------------------------------------

# RoPE settings as normalize() lifts them to the top level of a config.json dict -> their key
# inside rope_parameters (transformers 5) or rope_scaling (earlier versions).
ROPE_KEYS = {'rope_theta': 'rope_theta', 'rope_type': 'rope_type', 'rope_factor': 'factor',
             'rope_low_freq_factor': 'low_freq_factor',
             'rope_high_freq_factor': 'high_freq_factor',
             'rope_original_max_position_embeddings': 'original_max_position_embeddings'}


def normalize(hf):
  """A config.json dict with its RoPE settings at the top level (see ROPE_KEYS)."""
  hf = dict(hf)
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  if not isinstance(rope, dict):
    raise ConfigError(f'rope_parameters / rope_scaling must be a JSON object, not {rope!r}')
  for key, inner in ROPE_KEYS.items():
    if inner in rope:
      hf[key] = rope[inner]
  hf['rope_type'] = rope.get('rope_type', rope.get('type', 'default'))
  return hf


def _nest_rope(hf):
  """The inverse of normalize for an exported config.json: rope_parameters for transformers 5,
  rope_theta and (when scaled) rope_scaling for earlier versions."""
  rope = {inner: hf.pop(key) for key, inner in ROPE_KEYS.items() if key in hf}
  if not rope:
    return hf
  if rope['rope_type'] == 'default':
    rope = {'rope_type': 'default', 'rope_theta': rope['rope_theta']}
  else:
    hf['rope_scaling'] = {k: v for k, v in rope.items() if k != 'rope_theta'}
  hf['rope_theta'] = rope['rope_theta']
  hf['rope_parameters'] = rope
  return hf


def layout_of(hf, where):
  model_type = hf.get('model_type')
  if model_type not in LAYOUTS:
    raise ConfigError(f'{where}: model_type {model_type!r} is not supported; jaxlm converts '
                      f'{", ".join(sorted(LAYOUTS))}')
  return LAYOUTS[model_type]


def model_fields(hf, where):
  """(layout, the jaxlm model fields of a Hugging Face config.json dict)."""
  if not isinstance(hf, dict):
    raise ConfigError(f'{where} must hold a JSON object, not a {type(hf).__name__}')
  try:
    hf = normalize(hf)
  except ConfigError as e:
    raise ConfigError(f'{where}: {e}') from e
  layout = layout_of(hf, where)
  for key, (allowed, absent) in layout.requires.items():
    value = hf.get(key, absent)
    if value not in allowed:
      raise ConfigError(f'{where}: {key}={value!r} is not supported for {layout.model_type} '
                        f'(jaxlm implements {", ".join(map(repr, allowed))})')
  for key, twin in layout.twins.items():
    if hf.get(key, False) != hf.get(twin, False):
      raise ConfigError(f'{where}: {twin} and {key} differ; jaxlm has one model field for both')
  fields = dict(layout.fixed(), family=layout.family)
  for field, (key, absent) in layout.fields.items():
    value = hf.get(key)
    if value is None:
      if absent is None:
        raise ConfigError(f'{where} has no {key}; it is needed for model.{field}')
      value = absent(hf) if callable(absent) else absent
    fields[field] = value
  return layout, fields


def hf_config(config, tokenizer=None):
  """The config.json dict of a jaxlm model, or a ConfigError naming the first model field a
  Hugging Face model of its family cannot have."""
  layout = exportable(config)
  m = config.model
  hf = {'architectures': [layout.architecture], 'model_type': layout.model_type,
        'dtype': m.param_dtype, 'torch_dtype': m.param_dtype, **layout.constants}
  for field, (key, _) in layout.fields.items():
    hf[key] = m[field]
  for key, twin in layout.twins.items():
    hf[key] = hf[twin]
  hf = _nest_rope(hf)
  if tokenizer is not None:
    for key, i in (('bos_token_id', tokenizer.bos_id), ('eos_token_id', tokenizer.eos_id),
                   ('pad_token_id', tokenizer.pad_id)):
      hf[key] = i if i >= 0 else None
  return hf


def exportable(config):
  """The layout of the config's family, after checking that it fits the model exactly."""
  m = config.model
  if m.family not in BY_FAMILY:
    raise ConfigError(f'model.family={m.family!r} has no Hugging Face layout (families '
                      f'with one: {", ".join(BY_FAMILY)})')
  layout = BY_FAMILY[m.family]
  name = objectives.name(config)
  if name != layout.objective:
    raise ConfigError(f'objective={name!r}: a Hugging Face {layout.architecture} '
                      f'is a {layout.objective} model; only those export')
  for field, value in layout.fixed().items():
    if m[field] != value:
      raise ConfigError(f'model.{field}={m[field]!r} cannot be exported: a Hugging Face '
                        f'{layout.architecture} has {field}={value!r}')
  if m.head_dim * m.num_heads != m.emb_dim and 'head_dim' not in layout.fields:
    raise ConfigError(f'model.head_dim={m.head_dim} x num_heads={m.num_heads} != emb_dim='
                      f'{m.emb_dim}: {layout.architecture} has no separate head_dim')
  if 'type_vocab_size' in layout.fields and m.type_vocab_size < 1:
    raise ConfigError(f'model.type_vocab_size=0 cannot be exported: a Hugging Face '
                      f'{layout.architecture} has at least one token type')
  if m.num_kv_heads != m.num_heads and 'num_kv_heads' not in layout.fields:
    raise ConfigError(f'model.num_kv_heads={m.num_kv_heads}: {layout.architecture} has no '
                      f'grouped-query attention')
  return layout


# --- tensors ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Entry:
  """One Hugging Face tensor: its name, the jaxlm leaves it holds ((path, layer or None), ...)
  and how to reshape between the two."""
  name: str
  leaves: tuple
  kind: str
  leaf: str
  in_dims: int


def entries(layout, params, scanned, num_layers):
  """Every tensor the jaxlm parameter tree `params` (arrays or shapes) has, in table order."""
  out = []

  def add(prefix, tensor, layer):
    for leaf, suffix in LEAVES[tensor.kind].items():
      paths = [p if leaf is None else f'{p}/{leaf}' for p in tensor.jaxlm]
      if all(_has(params, _full(p, layer, scanned)) for p in paths):
        name = prefix + tensor.hf + ('' if suffix is None else f'.{suffix}')
        out.append(Entry(name, tuple((p, layer) for p in paths), tensor.kind, leaf,
                         tensor.in_dims))

  for tensor in layout.top:
    add('', tensor, None)
  for i in range(num_layers):
    for tensor in layout.layer:
      add(layout.layer_prefix.format(i=i), tensor, i)
  return out


def _full(path, layer, scanned):
  if layer is None:
    return path
  return f'layers/{path}' if scanned else f'layers_{layer}/{path}'


def _has(tree, path):
  for key in path.split('/'):
    if not isinstance(tree, dict) or key not in tree:
      return False
    tree = tree[key]
  return True


def get(tree, path, layer, scanned):
  for key in _full(path, layer, scanned).split('/'):
    tree = tree[key]
  return tree[layer] if layer is not None and scanned else tree


def to_hf(entry, arrays):
  """The Hugging Face tensor of `entry` from its jaxlm arrays (numpy, in `entry.leaves` order)."""
  parts = [_to_hf_one(entry, a) for a in arrays]
  return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=_fused_axis(entry))


def _to_hf_one(entry, a):
  if entry.leaf == 'kernel':
    matrix = a.reshape(math.prod(a.shape[:entry.in_dims]), -1)
    return np.ascontiguousarray(matrix.T) if entry.kind == 'linear' else matrix
  if entry.leaf == 'bias' and entry.kind in ('linear', 'conv1d'):
    return a.reshape(-1)
  return a


def _fused_axis(entry):
  """The output axis, along which fused tensors are concatenated."""
  return 1 if entry.kind == 'conv1d' and entry.leaf == 'kernel' else 0


def _hf_shape_one(entry, shape):
  if entry.leaf == 'kernel':
    shape_in, shape_out = math.prod(shape[:entry.in_dims]), math.prod(shape[entry.in_dims:])
    return (shape_out, shape_in) if entry.kind == 'linear' else (shape_in, shape_out)
  if entry.leaf == 'bias' and entry.kind in ('linear', 'conv1d'):
    return (math.prod(shape),)
  return tuple(shape)


def hf_shape(entry, shapes):
  """The shape the Hugging Face tensor of `entry` has for jaxlm leaves of `shapes`."""
  parts = [_hf_shape_one(entry, s) for s in shapes]
  axis = _fused_axis(entry)
  return (*parts[0][:axis], sum(p[axis] for p in parts), *parts[0][axis + 1:])


def from_hf(entry, tensor, shapes):
  """The jaxlm arrays of `entry` (one per leaf, of `shapes`) from its Hugging Face tensor,
  whose shape must be `hf_shape(entry, shapes)`."""
  axis = _fused_axis(entry)
  ends = np.cumsum([_hf_shape_one(entry, s)[axis] for s in shapes])[:-1]
  pieces = np.split(tensor, ends, axis=axis) if len(shapes) > 1 else [tensor]
  return [(p.T if entry.leaf == 'kernel' and entry.kind == 'linear' else p).reshape(s)
          for p, s in zip(pieces, shapes)]
