"""`jaxlm convert`: Hugging Face safetensors checkpoints <-> jaxlm runs, one tensor at a time.

`--from-hf=DIR --workdir=OUT` reads DIR/config.json and DIR/model.safetensors (or a sharded
model.safetensors.index.json) and writes a new run: config.json, the tokenizer
(tokenizer.model, or tokenizer.json with its tokenizer_config.json) and checkpoints/0 holding
the parameters alone. `jaxlm train --workdir=OUT` continues pretraining from them with a fresh
optimizer state; `generate`, `eval` and `init_from` read them too.

`--to-hf=DIR --workdir=RUN [--step=N]` writes config.json, model.safetensors (shards and an
index above --max_shard_mb) and the run's tokenizer as transformers loads it (hf_tokenizer.py).

No PyTorch: tensors go through safetensors, one at a time, into one host copy of the
parameters (import) or out of it, streamed into the shard files (export). That copy is all the
memory a conversion needs (measured on GPT-2 355M and 774M: 1.1-1.2x the parameters' bytes
for import, 1.2-1.25x for export; BENCHMARKS.md): XLA adopts the import's aligned buffers as
device arrays without a copy, Orbax writes them uncompressed, and the export reads the
checkpoint a batch of leaves at a time.
Both directions build in a temporary sibling directory renamed into place at the end, so the
target is never half-written. An object store (gs://) has no directory rename: there the files
are written in place, config.json last, so a directory with a config.json is complete; a
gs:// --from-hf is first copied to a local temporary directory (safetensors reads local files).
The tensor tables of each family are in hf.py.
"""

import json
import logging
import math
import os
import shutil
import tempfile

import jax
import numpy as np

from jaxlm import checkpoint, hf, hf_tokenizer, limits, parametrization, paths, resume
from jaxlm import config as config_lib
from jaxlm import data
from jaxlm import run as run_lib
from jaxlm import workdir as workdir_lib
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import ConfigError

log = logging.getLogger('jaxlm')

SINGLE, INDEX = 'model.safetensors', 'model.safetensors.index.json'
SAFETENSORS_DTYPES = {'float32': 'F32', 'bfloat16': 'BF16', 'float16': 'F16'}
DTYPES = tuple(SAFETENSORS_DTYPES)
ALIGNMENT = 64  # Bytes; what XLA's CPU client needs to use a host buffer in place.


class Reader:
  """The tensors of a Hugging Face checkpoint directory, read one at a time (bfloat16
  included: safetensors' numpy reader has no bfloat16, so tensors come through jax on CPU)."""

  def __init__(self, directory):
    self.directory = directory
    index, single = paths.join(directory, INDEX), paths.join(directory, SINGLE)
    if paths.exists(index):
      weight_map = _read_json(index).get('weight_map')
      if not isinstance(weight_map, dict):
        raise ConfigError(f'{index} has no weight_map')
      self.files = {name: paths.join(directory, f) for name, f in weight_map.items()}
    elif paths.exists(single):
      self.files = {name: single for name in self._open(single).keys()}
    else:
      bin_file = paths.join(directory, 'pytorch_model.bin')
      raise ConfigError(
          f'{directory} has no {SINGLE} or {INDEX}' +
          ('; it holds PyTorch pickles only: save it as safetensors first '
           '(model.save_pretrained(DIR, safe_serialization=True))'
           if paths.exists(bin_file) else ''))

  def _open(self, path):
    from safetensors import safe_open
    if not paths.isfile(path):  # A FIFO would block the reader; a directory is no file.
      raise ConfigError(f'{path} is not a regular file')
    try:
      return safe_open(path, framework='flax')
    except Exception as e:  # OSError, or safetensors' own error types.
      raise ConfigError(f'{path} cannot be read as safetensors: {e}') from e

  def find(self, name, layout):
    """The stored name of tensor `name`: also without the base-model prefix (checkpoints of
    GPT2Model, BertModel) and with legacy LayerNorm suffixes (gamma, beta)."""
    bare = name[len(layout.base_prefix):] if name.startswith(layout.base_prefix) else name
    candidates = [name, bare] + [c[:-len(new)] + old for c in (name, bare)
                                 for new, old in hf.LEGACY_SUFFIX.items() if c.endswith(new)]
    return next((c for c in candidates if c in self.files), None)

  def get(self, name):
    """One tensor, as a numpy array of its own (the file is opened for it alone, so that its
    memory-mapped pages are let go at once rather than accumulating over the import)."""
    path = self.files[name]
    with self._open(path) as f, jax.default_device(jax.devices('cpu')[0]):
      try:
        return np.array(f.get_tensor(name))
      except Exception as e:  # safetensors' own error types: a truncated file, a bad index.
        raise ConfigError(f'{path}: tensor {name} cannot be read: {e}') from e


class ShardWriter:
  """Streams tensors into safetensors files of at most `max_bytes` each (one tensor may exceed
  it alone), named as transformers names them, with an index when there are several.

  safetensors' own writers serialise a whole dict of tensors held in memory; this one plans the
  files from the tensors' names and shapes first, so each file's header goes out before its
  tensors and only the tensor being written is held. The format: an 8-byte little-endian
  header size, the JSON header (space-padded to a multiple of 8 bytes), then the tensors back
  to back.
  """

  def __init__(self, directory, specs, dtype, max_bytes):
    """`specs`: (name, shape) of every tensor, in the order `write` will receive them."""
    self.directory, self.dtype = directory, np.dtype(dtype)
    self.shards, size = [{}], 0
    for name, shape in specs:
      nbytes = self._nbytes(shape)
      if self.shards[-1] and size + nbytes > max_bytes:
        self.shards.append({})
        size = 0
      self.shards[-1][name] = tuple(shape)
      size += nbytes
    n = len(self.shards)
    self.names = [SINGLE] if n == 1 else [f'model-{k + 1:05d}-of-{n:05d}.safetensors'
                                          for k in range(n)]
    self.pending = [(k, name) for k, shard in enumerate(self.shards) for name in shard][::-1]
    self.file, self.shard = None, -1

  def write(self, name, tensor):
    if not self.pending:
      raise ValueError(f'tensor {name} is one more than planned')
    k, planned = self.pending.pop()
    shape = self.shards[k][planned]
    if (name, tensor.shape, tensor.dtype) != (planned, shape, self.dtype):
      raise ValueError(f'tensor {name} {tensor.dtype}{tensor.shape} is not the planned '
                       f'{planned} {self.dtype}{shape}')
    if k != self.shard:
      self._start(k)
    self.file.write(np.ascontiguousarray(tensor).view(np.uint8).data)

  def _start(self, k):
    self._finish()
    self.shard = k
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    for name, shape in self.shards[k].items():
      end = offset + self._nbytes(shape)
      header[name] = {'dtype': SAFETENSORS_DTYPES[self.dtype.name], 'shape': list(shape),
                      'data_offsets': [offset, end]}
      offset = end
    text = json.dumps(header, separators=(',', ':')).encode()
    text += b' ' * (-len(text) % 8)
    self.file = paths.open(paths.join(self.directory, self.names[k]), 'wb')
    self.file.write(len(text).to_bytes(8, 'little') + text)

  def _nbytes(self, shape):
    return int(np.prod(shape)) * self.dtype.itemsize

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._finish()  # A failed export leaves no open file behind.

  def _finish(self):
    if self.file is not None:
      self.file.close()
      self.file = None

  def close(self):
    """Completes the files and their index; returns how many files there are."""
    if self.pending:
      raise ValueError(f'{len(self.pending)} planned tensors were not written')
    if self.shard < 0:
      self._start(0)  # No tensors: a file with the header alone, as safetensors writes it.
    self._finish()
    if len(self.names) > 1:
      weight_map = {tensor: name for name, shard in zip(self.names, self.shards)
                    for tensor in shard}
      total = sum(self._nbytes(shape) for shard in self.shards for shape in shard.values())
      _write_json(paths.join(self.directory, INDEX),
                  {'metadata': {'total_size': total}, 'weight_map': weight_map})
    return len(self.names)


def from_hf(hf_dir, workdir, overrides=()):
  """Imports a Hugging Face checkpoint directory as a new jaxlm run in `workdir`."""
  if not paths.isdir(hf_dir):
    raise ConfigError(f'--from-hf={hf_dir!r} is not a directory')
  with paths.local_dir(hf_dir) as local:
    return _from_hf(hf_dir, local, workdir, overrides)


def _from_hf(hf_dir, local, workdir, overrides):
  """from_hf with the checkpoint's files in the local directory `local`."""
  where = paths.join(hf_dir, 'config.json')
  hf_config = _read_json(where)
  layout, fields = hf.model_fields(hf_config, where)
  config = imported_config(layout, fields, overrides, where)
  _check_new_directory(workdir, '--workdir')
  s = run_lib.inference_setup(config, devices=jax.devices('cpu')[:1])
  tokenizer = _tokenizer(config, s.objective, hf_dir, hf_config)
  config.data.tokenizer = ''  # The run keeps its own copy in the workdir.
  reader = Reader(local)

  m = config.model
  limits.check_host(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(
      s.abstract_state.params)), f'importing {hf_dir} (one host copy of its parameters)',
                    'convert on a machine with more memory')
  # One host copy of the parameters, filled in place tensor by tensor.
  params = jax.tree.map(lambda a: _aligned_zeros(a.shape, a.dtype), s.abstract_state.params)
  used = set()
  for entry in hf.entries(layout, params, m.scan_layers, m.num_layers):
    stored = reader.find(entry.name, layout)
    if stored is None:
      raise ConfigError(f'{hf_dir} has no tensor {entry.name}, which a {layout.architecture} '
                        f'of its config.json has')
    targets = [hf.get(params, path, layer, m.scan_layers) for path, layer in entry.leaves]
    shapes = [target.shape for target in targets]
    tensor = reader.get(stored)
    if tensor.shape != hf.hf_shape(entry, shapes):
      raise ConfigError(f'{hf_dir}: tensor {stored} has shape {tuple(tensor.shape)}, but its '
                        f'config.json makes it {hf.hf_shape(entry, shapes)}')
    # A sum (in float64, without a copy) is finite exactly when every element is: a NaN
    # weight imported would make a run whose only checkpoint is unusable.
    if not math.isfinite(float(np.sum(tensor, dtype=np.float64))):
      raise ConfigError(f'{hf_dir}: tensor {stored} holds NaN or infinite values; the '
                        f'checkpoint is damaged, nothing was imported')
    for target, array in zip(targets, hf.from_hf(entry, tensor, shapes)):
      target[...] = array  # Cast to model.param_dtype.
    used.add(stored)
  unused = sorted(n for n in set(reader.files) - used if not any(i in n for i in layout.ignored))
  if unused:
    raise ConfigError(f'{hf_dir}: tensor {unused[0]} (and {len(unused) - 1} more) has no place '
                      f'in a {layout.architecture} of its config.json; is the config from '
                      f'another model?')

  # Mapping the whole tree at once costs nothing only because device_put adopts the aligned
  # leaves instead of copying them (a copy would hold two of every leaf until the last one);
  # the leaves are never written again, since the device arrays share their memory.
  cpu = jax.devices('cpu')[0]
  params = jax.tree.map(lambda leaf: jax.device_put(leaf, cpu), params)

  def write(tmp):
    tokenizer.save(paths.join(tmp, tokenizer.filename))
    checkpoints = checkpoint.Checkpointer.for_workdir(tmp, config, compress=False)
    try:
      checkpoints.save_params(0, params, config)
      checkpoints.wait()
    finally:
      checkpoints.close()
    workdir_lib.save_config(tmp, config)

  _build_then_rename(workdir, write)
  parameters = sum(a.size for a in jax.tree.leaves(params))
  log.info('imported %d tensors (%s parameters) of %s into %s', len(used), f'{parameters:,}',
           hf_dir, workdir)
  return {'workdir': workdir, 'family': layout.family, 'tensors': len(used),
          'parameters': parameters}


def imported_config(layout, fields, overrides, where):
  """The run config of an imported model: the family's defaults, the model fields of the
  Hugging Face config, then the user's overrides, which may not change those fields (except
  the training length of a RoPE model, whose positions are not parameters)."""
  def build(extra):
    config = config_lib.defaults(layout.family)
    config.objective = layout.objective
    for field, value in fields.items():
      try:  # Exactly of the field's type: "false" is not a bool, 2.5 not an int.
        config_lib.set_field(config, f'model.{field}', value)
      except ConfigError as e:
        key = layout.fields.get(field, (field,))[0]
        raise ConfigError(f'{where}: {key}={value!r} is not valid for model.{field} '
                          f'({e})') from e
    config_lib.apply_overrides(config, extra)
    return config_lib.validate(config)

  hf_fields = build(())
  config = build(overrides)
  for field in fields:
    if field == 'max_len' and config.model.position == 'rope':
      continue
    if config.model[field] != hf_fields.model[field]:
      raise ConfigError(f'--config.model.{field}={config.model[field]!r} contradicts {where} '
                        f'({hf_fields.model[field]!r}); the checkpoint fixes it')
  return config


def to_hf(config, workdir, out_dir, step=None, max_shard_mb=5000.0, dtype=''):
  """Exports checkpoint `step` (default: the latest) of the run in `workdir` to `out_dir`."""
  layout = hf.exportable(config)
  _check_new_directory(out_dir, '--to-hf')
  tokenizer_file = config.data.tokenizer or data.tokenizer_path(workdir)
  tokenizer = tokenizer_lib.load(tokenizer_file) if paths.exists(tokenizer_file) else None
  if tokenizer is not None:
    workdir_lib.check_tokenizer(workdir, tokenizer)
  s = run_lib.inference_setup(config, devices=jax.devices('cpu')[:1])
  # Before the tensors: a tokenizer that cannot be converted fails in seconds, not after them.
  tokenizer_files = (hf_tokenizer.files(tokenizer, s.objective.frame(tokenizer),
                                        config.model.max_len) if tokenizer else {})
  params, step = resume.restore_params(s, workdir, step, host=True)
  m = config.model
  # Hugging Face layouts know no muP multipliers: they are folded into the weights.
  params = parametrization.to_standard(m, params)
  dtype = np.dtype(jax.numpy.dtype(dtype or m.param_dtype))
  entries = hf.entries(layout, params, m.scan_layers, m.num_layers)

  def leaves(entry):
    return [hf.get(params, path, layer, m.scan_layers) for path, layer in entry.leaves]

  def write(tmp):
    specs = [(e.name, hf.hf_shape(e, [a.shape for a in leaves(e)])) for e in entries]
    with ShardWriter(tmp, specs, dtype, max_shard_mb * 2 ** 20) as writer:
      for entry in entries:
        writer.write(entry.name, hf.to_hf(entry, leaves(entry)).astype(dtype, copy=False))
      files = writer.close()
    for name, content in tokenizer_files.items():
      paths.atomic_write(paths.join(tmp, name), content)
    hf_config = hf.hf_config(config, tokenizer)
    hf_config['dtype'] = dtype.name
    _write_json(paths.join(tmp, 'config.json'), hf_config)  # Last: the directory is complete.
    return files

  files = _build_then_rename(out_dir, write)
  log.info('exported step %d of %s to %s (%d file%s)%s', step, workdir, out_dir, files,
           's' if files > 1 else '', '' if tokenizer else '; the run has no tokenizer')
  return {'out': out_dir, 'step': step, 'architecture': layout.architecture, 'files': files}


def _tokenizer(config, objective, hf_dir, hf_config):
  """data.tokenizer if given, else the checkpoint's tokenizer.model (sentencepiece) or
  tokenizer.json (Hugging Face tokenizers; special-token roles from its tokenizer_config.json,
  else the config.json's token ids)."""
  files = [paths.join(hf_dir, name) for name in tokenizer_lib.FILENAMES]
  path = config.data.tokenizer or next((f for f in files if paths.exists(f)), None)
  if path is None:
    raise ConfigError(f'{hf_dir} has no {" or ".join(tokenizer_lib.FILENAMES)}; give the '
                      f'tokenizer with --config.data.tokenizer=FILE')
  ids = {role: hf_config.get(f'{role}_token_id') for role in ('bos', 'eos', 'pad')}
  ids = {role: i[0] if isinstance(i, list) and i else i for role, i in ids.items()}
  tokenizer = tokenizer_lib.load(path, ids)
  data.check_tokenizer(config, tokenizer)
  objective.check_tokenizer(tokenizer)
  return tokenizer


def _aligned_zeros(shape, dtype):
  """np.zeros whose buffer starts on a 64-byte boundary: XLA's CPU client adopts such a
  buffer as a device array without copying it, and copies any other."""
  dtype = np.dtype(dtype)
  size = int(np.prod(shape)) * dtype.itemsize
  raw = np.zeros(size + ALIGNMENT, np.uint8)
  start = -raw.ctypes.data % ALIGNMENT
  return raw[start:start + size].view(dtype).reshape(shape)


def _check_new_directory(path, flag):
  if not path:
    raise ConfigError(f'{flag}=DIR is required')
  try:
    occupied = paths.exists(path) and (not paths.isdir(path) or paths.listdir(path))
  except OSError as e:
    raise ConfigError(f'{flag}={path} cannot be read: {e.strerror}') from e
  if occupied:
    raise ConfigError(f'{flag}={path} exists and is not empty; conversion writes a new '
                      f'directory, so give another path')


def _build_then_rename(path, write):
  """Runs write(tmp) in a new temporary sibling of `path`, then renames it to `path` (which
  must not exist or be an empty directory): readers never see a half-written directory. A
  conversion killed outright leaves its `<path>.converting.*` sibling, to be deleted. On an
  object store, write(path) writes in place (config.json last)."""
  if paths.is_remote(path):
    return write(paths.normalize(path))
  path = paths.normalize(path)
  tmp = None
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path),
                           prefix=f'{os.path.basename(path)}.converting.')
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would stay on the renamed output.
    result = write(tmp)
    os.replace(tmp, path)  # Also replaces an empty directory at `path`.
    return result
  except OSError as e:
    raise ConfigError(f'cannot write {path}: {e.strerror or e}') from e
  finally:
    if tmp is not None and os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def _umask():
  """The process's umask, read without changing it where Linux says it."""
  try:
    with open('/proc/self/status') as f:
      return next(int(line.split()[1], 8) for line in f if line.startswith('Umask:'))
  except (OSError, StopIteration, ValueError):
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _read_json(path):
  try:
    with paths.open(path) as f:
      return json.load(f)
  except OSError as e:
    raise ConfigError(f'{path} cannot be read: {e.strerror}') from e
  except ValueError as e:
    raise ConfigError(f'{path} is not valid JSON: {e}') from e


def _write_json(path, value):
  with paths.open(path, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
