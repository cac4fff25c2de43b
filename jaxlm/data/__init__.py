"""Input: documents -> sentencepiece -> cached token streams -> packed rows -> batches.

The order of training batches is a pure function of (seed, step): a grain MapDataset shuffles
the packed rows (reshuffling every epoch), so resuming at step s starts at batch s without
replaying anything, and every process takes its own contiguous rows of each global batch.
"""

import dataclasses
import logging
import math

import grain
import numpy as np

from jaxlm import objectives, paths
from jaxlm.errors import ConfigError
from jaxlm.data import labeled, packing, sources, store
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


def get_tokenizer(config, workdir, sample=None):
  """The configured tokenizer, the one cached in the workdir, the one of the run `init_from`
  continues, or a new one trained here on `sample` (Documents; default: a sample of the corpus)
  and not yet saved: `tokenizer.path` is '' until it is."""
  if config.data.tokenizer:
    tokenizer = tokenizer_lib.load(config.data.tokenizer)
  elif paths.exists(tokenizer_path(workdir)):
    tokenizer = tokenizer_lib.load(tokenizer_path(workdir))
  elif init_from_tokenizer(config.init_from):
    tokenizer = tokenizer_lib.load(init_from_tokenizer(config.init_from))
  else:
    # An unbiased sample from all over the corpus: each training document with probability
    # sample_bytes / corpus bytes, decided by a hash of its name.
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
  """A clear error unless the tokenizer fits the model's vocabulary and has the special tokens
  the objective frames documents with."""
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                      f'tokenizer\'s {tokenizer.vocab_size} pieces ({tokenizer.path})')
  objectives.get(config).check_tokenizer(tokenizer)


def _tokenizer_sample(config):
  """An unbiased sample from all over the corpus: each training document with probability
  sample_bytes / corpus bytes, decided by a hash of its name (in a mixture, each source
  contributes in proportion to its weight)."""
  components = sources.components(config.data)
  total = sum(w for w, _ in components)
  for weight, source in components:
    share = (weight / total * config.data.tokenizer_sample_bytes /
             max(1, sources.approximate_bytes(source)))
    yield from (d for d in sources.iter_documents(source)
                if not sources.sampled(d.name, config.data.validation_fraction)
                and sources.sampled('tokenizer:' + d.name, share))


def save_tokenizer(tokenizer, workdir):
  if not tokenizer.path:
    paths.makedirs(workdir)
    tokenizer.save(paths.join(workdir, tokenizer.filename))


def frame(config, tokenizer):
  """The ids around every document (objectives.base.Objective.frame)."""
  return objectives.get(config).frame(tokenizer)


def prepare(config, workdir):
  """Tokenizer and packed train/validation rows, building the token caches if needed (or, to
  fine-tune a classifier, the labeled examples). With `data.mixture`, each source has its own
  cache and rows, mixed by weight (packing.Mixture).

  A new tokenizer and token cache are written only once the corpus has been found usable.
  """
  if objectives.get(config).labeled:
    return _prepare_labeled(config, workdir)
  tokenizer = get_tokenizer(config, workdir)
  parts = [(weight, _rows(config, source, tokenizer, workdir))
           for weight, source in sources.components(config.data)]
  save_tokenizer(tokenizer, workdir)
  if len(parts) == 1:
    return Corpus(tokenizer, *parts[0][1])
  weights = [w for w, _ in parts]
  return Corpus(tokenizer, packing.Mixture([r[0] for _, r in parts], weights),
                packing.Mixture([r[1] for _, r in parts], weights))


def _rows(config, source, tokenizer, workdir):
  """(train rows, validation rows) of one source (a data config), from its token cache."""
  what = source.tfds_name or source.path or 'the Python standard library'
  ids = frame(config, tokenizer)
  key = store.cache_key(sources.fingerprint(source), tokenizer, config, ids)
  cache_dir = config.data.cache_dir or paths.join(workdir, 'data')
  streams = store.load(cache_dir, key)
  built = streams is None
  if built:
    skipped = sources.Skipped()
    log.info('tokenizing %s', what)
    streams = store.build(
        sources.iter_documents(source, skipped), tokenizer,
        lambda name: sources.sampled(name, config.data.validation_fraction), ids)
    if skipped:
      log.warning('%s: skipped %s', what, skipped.summary())
  pack = {'split': packing.PackedRows, 'first_fit': packing.FirstFitRows}[config.data.packing]
  rows = tuple(pack(streams[s], config.model.max_len) for s in store.SPLITS)
  for split, part in zip(store.SPLITS, rows):
    if len(part) == 0:
      raise ConfigError(f'the {split} split of {what} has {len(part.stream.tokens)} tokens, '
                        f'fewer than one row of model.max_len={config.model.max_len}; use more '
                        f'data or change data.validation_fraction')
  if built:
    store.save(streams, cache_dir, key)
    log.info('cached the tokenized corpus in %s', cache_dir)
  log.info('%s: %d train rows (%d documents), %d validation rows (%d documents) of %d tokens',
           what, len(rows[0]), rows[0].stream.num_documents, len(rows[1]),
           rows[1].stream.num_documents, config.model.max_len)
  return rows


def _prepare_labeled(config, workdir):
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
  tokenizer = get_tokenizer(config, workdir, (sources.Document(str(i), text)
                                              for i, (text, _) in enumerate(train)))
  ids = frame(config, tokenizer)
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
