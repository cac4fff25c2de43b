"""Labeled examples for fine-tuning a classifier: JSONL or CSV files, or a TFDS data source.

One example per row: [CLS] text [SEP] (or BOS text EOS for a causal backbone), cut to
model.max_len and padded; segment 0 marks the padding so attention and pooling ignore it.
"""

import csv
import logging

import numpy as np

from jaxlm import paths
from jaxlm.errors import ConfigError
from jaxlm.data import sources

log = logging.getLogger('jaxlm')


def read(spec, field_name, fc, skipped):
  """[(text, label)] of a split; `spec` is a glob of .jsonl/.csv files or 'tfds:NAME:SPLIT'."""
  if spec.startswith('tfds:'):
    records = _tfds_records(spec, field_name)
  else:
    files = [f for f in paths.glob(spec) if paths.isfile(f)]
    if not files:
      raise ConfigError(f'{field_name}={spec!r} matches no files; give .jsonl or .csv files')
    records = (r for f in files for r in _file_records(f, field_name, skipped))
  examples = []
  for record in records:
    text, label = record.get(fc.text_field), record.get(fc.label_field)
    if isinstance(text, bytes):
      text = text.decode('utf-8', 'replace')
    if not isinstance(text, str) or not text.strip():
      skipped[f'examples without a text field {fc.text_field!r}'] += 1
    elif label is None or (isinstance(label, str) and not label.strip()):
      skipped[f'examples without a label field {fc.label_field!r}'] += 1
    else:
      examples.append((text, _label_name(label)))
  if not examples:
    raise ConfigError(f'{field_name}={spec!r} has no usable examples (fields '
                      f'finetune.text_field={fc.text_field!r}, '
                      f'finetune.label_field={fc.label_field!r})')
  return examples


def _label_name(label):
  label = label.item() if isinstance(label, np.generic | np.ndarray) else label
  return str(label).strip()


def _file_records(path, field_name, skipped):
  if path.endswith('.csv'):
    try:
      with paths.open(path, newline='', encoding='utf-8') as f:
        yield from csv.DictReader(f)
    except UnicodeDecodeError:
      raise ConfigError(f'{field_name}: {path} is not UTF-8 text') from None
    return
  if not path.endswith(sources.JSONL_SUFFIXES):
    raise ConfigError(f'{field_name}: {path} is neither .jsonl nor .csv')
  yield from (record for _, record in sources.jsonl_records(path, skipped))


def _tfds_records(spec, field_name):
  """Records of an already prepared TFDS dataset (see sources.open_tfds)."""
  parts = spec.split(':')
  if len(parts) != 3 or not parts[1] or not parts[2]:
    raise ConfigError(f'{field_name}={spec!r} must be tfds:NAME:SPLIT, e.g. tfds:imdb_reviews:train')
  source = sources.open_tfds(parts[1], parts[2], f'{field_name}={spec!r}: tfds cannot read it')
  return (source[i] for i in range(len(source)))


def resolve_labels(config):
  """Fills finetune.labels, if empty, with the sorted labels of the train split (numerically
  when they are all integers), so the classifier's size is known before it is built."""
  fc = config.finetune
  if not fc.train:
    raise ConfigError('finetune.train is empty: give the labeled training data '
                      '(--config.finetune.train=FILE.jsonl|FILE.csv|tfds:NAME:SPLIT)')
  if fc.labels:
    given = tuple(fc.labels)
    fc.labels = tuple(_label_name(label) for label in given)
    twice = next((n for i, n in enumerate(fc.labels) if n in fc.labels[:i]), None)
    if twice is not None:  # Its second class would never be trained.
      raise ConfigError(f'finetune.labels={given!r} names the label {twice!r} twice; list '
                        f'each class once')
    if '' in fc.labels or len(fc.labels) < 2:
      raise ConfigError(f'finetune.labels={given!r} must name at least two classes, none empty')
    return
  names = {label for _, label in read(fc.train, 'finetune.train', fc, sources.Skipped())}
  numeric = all(n.lstrip('-').isdigit() for n in names)
  fc.labels = tuple(sorted(names, key=int if numeric else str))
  if len(fc.labels) < 2:
    raise ConfigError(f'finetune.train={fc.train!r} has only the label {fc.labels[0]!r}; a '
                      f'classifier needs at least two')


class Rows:
  """Random-access rows {'tokens', 'segment_ids', 'positions', 'label'}: one example each."""

  def __init__(self, token_ids, labels, seq_len, frame, pad_id):
    self.token_ids, self.labels = token_ids, np.asarray(labels, np.int32)
    self.seq_len, self.frame, self.pad_id = seq_len, frame, pad_id

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(index)
    ids = [self.frame[0], *self.token_ids[index][:self.seq_len - 2], self.frame[1]]
    row = self.padding_row()
    row['tokens'][:len(ids)] = ids
    row['segment_ids'][:len(ids)] = 1
    row['positions'][:len(ids)] = np.arange(len(ids))
    row['label'] = self.labels[index]
    return row

  def padding_row(self):
    """A row that contributes nothing: label -1 weighs 0, segment 0 is padding."""
    return {'tokens': np.full((self.seq_len,), self.pad_id, np.int32),
            'segment_ids': np.zeros((self.seq_len,), np.int32),
            'positions': np.zeros((self.seq_len,), np.int32), 'label': np.int32(-1)}


def rows(examples, tokenizer, config, frame, split):
  """Encodes (text, label) examples; examples whose label is not in finetune.labels are
  skipped with a warning (a validation split may hold a class the train split lacks)."""
  index = {name: i for i, name in enumerate(config.finetune.labels)}
  known = [(t, index[label]) for t, label in examples if label in index]
  if len(known) < len(examples):
    log.warning('skipped %d %s examples whose label is not one of finetune.labels %s',
                len(examples) - len(known), split, list(config.finetune.labels))
  if not known:
    raise ConfigError(f'no {split} example has a label from finetune.labels='
                      f'{config.finetune.labels}')
  token_ids = tokenizer.encode(t for t, _ in known)
  truncated = sum(len(ids) + 2 > config.model.max_len for ids in token_ids)
  if truncated:
    log.info('%d of %d %s examples are longer than model.max_len=%d tokens and were cut',
             truncated, len(known), split, config.model.max_len)
  return Rows(token_ids, [label for _, label in known], config.model.max_len, frame,
              max(tokenizer.pad_id, 0))
