"""Steps lost and restart time per failure: the local checkpoint tier against the workdir alone.

    python bench/restart_bench.py [--steps=20] [--kill_at=7,18] [--save_every=10] [--local_every=2]

Trains the tests' tiny config (tests/helpers.py: GPT-2 style, 2 layers of width 64, on the
Python standard library's source, tokenized here first) with
`launch/local.sh 2 --max_restarts=K`, its workdir in a bucket of the in-memory GCS emulator
(tests/gcs_emulator.py). Start number i of the job SIGKILLs process 1 after step kill_at[i]
(tests/helpers.py's faulty_python), so K = len(kill_at) failures. Process 0 writes
metrics.jsonl to the bucket at every row, not every 30 s (and at each start's first step):
launch/supervise.py reads the job's progress there, and two failures seconds apart, both
before their rows went out, would look like two failures at one step. Twice: with
checkpoint.local_dir (a local copy every --local_every steps, the workdir's every
--save_every) and with the workdir alone (every --save_every steps).

Per failure: the step resumed from and its tier (the log's "resumed from the checkpoint of
step N (... tier)"; no such line: from scratch), the steps lost, the restart time (from the
kill to the first step logged after it) and the time lost (from the kill until the killed
step is logged again). The times are read off the job's log lines as they arrive.
"""

import argparse
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), os.path.join(os.path.dirname(BENCH), 'tests')]
from helpers import (FAULTY, LOCAL, ROOT, env, faulty_python, gcs_emulator, tiny_config,  # noqa: E402
                     write_config)
from table import print_table  # noqa: E402 - bench/table.py: scripts run from bench/.

BUCKET = 'jaxlm-restart-bench'
KILLED = 'launch/local.sh: a process exited with status'
RESUMED = re.compile(r'resumed from the checkpoint of step (\d+) \((\w+) tier\)')
STEP = re.compile(r'step (\d+): loss')
EVERY_ROW = '''from jaxlm import metrics
rows_init = metrics._RemoteRows.__init__
metrics._RemoteRows.__init__ = lambda self, path, flush_secs: rows_init(self, path, 0)
'''


def prepare(root, steps):
  """The tiny config as a file, reading a tokenizer and token cache made once here."""
  from jaxlm import data, objectives
  config = tiny_config()
  data.prepare(config, root, objectives.get(config).frame)  # root/tokenizer.model, root/data.
  config = tiny_config(train_steps=steps, log_every_steps=1, data__cache_dir=f'{root}/data',
                       data__tokenizer=f'{root}/tokenizer.model')
  return write_config(pathlib.Path(root, 'config.py'), config)


def run(config, workdir, kill_at, extra, environment, log_path, timeout_s):
  """Trains under local.sh --max_restarts; returns [(monotonic time, log line)]."""
  environment = dict(environment, JAXLM_TEST_FAULTS=';'.join(
      f'{i}=1:{step}:keep' for i, step in enumerate(kill_at)))
  command = ['bash', LOCAL, '2', '--devices-per-process', '2', f'--max_restarts={len(kill_at)}',
             '--', 'train', f'--config={config}', f'--workdir={workdir}', *extra]
  job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, start_new_session=True, env=environment)
  timer = threading.Timer(timeout_s, os.killpg, (job.pid, signal.SIGKILL))
  timer.start()
  lines = []
  with open(log_path, 'w') as log:
    for line in job.stderr:
      lines.append((time.monotonic(), line))
      log.write(line)
  timer.cancel()
  if job.wait() != 0:
    raise RuntimeError(f'the job failed (exit status {job.returncode}): see {log_path}')
  return lines


def failures(lines, kill_at):
  """A row per failure, read off the timed log lines."""
  kills = [i for i, (_, line) in enumerate(lines) if KILLED in line]
  assert len(kills) == len(kill_at), f'{len(kills)} kills logged, {len(kill_at)} asked for'
  out = []
  for n, (i, killed) in enumerate(zip(kills, kill_at)):
    end = kills[n + 1] if n + 1 < len(kills) else len(lines)
    t_kill = lines[i][0]
    resumed, tier, first, back = 0, 'none (from scratch)', None, None
    for t, line in lines[i:end]:
      if m := RESUMED.search(line):
        resumed, tier = int(m[1]), m[2]
      elif m := STEP.search(line):
        first = first or t
        if int(m[1]) == killed:
          back = t
          break
    out.append({'killed after step': killed, 'resumed from step': resumed, 'tier': tier,
                'steps lost': killed - resumed, 'restart s': first - t_kill,
                'time lost s': back - t_kill})
  return out


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--kill_at', default='7,18', help='steps, one per start of the job')
  parser.add_argument('--save_every', type=int, default=10, help='workdir (persistent) tier')
  parser.add_argument('--local_every', type=int, default=2, help='local tier')
  parser.add_argument('--timeout_s', type=int, default=1200, help='per job')
  args = parser.parse_args(argv)
  kill_at = [int(s) for s in args.kill_at.split(',')]
  root = tempfile.mkdtemp(prefix='jaxlm_restart_bench_')
  config = prepare(root, args.steps)
  server, gcs = gcs_emulator(BUCKET)
  python = faulty_python(root)
  with open(f'{root}/faulty.py', 'w') as f:
    f.write(FAULTY.replace('from jaxlm import loop\n', 'from jaxlm import loop\n' + EVERY_ROW))
  # A compilation cache of this bench's own: the first start compiles, restarts load.
  environment = dict(env(2), **gcs, PYTHON=python, JAXLM_COMPILE_CACHE=f'{root}/xla')
  setups = {
      f'local every {args.local_every} + workdir every {args.save_every}': [
          f'--config.checkpoint.local_dir={root}/local',
          f'--config.checkpoint.local_every_steps={args.local_every}'],
      f'workdir every {args.save_every} only': [],
  }
  table = []
  try:
    for n, (setup, extra) in enumerate(setups.items()):
      began = time.monotonic()
      lines = run(config, f'gs://{BUCKET}/run{n}', kill_at,
                  [f'--config.checkpoint.save_every_steps={args.save_every}', *extra],
                  environment, f'{root}/run{n}.log', args.timeout_s)
      rows = failures(lines, kill_at)
      wall = time.monotonic() - began
      table += [{'setup': setup, **row} for row in rows]
      table.append({'setup': setup, 'killed after step': f'all (job: {wall:.0f} s)',
                    'resumed from step': '', 'tier': '',
                    'steps lost': sum(r['steps lost'] for r in rows),
                    'restart s': sum(r['restart s'] for r in rows),
                    'time lost s': sum(r['time lost s'] for r in rows)})
  finally:
    server.kill()
    server.wait()
  print_table(table, float_format='.1f')
  print(f'\nlogs: {root}/run*.log')


if __name__ == '__main__':
  main(sys.argv[1:])
