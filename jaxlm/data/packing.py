"""Packing a token stream into fixed-length rows with segment ids and positions.

Two ways, both random-access and using every token exactly once:
- concatenate-and-split (`PackedRows`): row i is tokens [i*T, (i+1)*T) of the stream; no
  padding, but most documents are cut across two rows.
- first-fit decreasing (`FirstFitRows`): documents longer than T are cut into T-token pieces,
  then pieces, longest first, go into the first row with room; a row's tail is padding. Far
  fewer documents are cut, at the price of some padding.
Segment ids number the documents within a row (from 1; 0 is padding) so attention and the loss
never cross a document boundary, and positions restart at each document (or at the row start
when a document continues from the previous row), so they never exceed T.
"""

import numpy as np


class PackedRows:
  """Random-access rows {'tokens', 'segment_ids', 'positions'}, each int32 [seq_len]."""

  def __init__(self, stream, seq_len):
    self.stream = stream
    self.seq_len = seq_len

  def __len__(self):
    return len(self.stream.tokens) // self.seq_len

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(index)
    start = index * self.seq_len
    span = np.arange(start, start + self.seq_len)
    doc = np.searchsorted(self.stream.starts, span, side='right') - 1
    doc_start = np.maximum(self.stream.starts[doc], start)
    return {
        'tokens': np.asarray(self.stream.tokens[start:start + self.seq_len], np.int32),
        'segment_ids': (doc - doc[0] + 1).astype(np.int32),
        'positions': (span - doc_start).astype(np.int32),
    }


  def padding_row(self):
    """A row that contributes nothing: segment 0 has zero loss weight."""
    return {k: np.zeros((self.seq_len,), np.int32)
            for k in ('tokens', 'segment_ids', 'positions')}


class FirstFitRows:
  """Random-access rows like PackedRows', filled by first-fit decreasing."""

  def __init__(self, stream, seq_len, layout=None):
    """`layout`: what `layout()` returned for this stream and length, instead of placing
    every piece again (a pass over all documents)."""
    self.stream, self.seq_len = stream, seq_len
    if layout is not None:
      pieces, rows = int(layout[0]), int(layout[1])
      parts = np.split(np.asarray(layout[2:]), np.cumsum([pieces] * 3))
      if len(parts[3]) != rows + 1:
        raise ValueError(f'a first-fit layout of {len(layout)} values is not one')
      self.piece_start, self.piece_length, self.row_pieces, self.row_ptr = parts
      return
    doc_lengths = np.diff(np.asarray(stream.starts, np.int64))
    pieces = np.maximum(1, -(-doc_lengths // seq_len))  # T-token pieces per document.
    first = np.repeat(np.asarray(stream.starts[:-1], np.int64), pieces)
    offset = np.arange(len(first)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    self.piece_start = first + offset * seq_len
    ends = np.repeat(np.asarray(stream.starts[1:], np.int64), pieces)
    self.piece_length = np.minimum(ends - self.piece_start, seq_len)
    keep = self.piece_length > 0
    self.piece_start, self.piece_length = self.piece_start[keep], self.piece_length[keep]
    order = np.argsort(-self.piece_length, kind='stable')
    rows = _first_fit(self.piece_length[order], seq_len)
    # Pieces grouped by row (CSR), each row's pieces in the order they were placed.
    self.row_pieces = order[np.argsort(rows, kind='stable')]
    self.row_ptr = np.concatenate([[0], np.cumsum(np.bincount(rows))])

  def layout(self):
    """The placement of every piece as one int64 array, to store (see __init__)."""
    return np.concatenate([[len(self.piece_start), len(self.row_ptr) - 1], self.piece_start,
                           self.piece_length, self.row_pieces, self.row_ptr]).astype(np.int64)

  def __len__(self):
    return len(self.row_ptr) - 1

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(index)
    row = self.padding_row()
    at = 0
    for segment, piece in enumerate(self.row_pieces[self.row_ptr[index]:self.row_ptr[index + 1]]):
      start, length = self.piece_start[piece], self.piece_length[piece]
      row['tokens'][at:at + length] = self.stream.tokens[start:start + length]
      row['segment_ids'][at:at + length] = segment + 1
      row['positions'][at:at + length] = np.arange(length)
      at += length
    return row

  padding_row = PackedRows.padding_row


def _first_fit(lengths, capacity):
  """The row of each item (in order): the first row with room, found in O(log rows) through a
  tree of the rows' largest free space."""
  size = 1 << max(0, (len(lengths) - 1).bit_length())
  free = [0] * size + [capacity] * len(lengths) + [0] * (size - len(lengths))  # Python ints:
  for node in range(size - 1, 0, -1):  # this loop runs once per piece, numpy would be slower.
    free[node] = max(free[2 * node], free[2 * node + 1])
  rows = np.empty(len(lengths), np.int64)
  for i, length in enumerate(lengths.tolist()):
    node = 1
    while node < size:
      node = 2 * node if free[2 * node] >= length else 2 * node + 1
    rows[i] = node - size
    free[node] -= length
    node //= 2
    while node:
      free[node] = max(free[2 * node], free[2 * node + 1])
      node //= 2
  return rows


class Mixture:
  """Rows of several sources interleaved by weight (grain's deterministic mix): row i comes
  from a fixed source, and over any window the sources' shares follow the weights."""

  def __init__(self, parts, weights):
    import grain
    self.parts, self.weights = parts, list(weights)
    self.mixed = grain.MapDataset.mix([grain.MapDataset.source(p) for p in parts], self.weights)

  def __len__(self):
    return len(self.mixed)

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(index)
    return self.mixed[index]

  def padding_row(self):
    return self.parts[0].padding_row()

