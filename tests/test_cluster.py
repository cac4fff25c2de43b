"""Real-cluster behaviour that needs no cluster (issue 23): GPUs per SLURM task from a simulated
SLURM environment, barriers on the coordination service with timeouts, the workdir checked
once by the chief before any work."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import ROOT, env, free_port, launcher, tiny_config, write_config
from jaxlm import distributed
from jaxlm.config import ConfigError


def slurm(tasks_per_node, local_id, visible, on_node=8, nodes=2):
  """A SLURM task's environment on node 1 of a job of `nodes` nodes."""
  environ = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'gpu[1-2]', 'SLURM_NODEID': '1',
             'SLURM_NTASKS': str(tasks_per_node * nodes), 'SLURM_PROCID': str(
                 tasks_per_node + local_id), 'SLURM_LOCALID': str(local_id),
             'SLURM_STEP_TASKS_PER_NODE': f'{tasks_per_node}(x{nodes})',
             'SLURM_GPUS_ON_NODE': str(on_node)}
  if visible is not None:
    environ['CUDA_VISIBLE_DEVICES'] = visible
  return environ


def device_ids(environ):
  return distributed.arguments(tiny_config(), environ).get('local_device_ids')


def test_one_slurm_task_per_node_drives_every_gpu_of_its_node():
  # Before: no local_device_ids, and JAX's SLURM default gave this process [SLURM_LOCALID].
  assert device_ids(slurm(1, 0, '0,1,2,3,4,5,6,7')) == list(range(8))
  assert device_ids(slurm(1, 0, None)) == list(range(8))  # No CUDA_VISIBLE_DEVICES set.


def test_one_slurm_task_per_gpu_drives_its_own():
  assert device_ids(slurm(8, 3, '0,1,2,3,4,5,6,7')) == [3]  # Every task sees every GPU.
  assert device_ids(slurm(8, 3, '3')) == [0]  # SLURM bound one GPU to each task.
  assert device_ids(slurm(8, 3, '3', on_node=0)) == [0]  # ...without saying how many in all.
  assert device_ids(slurm(2, 1, '0,1,2,3,4,5,6,7')) == [4, 5, 6, 7]
  assert device_ids(slurm(2, 1, '4,5,6,7')) == [0, 1, 2, 3]


def test_a_slurm_layout_that_leaves_gpus_idle_is_refused():
  with pytest.raises(ConfigError, match='8 GPUs do not split evenly over 3 tasks'):
    device_ids(slurm(3, 0, '0,1,2,3,4,5,6,7'))
  with pytest.raises(ConfigError, match="drive 4 of the node's 8 GPUs"):
    device_ids(slurm(2, 0, '0,1'))


def test_no_gpus_or_the_users_own_choice_leave_jax_to_decide():
  assert device_ids(slurm(1, 0, None, on_node=0)) is None
  assert device_ids({**slurm(1, 0, '0,1'), 'JAX_LOCAL_DEVICE_IDS': '1'}) is None
  assert distributed.slurm_gpus(slurm(1, 0, '0,1,2,3,4,5,6,7'))[1].startswith(
      'SLURM task 0 of 1 on its node')


# Two processes joined on localhost. Device collectives are made to fail: barriers and the
# chief's answers must go through the coordination service alone.
PROGRAM = textwrap.dedent('''
    import sys, time
    import jax
    from jax.experimental import multihost_utils
    pid, port, delay, timeout_s = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    jax.distributed.initialize(f'127.0.0.1:{port}', 2, pid)
    def device_collective(*_):
      raise AssertionError('a barrier ran a device collective')
    multihost_utils.sync_global_devices = device_collective
    from jaxlm import distributed
    from jaxlm.errors import ConfigError, RunError
    def check():
      raise ConfigError('--workdir=/proc/x is not writable')
    try:
      distributed.on_chief('workdir check', check)
    except ConfigError as e:
      print('refused:', e, flush=True)
    if pid == 0:
      time.sleep(delay)  # The chief's slow host work.
    start = time.time()
    try:
      distributed.barrier('process 0 has prepared the data', timeout_s)
      print('passed', flush=True)
    except RunError as e:
      print(f'gave up after {time.time() - start:.1f} s:', e, flush=True)
''')


def two_processes(delay, timeout_s):
  port = free_port()
  procs = [subprocess.Popen([sys.executable, '-c', PROGRAM, str(i), str(port), str(delay),
                             str(timeout_s)], cwd=ROOT, env=env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=120)[0])
    finally:
      p.kill()
  return outs


def test_barriers_wait_on_the_coordination_service_and_give_up_naming_the_step():
  chief, other = two_processes(delay=6, timeout_s=2)
  for out in (chief, other):  # The chief's refusal reached the other process too.
    assert 'refused: --workdir=/proc/x is not writable' in out, out
  assert "reach 'process 0 has prepared the data'" in other, other
  waited = float(other.split('gave up after ')[1].split(' s')[0])
  assert 1.5 < waited < 5, other
  chief, other = two_processes(delay=3, timeout_s=60)  # Longer work than before, within.
  assert 'passed' in chief and 'passed' in other, (chief, other)


def test_an_unwritable_workdir_is_one_line_and_exit_2_before_any_data_work(tmp_path):
  config = tiny_config()  # No tokenizer given: one would be trained if the run got that far.
  start = time.time()
  out = subprocess.run([sys.executable, '-m', 'jaxlm', 'train',
                        f'--config={write_config(tmp_path / "c.py", config)}',
                        '--workdir=/proc/x'], cwd=ROOT, env=env(1), capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [line for line in out.stderr.splitlines() if 'error' in line]
  assert errors == [errors[0]] and "--workdir='/proc/x' is not writable" in errors[0]
  assert 'tokenizer' not in out.stderr and 'Traceback' not in out.stderr
  assert time.time() - start < 60
  assert not os.path.exists('/proc/x')


def test_the_pod_run_outlives_the_ssh_session_and_can_be_found_again(bare_path):
  """Before: the run was the SSH command itself (a dropped laptop connection killed every
  worker), jax[tpu] was unpinned and Cloud TPU autocheckpoint never asked for."""
  start = launcher('launch/tpu_pod.sh', '--name', 'lm', '--zone', 'z', '--accelerator',
                   'v4-32', '--dry-run', '--', 'train', '--workdir=gs://b/r', path=bare_path)
  assert start.returncode == 0, start.stderr
  lines = start.stdout.splitlines()
  assert lines[0].startswith('gcloud alpha compute tpus tpu-vm create lm ')
  assert lines[0].rstrip().endswith('--autocheckpoint-enabled')
  assert "jax\\[tpu\\]==0.10.2" in start.stdout
  run = next(line for line in lines if 'jaxlm\\ train' in line)
  assert 'setsid\\ nohup\\ python3' in run and '\\>\\ ~/jaxlm-logs/jaxlm.log' in run
  assert '\\&\\ echo\\ \\$\\!\\ \\>\\ ~/jaxlm-logs/jaxlm.pid' in run  # Backgrounded.
  v5p = launcher('launch/tpu_pod.sh', '--name', 'lm', '--zone', 'z', '--accelerator', 'v5p-8',
                 '--jax-version', '0.9.0', '--dry-run', '--', 'train', path=bare_path)
  assert 'autocheckpoint' not in v5p.stdout and "jax\\[tpu\\]==0.9.0" in v5p.stdout
  for action, expected in (('--logs', 'tail\\ -n\\ 20\\ ~/jaxlm-logs/jaxlm.log'),
                           ('--attach', '--worker=0 --command=tail\\ -n\\ 100\\ -F'),
                           ('--stop', 'kill\\ -TERM\\ --\\ -\\$\\(cat\\ ~/jaxlm-logs/jaxlm.pid')):
    out = launcher('launch/tpu_pod.sh', '--name', 'lm', '--zone', 'z', action, '--dry-run',
                   path=bare_path)
    assert out.returncode == 0 and expected in out.stdout, (action, out.stdout, out.stderr)


def test_a_sweep_run_that_does_not_divide_the_mesh_gets_one_it_fits():
  """Before: train.setup's ConfigError aborted the whole sweep at the first such run."""
  import jax
  from jaxlm import run, sweep
  one_head = tiny_config(model__num_heads=1, mesh__fsdp=1, mesh__tensor=8)  # 1 head, 8 ways.
  config, devices = sweep.fit_mesh(one_head, run.setup)
  assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor, len(devices)) == (1, 8, 1, 8)
  small_batch = tiny_config(batch_size=4, mesh__fsdp=1, mesh__data=-1)  # 4 rows, 8 devices.
  config, devices = sweep.fit_mesh(small_batch, run.setup)
  assert devices == jax.devices()[:4] and config.mesh.data * config.mesh.fsdp == 4
  fits = tiny_config()
  assert sweep.fit_mesh(fits, run.setup) == (fits, jax.devices())  # Left as configured.


def test_sweep_shards_by_host_run_alone_on_their_own_gpus():
  environ = slurm(8, 3, '0,1,2,3,4,5,6,7')  # Task 11 of 16, one per GPU, all GPUs visible.
  assert distributed.run_alone(environ) == (11, 16)
  assert environ['CUDA_VISIBLE_DEVICES'] == '3' and environ['JAXLM_DISTRIBUTED'] == 'off'
  assert distributed.arguments(tiny_config(), environ) is None  # Not joining the others.
  environ = slurm(1, 0, None)  # One task per node: it keeps the whole node.
  assert distributed.run_alone(environ) == (1, 2)
  assert environ['CUDA_VISIBLE_DEVICES'] == '0,1,2,3,4,5,6,7'
  assert distributed.host_shard({'JAXLM_PROCESS_ID': '1', 'JAXLM_NUM_PROCESSES': '2'}) == (1, 2)
  with pytest.raises(ConfigError, match='give each shard a slice of its own'):
    distributed.host_shard({'TPU_WORKER_HOSTNAMES': 'a,b', 'TPU_WORKER_ID': '1'})
  with pytest.raises(ConfigError, match='needs a job of several processes'):
    distributed.host_shard({})
