"""A run's tokenizer as the files that transformers' AutoTokenizer loads as the same tokenizer.

`convert --to-hf` writes, beside the weights:
- tokenizer.json: a sentencepiece model (BPE or unigram, the kind jaxlm trains) converted with
  transformers' own converter (`SpmConverter.build_tokenizer_from_spm_proto`, which follows
  the model's normalizer, dummy prefix, user-defined pieces and byte fallback), then checked
  against sentencepiece on each piece of the vocabulary and a probe text, so a converter
  that differs is an error, never a silently different tokenizer (what remains: a unigram
  model's exact ties, such as six spaces as 5+1 or 1+5 pieces, may fall either way); a Hugging Face
  tokenizer.json (byte-level BPE, WordPiece, ...) is written as it is;
- tokenizer_config.json naming the class (PreTrainedTokenizerFast, which every transformers
  version loads from tokenizer.json alone) and each special token's role, and
  special_tokens_map.json, for older readers;
- for sentencepiece, tokenizer.model as well (sentencepiece users and `convert --from-hf`
  read it, so jaxlm -> HF -> jaxlm keeps the exact tokenizer).

Without a post-processor of its own, the tokenizer gets the run's document framing, so that
`tokenizer(text)` gives the ids jaxlm trains on: `[BOS] text` for a decoder (like Llama's;
EOS ends a document, not a prompt), `[CLS] text [SEP]` for an encoder (like BERT's).
"""

import json

import tokenizers
from tokenizers import processors

from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import ConfigError

# The first transformers release whose sentencepiece converter follows the model's own
# normalizer (jaxlm's tokenizers keep every space: code would not survive an older one).
MIN_TRANSFORMERS = '5.25'
# Text whose ids must agree after conversion, besides every piece of the vocabulary: code
# (indentation, tabs, blank lines), digits, accents and another script, spaces at the ends.
PROBE = ('def main(argv):\n\tif x  ==  1:\n        return "héllo, wörld" # 12345\n\n'
         '  trailing spaces  \n 世界 ｆｕｌｌ-width … ünïcode\r\nend')
ROLES = ('bos', 'eos', 'pad', 'unk')
CONTROL_ROLES = {'cls': '[CLS]', 'sep': '[SEP]', 'mask': '[MASK]'}


def files(tokenizer, framing, max_len):
  """{file name: bytes} of the Hugging Face tokenizer of a run. `framing`: (first, last) ids
  around a document (objectives.base.Objective.frame), `max_len`: the model's length."""
  if isinstance(tokenizer, tokenizer_lib.SentencePiece):
    fast, config = _from_sentencepiece(tokenizer), {}
  else:
    fast, config = tokenizers.Tokenizer.from_str(tokenizer.data.decode('utf-8')), tokenizer.config
  special = {role: fast.id_to_token(i) for role in ROLES
             if (i := getattr(tokenizer, f'{role}_id')) >= 0}
  special.update({role: piece for role, piece in CONTROL_ROLES.items()
                  if fast.token_to_id(piece) is not None})
  for role in CONTROL_ROLES:  # An imported tokenizer's own names win ('<mask>', ...).
    if isinstance(config.get(f'{role}_token'), (str, dict)):
      special[role] = config[f'{role}_token']
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', **config,
            **{f'{role}_token': token for role, token in special.items()}}
  config.setdefault('clean_up_tokenization_spaces', False)  # jaxlm's decode keeps spaces.
  config['model_max_length'] = max_len
  if fast.post_processor is None or isinstance(tokenizer, tokenizer_lib.SentencePiece):
    fast.post_processor = _framing(fast, framing, tokenizer.bos_id)
    if framing[0] == tokenizer.bos_id:  # transformers 5 rebuilds the same template from these.
      config.update(add_bos_token=True, add_eos_token=False)
  out = {'tokenizer.json': fast.to_str(pretty=True).encode('utf-8'),
         tokenizer_lib.CONFIG_FILE: _json(config),
         'special_tokens_map.json': _json({f'{r}_token': t for r, t in special.items()})}
  if isinstance(tokenizer, tokenizer_lib.SentencePiece):
    out[tokenizer.filename] = tokenizer.data
  return out


def adds_bos(tokenizer, framing):
  """Whether the exported tokenizer puts BOS before a text: jaxlm's framing of a decoder's
  documents, or an imported tokenizer.json's own post-processor (GPT-2's adds none)."""
  if tokenizer.bos_id < 0:
    return False
  if isinstance(tokenizer, tokenizer_lib.SentencePiece) or tokenizer.tok.post_processor is None:
    return framing[0] == tokenizer.bos_id
  ids = tokenizer.tok.encode('a', add_special_tokens=True).ids
  return bool(ids) and ids[0] == tokenizer.bos_id


def _framing(fast, framing, bos_id):
  """TemplateProcessing that frames one text as jaxlm frames a document (a pair: both)."""
  first, last = (fast.id_to_token(i) for i in framing)
  if framing[0] == bos_id:  # A decoder: BOS before each text, as Llama's tokenizer does.
    return processors.TemplateProcessing(single=f'{first}:0 $A:0',
                                         pair=f'{first}:0 $A:0 {first}:1 $B:1',
                                         special_tokens=[(first, framing[0])])
  return processors.TemplateProcessing(single=f'{first}:0 $A:0 {last}:0',
                                       pair=f'{first}:0 $A:0 {last}:0 $B:1 {last}:1',
                                       special_tokens=[(first, framing[0]), (last, framing[1])])


def _from_sentencepiece(tokenizer):
  """The sentencepiece model as a `tokenizers.Tokenizer` that encodes and decodes alike."""
  try:
    from sentencepiece import sentencepiece_model_pb2
    from transformers.convert_slow_tokenizer import SpmConverter
  except ImportError as e:
    raise ConfigError(f'exporting a sentencepiece tokenizer to Hugging Face needs transformers>='
                      f'{MIN_TRANSFORMERS} (pip install "jaxlm[hf]"): {e}') from e
  if not hasattr(SpmConverter, 'build_tokenizer_from_spm_proto'):
    raise ConfigError(f'exporting a sentencepiece tokenizer to Hugging Face needs transformers>='
                      f'{MIN_TRANSFORMERS}, whose converter follows the model\'s own '
                      f'normalizer: pip install "jaxlm[hf]"')
  proto = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.data)
  types = sentencepiece_model_pb2.ModelProto.SentencePiece.Type
  if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  else:
    vocab = [(p.piece, p.score) for p in proto.pieces]
  fast = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
  if fast is None or proto.trainer_spec.model_type not in (
      sentencepiece_model_pb2.TrainerSpec.BPE, sentencepiece_model_pb2.TrainerSpec.UNIGRAM):
    raise ConfigError(f'{tokenizer.path}: only sentencepiece BPE and unigram models convert to '
                      f'a Hugging Face tokenizer.json')
  # Control pieces and [UNK] are special: skip_special_tokens drops them, as sentencepiece
  # decoding does.
  fast.add_special_tokens([tokenizers.AddedToken(p.piece, special=True, normalized=False)
                           for p in proto.pieces if p.type in (types.CONTROL, types.UNKNOWN)])
  _check_same(tokenizer, fast, [p.piece for p in proto.pieces if p.type == types.NORMAL or
                                p.type == types.USER_DEFINED])
  return fast


def _check_same(tokenizer, fast, pieces):
  """A ConfigError unless `fast` encodes and decodes the probe text and each piece of the
  vocabulary (after a letter, so that a word's first piece is not the text's first) as
  sentencepiece does."""
  texts = [PROBE, *(('x' + p.replace('\u2581', ' ')) for p in pieces)]
  got = [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]
  for text, want, ids in zip(texts, tokenizer.encode(texts), got):
    if ids != want or fast.decode(want) != tokenizer.decode(want):
      import transformers
      raise ConfigError(
          f'{tokenizer.path}: transformers {transformers.__version__} converts this '
          f'sentencepiece model to a tokenizer that differs from it ({text[:40]!r} is '
          f'{[fast.id_to_token(i) for i in ids]} instead of '
          f'{[fast.id_to_token(i) for i in want]}); need transformers>={MIN_TRANSFORMERS}')


def _json(value):
  return json.dumps(value, indent=2, ensure_ascii=False).encode('utf-8')
