"""`jaxlm plan --topology`: the train and eval steps compiled by the TPU compiler (libtpu) for
a Cloud TPU slice on this CPU-only machine, and the persistent compilation cache."""

import json
import os
import runpy
import subprocess
import sys

import pytest

from helpers import ROOT
from jaxlm import cli, plan, topology

pytestmark = pytest.mark.usefixtures('tpu_compiles')
GiB = 2 ** 30
ACCELERATOR_CONFIGS = ('llama_7b_tpu_v5p', 'llama_1b_tpu_v6e', 'llama_7b', 'llama_1b',
                       'bert_large', 'bert_base', 'gpt2_124m')
# Planned by the slow test alone: a 128k-token step's compile takes minutes even --quick.
LONG_CONTEXT_CONFIGS = ('llama_7b_128k_tpu_v5p',)


def test_accelerator_types_map_to_the_slices_gcloud_creates():
  assert topology.parse('v5p-128').topology_name == 'v5p:4x4x4'  # TensorCores: 64 chips.
  assert topology.parse('v5p-8').topology_name == 'v5p:2x2x1'
  assert topology.parse('v4-32').topology_name == 'v4:2x2x4'
  assert topology.parse('v5litepod-16').topology_name == 'v5e:4x4'  # Chips.
  assert topology.parse('v5e-4').topology_name == 'v5e:2x2'
  assert topology.parse('v6e-256').topology_name == 'v6e:16x16'
  assert topology.parse('v6e-1').chips == 1
  for bad, message in (('v3-8', 'not a Cloud TPU accelerator type'),
                       ('v5p-12', 'not a slice size of v5p'), ('v5p128', 'e.g. v5p-128')):
    with pytest.raises(cli.ConfigError, match=message):
      topology.parse(bad)


@pytest.mark.parametrize('accelerator_type, kind, hbm_gib, quick', [
    ('v5p-8', 'TPU v5', 95, []), ('v5e-4', 'TPU v5 lite', 16, ['--quick'])])
def test_a_small_llama_compiles_for_the_slice_and_its_memory_holds_the_state(
    accelerator_type, kind, hbm_gib, quick, capsys, tmp_path):
  assert cli.main(['plan', '--config=configs/llama_10m_cpu.py', f'--topology={accelerator_type}',
                   '--config.model.dtype=bfloat16', '--config.model.scan_layers=true',
                   '--config.model.num_heads=2',  # Heads of 128 = the TPU's lanes: no padding.
                   f'--json={tmp_path / "plan.json"}', *quick]) == 0
  out = capsys.readouterr().out.splitlines()
  report = json.loads(out[-1])  # The last stdout line, as for every plan.
  assert report == json.loads((tmp_path / 'plan.json').read_text())
  assert report['devices'] == 4 and report['device_kind'] == kind and report['fits']
  assert report['hbm_bytes_per_chip'] == hbm_gib * GiB
  # The train step's arguments are the state (jaxlm's own count of its shards' bytes) and the
  # batch's 3 int32 features of 2 x 256 tokens per chip; the TPU pads only small arrays (one
  # tile of at most 4 KiB each).
  train_bytes, state_bytes = report['train_step_bytes'], report['state_bytes_per_device']
  padding = train_bytes['arguments'] - state_bytes - 3 * 4 * 2 * 256
  leaves = 3 * 12 + 2  # Parameters, both Adam moments, the step and Adam's count.
  assert 0 <= padding <= leaves * 4096
  assert train_bytes['outputs'] >= state_bytes  # The new state, in the donated buffers.
  assert report['bytes_needed_per_chip'] == max(train_bytes['total'],
                                                report['eval_step_bytes']['total'])
  assert report['xla_flops_per_step_per_device'] > 0
  assert report['xla_flops_counts_loop_bodies_once']  # The scanned layers.
  assert f'verdict: fits: {report["bytes_needed_per_chip"] / GiB:.2f} of {hbm_gib} GiB' in out[-2]
  assert report['quick'] == bool(quick)


def test_a_model_that_cannot_fit_exits_2_with_the_shortfall(capsys, tmp_path):
  # 48 layers of width 4096 on 4 v5e chips: 9.7B parameters, 27 GiB of state per 16 GiB chip
  # (refused before compiling; a step the TPU compiler refuses ends the same way).
  code = cli.main(['plan', '--config=configs/llama_7b.py', '--topology=v5e-4',
                   '--config.model.num_layers=48', '--config.batch_size=4',
                   '--config.optimizer.grad_accum_steps=1', '--config.model.max_len=512',
                   '--config.loss_chunk=0', f'--json={tmp_path / "plan.json"}'])
  captured = capsys.readouterr()
  assert code == 2
  error = captured.err.strip().splitlines()[-1]
  assert error.startswith('jaxlm: error: does not fit v5e-4: the parameters and optimizer state '
                          'alone need ')
  assert 'GiB more than the 16 GiB of HBM' in error and 'mesh.fsdp' in error
  report = json.loads(captured.out.splitlines()[-1])
  assert report == json.loads((tmp_path / 'plan.json').read_text())
  assert report['fits'] is False and report['state_bytes_per_device'] > 16 * GiB


def test_without_libtpu_topology_says_how_to_install_it(capsys, monkeypatch):
  monkeypatch.setattr(topology, 'libtpu_installed', lambda: False)
  assert cli.main(['plan', '--config=configs/gpt_tiny.py', '--topology=v5p-8']) == 2
  assert "pip install -e '.[tpu]' in a jaxlm checkout" in capsys.readouterr().err


def intended_topology(name):
  return runpy.run_path(os.path.join(ROOT, 'configs', f'{name}.py'))['TOPOLOGY']


@pytest.mark.parametrize('name', ACCELERATOR_CONFIGS)
def test_every_shipped_accelerator_config_fits_its_topology_by_a_quick_compile(name, capsys,
                                                                              tmp_path):
  # The TPU compiler at its least effort (minutes less per config than the full compile below,
  # which is too slow for CI): the same programs, memory figures within a few percent.
  assert cli.main(['plan', f'--config=configs/{name}.py', f'--topology={intended_topology(name)}',
                   '--quick', f'--json={tmp_path / "plan.json"}']) == 0
  report = json.loads((tmp_path / 'plan.json').read_text())
  assert report['quick'] and report['fits'] and '10% kept spare' in report['verdict']
  assert report['bytes_needed_per_chip'] <= (1 - plan.QUICK_HEADROOM) * report['hbm_bytes_per_chip']
  assert report['bytes_needed_per_chip'] >= report['state_bytes_per_device']
  capsys.readouterr()


@pytest.mark.slow
@pytest.mark.parametrize('name', ACCELERATOR_CONFIGS + LONG_CONTEXT_CONFIGS)
def test_every_shipped_accelerator_config_fits_its_topology(name, tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'jaxlm', 'plan', f'--config=configs/{name}.py',
                         f'--topology={intended_topology(name)}'], cwd=ROOT,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.splitlines()[-1])['fits']


CACHE_PROGRAM = '''
import sys
from jax._src import monitoring
hits = []
monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith('/cache_hits') else None)
from jaxlm import cli
assert cli.main(sys.argv[1:]) == 0
print('cache hits:', len(hits))
'''


def test_the_compile_cache_is_hit_by_a_second_process(tmp_path):
  env = {**os.environ, 'JAXLM_COMPILE_CACHE': str(tmp_path / 'xla'), 'PYTHONPATH': ROOT}
  env.pop('XLA_FLAGS', None)  # One CPU device, like a plain `jaxlm plan`.
  command = [sys.executable, '-c', CACHE_PROGRAM, 'plan', '--config=configs/gpt_tiny.py']

  def hits():
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.splitlines()[-1].split(':')[1])

  assert hits() == 0
  assert any(p.name.startswith('jit_train_step') for p in (tmp_path / 'xla').iterdir())
  assert hits() >= 1  # The train step, loaded instead of compiled.
