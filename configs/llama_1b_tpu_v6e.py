"""A 1.1B Llama (TinyLlama's shape) on a TPU v6e-16 slice (16 chips, 32 GB HBM each). NOT RUN
HERE: no TPU was available to jaxlm's developers; the settings follow MaxText-class recipes
and the memory arithmetic below; `jaxlm plan --config=configs/llama_1b_tpu_v6e.py
--topology=v6e-16` (the TPU compiler) gives 18.8 GiB per chip for the train step.

    launch/tpu_pod.sh --name lm --zone ZONE --accelerator v6e-16 --mount BUCKET:/mnt/jaxlm \
      -- train --config=configs/llama_1b_tpu_v6e.py --config.data.path=... --workdir=/mnt/jaxlm/runs/NAME

- FSDP over the 16 chips: parameters + AdamW state (17.6 GB in float32) are 1.1 GB per chip.
- bfloat16 compute; remat 'minimal' keeps every projection's output (no second forward pass
  through the matmuls). Splash attention (no [batch, heads, 2048, 2048] scores in HBM) is what
  affords it: with XLA's attention 'save_qkv_proj' (q, k, v kept) needed 15.0 GiB per chip; with
  splash it needs 9.7 GiB and 'minimal' 18.8 GiB of the 32, by the TPU compiler; no remat at
  all would need 52 GiB (the compiler refuses it).
- 128 sequences of 2048 (0.26M tokens) per step; a 32k vocabulary's logits are computed
  512 positions at a time (loss_chunk) instead of all 16k tokens of a chip at once.
"""

from jaxlm.config import defaults

# The slice this config is planned for: jaxlm plan --config=configs/llama_1b_tpu_v6e.py --topology=v6e-16
# (tests/test_plan_topology.py checks that it fits; BENCHMARKS.md has the figures).
TOPOLOGY = 'v6e-16'


def get_config():
  c = defaults('llama')
  c.train_steps = 200_000
  c.batch_size = 128  # 8 per chip on 16 chips.
  c.log_every_steps = 10
  c.eval_every_steps = 2000
  c.eval_batches = 16
  c.loss_chunk = 512
  c.model.num_layers = 22
  c.model.emb_dim = 2048
  c.model.num_heads = 32
  c.model.num_kv_heads = 4
  c.model.mlp_dim = 5632
  c.model.vocab_size = 32000
  c.model.max_len = 2048
  c.model.dtype = 'bfloat16'
  c.model.remat_policy = 'minimal'
  c.model.attention = 'splash'  # Pallas flash attention ('auto' picks it on TPU too).
  c.optimizer.learning_rate = 4e-4
  c.optimizer.warmup_steps = 2000
  c.optimizer.eps = 1e-5
  c.mesh.fsdp = -1
  c.checkpoint.save_every_steps = 1000
  return c
