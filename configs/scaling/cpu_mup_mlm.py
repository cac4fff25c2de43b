"""The masked-LM twin of cpu_mup.py: a muP scaling study of ModernBERT-style encoders (pre-norm,
rotary positions, gated GELU, 30% masking as in configs/bert_tiny.py) of depth 2 and widths
32-128 at 3 isoFLOP budgets (2e11-1.8e12 FLOPs), the learning rate tuned once at width 32, and
a held-out run with 10x the largest compute that `jaxlm fit` predicts.

    jaxlm sweep --config=configs/scaling/cpu_mup_mlm.py --workdir=/tmp/cpu_mup_mlm
    jaxlm fit --workdir=/tmp/cpu_mup_mlm

The loss is the masked tokens' cross-entropy on the same held-out rows and masks for every run;
C counts the output layer on the predicted positions only (jaxlm/flops.py), as it runs.
"""

from jaxlm.config import defaults, sweep_defaults


def get_config():
  base = defaults('modernbert')
  base.objective = 'masked'
  base.masking.rate = 0.3
  base.batch_size = 8
  base.log_every_steps = 200
  base.eval_batches = 16
  base.model.vocab_size = 512
  base.model.max_len = 128
  base.model.parametrization = 'mup'
  base.model.mup_base_width = 32
  base.model.mup_base_head_dim = 16
  base.optimizer.b2 = 0.98
  base.optimizer.weight_decay = 0.01
  base.checkpoint.save_every_steps = 1000
  base.data.tokenizer_sample_bytes = 4_000_000

  c = sweep_defaults(base)
  c.sizes = ((2, 32), (2, 48), (2, 64), (2, 80), (2, 96), (2, 128))
  c.head_dim = 16
  c.mlp_ratio = 8 / 3  # A gated MLP of three matrices.
  c.budgets = (2e11, 6e11, 1.8e12)
  c.min_steps = 100
  c.learning_rate = 1e-2  # Replaced by the tuned rate.
  c.lr_width_exponent = 0.0
  c.warmup_fraction = 0.05
  c.tune.learning_rates = (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2)
  c.tune.size = (2, 32)
  c.tune.tokens = 2_700_000.0
  c.holdout = ((2, 128, 1.8e13),)
  return c
