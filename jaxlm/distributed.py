"""Joining the processes of a multi-host run with JAX's own runtime (`jax.distributed`).

A pod job is the same program started on every host. When it is one of several processes,
`jax.distributed.initialize` must run before anything touches a device; then every process
sees the global device list, reads its own rows of each global batch, and XLA's collectives
do the rest. A single-process run needs none of this.

How the processes find each other, first match wins:
1. the environment: JAXLM_COORDINATOR (host:port of process 0), JAXLM_NUM_PROCESSES and
   JAXLM_PROCESS_ID, as `launch/local.sh` sets them;
2. the config: `distributed.coordinator` and `distributed.num_processes`, with the process id
   from JAXLM_PROCESS_ID or the cluster (a process's identity is not part of a run's config);
3. the cluster: Cloud TPU pods, SLURM and Open MPI jobs are detected and JAX reads their
   settings itself (JAXLM_DISTRIBUTED=auto forces this where detection cannot tell).

Under SLURM, which GPUs a process drives is decided here, not by JAX (whose default is GPU
number SLURM_LOCALID: GPU 0 alone for one task per node): see `slurm_gpus`.

Processes wait for each other (`barrier`, `on_chief`) on the coordination service that
jax.distributed starts, with explicit timeouts: a device collective would do, but on GPUs its
NCCL set-up has its own 10-minute deadline, which slow host work (tokenizing) exceeds.
"""

import itertools
import logging
import os
import re

from jaxlm.errors import ConfigError, RunError, first_line

log = logging.getLogger('jaxlm')


def _int_env(env, name):
  try:
    return int(env[name]) if env.get(name, '') != '' else None
  except ValueError:
    raise ConfigError(f'environment variable {name}={env[name]!r} must be an integer') from None


def cluster(env=None):
  """The multi-process cluster this process runs in ('tpu', 'slurm', 'mpi'), or None."""
  env = os.environ if env is None else env
  if env.get('JAXLM_DISTRIBUTED') == 'auto':
    return 'auto'
  if len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1:
    return 'tpu'
  if (_int_env(env, 'SLURM_STEP_NUM_TASKS') or _int_env(env, 'SLURM_NTASKS') or 1) > 1:
    return 'slurm'
  if (_int_env(env, 'OMPI_COMM_WORLD_SIZE') or 1) > 1:
    return 'mpi'
  return None


def arguments(config, env=None):
  """Keyword arguments for jax.distributed.initialize, or None for a single-process run."""
  env = os.environ if env is None else env
  if env.get('JAXLM_DISTRIBUTED') == 'off':  # This process runs alone (sweep --shard=host).
    return None
  d = config.distributed
  # A restarted pod worker's peers start up to a heartbeat bound (+ its restart delay) later.
  restarted = (_int_env(env, 'JAXLM_RESTART') or 0) > 0
  timeouts = dict(heartbeat_timeout_seconds=d.heartbeat_timeout_s,
                  initialization_timeout=d.heartbeat_timeout_s * (3 if restarted else 1))
  coordinator = env.get('JAXLM_COORDINATOR') or d.coordinator
  num_processes = _int_env(env, 'JAXLM_NUM_PROCESSES') or d.num_processes or None
  process_id = _int_env(env, 'JAXLM_PROCESS_ID')
  if coordinator:
    if num_processes is None:
      raise ConfigError(f'a coordinator ({coordinator}) is set but not the number of processes: '
                        f'set JAXLM_NUM_PROCESSES or distributed.num_processes')
    if process_id is None and cluster(env) is None:
      raise ConfigError('this process has no id: set JAXLM_PROCESS_ID (0 for the coordinator)')
    if process_id is not None and not 0 <= process_id < num_processes:
      raise ConfigError(f'JAXLM_PROCESS_ID={process_id} must be in [0, {num_processes})')
    return dict(coordinator_address=coordinator, num_processes=num_processes,
                process_id=process_id, **timeouts, **_devices(env))
  if cluster(env):
    return dict(timeouts, **_devices(env))  # JAX reads the cluster's own settings.
  return None


def _devices(env):
  gpus = slurm_gpus(env) if cluster(env) == 'slurm' else None
  return {} if gpus is None else {'local_device_ids': gpus[0]}


def _gpu_list(text):
  return [g for g in (text or '').split(',') if g.strip() != '']


def _tasks_on_node(env):
  """SLURM tasks on this node: SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE are per node
  in node order, run-length coded ('4(x2),3'); SLURM_NTASKS_PER_NODE is one number."""
  spec = env.get('SLURM_STEP_TASKS_PER_NODE') or env.get('SLURM_TASKS_PER_NODE')
  if spec:
    counts = []
    for part in spec.split(','):
      m = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', part.strip())
      if not m:
        raise ConfigError(f'cannot read the SLURM tasks per node {spec!r}')
      counts += [int(m[1])] * int(m[2] or 1)
    node = _int_env(env, 'SLURM_NODEID') or 0
    return counts[min(node, len(counts) - 1)]
  return _int_env(env, 'SLURM_NTASKS_PER_NODE') or 1


def slurm_gpus(env=None):
  """(local_device_ids, description) for this SLURM task, or None where it sees no GPU.

  The ids index the GPUs this process sees (CUDA_VISIBLE_DEVICES renumbers them from 0):
  - SLURM bound GPUs to tasks (each task's CUDA_VISIBLE_DEVICES lists fewer GPUs than the
    node has, e.g. --gpus-per-task or --gpu-bind): every visible GPU is this task's;
  - every task sees all the node's GPUs: they are split evenly, task SLURM_LOCALID taking
    its share (one task per node: all of them; one per GPU: its own).
  A split that leaves GPUs idle, or that does not come out even, is refused.
  """
  env = os.environ if env is None else env
  if env.get('JAX_LOCAL_DEVICE_IDS'):  # The user's own choice, which JAX reads.
    return None
  on_node = (_int_env(env, 'SLURM_GPUS_ON_NODE') or
             len(_gpu_list(env.get('SLURM_STEP_GPUS') or env.get('SLURM_JOB_GPUS'))) or None)
  visible = env.get('CUDA_VISIBLE_DEVICES')
  seen = len(_gpu_list(visible)) if visible is not None else on_node
  if not seen:
    return None
  tasks, local = _tasks_on_node(env), _int_env(env, 'SLURM_LOCALID') or 0
  where = (f'SLURM task {local} of {tasks} on its node, CUDA_VISIBLE_DEVICES='
           f'{visible if visible is not None else "(unset)"}, {on_node or "?"} GPUs on the node')
  if seen < (on_node or tasks):  # SLURM bound GPUs to tasks: these are ours.
    if on_node and seen * tasks < on_node:
      raise ConfigError(f'{where}: the {tasks} tasks drive {seen * tasks} of the node\'s '
                        f'{on_node} GPUs; start one task per GPU or give each task '
                        f'{on_node // tasks} (--gpus-per-task), or ask for fewer GPUs')
    return list(range(seen)), where
  if seen % tasks:
    raise ConfigError(f'{where}: {seen} GPUs do not split evenly over {tasks} tasks; start one '
                      f'task per node or one per GPU (--ntasks-per-node)')
  share = seen // tasks
  return list(range(local * share, (local + 1) * share)), where


def host_shard(env=None):
  """(index, count) of this process among the job's, for `jaxlm sweep --shard=host`: each
  process of a SLURM job (or of launch/local.sh, or Open MPI) trains its own share of the runs
  alone, on its own GPUs, instead of all of them training every run together."""
  env = os.environ if env is None else env
  for index, count in (('JAXLM_PROCESS_ID', 'JAXLM_NUM_PROCESSES'),
                       ('SLURM_PROCID', 'SLURM_NTASKS'),
                       ('OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE')):
    if _int_env(env, index) is not None and _int_env(env, count):
      return _int_env(env, index), _int_env(env, count)
  if cluster(env) == 'tpu':
    raise ConfigError('--shard=host: the hosts of a TPU slice share its chips; give each '
                      'shard a slice of its own (launch/tpu_pod.sh per shard, --shard=i/n)')
  raise ConfigError('--shard=host needs a job of several processes (SLURM, Open MPI or '
                    'launch/local.sh); elsewhere give --shard=i/n')


def run_alone(env=None):
  """Keeps this process out of jax.distributed and, under SLURM, on the GPUs `slurm_gpus`
  gives it (CUDA_VISIBLE_DEVICES narrowed before jax starts); returns host_shard(env)."""
  env = os.environ if env is None else env
  shard = host_shard(env)
  gpus = slurm_gpus(env) if cluster(env) == 'slurm' else None
  if gpus is not None:
    visible = (_gpu_list(env.get('CUDA_VISIBLE_DEVICES')) or
               [str(i) for i in range(max(gpus[0]) + 1)])
    env['CUDA_VISIBLE_DEVICES'] = ','.join(visible[i] for i in gpus[0])
  env['JAXLM_DISTRIBUTED'] = 'off'
  return shard


def initialize(config):
  """Joins the other processes if there are any; True if it did. Must run before jax touches
  a device."""
  kwargs = arguments(config)
  if kwargs is None:
    return False
  import jax
  _barrier_timeout[0] = config.distributed.barrier_timeout_s
  jax.distributed.initialize(**kwargs)
  if 'local_device_ids' in kwargs:
    log.info('process %d drives GPUs %s of those it sees (%s)', jax.process_index(),
                kwargs['local_device_ids'], slurm_gpus()[1])
  return True


_barrier_timeout = [3600.0]  # distributed.barrier_timeout_s of the run, set by initialize.
_barrier_count = itertools.count()  # Every process passes the same barriers in one order.


def _client():
  """jax.distributed's coordination-service client, or None (one process). jax exposes it
  only as jax._src.distributed.global_state.client (jax 0.10)."""
  import jax
  if jax.process_count() <= 1:
    return None
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state.client


def barrier(name, timeout_s=None):
  """Waits until every process gets here (a no-op for one process), at most `timeout_s`
  (default distributed.barrier_timeout_s); then a RunError naming the step waited on."""
  client = _client()
  if client is None:
    return
  import jax
  timeout_s = timeout_s or _barrier_timeout[0]
  log.info('process %d waits (at most %.0f s) until every process reaches %r',
           jax.process_index(), timeout_s, name)
  try:
    client.wait_at_barrier(f'{name} #{next(_barrier_count)}', int(timeout_s * 1000))
  except Exception as e:  # noqa: BLE001 - jax raises its runtime error type for a timeout.
    raise RunError(f'process {jax.process_index()} waited {timeout_s:.0f} s for the other '
                   f'processes to reach {name!r} and gave up ({first_line(e)}); if that step '
                   f'is slow, raise distributed.barrier_timeout_s') from e


def on_chief(name, check, timeout_s=None):
  """Runs `check` (raising ConfigError to refuse) on process 0 alone and raises its error on
  every process: one host probes the workdir, the others learn the answer."""
  client = _client()
  if client is None:
    check()
    return
  import jax
  key = f'jaxlm/{name} #{next(_barrier_count)}'
  if jax.process_index() == 0:
    try:
      check()
    except Exception as e:  # The others must not wait for an answer that never comes.
      config_error = isinstance(e, ConfigError)
      client.key_value_set(key, f'{config_error:d}{str(e) if config_error else first_line(e)}')
      raise
    client.key_value_set(key, '')
    return
  timeout_s = timeout_s or _barrier_timeout[0]
  try:
    error = client.blocking_key_value_get(key, int(timeout_s * 1000))
  except Exception as e:  # noqa: BLE001 - a timeout: process 0 is gone or stuck.
    raise RunError(f'process {jax.process_index()} waited {timeout_s:.0f} s for process 0 to '
                   f'finish {name!r} and gave up ({first_line(e)})') from e
  if error:  # '1' + a ConfigError's message, or '0' + the first line of another error.
    if error[0] == '1':
      raise ConfigError(error[1:])
    raise RunError(f'process 0 failed at {name!r}: {error[1:]}')
