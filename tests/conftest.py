"""Shared fixtures: a small real corpus (part of the Python standard library), one tokenizer
trained on it once per session, a tiny model config that compiles in seconds, and eight
simulated CPU devices."""

import os
import shutil
import sysconfig

# Eight simulated CPU devices for the partitioning tests; set before anything imports jax.
# Single-device tests pass `devices=jax.devices()[:1]`.
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# No persistent compilation cache (jaxlm/compile_cache.py) unless a test asks for one: the
# suite must not depend on, nor fill, the user's cache.
os.environ['JAXLM_COMPILE_CACHE'] = ''
os.environ['JAXLM_PEAK_CACHE'] = ''  # Nor the measured CPU peak (jaxlm/flops.py).

import pytest

from jaxlm import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = sysconfig.get_paths()['stdlib']
# About 1.3 MB of real Python: enough text for a 512-piece tokenizer and a few dozen rows.
CORPUS = ','.join(os.path.join(STDLIB, p) for p in ('json/*.py', 'email/*.py', 'logging/*.py',
                                                    'http/*.py', 'asyncio/*.py'))


def tiny_config(**overrides):
  """A 2-layer GPT-2-style model on the test corpus; overrides are ('a.b', value) keywords."""
  c = config_lib.defaults('gpt2')
  c.train_steps = 12
  c.batch_size = 8
  c.log_every_steps = 4
  c.eval_every_steps = 0
  c.eval_batches = 2
  c.model.num_layers = 2
  c.model.emb_dim = 64
  c.model.num_heads = 4
  c.model.mlp_dim = 128
  c.model.vocab_size = 512
  c.model.max_len = 64
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 2
  c.data.path = CORPUS
  c.data.tokenizer_sample_bytes = 2_000_000
  c.data.validation_fraction = 0.1
  c.data.num_threads = 1
  c.checkpoint.save_every_steps = 6
  for name, value in overrides.items():
    *parents, leaf = name.split('__')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config_lib.validate(c)


def one_device():
  import jax
  return jax.devices()[:1]


@pytest.fixture(scope='session')
def shared_data(tmp_path_factory):
  """A tokenizer and token cache built once and reused by every test's workdir."""
  root = tmp_path_factory.mktemp('shared_data')
  config = tiny_config()
  from jaxlm import data, objectives
  # Trains tokenizer.model and fills root/data.
  data.prepare(config, str(root), objectives.get(config).frame)
  return root


def train_hf_tokenizer(kind, path, vocab_size=512):
  """A Hugging Face tokenizer.json trained on the test corpus with the `tokenizers` library:
  'bytelevel' (byte-level BPE, GPT-2's kind) or 'wordpiece' (BERT's, lowercasing)."""
  import glob

  import tokenizers
  from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
  texts = [open(f, encoding='utf-8').read()
           for pattern in CORPUS.split(',') for f in sorted(glob.glob(pattern))]
  if kind == 'bytelevel':
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
  else:
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token='[UNK]'))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'],
        show_progress=False)
  tok.train_from_iterator(texts, trainer)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tok.save(str(path))
  return path


@pytest.fixture(scope='session')
def hf_tokenizers(tmp_path_factory):
  """{'bytelevel': path, 'wordpiece': path} of tokenizer.json files, trained once."""
  root = tmp_path_factory.mktemp('hf_tokenizers')
  return {kind: train_hf_tokenizer(kind, root / kind / 'tokenizer.json')
          for kind in ('bytelevel', 'wordpiece')}


@pytest.fixture
def workdir(tmp_path, shared_data):
  """A fresh workdir pre-seeded with the shared tokenizer (as a finished run would have it)."""
  shutil.copy(shared_data / 'tokenizer.model', tmp_path / 'tokenizer.model')
  return tmp_path


@pytest.fixture
def config(shared_data):
  """The tiny config, reading the shared token cache."""
  return tiny_config(data__cache_dir=str(shared_data / 'data'))
