"""One `train` per workdir: a lock file, `<workdir>/lock.json`, naming its holder.

Why a lock file rather than flock: it must work where the workdir is, and a gs:// bucket has
no advisory locks. Locally the file is created with O_CREAT | O_EXCL (atomic on every local
and NFSv3+ file system), so of two processes exactly one succeeds. On a bucket the object is
written with a does-not-exist precondition (GCS `if_generation_match=0`) when the filesystem
offers one, and otherwise written and read back (best effort, documented in the README).

A lock outlives a process that is killed (SIGKILL, a lost machine). It is stale, and taken
over, when its holder is provably gone: a process id that no longer exists on this host, or
no heartbeat (the holder rewrites the file's time every HEARTBEAT_S) for STALE_S.
"""

import json
import logging
import os
import socket
import threading
import time

from jaxlm import paths
from jaxlm.errors import ConfigError

log = logging.getLogger('jaxlm')
NAME = 'lock.json'
HEARTBEAT_S = 60
STALE_S = 600


class Lock:
  """A held workdir lock; `release()` (idempotent) removes it and stops the heartbeat."""

  def __init__(self, path, token):
    self.path, self.token = path, token
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, daemon=True, name='jaxlm-lock')
    self._thread.start()

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      try:
        paths.atomic_write(self.path, json.dumps(dict(self.token, time=time.time())))
      except OSError as e:  # A missed heartbeat only makes the lock look stale sooner.
        log.debug('lock heartbeat failed: %s', e)

  def release(self):
    if self._stop.is_set():
      return
    self._stop.set()
    self._thread.join()  # A heartbeat under way must not write the file back after us.
    try:
      if _holder(self.path).get('id') == self.token['id']:
        paths.remove(self.path)
    except (OSError, ValueError):
      pass


def acquire(workdir):
  """Takes the workdir's lock, or raises a one-line ConfigError naming its holder."""
  paths.makedirs(workdir)
  path = paths.join(workdir, NAME)
  token = {'id': f'{socket.gethostname()}:{os.getpid()}:{time.time_ns()}',
           'host': socket.gethostname(), 'pid': os.getpid(), 'time': time.time()}
  for _ in range(2):  # The second try follows the removal of a stale lock.
    if _create(path, json.dumps(token)):
      return Lock(path, token)
    holder = _holder(path)
    reason = _stale(holder)
    if reason is None:
      since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('time', 0)))
      raise ConfigError(
          f'--workdir={workdir} is in use by process {holder.get("pid")} on '
          f'{holder.get("host")} (heartbeat {since}); wait for it to finish, or remove '
          f'{path} if that process is gone')
    log.warning('taking over the lock of %s: %s', workdir, reason)
    try:
      paths.remove(path)
    except FileNotFoundError:
      pass
  raise ConfigError(f'--workdir={workdir}: another process took the lock {path} first')


def _create(path, text):
  """Creates the file only if it does not exist; whether this call created it."""
  if paths.is_remote(path):
    return _create_remote(path, text)
  try:
    fd = os.open(paths.normalize(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  return True


def _create_remote(path, text):
  fs = getattr(paths.path(path), 'fs', None)
  if fs is not None and hasattr(fs, 'pipe_file'):
    try:  # gcsfs: a precondition makes the write fail if the object exists.
      fs.pipe_file(path, text.encode(), if_generation_match=0)
      return True
    except TypeError:
      pass  # A filesystem without preconditions: the best-effort path below.
    except Exception:  # noqa: BLE001 - the precondition failed: someone holds it.
      return False
  if paths.exists(path):
    return False
  paths.atomic_write(path, text)
  return json.loads(paths.read_text(path)).get('id') == json.loads(text)['id']


def _holder(path):
  try:
    holder = json.loads(paths.read_text(path))
    return holder if isinstance(holder, dict) else {}
  except (OSError, ValueError):
    return {}  # Half-written or garbage: judged by its age alone (time 0: stale).


def _stale(holder):
  """Why the holder is provably gone, or None if it may still be running."""
  if holder.get('host') == socket.gethostname() and isinstance(holder.get('pid'), int):
    try:
      os.kill(holder['pid'], 0)
    except ProcessLookupError:
      return f'process {holder["pid"]} on this host has exited'
    except PermissionError:
      pass  # It exists, under another user.
    return None
  age = time.time() - float(holder.get('time', 0) or 0)
  if age > STALE_S:
    return f'no heartbeat from {holder.get("host")} for {age:.0f} s'
  return None
