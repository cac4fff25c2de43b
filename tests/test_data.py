"""Input: sources, tokenizer, token cache, packing, the split, and batch order."""

import json
import os

import numpy as np
import pytest
import tokenizers

from helpers import tiny_config
from jaxlm import data, objectives
from jaxlm.config import ConfigError
from jaxlm.data import packing, sources, store
from jaxlm.data import tokenizer as tokenizer_lib


def test_tokenizer_round_trips_code_and_has_the_special_tokens(shared_data):
  tok = tokenizer_lib.load(str(shared_data / 'tokenizer.model'))
  text = 'def f(x):\n\tif x:\n        return "héllo 🐍"  # ünïcode\n'
  ids = tok.encode([text])[0]
  assert tok.decode(ids) == text  # Whitespace and rare characters survive (byte fallback).
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  for piece in tokenizer_lib.CONTROL:
    assert tok.sp.piece_to_id(piece) > 3
  assert tok.vocab_size == 512


def test_hugging_face_tokenizers(hf_tokenizers, tmp_path):
  """tokenizer.json files: bytes per token exact for byte-level BPE (so bits per byte is),
  special-token roles by name or from a tokenizer_config.json, and no special tokens added
  by encode (jaxlm frames documents itself)."""
  text = 'def f(x):\n\tif x:\n        return "héllo 🐍"  # ünïcode\n'
  tok = tokenizer_lib.load(str(hf_tokenizers['bytelevel']))
  ids = tok.encode([text])[0]
  assert tok.decode(ids) == text
  assert tok.token_bytes()[ids].sum() == len(text.encode('utf-8'))
  assert tok.bos_id == tok.eos_id == tok.special_id('<|endoftext|>') and tok.pad_id == -1
  assert tok.token_bytes()[tok.eos_id] == 0
  with pytest.raises(ConfigError, match=r'has no \[PAD\] piece'):
    tok.check_specials()
  # A checkpoint config.json's ids win over the usual names, for roles no config names.
  assert tokenizer_lib.load(str(hf_tokenizers['bytelevel']), {'bos': 5, 'eos': 6}).eos_id == 6
  # Truncation and padding saved in a file are ignored: documents are never cut or padded.
  saved = tokenizers.Tokenizer.from_file(str(hf_tokenizers['bytelevel']))
  saved.enable_truncation(4)
  saved.enable_padding()
  saved.save(str(tmp_path / 'truncating.json'))
  assert tokenizer_lib.load(str(tmp_path / 'truncating.json')).encode([text]) == [ids]

  wordpiece = tokenizer_lib.load(str(hf_tokenizers['wordpiece']))
  wordpiece.check_specials()
  ids = wordpiece.encode(['Return the value'])[0]
  assert ids[0] not in {wordpiece.special_id('[CLS]'), wordpiece.special_id('[SEP]')}
  assert wordpiece.decode(ids) == 'return the value'  # Lowercased, as BERT uncased does.
  assert [wordpiece.word_start(i) for i in ids].count(True) == 3
  with pytest.raises(ConfigError, match='has no BOS/EOS tokens'):
    wordpiece.check_causal()

  # Roles from a tokenizer_config.json beside the file; save writes both files.
  directory = tmp_path / 'roles'
  directory.mkdir()
  (directory / 'tokenizer.json').write_bytes(hf_tokenizers['wordpiece'].read_bytes())
  (directory / 'tokenizer_config.json').write_text(json.dumps(
      {'bos_token': '[CLS]', 'eos_token': {'content': '[SEP]'}, 'model_max_length': 512}))
  wordpiece = tokenizer_lib.load(str(directory / 'tokenizer.json'))
  assert (wordpiece.bos_id, wordpiece.eos_id) == (wordpiece.special_id('[CLS]'),
                                                  wordpiece.special_id('[SEP]'))
  wordpiece.save(str(tmp_path / 'tokenizer.json'))
  again = tokenizer_lib.load(str(tmp_path / 'tokenizer.json'))
  assert (again.bos_id, again.eos_id, again.pad_id) == (wordpiece.bos_id, wordpiece.eos_id,
                                                        wordpiece.pad_id)
  assert again.config['model_max_length'] == 512  # The rest of the config is kept.
  (directory / 'tokenizer_config.json').write_text('{"bos_token": ')
  with pytest.raises(ConfigError, match='tokenizer_config.json cannot be read as JSON'):
    tokenizer_lib.load(str(directory / 'tokenizer.json'))
  (tmp_path / 'bad.json').write_text('{"model": 3}')
  with pytest.raises(ConfigError, match="is not a Hugging Face tokenizer.json"):
    tokenizer_lib.load(str(tmp_path / 'bad.json'))


def test_corpus_split_is_deterministic_and_disjoint(config, workdir):
  frame = objectives.get(config).frame
  corpus = data.prepare(config, str(workdir), frame)
  names = [d.name for d in sources.iter_documents(config.data)]
  held_out = [n for n in names if sources.sampled(n, config.data.validation_fraction)]
  assert 0 < len(held_out) < len(names)
  assert corpus.validation.stream.num_documents == len(held_out)
  assert corpus.train.stream.num_documents == len(names) - len(held_out)
  again = data.prepare(config, str(workdir), frame)  # From the cache, identical.
  np.testing.assert_array_equal(again.train.stream.tokens, corpus.train.stream.tokens)


def test_a_changed_source_is_refused_until_tokenized_again(tmp_path, shared_data):
  corpus_dir = tmp_path / 'corpus'
  corpus_dir.mkdir()
  for i in range(30):
    (corpus_dir / f'doc{i}.txt').write_text(f'document {i}\n' + 'some words here ' * 40)
  config = tiny_config(data__path=str(corpus_dir / '*.txt'),
                       data__tokenizer=str(shared_data / 'tokenizer.model'),
                       data__validation_fraction=0.2)
  first = data.prepare(config, str(tmp_path), objectives.get(config).frame)
  (corpus_dir / 'doc99.txt').write_text('a new document ' * 50)
  with pytest.raises(ConfigError, match=r'changed since it was tokenized into .*\(doc99.txt is '
                                        r'new or changed\); run `jaxlm tokenize`'):
    # Never silently a different stream under a run.
    data.prepare(config, str(tmp_path), objectives.get(config).frame)
  data.tokenize(config, str(tmp_path), objectives.get(config).frame, refresh=True)
  second = data.prepare(config, str(tmp_path), objectives.get(config).frame)
  assert (second.train.stream.num_documents + second.validation.stream.num_documents ==
          first.train.stream.num_documents + first.validation.stream.num_documents + 1)
  assert not [f for f in os.listdir(tmp_path / 'data') if '.tmp' in f]  # No half-written files.
  (corpus_dir / 'doc3.txt').unlink()
  with pytest.raises(ConfigError, match=r'doc3.txt was removed'):
    data.prepare(config, str(tmp_path), objectives.get(config).frame)


def test_jsonl_documents_and_bad_lines_are_counted(tmp_path):
  path = tmp_path / 'docs.jsonl'
  lines = [json.dumps({'text': f'doc {i}'}) for i in range(3)]
  lines += ['{"body": "no text field"}', 'not json', '', json.dumps({'text': 5})]
  path.write_bytes('\n'.join(lines).encode() + b'\n\xff\xfe\n')
  skipped = sources.Skipped()
  docs = list(sources.iter_documents(tiny_config(data__path=str(path)).data, skipped))
  assert [d.text for d in docs] == ['doc 0', 'doc 1', 'doc 2']
  assert [d.name for d in docs] == ['docs.jsonl:1', 'docs.jsonl:2', 'docs.jsonl:3']
  assert sum(skipped.values()) == 4


def test_non_utf8_text_files_are_skipped_and_counted(tmp_path):
  (tmp_path / 'good.txt').write_text('fine text')
  (tmp_path / 'bad.txt').write_bytes(b'caf\xe9 latin-1')
  skipped = sources.Skipped()
  docs = list(sources.iter_documents(tiny_config(data__path=str(tmp_path)).data, skipped))
  assert [d.name for d in docs] == ['good.txt'] and skipped['files not UTF-8'] == 1


def test_a_path_matching_nothing_is_an_error():
  with pytest.raises(ConfigError, match="data.path='/nonexistent/\\*.txt' matches no files"):
    sources.list_files('/nonexistent/*.txt')


def stream_of(lengths):
  tokens = np.concatenate([np.full(n, i + 10) for i, n in enumerate(lengths)]).astype(np.uint16)
  return store.TokenStream(tokens, np.concatenate([[0], np.cumsum(lengths)]))


def test_packing_loses_and_duplicates_nothing_and_restarts_positions():
  lengths = [5, 17, 3, 40, 9, 2, 12]
  stream = stream_of(lengths)
  rows = packing.PackedRows(stream, seq_len=8)
  assert len(rows) == sum(lengths) // 8
  flat = np.concatenate([rows[i]['tokens'] for i in range(len(rows))])
  np.testing.assert_array_equal(flat, stream.tokens[:len(flat)])  # In order, each once.
  for i in range(len(rows)):
    row = rows[i]
    for t in range(8):
      doc = np.searchsorted(stream.starts, i * 8 + t, side='right') - 1
      assert row['tokens'][t] == doc + 10
      if t > 0:  # A new segment exactly where the document changes.
        same = row['tokens'][t] == row['tokens'][t - 1]
        assert (row['segment_ids'][t] == row['segment_ids'][t - 1]) == same
        assert row['positions'][t] == (row['positions'][t - 1] + 1 if same else 0)
    assert row['segment_ids'][0] == 1 and row['positions'][0] == 0
    assert row['positions'].max() < 8
  with pytest.raises(IndexError):
    rows[len(rows)]


def test_batch_order_is_a_function_of_seed_and_step(config):
  rows = packing.PackedRows(stream_of([37] * 40), seq_len=8)
  ds = data.train_dataset(rows, config)
  it = data.train_iterator(ds, config)
  first = [next(it)['tokens'] for _ in range(6)]
  resumed = data.train_iterator(data.train_dataset(rows, config), config)
  resumed.set_state({'next_index': 4})
  np.testing.assert_array_equal(next(resumed)['tokens'], first[4])
  saved = it.get_state()
  later = [next(it)['tokens'] for _ in range(3)]
  restored = data.train_iterator(data.train_dataset(rows, config), config)
  restored.set_state(saved)
  for expected in later:  # Iterator state save/restore gives the same next batches.
    np.testing.assert_array_equal(next(restored)['tokens'], expected)
  np.testing.assert_array_equal(ds[5]['tokens'], first[5])  # Random access to any step.
  other = data.train_iterator(data.train_dataset(rows, tiny_config(seed=1)), config)
  assert not np.array_equal(next(other)['tokens'], first[0])


@pytest.mark.parametrize('count', [2, 4])
def test_each_process_reads_its_own_rows_of_the_same_global_batches(config, count):
  rows = packing.PackedRows(stream_of([23] * 50), seq_len=8)
  whole = data.train_dataset(rows, config)
  parts = [data.train_dataset(rows, config, process_index=p, process_count=count)
           for p in range(count)]
  for step in range(5):
    joined = np.concatenate([part[step]['tokens'] for part in parts])
    np.testing.assert_array_equal(joined, whole[step]['tokens'])


def test_epochs_reshuffle_and_cover_every_row(config):
  rows = packing.PackedRows(stream_of([8] * 16), seq_len=8)  # 16 rows: 2 batches per epoch.
  ds = data.train_dataset(rows, config)
  epoch = lambda e: np.concatenate([ds[2 * e + i]['tokens'][:, 0] for i in range(2)])
  assert sorted(epoch(0)) == sorted(epoch(1)) == list(range(10, 26))
  assert not np.array_equal(epoch(0), epoch(1))


def test_eval_batches_are_fixed_and_padded(config):
  rows = packing.PackedRows(stream_of([8] * 11), seq_len=8)  # 11 rows, batch 8: 2 batches.
  batches = data.eval_batches(rows, config)
  assert len(batches) == 2
  assert (batches[1]['segment_ids'][3:] == 0).all()  # 5 empty rows carry no weight.
  assert (batches[1]['segment_ids'][:3] > 0).all()


def test_parquet_rows_are_documents_and_bad_rows_are_counted(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({'body': ['first document', None, '  ', 'third one'],
                           'id': [1, 2, 3, 4]}), tmp_path / 'a.parquet')
  pq.write_table(pa.table({'other': ['x']}), tmp_path / 'b.parquet')
  skipped = sources.Skipped()
  config = tiny_config(data__path=str(tmp_path / '*.parquet'), data__text_field='body')
  docs = list(sources.iter_documents(config.data, skipped))
  assert [(d.name, d.text) for d in docs] == [('a.parquet:1', 'first document'),
                                              ('a.parquet:4', 'third one')]
  assert skipped == {"Parquet rows without a string 'body'": 1,
                     "Parquet files without a column 'body'": 1}


def test_a_tfds_dataset_is_read_through_its_data_source(tmp_path, shared_data):
  import tensorflow_datasets as tfds
  config = tiny_config(data__path='', data__tfds_name='lm1b', data__max_documents=0,
                       model__max_len=16, data__validation_fraction=0.2)
  with tfds.testing.mock_data(num_examples=60, policy=tfds.testing.MockPolicy.USE_CODE):
    docs = list(sources.iter_documents(config.data))
    assert len(docs) == 60 and docs[0].name == 'lm1b/train:0' and docs[0].text.strip()
    (tmp_path / 'tokenizer.model').write_bytes((shared_data / 'tokenizer.model').read_bytes())
    corpus = data.prepare(config, str(tmp_path), objectives.get(config).frame)
  assert len(corpus.train) > 0 and corpus.train.stream.num_documents + \
      corpus.validation.stream.num_documents == 60


def test_an_unprepared_tfds_dataset_is_one_clear_error(tmp_path):
  config = tiny_config(data__path='', data__tfds_name='no_such_dataset_xyz')
  with pytest.raises(ConfigError, match=r"data.tfds_name='no_such_dataset_xyz' \(split 'train'\) "
                                        r'cannot be read: .*tfds build no_such_dataset_xyz'):
    data.prepare(config, str(tmp_path), objectives.get(config).frame)
  assert not (tmp_path / 'tokenizer.model').exists()
  with pytest.raises(ConfigError, match='are both set; keep one'):
    tiny_config(data__tfds_name='lm1b')


@pytest.mark.parametrize('lengths', [[5, 17, 3, 40, 9, 2, 12], [8] * 5, [1] * 30, [100], [7, 9]])
def test_first_fit_packing_keeps_every_token_once_and_documents_whole(lengths):
  stream = stream_of(lengths)
  rows = packing.FirstFitRows(stream, seq_len=8)
  seen = []
  for i in range(len(rows)):
    row = rows[i]
    real = row['segment_ids'] > 0
    assert real[:real.sum()].all()  # Padding only at the end.
    for seg in range(1, row['segment_ids'].max() + 1):
      piece = row['tokens'][row['segment_ids'] == seg]
      assert len(set(piece)) == 1  # A segment is one document (stream_of: token = doc + 10) ...
      np.testing.assert_array_equal(row['positions'][row['segment_ids'] == seg],
                                    np.arange(len(piece)))  # ... whose positions restart.
      seen.append((int(piece[0]), len(piece)))
  # Every token once: each document's pieces add up to its length; short ones are never cut.
  for doc, length in enumerate(lengths):
    pieces = [n for d, n in seen if d == doc + 10]
    assert sum(pieces) == length and (len(pieces) == 1 or length > 8)
  assert -(-sum(lengths) // 8) <= len(rows) <= len(seen)
  with pytest.raises(IndexError):
    rows[len(rows)]


def test_first_fit_fills_rows_and_cuts_fewer_documents_than_split():
  rng = np.random.default_rng(0)
  lengths = list(rng.integers(1, 300, 400))
  stream, seq_len = stream_of(lengths), 256
  first_fit, split = packing.FirstFitRows(stream, seq_len), packing.PackedRows(stream, seq_len)
  used = sum((first_fit[i]['segment_ids'] > 0).sum() for i in range(len(first_fit)))
  assert used == sum(lengths)
  assert used / (len(first_fit) * seq_len) > 0.95  # Little padding, and far fewer cuts:
  first_fit_cuts = len(first_fit.piece_length) - len(lengths)  # Only documents over 256.
  assert first_fit_cuts == sum(-(-n // seq_len) - 1 for n in lengths)
  starts = np.concatenate([[0], np.cumsum(lengths)])
  split_cuts = sum(s // seq_len != (e - 1) // seq_len for s, e in zip(starts[:-1], starts[1:]))
  assert first_fit_cuts < split_cuts / 2


def test_first_fit_is_chosen_by_config_and_trains(config, workdir):
  config.data.packing = 'first_fit'
  corpus = data.prepare(config, str(workdir), objectives.get(config).frame)
  assert isinstance(corpus.train, packing.FirstFitRows)
  assert (corpus.train[0]['segment_ids'] > 0).sum() > 0.9 * config.model.max_len


def test_a_mixture_draws_rows_in_proportion_to_its_weights(config):
  a = packing.PackedRows(stream_of([8] * 30), seq_len=8)  # Tokens 10..39: source A.
  b_stream = stream_of([8] * 90)
  b_stream.tokens[:] += 1000  # Tokens >= 1010: source B.
  b = packing.PackedRows(b_stream, seq_len=8)
  ds = data.train_dataset(packing.Mixture([a, b], [0.7, 0.3]), config)
  first = np.concatenate([ds[step]['tokens'][:, 0] for step in range(100)])
  share = (first < 1000).mean()
  assert abs(share - 0.7) < 0.02, share
  # Each source still covers all its rows and reshuffles between its epochs.
  from_a = first[first < 1000]
  assert set(from_a[:30]) == set(range(10, 40)) and not np.array_equal(from_a[:30], from_a[30:60])
  # Per-process slices of a mixture assemble the same global batches.
  parts = [data.train_dataset(packing.Mixture([a, b], [0.7, 0.3]), config, p, 2) for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([p[3]['tokens'] for p in parts]), ds[3]['tokens'])


def test_a_mixture_of_sources_is_prepared_from_the_config(tmp_path, shared_data):
  from conftest import STDLIB
  import os
  (tmp_path / 'tokenizer.model').write_bytes((shared_data / 'tokenizer.model').read_bytes())
  config = tiny_config(data__path='', data__mixture=(
      (3, os.path.join(STDLIB, 'json/*.py') + ',' + os.path.join(STDLIB, 'email/*.py')),
      (1, os.path.join(STDLIB, 'logging/*.py'))))
  corpus = data.prepare(config, str(tmp_path), objectives.get(config).frame)
  assert isinstance(corpus.train, packing.Mixture) and len(corpus.train.parts) == 2
  assert len(list((tmp_path / 'data').glob('*/manifest.json'))) == 2  # Shards per source.
  rows = [corpus.validation[i] for i in range(min(8, len(corpus.validation)))]
  assert all(r['tokens'].shape == (64,) for r in rows)
  for bad, message in [(((0, 'x'),), 'must be \\(positive weight, source\\)'),
                       ((('x', 1),), 'must be \\(positive weight, source\\)')]:
    with pytest.raises(ConfigError, match=message):
      tiny_config(data__path='', data__mixture=bad)
  with pytest.raises(ConfigError, match='data.mixture replaces data.path'):
    tiny_config(data__mixture=((1, 'x'),))


def test_training_runs_on_a_first_fit_packed_mixture(tmp_path, shared_data):
  from conftest import CORPUS, one_device
  from jaxlm import train
  (tmp_path / 'tokenizer.model').write_bytes((shared_data / 'tokenizer.model').read_bytes())
  json_glob, *others = CORPUS.split(',')
  config = tiny_config(data__path='', data__packing='first_fit', train_steps=4,
                       log_every_steps=2, data__mixture=((1, json_glob), (2, ','.join(others))))
  result = train.train(config, str(tmp_path), one_device())
  assert result['step'] == 4 and np.isfinite(result['loss']) and np.isfinite(result['eval_loss'])


def test_a_tfds_dataset_prepared_as_tfrecord_says_how_to_rebuild_it(tmp_path, monkeypatch):
  """`tfds build` writes TFRecord unless told otherwise; before, the error told the user to
  run that same command again."""
  import tensorflow_datasets as tfds
  monkeypatch.setattr(tfds.core.constants, 'DATA_DIR', str(tmp_path))
  builder = tfds.builder('lm1b', data_dir=str(tmp_path), file_format='tfrecord')
  template = tfds.core.ShardedFileTemplate(  # What `tfds build lm1b` leaves, less the data.
      data_dir=builder.data_dir, template='{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
      dataset_name='lm1b', split='train', filetype_suffix='tfrecord')
  builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name='train', shard_lengths=[2], num_bytes=10, filename_template=template)]))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)
  config = tiny_config(data__path='', data__tfds_name='lm1b')
  with pytest.raises(ConfigError, match=r'prepared as tfrecord, which has no random access; '
                                        r'rebuild it with `tfds build lm1b '
                                        r'--file_format=array_record`'):
    sources.tfds_source(config.data)
