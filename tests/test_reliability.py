"""Bad input fails early in one line and changes nothing; numerical faults never reach weights."""

import json
import os
import re

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest

from helpers import (CORPUS, ROOT, TINY, file_content, fill_in, one_device, snapshot,
                     tiny_config, write)
from jaxlm import checkpoint, cli, config as config_lib, run as run_lib, train
from jaxlm.config import ConfigError
from jaxlm.errors import RunError

def py_config(body):
  return f'from jaxlm.config import defaults\n\ndef get_config():\n  c = defaults()\n{body}  return c\n'


# A run's config.json and one checkpoint directory: enough for the resume checks.
RESUMABLE = {'work/config.json': ('RUN2', {'data': {'tokenizer': '{shared}/tokenizer.model'}}),
             'work/checkpoints/6/_CHECKPOINT_METADATA': '{}'}


# (id, extra arguments, files to create first {relative path: content}, expected message).
# '{tmp}' in arguments and messages is the test's temporary directory, '{work}' the workdir.
CASES = [
    ('unknown-field', ['--config.model.num_layer=2'],
     {}, "unknown config field 'model.num_layer'; did you mean 'model.num_layers'?"),
    ('unknown-section', ['--config.modle.num_layers=2'], {}, "unknown config field"),
    ('int-as-word', ['--config.model.num_layers=two'], {},
     "config field model.num_layers expects an integer, got 'two'"),
    ('int-as-float', ['--config.batch_size=8.5'], {}, 'batch_size expects an integer'),
    ('bool-as-word', ['--config.model.scan_layers=perhaps'], {},
     'model.scan_layers must be true or false'),
    ('float-as-word', ['--config.optimizer.learning_rate=high'], {},
     'optimizer.learning_rate expects a number'),
    ('zero-layers', ['--config.model.num_layers=0'], {}, 'model.num_layers=0 must be positive'),
    ('negative-batch', ['--config.batch_size=-8'], {}, 'batch_size=-8 must be positive'),
    ('zero-vocab', ['--config.model.vocab_size=0'], {}, 'model.vocab_size=0 must be positive'),
    ('heads-vs-width', ['--config.model.num_heads=5'], {},
     'model.num_heads=5 must divide model.emb_dim=64'),
    ('kv-vs-heads', ['--config.model.num_kv_heads=3'], {},
     'model.num_kv_heads=3 must divide model.num_heads=4'),
    ('warmup-too-long', ['--config.optimizer.warmup_steps=50'], {},
     'optimizer.warmup_steps=50 is longer than train_steps=12'),
    ('accum-vs-batch', ['--config.optimizer.grad_accum_steps=3'], {},
     'optimizer.grad_accum_steps=3 must divide batch_size=8'),
    ('bad-objective', ['--config.objective=contrastive'], {},
     "objective='contrastive' is not one of"),
    ('bad-dtype', ['--config.model.dtype=float8'], {}, "model.dtype='float8' is not one of"),
    ('bad-remat', ['--config.model.remat_policy=sometimes'], {},
     "model.remat_policy='sometimes' is not one of"),
    ('dropout-range', ['--config.model.dropout_rate=1.0'], {},
     'model.dropout_rate=1.0 must be in [0, 1)'),
    ('negative-lr', ['--config.optimizer.learning_rate=-0.1'], {},
     'optimizer.learning_rate=-0.1 must be positive'),
    ('odd-rope-head', ['--config.model.family=llama', '--config.model.head_dim=15'], {},
     'model.head_dim=15 must be even for rotary positions'),
    ('rope-ramp', ['--config.model.family=llama', '--config.model.rope_type=llama3',
                   '--config.model.rope_high_freq_factor=1.0'], {},
     'model.rope_low_freq_factor=1.0 must be positive and below model.rope_high_freq_factor=1.0'),
    ('mesh-zero', ['--config.mesh.tensor=0'], {}, 'mesh.tensor=0 must be positive or -1'),
    ('mesh-rule-axis', ['--config.mesh.rules=(("batch", "dta"),)'], {},
     "mesh.rules entry ('batch', 'dta') must be (logical_name, mesh_axes)"),
    ('mesh-two-fills', ['--config.mesh.data=-1'], {}, 'only one mesh.* axis may be -1'),
    ('mesh-too-big', ['--config.mesh.fsdp=16'], {},
     'make 16 devices, but there are 8'),
    ('batch-vs-mesh', ['--config.batch_size=4'], {},
     'batch_size=4 / optimizer.grad_accum_steps=1 = 4 sequences do not split over the 8 devices'),
    ('param-vs-mesh', ['--config.mesh.fsdp=1', '--config.mesh.tensor=8'], {},
     'of size 4 does not split over mesh axes tensor of 8 devices'),
    ('override-no-value', ['--config.model.num_layers'], {}, 'has no value'),
    ('stray-argument', ['--steps=10'], {}, "unrecognized argument '--steps=10'"),
    ('config-missing', ['--config={tmp}/nope.py'], {}, "config file '{tmp}/nope.py' not found"),
    ('config-syntax', ['--config={tmp}/bad.py'], {'bad.py': 'def get_config(:\n'},
     'config file {tmp}/bad.py, line 1: syntax error'),
    ('config-no-function', ['--config={tmp}/bad.py'], {'bad.py': 'x = 1\n'},
     'config file {tmp}/bad.py defines no get_config() function'),
    ('config-raises', ['--config={tmp}/bad.py'],
     {'bad.py': 'def get_config():\n  return 1 / 0\n'},
     'get_config() failed: ZeroDivisionError: division by zero'),
    ('config-unknown-field', ['--config={tmp}/bad.py'],
     {'bad.py': py_config('  c.model.layers = 2\n')}, "layers"),
    ('corpus-missing', ['--config.data.path={tmp}/none/*.txt'], {},
     "data.path='{tmp}/none/*.txt' matches no files"),
    ('corpus-too-small', ['--config.data.path={tmp}/small/*.txt'],
     {'small/a.txt': 'tiny', 'small/b.txt': 'also tiny'},
     'fewer than one row of model.max_len'),
    ('corpus-all-bad-jsonl', ['--config.data.path={tmp}/c.jsonl'],
     {'c.jsonl': '{"body": "no text field"}\nnot json\n'}, 'c.jsonl has 0 tokens'),
    ('tokenizer-missing', ['--config.data.tokenizer={tmp}/no.model'], {},
     "data.tokenizer='{tmp}/no.model' cannot be read"),
    ('tokenizer-garbage', ['--config.data.tokenizer={tmp}/bad.model'],
     {'bad.model': b'\x00\x01 not a model'}, 'is not a sentencepiece model'),
    ('vocab-below-tokenizer', ['--config.model.vocab_size=256'], {},
     "model.vocab_size=256 is smaller than the tokenizer's 512 pieces"),
    ('workdir-not-a-dir', ['--workdir=/dev/null/run'], {},
     "--workdir='/dev/null/run' cannot be created: /dev/null is not a directory"),
    ('workdir-other-shape', ['--config.model.num_layers=3'], {'work/config.json': 'RUN2'},
     '--workdir={work} holds a run with model.num_layers=2, this config has 3'),
    ('workdir-bad-json', [], {'work/config.json': '{not json'}, 'is not a valid jaxlm config'),
    ('init-from-nothing', ['--config.init_from={tmp}/empty'], {'empty/x': 'x'},
     "init_from='{tmp}/empty' holds no jaxlm checkpoint"),
    # Values are understood exactly or refused: no truthy strings, rounding or overflow.
    ('bool-word-no', ['--config.model.gated_mlp=no'], {},
     'config field model.gated_mlp must be true or false'),
    ('bool-as-one', ['--config.model.use_bias=1'], {}, 'model.use_bias must be true or false'),
    ('bool-family-none', ['--config.model.tied_embeddings=None'], {},
     'model.tied_embeddings must be true or false'),
    ('seed-beyond-64-bits', [f'--config.seed={2**64}'], {}, 'does not fit in 64 bits'),
    ('seed-beyond-32-bits', [f'--config.seed={2**32}'], {},
     'seed=4294967296 must be in [0, 2**32)'),
    ('seed-negative', ['--config.seed=-1'], {}, 'seed=-1 must be in [0, 2**32)'),
    ('lr-infinite', ['--config.optimizer.learning_rate=1e400'], {},
     'optimizer.learning_rate=inf must be a finite number'),
    ('lr-nan', ['--config.optimizer.learning_rate=nan'], {},
     "optimizer.learning_rate expects a number, got 'nan'"),
    ('int-as-true', ['--config.batch_size=True'], {}, 'batch_size expects an integer, got True'),
    ('float-as-false', ['--config.z_loss=False'], {}, 'z_loss expects a number, got False'),
    ('int-as-float-literal', ['--config.train_steps=12.0'], {},
     'train_steps expects an integer, got 12.0'),
    ('int-overflow', ['--config.model.num_layers=1' + '0' * 30], {}, 'does not fit in 64 bits'),
    ('tuple-as-int', ['--config.data.mixture=5'], {}, 'data.mixture expects a tuple'),
    ('norm-eps-infinite', ['--config.model.norm_eps=1e999'], {},
     'model.norm_eps=inf must be a finite number'),
    ('config-file-truthy-string', ['--config={tmp}/bad.py'],
     {'bad.py': py_config("  c.model.tied_embeddings = 'false'\n")}, "tied_embeddings"),
    ('config-file-bool-for-int', ['--config={tmp}/bad.py'],
     {'bad.py': py_config('  c.train_steps = True\n')},
     'config file {tmp}/bad.py: field train_steps expects an integer, got True'),
    ('config-file-nan', ['--config={tmp}/bad.py'],
     {'bad.py': py_config("  c.optimizer.learning_rate = float('nan')\n")},
     'field optimizer.learning_rate=nan must be a finite number'),
    ('config-file-inf-warmup', ['--config={tmp}/bad.py'],
     {'bad.py': py_config("  c.z_loss = float('inf')\n")}, 'z_loss=inf must be a finite number'),
    ('config-file-none-int', ['--config={tmp}/bad.py'],
     {'bad.py': py_config('  c.batch_size = None\n')}, 'batch_size expects an integer, got None'),
    # A workdir's config.json is read as strictly, and a bad one is named, never rewritten.
    ('workdir-json-truthy', [], {'work/config.json': ('RUN2', {'model': {'use_bias': 'false'}})},
     'config.json: field model.use_bias must be true or false'),
    ('workdir-json-list', [], {'work/config.json': '[1, 2]'}, 'must hold a JSON object'),
    ('workdir-json-binary', [], {'work/config.json': b'\xff\xfe\x00garbage'},
     'is not a valid jaxlm config'),
    ('workdir-json-seed-64', [], {'work/config.json': ('RUN2', {'seed': 2**64})},
     'does not fit in 64 bits'),
    ('workdir-json-nan-lr', [],
     {'work/config.json': ('RUN2', {'optimizer': {'learning_rate': float('nan')}})},
     'must be a finite number'),
    ('workdir-json-null', [], {'work/config.json': ('RUN2', {'batch_size': None})},
     'field batch_size expects an integer, got None'),
    ('workdir-json-float-steps', [], {'work/config.json': ('RUN2', {'train_steps': 12.5})},
     'field train_steps expects an integer, got 12.5'),
    ('workdir-json-unknown', [], {'work/config.json': ('RUN2', {'model': {'depth': 3}})},
     "has unknown field 'model.depth'"),
    # Resuming with a change to the train state's structure stops before anything is restored.
    ('resume-clip-off', ['--config.optimizer.grad_clip=0'], RESUMABLE,
     'train state does not fit this config'),
    ('resume-param-dtype', ['--config.model.param_dtype=bfloat16'], RESUMABLE,
     "model.param_dtype='float32' -> 'bfloat16'"),
    ('resume-untied', ['--config.model.tied_embeddings=false'], RESUMABLE,
     'model.tied_embeddings=True, this config has False'),
    ('resume-bias-off', ['--config.model.use_bias=false'], RESUMABLE,
     'model.use_bias=True, this config has False'),
    # One train per workdir.
    ('workdir-locked', [], {'work/lock.json': '{"host": "{host}", "pid": {pid}, "time": {now}}'},
     'is in use by process {pid} on {host}'),
    ('workdir-locked-other-host', [],
     {'work/lock.json': '{"host": "elsewhere", "pid": 1, "time": {now}}'},
     'is in use by process 1 on elsewhere'),
    # A lock's odd fields are never trusted, nor is an empty one stale: judged by its age.
    ('workdir-lock-odd-fields', [],
     {'work/lock.json': '{"host": 5, "pid": "x", "time": "yesterday"}'}, 'names no valid holder'),
    ('workdir-lock-pid-beyond-range', [],
     {'work/lock.json': '{"host": "{host}", "pid": 100000000000000000000, "time": 1e400}'},
     'names no valid holder'),
    ('workdir-lock-empty', [], {'work/lock.json': ''}, 'names no valid holder'),
    # Numbers that train nothing or cannot fit, refused before anything is allocated.
    ('eps-zero', ['--config.optimizer.eps=0.0'], {}, 'optimizer.eps=0.0 must be positive'),
    ('init-std-overflows', ['--config.model.init_std=1e30'], {},
     'model.init_std=1e+30 must be in (0, 1]'),
    ('steps-beyond-int32', ['--config.train_steps=3000000000'], {},
     'train_steps=3000000000 must be below 2**31'),
    ('prefetch-unbounded', ['--config.data.prefetch=100000'], {},
     'data.prefetch=100000 must be at most 1024'),
    ('profile-window-unbounded', ['--config.profile.num_steps=1000000000'], {},
     'profile.num_steps=1000000000 must be at most 1000'),
    ('threads-unbounded', ['--config.data.num_threads=100000'], {},
     'data.num_threads=100000 must be at most 256'),
    ('splash-tile-negative', ['--config.model.splash_block_q=-128'], {},
     'model.splash_block_q=-128 must be a multiple of 128'),
    ('cudnn-documents-zero', ['--config.model.cudnn_max_documents=0'], {},
     'model.cudnn_max_documents=0 must be positive'),
    ('barrier-timeout-zero', ['--config.distributed.barrier_timeout_s=0.0'], {},
     'distributed.barrier_timeout_s=0.0 must be positive'),
    ('mixture-weight-infinite', ["--config.data.mixture=((1e400, 'a'),)"], {},
     "data.mixture entry (inf, 'a') must be (positive weight, source)"),
    ('batch-beyond-host-memory', ['--config.batch_size=1000000000000'], {},
     'of host memory, more than the'),
    # Paths of the wrong kind.
    ('tokenizer-is-a-directory', ['--config.data.tokenizer={tmp}'], {}, 'Is a directory'),
    ('workdir-not-utf8', ['--workdir={tmp}/w\udcff'], {}, 'is not valid UTF-8'),
    ('config-is-a-directory', ['--config={tmp}'], {}, 'is a directory'),
    # A run's recorded tokenizer is the only one it resumes with.
    ('resume-another-tokenizer', [],
     {**RESUMABLE, 'work/inputs.json': '{"tokenizer": "old.model", "tokenizer_sha256": "0"}'},
     'is not the one --workdir={work} was trained with'),
]


@pytest.mark.parametrize('name,args,files,message', CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line_and_changes_nothing(name, args, files, message, tmp_path,
                                                         shared_data, capsys):
  tmp, work = str(tmp_path), str(tmp_path / 'work')
  fill = lambda text: fill_in(text, tmp, work, str(shared_data))
  for rel, content in files.items():
    write(os.path.join(tmp, rel), file_content(content, fill))
  shared = [f'--config.data.path={CORPUS}', f'--config.data.cache_dir={shared_data}/data',
            f'--config.data.tokenizer={shared_data}/tokenizer.model']
  argv = ['train', f'--config={ROOT}/configs/gpt_tiny.py', f'--workdir={work}', *TINY, *shared]
  argv += [fill(a) for a in args]  # Later arguments win.
  before = snapshot(work)
  capsys.readouterr()
  code = cli.main(argv)
  err = capsys.readouterr().err
  errors_ = [line for line in err.splitlines() if line.startswith('jaxlm: error:')]
  assert code == 2, err
  assert len(errors_) == 1 and fill(message) in errors_[0], err
  assert 'Traceback' not in err
  assert snapshot(work) == before  # Nothing created, overwritten or deleted.


def test_there_are_at_least_seventy_distinct_train_cases():
  assert len({c[0] for c in CASES}) == len(CASES) >= 70


FIELDS = list(config_lib._flat_keys(config_lib.defaults()))


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(
    name=st.one_of(st.sampled_from(FIELDS), st.text(max_size=30)),
    value=st.one_of(st.text(max_size=40), st.integers().map(str), st.floats().map(str),
                    st.sampled_from(['()', '(("batch",),)', '[1, 2]', 'None', 'True', '1e400',
                                     '-1', '0', '"quoted"', '{}', '((1, 2),)', '\x00']))
)
def test_random_overrides_never_produce_a_traceback(name, value):
  try:
    overrides = cli.parse_overrides([f'--config.{name}={value}'])
    config_lib.load(os.path.join(ROOT, 'configs', 'gpt_tiny.py'), overrides)
  except ConfigError as e:
    assert '\n' not in ' '.join(str(e).split())


def test_nonfinite_updates_are_skipped_and_counted(tmp_path, shared_data):
  config = tiny_config(data__cache_dir=str(shared_data / 'data'),
                       data__tokenizer=str(shared_data / 'tokenizer.model'),
                       optimizer__learning_rate=1e4, optimizer__warmup_steps=0,
                       optimizer__grad_clip=0.0, train_steps=8, log_every_steps=2)
  result = train.train(config, str(tmp_path), devices=one_device())
  assert result['step'] == 8
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert sum(r.get('nonfinite', 0) for r in rows) > 0
  params = restore_params(tmp_path, config, 8)
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


def test_nonfinite_stop_policy_saves_the_good_state_and_stops(tmp_path, shared_data):
  config = tiny_config(data__cache_dir=str(shared_data / 'data'),
                       data__tokenizer=str(shared_data / 'tokenizer.model'),
                       optimizer__learning_rate=1e4, optimizer__warmup_steps=0,
                       optimizer__grad_clip=0.0, train_steps=8, log_every_steps=2,
                       nonfinite='stop')
  with pytest.raises(RunError, match=r'had a non-finite loss or gradient \(nonfinite=stop\); '
                                     r'the last good state is saved as checkpoint (\d+)') as e:
    train.train(config, str(tmp_path), devices=one_device())
  step = int(re.search(r'checkpoint (\d+)', str(e.value)).group(1))
  assert step < 8
  params = restore_params(tmp_path, config, step)
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


def restore_params(workdir, config, step):
  s = run_lib.setup(config, one_device())
  ckpt = checkpoint.Checkpointer.for_workdir(str(workdir), config)
  params = ckpt.restore_params(step, s.abstract_state.params, s.shardings.params)
  ckpt.close()
  return jax.device_get(params)


def test_no_unsafe_deserialisation_in_the_package():
  """Checkpoints, caches and tokenizers are read with safe formats; only config files run code."""
  unsafe = re.compile(r'\bpickle\b|\beval\(|\bexec\(|allow_pickle=True|\bmarshal\b|'
                      r'yaml\.load\(|\bdill\b|\bcloudpickle\b')
  offenders = []
  for root, _, files in os.walk(os.path.join(ROOT, 'jaxlm')):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(root, f)
        for number, line in enumerate(open(path), 1):
          if unsafe.search(line):
            offenders.append(f'{os.path.relpath(path, ROOT)}:{number}: {line.strip()}')
  assert not offenders
