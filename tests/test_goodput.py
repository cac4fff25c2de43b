"""Where the time goes: a profile window, goodput accounting across a restart, the report."""

import glob
import os
import shutil
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
  config = shared(shared_data, train_steps=8, log_every_steps=2,
                  checkpoint__save_every_steps=4, profile__start_step=2,
                  profile__num_steps=2, data__prefetch=1, data__num_threads=1)
  train.train(config, workdir, devices=one_device())
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '8'))
  original = data.train_dataset

  def slow(*args):
    return original(*args).map(lambda batch: (time.sleep(SLOW_BATCH_S), batch)[1])

  with pytest.MonkeyPatch.context() as patch:
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
  assert '2 process run(s)' in out and '4 step(s) redone' in out
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
  loop = types.SimpleNamespace(step=0, step_metrics=np.zeros(()),
                               config=types.SimpleNamespace(train_steps=10))
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
