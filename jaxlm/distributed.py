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
"""

import os

from jaxlm.errors import ConfigError


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
  d = config.distributed
  timeouts = dict(heartbeat_timeout_seconds=d.heartbeat_timeout_s,
                  initialization_timeout=d.heartbeat_timeout_s)
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
                process_id=process_id, **timeouts)
  if cluster(env):
    return timeouts  # JAX reads the cluster's own settings.
  return None


def initialize(config):
  """Joins the other processes if there are any; True if it did. Must run before jax touches
  a device."""
  kwargs = arguments(config)
  if kwargs is None:
    return False
  import jax
  jax.distributed.initialize(**kwargs)
  return True


def barrier(name):
  """Waits until every process gets here (a no-op for one process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
