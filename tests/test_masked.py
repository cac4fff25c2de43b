"""Masked-LM pretraining: masking statistics, bidirectional attention, the masked-only loss,
an end-to-end run, fill-mask, and fine-tuning a classifier."""

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import metrics, one_device, tiny_config
from jaxlm import cli, data, model as model_lib, objectives, state as state_lib
from jaxlm.config import ConfigError
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.objectives import base, masked

VOCAB = 512
SPECIAL = np.arange(VOCAB) < 7  # Ids 0-6 play pad/unk/bos/eos/[CLS]/[SEP]/[MASK].
MASK_ID = 6


def masked_config(**overrides):
  return tiny_config(**{'objective': 'masked', 'model__family': 'bert', **overrides})


def random_batch(seed=0, shape=(64, 128)):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, shape).astype(np.int32)
  segments = np.ones(shape, np.int32)
  segments[:, -8:] = 0  # Padding at the end of each row.
  return {'tokens': jnp.asarray(tokens), 'segment_ids': jnp.asarray(segments),
          'positions': jnp.asarray(np.tile(np.arange(shape[1]), (shape[0], 1)), jnp.int32)}


def masking(word_start=None, **masking_overrides):
  """Masking at every position ([B, T] targets) unless max_predictions is given."""
  masking_overrides = {'max_predictions': -1, **masking_overrides}
  config = masked_config(**{f'masking__{k}': v for k, v in masking_overrides.items()})
  starts = np.zeros(VOCAB, bool) if word_start is None else word_start
  return masked.Masking(config, SPECIAL, starts, MASK_ID)


def test_masking_rates_match_the_config_over_many_draws():
  batch, mask = random_batch(), masking()
  chosen = replaced = randomized = kept = 0
  for step in range(20):
    out = mask(batch, jax.random.key(step))
    weights, inputs, tokens = (np.asarray(out[k]) for k in ('weights', 'tokens', 'targets'))
    eligible = ~SPECIAL[tokens] & (np.asarray(batch['segment_ids']) > 0)
    sel = weights > 0
    assert not (sel & ~eligible).any()  # Special tokens and padding are never chosen.
    chosen += sel.sum() / eligible.sum() / 20
    replaced += (inputs[sel] == MASK_ID).sum() / sel.sum() / 20
    kept += (inputs[sel] == tokens[sel]).sum() / sel.sum() / 20
    randomized += ((inputs[sel] != MASK_ID) & (inputs[sel] != tokens[sel])).sum() / sel.sum() / 20
    assert (inputs[~sel] == tokens[~sel]).all()  # Unchosen tokens are untouched.
    assert not SPECIAL[inputs[sel & (inputs != MASK_ID)]].any()  # Random tokens are ordinary.
  assert abs(chosen - 0.15) < 0.005
  assert abs(replaced - 0.8) < 0.01
  # A random draw equals the original with probability 1/505: 'kept' includes those.
  assert abs(randomized - 0.1) < 0.01 and abs(kept - 0.1) < 0.01


def test_masks_are_a_function_of_seed_and_step():
  batch, mask = random_batch(), masking()
  a, b = mask(batch, jax.random.key(3)), mask(batch, jax.random.key(3))
  c = mask(batch, jax.random.key(4))
  assert (np.asarray(a['tokens']) == np.asarray(b['tokens'])).all()
  assert (np.asarray(a['weights']) != np.asarray(c['weights'])).any()


def test_whole_word_masking_masks_every_piece_of_a_chosen_word():
  word_start = np.zeros(VOCAB, bool)
  word_start[7:200] = True  # Ids 7-199 start words; 200+ continue them.
  batch = random_batch(1)
  out = masking(word_start, whole_word=True, rate=0.3)(batch, jax.random.key(0))
  tokens, weights = np.asarray(batch['tokens']), np.asarray(out['weights'])
  segments = np.asarray(batch['segment_ids'])
  words = 0
  for row in range(tokens.shape[0]):
    start = None
    for t in range(tokens.shape[1] + 1):
      boundary = (t == tokens.shape[1] or word_start[tokens[row, t]] or SPECIAL[tokens[row, t]]
                  or segments[row, t] == 0)
      if boundary:
        if start is not None:
          assert len(set(weights[row, start:t])) == 1  # All pieces of a word, or none.
          words += weights[row, start]
        start = t if t < tokens.shape[1] and not SPECIAL[tokens[row, t]] and segments[row, t] else None
  assert words > 100


def test_the_loss_counts_masked_positions_only():
  batch = masking()(random_batch(), jax.random.key(0))
  logits = jax.random.normal(jax.random.key(1), (*batch['tokens'].shape, VOCAB))
  _, stats = base.loss(logits, batch)
  unmasked = jnp.where(batch['weights'][..., None] > 0, 0.0, 100.0)
  _, changed = base.loss(logits + jax.random.normal(jax.random.key(2), logits.shape)
                               * unmasked, batch)
  assert stats['weight'] == batch['weights'].sum() > 0
  np.testing.assert_allclose(changed['loss_sum'], stats['loss_sum'], rtol=1e-6)


def scatter(gathered, positions, length):
  """[B, P] values at `positions` -> [B, length] (zero elsewhere; fillers weigh 0 anyway)."""
  out = np.zeros((gathered.shape[0], length), gathered.dtype)
  np.put_along_axis(out, np.asarray(positions), np.asarray(gathered), axis=1)
  return out


@pytest.mark.parametrize('cap', [64, 12])  # Above every row's chosen count; below most.
def test_the_gathered_head_equals_predicting_every_position(cap):
  """The head and loss run on the gathered positions only, yet give the all-positions
  loss, accuracy and weight of the same masks; a cap below a row's draw keeps its leftmost
  choices and leaves the rest unmasked inputs, and is never exceeded."""
  config = masked_config(masking__max_predictions=cap, model__max_len=128)
  batch = random_batch(shape=(8, 128))
  key = jax.random.key(5)
  gathered = masked.Masking(config, SPECIAL, np.zeros(VOCAB, bool), MASK_ID)(batch, key)
  every = masking()(batch, key)  # The same draw, uncapped, at every position.
  chosen, weights = np.asarray(every['weights']) > 0, gathered['weights']
  assert gathered['predict_positions'].shape == weights.shape == (8, cap)
  counts = chosen.sum(1)
  np.testing.assert_array_equal(np.asarray(weights).sum(1), np.minimum(counts, cap))
  assert (counts > cap).any() == (cap == 12) and (counts < cap).any()
  kept = scatter(np.asarray(weights), gathered['predict_positions'], 128) > 0
  assert (kept <= chosen).all()  # Only chosen tokens are predicted ...
  for row in range(8):  # ... the leftmost ones, and dropped choices are unmasked inputs.
    np.testing.assert_array_equal(kept[row], chosen[row] & (np.cumsum(chosen[row]) <= cap))
  inputs = np.asarray(gathered['tokens'])
  np.testing.assert_array_equal(inputs[~kept], np.asarray(batch['tokens'])[~kept])
  np.testing.assert_array_equal(inputs[kept], np.asarray(every['tokens'])[kept])

  model = model_lib.build(config.model, causal=False)
  params = model.init(jax.random.key(0), *state_lib.init_inputs(config))['params']
  args = (gathered['tokens'], gathered['positions'], gathered['segment_ids'])
  head = model.apply({'params': params}, *args, predict_positions=gathered['predict_positions'])
  assert head.shape == (8, cap, config.model.vocab_size)
  _, ours = base.loss(head, gathered)
  reference = {**gathered, 'targets': batch['tokens'], 'weights': jnp.asarray(kept, jnp.float32)}
  _, theirs = base.loss(model.apply({'params': params}, *args), reference)
  for name in ('loss_sum', 'correct', 'weight'):
    np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, err_msg=name)


def test_max_predictions_is_sized_from_the_rate_with_headroom():
  from jaxlm import flops
  sized = lambda **o: masked.max_predictions(masked_config(**o))
  assert sized(model__max_len=128) == 48 and sized(model__max_len=512) == 128
  assert sized(model__max_len=128, masking__whole_word=True) > 48
  assert sized(model__max_len=128, masking__max_predictions=20) == 20
  assert sized(model__max_len=128, masking__max_predictions=-1) is None
  assert objectives.get(tiny_config(objective='causal')).predictions() is None
  # The head's FLOPs follow: a 48-of-128 head costs 48/128 of every-position prediction.
  c = masked_config(model__max_len=128)
  m = c.model
  head = flops.flops_per_token(m) - flops.flops_per_token(m, head_fraction=0)
  expected = flops.flops_per_token(m) - head * (1 - 48 / 128)
  assert flops.of_run(c, objectives.get(c).predictions()) == pytest.approx(expected)


def encoder(config):
  model = model_lib.build(config.model, objectives.get(config).causal)
  params = state_lib.strip_boxes(model.init(jax.random.key(0), *state_lib.init_inputs(config))
                                 ['params'])
  return lambda tokens, segments=None: model.apply({'params': params}, tokens, None, segments)


def test_the_encoder_attends_both_ways_and_the_decoder_does_not():
  tokens = jnp.arange(10, 74)[None] % VOCAB
  later = tokens.at[0, 40].set(300)
  for objective, family, sees_later in (('masked', 'bert', True), ('causal', 'gpt2', False)):
    apply = encoder(tiny_config(objective=objective, model__family=family))
    changed = np.abs(np.asarray(apply(later) - apply(tokens))).max(axis=-1)[0]
    assert (changed[:40] > 1e-6).all() == sees_later, objective
    assert (changed[:40] == 0).all() != sees_later, objective


def test_packed_documents_do_not_see_each_other():
  apply = encoder(masked_config())
  tokens = jnp.arange(10, 74)[None]
  segments = jnp.asarray([[1] * 30 + [2] * 34])
  other = tokens.at[0, 50].set(300)  # A change in document 2 ...
  diff = np.abs(np.asarray(apply(other, segments) - apply(tokens, segments))).max(axis=-1)[0]
  assert (diff[:30] == 0).all() and (diff[30:] > 0).all()  # ... is invisible to document 1.


def test_a_tokenizer_without_mask_pieces_is_refused(tmp_path, shared_data):
  import io
  import sentencepiece as spm
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 200 + ["abc def"]),
                                 model_writer=proto, vocab_size=14, minloglevel=2)
  (tmp_path / 'plain.model').write_bytes(proto.getvalue())
  config = masked_config(data__tokenizer=str(tmp_path / 'plain.model'))
  with pytest.raises(ConfigError, match=r'plain.model has no \[PAD\] piece; masked LMs need'):
    data.prepare(config, str(tmp_path / 'run'), objectives.get(config).frame)


def test_masked_lm_trains_and_fill_mask_answers(trained_masked, capsys):
  """Masked-token accuracy rises well above always guessing the most frequent token; then
  fill-mask answers from the command line."""
  config, workdir, result = trained_masked
  corpus = data.prepare(config, workdir, objectives.get(config).frame)
  special = corpus.tokenizer.special_table(config.model.vocab_size)
  baseline = masked.unigram_accuracy(
      data.eval_tokens(data.eval_batches(corpus.validation, config)), special)
  rows = metrics(workdir)
  accuracy = [r['eval_accuracy'] for r in rows if 'eval_accuracy' in r]
  assert accuracy[0] < baseline and accuracy[-1] > 1.4 * baseline, (baseline, accuracy)
  assert result['eval_loss'] < 0.8 * rows[0]['eval_loss']

  capsys.readouterr()
  assert cli.main(['fill-mask', f'--workdir={workdir}', '--text=import [MASK]',
                   '--text=def [MASK](self):', '--top_k=3']) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == 'import [MASK]' and out[4] == 'def [MASK](self):'
  probabilities = [float(line.split()[0]) for line in out[1:4]]
  assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1
  assert out[1].split(maxsplit=1)[1].count('import') == 1


def test_a_modern_encoder_trains_fills_masks_and_refuses_hf_export(trained_modernbert, tmp_path,
                                                                   capsys):
  """model.family='modernbert' (pre-norm, RoPE, gated GELU, no biases) trains as a masked LM,
  answers fill-mask, and `convert --to-hf` refuses it in one line (no matching class)."""
  config, workdir, result = trained_modernbert
  assert not config.model.use_bias and config.model.gated_mlp and config.model.position == 'rope'
  assert np.isfinite(result['eval_loss'])
  losses = [r['loss'] for r in metrics(workdir) if 'loss' in r]
  assert losses[-1] < losses[0]
  assert cli.main(['fill-mask', f'--workdir={workdir}', '--text=import [MASK]',
                   '--top_k=2']) == 0
  assert 'import [MASK]' in capsys.readouterr().out
  assert cli.main(['convert', f'--workdir={workdir}', f'--to-hf={tmp_path / "hf"}']) == 2
  assert "model.family='modernbert' has no Hugging Face layout" in capsys.readouterr().err
  assert not (tmp_path / 'hf').exists()


def test_fill_mask_refuses_a_text_without_a_mask_and_a_causal_model(workdir, capsys):
  (workdir / 'config.json').write_text(
      json.dumps(tiny_config().to_dict(), default=list))
  assert cli.main(['fill-mask', f'--workdir={workdir}', '--text=no mask here']) == 2
  assert "holds a 'causal' model; fill-mask needs a masked LM" in capsys.readouterr().err


SENTIMENT = {'good': ('wonderful', 'excellent', 'lovely', 'superb', 'delightful'),
             'bad': ('terrible', 'awful', 'horrible', 'dreadful', 'miserable')}
FILLER = ('the', 'movie', 'was', 'plot', 'and', 'actors', 'it', 'a', 'story', 'really', 'quite')


def labeled_file(path, count, seed, fmt='jsonl'):
  rng = random.Random(seed)
  lines = []
  for _ in range(count):
    label = rng.choice(sorted(SENTIMENT))
    words = [rng.choice(FILLER) for _ in range(rng.randint(4, 12))]
    words.insert(rng.randint(0, len(words)), rng.choice(SENTIMENT[label]))
    lines.append((' '.join(words), label))
  if fmt == 'csv':
    path.write_text('text,label\n' + ''.join(f'{t},{label}\n' for t, label in lines))
  else:
    path.write_text(''.join(json.dumps({'text': t, 'label': label}) + '\n' for t, label in lines))
  return path


def finetune_config(tmp_path, **overrides):
  defaults = dict(
      objective='classify', train_steps=60, batch_size=16, log_every_steps=20,
      eval_every_steps=0, eval_batches=100, optimizer__learning_rate=1e-3,
      optimizer__warmup_steps=5)
  if 'finetune__train' not in overrides:
    defaults.update(
        finetune__train=str(labeled_file(tmp_path / 'train.jsonl', 400, 0)),
        finetune__validation=str(labeled_file(tmp_path / 'dev.csv', 200, 1, 'csv')))
  return masked_config(**{**defaults, **overrides})


@pytest.mark.parametrize('family', ['bert', 'modernbert'])
def test_finetuning_a_pretrained_encoder_learns_the_labels(tmp_path, family, request):
  from jaxlm import train
  pretrained = request.getfixturevalue(  # The session's masked LMs, read only.
      {'bert': 'trained_masked', 'modernbert': 'trained_modernbert'}[family]).workdir
  config = finetune_config(tmp_path, init_from=pretrained, model__family=family)
  result = train.train(config, str(tmp_path / 'cls'), one_device())
  assert config.finetune.labels == ('bad', 'good')
  assert result['eval_accuracy'] > 0.9, result  # Chance is 0.5.
  rows = [json.loads(x) for x in (tmp_path / 'cls' / 'metrics.jsonl').read_text().splitlines()]
  assert rows[0]['eval_accuracy'] < 0.8
  # `jaxlm eval` of the fine-tuned run reads its config.json (labels included).
  from jaxlm import evaluate, workdir as workdir_lib
  again = evaluate.run(workdir_lib.read_config(str(tmp_path / 'cls')), str(tmp_path / 'cls'))
  assert again['eval_accuracy'] == pytest.approx(result['eval_accuracy'])


def test_labeled_data_without_the_label_field_is_a_clear_error(tmp_path):
  (tmp_path / 'train.csv').write_text('text,stars\ngood film,5\n')
  config = finetune_config(tmp_path, finetune__train=str(tmp_path / 'train.csv'))
  with pytest.raises(ConfigError, match=r"finetune.train=.*train.csv' has no usable examples "
                                        r"\(fields finetune.text_field='text', "
                                        r"finetune.label_field='label'\)"):
    data.labeled.resolve_labels(config)


def test_finetune_from_the_cli_checks_the_objective_and_the_backbone(tmp_path, shared_data,
                                                                      capsys):
  assert cli.main(['finetune', '--config=configs/gpt_tiny.py', f'--workdir={tmp_path}/x']) == 2
  assert "needs objective='classify'" in capsys.readouterr().err
  assert cli.main(['train', '--config=configs/finetune_cls.py', f'--workdir={tmp_path}/x',
                   '--config.finetune.train=a.jsonl']) == 2
  assert 'run it with jaxlm finetune' in capsys.readouterr().err
  assert cli.main(['finetune', '--config=configs/finetune_cls.py',
                   f'--workdir={tmp_path}/x']) == 2
  assert 'finetune.train is empty' in capsys.readouterr().err
  assert cli.main(['finetune', '--config=configs/finetune_cls.py', f'--workdir={tmp_path}/x',
                   f'--config.finetune.train={tmp_path}/none.jsonl']) == 2
  err = capsys.readouterr().err
  assert 'none.jsonl' in err and 'matches no files' in err
  # plan sizes the classifier from the labels of the train split.
  train_file = labeled_file(tmp_path / 'train.jsonl', 20, 0)
  assert cli.main(['plan', '--config=configs/finetune_cls.py',
                   f'--config.finetune.train={train_file}']) == 0
  assert 'classifier/kernel                    (192, 2)' in capsys.readouterr().out


def test_a_causal_model_classifies_from_its_last_token(tmp_path, shared_data):
  from jaxlm import train
  (tmp_path / 'cls').mkdir()
  (tmp_path / 'cls' / 'tokenizer.model').write_bytes(
      (shared_data / 'tokenizer.model').read_bytes())
  config = finetune_config(tmp_path, model__family='gpt2', finetune__backbone='causal')
  result = train.train(config, str(tmp_path / 'cls'), one_device())
  assert result['eval_accuracy'] > 0.8, result


def test_tfds_labeled_data_is_read_through_its_data_source(tmp_path, shared_data):
  import tensorflow_datasets as tfds
  config = finetune_config(tmp_path, finetune__train='tfds:imdb_reviews:train',
                           finetune__validation='tfds:imdb_reviews:test')
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    data.labeled.resolve_labels(config)
    (tmp_path / 'w').mkdir()
    (tmp_path / 'w' / 'tokenizer.model').write_bytes(
        (shared_data / 'tokenizer.model').read_bytes())
    objective = objectives.get(config)
    corpus = data.prepare(config, str(tmp_path / 'w'), objective.frame, objective.labeled)
  assert set(config.finetune.labels) <= {'0', '1'} and len(corpus.train) == 20
  row = corpus.train[0]
  assert row['tokens'][0] == corpus.tokenizer.special_id('[CLS]') and row['label'] in (0, 1)


def test_an_unprepared_tfds_dataset_is_a_clear_error(tmp_path):
  config = finetune_config(tmp_path, finetune__train='tfds:no_such_dataset_xyz:train')
  with pytest.raises(ConfigError, match=r"finetune.train='tfds:no_such_dataset_xyz:train': "
                                        r'tfds cannot read it'):
    data.labeled.resolve_labels(config)


def test_fill_mask_encodes_each_mask_as_one_whole_piece(shared_data):
  from jaxlm import fill_mask
  tokenizer = tokenizer_lib.load(str(shared_data / 'tokenizer.model'))
  ids = fill_mask.encode(tokenizer, 'return [MASK] value', 64)
  mask = tokenizer.special_id('[MASK]')
  assert ids[0] == tokenizer.special_id('[CLS]') and ids[-1] == tokenizer.special_id('[SEP]')
  assert ids.count(mask) == 1
  # Around the mask, the pieces of the words: 'value' keeps the '▁' of its leading space.
  assert ids[1:ids.index(mask)] == tokenizer.encode(['return'])[0]
  assert ids[ids.index(mask) + 1:-1] == tokenizer.encode(['value'])[0]
  assert tokenizer.sp.id_to_piece(ids[ids.index(mask) + 1]).startswith('\u2581')
  with pytest.raises(ConfigError, match=r"--text='no mask' has no \[MASK\]"):
    fill_mask.encode(tokenizer, 'no mask', 64)
