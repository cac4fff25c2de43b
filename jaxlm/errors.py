"""The two kinds of failure the CLI reports in one line instead of a traceback."""


class ConfigError(ValueError):
  """Bad user input: a config field, a file, a command-line argument. Exit status 2."""


class RunError(RuntimeError):
  """The run's environment failed (a full disk, a dead peer process). Exit status 1."""


def first_line(e):
  """The first line of an exception's message (at most 300 characters), or its type's name."""
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else type(e).__name__


def io_reason(e):
  """What an OSError means to a user: a full disk said plainly, else the system's words."""
  import errno
  if getattr(e, 'errno', None) == errno.ENOSPC:
    return 'the disk is full'
  where = f' ({e.filename})' if getattr(e, 'filename', None) else ''
  return f'{getattr(e, "strerror", None) or first_line(e)}{where}'
