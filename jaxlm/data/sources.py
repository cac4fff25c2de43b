"""Where documents come from: the Python standard library's source, the user's files (text,
JSONL - plain, gzip or zstd -, Parquet), or a TFDS dataset read through its ArrayRecord data
source.

A document is (name, text). Its name is stable across machines and runs, because the train /
validation split is decided by hashing it.
"""

import codecs
import collections
import contextlib
import dataclasses
import fnmatch
import glob
import gzip
import hashlib
import json
import logging
import os
import random
import sysconfig
import zlib

from jaxlm import paths
from jaxlm.errors import ConfigError, first_line

log = logging.getLogger('jaxlm')

JSONL_SUFFIXES = ('.jsonl', '.json', '.ndjson')
PARQUET_SUFFIXES = ('.parquet', '.pq')
COMPRESSED_SUFFIXES = ('.gz', '.zst', '.zstd')
MAX_SAMPLE_FILES = 64  # Files (or a TFDS split's records / 1000) a tokenizer sample reads from.


# Memory stays bounded whatever the corpus holds: a text longer than PIECE_CHARS comes as
# consecutive pieces of one document (cut at line ends; encoding a whole long text at once
# takes ~60x its size in token lists), a text file is read a piece at a time, and a JSONL line
# (parsed whole) longer than MAX_LINE_BYTES is skipped and counted.
PIECE_CHARS = 1 << 20
MAX_LINE_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class Document:
  name: str
  text: str
  last: bool = True  # False: a piece of a long document, which goes on in the next one.


def stdlib_files():
  """The .py files of this interpreter's standard library: real text on every machine."""
  root = sysconfig.get_paths()['stdlib']
  files = glob.glob(os.path.join(root, '**', '*.py'), recursive=True)
  return root, sorted(f for f in files if 'site-packages' not in f and 'dist-packages' not in f)


def list_files(path):
  """(root, sorted files) for a comma-separated list of globs; '' means the standard library."""
  if not path:
    return stdlib_files()
  files, seen, special = set(), set(), set()
  for pattern in path.split(','):
    pattern = pattern.strip()
    if paths.isdir(pattern):
      pattern = pattern.rstrip('/') + '/**/*'
    matches = paths.glob(pattern) if paths.is_remote(pattern) else _glob(paths.normalize(pattern))
    for match in sorted(matches, key=lambda m: (m.count('/'), m)):
      real = match if paths.is_remote(match) else os.path.realpath(match)
      if paths.isfile(match) and real not in seen:  # One name per file: a file reached
        seen.add(real)  # through two links must not land in both train and validation.
        files.add(match)
      elif not paths.is_remote(match) and not os.path.isdir(match):
        special.add(match)  # A FIFO (reading it would wait forever), socket, device, dead link.
  if special:
    _warn_once(f'data.path={path!r}: skipped {len(special)} entries that are not regular files '
               f'(FIFOs, sockets, devices, broken links), e.g. {min(special)}')
  if not files:
    raise ConfigError(f'data.path={path!r} matches no files')
  return paths.common_dir(sorted(files)), sorted(files)


_warned = set()


def _warn_once(message):
  """A warning logged once per process (the corpus is listed several times in a run)."""
  if message not in _warned:
    _warned.add(message)
    log.warning('%s', message)


def _glob(pattern):
  """glob.glob, except that '**' walks each real directory once: glob follows symbolic links
  into directories, so a link loop would list the same files under ever longer names (or,
  with two loops, practically forever)."""
  if '**' not in pattern:
    return glob.glob(pattern)
  prefix = pattern.split('**', 1)[0]
  patterns = (pattern, pattern.replace('**' + os.sep, ''))  # '**/' also matches no folder.
  out = []
  for base in glob.glob(prefix) if glob.has_magic(prefix) else [prefix]:
    visited = set()
    for folder, subfolders, names in os.walk(base or '.', followlinks=True):
      real = os.path.realpath(folder)
      if real in visited:
        subfolders[:] = []
        continue
      visited.add(real)
      for name in names:
        full = os.path.join(folder, name)
        if any(fnmatch.fnmatch(full, p) for p in patterns):
          out.append(full)
  return out


def components(data_config):
  """[(weight, data config of one source)]: the entries of data.mixture, or the one source."""
  if not data_config.mixture:
    return [(1.0, data_config)]
  parts = []
  for weight, spec in data_config.mixture:
    part = data_config.copy_and_resolve_references()
    part.mixture, part.path, part.tfds_name = (), '', ''
    if spec.startswith('tfds:'):
      name, _, split = spec[len('tfds:'):].partition(':')
      part.tfds_name, part.tfds_split = name, split or 'train'
    else:
      part.path = spec
    parts.append((float(weight), part))
  return parts


def fingerprint(data_config, listing=None):
  """Changes when any file is added, removed, resized or touched (or the TFDS dataset, split
  or size changes). `listing`: the source's `listing`, if already made."""
  h = hashlib.sha256()
  if data_config.tfds_name:
    source = tfds_source(data_config)
    h.update(f'tfds\0{data_config.tfds_name}\0{data_config.tfds_split}\0{len(source)}'.encode())
    return h.hexdigest()[:16]
  for f, _, size, mtime in listing or list_signatures(data_config.path):
    h.update(f'{f}\0{size}\0{mtime}\n'.encode('utf-8', 'surrogateescape'))
  return h.hexdigest()[:16]


def list_signatures(path):
  """[(location, name, size, modification time)] of the files of a data.path, in order; the
  name (relative to their common folder) is what documents are named after."""
  root, files = list_files(path)
  return [(f, paths.relative(f, root), *paths.signature(f)) for f in files]


def approximate_bytes(data_config):
  """The size of the source's text, roughly: what a tokenizer sample is a share of."""
  if data_config.tfds_name:
    source = tfds_source(data_config)
    sample = [_tfds_text(source[i], data_config.text_field) or ''
              for i in range(min(len(source), 100))]
    return len(source) * sum(len(t) for t in sample) / max(1, len(sample))
  return sum(paths.size(f) for f in list_files(data_config.path)[1])


def tfds_source(data_config):
  """The split's random-access data source (see open_tfds)."""
  name, split = data_config.tfds_name, data_config.tfds_split
  return open_tfds(name, split, f'data.tfds_name={name!r} (split {split!r}) cannot be read')


def open_tfds(name, split, what):
  """A TFDS split's random-access (ArrayRecord) data source, read without TensorFlow. Never
  downloads: a download would hang an offline machine, so the dataset must be prepared
  already; otherwise a ConfigError: `what`, the cause and what to do."""
  import tensorflow_datasets as tfds
  try:
    return tfds.data_source(name, split=split, download=False)
  except Exception as e:  # noqa: BLE001 - tfds raises many kinds; all mean "not readable here".
    prepared = _prepared_format(tfds, name)
    if prepared is not None and prepared not in tfds.core.FileFormat.with_random_access():
      # `tfds build` writes TFRecord by default, which only TensorFlow reads, in order.
      raise ConfigError(
          f'{what}: it is prepared as {prepared.value}, which has no random access; rebuild '
          f'it with `tfds build {name} --file_format=array_record`, or convert the prepared '
          f'copy: `tfds convert_format --dataset_dir=DIR --out_file_format=array_record`'
      ) from e
    raise ConfigError(f'{what}: {first_line(e)}; prepare it where there is network '
                      f'(tfds build {name} --file_format=array_record) and point '
                      f'TFDS_DATA_DIR at it') from e


def _prepared_format(tfds, name):
  """The file format a TFDS dataset is prepared in here, or None if it is not prepared."""
  try:
    builder = tfds.builder(name)
    return builder.info.file_format if builder.is_prepared() else None
  except Exception:  # noqa: BLE001 - unknown or unreadable: the caller's message stands.
    return None


def _tfds_text(record, field):
  text = record.get(field) if isinstance(record, dict) else None
  return text.decode('utf-8', 'replace') if isinstance(text, bytes) else text


class Skipped(collections.Counter):
  """Counts documents skipped for a reason, reported once instead of crashing the run."""

  def summary(self):
    return ', '.join(f'{n} {reason}' for reason, n in sorted(self.items()))


def iter_documents(data_config, skipped=None):
  """Yields every Document of the configured source, skipping (and counting) bad ones."""
  skipped = Skipped() if skipped is None else skipped
  count = 0
  for doc in _all_documents(data_config, skipped):
    yield doc
    count += doc.last
    if data_config.max_documents and count >= data_config.max_documents:
      return


def _all_documents(data_config, skipped):
  if data_config.tfds_name:
    yield from tfds_documents(data_config, 0, len(tfds_source(data_config)), skipped)
    return
  root, files = list_files(data_config.path)
  for path in files:
    yield from file_documents(path, paths.relative(path, root), data_config.text_field, skipped)


def tfds_documents(data_config, start, stop, skipped, source=None):
  """The documents of records [start, stop) of the TFDS split, read a batch at a time."""
  source = source or tfds_source(data_config)
  batch = 256
  for first in range(start, stop, batch):
    indices = list(range(first, min(stop, first + batch)))
    try:  # ArrayRecord reads a batch of records in one call.
      records = source.__getitems__(indices)
    except (AttributeError, TypeError):  # Sources without it (tfds's mock data) one by one.
      records = [source[i] for i in indices]
    for i, record in zip(indices, records):
      text = _tfds_text(record, data_config.text_field)
      if not isinstance(text, str):
        skipped[f'TFDS records without a text feature {data_config.text_field!r}'] += 1
      elif text.strip():
        yield from _pieces(f'{data_config.tfds_name}/{data_config.tfds_split}:{i}', (text,))


def file_documents(path, name, field, skipped):
  """The documents of one file (text, JSONL or Parquet; text and JSONL may be compressed)."""
  base = _uncompressed_name(path)
  reader = (_jsonl_documents if base.endswith(JSONL_SUFFIXES) else
            _parquet_documents if base.endswith(PARQUET_SUFFIXES) else _text_document)
  try:
    yield from reader(path, name, field, skipped)
  except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # The documents before are kept.
    skipped[f'compressed files cut short or corrupt ({type(e).__name__})'] += 1
  except _zstd_error():
    skipped['compressed files cut short or corrupt (zstd)'] += 1


def _uncompressed_name(path):
  return next((path[:-len(s)] for s in COMPRESSED_SUFFIXES if path.endswith(s)), path)


def _zstd_error():
  try:
    import zstandard
    return zstandard.ZstdError
  except ImportError:
    return ()


@contextlib.contextmanager
def open_bytes(path):
  """A binary file, decompressed as it is read when its name ends in .gz or .zst."""
  with paths.open(path, 'rb') as raw:
    if path.endswith('.gz'):
      with gzip.GzipFile(fileobj=raw) as f:
        yield f
    elif path.endswith(('.zst', '.zstd')):
      try:
        import zstandard
      except ImportError:
        raise ConfigError(f'{path} is zstd-compressed and the zstandard module is not '
                          f'installed: pip install zstandard (or decompress it)') from None
      with zstandard.ZstdDecompressor().stream_reader(raw) as f:
        yield f
    else:
      yield raw


def _text_document(path, name, _, skipped):
  """The file as one document, in pieces if long; read twice if it is (a first pass checks
  that it is UTF-8 text, so that no piece of a file that is not goes into the corpus)."""
  problem = _text_problem(path)
  if problem:
    skipped[problem] += 1
    return
  yield from _pieces(name, _decoded_chunks(path))


def _decoded_chunks(path):
  decoder = codecs.getincrementaldecoder('utf-8')()
  with open_bytes(path) as f:
    while chunk := f.read(PIECE_CHARS):
      yield decoder.decode(chunk)
  yield decoder.decode(b'', final=True)


def _text_problem(path):
  """Why a file is not a text document ('files not UTF-8', 'empty files'), or None."""
  blank = True
  try:
    for text in _decoded_chunks(path):
      blank = blank and not text.strip()
  except UnicodeDecodeError:
    return 'files not UTF-8'
  return 'empty files' if blank else None


def _pieces(name, chunks):
  """Documents named `name` holding the text of `chunks` (strings), in pieces of about
  PIECE_CHARS cut after a line end (else a space) where there is one; the last marked so."""
  buffer, piece = '', None
  for chunk in chunks:
    buffer += chunk
    while len(buffer) > PIECE_CHARS:
      half = PIECE_CHARS // 2
      cut = (buffer.rfind('\n', half, PIECE_CHARS) + 1 or buffer.rfind(' ', half, PIECE_CHARS) + 1
             or PIECE_CHARS)
      if piece is not None:
        yield Document(name, piece, last=False)
      piece, buffer = buffer[:cut], buffer[cut:]
  if piece is not None:
    yield Document(name, piece, last=not buffer)
  if buffer:
    yield Document(name, buffer)


def whole_documents(documents, limit):
  """The pieces of the first `limit` documents."""
  count = 0
  for doc in documents:
    if count >= limit:
      return
    yield doc
    count += doc.last


def jsonl_records(path, skipped):
  """(line number, dict) for each JSON object line of a file; lines that are not UTF-8 JSON
  or longer than MAX_LINE_BYTES are counted in `skipped`, and other JSON values come as {}."""
  with open_bytes(path) as f:
    for line_no, raw in enumerate(_lines(f), 1):
      if raw is None:
        skipped[f'JSONL lines over {MAX_LINE_BYTES >> 20} MB'] += 1
        continue
      if not raw.strip():
        continue
      try:
        record = json.loads(raw.decode('utf-8'))
      except (UnicodeDecodeError, json.JSONDecodeError):
        skipped['JSONL lines not valid UTF-8 JSON'] += 1
        continue
      yield line_no, record if isinstance(record, dict) else {}


def _lines(f):
  """Lines of a binary file; None for a line longer than MAX_LINE_BYTES, which is never held
  whole (skipped to its end a piece at a time)."""
  if not hasattr(f, 'readline') or type(f).__module__.startswith('zstandard'):
    yield from _chunked_lines(f)  # zstd's reader has no readline of its own.
    return
  while line := f.readline(MAX_LINE_BYTES + 1):
    if len(line) <= MAX_LINE_BYTES or line.endswith(b'\n'):
      yield line
      continue
    while (rest := f.readline(1 << 16)) and not rest.endswith(b'\n'):
      pass
    yield None


def _chunked_lines(f):
  pending, size, too_long = [], 0, False  # A line's start, which goes on in the next chunk.
  while chunk := f.read(1 << 16):
    *lines, rest = chunk.split(b'\n')
    for line in lines:
      if too_long or size + len(line) > MAX_LINE_BYTES:
        yield None
      else:
        yield b''.join((*pending, line, b'\n'))
      pending, size, too_long = [], 0, False
    if not too_long:
      pending.append(rest)
      size += len(rest)
      if size > MAX_LINE_BYTES:  # Skipped to its end, a chunk at a time.
        pending, size, too_long = [], 0, True
  if too_long or size:
    yield None if too_long else b''.join(pending)


def _jsonl_documents(path, name, field, skipped):
  for line_no, record in jsonl_records(path, skipped):
    text = record.get(field)
    if not isinstance(text, str):
      skipped[f'JSONL lines without a string field {field!r}'] += 1
    elif text.strip():
      yield from _pieces(f'{name}:{line_no}', (text,))


def _parquet_documents(path, name, field, skipped):
  """One document per row of the `field` column, read a batch of rows at a time."""
  import pyarrow.parquet as pq
  try:
    table = pq.ParquetFile(paths.open(path, 'rb') if paths.is_remote(path) else path)
  except Exception:  # noqa: BLE001 - pyarrow's errors for unreadable files vary.
    skipped['unreadable Parquet files'] += 1
    return
  if field not in table.schema_arrow.names:
    skipped[f'Parquet files without a column {field!r}'] += 1
    return
  row = 0
  for batch in table.iter_batches(columns=[field], batch_size=1024):
    for text in batch.column(0).to_pylist():
      row += 1
      if not isinstance(text, str):
        skipped[f'Parquet rows without a string {field!r}'] += 1
      elif text.strip():
        yield from _pieces(f'{name}:{row}', (text,))


def sampled(name, fraction):
  """True for a deterministic `fraction` of names: held-out documents, tokenizer samples."""
  digest = hashlib.sha256(name.encode('utf-8', 'surrogatepass')).digest()
  return int.from_bytes(digest[:8], 'little') / 2 ** 64 < fraction


def sample_documents(data_config, max_bytes, seed):
  """Training documents to fit a tokenizer to, reading at most about `max_bytes` of text: the
  whole source when it is no larger, else a prefix of each of up to MAX_SAMPLE_FILES files
  (of a TFDS split: as many records) chosen by `seed`, never the whole corpus."""
  held_out = lambda d: sampled(d.name, data_config.validation_fraction)
  if data_config.tfds_name:
    source = tfds_source(data_config)
    count = len(source)
    if approximate_bytes(data_config) > max_bytes:
      rng = random.Random(seed)
      picks = sorted(set(rng.randrange(count) for _ in range(MAX_SAMPLE_FILES * 1000)))
      picked = (d for i in picks for d in tfds_documents(data_config, i, i + 1, Skipped(),
                                                          source))
    else:
      picked = tfds_documents(data_config, 0, count, Skipped(), source)
    yield from _up_to(( d for d in picked if not held_out(d)), max_bytes)
    return
  listing = list_signatures(data_config.path)
  if sum(size for _, _, size, _ in listing) <= max_bytes:
    chosen, each = listing, max_bytes
  else:
    chosen = sorted(random.Random(seed).sample(listing, min(len(listing), MAX_SAMPLE_FILES)))
    each = max_bytes / len(chosen)
  total = 0
  for path, name, _, _ in chosen:
    documents = file_documents(path, name, data_config.text_field, Skipped())
    for doc in _up_to((d for d in documents if not held_out(d)), min(each, max_bytes - total)):
      total += len(doc.text)
      yield doc
    documents.close()  # Stops reading the file: only its prefix is read.
    if total >= max_bytes:
      return


def _up_to(documents, max_bytes):
  """The documents until `max_bytes` of text has been yielded."""
  total = 0
  for doc in documents:
    if total >= max_bytes:
      return
    total += len(doc.text)
    yield doc
