"""Packing a token stream into fixed-length rows with segment ids and positions.

Concatenate-and-split: row i is tokens [i*T, (i+1)*T) of the stream, so every token is used
once and any row is computed in O(log documents) without a pass over the data. Segment ids
number the documents within a row (from 1; 0 is padding) so attention and the loss never cross
a document boundary, and positions restart at each document (or at the row start when a
document continues from the previous row), so they never exceed T.
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
    zeros = np.zeros((self.seq_len,), np.int32)
    return {'tokens': zeros, 'segment_ids': zeros, 'positions': zeros}
