"""A muP scaling study for a 2-core CPU that predicts a run with 10x its largest compute:
Llama-style models of depth 2 and widths 32-128 (41k-461k matmul parameters) at 3 isoFLOP
budgets (2e11-1.8e12 FLOPs), on the Python standard library's source.

    jaxlm sweep --config=configs/scaling/cpu_mup.py --workdir=/tmp/cpu_mup
    jaxlm fit --workdir=/tmp/cpu_mup

The learning rate is tuned once, at the smallest width (6 rates a factor of 2 apart, each
trained for the tokens of that width's middle-budget run), and carried unchanged to every
width: under muP (base.model.parametrization='mup', base width 32) the best rate does not move
with the width. The held-out run, L2-d128 at 1.8e13 FLOPs (10x the largest budget), is
trained last and left out of the fit, which predicts its loss (fit.json's 'held_out').
On 2026-12-05 (cpu-2c, 1,888 CPU seconds) the prediction was 6.2% high, inside its bootstrap
interval: docs/scaling.md has the runs, the fit and why it misses.
"""

from jaxlm.config import defaults, sweep_defaults


def get_config():
  base = defaults('llama')
  base.batch_size = 8
  base.log_every_steps = 200
  base.eval_batches = 16  # The same 16 x 8 x 128 held-out tokens score every run.
  base.model.vocab_size = 512  # Small, so the output layer does not dominate tiny models.
  base.model.max_len = 128
  base.model.parametrization = 'mup'
  base.model.mup_base_width = 32  # The tuned width: its rate is the rate every width uses.
  base.model.mup_base_head_dim = 16
  base.optimizer.weight_decay = 0.1
  base.checkpoint.save_every_steps = 1000  # An interrupted sweep loses at most this much.
  base.data.tokenizer_sample_bytes = 4_000_000

  c = sweep_defaults(base)
  c.sizes = ((2, 32), (2, 48), (2, 64), (2, 80), (2, 96), (2, 128))  # (num_layers, emb_dim)
  c.head_dim = 16
  c.mlp_ratio = 8 / 3  # Llama's SwiGLU width.
  c.budgets = (2e11, 6e11, 1.8e12)  # Training FLOPs per run (6N + 12LHQT per token).
  c.min_steps = 100
  c.learning_rate = 1e-2  # Replaced by the tuned rate.
  c.lr_width_exponent = 0.0  # muP scales each parameter's rate itself.
  c.warmup_fraction = 0.05
  c.tune.learning_rates = (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2)
  c.tune.size = (2, 32)
  c.tune.tokens = 2_700_000.0  # About what (2, 32) trains on at the middle budget.
  c.holdout = ((2, 128, 1.8e13),)
  return c
