"""Fine-tune a pretrained model as a sequence classifier on labeled JSONL or CSV (text, label).

    jaxlm finetune --config=configs/finetune_cls.py --config.init_from=/tmp/bert_tiny \
      --config.finetune.train=train.jsonl --config.finetune.validation=dev.jsonl --workdir=/tmp/cls

The model fields must match the pretrained run's (these match configs/bert_tiny.py; for
another model pass its --config.model.* values, e.g. for configs/bert_tiny_classic.py
--config.model.family=bert --config.model.mlp_dim=768); its tokenizer is used. A masked LM is
read at its [CLS] token, a causal one (finetune.backbone=causal) at its last token. With a TFDS
dataset prepared on this machine: --config.finetune.train=tfds:imdb_reviews:train.
"""

from jaxlm.config import defaults


def get_config():
  c = defaults('modernbert')
  c.objective = 'classify'
  c.finetune.backbone = 'masked'
  c.train_steps = 300
  c.batch_size = 32
  c.log_every_steps = 25
  c.eval_every_steps = 100
  c.eval_batches = 1000  # All of the validation split (at most this many batches).
  c.model.num_layers = 4
  c.model.emb_dim = 192
  c.model.num_heads = 4
  c.model.mlp_dim = 512
  c.model.vocab_size = 2048
  c.model.max_len = 128
  c.model.type_vocab_size = 2
  c.model.dropout_rate = 0.1
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 30
  c.optimizer.weight_decay = 0.01
  c.optimizer.end_lr_fraction = 0.0
  c.checkpoint.save_every_steps = 300
  return c
