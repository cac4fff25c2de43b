"""How initialisation, forward multipliers and per-parameter learning rates follow the model's
width (`model.parametrization`): 'standard', or 'mup', the Maximal Update Parametrization
(Yang et al., Tensor Programs V, 2022), under which the best learning rate, initialisation and
output scale found at a small width are the best at any width.

A parameter's role comes from its logical axes (the names that shard it), never from its name.
The width axes are 'embed', 'embed_out', 'mlp', 'heads' and 'kv_heads' (every one grows with
emb_dim when the model widens: heads at a fixed head_dim, or a fixed head count at a growing
head_dim, since 'heads' then still spans heads x head_dim); 'vocab', 'layers', None and 'kv'
(a head's own width, inside 'heads') are not. A parameter with two or more width axes is a
hidden matrix; any other one is an input-like, output-like or vector-like parameter (TP5's
"matrix-like" and "vector-like": the mup package's `infshape.ninf() == 2` test).

With m = emb_dim / mup_base_width, sigma = model.init_std, eta = the configured learning rate
(the schedule's value at each step), lambda = optimizer.weight_decay:

| parameter (logical axes) | init std | Adam rate | forward |
|---|---|---|---|
| hidden: 2+ width axes (q, k, v, attention out, MLP in/gate/out, BERT's head transform, pooler) | sigma / sqrt(m) (residual outputs also / sqrt(2 L), as in standard) | eta / m | |
| input-like: fixed -> width (token, position, type embeddings) | sigma | eta | x alpha_in, on the embedding sum (after BERT's embedding norm) |
| output-like: width -> fixed (unembedding, classifier) | sigma | eta | logits x alpha_out / m |
| vectors (norm scales, biases, the output bias) | 1 / 0 | eta | |
| attention logits | | | q.k sqrt(d_base) / d, d = head_dim (1/sqrt(d) at d = d_base) |
| weight decay (AdamW, decoupled) | | per step: eta x lambda x w for every decayed parameter, not (eta / m) x lambda | |
| depth, when mup_base_depth > 0 (CompleteP, alpha = 1) | | | each residual branch x L_base / L |

This is Table 3 of Tensor Programs V in the form of its Table 8 / the `mup` package (MuReadout:
a 1/width output multiplier with a constant-variance readout, MuAdam: eta / width_mult for
matrix-like parameters) and of Cerebras/EleutherAI's practitioner's guide (alpha_in,
alpha_out, sigma_base / sqrt(m_d), eta_base / m_d, 1/d attention). Choices where sources differ:
- Weight decay: `mup.MuAdam` multiplies torch AdamW's (lr-coupled) decay by width_mult for
  matrix-like parameters, so each step decays them by eta x lambda, the same at every width;
  here the decayed-weights term is added after the width scaling, which is the same rule.
- Tied embeddings are consistent under muP (the input and output roles both want sigma and eta
  under Adam): the shared matrix keeps them, and alpha_out / m multiplies the logits, not it
  (the mup package's MuSharedReadout).
- Adam's epsilon is not scaled (CompleteP scales it by 1/m): 1e-8 is far below the gradients'
  size at the widths jaxlm trains.
- Depth: CompleteP with alpha = 1 scales each residual branch by L_base / L and, with that
  alpha, needs no per-layer change of learning rate (Dey et al., 2025, Table 1).

At emb_dim = mup_base_width, head_dim = mup_base_head_dim, num_layers = mup_base_depth (or
depth scaling off) and alpha_in = alpha_out = 1, 'mup' computes exactly the 'standard' model and
update. A new parametrization is a class here plus one REGISTRY line.
"""

import math

from jaxlm.errors import ConfigError

# Logical axes whose size grows with emb_dim (see the docstring).
WIDTH_AXES = ('embed', 'embed_out', 'mlp', 'heads', 'kv_heads')


def is_hidden(axes):
  """Whether a parameter with these logical axes is a hidden (width x width) matrix."""
  return sum(a in WIDTH_AXES for a in axes) >= 2


class Standard:
  """Every multiplier 1: the model's init_std everywhere, one learning rate for all."""
  per_parameter_rates = False  # The optimizer needs the parameters' logical axes.

  def width_multiplier(self, m):
    return 1.0

  def init_std(self, m, axes, std):
    """The init std of a kernel with logical axes `axes` whose standard std is `std`."""
    return std

  def learning_rate_multiplier(self, m, axes):
    """The factor on the learning rate of a parameter with logical axes `axes`."""
    return 1.0

  def input_multiplier(self, m):
    return 1.0

  def output_multiplier(self, m):
    return 1.0

  def query_multiplier(self, m):
    """Attention's queries are multiplied by this before the 1/sqrt(head_dim) of attention."""
    return 1.0

  def residual_multiplier(self, m):
    return 1.0

  def check(self, m):
    """ConfigErrors for model fields this parametrization cannot use."""


class MuP(Standard):
  """The Maximal Update Parametrization: the table in the module docstring."""
  per_parameter_rates = True

  def width_multiplier(self, m):
    return m.emb_dim / m.mup_base_width

  def init_std(self, m, axes, std):
    return std / math.sqrt(self.width_multiplier(m)) if is_hidden(axes) else std

  def learning_rate_multiplier(self, m, axes):
    return 1.0 / self.width_multiplier(m) if is_hidden(axes) else 1.0

  def input_multiplier(self, m):
    return m.mup_input_multiplier

  def output_multiplier(self, m):
    return m.mup_output_multiplier / self.width_multiplier(m)

  def query_multiplier(self, m):
    # q.k / sqrt(d) x sqrt(d_base / d) = q.k sqrt(d_base) / d.
    return math.sqrt(m.mup_base_head_dim / m.head_dim)

  def residual_multiplier(self, m):
    return m.mup_base_depth / m.num_layers if m.mup_base_depth else 1.0

  def check(self, m):
    for field in ('mup_base_width', 'mup_base_head_dim', 'mup_input_multiplier',
                  'mup_output_multiplier'):
      if isinstance(m[field], bool) or not m[field] > 0:
        raise ConfigError(f'model.{field}={m[field]!r} must be positive')
    if m.mup_base_depth < 0:
      raise ConfigError(f'model.mup_base_depth={m.mup_base_depth} must be >= 0 (0 = no depth '
                        f'scaling)')


# model.parametrization -> its class. Config validation reads the names (nothing heavy here).
REGISTRY = {'standard': Standard, 'mup': MuP}


def get(m):
  """The parametrization of model config `m`."""
  return REGISTRY[m.parametrization]()


def to_standard(m, params, multiply=lambda a, k: a * k):
  """Parameters of the model `m` describes, rewritten so that the same model under the
  standard parametrization computes the same logits: every multiplier folded into the weights
  that follow it (`params`: the parameter tree, numpy or jax arrays; not modified). The
  Hugging Face export's layouts know no multipliers.

  - queries x sqrt(d_base / d) -> the query kernel and bias (RoPE is linear in q);
  - residual branches x L_base / L -> the attention output and MLP output kernels and biases;
  - alpha_in -> the token, position and type embeddings, or for post-norm models (BERT) the
    embedding norm's scale and bias, which follow it;
  - alpha_out / m -> the unembedding, or with tied embeddings the norm just before the output
    layer (the final norm, or BERT's head norm): its scale and bias.
  A tied pre-norm model with alpha_in != 1 has no such form (the shared matrix would need two
  scales): a one-line ConfigError.
  """
  p = get(m)
  params = _copy(params)
  blocks = [params['layers']] if 'layers' in params else [
      params[f'layers_{i}'] for i in range(m.num_layers)]

  def scale(tree, path, k):
    if k == 1.0:
      return
    *parents, leaf = path.split('/')
    for key in parents:
      tree = tree[key]
    for name in ((leaf,) if leaf else ('kernel', 'scale', 'bias', 'embedding')):
      if name in tree:
        tree[name] = multiply(tree[name], k)

  for block in blocks:
    scale(block, 'attention/query/', p.query_multiplier(m))
    scale(block, 'attention/out/', p.residual_multiplier(m))
    scale(block, 'mlp/wo/', p.residual_multiplier(m))
  alpha_in = p.input_multiplier(m)
  if m.norm_position == 'post':
    scale(params, 'embed_norm/', alpha_in)
  elif m.tied_embeddings and alpha_in != 1.0:
    raise ConfigError(f'model.mup_input_multiplier={alpha_in} with tied embeddings has no '
                      f'standard (Hugging Face) form: the shared matrix cannot carry both '
                      f'multipliers; train with mup_input_multiplier=1 or untied embeddings')
  else:
    for name in ('token_embed', 'position_embed', 'type_embed'):
      if name in params:
        scale(params, f'{name}/', alpha_in)
  k = p.output_multiplier(m)
  if not m.tied_embeddings:
    scale(params, 'unembed/', k)
  elif m.head_transform:
    scale(params, 'head_norm/', k)
  elif m.norm_position == 'pre':
    scale(params, 'final_norm/', k)
  elif k != 1.0:
    raise ConfigError('a tied post-norm model without a head transform has no norm before '
                      'its output layer to carry the muP output multiplier')
  return params


def _copy(tree):
  """The nested dicts copied (the arrays shared): `to_standard` replaces leaves, never writes
  into them."""
  return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}
