"""host_memory: on the CPU backend a freed large block is reused, not faulted in again.

Each case runs in a fresh process, since the allocator's arenas are fixed at first use.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

# Allocates and frees a 200 MB block three times from a worker thread, as XLA:CPU does its
# step buffer, counting the thread's page faults each time.
PROGRAM = '''
import json, resource, threading
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
print(json.dumps({'applied': applied, 'faults': faults}))
'''


def run(**env):
  environ = {**os.environ, 'JAX_PLATFORMS': 'cpu', **env}
  out = subprocess.run([sys.executable, '-c', PROGRAM], env=environ, capture_output=True,
                       text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='tunes glibc malloc only')
def test_freed_blocks_are_reused_on_cpu():
  kept = run()
  assert kept['applied'] and kept['faults'][1:] == [0, 0], kept
  # Off (by the variable, or where an accelerator may run): each block is faulted in again.
  for env in ({'JAXLM_KEEP_HOST_MEMORY': '0'}, {'JAX_PLATFORMS': 'cuda'}):
    default = run(**env)
    assert not default['applied'] and min(default['faults']) > 0, (env, default)
