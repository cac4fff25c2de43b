"""The host-local checkpoint tier (jaxlm/tiers.py) and the restart loop (launch/supervise.py).

The multi-process checks (a killed process, a host's lost local disk, a restart on half the
processes) are in test_multihost.py, where the uninterrupted 2-process run they compare with
is trained once; these run in this process.
"""

import glob
import importlib.util
import logging
import os
import signal
import sys
import threading
import time

import jax
import numpy as np

from helpers import ROOT, copy_run, one_device, snapshot, write
from jaxlm import checkpoint, resume, tiers
from jaxlm import run as run_lib


def test_a_corrupt_local_copy_is_skipped_and_the_workdir_is_never_touched(
    trained_causal, tmp_path, caplog):
  workdir = str(copy_run(trained_causal.workdir, tmp_path))
  config = trained_causal.config.copy_and_resolve_references()
  config.checkpoint.local_dir = str(tmp_path / 'local')
  config.checkpoint.local_every_steps = 1
  s = run_lib.setup(config, one_device())
  checkpoints = checkpoint.Checkpointer.for_workdir(workdir, config)
  local = tiers.open_local(config, workdir, s.mesh)
  caplog.set_level(logging.INFO, logger='jaxlm')
  try:
    with s.active():
      state, step, tier = resume.initial_state(s, checkpoints, None, local)
      assert (step, tier) == (12, 'persistent')  # No local copy yet.
      for later in (13, 14):  # As a run that went on would save them.
        local.save(later, state, None, config)
      local.wait()
      shard = max(glob.glob(f'{local.directory}/14/state/**/d/*', recursive=True),
                  key=os.path.getsize)
      with open(shard, 'r+b') as f:
        f.seek(os.path.getsize(shard) // 2)
        f.write(b'\xff' * 16)
      before = snapshot(os.path.join(workdir, 'checkpoints'))
      restored, step, tier = resume.initial_state(s, checkpoints, None, local)
    assert (step, tier) == (13, 'local')
    assert 'local checkpoint 14' in caplog.text and 'does not match its checksum' in caplog.text
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert snapshot(os.path.join(workdir, 'checkpoints')) == before
    assert local.directory.startswith(str(tmp_path / 'local' / tiers.run_id(workdir)))
  finally:
    local.close()
    checkpoints.close()


def supervisor():
  spec = importlib.util.spec_from_file_location('supervise', f'{ROOT}/launch/supervise.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def test_the_supervisor_restarts_a_failed_job_but_not_one_failing_at_the_same_step(
    tmp_path, capsys):
  main = supervisor()
  workdir = str(tmp_path)
  # Fails on its first start, then succeeds: restarted once.
  assert main(['--max_restarts=3', f'--workdir={workdir}', '--', 'bash', '-c',
               'test "$JAXLM_RESTART" = 1']) == 0
  assert 'restart 1 of 3' in capsys.readouterr().err
  # Fails at step 5 each time: stopped at the second failure, not after 5 tries.
  write(f'{workdir}/metrics.jsonl', '{"step": 5, "loss": 1.0}\n')
  assert main(['--max_restarts=5', f'--workdir={workdir}', '--', 'bash', '-c', 'exit 3']) == 3
  err = capsys.readouterr().err
  assert 'failed twice at step 5 (exit status 3); not restarting' in err
  assert err.count('restart ') == 1
  # Progresses but keeps failing: --max_restarts bounds it.
  advancing = (f'echo "{{\\"step\\": $((10 + JAXLM_RESTART)), \\"loss\\": 1}}" >> '
               f'{workdir}/metrics.jsonl; exit 1')
  assert main(['--max_restarts=2', f'--workdir={workdir}', '--', 'bash', '-c', advancing]) == 1
  assert 'after 2 restart(s), --max_restarts=2' in capsys.readouterr().err
  # Bad input is not retried.
  assert main(['--max_restarts=2', f'--workdir={workdir}', '--', 'bash', '-c', 'exit 2']) == 2
  assert 'stopped on its input' in capsys.readouterr().err


def test_the_supervisor_waits_restart_delay_before_a_restart_and_a_sigterm_ends_it(
    tmp_path, capsys):
  main = supervisor()
  began = time.monotonic()
  assert main(['--max_restarts=1', f'--workdir={tmp_path}', '--restart_delay=0.5', '--',
               'bash', '-c', 'test "$JAXLM_RESTART" = 1']) == 0
  assert time.monotonic() - began >= 0.5
  assert 'restart 1 of 1 in 0.5 s' in capsys.readouterr().err
  # A stop asked for during the wait is not followed by a restart.
  threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
  previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    began = time.monotonic()
    assert main(['--max_restarts=1', f'--workdir={tmp_path}', '--restart_delay=60', '--',
                 'bash', '-c', 'exit 1']) == 1
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  assert time.monotonic() - began < 30


def test_a_bucket_metrics_file_gets_each_starts_first_train_row_at_once(monkeypatch):
  """The supervisor reads progress from metrics.jsonl, which a gs:// workdir rewrites only
  every flush_secs: a job failing again sooner must still show the step it reached."""
  from jaxlm import metrics
  written = []
  monkeypatch.setattr(metrics.paths, 'isfile', lambda path: False)
  monkeypatch.setattr(metrics.paths, 'atomic_write', lambda path, text: written.append(text))
  rows = metrics._RemoteRows('gs://bucket/run/metrics.jsonl', flush_secs=3600)
  rows.append('{"step": 4, "eval_loss": 5.0}\n')
  assert written == []  # Not a train row: it waits.
  rows.append('{"step": 5, "loss": 4.0}\n', progress=True)
  assert written == ['{"step": 4, "eval_loss": 5.0}\n{"step": 5, "loss": 4.0}\n']
  rows.append('{"step": 6, "loss": 3.0}\n', progress=True)
  assert len(written) == 1  # Later rows wait for flush_secs, or the end.
  rows.close()
  assert written[-1].endswith('{"step": 6, "loss": 3.0}\n')
