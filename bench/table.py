"""The markdown table every benchmark prints, ready to paste into BENCHMARKS.md."""


def print_table(rows, float_format=',.4g'):
  """Prints dicts with the same keys as a markdown table: keys as the header, floats in
  `float_format`, ints with thousands separators, anything else as str()."""
  def cell(v):
    if isinstance(v, float):
      return format(v, float_format)
    return f'{v:,}' if isinstance(v, int) and not isinstance(v, bool) else str(v)

  print('| ' + ' | '.join(rows[0]) + ' |')
  print('|' + '---|' * len(rows[0]))
  for row in rows:
    print('| ' + ' | '.join(cell(v) for v in row.values()) + ' |')


def save_figure(fig, path, dpi=110):
  """Writes a matplotlib figure to `path` (its directory made if needed) and closes it."""
  import os

  from matplotlib import pyplot as plt
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
