"""The tokenized corpus on disk: one flat token stream per split plus document start offsets.

Tokenizing is the slow part of input, so it happens once per (source, tokenizer) fingerprint;
later runs memory-map the arrays (read them whole from an object store). Files are written
atomically (paths.atomic_write), so an interrupted build never leaves a half-written cache.
"""

import dataclasses
import hashlib
import io
import json

import numpy as np

from jaxlm import paths
from jaxlm.errors import ConfigError, first_line

SPLITS = ('train', 'validation')


@dataclasses.dataclass
class TokenStream:
  tokens: np.ndarray  # [num_tokens] every document framed (BOS text EOS), back to back.
  starts: np.ndarray  # [num_documents + 1] offset of each document; the last is num_tokens.

  @property
  def num_documents(self):
    return len(self.starts) - 1


def cache_key(source_fingerprint, tokenizer, config, frame):
  h = hashlib.sha256(tokenizer.data)
  h.update(json.dumps([source_fingerprint, config.data.validation_fraction,
                       config.data.max_documents, config.data.text_field, list(frame)]).encode())
  return h.hexdigest()[:16]


def _paths(cache_dir, key, split):
  base = paths.join(cache_dir, f'{split}-{key}')
  return f'{base}.tokens.npy', f'{base}.starts.npy'


def load(cache_dir, key):
  """The cached streams for this key, memory-mapped, or None if any file is missing. A file
  that is not a consistent token cache is a one-line error naming it (it is never rebuilt
  over silently: the cache may be shared with other runs)."""
  files = [p for split in SPLITS for p in _paths(cache_dir, key, split)]
  if not all(paths.exists(p) for p in files):
    return None
  streams = {}
  for split in SPLITS:
    arrays = []
    for path in _paths(cache_dir, key, split):
      try:
        arrays.append(_load(path))
      except (ValueError, OSError, EOFError) as e:
        raise ConfigError(f'token cache file {path} cannot be read ({first_line(e)}); delete it '
                          f'and the corpus is tokenized again') from e
    stream = TokenStream(*arrays)
    if not _consistent(stream):
      raise ConfigError(f'token cache files {_paths(cache_dir, key, split)[0]} and .starts.npy '
                        f'do not form a token stream (corrupted?); delete them and the corpus '
                        f'is tokenized again')
    streams[split] = stream
  return streams


def _consistent(stream):
  tokens, starts = stream.tokens, stream.starts
  return (tokens.ndim == 1 and starts.ndim == 1 and len(starts) >= 1
          and tokens.dtype in (np.uint16, np.uint32) and starts.dtype == np.int64
          and starts[0] == 0 and starts[-1] == len(tokens) and bool(np.all(np.diff(starts) >= 0)))


def _load(path):
  if paths.is_remote(path):
    return np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False)
  return np.load(paths.normalize(path), mmap_mode='r', allow_pickle=False)


def build(documents, tokenizer, is_validation, frame, chunk=256):
  """Tokenizes documents into per-split streams, in memory, each document wrapped in the
  (first, last) ids of `frame`: BOS/EOS for causal LMs, [CLS]/[SEP] for masked ones."""
  pieces = {s: [] for s in SPLITS}
  lengths = {s: [] for s in SPLITS}
  dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.uint32
  batch = []

  def flush():
    for (split, _), ids in zip(batch, tokenizer.encode(text for _, text in batch)):
      pieces[split].append(np.asarray([frame[0], *ids, frame[1]], dtype))
      lengths[split].append(len(ids) + 2)
    batch.clear()

  for doc in documents:
    batch.append(('validation' if is_validation(doc.name) else 'train', doc.text))
    if len(batch) == chunk:
      flush()
  flush()
  streams = {}
  for split in SPLITS:
    tokens = np.concatenate(pieces[split]) if pieces[split] else np.zeros((0,), dtype)
    starts = np.concatenate([[0], np.cumsum(lengths[split], dtype=np.int64)])
    streams[split] = TokenStream(tokens, starts)
  return streams


def save(streams, cache_dir, key):
  """Writes each array atomically."""
  paths.makedirs(cache_dir)
  for split, stream in streams.items():
    for path, array in zip(_paths(cache_dir, key, split), (stream.tokens, stream.starts)):
      with paths.atomic_file(path) as f:
        np.save(f, array, allow_pickle=False)
