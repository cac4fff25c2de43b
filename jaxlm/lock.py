"""One `train` per workdir: a lock file, `<workdir>/lock.json`, naming its holder.

Why a lock file rather than flock: it must work where the workdir is, and a gs:// bucket has
no advisory locks. Taking the lock, and taking over a stale one, are atomic, so that of any
number of processes starting at once exactly one holds it:

- Locally the lock is written whole to a temporary file, then hard-linked to lock.json, which
  fails if lock.json exists (atomic on every local file system and NFS). So lock.json is never
  empty or half-written, and a full disk leaves none. Where hard links are not supported
  (some FUSE mounts) it is created with O_EXCL and written, and an unreadable lock is then
  judged by its file's age. A stale lock is replaced in place, by a rename over it, so that
  lock.json never disappears and no creator can slip in between; the one process that may do
  so is the one holding `lock.json.takeover` (taken the same way, for milliseconds), and it
  judges the lock stale again once it holds it.
- On GCS the object is created with a does-not-exist precondition, and a stale one is deleted
  with a precondition on its generation (only the version judged stale goes), so that of the
  starters the one creation that follows succeeds. Other object stores: written and read
  back, best effort (documented in the README).

A lock outlives a process that is killed (SIGKILL, a lost machine). It is stale, and taken
over, when its holder is provably gone: a process id that no longer exists on this host, or
no heartbeat (the holder rewrites the file's time every HEARTBEAT_S) for STALE_S.
"""

import json
import logging
import math
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
CLAIM_STALE_S = 30  # A takeover holds its claim for milliseconds.
CLAIM_WAIT_S = 10  # How long a starter waits for another's takeover to finish.


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
        if _holder(self.path).get('id') != self.token['id']:
          log.warning('the lock %s was taken over by another process (this one was judged '
                      'gone); stop one of the two runs', self.path)
          return
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
  token = _token()
  text = json.dumps(token)
  deadline = time.monotonic() + CLAIM_WAIT_S
  while time.monotonic() < deadline:
    if _create(path, text):
      return Lock(path, token)
    seen = _read(path)
    if seen is None:
      continue  # Released in the meantime: try creating it again.
    holder, version = seen
    reason = _stale(holder, version)
    if reason is None:
      since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(_time(holder, version)))
      who = (f'process {holder["pid"]} on {holder["host"]} (heartbeat {since})'
             if {'pid', 'host'} <= holder.keys() else
             f'another process (its {NAME} names no valid holder; written {since})')
      raise ConfigError(f'--workdir={workdir} is in use by {who}; wait for it to finish, or '
                        f'remove {path} if that process is gone')
    if _take_over(path, version, text, reason):
      return Lock(path, token)
    time.sleep(0.01)  # Another starter's takeover is under way: read the lock again.
  raise ConfigError(f'--workdir={workdir}: another process is taking over the stale lock '
                    f'{path}; try again in a minute')


def _token():
  return {'id': f'{socket.gethostname()}:{os.getpid()}:{time.time_ns()}',
          'host': socket.gethostname(), 'pid': os.getpid(), 'time': time.time()}


def _create(path, text):
  """Creates the file, whole, only if it does not exist; whether this call created it."""
  if paths.is_remote(path):
    return _create_remote(path, text)
  path = paths.normalize(path)
  tmp = f'{path}.new.{os.getpid()}.{time.time_ns()}'
  try:
    with open(tmp, 'x') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(tmp, path)
      return True
    except FileExistsError:
      return False
    except OSError:  # No hard links here: exclusive creation, written after.
      return _create_exclusive(path, text)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _create_exclusive(path, text):
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    os.remove(path)  # A full disk must not leave an empty lock behind.
    raise
  return True


def _create_remote(path, text):
  fs, name = paths.filesystem(path)
  if hasattr(fs, 'call'):
    try:  # gcsfs: a does-not-exist precondition (ifGenerationMatch=0).
      fs.pipe_file(name, text.encode(), mode='create')
    except FileExistsError:
      return False
    except TypeError:
      pass  # A filesystem without preconditions: the best-effort path below.
    else:
      return _holder(path).get('id') == json.loads(text)['id']
  if paths.exists(path):
    return False
  paths.atomic_write(path, text)
  return _holder(path).get('id') == json.loads(text)['id']


def _read(path):
  """(holder dict, version) of the lock file, or None if there is none. The version tells one
  write from another: (inode, mtime, size) locally, the generation on GCS. A holder that is
  not readable JSON is {} (judged by the file's age)."""
  try:
    if paths.is_remote(path):
      fs, name = paths.filesystem(path)
      info = fs.info(name)
      version = (info.get('generation'), _mtime(info))
    else:
      st = os.stat(paths.normalize(path))
      version = (st.st_ino, st.st_mtime_ns, st.st_size)
  except FileNotFoundError:
    return None
  return _holder(path), version


def _mtime(info):
  updated = info.get('updated') or info.get('mtime')
  if hasattr(updated, 'timestamp'):
    return updated.timestamp()
  try:
    return time.mktime(time.strptime(str(updated)[:19], '%Y-%m-%dT%H:%M:%S')) - time.timezone
  except (TypeError, ValueError):
    return 0.0


def _holder(path):
  """The lock's fields, each of its kind or dropped: odd values (a pid as text, a time that
  is not a number) are judged as if absent, never trusted."""
  try:
    holder = json.loads(paths.read_text(path))
  except (OSError, ValueError):
    return {}  # Half-written by another tool, or garbage: judged by the file's age.
  if not isinstance(holder, dict):
    return {}
  kinds = {'id': str, 'host': str, 'pid': int, 'time': (int, float)}
  clean = {k: v for k, v in holder.items()
           if k in kinds and isinstance(v, kinds[k]) and not isinstance(v, bool)}
  if not 0 < clean.get('pid', 1) < 2 ** 31:
    clean.pop('pid')
  if not math.isfinite(clean.get('time', 0)):
    clean.pop('time')
  return clean


def _time(holder, version):
  """When the holder last showed life: its heartbeat, else the file's modification time."""
  if 'time' in holder:
    return holder['time']
  if isinstance(version[1], int):  # Local: nanoseconds.
    return version[1] / 1e9
  return version[1] or 0.0


def _stale(holder, version, limit=STALE_S):
  """Why the holder is provably gone, or None if it may still be running."""
  if holder.get('host') == socket.gethostname() and 'pid' in holder:
    try:
      os.kill(holder['pid'], 0)
    except ProcessLookupError:
      return f'process {holder["pid"]} on this host has exited'
    except PermissionError:
      pass  # It exists, under another user.
    return None
  age = time.time() - _time(holder, version)
  if age > limit:
    return f'no heartbeat from {holder.get("host", "an unknown host")} for {age:.0f} s'
  return None


def _take_over(path, version, text, reason):
  """Replaces the stale lock of `version` with ours; whether this process now holds it.
  False when another starter is taking it over or took it (the caller reads it again)."""
  if paths.is_remote(path):
    _delete_version(path, version)
    return False  # The caller creates it again, with its precondition: one creator wins.
  claim = f'{path}.takeover'
  if not _create(claim, json.dumps(_token())):
    seen = _read(claim)
    if seen is not None and _stale(*seen, limit=CLAIM_STALE_S):
      _remove_if_unchanged(claim, seen[1])  # Its taker died within its milliseconds.
    return False
  try:
    seen = _read(path)
    if seen is None or seen[1] != version or _stale(*seen) is None:
      return False  # Taken over (or released) since we judged it: judge it again.
    log.warning('taking over the lock of %s: %s', paths.parent(path), reason)
    paths.atomic_write(path, text)  # A rename over it: lock.json never disappears.
    return True
  finally:
    paths.remove(claim)


def _remove_if_unchanged(path, version):
  """Removes a local file if it is still the one of `version` (renamed aside and checked, so
  that a file written in the meantime is put back, not lost)."""
  aside = f'{path}.stale.{os.getpid()}.{time.time_ns()}'
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return
  st = os.stat(aside)
  if (st.st_ino, st.st_mtime_ns, st.st_size) != version:
    try:
      os.link(aside, path)
    except OSError:
      pass
  os.remove(aside)


def _delete_version(path, version):
  """Deletes the lock object only if it is still the version judged stale (GCS: a generation
  precondition); elsewhere, deletes it."""
  fs, name = paths.filesystem(path)
  generation = version[0]
  try:
    if hasattr(fs, 'call') and generation:
      bucket, key = name.split('/', 1)
      fs.call('DELETE', 'b/{}/o/{}', bucket, key, ifGenerationMatch=str(generation))
    else:
      paths.remove(path)
  except (FileNotFoundError, FileExistsError):
    pass  # Already gone, or replaced by a newer version: not ours to delete.
