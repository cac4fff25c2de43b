"""Tokenizing a corpus into shards, in parallel on every process, streaming, resumable.

The corpus is cut into units that do not depend on the number of processes: runs of whole
files in sorted order of about data.shard_bytes (a larger file is a unit alone), or fixed
ranges of TFDS records. Each process tokenizes its share of the units, one at a time with
bounded memory (documents are read a batch at a time, encoded with the tokenizer's threads
while the next batch is read, and written out at once). A unit's shard is named by a hash of
what it was made from (file names, sizes, modification times; or its record range), so a
re-run keeps every finished shard and redoes only missing or changed ones. The global token
stream is the shards in unit order, whoever wrote them: batches of (seed, step) are the same
for any number of processes, and documents keep the order the in-memory tokenizer gave them.

A shard, each file written atomically and its index last (the index marks it finished):
  shards/<id>.<split>.tokens  the split's documents, framed, back to back (manifest's dtype)
  shards/<id>.<split>.ends    int64 end offset of each of those documents
  shards/<id>.json            documents and tokens per split, skipped records by reason, and
                              the CRC-32C of each file above (computed as it is written)
After every process is done, process 0 writes (store.py reads them):
  <split>.starts              int64 start of every document of the split, then the total
  manifest.json               last: the shards in order with their checksums, counts, the
                              checksums of the starts files and the input's fingerprint
Every file is checked against its checksum when training first opens it (store.py): a shard
zeroed or replaced on disk is refused, never trained on.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import queue
import threading
import time

import google_crc32c
import numpy as np

from jaxlm import paths
from jaxlm.data import sources
from jaxlm.errors import ConfigError

log = logging.getLogger('jaxlm')
SPLITS = ('train', 'validation')
MANIFEST = 'manifest.json'
TFDS_RECORDS_PER_UNIT = 200_000
# Text encoded at once, per encoding thread: the batch's token lists take ~60x its bytes.
BATCH_BYTES_PER_THREAD = 64 << 10
PROGRESS_EVERY_S = 10.0


@dataclasses.dataclass(frozen=True)
class Unit:
  """What one shard is made from: files [(location, name, size, mtime)] or TFDS records."""
  id: str
  files: tuple = ()
  records: tuple = ()  # (start, stop)
  bytes: int = 0


def plan(source, shard_bytes, listing=None):
  """The units of a source, in stream order."""
  if source.tfds_name:
    count = len(sources.tfds_source(source))
    ranges = [(a, min(count, a + TFDS_RECORDS_PER_UNIT))
              for a in range(0, count, TFDS_RECORDS_PER_UNIT)]
    per_record = sources.approximate_bytes(source) / max(1, count)
    what = f'{source.tfds_name}\0{source.tfds_split}'
    return [Unit(_hash(what, r), records=r, bytes=int(per_record * (r[1] - r[0])))
            for r in ranges]
  units, run = [], []
  for entry in listing or sources.list_signatures(source.path):
    run.append(tuple(entry))
    if sum(e[2] for e in run) >= shard_bytes:
      units.append(run)
      run = []
  units += [run] if run else []
  return [Unit(_hash(*[e[1:] for e in u]), files=tuple(u), bytes=sum(e[2] for e in u))
          for u in units]


def _hash(*parts):
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def assign(units, process_count):
  """The units of each process: longest first, to the least loaded (the same on every host)."""
  load, share = [0] * process_count, [[] for _ in range(process_count)]
  for i in sorted(range(len(units)), key=lambda i: (-units[i].bytes, i)):
    p = min(range(process_count), key=lambda p: (load[p], p))
    load[p] += max(1, units[i].bytes)
    share[p].append(i)
  return [sorted(s) for s in share]


def shard_files(directory, unit_id):
  """{'<split>.tokens' / '<split>.ends': location} and the index of one shard."""
  base = paths.join(directory, 'shards', unit_id)
  files = {f'{s}.{kind}': f'{base}.{s}.{kind}' for s in SPLITS for kind in ('tokens', 'ends')}
  return files, f'{base}.json'


def read_index(index_path):
  """A finished shard's index (dict), or None if the shard is not finished."""
  if not paths.exists(index_path):
    return None
  try:
    index = json.loads(paths.read_text(index_path))
    check_counts(index, index.get('crc32c'), index_path)
    return index
  except (ValueError, UnicodeDecodeError, OSError, AttributeError) as e:
    raise ConfigError(f'token shard index {index_path} cannot be read ({e}); delete it and '
                      f'its shard is tokenized again') from e


def check_counts(entry, crcs, where):
  """A ValueError unless a shard's index (or manifest entry) has a count of documents and of
  tokens per split (non-negative integers) and a CRC-32C for each of its files."""
  for split in SPLITS:
    counts = entry.get(split) if isinstance(entry, dict) else None
    if not isinstance(counts, dict) or not all(
        isinstance(counts.get(k), int) and not isinstance(counts.get(k), bool)
        and counts.get(k) >= 0 for k in ('documents', 'tokens')):
      raise ValueError(f'{where}: the {split} counts are not non-negative integers')
  names = {f'{s}.{kind}' for s in SPLITS for kind in ('tokens', 'ends')}
  if not isinstance(crcs, dict) or set(crcs) != names or not all(
      isinstance(crcs[n], int) and not isinstance(crcs[n], bool) for n in names):
    raise ValueError(f'{where}: no CRC-32C of each of its files (written by an older jaxlm?)')


class Progress:
  """One log line every PROGRESS_EVERY_S: share done, tokens/s, time left."""

  def __init__(self, total_bytes, what):
    self.total, self.what = max(1, total_bytes), what
    self.done_bytes = self.tokens = 0
    self.start = self.last = time.perf_counter()

  def update(self, unit_bytes, tokens, force=False):
    self.tokens += tokens
    now = time.perf_counter()
    if not force and now - self.last < PROGRESS_EVERY_S:
      return
    self.last, elapsed = now, max(1e-9, now - self.start)
    share = min(1.0, (self.done_bytes + unit_bytes) / self.total)
    left = elapsed * (1 - share) / share if share > 0 else float('inf')
    log.info('tokenizing %s: %3.0f%% of %.2f GB, %s tokens, %s tokens/s, %s left', self.what,
             100 * share, self.total / 1e9, f'{self.tokens:,}', f'{self.tokens / elapsed:,.0f}',
             time.strftime('%H:%M:%S', time.gmtime(left)) if left < 1e7 else '?')


def write_shard(directory, unit, source, tokenizer, frame, dtype, progress, limit=0):
  """Tokenizes one unit into its shard; returns its index. `limit` > 0: at most that many
  documents (data.max_documents)."""
  files, index_path = shard_files(directory, unit.id)
  paths.makedirs(paths.parent(index_path))
  for path in (*files.values(), index_path):  # Left by a process killed while writing it.
    paths.remove_abandoned_temporaries(path)
  skipped = sources.Skipped()
  documents = _unit_documents(source, unit, skipped)
  if limit:
    documents = sources.whole_documents(documents, limit)
  counts = {s: [0, 0] for s in SPLITS}  # documents, tokens
  with contextlib.ExitStack() as stack:
    out = {name: stack.enter_context(Checksummed(paths.atomic_file(path)))
           for name, path in files.items()}
    text_bytes = 0
    within = {s: False for s in SPLITS}  # In a long document that came in pieces.
    for batch in _prefetch(_batches(documents)):
      encoded = tokenizer.encode([d.text for d in batch], num_threads=os.cpu_count() or 1)
      framed = {s: ([], []) for s in SPLITS}
      for doc, ids in zip(batch, encoded):
        split = 'validation' if sources.sampled(doc.name, source.validation_fraction) else 'train'
        flat, ends = framed[split]
        if not within[split]:
          flat.append(frame[0])
        flat.extend(ids)
        within[split] = not doc.last
        if doc.last:
          flat.append(frame[1])
          ends.append(counts[split][1] + len(flat))
      for split, (flat, ends) in framed.items():
        out[f'{split}.tokens'].write(np.asarray(flat, dtype).tobytes())
        out[f'{split}.ends'].write(np.asarray(ends, np.int64).tobytes())
        counts[split][0] += len(ends)
        counts[split][1] += len(flat)
      text_bytes += sum(len(d.text) for d in batch)
      progress.update(min(text_bytes, unit.bytes), sum(len(f) for f, _ in framed.values()))
  index = {'unit': dataclasses.asdict(unit), 'skipped': dict(skipped),
           **{s: {'documents': counts[s][0], 'tokens': counts[s][1]} for s in SPLITS},
           'crc32c': {name: f.crc for name, f in out.items()}}
  paths.atomic_write(index_path, json.dumps(index))
  progress.done_bytes += unit.bytes
  return index


class Checksummed:
  """A file being written (a context manager giving a binary file) that keeps the CRC-32C of
  what is written to it."""

  def __init__(self, context):
    self.context, self.crc = context, 0

  def __enter__(self):
    self.file = self.context.__enter__()
    return self

  def __exit__(self, *exc):
    return self.context.__exit__(*exc)

  def write(self, data):
    self.crc = google_crc32c.extend(self.crc, data)
    self.file.write(data)


def _unit_documents(source, unit, skipped):
  if unit.records:
    return sources.tfds_documents(source, *unit.records, skipped)
  return (d for path, name, _, _ in unit.files
          for d in sources.file_documents(path, name, source.text_field, skipped))


def _batches(documents):
  batch, size = [], 0
  limit = BATCH_BYTES_PER_THREAD * (os.cpu_count() or 1)
  for doc in documents:
    batch.append(doc)
    size += len(doc.text)
    if size >= limit:
      yield batch
      batch, size = [], 0
  if batch:
    yield batch


def _prefetch(iterable, depth=2):
  """`iterable` read ahead by a thread (reading and parsing overlap encoding), at most `depth`
  items held."""
  items, done = queue.Queue(depth), object()
  stop = threading.Event()

  def work():
    try:
      for item in iterable:
        while not stop.is_set():
          try:
            items.put(item, timeout=0.1)
            break
          except queue.Full:
            pass
        if stop.is_set():
          return
      items.put(done)
    except BaseException as e:  # Raised again in the consumer.
      items.put(e)

  thread = threading.Thread(target=work, daemon=True)
  thread.start()
  try:
    while (item := items.get()) is not done:
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join()


def tokenize_share(directory, units, mine, source, tokenizer, frame, dtype, what):
  """Writes the shards of units `mine` (indices) that are not finished yet."""
  todo = [i for i in mine if read_index(shard_files(directory, units[i].id)[1]) is None]
  if len(todo) < len(mine):
    log.info('%s: %d of this process\'s %d shards are already tokenized', what,
             len(mine) - len(todo), len(mine))
  progress = Progress(sum(units[i].bytes for i in todo), what)
  for i in todo:
    write_shard(directory, units[i], source, tokenizer, frame, dtype, progress)
  if todo:
    progress.update(0, 0, force=True)


def tokenize_serially(directory, units, source, tokenizer, frame, dtype, what):
  """data.max_documents: units in order, until that many documents (process 0 alone). A
  unit's id then also names how many documents it may take."""
  left, done = source.max_documents, []
  progress = Progress(sum(u.bytes for u in units), what)
  for unit in units:
    unit = dataclasses.replace(unit, id=_hash(unit.id, left))
    index = (read_index(shard_files(directory, unit.id)[1]) or
             write_shard(directory, unit, source, tokenizer, frame, dtype, progress, left))
    done.append(unit)
    left -= sum(index[s]['documents'] for s in SPLITS)
    if left <= 0:
      break
  return done


def write_manifest(directory, units, fingerprint, header):
  """Process 0, once every shard is written: the global document starts of each split, then
  the manifest (atomically, last). Returns the manifest."""
  indexes = []
  for unit in units:
    index = read_index(shard_files(directory, unit.id)[1])
    if index is None:
      raise ConfigError(f'token shard {unit.id} of {directory} is missing after tokenizing '
                        f'(was a process stopped?); run jaxlm tokenize again to finish it')
    indexes.append(index)
  starts_crc = {}
  for split in SPLITS:  # Streamed: one shard's offsets in memory at a time.
    with Checksummed(paths.atomic_file(paths.join(directory, f'{split}.starts'))) as f:
      base = 0
      f.write(np.zeros(1, np.int64).tobytes())
      for unit, index in zip(units, indexes):
        data = paths.read_bytes(shard_files(directory, unit.id)[0][f'{split}.ends'])
        ends = np.frombuffer(data, np.int64) if len(data) % 8 == 0 else None
        if (ends is None or len(ends) != index[split]['documents']
            or google_crc32c.value(data) != index['crc32c'][f'{split}.ends']):
          raise ConfigError(f'token shard {unit.id} of {directory} does not match its index '
                            f'(corrupted?); delete shards/{unit.id}.* and tokenize again')
        f.write((ends + base).tobytes())
        base += index[split]['tokens']
    starts_crc[split] = f.crc
  skipped = sum((sources.Skipped(i['skipped']) for i in indexes), sources.Skipped())
  manifest = dict(header, fingerprint=fingerprint, skipped=dict(skipped),
                  shards=[{'id': u.id, **{s: i[s] for s in SPLITS}, 'crc32c': i['crc32c']}
                          for u, i in zip(units, indexes)], starts_crc32c=starts_crc,
                  **{s: {k: sum(i[s][k] for i in indexes) for k in ('documents', 'tokens')}
                     for s in SPLITS})
  paths.atomic_write(paths.join(directory, MANIFEST), json.dumps(manifest, indent=1))
  return manifest
