"""`jaxlm plan`: compile the train step for the configured mesh and report its cost, no training.

Lowered from shapes only, so a 7B model can be planned on a laptop. Three kinds of devices:
- the real ones (default);
- `--devices=N` simulated CPU devices, which shows how a pod's sharding splits the state (CPU
  layouts and fusion differ from TPU/GPU, so treat temporaries as an estimate);
- `--topology=v5p-128` (jaxlm/topology.py): the compile-only devices of a Cloud TPU slice,
  compiled by the TPU compiler itself, so the HBM figure is the compiler's own, and a verdict
  says whether the step fits the chip's HBM (exit 2 with the shortfall when it does not).

`--quick` compiles with the compiler's least optimisation effort: 4-7x less compile time for
the TPU (its low-level scheduling is most of a compile), memory figures a few percent off the
full compile's (BENCHMARKS.md), so its verdict asks for QUICK_HEADROOM of the HBM to spare.
"""

import contextlib
import json
import logging
import re
import time

import flax.linen as nn
import jax

from jaxlm import flops, paths, run as run_lib, topology as topology_lib
from jaxlm import mesh as mesh_lib, state as state_lib
from jaxlm.errors import ConfigError

log = logging.getLogger('jaxlm')
GiB = 2 ** 30
QUICK = {'exec_time_optimization_effort': -1.0}  # XLA's least effort (jax's compiler option).
QUICK_HEADROOM = 0.10  # Measured: a quick compile's memory is within 7% of the full one's.


def run(config, topology='', num_slices=1, json_path='', quick=False):
  slice_ = topology_lib.parse(topology) if topology else None
  devices = topology_lib.devices(slice_, num_slices) if slice_ else None
  s = run_lib.setup(config, devices)
  if slice_:
    _state_must_fit(s, slice_, json_path)
  m = config.model
  tokens_per_step = config.batch_size * m.max_len
  counts = flops.param_counts(m)
  prepare = s.objective.prepare()
  predictions = s.objective.predictions()
  start = time.perf_counter()
  with _out_of_hbm(s, slice_, 'train', json_path):
    compiled = run_lib.compile_train_step(s, prepare, QUICK if quick else None)
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = run_lib.memory_per_device(compiled)
  device_kind = s.mesh.devices.flat[0].device_kind
  print(f'mesh: {mesh_lib.describe(s.mesh)} on {device_kind}'
        + (f' ({num_slices} x {slice_.topology_name})' if slice_ else ''))
  print(f'{"parameter":36} {"shape":22} {"logical axes":36} mesh axes')
  for name, shape, names, spec in state_lib.param_table(s.abstract, s.shardings):
    print(f'{name:36} {str(shape):22} {str(names):36} {tuple(spec)}')
  report = {
      'devices': s.mesh.size,
      'device_kind': device_kind,
      'parameters': counts['total'],
      'flops_per_token': flops.of_run(config, predictions),
      'flops_per_token_causal_halved': flops.of_run(config, predictions, causal_halved=True),
      'flops_per_step': flops.of_run(config, predictions) * tokens_per_step,
      'xla_flops_per_step_per_device': float(cost.get('flops', 0.0)) if cost else None,
      'state_bytes_per_device': state_lib.bytes_per_device(s.abstract_state, s.shardings),
      'step_bytes_per_device': memory.get('total'),
      'temporary_bytes_per_device': memory.get('temporaries'),
      'compile_s': round(compile_s, 1),
      'quick': quick,
  }
  print(f'parameters: {counts["total"]:,}; FLOPs per step: {report["flops_per_step"]:.4g} '
        f'(6N + 12LHQT x {tokens_per_step:,} tokens)')
  for line in run_lib.matmul_lines(s):
    print(line)
  groups, report['eight_bit_flops_share'] = flops.matmul_precisions(config, predictions)
  report['matmul_precision'] = {layer: precision for layers, precision in groups
                                for layer in layers}
  if memory:
    print(f'per device: state {report["state_bytes_per_device"] / GiB:.2f} GiB, compiled step '
          f'{memory["total"] / GiB:.2f} GiB (temporaries {memory["temporaries"] / GiB:.2f})')
  if slice_:
    report.update(_topology_report(s, slice_, num_slices, prepare, memory, report, json_path))
  if slice_ and not report['fits']:
    _refuse(report, json_path)
  if json_path:
    _write(report, json_path)
  return report


def _write(report, json_path):
  paths.atomic_write(json_path, json.dumps(report, indent=1))


def _refuse(report, json_path):
  if json_path:
    _write(report, json_path)
  print(json.dumps(report))  # The report is still the last stdout line.
  raise ConfigError(report['verdict'])


def _state_must_fit(s, slice_, json_path):
  """A state larger than the chip needs no compile to refuse (a compile takes minutes)."""
  state_bytes = state_lib.bytes_per_device(s.abstract_state, s.shardings)
  if state_bytes > slice_.chip.hbm_bytes:
    _refuse_early(s, slice_, json_path, state_bytes,
                  f'does not fit {slice_.accelerator_type}: the parameters and optimizer state '
                  f'alone need {state_bytes / GiB:.2f} GiB per chip, '
                  f'{(state_bytes - slice_.chip.hbm_bytes) / GiB:.2f} GiB more than the '
                  f'{slice_.chip.hbm_bytes / GiB:.0f} GiB of HBM; '
                  f'{_advice(s, state_bytes, slice_.chip.hbm_bytes)}')


def _refuse_early(s, slice_, json_path, state_bytes, verdict):
  _refuse({'devices': s.mesh.size, 'topology': slice_.accelerator_type,
           'topology_name': slice_.topology_name, 'state_bytes_per_device': state_bytes,
           'hbm_bytes_per_chip': slice_.chip.hbm_bytes, 'fits': False, 'verdict': verdict},
          json_path)


@contextlib.contextmanager
def _out_of_hbm(s, slice_, step, json_path):
  """The TPU compiler refuses a step whose buffers exceed the chip's HBM: that is a verdict
  (exit 2 with the compiler's figures), not an internal error."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if not slice_ or 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    message = str(e).split('RESOURCE_EXHAUSTED:', 1)[1].strip().splitlines()[0]
    sizes = [float(n) * 2 ** (10 * 'KMGT'.index(u) + 10)
             for n, u in re.findall(r'([\d.]+)([KMGT])i?B?\b', message)]
    shortfall = f' (short by {(sizes[0] - sizes[1]) / GiB:.2f} GiB)' if len(sizes) >= 2 else ''
    state_bytes = state_lib.bytes_per_device(s.abstract_state, s.shardings)
    verdict = (f'does not fit {slice_.accelerator_type}: the TPU compiler refused the {step} '
               f'step: {message}{shortfall}; '
               f'{_advice(s, state_bytes, slice_.chip.hbm_bytes, step)}')
    _refuse_early(s, slice_, json_path, state_bytes, verdict)


def _topology_report(s, slice_, num_slices, prepare, train_memory, report, json_path):
  """The eval step's memory, the chip's HBM and the verdict, printed and returned."""
  config = s.config
  start = time.perf_counter()
  with _out_of_hbm(s, slice_, 'eval', json_path):
    options = QUICK if report['quick'] else None
    eval_step = run_lib.compile_eval_step(s, prepare, compiler_options=options)
    eval_memory = run_lib.memory_per_device(eval_step)
  eval_compile_s = time.perf_counter() - start
  capacity = slice_.chip.hbm_bytes
  need = max(train_memory['total'], eval_memory['total'])
  xla = report['xla_flops_per_step_per_device']
  loops = []
  if config.model.scan_layers:
    loops.append(f'the {config.model.num_layers}-layer scan')
  if config.optimizer.grad_accum_steps > 1:
    loops.append(f'the {config.optimizer.grad_accum_steps} accumulation steps')
  # A quick compile's figures may be a few percent under the full compile's: keep headroom.
  usable = capacity * (1 - QUICK_HEADROOM) if report['quick'] else capacity
  fits = need <= usable
  largest = 'train' if need == train_memory['total'] else 'eval'
  advice = _advice(s, report['state_bytes_per_device'], capacity, largest)
  quick = (f' (--quick: {100 * QUICK_HEADROOM:.0f}% kept spare for the full compile\'s '
           f'figures)' if report['quick'] else '')
  verdict = (f'fits: {need / GiB:.2f} of {capacity / GiB:.0f} GiB HBM per chip '
             f'({100 * need / capacity:.0f}%){quick}' if fits else
             f'does not fit {slice_.accelerator_type}: the {largest} step needs '
             f'{need / GiB:.2f} GiB per chip, {(need - usable) / GiB:.2f} GiB more than the '
             f'{usable / GiB:.1f} GiB of HBM{quick}; {advice}')
  print(f'TPU compiler, {num_slices} x {slice_.accelerator_type} ({s.mesh.size} chips of '
        f'{slice_.chip.hbm_bytes / GiB:.0f} GiB HBM), per chip:')
  print(f'  state (parameters + optimizer) {report["state_bytes_per_device"] / GiB:8.2f} GiB')
  for name, mem, seconds in (('train step', train_memory, report['compile_s']),
                             ('eval step', eval_memory, eval_compile_s)):
    print(f'  {name:30} {mem["total"] / GiB:8.2f} GiB (arguments {mem["arguments"] / GiB:.2f}, '
          f'temporaries {mem["temporaries"] / GiB:.2f}, outputs {mem["outputs"] / GiB:.2f}); '
          f'compiled in {seconds:.1f} s')
  print(f'  FLOPs per step per chip: {report["flops_per_step"] / s.mesh.size:.4g} (6N + 12LHQT); '
        f'XLA cost analysis {xla:.4g}'
        + (f' (counts the body of {" and ".join(loops)} once, so it is lower)' if loops else ''))
  print(f'verdict: {verdict}')
  return {
      'topology': slice_.accelerator_type, 'topology_name': slice_.topology_name,
      'num_slices': num_slices, 'hbm_bytes_per_chip': capacity,
      'train_step_bytes': train_memory, 'eval_step_bytes': eval_memory,
      'eval_compile_s': round(eval_compile_s, 1),
      'xla_flops_counts_loop_bodies_once': bool(loops),
      'bytes_needed_per_chip': need, 'fits': fits, 'verdict': verdict,
  }


def _advice(s, state_bytes, capacity, step='train'):
  """The config field to change first, by what takes the memory."""
  config, m = s.config, s.config.model
  if state_bytes > 0.8 * capacity:
    return (f'the state alone is {state_bytes / GiB:.1f} GiB per chip: shard it over more chips '
            f'(mesh.fsdp, a larger --topology or --num_slices with mesh.dcn_fsdp)')
  if step == 'eval':  # No backward pass, no accumulation: the whole batch at once.
    return ('the eval step runs all of batch_size at once: try loss_chunk=512 or a smaller '
            'batch_size')
  batch_axes = nn.logical_to_mesh_axes(('batch',), s.rules)[0]
  per_chip = config.batch_size // config.optimizer.grad_accum_steps / mesh_lib.ways(
      s.mesh, batch_axes)
  if m.remat_policy not in ('full', 'offload'):
    first = f"model.remat_policy='full' (now {m.remat_policy!r})"
  elif not config.loss_chunk and m.vocab_size >= 32_000:
    first = 'loss_chunk=512 (the float32 logits of the whole batch exist at once)'
  else:
    first = (f'fewer sequences per chip ({per_chip:g} now): raise optimizer.grad_accum_steps '
             f'or lower batch_size')
  return f'try {first}'
