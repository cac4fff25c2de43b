"""lm-eval-harness through jaxlm (harness.py), offline: tasks defined in local YAML files over
local JSONL (lines of a standard-library module the model never trained on), scored by
`jaxlm eval --tasks` on the run's mesh and by lm-eval's own Hugging Face backend on the
model `convert --to-hf` exports: the same accuracies, log-likelihoods and generations. The same
on 8 simulated devices as on one, for scoring and for `generate`; and the tasks as a training
hook. One tiny model, trained once for the module."""

import json
import os
import sysconfig

import numpy as np
import pytest

from helpers import one_device, tiny_config
from jaxlm import cli, generate, harness, inference, train
from jaxlm import run as run_lib
from jaxlm import workdir as workdir_lib
from jaxlm.data import tokenizer as tokenizer_lib

lm_eval = pytest.importorskip('lm_eval', reason="needs the eval extra: pip install -e '.[eval]'")
pytest.importorskip('torch', reason="lm-eval's hf backend needs the test extra (torch)")
pytest.importorskip('accelerate', reason="lm-eval's hf backend needs the test extra")

TASKS = 'pyline_choice,pyline_complete,pyline_ppl'


def write_tasks(directory):
  """Three tasks, one per request type, over lines of textwrap.py: pick a line's real ending
  among four (loglikelihood), complete a line (generate_until), score whole lines
  (loglikelihood_rolling)."""
  lines = [line.rstrip() for line in open(os.path.join(sysconfig.get_paths()['stdlib'],
                                                      'textwrap.py'), encoding='utf-8')]
  lines = [line for line in lines if 24 <= len(line.strip()) <= 70][:24]
  rng = np.random.RandomState(0)
  docs = []
  for i, line in enumerate(lines):
    cut = len(line) // 2
    others = [lines[j][len(lines[j]) // 2:] for j in rng.choice(
        [j for j in range(len(lines)) if j != i], 3, replace=False)]
    label = int(rng.randint(4))
    choices = others[:label] + [line[cut:]] + others[label:]
    docs.append({'context': line[:cut], 'choices': choices, 'label': label, 'text': line})
  data = directory / 'lines.jsonl'
  data.write_text(''.join(json.dumps(d) + '\n' for d in docs))
  dataset = {'dataset_path': 'json', 'test_split': 'test',
             'dataset_kwargs': {'data_files': {'test': str(data)},
                                'cache_dir': str(directory / 'cache')}}
  tasks = {
      'pyline_choice': {'output_type': 'multiple_choice', 'doc_to_text': '{{context}}',
                        'doc_to_choice': '{{choices}}', 'doc_to_target': '{{label}}',
                        'target_delimiter': '',
                        'metric_list': [{'metric': 'acc'}, {'metric': 'acc_norm'}]},
      'pyline_complete': {'output_type': 'generate_until', 'doc_to_text': '{{context}}',
                          'doc_to_target': '{{choices[label]}}', 'target_delimiter': '',
                          'generation_kwargs': {'until': ['\n'], 'max_gen_toks': 6,
                                                'do_sample': False},
                          'metric_list': [{'metric': 'exact_match'}]},
      'pyline_ppl': {'output_type': 'loglikelihood_rolling', 'doc_to_text': '{{text}}',
                     'doc_to_target': '{{text}}',
                     'metric_list': [{'metric': 'word_perplexity'},
                                     {'metric': 'bits_per_byte'}]},
  }
  for name, task in tasks.items():  # YAML is a superset of JSON.
    (directory / f'{name}.yaml').write_text(json.dumps({'task': name, **dataset, **task}))
  return directory


@pytest.fixture(scope='module')
def trained(tmp_path_factory, shared_data):
  """24 steps of the tiny GPT-2, with the choice task run by the training hook at step 12 and
  at the end; then `jaxlm eval --tasks` (on all 8 devices) and the export."""
  root = tmp_path_factory.mktemp('harness')
  (root / 'tasks').mkdir()
  tasks = write_tasks(root / 'tasks')
  workdir = root / 'run'
  config = tiny_config(data__cache_dir=str(shared_data / 'data'),
                       data__tokenizer=str(shared_data / 'tokenizer.model'), train_steps=24,
                       checkpoint__save_every_steps=24, lm_eval__tasks='pyline_choice',
                       lm_eval__every_steps=12, lm_eval__include_path=str(tasks))
  train.train(config, str(workdir), devices=one_device())
  assert cli.main(['eval', f'--workdir={workdir}', f'--tasks={TASKS}',
                   f'--include_path={tasks}', '--batch_size=8']) == 0
  assert cli.main(['convert', f'--to-hf={root / "hf"}', f'--workdir={workdir}']) == 0
  return workdir, root / 'hf', tasks


def samples_of(results):
  """{task: [per-document responses]} in document order."""
  return {task: [s['resps'] for s in sorted(docs, key=lambda s: s['doc_id'])]
          for task, docs in results['samples'].items()}


@pytest.fixture(scope='module')
def huggingface(trained):
  """lm-eval's hf backend on the export (float32, CPU). The perplexity task without BOS
  (add_bos_token=False): the hf backend would score the BOS its tokenizer adds, given BOS."""
  _, hf_dir, tasks = trained
  manager = harness.task_manager(TASKS, str(tasks))
  args = {'pretrained': str(hf_dir), 'dtype': 'float32', 'device': 'cpu'}
  framed = lm_eval.simple_evaluate(model='hf', model_args=args, batch_size=8, log_samples=True,
                                   tasks=['pyline_choice', 'pyline_complete'],
                                   task_manager=manager)
  unframed = lm_eval.simple_evaluate(model='hf', model_args={**args, 'add_bos_token': False},
                                     batch_size=8, log_samples=True, tasks=['pyline_ppl'],
                                     task_manager=manager)
  return framed['results'] | unframed['results'], samples_of(framed) | samples_of(unframed)


def jaxlm_results(trained, devices=None, **mesh):
  workdir, _, tasks = trained
  config = workdir_lib.read_config(workdir)
  config.mesh.update(mesh)
  tokenizer = tokenizer_lib.load(config.data.tokenizer)  # The shared one (conftest).
  s = run_lib.setup(config, devices)
  lm = harness.JaxLM(inference.load(s, str(workdir)), tokenizer, config)
  results = harness.evaluate(lm, TASKS, log_samples=True,
                             manager=harness.task_manager(TASKS, str(tasks)))
  return results['results'], samples_of(results)


def assert_same(ours, theirs, tolerance=1e-4):
  (our_metrics, our_samples), (their_metrics, their_samples) = ours, theirs
  for task in TASKS.split(','):
    for ours_, theirs_ in zip(our_samples[task], their_samples[task]):
      if task == 'pyline_complete':
        assert ours_ == theirs_  # The same generated text.
      else:
        np.testing.assert_allclose(np.array(ours_, float), np.array(theirs_, float),
                                   atol=tolerance)
  for metric in ('acc,none', 'acc_norm,none'):
    assert our_metrics['pyline_choice'][metric] == their_metrics['pyline_choice'][metric]
  assert our_metrics['pyline_complete']['exact_match,none'] == their_metrics[
      'pyline_complete']['exact_match,none']
  assert our_metrics['pyline_ppl']['word_perplexity,none'] == pytest.approx(
      their_metrics['pyline_ppl']['word_perplexity,none'], rel=1e-4)


def test_jaxlm_scores_tasks_as_lm_eval_scores_the_export(trained, huggingface):
  assert_same(jaxlm_results(trained, devices=one_device()), huggingface)


def test_scoring_and_generation_on_8_devices_match_one(trained):
  """The run's mesh over 8 simulated devices (parameters FSDP x tensor sharded, the batch
  and the key/value cache split over them) against one device."""
  one = jaxlm_results(trained, devices=one_device())
  assert_same(jaxlm_results(trained, fsdp=4, tensor=2), one)
  workdir = str(trained[0])
  config = workdir_lib.read_config(workdir)
  sharded = workdir_lib.read_config(workdir)
  sharded.mesh.update(fsdp=4, tensor=2)
  prompts = ['def main(argv):\n', 'import os\n', 'class Parser:']
  for kw in ({'max_new_tokens': 12}, {'max_new_tokens': 6, 'num_beams': 3}):
    single = generate.run(config, workdir, prompts, devices=one_device(), **kw)
    assert [r['tokens'] for r in generate.run(sharded, workdir, prompts, **kw)] == [
        r['tokens'] for r in single]


def test_eval_command_writes_results_and_metrics(trained):
  workdir, _, _ = trained
  saved = json.loads((workdir / 'lm_eval' / 'step_24.json').read_text())
  assert saved['step'] == 24 and set(TASKS.split(',')) <= set(saved['results'])
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  row = rows[-1]
  assert row['step'] == 24
  assert row['lm_eval/pyline_choice/acc'] == saved['results']['pyline_choice']['acc,none']
  assert {'lm_eval/pyline_complete/exact_match', 'lm_eval/pyline_ppl/word_perplexity',
          'lm_eval/pyline_choice/acc_norm_stderr'} <= set(row)


def test_training_hook_runs_the_tasks_every_n_steps(trained):
  workdir, _, _ = trained
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  hooked = [r['step'] for r in rows if 'lm_eval/pyline_choice/acc' in r]
  assert hooked[:2] == [12, 24]  # The hook's; then the eval command's, at 24.
  assert (workdir / 'lm_eval' / 'step_12.json').exists()
