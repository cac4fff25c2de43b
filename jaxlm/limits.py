"""Every size is checked against the memory it needs before anything is allocated.

A config or a flag can ask for more memory than the machine has (batch_size=10**12, a
parameter table of 10**10 rows, a key/value cache for 10**8 new tokens). Allocating it
anyway ends in the kernel's OOM killer - no message, and on a shared machine sometimes
another process killed - or in a traceback from deep inside XLA. Each allocation of a size
the user chose is first compared here with what it will take: host memory for what the host
holds (batches read ahead, parameters being converted, the tokenizer's sample), and the
device's memory for what lives there (the train state, a compiled step's buffers, a decoding
cache); on a CPU the devices are the host. Too much is a ConfigError naming the field to
change. Only a size that cannot fit is refused: the figures are the arrays' own bytes, so a
run that passes may still be short by what the runtime adds.
"""

import os

from jaxlm.errors import ConfigError

GiB = 2 ** 30


def host_bytes():
  """The memory this process may use: the machine's, or its container's limit if lower."""
  total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  for path in ('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes'):
    try:
      with open(path) as f:
        text = f.read().strip()
    except OSError:
      continue
    if text.isdigit():
      total = min(total, int(text))
  return total


def device_bytes(device):
  """A device's memory (on a CPU: the host's), or None where the runtime does not say."""
  if device.platform == 'cpu':
    return host_bytes()
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001 - backends without memory statistics raise various errors.
    return None
  return stats.get('bytes_limit')


def check_host(need, what, advice):
  """A ConfigError if `need` bytes held by this process exceed the host's memory."""
  have = host_bytes()
  if need > have:
    raise ConfigError(f'{what} needs {_size(need)} of host memory, more than the {_size(have)} '
                      f'this machine has; {advice}')


def check_devices(per_device, devices, what, advice):
  """A ConfigError if `per_device` bytes on each of `devices` exceed a device's memory (the
  CPU devices of this process share the host's)."""
  device = devices[0]
  have = device_bytes(device)
  if have is None:
    return
  local = [d for d in devices if d.process_index == device.process_index]
  need = per_device * (len(local) if device.platform == 'cpu' else 1)
  if need > have:
    where = (f'{len(local)} CPU devices sharing {_size(have)} of host memory'
             if device.platform == 'cpu' else f'{_size(have)} per {device.device_kind}')
    raise ConfigError(f'{what} needs {_size(per_device)} per device, more than the {where}; '
                      f'{advice}')


def row_bytes(config):
  return config.model.max_len * 4 * 4  # int32 tokens, positions, segment ids, a label.


def check_batches(config, process_count=1):
  """The batches one process holds at once: those read ahead (data.prefetch, one per reading
  thread, the one being built and the one on the device)."""
  rows = config.batch_size // max(1, process_count)
  check_host(rows * (config.data.prefetch + config.data.num_threads + 2) * row_bytes(config),
             f'batch_size={config.batch_size} x model.max_len={config.model.max_len} '
             f'(data.prefetch={config.data.prefetch} batches ahead)',
             'lower batch_size (optimizer.grad_accum_steps splits a batch on the device, not '
             'on the host) or data.prefetch')


def check_eval_set(config, rows):
  """The held-out batches, held for the whole run: `rows` of them (eval_batches is capped by
  the split's size, so only the rows there are count)."""
  check_host(rows * row_bytes(config), f'eval_batches={config.eval_batches} x batch_size='
             f'{config.batch_size} held-out rows', 'lower eval_batches')


def _size(n):
  return f'{n / GiB:.3g} GiB' if n >= 2 ** 20 else f'{n:,} bytes'
