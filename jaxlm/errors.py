"""The two kinds of failure the CLI reports in one line instead of a traceback."""


class ConfigError(ValueError):
  """Bad user input: a config field, a file, a command-line argument. Exit status 2."""


class RunError(RuntimeError):
  """The run's environment failed (a full disk, a dead peer process). Exit status 1."""
