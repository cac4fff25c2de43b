"""The Transformer: embeddings, a stack of blocks, a final norm and an output head.

`causal=True` is a GPT/Llama decoder; `causal=False` the same stack attending both ways (a
BERT-style encoder). The head predicts tokens, or with `num_labels` classifies the sequence.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT

from jaxlm import matmuls, parametrization
from jaxlm import model as model_lib
from jaxlm.model import layers

# The projections' outputs, named in layers.py: keeping them (and recomputing norms,
# activations and attention itself) is MaxText's 'minimal' policy.
PROJECTIONS = ('query_proj', 'key_proj', 'value_proj', 'out_proj', 'mlp_wi', 'mlp_gate', 'mlp_wo')

# Remat policies of the model's own names (model.REMAT_POLICIES: 'minimal', 'save_qkv_proj',
# 'offload'); the others are JAX's.
MINIMAL = jax.checkpoint_policies.save_only_these_names(*PROJECTIONS)
SAVE_QKV_PROJ = jax.checkpoint_policies.save_only_these_names('query_proj', 'key_proj',
                                                              'value_proj')
# The same as 'minimal', but kept in host memory until the backward pass (GPU and TPU).
OFFLOAD = jax.checkpoint_policies.save_and_offload_only_these_names(
    names_which_can_be_saved=[], names_which_can_be_offloaded=list(PROJECTIONS),
    offload_src='device', offload_dst='pinned_host')


class Transformer(nn.Module):
  """tokens [B, T] -> logits [B, T, vocab], or [B, num_labels] when num_labels > 0.

  Positions and segment ids describe packed rows: attention never crosses a segment.
  """
  cfg: object  # The model config (a FrozenConfigDict of config.model).
  causal: bool = True
  num_labels: int = 0  # > 0: a sequence classifier instead of a token predictor.

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, token_types=None,
               deterministic=True, project=True, decode=False, predict_positions=None,
               final_states=None):
    """predict_positions [B, P]: run the head at these positions only (a masked LM's chosen
    tokens; objectives.masked.Masking), giving [B, P, vocab].
    project=False stops before the output layer: the final states [B, T, embed], for a
    loss that projects them itself (objectives.base.chunked_loss, with `lm_head`).
    final_states [..., embed]: such states; only the output layer runs (see `lm_head`).
    decode=True reads and extends the key/value cache (layers.Attention; generate.py)."""
    cfg = self.cfg
    embed = self.embedding(cfg.vocab_size, 'token_embed', 'vocab')
    if final_states is not None:
      return self.output_layer(final_states, embed)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = embed(tokens)
    if cfg.position == 'learned':
      x += self.embedding(cfg.max_len, 'position_embed')(positions)
    if cfg.type_vocab_size:
      types = jnp.zeros_like(tokens) if token_types is None else token_types
      # A one-hot product, not a lookup: the gradient of a lookup in a 2-row table is a
      # scatter-add that serialises on those rows (a quarter of BERT-large's step on an H200).
      table = self.embedding(cfg.type_vocab_size, 'type_embed').embedding
      x += jnp.einsum('btk,kd->btd', jax.nn.one_hot(types, cfg.type_vocab_size, dtype=table.dtype),
                      table, precision=jax.lax.Precision.HIGHEST)
    if cfg.norm_position == 'post':  # Post-norm blocks expect a normalised input.
      x = layers.norm(cfg, 'embed_norm')(x)
    scale = parametrization.get(cfg).input_multiplier(cfg)
    if scale != 1.0:  # muP's alpha_in, after the norm (which would undo it).
      x = x * scale
    x = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x)
    x = layers.constrain(x.astype(layers.dtype(cfg.dtype)), ('batch', 'length', 'embed'))

    x = self.blocks(x, positions, segment_ids, deterministic, decode)
    if cfg.norm_position == 'pre':  # Post-norm blocks end normalised already.
      x = layers.norm(cfg, 'final_norm')(x)
    if self.num_labels:
      return self.classify(x, segment_ids, deterministic)
    length_axis = 'length'
    if predict_positions is not None:
      x = jnp.take_along_axis(x, predict_positions[..., None], axis=1)
      length_axis = None  # P gathered positions need not divide a sequence-sharded axis.
    if cfg.head_transform:
      x = layers.activation(cfg)(
          layers.dense(cfg, cfg.emb_dim, ('embed', 'embed_out'), 'head_dense')(x))
      x = layers.norm(cfg, 'head_norm')(x)
    if not project:
      return x
    return layers.constrain(self.output_layer(x, embed), ('batch', length_axis, 'vocab'))

  def lm_head(self, x):
    """Logits [..., vocab] of final states x [..., embed] (from project=False): the output
    layer alone, for a loss that projects the states itself, chunk by chunk. The step asks
    the model (`model.apply(variables, x, method='lm_head')`) instead of knowing its
    parameter names, and the layer runs its own matmul kind."""
    return self(None, final_states=x)

  def output_layer(self, x, embed):
    """The output layer: the token embedding transposed (tied) or its own kernel, through the
    matmul kind of layer 'output', plus the output bias."""
    cfg = self.cfg
    if cfg.tied_embeddings:
      kind = matmuls.kind_of(cfg, 'output')
      table = embed.embedding.astype(layers.dtype(cfg.dtype)).T  # As nn.Embed.attend.
      logits = layers.dot_general(kind, 'output_matmul')(
          x.astype(table.dtype), table, (((x.ndim - 1,), (0,)), ((), ())))
    else:
      logits = layers.dense(cfg, cfg.vocab_size, ('embed', 'vocab'), 'unembed', bias=False,
                            layer='output')(x)
    logits = self.output_multiplied(logits)
    if cfg.output_bias:
      logits += self.param('output_bias', nn.with_logical_partitioning(
          nn.initializers.zeros, ('vocab',)), (cfg.vocab_size,),
                           layers.dtype(cfg.param_dtype)).astype(logits.dtype)
    return logits

  def output_multiplied(self, x):
    """x (logits, a classifier's input) times muP's output multiplier, when there is one."""
    scale = parametrization.get(self.cfg).output_multiplier(self.cfg)
    return x * scale if scale != 1.0 else x

  def embedding(self, num, name, axis=None):
    """A lookup table read in the parameters' dtype, cast to model.dtype after the embeddings
    are summed: its gradient's scatter-add then runs in float32, not bfloat16 (which took 56 ms
    of a 391 ms BERT-large step on an H200 and rounds every row's summed update)."""
    cfg = self.cfg
    return nn.Embed(num, cfg.emb_dim, name=name, dtype=layers.dtype(cfg.param_dtype),
                    param_dtype=layers.dtype(cfg.param_dtype),
                    embedding_init=layers.normal(cfg.init_std, (axis, 'embed')))

  def classify(self, x, segment_ids, deterministic):
    """Class logits from one state per row: the first token ([CLS]) of a bidirectional model
    through a tanh pooler (BERT), or the last real token of a causal one (which alone has
    seen the whole text)."""
    cfg = self.cfg
    if self.causal:
      length = jnp.sum(segment_ids > 0, axis=1) if segment_ids is not None else x.shape[1]
      pooled = jnp.take_along_axis(
          x, jnp.maximum(length - 1, 0).reshape(-1, 1, 1), axis=1)[:, 0]
    else:
      pooled = jnp.tanh(layers.dense(cfg, cfg.emb_dim, ('embed', 'embed_out'), 'pooler')(
          x[:, 0]))
    pooled = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(pooled)
    # The multiplier on the input, not the logits, leaves the bias's rate alone (MuReadout).
    return layers.dense(cfg, self.num_labels, ('embed', None), 'classifier', bias=True,
                        layer='output')(self.output_multiplied(pooled))

  def blocks(self, x, positions, segment_ids, deterministic, decode):
    cfg = self.cfg
    block = layers.Block
    if cfg.remat_policy != 'none' and not decode:
      # Under scan each layer is its own loop iteration, so CSE cannot undo the remat.
      block = nn.remat(block, policy=model_lib.get(model_lib.REMAT_POLICIES, cfg.remat_policy),
                       prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(block, length=cfg.num_layers,
                      variable_axes={'params': 0, 'cache': 0, model_lib.AUX_LOSS: 0,
                                     OVERWRITE_WITH_GRADIENT: 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=(nn.broadcast, nn.broadcast),
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(cfg, self.causal, deterministic, decode, name='layers')(
          x, positions, segment_ids)
      return x
    for i in range(cfg.num_layers):
      x, _ = block(cfg, self.causal, deterministic, decode, name=f'layers_{i}')(
          x, positions, segment_ids)
    return x
