"""Input: documents -> sentencepiece -> token shards + manifest -> packed rows -> batches.

The order of training batches is a pure function of (seed, step): a grain MapDataset shuffles
the packed rows (reshuffling every epoch), so resuming at step s starts at batch s without
replaying anything, and every process takes its own contiguous rows of each global batch.
"""

import dataclasses
import logging
import math

import grain
import numpy as np

from jaxlm import distributed, limits, paths
from jaxlm import workdir as workdir_lib
from jaxlm.errors import ConfigError
from jaxlm.data import labeled, packing, shards, sources, store
from jaxlm.data import tokenizer as tokenizer_lib

log = logging.getLogger('jaxlm')


@dataclasses.dataclass
class Corpus:
  tokenizer: tokenizer_lib.Tokenizer
  train: packing.PackedRows
  validation: packing.PackedRows


def tokenizer_path(workdir):
  """The run's tokenizer file (tokenizer.model, or an imported tokenizer.json); the first
  name when there is none yet."""
  files = [paths.join(workdir, name) for name in tokenizer_lib.FILENAMES]
  return next((f for f in files if paths.isfile(f)), files[0])


def init_from_tokenizer(init_from):
  """The tokenizer file of the run that `init_from` (a workdir, its checkpoints/ directory or
  one checkpoint) points into, or ''."""
  path = paths.normalize(init_from) if init_from else ''
  for _ in range(3):
    if path and paths.isfile(tokenizer_path(path)):
      return tokenizer_path(path)
    path = paths.parent(path) if path else ''
  return ''


def existing_tokenizer(config, workdir):
  """The tokenizer file a run uses - data.tokenizer, the workdir's, or that of the run
  `init_from` continues - or '' when there is none (a run then trains one)."""
  if config.data.tokenizer:
    return config.data.tokenizer
  if paths.exists(tokenizer_path(workdir)):
    return tokenizer_path(workdir)
  return init_from_tokenizer(config.init_from)


def run_tokenizer(config, workdir):
  """The tokenizer of the run in `workdir`, for the commands that read a trained run (eval,
  generate, fill-mask, convert): never trained here, and checked against the one the run
  recorded when it started (a replaced file would turn its ids into other words)."""
  path = existing_tokenizer(config, workdir)
  if not path:
    raise ConfigError(f'--workdir={workdir} has no {" or ".join(tokenizer_lib.FILENAMES)} and '
                      f'data.tokenizer is empty: the run\'s tokenizer is missing')
  tokenizer = tokenizer_lib.load(path)
  workdir_lib.check_tokenizer(workdir, tokenizer)
  return tokenizer


def check_run_tokenizer(config, workdir):
  """A resumed run's tokenizer must be the one it recorded: a ConfigError if it is missing
  (one would be trained anew) or differs."""
  if workdir_lib.read_inputs(workdir) is not None:
    run_tokenizer(config, workdir)


def get_tokenizer(config, workdir, sample=None):
  """The configured tokenizer, the one cached in the workdir, the one of the run `init_from`
  continues, or a new one trained here on `sample` (Documents; default: a sample of the corpus)
  and not yet saved: `tokenizer.path` is '' until it is."""
  path = existing_tokenizer(config, workdir)
  if path:
    tokenizer = tokenizer_lib.load(path)
  else:
    # An unbiased sample from all over the corpus: each training document with probability
    # sample_bytes / corpus bytes, decided by a hash of its name.
    # Sentencepiece holds its whole sample, ~15x its bytes (measured: 5 and 20 MB of text).
    limits.check_host(16 * config.data.tokenizer_sample_bytes,
                      f'training a tokenizer on data.tokenizer_sample_bytes='
                      f'{config.data.tokenizer_sample_bytes:,}', 'lower it')
    train_docs = sample if sample is not None else _tokenizer_sample(config)
    log.info('training a %d-piece %s tokenizer on up to %.0f MB of text',
             config.model.vocab_size, config.data.tokenizer_type,
             config.data.tokenizer_sample_bytes / 1e6)
    tokenizer = tokenizer_lib.train(train_docs, config.model.vocab_size,
                                    config.data.tokenizer_type,
                                    config.data.tokenizer_sample_bytes, config.seed)
  check_tokenizer(config, tokenizer)
  return tokenizer


def check_tokenizer(config, tokenizer):
  """A clear error unless the tokenizer fits the model's vocabulary (whether it has the pieces
  documents are framed with, the framing itself checks)."""
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                      f'tokenizer\'s {tokenizer.vocab_size} pieces ({tokenizer.path})')


def _tokenizer_sample(config):
  """A bounded sample of the corpus: from each source its weight's share of
  data.tokenizer_sample_bytes, read from prefixes of a few files chosen by the seed (all of a
  source no larger than its share)."""
  components = sources.components(config.data)
  total = sum(w for w, _ in components)
  for weight, source in components:
    yield from sources.sample_documents(
        source, weight / total * config.data.tokenizer_sample_bytes, config.seed)


def _shared_tokenizer(config, workdir, sample=None):
  """get_tokenizer; with several processes, process 0 gets it (training it if need be) and
  saves it in the workdir, and the others then load that file."""
  import jax
  if jax.process_count() == 1:
    return get_tokenizer(config, workdir, sample)
  distributed.on_chief('tokenizer', lambda: save_tokenizer(
      get_tokenizer(config, workdir, sample), workdir))
  return get_tokenizer(config, workdir)


def save_tokenizer(tokenizer, workdir):
  if not tokenizer.path:
    paths.makedirs(workdir)
    tokenizer.save(paths.join(workdir, tokenizer.filename))


def prepare(config, workdir, frame, labeled=False):
  """Tokenizer and packed train/validation rows, tokenizing the corpus first if its manifest
  is missing (or, `labeled`, to fine-tune a classifier, the labeled examples). With
  `data.mixture`, each source has its own shards and rows, mixed by weight
  (packing.Mixture). Every process of a job calls it: each tokenizes its share.

  `frame(tokenizer)` gives the ids around every document, after checking that the tokenizer
  has them: the objective's (objectives.base.Objective.frame), handed down by the caller so
  that data never asks which objective a run trains. A new tokenizer is saved only once the
  corpus has been found usable (with one process).
  """
  import jax
  limits.check_batches(config, jax.process_count())  # Before anything is read or written.
  if labeled:
    return _prepare_labeled(config, workdir, frame)
  tokenizer, parts = tokenize(config, workdir, frame)
  parts = [(weight, _rows(config, tokenizer, *found)) for weight, *found in parts]
  save_tokenizer(tokenizer, workdir)
  if len(parts) == 1:
    return Corpus(tokenizer, *parts[0][1])
  weights = [w for w, _ in parts]
  return Corpus(tokenizer, packing.Mixture([r[0] for _, r in parts], weights),
                packing.Mixture([r[1] for _, r in parts], weights))


def tokenize(config, workdir, frame, refresh=False):
  """Tokenizes each source of the config into token shards (this process's share; see
  shards.py) unless its manifest exists. Returns (tokenizer, [(weight, directory, manifest)]).

  A source whose files changed since its manifest was written is a ConfigError, unless
  `refresh` (jaxlm tokenize): then the changed files are tokenized again and the manifest
  replaced, the shards of unchanged files kept.
  """
  cache_dir = config.data.cache_dir or paths.join(workdir, 'data')
  if paths.exists(cache_dir) and not paths.isdir(cache_dir):
    raise ConfigError(f'data.cache_dir={cache_dir!r} is not a directory')
  tokenizer = _shared_tokenizer(config, workdir)
  ids = frame(tokenizer)
  found = [(weight, *_tokenize_source(config, source, tokenizer, ids, cache_dir, refresh))
           for weight, source in sources.components(config.data)]
  return tokenizer, found


def tokenize_command(config, workdir, frame):
  """`jaxlm tokenize`: tokenizes (or finishes, or updates after the files changed) every
  source; returns the counts of each manifest."""
  tokenizer, found = tokenize(config, workdir, frame, refresh=True)
  import jax
  if jax.process_index() == 0:
    save_tokenizer(tokenizer, workdir)
  return {'tokenizer': tokenizer.path or tokenizer_path(workdir), 'sources': [
      {'source': m['source'], 'manifest': paths.join(d, shards.MANIFEST),
       'shards': len(m['shards']), 'skipped': m['skipped'], **{s: m[s] for s in store.SPLITS}}
      for _, d, m in found]}


def _what(source):
  return source.tfds_name or source.path or 'the Python standard library'


def _tokenize_source(config, source, tokenizer, ids, cache_dir, refresh):
  import jax
  what = _what(source)
  directory = paths.join(cache_dir, store.cache_key(source, tokenizer, config, ids))
  manifest = store.read_manifest(directory)
  listing = None if source.tfds_name else sources.list_signatures(source.path)
  fingerprint = sources.fingerprint(source, listing)
  if manifest is not None and manifest.get('fingerprint') == fingerprint:
    return directory, manifest
  units = shards.plan(source, config.data.shard_bytes, listing)
  if manifest is not None and not refresh:
    raise ConfigError(f'{what} changed since it was tokenized into {directory} '
                      f'({_changed(directory, manifest, listing)}); '
                      f'run `jaxlm tokenize` with this config to tokenize the changes (shards '
                      f'of unchanged files are kept), or restore the files')
  index, count = jax.process_index(), jax.process_count()
  dtype = 'uint16' if tokenizer.vocab_size <= 2 ** 16 else 'uint32'
  log.info('tokenizing %s into %s: %d shards, %d processes', what, directory, len(units), count)
  args = (source, tokenizer, ids, dtype, what)
  if source.max_documents:  # A prefix of the corpus: in order, by process 0.
    units = shards.tokenize_serially(directory, units, *args) if index == 0 else None
  else:
    shards.tokenize_share(directory, units, shards.assign(units, count)[index], *args)
  distributed.barrier(f'every process has tokenized its share of {what}')

  def finish():
    if fingerprint != sources.fingerprint(source):
      raise ConfigError(f'{what} changed while it was being tokenized; run `jaxlm tokenize` '
                        f'again (shards of unchanged files are kept)')
    header = {'format': store.FORMAT, 'source': what, 'dtype': dtype, 'frame': list(ids),
              'vocab_size': tokenizer.vocab_size}
    done = shards.write_manifest(directory, units, fingerprint, header)
    log.info('%s: %s', what, summary(done))
    if config.data.packing == 'first_fit':  # Stored now, so that training starts at once.
      for stream in store.open_streams(directory, done, tokenizer.vocab_size).values():
        pack(stream, config)

  distributed.on_chief(f'manifest of {what}', finish)
  return directory, store.read_manifest(directory)


def _changed(directory, manifest, listing):
  """Which input differs from what a manifest's shards were made from, in words."""
  if listing is None:
    return 'the TFDS split\'s size changed'
  indexes = [shards.read_index(shards.shard_files(directory, s['id'])[1])
             for s in manifest['shards']]
  known = {tuple(f[1:]) for index in indexes if index for f in index['unit']['files']}
  now = {tuple(f[1:]) for f in listing}
  if now - known:
    return f'{min(now - known)[0]} is new or changed'
  return f'{min(known - now)[0]} was removed'


def summary(manifest):
  """The counts of a manifest, in words."""
  counts = ', '.join(f'{s} {manifest[s]["documents"]:,} documents / {manifest[s]["tokens"]:,} '
                     f'tokens' for s in store.SPLITS)
  skipped = sources.Skipped(manifest.get('skipped', {}))
  return f'{counts}; {len(manifest["shards"])} shards' + (
      f'; skipped {skipped.summary()}' if skipped else '')


def pack(stream, config, seq_len=None):
  """Rows of `seq_len` tokens (default model.max_len) from a split's stream, packed as
  data.packing says. A first-fit layout is read from the stream's shard directory if stored
  there for that length, else computed and stored (by process 0)."""
  seq_len = seq_len or config.model.max_len
  if config.data.packing == 'split':
    return packing.PackedRows(stream, seq_len)
  stored = bool(stream.directory)
  layout = store.load_layout(stream.directory, stream.split, seq_len) if stored else None
  try:
    rows = packing.FirstFitRows(stream, seq_len, layout)
  except ValueError as e:
    raise ConfigError(f'{store.layout_path(stream.directory, stream.split, seq_len)} is not a '
                      f'packing layout ({e}); delete it and it is computed again') from e
  if stored and layout is None:
    import jax
    if jax.process_index() == 0:
      store.save_layout(stream.directory, stream.split, seq_len, rows.layout())
  return rows


def repack(rows, config, seq_len):
  """The same token streams as `rows` (rows of a Corpus, mixtures included) packed into rows
  of another length, e.g. for a phase of training at a shorter sequence length."""
  if isinstance(rows, packing.Mixture):
    return packing.Mixture([repack(p, config, seq_len) for p in rows.parts], rows.weights)
  return pack(rows.stream, config, seq_len)


def _rows(config, tokenizer, directory, manifest):
  """(train rows, validation rows) of one tokenized source."""
  what = manifest['source']
  streams = store.open_streams(directory, manifest, tokenizer.vocab_size)
  rows = tuple(pack(streams[s], config) for s in store.SPLITS)
  for split, part in zip(store.SPLITS, rows):
    if len(part) == 0:
      raise ConfigError(f'the {split} split of {what} has {len(part.stream.tokens)} tokens, '
                        f'fewer than one row of model.max_len={config.model.max_len}; use more '
                        f'data or change data.validation_fraction')
  log.info('%s: %d train rows (%d documents), %d validation rows (%d documents) of %d tokens',
           what, len(rows[0]), rows[0].stream.num_documents, len(rows[1]),
           rows[1].stream.num_documents, config.model.max_len)
  return rows


def _prepare_labeled(config, workdir, frame):
  """Rows of labeled examples; a tokenizer trained here learns from the train texts."""
  fc, skipped = config.finetune, sources.Skipped()
  train = labeled.read(fc.train, 'finetune.train', fc, skipped)
  validation = train
  if fc.validation:
    validation = labeled.read(fc.validation, 'finetune.validation', fc, skipped)
  else:
    log.warning('finetune.validation is empty: reporting accuracy on the train split')
  if skipped:
    log.warning('skipped %s', skipped.summary())
  tokenizer = _shared_tokenizer(config, workdir, (sources.Document(str(i), text)
                                                  for i, (text, _) in enumerate(train)))
  ids = frame(tokenizer)
  corpus = Corpus(tokenizer, labeled.rows(train, tokenizer, config, ids, 'train'),
                  labeled.rows(validation, tokenizer, config, ids, 'validation'))
  save_tokenizer(tokenizer, workdir)
  log.info('%d train and %d validation examples, %d classes', len(corpus.train),
           len(corpus.validation), len(fc.labels))
  return corpus


def train_dataset(rows, config, process_index=0, process_count=1):
  """A grain MapDataset whose element s is this process's share of global batch s."""
  per_process = config.batch_size // process_count
  if isinstance(rows, packing.Mixture):  # Shuffled apart, then mixed: proportions hold.
    ds = grain.MapDataset.mix(
        [grain.MapDataset.source(part).seed(config.seed + i).shuffle().repeat()
         for i, part in enumerate(rows.parts)], rows.weights)
  else:
    ds = grain.MapDataset.source(rows).seed(config.seed).shuffle().repeat()
  ds = ds.batch(per_process, drop_remainder=True)
  return ds.slice(slice(process_index, None, process_count))


def train_iterator(dataset, config):
  """A background-prefetching, checkpointable iterator over `train_dataset`. Its state
  {'next_index': s} is the step; `set_state` moves it to any step in O(1)."""
  options = grain.ReadOptions(num_threads=config.data.num_threads,
                              prefetch_buffer_size=config.data.prefetch)
  return iter(dataset.to_iter_dataset(options))


def eval_batches(rows, config, process_index=0, process_count=1):
  """A fixed list of this process's held-out batches; the last is padded with empty rows."""
  count = min(len(rows), config.eval_batches * config.batch_size)
  per_process = config.batch_size // process_count
  limits.check_eval_set(config, math.ceil(count / config.batch_size) * per_process)
  batches = []
  for b in range(math.ceil(count / config.batch_size)):
    first = b * config.batch_size + process_index * per_process
    picked = [rows[i] if i < count else rows.padding_row()
              for i in range(first, first + per_process)]
    batches.append({k: np.stack([r[k] for r in picked]) for k in picked[0]})
  return batches


def eval_tokens(batches):
  """Every real (non-padding) token of a list of batches."""
  return np.concatenate([b['tokens'][b['segment_ids'] > 0] for b in batches])
