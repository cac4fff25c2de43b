"""`jaxlm plan`: compile the train step for the configured mesh and report its cost, no training.

Lowered from shapes only, so a 7B model can be planned on a laptop; with `--devices=N` the
mesh is N simulated CPU devices, which shows how a pod's sharding splits the state (CPU
layouts and fusion differ from TPU/GPU, so treat temporaries as an estimate).
"""

import logging

import jax

from jaxlm import flops, objectives, mesh as mesh_lib, state as state_lib, run as run_lib

log = logging.getLogger('jaxlm')


def run(config):
  if config.objective == 'classify':
    from jaxlm.data import labeled
    labeled.resolve_labels(config)  # The classifier's size.
  s = run_lib.setup(config)
  m = config.model
  tokens_per_step = config.batch_size * m.max_len
  counts = flops.param_counts(m)
  compiled = run_lib.compile_train_step(s, objectives.build(config))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = run_lib.memory_per_device(compiled) or {}
  print(f'mesh: {mesh_lib.describe(s.mesh)} on {jax.devices()[0].device_kind}')
  print(f'{"parameter":36} {"shape":22} {"logical axes":36} mesh axes')
  for name, shape, names, spec in state_lib.param_table(s.abstract, s.shardings):
    print(f'{name:36} {str(shape):22} {str(names):36} {tuple(spec)}')
  report = {
      'devices': s.mesh.size,
      'parameters': counts['total'],
      'flops_per_token': flops.flops_per_token(m),
      'flops_per_token_causal_halved': flops.flops_per_token(m, causal_halved=True),
      'flops_per_step': flops.flops_per_token(m) * tokens_per_step,
      'xla_flops_per_step_per_device': float(cost.get('flops', 0.0)) if cost else None,
      'state_bytes_per_device': state_lib.bytes_per_device(s.abstract_state, s.shardings),
      'step_bytes_per_device': memory.get('total'),
      'temporary_bytes_per_device': memory.get('temporaries'),
  }
  print(f'parameters: {counts["total"]:,}; FLOPs per step: {report["flops_per_step"]:.4g} '
        f'(6N + 12LHQT x {tokens_per_step:,} tokens)')
  if memory:
    print(f'per device: state {report["state_bytes_per_device"] / 2**30:.2f} GiB, compiled step '
          f'{memory["total"] / 2**30:.2f} GiB (temporaries {memory["temporaries"] / 2**30:.2f})')
  return report
