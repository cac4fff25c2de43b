"""Where documents come from: the Python standard library's source, or the user's files.

A document is (name, text). Its name is stable across machines and runs, because the train /
validation split is decided by hashing it.
"""

import collections
import dataclasses
import glob
import hashlib
import json
import os
import sysconfig

from jaxlm.config import ConfigError

JSONL_SUFFIXES = ('.jsonl', '.json', '.ndjson')


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
  files = set()
  for pattern in path.split(','):
    pattern = os.path.expanduser(pattern.strip())
    matches = glob.glob(pattern, recursive=True)
    if os.path.isdir(pattern):
      matches = glob.glob(os.path.join(pattern, '**', '*'), recursive=True)
    files.update(m for m in matches if os.path.isfile(m))
  if not files:
    raise ConfigError(f'data.path={path!r} matches no files')
  root = os.path.commonpath(sorted(files)) if len(files) > 1 else os.path.dirname(min(files))
  return root, sorted(files)


def fingerprint(files):
  """Changes when any file is added, removed, resized or touched."""
  h = hashlib.sha256()
  for f in files:
    st = os.stat(f)
    h.update(f'{f}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return h.hexdigest()[:16]


class Skipped(collections.Counter):
  """Counts documents skipped for a reason, reported once instead of crashing the run."""

  def summary(self):
    return ', '.join(f'{n} {reason}' for reason, n in sorted(self.items()))


def iter_documents(data_config, skipped=None):
  """Yields every Document of the configured source, skipping (and counting) bad ones."""
  skipped = Skipped() if skipped is None else skipped
  root, files = list_files(data_config.path)
  count = 0
  for path in files:
    name = os.path.relpath(path, root)
    reader = _jsonl_documents if path.endswith(JSONL_SUFFIXES) else _text_document
    for doc in reader(path, name, data_config.text_field, skipped):
      yield doc
      count += 1
      if data_config.max_documents and count >= data_config.max_documents:
        return


def _text_document(path, name, _, skipped):
  with open(path, 'rb') as f:
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


def _jsonl_documents(path, name, field, skipped):
  with open(path, 'rb') as f:
    for line_no, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        record = json.loads(raw.decode('utf-8'))
      except (UnicodeDecodeError, json.JSONDecodeError):
        skipped['JSONL lines not valid UTF-8 JSON'] += 1
        continue
      text = record.get(field) if isinstance(record, dict) else None
      if not isinstance(text, str):
        skipped[f'JSONL lines without a string field {field!r}'] += 1
      elif text.strip():
        yield Document(f'{name}:{line_no}', text)


def sampled(name, fraction):
  """True for a deterministic `fraction` of names: held-out documents, tokenizer samples."""
  digest = hashlib.sha256(name.encode('utf-8', 'surrogatepass')).digest()
  return int.from_bytes(digest[:8], 'little') / 2 ** 64 < fraction
