"""Where the time goes: a profile window, goodput accounting across a restart, the report."""

import glob
import importlib.util
import json
import os
import shutil
import struct
import time

import numpy as np
import pytest

from jaxlm import cli, data, goodput, report, train
from helpers import metrics, one_device, shared, tiny_config

BUCKET_SHARES = [f'goodput/{b}' for b in goodput.BUCKETS]


SLOW_BATCH_S = 0.5


@pytest.fixture(scope='module')
def restarted(tmp_path_factory, shared_data):
  """8 steps with a profile window over steps 3-4; then the newest checkpoint (8) is lost, as
  when a run is killed after logging step 8 but before saving it, and the run resumes from 4
  with a data source slowed down to SLOW_BATCH_S a batch."""
  workdir = str(tmp_path_factory.mktemp('restarted'))
  # W&B in its offline mode (no network, no login), when the test extra installed it.
  wandb_project = 'jaxlm-test' if importlib.util.find_spec('wandb') else ''
  config = shared(shared_data, train_steps=8, log_every_steps=2,
                  checkpoint__save_every_steps=4, profile__start_step=2,
                  profile__num_steps=2, data__prefetch=1, data__num_threads=1,
                  metrics__wandb_project=wandb_project)
  original = data.train_dataset

  def slow(*args):
    return original(*args).map(lambda batch: (time.sleep(SLOW_BATCH_S), batch)[1])

  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('WANDB_MODE', 'offline')
    patch.setenv('WANDB_SILENT', 'true')
    train.train(config, workdir, devices=one_device())
    shutil.rmtree(os.path.join(workdir, 'checkpoints', '8'))
    patch.setattr(data, 'train_dataset', slow)
    result = train.train(config, workdir, devices=one_device())
  return workdir, result


def segments(workdir):
  """The last goodput row of each process, in order."""
  last = {}
  for r in metrics(workdir):
    if 'goodput/segment' in r:
      last[r['goodput/segment']] = r
  return [last[k] for k in sorted(last)]


def test_profile_window_leaves_a_trace_the_profiler_reads(restarted):
  from jax.profiler import ProfileData  # jaxlib's own reader of .xplane.pb files.
  workdir, _ = restarted
  traces = glob.glob(os.path.join(workdir, 'tensorboard', 'plugins', 'profile', '*',
                                  '*.xplane.pb'))
  assert len(traces) == 1  # One window, in the first process only (the resume starts at 4).
  planes = {p.name: p for p in ProfileData.from_file(traces[0]).planes}
  events = [e for line in planes['/host:CPU'].lines for e in line.events]
  assert events and all(e.duration_ns >= 0 for e in events)
  # A step marker per traced step (StepTraceAnnotation): what xprof's overview counts.
  marked = sorted(dict(e.stats)['step_num'] for e in events if e.name == 'train')
  assert [int(n) for n in marked] == [2, 3]


def test_xprof_overview_has_the_step_times(restarted):
  """What TensorBoard's profile tab shows first: with step markers, a time per step (without,
  its overview says "No step marker observed")."""
  tool = pytest.importorskip('xprof.convert.raw_to_tool_data',
                             reason="needs the profile plugin: pip install -e '.[tensorboard]'")
  trace, = glob.glob(os.path.join(restarted[0], 'tensorboard', 'plugins', 'profile', '*',
                                  '*.xplane.pb'))
  tables = json.loads(tool.xspace_to_tool_data([trace], 'overview_page', {})[0])
  steps, = [t for t in tables if any(c.get('id') == 'stepnum' for c in t.get('cols', []))]
  assert [row['c'][0]['v'] for row in steps['rows']] == ['train 2', 'train 3']
  assert float(steps['p']['steptime_ms_average']) > 0


def test_tensorboard_groups_the_tags_and_holds_the_config(restarted):
  from tensorboard.backend.event_processing import event_accumulator
  workdir, _ = restarted
  events = event_accumulator.EventAccumulator(os.path.join(workdir, 'tensorboard'),
                                              size_guidance={'tensors': 0, 'scalars': 0})
  events.Reload()
  scalars = set(events.Tags()['scalars'])
  assert {'train/loss', 'train/learning_rate', 'train/grad_norm', 'perf/tokens_per_s',
          'perf/mfu', 'eval/loss', 'eval/perplexity', 'goodput/step'} <= scalars
  assert not [t for t in scalars if '/' not in t]  # Every tag in a group.
  assert [e.step for e in events.Scalars('train/loss')] == [2, 4, 6, 8, 6, 8]
  # The config as text, once per process start (steps 0 and 4), and as hyperparameters.
  texts = events.Tensors('config/text_summary')
  assert [t.step for t in texts] == [0, 4]
  config = json.loads(texts[0].tensor_proto.string_val[0].decode().strip('`\n'))
  assert config['train_steps'] == 8 and config['model']['emb_dim'] == 64
  from tensorboard.plugins.hparams import plugin_data_pb2
  content = events.PluginTagToContent('hparams')
  experiment = plugin_data_pb2.HParamsPluginData.FromString(
      content['_hparams_/experiment']).experiment
  hparams = {h.name for h in experiment.hparam_infos}
  assert {'model.emb_dim', 'optimizer.learning_rate', 'train_steps'} <= hparams
  assert [m.name.tag for m in experiment.metric_infos] == ['train/loss', 'eval/loss']


def wandb_records(path):
  """The records of a W&B run's transaction log (run-<id>.wandb: a ':W&B' header, then
  LevelDB-log records of 32 KiB blocks, each a wandb_internal_pb2.Record)."""
  from wandb.proto import wandb_internal_pb2
  data = open(path, 'rb').read()
  assert data[:4] == b':W&B'
  pos, block, pending = 7, 32768, b''
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # Too short for a header: the block's padding.
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # A whole record, or the last fragment of one.
      yield wandb_internal_pb2.Record.FromString(pending)
      pending = b''


def test_wandb_offline_run_continues_across_the_restart(restarted):
  """Both processes log to one W&B run (its id kept in the workdir): its name, the config,
  the train, eval and goodput rows under their grouped tags, against `step`."""
  pytest.importorskip('wandb', reason="needs the test extra: pip install -e '.[test]'")
  workdir, _ = restarted
  run_id = open(os.path.join(workdir, 'wandb_run_id')).read().strip()
  logs = sorted(glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*', '*.wandb')))
  assert len(logs) == 2 and all(path.endswith(f'run-{run_id}.wandb') for path in logs)
  processes = []
  for path in logs:
    records = list(wandb_records(path))
    run, = [r.run for r in records if r.WhichOneof('record_type') == 'run']
    assert (run.run_id, run.project, run.display_name) == (run_id, 'jaxlm-test', 'restarted0')
    history = [{item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                for item in r.history.item} for r in records
               if r.WhichOneof('record_type') == 'history']
    config = {item.key: json.loads(item.value_json) for r in records
              if r.WhichOneof('record_type') == 'config' for item in r.config.update}
    config.update({item.key: json.loads(item.value_json) for item in run.config.update})
    assert config['train_steps'] == 8 and config['model']['emb_dim'] == 64
    processes.append(history)
  first, second = ([h['step'] for h in history if 'train/loss' in h] for history in processes)
  assert (first, second) == ([2, 4, 6, 8], [6, 8])
  logged = {key for history in processes for h in history for key in h}
  assert {'eval/loss', 'perf/mfu', 'goodput/step', 'train/learning_rate'} <= logged
  rows = [r for r in metrics(workdir) if 'loss' in r]
  assert [h['train/loss'] for h in processes[1] if 'train/loss' in h] == [
      r['loss'] for r in rows[-2:]]


def test_mfu_peak_is_measured_once_per_machine(tmp_path, monkeypatch):
  """A CPU has no data sheet: its matmul rate is measured by the first process on the machine
  and kept, so a resumed run's MFU moves with its tokens/s, not with the machine's load."""
  from jaxlm import flops
  monkeypatch.setenv('JAXLM_PEAK_CACHE', str(tmp_path / 'peaks.json'))
  rates = iter([2e11, 1e11])
  monkeypatch.setattr(flops, 'measured_matmul_flops', lambda: next(rates))
  first, source = flops.device_peak_flops()
  again, kept = flops.device_peak_flops()
  assert first == again == 2e11 and 'kept in' in kept and 'now kept' in source
  monkeypatch.setenv('JAXLM_PEAK_CACHE', '')
  assert flops.device_peak_flops()[0] == 1e11  # No cache: measured in this process.


def test_goodput_rows_at_every_log_step_sum_to_one(restarted):
  workdir, _ = restarted
  rows = [r for r in metrics(workdir) if 'goodput/segment' in r]
  first, second = sorted({r['goodput/segment'] for r in rows})
  assert [r['step'] for r in rows if r['goodput/segment'] == first] == [2, 4, 6, 8, 8]
  assert [r['step'] for r in rows if r['goodput/segment'] == second] == [6, 8, 8]
  for r in rows:
    assert sum(r[k] for k in BUCKET_SHARES) == pytest.approx(1.0, abs=1e-9)
    assert r['goodput/wall_s'] == pytest.approx(sum(r[f'{k}_s'] for k in BUCKET_SHARES))
    assert r['goodput/compile_s'] > 0 and r['goodput/checkpoint_s'] > 0
  spread = [r for r in rows if 'step_time/p50_s' in r]
  assert spread and all(0 < r['step_time/p50_s'] <= r['step_time/p90_s'] <= r['step_time/max_s']
                        for r in spread)


def test_resumed_run_reports_the_redone_steps(restarted):
  workdir, result = restarted
  assert result['step'] == 8
  s = report.summary(report.read_rows(workdir))
  assert s['segments'] == 2 and s['redone_steps'] == 4  # Steps 5-8, logged, then lost.
  assert s['seconds']['restart_lost'] > 0
  assert sum(s['goodput'].values()) == pytest.approx(1.0)


def test_report_command_prints_the_summary_and_writes_plots(restarted, capsys):
  workdir, _ = restarted
  assert cli.main(['report', f'--workdir={workdir}']) == 0
  out = capsys.readouterr().out
  assert '2 segment(s)' in out and '4 step(s) redone' in out
  assert [r['goodput/start_step'] for r in report.segments(report.read_rows(workdir))] == [0, 4]
  assert 'restart_lost' in out and 'data_wait' in out
  for name in ('loss.png', 'throughput.png', 'goodput.png'):
    with open(os.path.join(workdir, 'report', name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_report_of_a_workdir_without_metrics_is_one_line(tmp_path, capsys):
  assert cli.main(['report', f'--workdir={tmp_path}']) == 2
  assert 'has no metrics.jsonl; train first' in capsys.readouterr().err


def test_a_slow_data_source_raises_the_data_wait_share(restarted):
  normal, slow = segments(restarted[0])
  # The resumed process waited for most of its 4 batches (prefetch hides one or two).
  assert slow['goodput/data_wait_s'] > SLOW_BATCH_S
  assert slow['goodput/data_wait'] > 10 * normal['goodput/data_wait']


def test_profile_on_demand_file_starts_a_window(tmp_path):
  """The hook alone: a PROFILE file in the workdir starts a trace at the next step boundary
  and is removed; the window ends num_steps later (3 by default)."""
  import types
  from jaxlm import profile
  options = tiny_config().profile
  hook = profile.Profiler(options, str(tmp_path))
  loop = types.SimpleNamespace(step=0, state=np.zeros(()), total=10)  # A loop.Summary.
  hook.on_start(loop)
  loop.step = 1
  hook.on_step(loop)
  assert hook.stop_at is None
  open(tmp_path / 'PROFILE', 'w').close()
  hook._next_check = 0.0  # Do not wait out the once-a-second check.
  hook.on_step(loop)
  assert hook.stop_at == 1 + profile.ON_DEMAND_STEPS and not os.path.exists(tmp_path / 'PROFILE')
  for loop.step in range(2, 5):
    hook.on_step(loop)
  assert hook.stop_at is None
  hook.on_end(loop)
  assert glob.glob(str(tmp_path / 'tensorboard' / 'plugins' / 'profile' / '*' / '*.xplane.pb'))


def test_profile_schedule_repeats_every_n_steps():
  from jaxlm import profile
  options = tiny_config(profile__start_step=5, profile__num_steps=2,
                        profile__every_steps=10).profile
  hook = profile.Profiler(options, '/nonexistent')
  assert [s for s in range(40) if hook.scheduled(s)] == [5, 15, 25, 35]
  assert not profile.Profiler(tiny_config().profile, '/x').scheduled(10)  # num_steps=0: off.
