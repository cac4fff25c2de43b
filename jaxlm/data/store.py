"""The tokenized corpus on disk, as training reads it: a manifest, token shards and the
document starts of each split (written by shards.py), opened without reading the corpus.

A split's token stream is its shards' token files end to end; slices read only the files they
cover, through memory maps locally and range reads on an object store, so each host reads
just the rows of its part of each batch. Packing layouts (first-fit) are stored beside them,
one per row length, and computed once for a length not stored yet.
"""

import collections
import dataclasses
import hashlib
import io
import json
import threading

import numpy as np

from jaxlm import paths
from jaxlm.data import shards as shards_lib
from jaxlm.data.shards import MANIFEST, SPLITS, shard_files
from jaxlm.errors import ConfigError, first_line

FORMAT = 2  # Of the files below; part of the cache key. 2: every file has a CRC-32C.
OPEN_MAPS = 128  # Memory-mapped shards kept open (each holds a file descriptor).
DTYPES = ('uint16', 'uint32')


@dataclasses.dataclass
class TokenStream:
  tokens: np.ndarray  # [num_tokens] every document framed (BOS text EOS), back to back.
  starts: np.ndarray  # [num_documents + 1] offset of each document; the last is num_tokens.
  directory: str = ''  # Of its shards (where packing layouts are stored), and which split.
  split: str = ''

  @property
  def num_documents(self):
    return len(self.starts) - 1


def cache_key(source, tokenizer, config, frame):
  """Names the directory of a source's shards: what the tokens depend on except the files'
  contents (a change there is reported, see data.tokenize, not silently re-tokenized)."""
  what = ['tfds', source.tfds_name, source.tfds_split] if source.tfds_name else [source.path]
  h = hashlib.sha256(tokenizer.data)
  h.update(json.dumps([FORMAT, what, config.data.validation_fraction, config.data.max_documents,
                       config.data.text_field, list(frame)]).encode())
  return h.hexdigest()[:16]


def read_manifest(directory):
  """The manifest of a tokenized source (dict), or None if tokenizing has not finished."""
  path = paths.join(directory, MANIFEST)
  if not paths.exists(path):
    return None
  try:
    manifest = json.loads(paths.read_text(path))
    if (not isinstance(manifest, dict) or manifest.get('format') != FORMAT
        or not {'shards', 'dtype', 'fingerprint', 'source', 'starts_crc32c',
                *SPLITS} <= manifest.keys()):
      raise ValueError('not a jaxlm token manifest of this version')
    _check_manifest(manifest)
    return manifest
  except (ValueError, UnicodeDecodeError, OSError) as e:
    raise ConfigError(f'token manifest {path} cannot be read ({first_line(e)}); delete '
                      f'{directory} and the corpus is tokenized again') from e


def _check_manifest(manifest):
  """A ValueError naming the first field of a manifest that is not of its kind (an edited or
  damaged file): the dtype, each shard's id, counts and checksums, the splits' totals."""
  if manifest['dtype'] not in DTYPES:
    raise ValueError(f'dtype={manifest["dtype"]!r} is not one of {", ".join(DTYPES)}')
  if not isinstance(manifest['shards'], list):
    raise ValueError('shards is not a list')
  for n, shard in enumerate(manifest['shards']):
    if not isinstance(shard, dict) or not isinstance(shard.get('id'), str) or not (
        shard['id'].isalnum() and shard['id'].isascii()):
      raise ValueError(f'shard {n} has no id')
    shards_lib.check_counts(shard, shard.get('crc32c'), f'shard {shard["id"]}')
  shards_lib.check_counts(manifest, {f'{s}.{kind}': 0 for s in SPLITS
                                      for kind in ('tokens', 'ends')}, 'its totals')
  crcs = manifest['starts_crc32c']
  if not isinstance(crcs, dict) or not all(isinstance(crcs.get(s), int) for s in SPLITS):
    raise ValueError('starts_crc32c is not a checksum per split')


# Files whose checksum this process has checked, with the (size, mtime) it had then: each is
# read once per process, when first opened, however often a split is packed again.
_verified = {}


def verify(path, crc, directory):
  """A ConfigError unless the file's CRC-32C is `crc` (what tokenize recorded)."""
  try:
    signature = paths.signature(path)
    if _verified.get(path) == (signature, crc):
      return
    actual = paths.crc32c(path)
  except OSError as e:
    raise ConfigError(f'token file {path} cannot be read ({first_line(e)}); delete '
                      f'{directory} and the corpus is tokenized again') from e
  if actual != crc:
    raise ConfigError(f'token file {path} does not match the checksum its manifest recorded '
                      f'(changed or damaged on disk since it was tokenized); delete '
                      f'{directory} and the corpus is tokenized again')
  _verified[path] = (signature, crc)


def open_streams(directory, manifest, vocab_size):
  """{split: TokenStream} of a tokenized source; nothing is read but the document starts
  (each shard's token file is checked against its checksum when first read)."""
  streams = {}
  for split in SPLITS:
    counts = [s[split]['tokens'] for s in manifest['shards']]
    files = [shard_files(directory, s['id'])[0][f'{split}.tokens'] for s in manifest['shards']]
    crcs = [s['crc32c'][f'{split}.tokens'] for s in manifest['shards']]
    tokens = ShardedTokens(files, counts, manifest['dtype'], vocab_size, directory, crcs)
    starts_path = paths.join(directory, f'{split}.starts')
    verify(starts_path, manifest['starts_crc32c'][split], directory)
    starts = _array(starts_path, np.int64, directory)
    if len(starts) != manifest[split]['documents'] + 1 or starts[-1] != len(tokens):
      raise ConfigError(f'{directory}/{split}.starts does not match its manifest (corrupted?); '
                        f'delete {directory} and the corpus is tokenized again')
    streams[split] = TokenStream(tokens, starts, directory, split)
  return streams


def _array(path, dtype, directory, count=None):
  """A whole binary file as an array: memory-mapped locally, read on an object store."""
  try:
    if paths.is_remote(path):
      array = np.frombuffer(paths.read_bytes(path), dtype)
    else:
      size = paths.size(path)
      array = (np.memmap(paths.normalize(path), dtype, 'r') if size else np.zeros(0, dtype))
  except (OSError, ValueError) as e:
    raise ConfigError(f'token file {path} cannot be read ({first_line(e)}); delete '
                      f'{directory} and the corpus is tokenized again') from e
  if count is not None and len(array) != count:
    raise ConfigError(f'token file {path} holds {len(array)} values, its manifest says {count} '
                      f'(cut short?); delete {directory} and the corpus is tokenized again')
  return array


class ShardedTokens:
  """Shard token files end to end as one read-only 1-D array. Slices check every id against
  the vocabulary: a damaged shard is an error naming it, never garbage fed to the model."""
  ndim = 1

  def __init__(self, files, counts, dtype, vocab_size, directory, crcs=None):
    self.files, self.dtype, self.vocab_size = files, np.dtype(dtype), vocab_size
    self.directory, self.crcs = directory, crcs
    self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    self.shape = (int(self.offsets[-1]),)
    self._maps, self._lock = collections.OrderedDict(), threading.Lock()
    self._checked = set()  # Shards whose checksum is verified.

  def __len__(self):
    return self.shape[0]

  def __array__(self, dtype=None, copy=None):
    return self[:].astype(dtype or self.dtype, copy=False)

  def __getitem__(self, key):
    if not isinstance(key, slice):
      index = int(key) + (len(self) if int(key) < 0 else 0)
      if not 0 <= index < len(self):
        raise IndexError(key)
      return self[index:index + 1][0]
    start, stop, step = key.indices(len(self))
    if step != 1:
      raise IndexError('token streams are read in contiguous slices')
    pieces = []
    shard = int(np.searchsorted(self.offsets, start, side='right')) - 1
    while start < stop:
      end = min(stop, int(self.offsets[shard + 1]))
      if end > start:
        pieces.append(self._read(shard, start - self.offsets[shard], end - self.offsets[shard]))
      start, shard = end, shard + 1
    out = np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)
    if out.size and int(out.max()) >= self.vocab_size:
      raise ConfigError(f'the token shards in {self.directory} hold id {int(out.max())}, beyond '
                        f'the tokenizer\'s {self.vocab_size} (corrupted, or another '
                        f'tokenizer\'s?); delete {self.directory} and tokenize again')
    return out

  def _read(self, shard, a, b):
    path = self.files[shard]
    if self.crcs is not None and shard not in self._checked:
      verify(path, self.crcs[shard], self.directory)
      self._checked.add(shard)
    if paths.is_remote(path):  # One ranged GET; stateless, so threads may share it.
      import fsspec
      fs, name = fsspec.core.url_to_fs(path)
      size = self.dtype.itemsize
      return np.frombuffer(fs.cat_file(name, start=int(a) * size, end=int(b) * size), self.dtype)
    with self._lock:
      array = self._maps.pop(shard, None)
      if array is None:
        count = int(self.offsets[shard + 1] - self.offsets[shard])
        array = _array(path, self.dtype, self.directory, count)
      self._maps[shard] = array
      if len(self._maps) > OPEN_MAPS:
        self._maps.popitem(last=False)
    return np.asarray(array[a:b])


def layout_path(directory, split, seq_len):
  return paths.join(directory, f'first_fit-{seq_len}.{split}.npy')


def load_layout(directory, split, seq_len):
  """A stored first-fit layout (packing.FirstFitRows.layout), checked against the checksum
  stored beside it; None if there is none (or its checksum never got written: computed
  again)."""
  path = layout_path(directory, split, seq_len)
  checksum = f'{path[:-len(".npy")]}.json'
  if not paths.exists(path) or not paths.exists(checksum):
    return None
  try:
    crc = json.loads(paths.read_text(checksum))['crc32c']
  except (ValueError, KeyError, TypeError, OSError) as e:
    raise ConfigError(f'{checksum} cannot be read ({first_line(e)}); delete it and the '
                      f'packing layout is computed again') from e
  verify(path, crc, directory)
  try:
    if paths.is_remote(path):
      return np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False)
    return np.load(paths.normalize(path), mmap_mode='r', allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise ConfigError(f'packing layout {path} cannot be read ({first_line(e)}); delete it and '
                      f'it is computed again') from e


def save_layout(directory, split, seq_len, layout):
  """The layout, then its checksum beside it (a layout without one is computed again)."""
  path = layout_path(directory, split, seq_len)
  with shards_lib.Checksummed(paths.atomic_file(path)) as f:
    np.save(f, layout, allow_pickle=False)
  paths.atomic_write(f'{path[:-len(".npy")]}.json', json.dumps({'crc32c': f.crc}))
