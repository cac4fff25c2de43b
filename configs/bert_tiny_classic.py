"""configs/bert_tiny.py with the classic BERT recipe: post-norm blocks, learned positions, a
plain GELU MLP with biases and 15% masking (what bert_tiny shipped before; BENCHMARKS.md
compares the two at the same CPU cost).

    jaxlm train --config=configs/bert_tiny_classic.py --workdir=/tmp/bert_tiny_classic

Fine-tune it with configs/finetune_cls.py and --config.model.family=bert --config.model.mlp_dim=768.
"""

from jaxlm.config import based_on


def get_config():
  c = based_on(__file__, 'bert_tiny.py')
  c.model.family = 'bert'
  for field in ('norm', 'norm_eps', 'norm_position', 'position', 'mlp_activation', 'gated_mlp',
                'use_bias', 'tied_embeddings', 'head_transform', 'output_bias'):
    c.model[field] = None  # The family's value (config validation fills it in).
  c.model.mlp_dim = 768
  c.masking.rate = 0.15
  return c
