"""Times the compiled train step of a config on synthetic batches and prints a table.

    python bench/train_bench.py --config=configs/gpt_tiny.py [--config.a.b=v ...] [--steps=20]

The step is compiled once (compile time reported), warmed up, then timed over --steps steps
with a device sync only at the end. Batches are random tokens, already on the devices, so the
figure is the model's speed, not the input pipeline's (bench/data_bench.py measures that).
"""

import argparse
import sys
import time

from jaxlm import host_memory

host_memory.keep_host_memory()  # Before jax starts its threads, as the jaxlm command does.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxlm import cli, flops  # noqa: E402
from jaxlm import config as config_lib  # noqa: E402
from jaxlm import state as state_lib  # noqa: E402
from jaxlm import run as run_lib  # noqa: E402
from table import print_table  # noqa: E402 - bench/table.py: scripts run from bench/.


def bench(config, num_steps, warmup=2, batch=None):
  """The table's row for `config`; `batch`: {feature: [batch, length] array} to time instead
  of random tokens in one document per row (bench/gpu_session.py: packed documents)."""
  s = run_lib.setup(config)
  start = time.perf_counter()
  compiled = run_lib.compile_train_step(s, s.objective.prepare())
  compile_s = time.perf_counter() - start
  with s.active():
    state = state_lib.initialize(s.model, s.tx, config, s.shardings)
    shape = (config.batch_size, config.model.max_len)
    tokens = jax.random.randint(jax.random.key(1), shape, 0, config.model.vocab_size)
    batch = batch or {'tokens': tokens, 'segment_ids': jnp.ones(shape, jnp.int32),
                      'positions': jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)}
    batch = {k: jax.device_put(v, s.batch_sharding[k]) for k, v in batch.items()}
    for _ in range(warmup):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(num_steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / num_steps
  memory = run_lib.memory_per_device(compiled)
  m = config.model
  tokens_per_s = config.batch_size * m.max_len / step_s
  peak, peak_source = flops.device_peak_flops()
  predictions = s.objective.predictions()
  per_device = flops.of_run(config, predictions) * tokens_per_s / s.mesh.size
  per_device_halved = (flops.of_run(config, predictions, causal_halved=True) * tokens_per_s
                       / s.mesh.size)
  return {
      'device': f'{s.mesh.size} x {jax.devices()[0].device_kind}',
      'params': flops.param_counts(m)['total'],
      'step_ms': 1e3 * step_s,
      'tokens_per_s': tokens_per_s,
      'tflops_per_device': per_device / 1e12,
      'mfu': per_device / peak,
      'mfu_causal_halved': per_device_halved / peak,
      'peak_tflops': peak / 1e12,
      'peak_source': peak_source,
      'memory_mib': memory['total'] / 2 ** 20,
      'compile_s': compile_s,
  }


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--steps', type=int, default=20)
  args, rest = parser.parse_known_args(argv)
  from jaxlm import cli  # Here: bench() alone needs none of the commands' dependencies.
  config = config_lib.load(args.config, cli.parse_overrides(rest))
  print_table([bench(config, args.steps)])


if __name__ == '__main__':
  main(sys.argv[1:])
