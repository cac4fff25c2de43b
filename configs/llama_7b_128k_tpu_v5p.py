"""Llama-2-7B on 128k-token sequences on a TPU v5p-128 slice (64 chips, 95 GB HBM each), with
ring context parallelism. NOT RUN HERE (no TPU); `jaxlm plan --config=configs/llama_7b_128k_tpu_v5p.py
--topology=v5p-128` compiles it with the TPU compiler (BENCHMARKS.md has the figures).

    launch/tpu_pod.sh --name long --zone ZONE --accelerator v5p-128 --mount BUCKET:/mnt/jaxlm \
      -- train --config=configs/llama_7b_128k_tpu_v5p.py --config.init_from=/mnt/jaxlm/runs/BASE \
         --config.data.path=... --workdir=/mnt/jaxlm/runs/NAME

- A long-context extension of a model pretrained at 4k (`init_from`), as in Llama 2 Long and
  Llama 3: the same weights, RoPE's theta raised from 1e4 to 5e5 so that the longest
  wavelengths exceed the new length, a lower learning rate and a short schedule.
- mesh fsdp=8 x sequence=8: each sequence is cut into 8 shards of 16k tokens (mesh.sequence), and
  the 8 sequences of a step (1M tokens) split over fsdp. Attention runs as a ring over the 8
  shards (model.context_parallel='ring'), zigzag-balanced so every chip does the same causal work;
  everything else (norms, MLPs, loss) works on its 16k tokens alone.
- Parameters and AdamW state (81 GB in float32) are sharded over fsdp only: 9.4 GiB per chip.
- The TPU compiler puts the train step at 30.7 GiB per chip (full compile; BENCHMARKS.md).
- Splash attention blocks, remat 'full', bfloat16 compute.
"""

from jaxlm.config import defaults

# The slice this config is planned for (tests/test_plan_topology.py; BENCHMARKS.md).
TOPOLOGY = 'v5p-128'


def get_config():
  c = defaults('llama')
  c.train_steps = 2000
  c.batch_size = 8  # 8 x 131072 = 1M tokens per step.
  c.log_every_steps = 10
  c.eval_every_steps = 500
  c.eval_batches = 4
  c.model.num_layers = 32
  c.model.emb_dim = 4096
  c.model.num_heads = 32
  c.model.mlp_dim = 11008
  c.model.vocab_size = 32000
  c.model.max_len = 131072
  c.model.rope_theta = 500_000.0
  c.model.dtype = 'bfloat16'
  c.model.remat_policy = 'full'
  c.model.attention = 'splash'
  c.model.context_parallel = 'ring'
  c.mesh.fsdp = 8
  c.mesh.sequence = 8
  c.optimizer.learning_rate = 2e-5
  c.optimizer.warmup_steps = 100
  c.optimizer.eps = 1e-5
  c.checkpoint.save_every_steps = 200
  return c
