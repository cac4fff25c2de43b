"""The cost of the goodput accounting: the loop with its metrics and goodput hooks against a
bare loop (the same step, the same host syncs at log steps, no clock, no step kept in flight).

    python bench/goodput_bench.py --config=configs/gpt_tiny.py [--steps=40] [--trials=3]

Two figures: (1) the host time the accounting adds per step, measured with a step that does
nothing (so nothing hides it), as a share of the real step's time; (2) end-to-end time per real
step of both loops, interleaved trials, medians - on a shared machine (2) is noisy, (1) is not.
"""

import argparse
import dataclasses
import itertools
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import cli, goodput, hooks
from jaxlm import config as config_lib
from jaxlm import loop as loop_lib
from jaxlm import mesh as mesh_lib
from jaxlm import run as run_lib
from jaxlm import state as state_lib
from table import print_table  # bench/table.py: scripts run from bench/.


class NullWriter:
  def write(self, step, row):
    pass


def with_hooks(s, state, step, batches, num_steps):
  """The training loop as `jaxlm train` runs it, less eval, checkpoints and profiling."""
  writer = NullWriter()
  phase = types.SimpleNamespace(  # What the loop and these hooks read of a phase_build.Phase.
      train_step=step, batches=batches, batch_sharding=s.batch_sharding, end=num_steps,
      tokens_per_step=s.config.batch_size * s.config.model.max_len, flops_per_token=1.0)
  loop = loop_lib.Loop([hooks.Metrics(writer, s.mesh.size, peak=1e12),
                        goodput.Goodput(writer, '/nonexistent/metrics.jsonl', goodput.Clock())],
                       None, 0, num_steps, s.config.log_every_steps)
  begin = time.perf_counter()
  state = loop.run(phase, state)
  return (time.perf_counter() - begin) / num_steps, state


def bare(s, state, step, batches, num_steps):
  """The same steps and log-step syncs with nothing measured."""
  begin, pending = time.perf_counter(), []
  for i in range(num_steps):
    state, metrics = step(state, mesh_lib.to_device(next(batches), s.batch_sharding))
    pending.append(metrics)
    if (i + 1) % s.config.log_every_steps == 0 or i + 1 == num_steps:
      loop_lib.interval_row(jax.device_get(pending))
      pending = []
  return (time.perf_counter() - begin) / num_steps, state


def median_pair(s, state, step, batches, num_steps, trials):
  times = {'bare': [], 'hooks': []}
  for _ in range(trials):  # Interleaved, so drifting machine load hits both alike.
    t, state = bare(s, state, step, batches, num_steps)
    times['bare'].append(t)
    t, state = with_hooks(s, state, step, batches, num_steps)
    times['hooks'].append(t)
    print(f'trial: bare {1e3 * times["bare"][-1]:.3f} ms, hooks {1e3 * t:.3f} ms a step',
          file=sys.stderr, flush=True)
  return {k: float(np.median(v)) for k, v in times.items()}, state


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', required=True)
  parser.add_argument('--steps', type=int, default=20,
                      help='real steps per trial of the end-to-end comparison; 0 = skip it')
  parser.add_argument('--trials', type=int, default=3)
  parser.add_argument('--step_ms', type=float, default=0.0,
                      help='with --steps=0: the real step time to compare with (train_bench)')
  args, rest = parser.parse_known_args(argv)
  config = config_lib.load(args.config, cli.parse_overrides(rest))
  config.log_every_steps = min(config.log_every_steps, 10)
  s = run_lib.setup(config, jax.devices()[:1])
  row = {'config': args.config}
  if args.steps:
    compiled = run_lib.compile_train_step(s, s.objective.prepare())
    shape = (config.batch_size, config.model.max_len)
    rng = np.random.default_rng(0)
    batch = {'tokens': rng.integers(0, config.model.vocab_size, shape, dtype=np.int32),
             'segment_ids': np.ones(shape, np.int32),
             'positions': np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape)}
    with s.active():
      state = state_lib.initialize(s.model, s.tx, config, s.shardings)
      state, _ = compiled(state, mesh_lib.to_device(batch, s.batch_sharding))  # Warm up.
      real, _ = median_pair(s, state, compiled, itertools.repeat(batch), args.steps,
                            args.trials)
    row.update({'step_ms (bare loop)': 1e3 * real['bare'],
                'step_ms (hooks + goodput)': 1e3 * real['hooks'],
                'end-to-end overhead %': 100 * (real['hooks'] / real['bare'] - 1)})
    step_s = real['bare']
  else:
    step_s = args.step_ms / 1e3
    row['step_ms (given)'] = args.step_ms

  nothing = {'loss': jnp.zeros(()), 'grad_norm': jnp.zeros(()), 'learning_rate': jnp.zeros(()),
             'nonfinite': jnp.zeros((), jnp.int32)}
  noop_setup = dataclasses.replace(s, batch_sharding={})
  noop, _ = median_pair(noop_setup, None, lambda st, b: (st, nothing), itertools.repeat({}),
                        500, args.trials)
  added = noop['hooks'] - noop['bare']
  row.update({'accounting us/step (no-op step)': 1e6 * added,
              'accounting % of step': 100 * added / step_s})
  print_table([row], float_format='.3g')


if __name__ == '__main__':
  main(sys.argv[1:])
