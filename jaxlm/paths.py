"""Every location a user gives jaxlm: a local path or an object-store URL (gs://, s3://...).

One layer over `etils.epath` (fsspec/gcsfs underneath for gs://), so that the workdir,
checkpoints, metrics, tokenizer, token cache, data globs, init_from and convert's directories
all work on a bucket as on a disk. `os.path` must never see a URL: `os.path.abspath('gs://b/r')`
is '<cwd>/gs:/b/r', a local directory on each host.

Local paths are made absolute (Orbax reads only absolute paths) and user-expanded; URLs are
kept as given. Atomic writes: locally a temporary file, fsynced, renamed into place; on an
object store a single object write is already atomic (readers see the old object or the new).
"""

import builtins
import contextlib
import errno
import glob as glob_lib
import io
import os
import shutil
import socket
import stat
import tempfile

import fsspec
import fsspec.config
from etils import epath

from jaxlm.errors import ConfigError

_WILDCARDS = '*?['
# Other writers share the bucket (tensorstore under Orbax, the other hosts): a directory
# listing cached by gcsfs would hide their files from this process for good.
fsspec.config.conf.setdefault('gcs', {}).setdefault('use_listings_cache', False)


def is_remote(location):
  """Whether `location` is a URL (gs://bucket/...), not a local path."""
  return '://' in str(location)


def normalize(location):
  """A local path made absolute (and ~ expanded), a URL without its trailing '/'."""
  location = str(location)
  if is_remote(location):
    scheme, rest = location.split('://', 1)
    return f'{scheme}://{rest.rstrip("/")}'
  return os.path.abspath(os.path.expanduser(location))


def path(location):
  """An epath.Path for `location` (normalized)."""
  return epath.Path(normalize(location))


def filesystem(location):
  """(fsspec filesystem, its name for the object) of a URL: for what epath does not offer,
  such as a write with a precondition or an object's metadata."""
  return fsspec.core.url_to_fs(normalize(location))


def join(location, *parts):
  return str(path(location).joinpath(*parts))


def name(location):
  return path(location).name


def parent(location):
  return str(path(location).parent)


def exists(location):
  return path(location).exists()


def isdir(location):
  return path(location).is_dir()


def isfile(location):
  """Whether `location` is a file to read: locally a regular one (not a FIFO, socket or
  device, whose reads block or never end)."""
  if not is_remote(location):
    return os.path.isfile(normalize(location))
  p = path(location)
  return p.exists() and not p.is_dir()


def require_utf8(location, what):
  """A ConfigError unless `location` is valid UTF-8: a name the operating system handed over
  in bytes (surrogate escapes) that Orbax, tensorstore or safetensors cannot take."""
  try:
    str(location).encode('utf-8')
  except UnicodeEncodeError:
    raise ConfigError(f'{what}={location!r} is not valid UTF-8, which checkpoints and '
                      f'tensorstore need; rename it') from None


def check_output_file(location, what):
  """A ConfigError unless a file can be written at `location` (before the work that makes
  it): not a directory nor a special file, in a folder that exists."""
  if not location or is_remote(location):
    return
  full = normalize(location)
  if os.path.isdir(full):
    raise ConfigError(f'{what}={location} is a directory; give a file name')
  if os.path.exists(full) and not os.path.isfile(full):
    raise ConfigError(f'{what}={location} is not a regular file')
  folder = os.path.dirname(full)
  if not os.path.isdir(folder):
    raise ConfigError(f'{what}={location}: its folder {folder} does not exist')
  if not os.access(folder, os.W_OK):
    raise ConfigError(f'{what}={location}: its folder {folder} is not writable')


def size(location):
  return path(location).stat().length


def signature(location):
  """(size, modification time) of a file: what changes when it is rewritten."""
  if not is_remote(location):
    st = os.stat(normalize(location))
    return st.st_size, st.st_mtime_ns
  st = path(location).stat()
  return st.length, st.mtime


def common_dir(files):
  """The deepest directory holding every one of `files` (locations of files)."""
  if not is_remote(files[0]):
    return os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
  return '/'.join(os.path.commonprefix([f.split('/')[:-1] for f in files]))


def relative(location, root):
  """`location` relative to the directory `root` above it."""
  if not is_remote(location):
    return os.path.relpath(location, root)
  return location[len(root):].lstrip('/')


def listdir(location):
  return sorted(p.name for p in path(location).iterdir())


def makedirs(location):
  """Creates a directory and its parents (on an object store, directories are implicit)."""
  if not is_remote(location):
    os.makedirs(normalize(location), exist_ok=True)


def open(location, mode='r', encoding=None, newline=None):  # noqa: A001 - this layer's open.
  if not is_remote(location):
    if 'r' in mode:  # Opening a FIFO blocks until a writer comes, and a device never ends.
      _must_be_regular(normalize(location))
    return builtins.open(normalize(location), mode, encoding=encoding, newline=newline)
  binary = path(location).open(mode if 'b' in mode else mode + 'b')
  if 'b' in mode:
    return binary
  return io.TextIOWrapper(binary, encoding=encoding or 'utf-8', newline=newline)


def _must_be_regular(local):
  try:
    mode = os.stat(local).st_mode
  except OSError:
    return  # Missing or unreadable: open() says so.
  if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
    raise OSError(errno.EINVAL, 'not a regular file (a FIFO, socket or device)', local)


def read_bytes(location):
  with open(location, 'rb') as f:
    return f.read()


def read_text(location):
  return read_bytes(location).decode('utf-8')


def crc32c(location):
  """The CRC-32C of a file's bytes, read in chunks (not memory-mapped: the pages stay out of
  the process). On GCS the object's own CRC-32C from its metadata, without reading it."""
  import google_crc32c  # With gcsfs (google-cloud-storage needs it); a C implementation.
  if is_remote(location):
    fs, name = filesystem(location)
    stored = fs.info(name).get('crc32c')
    if stored:
      import base64
      return int.from_bytes(base64.b64decode(stored), 'big')
  crc = 0
  with open(location, 'rb') as f:
    while chunk := f.read(1 << 24):
      crc = google_crc32c.extend(crc, chunk)
  return crc


def glob(pattern):
  """Sorted locations matching a glob (`**` matches any depth), files and directories."""
  if not is_remote(pattern):
    return sorted(glob_lib.glob(os.path.expanduser(pattern.strip()), recursive=True))
  pattern = normalize(pattern)
  scheme, rest = pattern.split('://', 1)
  parts = rest.split('/')
  fixed = next((i for i, p in enumerate(parts) if any(c in p for c in _WILDCARDS)), len(parts))
  base = path(f'{scheme}://{"/".join(parts[:max(fixed, 1)])}')
  if fixed == len(parts):
    return [str(base)] if base.exists() else []
  return sorted(str(p) for p in base.glob('/'.join(parts[fixed:])))


def files_under(location):
  """Every file below a directory, at any depth, as sorted locations (on a bucket one
  recursive listing: gcsfs refuses a `**` glob there)."""
  if not is_remote(location):
    root = normalize(location)
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)
  scheme = location.split('://', 1)[0]
  fs = fsspec.filesystem(scheme)
  return sorted(f'{scheme}://{p}' for p in fs.find(normalize(location)))


def atomic_write(location, data):
  """Writes `data` (str or bytes) so that readers see the old file or the new one, never
  part of one; locally it is also on disk (fsynced) when this returns."""
  with atomic_file(location) as f:
    f.write(data.encode('utf-8') if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_file(location):
  """A binary file to write that appears at `location` whole, when the block ends without
  an error. Locally: a temporary file, fsynced, renamed into place. On an object store the
  object is uploaded at close, in one atomic write."""
  if is_remote(location):
    f = path(location).open('wb')
    try:
      yield f
    except BaseException:
      getattr(f, 'discard', lambda: None)()  # fsspec: cancel an upload under way...
      f.closed = True  # ...and upload nothing at close.
      raise
    f.close()
    return
  location = normalize(location)
  tmp = f'{location}.tmp.{socket.gethostname()}.{os.getpid()}'
  try:
    with builtins.open(tmp, 'wb') as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, location)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  _fsync_dir(os.path.dirname(location))


def remove_abandoned_temporaries(location):
  """Removes the temporary files of atomic writes to a local `location` whose writer has
  exited on this host (a process killed while writing). Another live writer's are kept:
  two commands may write the same file at once (two `jaxlm tokenize` on one workdir)."""
  if is_remote(location):
    return
  for tmp in glob_lib.glob(glob_lib.escape(normalize(location)) + '.tmp.*'):
    *host, pid = tmp.rsplit('.tmp.', 1)[1].rsplit('.', 1)
    if host and host[0] != socket.gethostname() or not pid.isdigit():
      continue  # Another machine's, or not ours at all.
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      try:
        os.remove(tmp)
      except FileNotFoundError:
        pass
    except (PermissionError, OverflowError):
      pass


def _fsync_dir(directory):
  """Makes a rename in a local directory durable (a no-op where directories cannot be
  opened)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def rename(src, dst):
  """Moves a file or directory (on an object store: a copy of every object, then a delete)."""
  if not is_remote(src):
    os.replace(normalize(src), normalize(dst))
  else:
    path(src).rename(path(dst))


def remove(location):
  path(location).unlink()


@contextlib.contextmanager
def local_dir(location):
  """A local directory with the files of `location`: itself if local, else a temporary copy
  of its files, for readers that open local files only (safetensors)."""
  if not is_remote(location):
    yield normalize(location)
    return
  with tempfile.TemporaryDirectory(prefix='jaxlm-') as tmp:
    for p in path(location).iterdir():
      if not p.is_dir():  # Streamed: a checkpoint's files may not fit in memory.
        with p.open('rb') as f, builtins.open(os.path.join(tmp, p.name), 'wb') as out:
          shutil.copyfileobj(f, out, 1 << 24)
    yield tmp

