"""A Llama-2-7B-shaped model (32 layers, width 4096, 32 heads, MLP 11008, sequence 4096).

    jaxlm train --config=configs/llama_7b.py --config.data.path=... --workdir=...

4M tokens per step, as in the Llama 2 paper. Parameters and optimizer state (~112 GB in
float32) are sharded over mesh.fsdp; activations are recomputed (remat 'full').
"""

from jaxlm.config import defaults

# The slice this config is planned for: jaxlm plan --config=configs/llama_7b.py --topology=v5p-128
# (tests/test_plan_topology.py checks that it fits; BENCHMARKS.md has the figures).
TOPOLOGY = 'v5p-128'


def get_config():
  c = defaults('llama')
  c.train_steps = 500_000
  c.batch_size = 1024
  c.log_every_steps = 10
  c.eval_every_steps = 5000
  c.eval_batches = 16
  c.model.num_layers = 32
  c.model.emb_dim = 4096
  c.model.num_heads = 32
  c.model.mlp_dim = 11008
  c.model.vocab_size = 32000
  c.model.max_len = 4096
  c.model.dtype = 'bfloat16'
  c.model.remat_policy = 'full'
  # On TOPOLOGY (64 chips) a step is 16 sequences per chip: 2 micro-batches of 8, and the
  # logits 1024 positions at a time (the eval step runs all 16 at once).
  c.optimizer.grad_accum_steps = 2
  c.loss_chunk = 1024
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 2000
  c.optimizer.weight_decay = 0.1
  c.optimizer.eps = 1e-5
  c.checkpoint.save_every_steps = 1000
  return c
