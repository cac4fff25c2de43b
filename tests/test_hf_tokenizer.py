"""The exported tokenizer (jaxlm/hf_tokenizer.py) is the run's own through transformers'
AutoTokenizer, for every kind jaxlm trains or imports: the same ids on a corpus sample, the
same decoded text, the same special ids, and the run's document framing."""

import glob
import json

import pytest

from helpers import CORPUS, train_hf_tokenizer
from jaxlm import hf_tokenizer
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import ConfigError

transformers = pytest.importorskip('transformers', reason="needs the test extra: pip install "
                                   "-e '.[test]'")

FILES = sorted(f for pattern in CORPUS.split(',') for f in glob.glob(pattern))


class Doc:
  def __init__(self, text):
    self.text = text


@pytest.fixture(scope='module')
def sample():
  """Every 7th file of the corpus, cut at 20 kB, and text from outside it."""
  texts = [open(f, encoding='utf-8').read()[:20_000] for f in FILES[::7]]
  return texts + ['  Leading and trailing  \n\n\t', 'naïve café, 世界 ½ — ok', 'x' * 300, '']


@pytest.fixture(scope='module')
def tokenizers_by_kind(shared_data, tmp_path_factory):
  """Each kind jaxlm trains (sentencepiece BPE, unigram) or imports (byte-level BPE as GPT-2,
  WordPiece as BERT) with the objective it would serve."""
  root = tmp_path_factory.mktemp('hf_tok')
  texts = [open(f, encoding='utf-8').read() for f in FILES[1::3]]
  unigram = tokenizer_lib.train(map(Doc, texts), 512, 'unigram', max_bytes=300_000)
  unigram.path = 'unigram.model'
  by_kind = {'sentencepiece-bpe': ('gpt2', tokenizer_lib.load(
                 str(shared_data / 'tokenizer.model'))),
             'sentencepiece-unigram': ('bert', unigram)}
  for kind, family in (('bytelevel', 'gpt2'), ('wordpiece', 'bert')):
    path = train_hf_tokenizer(kind, root / kind / 'tokenizer.json')
    by_kind[kind] = (family, tokenizer_lib.load(str(path)))
  return by_kind


def export(tokenizer, family, directory):
  """The Hugging Face files of a run of `family` (a decoder frames with BOS, an encoder with
  [CLS] ... [SEP]), read back with AutoTokenizer."""
  if family == 'gpt2':
    framing = (tokenizer.bos_id, tokenizer.eos_id)
  else:
    framing = (tokenizer.special_id('[CLS]'), tokenizer.special_id('[SEP]'))
  directory.mkdir()
  for name, content in hf_tokenizer.files(tokenizer, framing, 128).items():
    (directory / name).write_bytes(content)
  (directory / 'config.json').write_text(json.dumps({'model_type': family}))
  return transformers.AutoTokenizer.from_pretrained(directory), framing


@pytest.mark.parametrize('kind', ['sentencepiece-bpe', 'sentencepiece-unigram', 'bytelevel',
                                  'wordpiece'])
def test_exported_tokenizer_is_the_runs(kind, tokenizers_by_kind, sample, tmp_path):
  family, tokenizer = tokenizers_by_kind[kind]
  hf, framing = export(tokenizer, family, tmp_path / 'hf')
  ids = tokenizer.encode(sample)
  got = hf(sample, add_special_tokens=False)['input_ids']
  if kind == 'sentencepiece-unigram':
    # tokenizers' Viterbi breaks exact ties in another order (six spaces as 1+5 pieces where
    # sentencepiece has 5+1): every difference must be another best segmentation of the text.
    tied = [(a, b) for a, b in zip(got, ids) if a != b]
    assert len(tied) < len(ids) / 2
    for a, b in tied:
      assert tokenizer.decode(a) == tokenizer.decode(b)
      assert sum(map(tokenizer.sp.get_score, a)) == pytest.approx(
          sum(map(tokenizer.sp.get_score, b)), abs=1e-3)
  else:
    assert got == ids
  # jaxlm decodes as generated text is read: special tokens (an unknown piece too) dropped.
  assert [hf.decode(i, skip_special_tokens=True) for i in ids] == [tokenizer.decode(i)
                                                                   for i in ids]
  for role in ('bos', 'eos', 'pad', 'unk'):
    want = getattr(tokenizer, f'{role}_id')
    assert getattr(hf, f'{role}_token_id') == (want if want >= 0 else None), role
  assert hf.model_max_length == 128 and len(hf) == tokenizer.vocab_size
  # tokenizer(text) frames it as jaxlm frames a document: [BOS] text, or [CLS] text [SEP].
  framed = hf(sample[0])['input_ids']
  if family == 'gpt2':
    assert framed == [framing[0], *ids[0]]
  else:
    assert framed == [framing[0], *ids[0], framing[1]]
    assert hf.mask_token_id == tokenizer.special_id('[MASK]')
  assert hf.decode(framed, skip_special_tokens=True) == tokenizer.decode(ids[0])


def test_sentencepiece_export_refuses_a_converter_that_differs(tokenizers_by_kind, monkeypatch):
  """A transformers whose converter encodes otherwise (here: one that drops the model's own
  normalizer) fails the export in one line, never writes a different tokenizer."""
  from transformers.convert_slow_tokenizer import SpmConverter
  build = SpmConverter.build_tokenizer_from_spm_proto

  def without_normalizer(proto, vocab, merges=None, legacy=True):
    proto.normalizer_spec.add_dummy_prefix = False
    return build(proto, vocab, merges, legacy)

  monkeypatch.setattr(SpmConverter, 'build_tokenizer_from_spm_proto',
                      staticmethod(without_normalizer))
  _, tokenizer = tokenizers_by_kind['sentencepiece-bpe']
  with pytest.raises(ConfigError, match='differs from it'):
    hf_tokenizer.files(tokenizer, (tokenizer.bos_id, tokenizer.eos_id), 64)
