"""Lets XLA:CPU reuse its step buffer instead of faulting it in again every step.

XLA:CPU allocates each step's temporary buffer (555 MB for configs/llama_10m_cpu.py) with
malloc from one of its worker threads. glibc serves a request that large from a thread's
arena by mmap and unmaps it when the step ends, so every step page-faults the whole buffer
back in: 137,000 faults a step, and ~56 ms in munmap alone, of a 740 ms step. With one arena,
no mmap and no trimming, the freed buffer stays in the heap and the next step reuses it:
740 ms -> 610 ms (BENCHMARKS.md). The price is that freed host memory stays with the process,
which is why this is done only where the devices are the CPU's own.

Arenas are fixed at a thread's first allocation, so this must run before jax starts its
threads: the `jaxlm` command and the benchmarks call it first thing. JAXLM_KEEP_HOST_MEMORY=0
turns it off.
"""

import ctypes
import ctypes.util
import importlib.util
import os
import platform

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1))


def keep_host_memory():
  """Applies the settings above if jax will run on the CPU under glibc; returns whether."""
  if (os.environ.get('JAXLM_KEEP_HOST_MEMORY', '1') == '0' or _accelerator_possible()
      or platform.libc_ver()[0] != 'glibc'):
    return False
  libc = ctypes.CDLL(ctypes.util.find_library('c'))
  return all(libc.mallopt(parameter, value) == 1 for parameter, value in SETTINGS)


def _accelerator_possible():
  """Whether jax may pick a GPU or TPU: JAX_PLATFORMS names one, or (unset) a plugin for one
  is installed. Decided without importing jax, which would start its threads."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return any(p.strip() not in ('', 'cpu') for p in platforms.split(','))
  return any(importlib.util.find_spec(name) is not None for name in ('jax_plugins', 'libtpu'))
