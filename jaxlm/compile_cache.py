"""The persistent XLA compilation cache: a resumed run, `eval` or `plan` loads the executables
that an earlier process compiled for the same program and devices instead of compiling again.

On by default in a user-level directory; `compile_cache_dir` in the config (or the environment
variable JAXLM_COMPILE_CACHE, read when the field is 'auto') moves it or, set to '', turns it
off. Must be set before the process compiles anything: jax decides once whether to use it.
"""

import logging
import os

log = logging.getLogger('jaxlm')

# jax caches only programs that took at least 1 s to compile; 0.2 s keeps the train and eval
# steps of small CPU models too, and still leaves out the many tiny jitted helpers.
MIN_COMPILE_S = 0.2
MAX_BYTES = 8 * 2 ** 30  # Least recently used entries are dropped beyond this.


def directory(setting):
  """The cache directory that `compile_cache_dir` names, or '' for none."""
  if setting != 'auto':
    return setting
  if 'JAXLM_COMPILE_CACHE' in os.environ:
    return os.environ['JAXLM_COMPILE_CACHE']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'jaxlm', 'xla')


def enable(config):
  """Points jax's persistent compilation cache at the configured directory (if any)."""
  path = directory(config.compile_cache_dir)
  if not path:
    return ''
  import jax
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_S)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  jax.config.update('jax_compilation_cache_max_size', MAX_BYTES)
  log.debug('compilation cache: %s', path)
  return path
