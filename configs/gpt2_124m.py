"""GPT-2 small (124M parameters), nanoGPT's reproduction recipe.

    jaxlm train --config=configs/gpt2_124m.py --config.data.path='/data/owt/*.jsonl' --workdir=...

About 0.5M tokens per step; 20k steps is ~10B tokens (4x Chinchilla-optimal for this size).
Needs an accelerator; on one GPU raise optimizer.grad_accum_steps until a micro-batch fits.
"""

from jaxlm.config import defaults

# The slice this config is planned for: jaxlm plan --config=configs/gpt2_124m.py --topology=v5e-16
# (tests/test_plan_topology.py checks that it fits; BENCHMARKS.md has the figures).
TOPOLOGY = 'v5e-16'


def get_config():
  c = defaults('gpt2')
  c.train_steps = 20_000
  c.batch_size = 512
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.eval_batches = 20
  c.model.num_layers = 12
  c.model.emb_dim = 768
  c.model.num_heads = 12
  c.model.mlp_dim = 3072
  c.model.vocab_size = 50304  # GPT-2's 50257 rounded up to a multiple of 128.
  c.model.max_len = 1024
  c.model.dtype = 'bfloat16'
  # On TOPOLOGY the whole 32-sequence share of a chip needs 57 GiB of temporaries (the TPU
  # compiler's figure): 8 sequences at a time, matmul outputs kept (the rest recomputed), and
  # the 50k-vocabulary logits 256 positions at a time.
  c.model.remat_policy = 'dots_with_no_batch_dims'
  c.optimizer.grad_accum_steps = 4
  c.loss_chunk = 256
  c.optimizer.learning_rate = 6e-4
  c.optimizer.warmup_steps = 700
  c.optimizer.weight_decay = 0.1
  c.checkpoint.save_every_steps = 1000
  return c
