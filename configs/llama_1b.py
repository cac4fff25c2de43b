"""A ~1.1B-parameter Llama-style model (TinyLlama's shape: 22 layers, width 2048, GQA 32/4).

    jaxlm train --config=configs/llama_1b.py --config.data.path=... --workdir=...

Sequence 2048, 1M tokens per step. Needs accelerators: on one 80 GB GPU set
optimizer.grad_accum_steps=32 (micro-batch 16); on a pod slice let fsdp=-1 shard, with the
fewest micro-batches that fit (2 on its v4-128: 17.7 GiB per chip by `jaxlm plan --topology`).
"""

from jaxlm.config import defaults

# The slice this config is planned for: jaxlm plan --config=configs/llama_1b.py --topology=v4-128
# (tests/test_plan_topology.py checks that it fits; BENCHMARKS.md has the figures).
TOPOLOGY = 'v4-128'


def get_config():
  c = defaults('llama')
  c.train_steps = 50_000
  c.batch_size = 512
  c.log_every_steps = 20
  c.eval_every_steps = 2000
  c.eval_batches = 16
  c.model.num_layers = 22
  c.model.emb_dim = 2048
  c.model.num_heads = 32
  c.model.num_kv_heads = 4
  c.model.mlp_dim = 5632
  c.model.vocab_size = 32000
  c.model.max_len = 2048
  c.model.dtype = 'bfloat16'
  c.model.remat_policy = 'dots_with_no_batch_dims'
  # On TOPOLOGY 8 sequences per chip at once need 34.8 GiB of the 32 (the TPU compiler's
  # figure): 2 micro-batches of 4.
  c.optimizer.grad_accum_steps = 2
  c.optimizer.learning_rate = 4e-4
  c.optimizer.warmup_steps = 2000
  c.optimizer.weight_decay = 0.1
  c.optimizer.eps = 1e-5
  c.checkpoint.save_every_steps = 2000
  return c
