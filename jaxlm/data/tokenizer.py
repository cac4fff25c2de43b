"""Sentencepiece tokenizers: trained on a bounded sample of the corpus, or loaded from a file.

Every tokenizer jaxlm trains has the same special ids (pad 0, unk 1, bos 2, eos 3) and the
control tokens the objectives need ([CLS], [SEP], [MASK]); byte fallback makes every string
encodable. Newlines and indentation are pieces of their own, so code survives a round trip.
"""

import io
import os

import numpy as np
import sentencepiece as spm

from jaxlm.config import ConfigError

PAD, UNK, BOS, EOS = '[PAD]', '[UNK]', '[BOS]', '[EOS]'
CONTROL = ('[CLS]', '[SEP]', '[MASK]')
WHITESPACE_PIECES = ('\n', '\t', '  ', '    ', '        ')
MAX_SAMPLE_LINE = 4096  # Sentencepiece skips longer "sentences" anyway.


class Tokenizer:
  """A thin wrapper over a SentencePieceProcessor with the special ids jaxlm relies on."""

  def __init__(self, model_proto, path=''):
    self.path = path
    self.proto = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.pad_id, self.unk_id = self.sp.pad_id(), self.sp.unk_id()
    self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

  def special_id(self, piece):
    """The id of a special piece such as '[MASK]', or a ConfigError naming the file."""
    i = self.sp.piece_to_id(piece)
    if self.sp.id_to_piece(i) != piece:
      raise ConfigError(f'tokenizer {self.path or "(trained here)"} has no {piece} piece; '
                        f'masked LMs need {", ".join((PAD, *CONTROL))}: train one with jaxlm '
                        f'(leave data.tokenizer empty) or add them as control symbols')
    return i

  def check_specials(self):
    """Every piece the masked objective and classifiers use; a clear error if one is missing."""
    for piece in (PAD, *CONTROL):
      self.special_id(piece)

  @property
  def vocab_size(self):
    return self.sp.get_piece_size()

  def encode(self, texts, num_threads=2):
    return self.sp.encode(list(texts), num_threads=num_threads)

  def decode(self, ids):
    return self.sp.decode(list(ids))

  def __len__(self):
    return self.vocab_size

  def token_bytes(self, size=None):
    """UTF-8 bytes of text each id stands for ('▁' is a space, a byte-fallback piece one
    byte, control and unknown pieces none), as an int32 table of `size` >= vocab_size rows:
    the denominator of bits per byte, which compares models across tokenizers."""
    table = np.zeros(size or self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self.sp.is_byte(i):
        table[i] = 1
      elif not (self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_unused(i)):
        table[i] = len(self.sp.id_to_piece(i).replace('▁', ' ').encode('utf-8'))
    return table

  def save(self, path):
    """Writes the model atomically (a temporary file renamed into place)."""
    tmp = f'{path}.tmp.{os.getpid()}'
    with open(tmp, 'wb') as f:
      f.write(self.proto)
    os.replace(tmp, path)
    self.path = path


def load(path):
  try:
    with open(path, 'rb') as f:
      proto = f.read()
    tokenizer = Tokenizer(proto, path)
  except OSError as e:
    raise ConfigError(f'data.tokenizer={path!r} cannot be read: {e.strerror}') from e
  except RuntimeError as e:
    raise ConfigError(f'data.tokenizer={path!r} is not a sentencepiece model') from e
  if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
    raise ConfigError(f'data.tokenizer={path!r} has no BOS/EOS pieces; jaxlm needs both')
  return tokenizer


def sample_lines(documents, max_bytes):
  """The first `max_bytes` of non-empty lines of the documents (already in a seeded order)."""
  total = 0
  for doc in documents:
    for line in doc.text.split('\n'):
      if line.strip() and len(line) <= MAX_SAMPLE_LINE:
        total += len(line) + 1
        yield line
        if total >= max_bytes:
          return


def train(documents, vocab_size, model_type='bpe', max_bytes=20_000_000, seed=0):
  """A tokenizer trained on a sample of `documents` (in memory; `save` writes it)."""
  spm.set_random_generator_seed(seed)
  proto = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sample_lines(documents, max_bytes), model_writer=proto,
        vocab_size=vocab_size, model_type=model_type, character_coverage=0.9995,
        byte_fallback=True, normalization_rule_name='identity', remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, max_sentencepiece_length=16,
        user_defined_symbols=list(WHITESPACE_PIECES), control_symbols=list(CONTROL),
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=PAD, unk_piece=UNK, bos_piece=BOS,
        eos_piece=EOS, shuffle_input_sentence=False, hard_vocab_limit=model_type != 'unigram',
        num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    message = str(e).strip().splitlines()[-1] if str(e).strip() else 'failed'
    raise ConfigError(f'training a {vocab_size}-piece tokenizer failed: {message}; '
                      f'lower model.vocab_size or give more text') from e
  return Tokenizer(proto.getvalue())
