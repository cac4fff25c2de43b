"""The path layer: local paths and gs:// URLs through the same functions, and no URL ever
turned into a local path (issue 23, defect 1). Object-store behaviour end to end is in
test_gcs.py, against an emulator."""

import os

import pytest

from jaxlm import checkpoint, data, paths
from jaxlm import workdir as workdir_lib


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.normalize('gs://bucket/run/') == 'gs://bucket/run'
  assert paths.join('gs://bucket/run', 'checkpoints', '7') == 'gs://bucket/run/checkpoints/7'
  assert paths.parent('gs://bucket/run/checkpoints') == 'gs://bucket/run'
  assert workdir_lib.checkpoint_dir('gs://bucket/run') == 'gs://bucket/run/checkpoints'
  assert workdir_lib.metrics_path('gs://b/r') == 'gs://b/r/metrics.jsonl'
  assert paths.normalize('run') == str(tmp_path / 'run')
  assert paths.join('run', 'x') == str(tmp_path / 'run' / 'x')


def test_files_are_found_and_named_alike_in_a_bucket_and_on_disk():
  files = ['gs://b/corpus/a.txt', 'gs://b/corpus/sub/b.txt']
  assert paths.common_dir(files) == 'gs://b/corpus'
  assert paths.relative(files[1], 'gs://b/corpus') == 'sub/b.txt'
  local = ['/d/corpus/a.txt', '/d/corpus/sub/b.txt']
  assert paths.common_dir(local) == '/d/corpus'
  assert paths.relative(local[1], '/d/corpus') == 'sub/b.txt'


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
  target = tmp_path / 'f.json'
  paths.atomic_write(str(target), 'old')
  paths.atomic_write(str(target), b'new')
  assert target.read_text() == 'new'
  with pytest.raises(RuntimeError):
    with paths.atomic_file(str(target)) as f:
      f.write(b'half')
      raise RuntimeError('killed mid-write')
  assert target.read_text() == 'new'
  assert os.listdir(tmp_path) == ['f.json']


def test_glob_matches_recursively(tmp_path):
  (tmp_path / 'a' / 'b').mkdir(parents=True)
  (tmp_path / 'a' / 'x.txt').write_text('x')
  (tmp_path / 'a' / 'b' / 'y.txt').write_text('y')
  assert paths.glob(str(tmp_path / 'a' / '**' / '*.txt')) == [
      str(tmp_path / 'a' / 'b' / 'y.txt'), str(tmp_path / 'a' / 'x.txt')]


def test_a_gs_checkpoint_directory_goes_to_orbax_as_a_url(monkeypatch):
  """Before: os.path.abspath('gs://b/r') made '<cwd>/gs:/b/r', a local directory."""
  given = []
  monkeypatch.setattr(checkpoint.ocp, 'CheckpointManager', lambda d, **_: given.append(d))
  checkpointer = checkpoint.Checkpointer('gs://bucket/run/checkpoints/')
  assert given == [checkpointer.directory] == ['gs://bucket/run/checkpoints']


def test_init_from_tokenizer_walks_up_a_local_run(tmp_path, shared_data):
  run = tmp_path / 'run'
  (run / 'checkpoints' / '6').mkdir(parents=True)
  (run / 'tokenizer.model').write_bytes((shared_data / 'tokenizer.model').read_bytes())
  assert data.init_from_tokenizer(str(run / 'checkpoints' / '6')) == str(run / 'tokenizer.model')


def test_every_metrics_row_is_on_disk_when_write_returns(tmp_path, monkeypatch):
  """Before: flushed to the OS only, so on a FUSE mount (gcsfuse) a hard kill lost rows."""
  from jaxlm import metrics
  synced = []
  real_fsync = os.fsync
  monkeypatch.setattr(metrics.os, 'fsync', lambda fd: (synced.append(fd), real_fsync(fd)))
  writer = metrics.Writer(str(tmp_path))
  for step in (1, 2):
    writer.write(step, {'loss': 1.0 / step})
    assert len(synced) == step
    assert (tmp_path / 'metrics.jsonl').read_text().count('\n') == step
  writer.close()
