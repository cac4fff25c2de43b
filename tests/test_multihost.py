"""Several processes joined by jax.distributed on localhost, as on a pod; and the launchers."""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import (LOCAL, ROOT, env, faulty_python, free_port, launcher, one_device, run_local,
                     tiny_config, write_config)
from jaxlm import checkpoint, distributed, train
from jaxlm import run as run_lib
from jaxlm.config import ConfigError


def losses(workdir):
  rows = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      if 'loss' in row:
        rows[row['step']] = row['loss']
  return rows


@pytest.fixture(scope='module')
def runs(tmp_path_factory, shared_data):
  """The tiny config trained for 6 steps by 2 processes x 4 devices and by 1 x 8: this
  process, whose 8 simulated devices are those of a `launch/local.sh 1` run."""
  root = tmp_path_factory.mktemp('multihost')
  config = tiny_config(data__cache_dir=str(shared_data / 'data'),
                       data__tokenizer=str(shared_data / 'tokenizer.model'), train_steps=6,
                       log_every_steps=1, checkpoint__save_every_steps=3)
  path = write_config(root / 'cfg.py', config)
  result = run_local(2, 'train', f'--config={path}', f'--workdir={root / "p2"}')
  assert result.returncode == 0, result.stderr[-3000:]
  train.train(config, str(root / 'p1'))
  return path, config, {2: (str(root / 'p2'), result), 1: (str(root / 'p1'), None)}


def test_two_processes_train_like_one_process_with_the_same_devices(runs):
  _, _, out = runs
  two, one = losses(out[2][0]), losses(out[1][0])
  assert sorted(two) == list(range(1, 7))
  for step in two:
    assert two[step] == pytest.approx(one[step], rel=1e-5), step
  # One writer of the result (gloo, the CPU collectives library, prints lines of its own).
  results = [line for line in out[2][1].stdout.splitlines() if line.startswith('{')]
  assert len(results) == 1 and json.loads(results[0])['step'] == 6
  stderr = out[2][1].stderr
  assert 'process 1 of 2 joined' not in stderr  # Non-chief processes only warn.
  assert 'process 0 of 2 joined (4 local devices, 8 in all)' in stderr


@pytest.mark.parametrize('saved_by,resumed_by', [(2, 1), (1, 2)])
def test_checkpoints_move_between_process_counts(runs, saved_by, resumed_by, tmp_path, caplog):
  path, config, out = runs
  workdir = str(tmp_path / 'run')
  shutil.copytree(out[saved_by][0], workdir)
  if resumed_by == 1:  # 1 x 8 devices: this process.
    caplog.set_level(logging.INFO, logger='jaxlm')
    longer = config.copy_and_resolve_references()
    longer.train_steps = 8
    train.train(longer, workdir)
    log = caplog.text
  else:
    result = run_local(resumed_by, 'train', f'--config={path}', f'--workdir={workdir}',
                       '--config.train_steps=8')
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
  assert 'resumed from the checkpoint of step 6' in log
  assert sorted(losses(workdir))[-2:] == [7, 8]


def final_state(config, workdir, step, devices=None):
  """The train state of checkpoint `step` in `workdir`, as host arrays."""
  s = run_lib.setup(config, devices)
  checkpoints = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  try:
    with s.active():
      state, bad = checkpoints.restore(step, s.abstract_state, s.shardings)
    assert bad is None
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state)]
  finally:
    checkpoints.close()


def assert_same_state(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_a_killed_job_restarts_itself_from_the_best_tier_bit_exact(runs, tmp_path, caplog):
  """local.sh --max_restarts: process 1 is SIGKILLed at a random step (its local copies
  intact: resumed from them), then on the restarted job after step 6 with its local disk
  wiped (resumed from the workdir); the run ends bit-exact against the uninterrupted one.
  Then a restart on half the processes (1) cannot use the 2-process local copies: it resumes
  resharded from the workdir, bit-exact against the same resume without a local tier."""
  path, config, out = runs
  workdir, local_dir = str(tmp_path / 'run'), str(tmp_path / 'local')
  kill_at = random.choice([4, 5])  # Local copies every step, the workdir's at 3 and 6.
  result = subprocess.run(
      ['bash', LOCAL, '2', '--devices-per-process', '4', '--max_restarts=2', '--', 'train',
       f'--config={path}', f'--workdir={workdir}', f'--config.checkpoint.local_dir={local_dir}',
       '--config.checkpoint.local_every_steps=1'],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(env(4), PYTHON=faulty_python(str(tmp_path)), JAXLM_TEST_LOCAL_DIR=local_dir,
               JAXLM_TEST_FAULTS=f'0=1:{kill_at}:keep;1=1:6:wipe'))
  err = result.stderr
  assert result.returncode == 0, err[-4000:]
  assert 'restart 1 of 2' in err and 'restart 2 of 2' in err, err[-4000:]
  # Killed after step k, before saving it: the local copy of k - 1 is the newest everywhere.
  assert (f'resumed from the checkpoint of step {kill_at - 1} (local tier)' in err and
          f'resumed at step {kill_at - 1} from the local tier: 1 step(s)' in err), (kill_at, err)
  assert 'resumed from the checkpoint of step 3 (persistent tier)' in err, err[-4000:]
  assert losses(workdir) == losses(out[2][0])  # Every step's loss, bit for bit.
  assert_same_state(final_state(config, workdir, 6), final_state(config, out[2][0], 6))

  # Half the processes: this one (1 process) on 4 of its devices, from the workdir's step 3.
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '6'))
  reference = str(tmp_path / 'reference')
  shutil.copytree(workdir, reference)
  caplog.set_level(logging.INFO, logger='jaxlm')
  half = jax.devices()[:4]
  with_local = config.copy_and_resolve_references()
  with_local.checkpoint.local_dir, with_local.checkpoint.local_every_steps = local_dir, 1
  train.train(with_local, workdir, half)
  assert 'resumed from the checkpoint of step 3 (persistent tier)' in caplog.text
  train.train(config, reference, half)
  assert_same_state(final_state(config, workdir, 6, half), final_state(config, reference, 6, half))


def test_when_a_peer_dies_the_survivor_exits_nonzero_within_the_bound(runs, tmp_path):
  path, _, _ = runs
  port, timeout_s = free_port(), 10
  processes = []
  try:
    for pid in range(2):
      e = dict(env(4), JAXLM_COORDINATOR=f'127.0.0.1:{port}', JAXLM_NUM_PROCESSES='2',
               JAXLM_PROCESS_ID=str(pid))
      processes.append(subprocess.Popen(
          [sys.executable, '-m', 'jaxlm', 'train', f'--config={path}',
           f'--workdir={tmp_path}/run', '--config.train_steps=100000',
           '--config.checkpoint.save_every_steps=100000', '--config.optimizer.warmup_steps=1',
           f'--config.distributed.heartbeat_timeout_s={timeout_s}'],
          cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 600  # Generous: shared CI machines stall.
    while not (os.path.exists(f'{tmp_path}/run/metrics.jsonl') and losses(f'{tmp_path}/run')):
      assert time.time() < deadline and all(p.poll() is None for p in processes)
      time.sleep(0.2)
    processes[1].send_signal(signal.SIGKILL)
    killed = time.time()
    code = processes[0].wait(timeout=6 * timeout_s)
    elapsed = time.time() - killed
    err = processes[0].stderr.read()
  finally:  # Never leave a 100000-step run behind, whatever failed.
    for p in processes:
      p.kill()
      p.wait()
  assert code != 0
  assert elapsed < 6 * timeout_s
  assert 'another task died' in err or 'unhealthy' in err, err[-2000:]


def test_distributed_settings_from_environment_and_clusters():
  config = tiny_config()
  assert distributed.arguments(config, {}) is None  # One process: nothing to join.
  args = distributed.arguments(config, {'JAXLM_COORDINATOR': 'h:1234',
                                        'JAXLM_NUM_PROCESSES': '4', 'JAXLM_PROCESS_ID': '3'})
  assert (args['coordinator_address'], args['num_processes'], args['process_id']) == (
      'h:1234', 4, 3)
  assert args['heartbeat_timeout_seconds'] == config.distributed.heartbeat_timeout_s
  assert distributed.cluster({'SLURM_NTASKS': '16'}) == 'slurm'
  assert distributed.cluster({'SLURM_NTASKS': '1'}) is None
  assert distributed.cluster({'OMPI_COMM_WORLD_SIZE': '2'}) == 'mpi'
  assert distributed.cluster({'TPU_WORKER_HOSTNAMES': 'a,b,c,d'}) == 'tpu'
  assert distributed.cluster({'TPU_WORKER_HOSTNAMES': 'a'}) is None  # A single-host TPU VM.
  assert distributed.arguments(config, {'SLURM_NTASKS': '16'}) == {
      'heartbeat_timeout_seconds': 300, 'initialization_timeout': 300}
  # A restarted process waits longer for its peers, which restart a heartbeat bound later.
  assert distributed.arguments(config, {'SLURM_NTASKS': '16', 'JAXLM_RESTART': '1'}) == {
      'heartbeat_timeout_seconds': 300, 'initialization_timeout': 900}
  assert distributed.arguments(config, {'SLURM_NTASKS': '16', 'JAXLM_RESTART': '0'})[
      'initialization_timeout'] == 300
  with pytest.raises(ConfigError, match='set JAXLM_NUM_PROCESSES'):
    distributed.arguments(config, {'JAXLM_COORDINATOR': 'h:1'})
  with pytest.raises(ConfigError, match='set JAXLM_PROCESS_ID'):
    distributed.arguments(config, {'JAXLM_COORDINATOR': 'h:1', 'JAXLM_NUM_PROCESSES': '2'})
  with pytest.raises(ConfigError, match=r'JAXLM_PROCESS_ID=5 must be in \[0, 2\)'):
    distributed.arguments(config, {'JAXLM_COORDINATOR': 'h:1', 'JAXLM_NUM_PROCESSES': '2',
                                   'JAXLM_PROCESS_ID': '5'})
  with pytest.raises(ConfigError, match="JAXLM_NUM_PROCESSES='two' must be an integer"):
    distributed.arguments(config, {'JAXLM_COORDINATOR': 'h:1', 'JAXLM_NUM_PROCESSES': 'two'})


def test_local_launcher_dry_run(bare_path):
  result = launcher(LOCAL, '2', '--port', '5555', '--dry-run', '--', 'train',
                    '--config=configs/gpt_tiny.py', '--workdir=/tmp/x', path=bare_path)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines == [
      f'JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 '
      f'JAXLM_COORDINATOR=127.0.0.1:5555 JAXLM_NUM_PROCESSES=2 JAXLM_PROCESS_ID={i} python3 '
      f'-m jaxlm train --config=configs/gpt_tiny.py --workdir=/tmp/x' for i in range(2)]


def test_tpu_launcher_dry_run_prints_every_command(bare_path):
  result = launcher('launch/tpu_pod.sh', '--name', 'lm', '--zone', 'us-east5-a',
                    '--accelerator', 'v5p-64', '--queued', '--mount', 'bkt:/mnt/jaxlm',
                    '--delete', '--dry-run', '--', 'train', '--config=configs/llama_7b.py',
                    '--workdir=/mnt/jaxlm/runs/7b', path=bare_path)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert ('gcloud compute tpus queued-resources create lm --node-id=lm '
          '--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --zone=us-east5-a') in out
  assert 'gcloud compute tpus tpu-vm scp /tmp/jaxlm-lm.tar.gz lm:/tmp/jaxlm.tar.gz' in out
  assert out.count('--worker=all') == 5  # Copy, install, mount, run, wait: on every worker.
  assert 'gcsfuse\\ --implicit-dirs\\ bkt\\ /mnt/jaxlm' in out
  assert ('JAXLM_DISTRIBUTED=auto\\ setsid\\ nohup\\ python3\\ -m\\ jaxlm\\ train\\ '
          '--config=configs/llama_7b.py\\ --workdir=/mnt/jaxlm/runs/7b') in out
  assert out.strip().endswith('gcloud compute tpus queued-resources delete lm '
                              '--zone=us-east5-a --force --quiet')
  plain = launcher('launch/tpu_pod.sh', '--name', 'lm', '--zone', 'z', '--accelerator',
                   'v6e-16', '--dry-run', '--', 'train', '--workdir=/w', path=bare_path)
  assert ('gcloud compute tpus tpu-vm create lm --accelerator-type=v6e-16 '
          '--version=v2-alpha-tpuv6e --zone=z') in plain.stdout


@pytest.mark.parametrize('args,message', [
    ([], '--name is required'),
    (['--name', 'x'], '--zone is required'),
    (['--name', 'x', '--zone', 'z'], 'nothing to do'),
    (['--name', 'x', '--zone', 'z', '--', 'train'], '--accelerator is required'),
    (['--name', 'x', '--zone', 'z', '--accelerator', 'v5p-8', '--', 'train'], 'gcloud not found'),
    (['--name'], '--name needs a value'),
    (['--bogus'], "unknown option '--bogus'"),
])
def test_tpu_launcher_fails_clearly(args, message, bare_path):
  result = launcher('launch/tpu_pod.sh', *args, path=bare_path)
  assert result.returncode == 2 and message in result.stderr, result.stderr


def test_slurm_launcher_dry_run_sets_xla_flags_and_srun(bare_path):
  result = launcher('launch/slurm_gpu.sbatch', '--dry-run', '--', 'train',
                    '--config=configs/llama_1b.py', '--workdir=/shared/x', path=bare_path,
                    env_={'SLURM_JOB_NUM_NODES': '4', 'SLURM_NTASKS_PER_NODE': '1'})
  assert result.returncode == 0, result.stderr
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in result.stdout
  assert ('srun --kill-on-bad-exit=1 --cpu-bind=none python3 -m jaxlm train '
          '--config=configs/llama_1b.py --workdir=/shared/x --config.mesh.dcn_data=4') in (
              result.stdout)
  per_gpu = launcher('launch/slurm_gpu.sbatch', '--dry-run', '--', 'train', '--workdir=/x',
                     env_={'SLURM_JOB_NUM_NODES': '4', 'SLURM_NTASKS_PER_NODE': '8'},
                     path=bare_path)
  assert 'dcn_data' not in per_gpu.stdout


@pytest.mark.parametrize('script,args,message', [
    ('launch/slurm_gpu.sbatch', [], "missing '-- JAXLM_ARGS'"),
    ('launch/slurm_gpu.sbatch', ['--', 'train', '--workdir=/x'], 'srun not found'),
    ('launch/local.sh', [], 'usage: launch/local.sh N'),
    ('launch/local.sh', ['two', '--', 'train'], "N must be a positive integer, got 'two'"),
    ('launch/local.sh', ['2'], "missing '-- JAXLM_ARGS'"),
])
def test_other_launchers_fail_clearly(script, args, message, bare_path):
  result = launcher(script, *args, path=bare_path)
  assert result.returncode == 2 and message in result.stderr, result.stderr


def test_launchers_restart_through_the_supervisor(bare_path):
  slurm = launcher('launch/slurm_gpu.sbatch', '--max_restarts=3', '--dry-run', '--', 'train',
                   '--workdir=/shared/x', path=bare_path, env_={'SLURM_JOB_NUM_NODES': '2'})
  assert ('launch/supervise.py --max_restarts=3 --workdir=/shared/x '
          '--name=launch/slurm_gpu.sbatch -- srun --kill-on-bad-exit=1') in slurm.stdout
  local = launcher(LOCAL, '2', '--max_restarts', '1', '--dry-run', '--', 'train',
                   '--workdir=/w', path=bare_path)
  assert local.returncode == 0 and (
      'supervise.py --max_restarts=1 --workdir=/w --name=launch/local.sh -- bash') in local.stdout
  no_workdir = launcher(LOCAL, '2', '--max_restarts=1', '--', 'train', path=bare_path)
  assert no_workdir.returncode == 2 and '--max_restarts needs the job' in no_workdir.stderr
  pod = ['launch/tpu_pod.sh', '--name', 'lm', '--zone', 'z', '--accelerator', 'v5p-16',
         '--use-existing', '--max_restarts=2', '--dry-run', '--', 'train']
  tpu = launcher(*pod, '--workdir=gs://b/r', '--config.distributed.heartbeat_timeout_s=60',
                 path=bare_path)
  assert tpu.returncode == 0, tpu.stderr
  assert ('JAXLM_DISTRIBUTED=auto\\ setsid\\ nohup\\ python3\\ launch/supervise.py\\ '
          '--max_restarts=2\\ --workdir=gs://b/r\\ --name=launch/tpu_pod.sh\\ '
          '--restart_delay=60\\ --\\ python3\\ -m\\ jaxlm\\ train') in tpu.stdout
  assert '\\>\\ ~/jaxlm-logs/jaxlm.log' in tpu.stdout  # The log and the group's pid, as before.
  assert '\\&\\ echo\\ \\$\\!\\ \\>\\ ~/jaxlm-logs/jaxlm.pid' in tpu.stdout
  delayed = launcher(*pod[:-2], '--restart_delay', '7', '--', 'train', '--workdir=/w',
                     path=bare_path)
  assert '--restart_delay=7\\ --' in delayed.stdout, delayed.stderr
  no_workdir = launcher(*pod, path=bare_path)
  errors = [line for line in no_workdir.stderr.splitlines() if 'error' in line]
  assert no_workdir.returncode == 2 and errors == [
      'launch/tpu_pod.sh: error: --max_restarts needs --workdir=DIR among JAXLM_ARGS (its '
      'progress is read there)']
