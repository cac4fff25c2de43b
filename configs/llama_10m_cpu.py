"""The CPU throughput target of issue 10: a ~10M-parameter Llama-style model, float32.

    python bench/train_bench.py --config=configs/llama_10m_cpu.py --steps=10
    jaxlm train --config=configs/llama_10m_cpu.py --workdir=/tmp/llama_10m

4 layers, width 256, 4 heads, SwiGLU MLP 1024, vocab 8192, sequence 256, batch 8.
"""

from jaxlm.config import defaults


def get_config():
  c = defaults('llama')
  c.train_steps = 200
  c.batch_size = 8
  c.log_every_steps = 20
  c.eval_every_steps = 100
  c.eval_batches = 4
  c.model.num_layers = 4
  c.model.emb_dim = 256
  c.model.num_heads = 4
  c.model.mlp_dim = 1024
  c.model.vocab_size = 8192
  c.model.max_len = 256
  # Four layers compile in seconds unrolled, and unrolled runs ~5% faster on this CPU than
  # scanned (no stacked per-layer buffers to fill).
  c.model.scan_layers = False
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 20
  c.checkpoint.save_every_steps = 100
  c.data.tokenizer_sample_bytes = 8_000_000
  return c
