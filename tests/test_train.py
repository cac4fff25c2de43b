"""End to end: the real training function (the one `jaxlm train` calls) on the tiny config."""

import json
import os

import pytest

from jaxlm import cli, evaluate, train, workdir as workdir_lib
from jaxlm.config import ConfigError
from helpers import copy_run, one_device, tiny_config

REQUIRED = {'step', 'loss', 'learning_rate', 'grad_norm', 'tokens_per_s', 'mfu'}


def read_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture
def trained(trained_causal):
  """The session's 12-step run (conftest.trained_causal), shared by the tests below."""
  return trained_causal


def test_training_lowers_the_loss_and_held_out_perplexity(trained):
  _, workdir, result = trained
  rows = read_rows(workdir)
  train_rows = [r for r in rows if 'loss' in r]
  assert [r['step'] for r in train_rows] == [4, 8, 12]
  assert all(REQUIRED <= set(r) for r in train_rows)
  assert train_rows[-1]['loss'] < train_rows[0]['loss'] - 0.5
  assert all(r['tokens_per_s'] > 0 and 0 < r['mfu'] < 1 for r in train_rows)
  evals = [r for r in rows if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [0, 12]
  assert evals[-1]['eval_perplexity'] < evals[0]['eval_perplexity'] / 2
  assert result['eval_perplexity'] == evals[-1]['eval_perplexity']


def test_workdir_holds_the_run(trained):
  config, workdir, _ = trained
  saved = workdir_lib.read_config(workdir)
  assert saved.to_dict() == config.to_dict()
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['12', '6']
  assert any(f.startswith('events.out.tfevents') for f in
             os.listdir(os.path.join(workdir, 'tensorboard')))


def test_eval_command_reads_the_latest_checkpoint(trained, capsys):
  _, workdir, result = trained
  assert cli.main(['eval', f'--workdir={workdir}']) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed['step'] == 12
  assert printed['eval_loss'] == pytest.approx(result['eval_loss'], rel=1e-5)
  assert printed['eval_bits_per_byte'] == pytest.approx(result['eval_bits_per_byte'], rel=1e-5)
  # Python source at a 512-piece vocabulary: a few bits per byte, well under 8 (raw bytes).
  assert 0.5 < printed['eval_bits_per_byte'] < 8


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_over_bytes_per_target(shared_data):
  """All-zero parameters give all-zero logits, so every target costs ln(vocab) nats exactly;
  the bytes are counted independently, by decoding the targets' text."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jaxlm import model as model_lib, objectives, steps
  from jaxlm.objectives import causal
  from jaxlm.data import tokenizer as tokenizer_lib
  config = tiny_config()
  tok = tokenizer_lib.load(str(shared_data / 'tokenizer.model'))
  text = 'def area(r):\n    """Circle area, \u00e9t\u00e9."""\n    return 3.14159 * r ** 2\n'
  ids = tok.encode([text])[0]
  tokens = np.zeros((1, config.model.max_len), np.int32)
  tokens[0, :len(ids)] = ids
  segments = (np.arange(config.model.max_len) < len(ids)).astype(np.int32)[None]
  batch = {'tokens': jnp.asarray(tokens), 'segment_ids': jnp.asarray(segments),
           'positions': jnp.arange(config.model.max_len)[None]}
  objective = objectives.get(config)
  model = model_lib.build(config.model)
  params = nn.unbox(model.init(jax.random.key(0), batch['tokens'])['params'])
  params = jax.tree.map(jnp.zeros_like, params)
  eval_step = steps.make_eval_step(model, objective, causal.prepare, objective.token_bytes(tok))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  row = evaluate.evaluate(eval_step, params, [jax.device_get(batch)], {k: one for k in batch})
  # Targets are tokens 1..n-1: the text after the first token.
  target_bytes = len(text.encode()) - len(tok.decode(ids[:1]).encode())
  expected = (len(ids) - 1) * np.log2(config.model.vocab_size) / target_bytes
  assert row['eval_bits_per_byte'] == pytest.approx(expected, rel=1e-5)


def test_train_command_resumes_and_extends_the_run(trained, capsys, tmp_path):
  """Through the CLI, on all 8 devices: the 1-device checkpoint is resharded onto FSDP."""
  workdir = copy_run(trained.workdir, tmp_path)
  assert cli.main(['train', f'--workdir={workdir}', '--config.train_steps=16']) == 0
  rows = read_rows(workdir)
  assert [r['step'] for r in rows if 'loss' in r][-2:] == [12, 16]  # 4 new steps, no replay.
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['step'] == 16


def test_a_workdir_of_another_model_shape_is_refused(trained):
  _, workdir, _ = trained
  with pytest.raises(ConfigError, match='holds a run with model.num_layers=2, this config has 3'):
    train.train(tiny_config(model__num_layers=3), workdir, devices=one_device())


# ------------------------------------------------------------------------------- generate


def _random_model(family, scan, scale=5.0):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jaxlm import model as model_lib
  config = tiny_config(model__family=family, model__scan_layers=scan,
                       model__num_kv_heads=2 if family == 'llama' else 0)
  model = model_lib.build(config.model)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  # Larger weights than the init's: peaked distributions, so greedy choices are not near-ties.
  return model, jax.tree.map(lambda p: scale * p, params)


def _batch(prompts):
  import numpy as np
  tokens = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
  for row, ids in enumerate(prompts):
    tokens[row, :len(ids)] = ids
  return tokens, np.array([len(ids) for ids in prompts], np.int32)


PROMPTS = [[1, 5, 9, 200], [1, 7], [1, 3, 3, 3, 3, 30]]


@pytest.mark.parametrize('family,scan', [('gpt2', True), ('llama', True), ('llama', False)])
def test_kv_cache_decoding_equals_a_no_cache_reference_token_for_token(family, scan):
  """Batched prompts of different lengths (right-padded), GQA for llama, scanned or not."""
  from jaxlm import generate
  model, params = _random_model(family, scan)
  out, count = generate.decode(model, params, *_batch(PROMPTS), 0, 12)
  for row, prompt in enumerate(PROMPTS):
    assert list(out[row][:count[row]]) == generate.reference_greedy(model, params, prompt, 12)
  # A stop token ends its row (and only its row) right after it is produced.
  stop = int(out[1][3])
  out, count = generate.decode(model, params, *_batch(PROMPTS), 0, 12, stop_ids=(stop,))
  assert count[1] == 4 and out[1][3] == stop and not out[1][4:].any()
  for row in (0, 2):
    assert list(out[row][:count[row]]) == generate.reference_greedy(model, params, PROMPTS[row],
                                                                      12, stop_ids=(stop,))


@pytest.mark.parametrize('family,scan', [('gpt2', True), ('llama', False)])
def test_beam_search_equals_a_plain_reference(family, scan):
  """The jitted, cached beam search against lists of hypotheses run without a cache: the same
  tokens and scores, with and without stop tokens and length penalties."""
  from jaxlm import generate
  model, params = _random_model(family, scan, scale=1.25)  # Flatter: beams leave the greedy path.
  batch = _batch(PROMPTS)
  greedy = generate.decode(model, params, *batch, 0, 8)[0]
  stop = int(greedy[1][2])
  differs = False
  for beams, penalty, stops in ((1, 1.0, ()), (4, 1.0, ()), (3, 0.6, (stop,)), (2, 0.0, (stop,))):
    out, count, score = generate.beam_search(model, params, *batch, beams, 8, penalty, stops)
    for row, prompt in enumerate(PROMPTS):
      tokens, expected = generate.reference_beam(model, params, prompt, beams, 8, penalty, stops)
      assert list(out[row][:count[row]]) == tokens, (beams, penalty, stops, row)
      assert abs(float(score[row]) - expected) < 1e-4
      if beams == 1 and not stops:
        assert tokens == generate.reference_greedy(model, params, prompt, 8)
      differs |= list(out[row][:count[row]]) != list(greedy[row][:count[row]])
  assert differs  # The search is not greedy decoding in disguise.


def test_sampling_is_deterministic_for_a_seed_and_top_k_1_is_greedy():
  from jaxlm import generate
  model, params = _random_model('gpt2', True)
  batch = _batch(PROMPTS)
  sampled = [generate.decode(model, params, *batch, seed, 16, temperature=1.0, top_k=40)[0]
             for seed in (0, 0, 1)]
  assert (sampled[0] == sampled[1]).all() and (sampled[0] != sampled[2]).any()
  greedy = generate.decode(model, params, *batch, 0, 16)[0]
  assert (generate.decode(model, params, *batch, 5, 16, temperature=1.0, top_k=1)[0]
          == greedy).all()
  assert (generate.decode(model, params, *batch, 5, 16, temperature=0.7, top_p=1e-6)[0]
          == greedy).all()


def test_generate_command_continues_prompts(trained, capsys):
  _, workdir, _ = trained
  assert cli.main(['generate', f'--workdir={workdir}', '--prompt=import ', '--prompt=def f(',
                   '--max_new_tokens=8', '--temperature=0.8', '--top_p=0.9']) == 0
  out = capsys.readouterr().out
  assert out.count('\n---\n') == 2 and out.startswith('import ') and '\ndef f(' in out
  assert cli.main(['generate', f'--workdir={workdir}', '--prompt=import ', '--num_beams=3',
                   '--max_new_tokens=6']) == 0
  assert capsys.readouterr().out.startswith('import ')
  assert cli.main(['generate', f'--workdir={workdir}', '--prompt=x', '--num_beams=2',
                   '--temperature=0.5']) == 2
  assert 'cannot be combined with sampling' in capsys.readouterr().err
  assert cli.main(['generate', f'--workdir={workdir}', '--prompt=x',
                   '--max_new_tokens=500']) == 2
  assert 'exceeds model.max_len=64' in capsys.readouterr().err
