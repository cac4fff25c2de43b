"""Whether a checkpoint is intact, decided once for every process.

A checkpoint gets a checksum manifest (`jaxlm_checksums.json`: a CRC-32 per file) once its
save is complete (checkpoint.Checkpointer), and is checked against it before it is read. Only
a checkpoint that is provably unusable - incomplete (Orbax's metadata missing), not matching
its manifest, or holding non-finite values - is set aside, decided by process 0 for all
processes (`agreed`).
"""

import json
import math
import zlib

import jax
import numpy as np

from jaxlm import paths

MANIFEST = 'jaxlm_checksums.json'
# Written by Orbax when a step (and its state item) is complete.
REQUIRED = ('_CHECKPOINT_METADATA', 'state/_METADATA')


def _files(step_dir):
  """Every file of a checkpoint but the manifest, as paths relative to `step_dir`."""
  root = str(step_dir).rstrip('/')
  found = paths.files_under(root)
  return sorted(p[len(root) + 1:] for p in found if not p.endswith(MANIFEST))


def _crc(path):
  crc = 0
  with paths.open(path, 'rb') as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def write_manifest(step_dir):
  """Records a CRC-32 of every file of a complete checkpoint (process 0 only)."""
  sums = {name: _crc(paths.join(step_dir, name)) for name in _files(step_dir)}
  paths.atomic_write(paths.join(step_dir, MANIFEST), json.dumps(sums, sort_keys=True))


def verify(step_dir):
  """'ok', 'unverified' (no manifest: saved by an older jaxlm or interrupted right after the
  save), or the reason the checkpoint is provably unusable."""
  for name in REQUIRED:
    if not paths.exists(paths.join(step_dir, name)):
      return f'incomplete: {name} is missing'
  manifest = paths.join(step_dir, MANIFEST)
  if not paths.exists(manifest):
    return 'unverified'
  try:
    sums = json.loads(paths.read_text(manifest))
    assert isinstance(sums, dict)
  except (ValueError, AssertionError, UnicodeDecodeError):
    return f'its {MANIFEST} is not readable'
  present = set(_files(step_dir))
  for name, crc in sorted(sums.items()):
    if name not in present:
      return f'{name} is missing'
    if _crc(paths.join(step_dir, name)) != crc:
      return f'{name} does not match its checksum'
  return 'ok'


def nonfinite_leaf(tree):
  """The path of the first floating-point leaf with a non-finite value, or None."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating):
      continue
    if isinstance(leaf, np.ndarray):  # Host parameters (convert): no device copy of a leaf.
      # A sum is finite exactly when every element is (float64: no overflow of sane weights).
      finite = math.isfinite(float(np.sum(leaf, dtype=np.float64)))
    else:
      finite = bool(jax.device_get(jax.numpy.isfinite(leaf).all()))
    if not finite:
      return jax.tree_util.keystr(path)
  return None


def agreed(decide):
  """decide() as process 0 computes it, the same on every process (one decision for all)."""
  if jax.process_count() == 1:
    return decide()
  from jax.experimental import multihost_utils
  verdict = decide() if jax.process_index() == 0 else ''
  data = np.frombuffer(verdict.encode()[:255].ljust(256, b'\0'), np.uint8)
  data = multihost_utils.broadcast_one_to_all(data)
  return bytes(np.asarray(data)).rstrip(b'\0').decode(errors='replace')
