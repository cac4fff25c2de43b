"""A GPT-2-style model small enough to train on a laptop CPU in a few minutes.

    jaxlm train --config=configs/gpt_tiny.py --workdir=/tmp/gpt_tiny

Trains on the Python standard library's source (real text on every machine).
"""

from jaxlm.config import defaults


def get_config():
  c = defaults('gpt2')
  c.train_steps = 160
  c.batch_size = 16
  c.log_every_steps = 25
  c.eval_every_steps = 40
  c.eval_batches = 4
  c.model.num_layers = 4
  c.model.emb_dim = 192
  c.model.num_heads = 4
  c.model.mlp_dim = 768
  c.model.vocab_size = 4096
  c.model.max_len = 256
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.1
  c.checkpoint.save_every_steps = 100
  c.data.tokenizer_sample_bytes = 8_000_000
  return c
