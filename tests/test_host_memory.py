"""host_memory: on the CPU backend a freed large block is reused, not faulted in again.

Each case runs in a fresh process, since the allocator's arenas are fixed at first use.
"""

import importlib.util
import json
import os
import platform
import re
import subprocess
import sys

import pytest

from jaxlm import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates and frees a 200 MB block three times from a worker thread, as XLA:CPU does its
# step buffer, counting the thread's page faults each time; then runs a jitted function (on
# the CPU) and lets glibc print its arenas (malloc_stats, on stderr).
PROGRAM = '''
import ctypes, json, os, resource, sys, threading
from jaxlm import host_memory
applied = host_memory.keep_host_memory()
import numpy as np
faults = []
def work():
  for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    block = np.ones(50_000_000, np.float32)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
if os.environ['JAX_PLATFORMS'] == 'cpu':
  import jax, jax.numpy as jnp
  jax.jit(lambda x: x @ x)(jnp.ones((512, 512))).block_until_ready()
print(json.dumps({'applied': applied, 'faults': faults}), flush=True)
sys.stderr.flush()
ctypes.CDLL(None).malloc_stats()
'''


def run(**env):
  environ = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'LD_PRELOAD')}
  environ.update({'JAX_PLATFORMS': 'cpu', **env})
  out = subprocess.run([sys.executable, '-c', PROGRAM], env=environ, capture_output=True,
                       text=True, check=True, cwd=ROOT)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  result['arenas'] = len(re.findall(r'^Arena \d+:', out.stderr, re.M))
  return result


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='tunes glibc malloc only')
def test_freed_blocks_are_reused_on_cpu():
  kept = run()
  # One arena for every thread, XLA's included; later blocks reuse the first one's pages.
  assert kept['applied'] and kept['arenas'] == 1, kept
  assert max(kept['faults'][1:]) < 50, kept
  # Off (by the variable, or where an accelerator may run): each block is faulted in again.
  for env in ({'JAXLM_KEEP_HOST_MEMORY': '0'}, {'JAX_PLATFORMS': 'cuda'}):
    default = run(**env)
    assert not default['applied'] and default['arenas'] > 1, (env, default)
    assert min(default['faults']) > 100, (env, default)  # 284 here, with huge pages.


def test_accelerator_detection(monkeypatch):
  """Nothing changes where jax may pick a GPU or TPU: named in JAX_PLATFORMS, or, unset, a
  PJRT plugin or libtpu installed."""
  for platforms, expected in (('cpu', False), ('cuda', True), ('cpu,tpu', True)):
    monkeypatch.setenv('JAX_PLATFORMS', platforms)
    assert host_memory._accelerator_possible() == expected, platforms
  monkeypatch.delenv('JAX_PLATFORMS')
  monkeypatch.delenv('TPU_LIBRARY_PATH', raising=False)
  real = importlib.util.find_spec
  # A machine without libtpu (the test extra installs it, for `plan --topology`): CPU alone.
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name in ('libtpu', 'jax_plugins') else real(name, *a))
  assert not host_memory._accelerator_possible()
  monkeypatch.setenv('TPU_LIBRARY_PATH', '/opt/libtpu.so')
  assert host_memory._accelerator_possible()
  monkeypatch.delenv('TPU_LIBRARY_PATH')
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: object() if name == 'jax_plugins' else real(name, *a))
  assert host_memory._accelerator_possible()
  assert not host_memory.keep_host_memory()
