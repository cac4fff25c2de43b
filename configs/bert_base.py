"""BERT-base (110M parameters) masked LM, RoBERTa's recipe: dynamic masking, no next-sentence
task, full 512-token rows of packed documents, large batches.

    jaxlm train --config=configs/bert_base.py --config.data.path='/data/books/*.jsonl' --workdir=...

8k sequences x 512 tokens per step for 100k steps (RoBERTa's 125M-scale budget is 500k).
Needs an accelerator; on few devices raise optimizer.grad_accum_steps until a micro-batch fits.
"""

from jaxlm.config import defaults

# The slice this config is planned for: jaxlm plan --config=configs/bert_base.py --topology=v5e-64
# (tests/test_plan_topology.py checks that it fits; BENCHMARKS.md has the figures).
TOPOLOGY = 'v5e-64'


def get_config():
  c = defaults('bert')
  c.objective = 'masked'
  c.train_steps = 100_000
  c.batch_size = 8192
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.eval_batches = 4
  c.model.num_layers = 12
  c.model.emb_dim = 768
  c.model.num_heads = 12
  c.model.mlp_dim = 3072
  c.model.vocab_size = 32768
  c.model.max_len = 512
  c.model.type_vocab_size = 2
  c.model.dropout_rate = 0.1
  c.model.dtype = 'bfloat16'
  c.optimizer.learning_rate = 6e-4
  c.optimizer.warmup_steps = 6000
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-6
  c.optimizer.weight_decay = 0.01
  c.optimizer.end_lr_fraction = 0.0
  # 16 sequences per v5e chip (16 GiB) at a time on TOPOLOGY; 1 on 8x the chips.
  c.optimizer.grad_accum_steps = 8
  # The masked-token logits (32k vocabulary, float32) 128 positions at a time.
  c.loss_chunk = 128
  c.checkpoint.save_every_steps = 2000
  return c
