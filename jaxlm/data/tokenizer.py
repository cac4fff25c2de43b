"""Tokenizers: sentencepiece models trained on a bounded sample of the corpus, or loaded
from a file (a sentencepiece model, or a Hugging Face tokenizer.json).

Every tokenizer jaxlm trains has the same special ids (pad 0, unk 1, bos 2, eos 3) and the
control tokens the objectives need ([CLS], [SEP], [MASK]); byte fallback makes every string
encodable. Newlines and indentation are pieces of their own, so code survives a round trip.
"""

import io
import json
import os

import numpy as np
import sentencepiece as spm
import tokenizers

from jaxlm import paths
from jaxlm.errors import ConfigError, first_line

PAD, UNK, BOS, EOS = '[PAD]', '[UNK]', '[BOS]', '[EOS]'
CONTROL = ('[CLS]', '[SEP]', '[MASK]')
WHITESPACE_PIECES = ('\n', '\t', '  ', '    ', '        ')
MAX_SAMPLE_LINE = 4096  # Sentencepiece skips longer "sentences" anyway.


def _byte_level_table():
  """GPT-2's byte-level alphabet: which printable character stands for which byte."""
  kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
  moved = [b for b in range(256) if b not in kept]
  chars = {b: chr(b) for b in kept} | {b: chr(256 + n) for n, b in enumerate(moved)}
  return {c: b for b, c in chars.items()}


class Tokenizer:
  """What jaxlm asks of a tokenizer; `SentencePiece` and `HuggingFace` differ in how a token
  maps back to text (`token_text`, `_bytes`), and jaxlm's document framing never comes from it
  (encode adds no special tokens). Ids of missing roles (bos, eos, pad, unk) are -1."""
  filename = ''  # The name a run directory keeps it under.
  path = ''

  def __len__(self):
    return self.vocab_size

  def special_id(self, piece):
    """The id of a special piece such as '[MASK]', or a ConfigError naming the file."""
    i = self._id(piece)
    if i < 0:
      raise ConfigError(f'tokenizer {self.path or "(trained here)"} has no {piece} piece; '
                        f'masked LMs need {", ".join((PAD, *CONTROL))}: train one with jaxlm '
                        f'(leave data.tokenizer empty) or add them as control symbols')
    return i

  def check_specials(self):
    """Every piece the masked objective and classifiers use; a clear error if one is missing."""
    for piece in (PAD, *CONTROL):
      self.special_id(piece)

  def check_causal(self):
    if self.bos_id < 0 or self.eos_id < 0:
      raise ConfigError(f'tokenizer {self.path} has no BOS/EOS tokens; a causal LM needs both '
                        f'(for tokenizer.json: bos_token and eos_token in a '
                        f'tokenizer_config.json beside it)')

  def word_start(self, i):
    """Whether token `i` begins a word (masking.whole_word masks words whole)."""
    text = self.token_text(i)
    return text.startswith(' ') or text in ('\n', '\t')

  def special_table(self, size=None):
    """Which ids are special, as a bool table of `size` >= vocab_size rows (ids past the
    vocabulary count as special): never a masked target, a random replacement or a filler."""
    table = np.ones(size or self.vocab_size, bool)
    for i in range(self.vocab_size):
      table[i] = self.is_special(i)
    return table

  def token_bytes(self, size=None):
    """UTF-8 bytes of text each id stands for (special tokens none), as an int32 table of
    `size` >= vocab_size rows: the denominator of bits per byte, which compares models across
    tokenizers."""
    table = np.zeros(size or self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      table[i] = 0 if self.is_special(i) else self._bytes(i)
    return table

  def save(self, path):
    """Writes the file atomically (a temporary file renamed into place)."""
    paths.atomic_write(path, self.data)
    self.path = path


class SentencePiece(Tokenizer):
  """A SentencePieceProcessor: the tokenizers jaxlm trains, and Llama/T5-style tokenizer.model."""
  filename = 'tokenizer.model'

  def __init__(self, model_proto, path=''):
    self.path = path
    self.data = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.pad_id, self.unk_id = self.sp.pad_id(), self.sp.unk_id()
    self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
    self.vocab_size = self.sp.get_piece_size()

  def _id(self, piece):
    i = self.sp.piece_to_id(piece)
    return i if self.sp.id_to_piece(i) == piece else -1

  def encode(self, texts, num_threads=2):
    return self.sp.encode(list(texts), num_threads=num_threads)

  def decode(self, ids):
    return self.sp.decode(list(ids))

  def is_special(self, i):
    return self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_unused(i)

  def token_text(self, i):
    """The text token `i` stands for (a special token: its name); a word's first piece
    starts with its space."""
    return self.sp.id_to_piece(i).replace('\u2581', ' ')

  def _bytes(self, i):
    return 1 if self.sp.is_byte(i) else len(self.token_text(i).encode('utf-8'))


class HuggingFace(Tokenizer):
  """A Hugging Face `tokenizer.json` (byte-level BPE as in GPT-2 and Llama 3, WordPiece as in
  BERT, or sentencepiece-style BPE), read with the `tokenizers` library. Which special token
  plays which role comes from a tokenizer_config.json beside it, as in a Hugging Face model
  directory, else from the usual names. Bytes per token are exact for byte-level and
  byte-fallback vocabularies; WordPiece drops whitespace, so there a word's first piece counts
  one space, an approximation.
  """
  filename = 'tokenizer.json'
  ROLE_NAMES = {'bos': ('<|begin_of_text|>', '<s>', '[BOS]', '<|endoftext|>'),
                'eos': ('<|end_of_text|>', '</s>', '[EOS]', '<|endoftext|>'),
                'pad': ('[PAD]', '<pad>', '<|pad|>'), 'unk': ('[UNK]', '<unk>', '<|unk|>')}

  def __init__(self, data, path='', config=None, ids=None):
    """`config`: its tokenizer_config.json (dict), kept and written back on save; `ids`:
    role -> id (a checkpoint config.json's) for roles that config does not name."""
    self.path, self.data, self.config = path, data, dict(config or {})
    self.tok = tokenizers.Tokenizer.from_str(data.decode('utf-8'))
    # Truncation or padding saved in the file would cut and pad every document.
    self.tok.no_truncation()
    self.tok.no_padding()
    spec = json.loads(data)
    model = spec.get('model') or {}
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    added = spec.get('added_tokens') or ()
    self.special = {t['id'] for t in added if t.get('special')}
    self.added = {t['id']: t['content'] for t in added}  # Plain text, never byte-level.
    self.byte_level = 'ByteLevel' in json.dumps(spec.get('decoder'))
    self.byte_fallback = bool(model.get('byte_fallback'))
    wordpiece = model.get('type') == 'WordPiece'  # Its pieces after a word's first: '##'.
    self.continuing = model.get('continuing_subword_prefix', '##') if wordpiece else None
    ids = ids or {}
    for role, names in self.ROLE_NAMES.items():
      token = self.config.get(f'{role}_token')
      token = token.get('content') if isinstance(token, dict) else token
      i = self._id(token) if token else -1
      if i < 0 and isinstance(ids.get(role), int) and 0 <= ids[role] < self.vocab_size:
        i = ids[role]
      if i < 0:
        i = next((self._id(n) for n in names if self._id(n) >= 0), -1)
      setattr(self, f'{role}_id', i)

  def _id(self, piece):
    i = self.tok.token_to_id(piece)
    return -1 if i is None else i

  def encode(self, texts, num_threads=2):
    del num_threads  # tokenizers parallelises batches itself.
    return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids):
    return self.tok.decode(list(ids))

  def is_special(self, i):
    return i in self.special or i == self.unk_id

  def _raw(self, i):
    """The token's bytes (byte-level), or its text with spaces and word-piece marks resolved."""
    token = self.tok.id_to_token(i) or ''
    if i in self.added:
      return token
    if self.byte_level:
      return bytes(BYTE_LEVEL.get(c, 0) for c in token)
    if self.byte_fallback and len(token) == 6 and token.startswith('<0x') and token.endswith('>'):
      return bytes([int(token[3:5], 16)])
    if self.continuing is not None:
      return token[len(self.continuing):] if token.startswith(self.continuing) else ' ' + token
    return token.replace('\u2581', ' ')

  def token_text(self, i):
    raw = self._raw(i)
    return raw.decode('utf-8', 'replace') if isinstance(raw, bytes) else raw

  def _bytes(self, i):
    raw = self._raw(i)
    return len(raw) if isinstance(raw, bytes) else len(raw.encode('utf-8'))

  def config_json(self):
    """The tokenizer_config.json that names its special tokens' roles (over the one read)."""
    roles = {role: getattr(self, f'{role}_id') for role in self.ROLE_NAMES}
    return {'tokenizer_class': 'PreTrainedTokenizerFast', **self.config,
            **{f'{role}_token': self.tok.id_to_token(i) for role, i in roles.items() if i >= 0},
            **{f'{name}_token': f'[{name.upper()}]' for name in ('cls', 'sep', 'mask')
               if self._id(f'[{name.upper()}]') >= 0}}

  def save(self, path):
    """tokenizer.json and, beside it, tokenizer_config.json (each written atomically)."""
    config = json.dumps(self.config_json(), indent=2).encode('utf-8')
    paths.atomic_write(paths.join(paths.parent(path), CONFIG_FILE), config)
    super().save(path)


BYTE_LEVEL = _byte_level_table()
CONFIG_FILE = 'tokenizer_config.json'
FILENAMES = (SentencePiece.filename, HuggingFace.filename)


def _tokenizer_config(directory):
  """The tokenizer_config.json in `directory` as a dict ({} if there is none)."""
  path = paths.join(directory, CONFIG_FILE)
  if not paths.isfile(path):
    return {}
  try:
    with paths.open(path, encoding='utf-8') as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f'{path} cannot be read as JSON ({e}); fix or remove it') from e
  if not isinstance(config, dict):
    raise ConfigError(f'{path} is not a JSON object; fix or remove it')
  return config


def load(path, ids=None):
  """The tokenizer in `path`: a sentencepiece model, or a Hugging Face tokenizer.json (whose
  roles come from a tokenizer_config.json beside it, else `ids`: role -> id, else names)."""
  try:
    data = paths.read_bytes(path)
  except OSError as e:
    raise ConfigError(f'data.tokenizer={path!r} cannot be read: {e.strerror}') from e
  if path.endswith('.json'):
    config = _tokenizer_config(paths.parent(path))
    try:
      return HuggingFace(data, path, config, ids)
    except Exception as e:  # tokenizers raises plain Exceptions.
      raise ConfigError(f'data.tokenizer={path!r} is not a Hugging Face tokenizer.json '
                        f'({first_line(e)})') from e
  try:
    return SentencePiece(data, path)
  except RuntimeError as e:
    raise ConfigError(f'data.tokenizer={path!r} is not a sentencepiece model (nor a '
                      f'tokenizer.json)') from e


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
  return SentencePiece(proto.getvalue())
