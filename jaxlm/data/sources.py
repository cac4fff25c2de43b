"""Where documents come from: the Python standard library's source, the user's files (text,
JSONL, Parquet), or a TFDS dataset read through its ArrayRecord data source.

A document is (name, text). Its name is stable across machines and runs, because the train /
validation split is decided by hashing it.
"""

import collections
import dataclasses
import fnmatch
import glob
import hashlib
import json
import os
import sysconfig

from jaxlm import paths
from jaxlm.errors import ConfigError, first_line

JSONL_SUFFIXES = ('.jsonl', '.json', '.ndjson')
PARQUET_SUFFIXES = ('.parquet', '.pq')


@dataclasses.dataclass(frozen=True)
class Document:
  name: str
  text: str


def stdlib_files():
  """The .py files of this interpreter's standard library: real text on every machine."""
  root = sysconfig.get_paths()['stdlib']
  files = glob.glob(os.path.join(root, '**', '*.py'), recursive=True)
  return root, sorted(f for f in files if 'site-packages' not in f and 'dist-packages' not in f)


def list_files(path):
  """(root, sorted files) for a comma-separated list of globs; '' means the standard library."""
  if not path:
    return stdlib_files()
  files, seen = set(), set()
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
  if not files:
    raise ConfigError(f'data.path={path!r} matches no files')
  return paths.common_dir(sorted(files)), sorted(files)


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


def fingerprint(data_config):
  """Changes when any file is added, removed, resized or touched (or the TFDS dataset, split
  or size changes)."""
  h = hashlib.sha256()
  if data_config.tfds_name:
    source = tfds_source(data_config)
    h.update(f'tfds\0{data_config.tfds_name}\0{data_config.tfds_split}\0{len(source)}'.encode())
    return h.hexdigest()[:16]
  for f in list_files(data_config.path)[1]:
    size, mtime = paths.signature(f)
    h.update(f'{f}\0{size}\0{mtime}\n'.encode())
  return h.hexdigest()[:16]


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
    count += 1
    if data_config.max_documents and count >= data_config.max_documents:
      return


def _all_documents(data_config, skipped):
  if data_config.tfds_name:
    source = tfds_source(data_config)
    for i in range(len(source)):
      text = _tfds_text(source[i], data_config.text_field)
      if not isinstance(text, str):
        skipped[f'TFDS records without a text feature {data_config.text_field!r}'] += 1
      elif text.strip():
        yield Document(f'{data_config.tfds_name}/{data_config.tfds_split}:{i}', text)
    return
  root, files = list_files(data_config.path)
  for path in files:
    name = paths.relative(path, root)
    reader = (_jsonl_documents if path.endswith(JSONL_SUFFIXES) else
              _parquet_documents if path.endswith(PARQUET_SUFFIXES) else _text_document)
    yield from reader(path, name, data_config.text_field, skipped)


def _text_document(path, name, _, skipped):
  with paths.open(path, 'rb') as f:
    raw = f.read()
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError:
    skipped['files not UTF-8'] += 1
    return
  if text.strip():
    yield Document(name, text)
  else:
    skipped['empty files'] += 1


def jsonl_records(path, skipped):
  """(line number, dict) for each JSON object line of a file; lines that are not UTF-8 JSON
  are counted in `skipped`, and other JSON values come as {}."""
  with paths.open(path, 'rb') as f:
    for line_no, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        record = json.loads(raw.decode('utf-8'))
      except (UnicodeDecodeError, json.JSONDecodeError):
        skipped['JSONL lines not valid UTF-8 JSON'] += 1
        continue
      yield line_no, record if isinstance(record, dict) else {}


def _jsonl_documents(path, name, field, skipped):
  for line_no, record in jsonl_records(path, skipped):
    text = record.get(field)
    if not isinstance(text, str):
      skipped[f'JSONL lines without a string field {field!r}'] += 1
    elif text.strip():
      yield Document(f'{name}:{line_no}', text)


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
        yield Document(f'{name}:{row}', text)


def sampled(name, fraction):
  """True for a deterministic `fraction` of names: held-out documents, tokenizer samples."""
  digest = hashlib.sha256(name.encode('utf-8', 'surrogatepass')).digest()
  return int.from_bytes(digest[:8], 'little') / 2 ** 64 < fraction
