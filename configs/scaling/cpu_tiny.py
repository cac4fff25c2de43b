"""An isoFLOP scaling study small enough for a 2-core CPU: 5 Llama-style sizes (29k-381k
matmul parameters) at 3 compute budgets (4e11-3.6e12 FLOPs), on the Python standard library's
source.

    jaxlm sweep --config=configs/scaling/cpu_tiny.py --workdir=/tmp/cpu_tiny
    jaxlm fit --workdir=/tmp/cpu_tiny --budget=1e13

15 runs, about 20 minutes on 2 cores (docs/scaling.md has the measured time, the fit and its
plots). The sizes are this small because at these budgets the compute-optimal model is: a
first try with 0.17M-2.4M parameters found the smallest size best at every budget, so no
isoFLOP curve had a minimum inside it.
"""

from jaxlm.config import defaults, sweep_defaults


def get_config():
  base = defaults('llama')
  base.batch_size = 8
  base.log_every_steps = 100
  base.eval_batches = 16  # The same 16 x 8 x 128 held-out tokens score every run.
  base.model.vocab_size = 512  # Small, so the output layer does not dominate tiny models.
  base.model.max_len = 128
  base.optimizer.weight_decay = 0.1
  base.checkpoint.save_every_steps = 500  # An interrupted sweep loses at most this much.
  base.data.tokenizer_sample_bytes = 4_000_000

  c = sweep_defaults(base)
  c.sizes = ((1, 32), (2, 48), (2, 64), (3, 80), (3, 96))  # (num_layers, emb_dim)
  c.head_dim = 16
  c.mlp_ratio = 8 / 3  # Llama's SwiGLU width.
  c.budgets = (4e11, 1.2e12, 3.6e12)  # Training FLOPs per run (6N + 12LHQT per token).
  c.min_steps = 100
  c.learning_rate = 3e-3  # At width 256; narrower models get more, by the square root.
  c.lr_reference_width = 256
  c.lr_width_exponent = 0.5
  c.warmup_fraction = 0.05
  return c
