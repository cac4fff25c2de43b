"""The Transformer: embeddings, a stack of blocks, a final norm and the output projection.

`causal=True` is a GPT/Llama decoder; `causal=False` the same stack attending both ways.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.model import layers

# What a rematerialised block keeps for the backward pass instead of recomputing.
REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
  """tokens [B, T] -> logits [B, T, vocab]; positions and segment ids describe packed rows."""
  cfg: object  # The model config (a FrozenConfigDict of config.model).
  causal: bool = True

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, deterministic=True):
    cfg = self.cfg
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    embed = nn.Embed(cfg.vocab_size, cfg.emb_dim, name='token_embed',
                     dtype=layers.dtype(cfg.dtype), param_dtype=layers.dtype(cfg.param_dtype),
                     embedding_init=layers.normal(cfg.init_std, ('vocab', 'embed')))
    x = embed(tokens)
    if cfg.position == 'learned':
      x += nn.Embed(cfg.max_len, cfg.emb_dim, name='position_embed',
                    dtype=layers.dtype(cfg.dtype), param_dtype=layers.dtype(cfg.param_dtype),
                    embedding_init=layers.normal(cfg.init_std, (None, 'embed')))(positions)
    x = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x)
    x = layers.constrain(x.astype(layers.dtype(cfg.dtype)), ('batch', 'length', 'embed'))

    x = self.blocks(x, positions, layers.attention_mask(segment_ids), deterministic)
    x = layers.norm(cfg, 'final_norm')(x)
    if cfg.tied_embeddings:
      logits = embed.attend(x)
    else:
      logits = layers.dense(cfg, cfg.vocab_size, ('embed', 'vocab'), 'unembed', bias=False)(x)
    return layers.constrain(logits, ('batch', 'length', 'vocab'))

  def blocks(self, x, positions, mask, deterministic):
    cfg = self.cfg
    block = layers.Block
    if cfg.remat_policy != 'none':
      # Under scan each layer is its own loop iteration, so CSE cannot undo the remat.
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat_policy],
                       prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(block, length=cfg.num_layers, variable_axes={'params': 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=(nn.broadcast, nn.broadcast),
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(cfg, self.causal, deterministic, name='layers')(x, positions, mask)
      return x
    for i in range(cfg.num_layers):
      x, _ = block(cfg, self.causal, deterministic, name=f'layers_{i}')(x, positions, mask)
    return x
