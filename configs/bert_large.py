"""BERT-large (335M parameters) masked LM, RoBERTa-large's recipe.

    jaxlm train --config=configs/bert_large.py --config.data.path='/data/books/*.jsonl' --workdir=...

Same data and schedule as bert_base with a lower peak learning rate, as RoBERTa used.
"""

from jaxlm.config import defaults

# The slice this config is planned for: jaxlm plan --config=configs/bert_large.py --topology=v4-128
# (tests/test_plan_topology.py checks that it fits; BENCHMARKS.md has the figures).
TOPOLOGY = 'v4-128'


def get_config():
  c = defaults('bert')
  c.objective = 'masked'
  c.train_steps = 100_000
  c.batch_size = 8192
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.eval_batches = 4
  c.model.num_layers = 24
  c.model.emb_dim = 1024
  c.model.num_heads = 16
  c.model.mlp_dim = 4096
  c.model.vocab_size = 32768
  c.model.max_len = 512
  c.model.type_vocab_size = 2
  c.model.dropout_rate = 0.1
  c.model.dtype = 'bfloat16'
  c.model.remat_policy = 'dots_with_no_batch_dims'
  c.optimizer.learning_rate = 4e-4
  c.optimizer.warmup_steps = 10_000
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-6
  c.optimizer.weight_decay = 0.01
  c.optimizer.end_lr_fraction = 0.0
  # 32 sequences per v4 chip (32 GiB) at a time on TOPOLOGY; 1 on 4x the chips.
  c.optimizer.grad_accum_steps = 4
  # The masked-token logits (32k vocabulary, float32) 128 positions at a time.
  c.loss_chunk = 128
  c.checkpoint.save_every_steps = 2000
  return c
