"""Lets XLA:CPU reuse its step buffer instead of faulting it in again every step.

XLA:CPU allocates each step's temporary buffer (555 MB for configs/llama_10m_cpu.py) with
malloc from one of its worker threads. glibc serves a request that large from the thread's own
arena by mmap and unmaps it when the step ends, so every step page-faults the whole buffer back
in: 137,000 faults and ~56 ms in munmap alone a step. With one arena, no mmap and no trimming,
the freed buffer stays in the heap and the next step reuses it: 776-844 ms -> 607-698 ms a step
on llama_10m_cpu (BENCHMARKS.md). The price is that freed host memory stays with the process,
which is why this is done only where jax runs on the CPU.

Limits: a thread that has allocated before keeps its arena, so this must run while the process
has one thread (the `jaxlm` command and the benchmarks call it first thing; otherwise nothing
is changed); and mallopt's trim threshold is an int, so a step buffer above 2 GiB is still
handed back each step. JAXLM_KEEP_HOST_MEMORY=0 turns it off.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import platform

# glibc's mallopt parameters (malloc.h), and the values that keep freed memory.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1))


def keep_host_memory():
  """Applies the settings above if jax will run on the CPU, under glibc, and no other thread
  exists yet; returns whether they were applied."""
  if (os.environ.get('JAXLM_KEEP_HOST_MEMORY', '1') == '0' or _accelerator_possible()
      or platform.libc_ver()[0] != 'glibc' or _threads() != 1):
    return False
  libc = ctypes.CDLL(None)  # The process's own libc: no library search at start-up.
  return all([libc.mallopt(parameter, value) == 1 for parameter, value in SETTINGS])


def _threads():
  try:
    return len(os.listdir('/proc/self/task'))
  except OSError:
    return 0  # Unknown: do nothing.


def _accelerator_possible():
  """Whether jax may pick a GPU or TPU: JAX_PLATFORMS names one, or (unset) a PJRT plugin or
  libtpu is installed where jax looks for them. Decided without importing jax, which would
  start its threads."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return any(p.strip() not in ('', 'cpu') for p in platforms.split(','))
  return (bool(os.environ.get('TPU_LIBRARY_PATH'))
          or any(importlib.util.find_spec(name) is not None for name in ('jax_plugins', 'libtpu'))
          or bool(importlib.metadata.entry_points(group='jax_plugins')))
