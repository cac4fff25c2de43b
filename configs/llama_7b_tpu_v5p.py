"""Llama-2-7B on a TPU v5p-128 slice (64 chips, 95 GB HBM each). NOT RUN HERE: no TPU was
available to jaxlm's developers; the settings follow MaxText-class recipes and the memory
arithmetic below, and `jaxlm plan --config=configs/llama_7b_tpu_v5p.py --topology=v5p-128`
compiles it with the TPU compiler: 49.6 GiB per chip for the train step as shipped (splash
attention, remat 'minimal'); with remat 'full' 14.4 GiB against 28.1 GiB with XLA's attention
(MaxText's llama2-7b, same batch, remat full: 14.0 GiB with its splash kernel, 20.8 without).

    launch/tpu_pod.sh --name lm --zone ZONE --accelerator v5p-128 --mount BUCKET:/mnt/jaxlm \
      -- train --config=configs/llama_7b_tpu_v5p.py --config.data.path=... --workdir=/mnt/jaxlm/runs/NAME

- Pure FSDP over all 64 chips (mesh.fsdp=-1): parameters + AdamW state, 112 GB in float32,
  are 1.75 GB per chip.
- bfloat16 compute, float32 master weights.
- 4 sequences of 4096 per chip (1M tokens per step), attention by the Pallas splash kernel: the
  TPU compiler puts the train step at 14.4 GiB per chip with remat 'full', against 28.1 GiB
  with XLA's attention (BENCHMARKS.md). The freed memory buys the lighter remat 'minimal'
  (the projections' outputs kept, no second forward pass through the matmuls): 49.6 GiB of
  the 95, by the same compiler.
- Learning rate and warmup as in the Llama 2 paper.
"""

from jaxlm.config import defaults

# The slice this config is planned for: jaxlm plan --config=configs/llama_7b_tpu_v5p.py --topology=v5p-128
# (tests/test_plan_topology.py checks that it fits; BENCHMARKS.md has the figures).
TOPOLOGY = 'v5p-128'


def get_config():
  c = defaults('llama')
  c.train_steps = 500_000
  c.batch_size = 256  # 4 per chip on 64 chips.
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
  c.model.remat_policy = 'minimal'
  c.model.attention = 'splash'  # Pallas flash attention ('auto' picks it on TPU too).
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 2000
  c.optimizer.eps = 1e-5
  c.mesh.fsdp = -1
  c.checkpoint.save_every_steps = 1000
  return c
