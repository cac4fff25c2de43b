"""The ring's communication per train step, read from the compiled program, against the formula.

    python bench/context_comm_bench.py --config=configs/llama_7b_128k_tpu_v5p.py \
        --topology=v5p-128 [--override=model.max_len=32768 ...] [--quick]

Compiles the train step (TPU compiler for `--topology`, else the local devices) and sums the
bytes every collective-permute of the program sends per device, each loop's body counted as
many times as the loop runs (its trip count, read from the loop's condition). The formula, per
device and step, with c = mesh.sequence, L layers, M micro-batches and, per device, a key or
value shard of kv bytes (rows x length / c x key/value heads x head width x compute dtype):

    forward pass  F x (c - 1) x 2 kv            K and V (one transfer), c - 1 hops
    backward pass (c - 1) x 2 kv                the same blocks again
                  + (c - 1) x 2 kv32 + 2 kv     dK, dV travel with them (float32), and home
                                                in the compute dtype: c hops
    per step      L x M x (forward + backward)

F is 2 when the block is rematerialised (the forward ring runs again in the backward pass),
else 1. model.context_parallel='allgather' all-gathers K and V instead (the same bytes, as an
all-gather: the forward terms), and its dK, dV travel the ring alike. The segment ids (4 bytes a token) are all-gathered, not permuted; a causal loss's
shifted targets permute one token per row and device. The bench prints the difference.
"""

import argparse
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4,
               's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}
MiB = 2 ** 20


def _bytes(shape):
  """Bytes of an HLO array type such as bf16[2,256,2,128]{...}."""
  dtype, dims = re.match(r'(\w+)\[([\d,]*)\]', shape).groups()
  return DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)


def computations(hlo):
  """{name: body text} of an HLO module's text ('ENTRY' for the entry computation)."""
  out, name, lines = {}, None, []
  for line in hlo.splitlines():
    header = re.match(r'^(ENTRY )?(%[\w.\-]+) .*\{$', line)
    if header:
      name, lines = ('ENTRY' if header.group(1) else header.group(2)), []
    elif line.startswith('}') and name:
      out[name] = '\n'.join(lines)
      name = None
    elif name:
      lines.append(line)
  return out


def permute_bytes(hlo):
  """Bytes one device sends by collective-permute in one run of the program."""
  comps = computations(hlo)

  def trip_count(condition):
    counts = re.findall(r'constant\((\d+)\)', comps[condition])
    return int(counts[0]) if len(counts) == 1 else 1

  def total(name, seen=()):
    body = comps[name]
    sent = sum(_bytes(m) for m in re.findall(
        r'= \((\w+\[[\d,]*\])[^\n]*collective-permute-start\(', body))
    sent += sum(_bytes(m) for m in re.findall(r'= (\w+\[[\d,]*\])\S* collective-permute\(', body))
    for cond, loop in re.findall(r'while\([^\n]*condition=(%[\w.\-]+), body=(%[\w.\-]+)', body):
      sent += trip_count(cond) * total(loop)
    for called in re.findall(r'(?:to_apply|calls)=(%[\w.\-]+)', body):
      if called in comps and 'collective-permute' in comps[called]:
        sent += total(called)
    for branches in re.findall(r'branch_computations=\{([^}]*)\}', body):
      sent += max(total(b.strip()) for b in branches.split(','))
    return sent
  return total('ENTRY')


def overlapped_transfers(hlo):
  """How many asynchronous collective-permutes have a conditional (a block's computation)
  scheduled between their start and their end: transfers that overlap compute."""
  count = 0
  for body in computations(hlo).values():
    open_ = {}
    for line in body.splitlines():
      start = re.search(r'(%[\w.\-]+) = .*collective-permute-start\(', line)
      if start:
        open_[start.group(1)] = 0
      for name in open_:
        open_[name] += ' conditional(' in line
      done = re.search(r'collective-permute-done\((%[\w.\-]+)\)', line)
      if done and done.group(1) in open_:
        count += open_.pop(done.group(1)) > 0
  return count


def formula(config, mesh_shape, recompute):
  """Bytes per device and step by the module docstring's formula."""
  import jax.numpy as jnp
  m = config.model
  c = mesh_shape['sequence']
  rows = config.batch_size // config.optimizer.grad_accum_steps // (
      mesh_shape['data'] * mesh_shape['fsdp'])
  kv_heads = m.num_kv_heads // mesh_shape['tensor']
  tokens = rows * m.max_len // c
  kv = tokens * kv_heads * m.head_dim * jnp.dtype(m.dtype).itemsize
  kv32 = tokens * kv_heads * m.head_dim * 4
  forward = (2 if recompute else 1) * (c - 1) * 2 * kv
  backward = (c - 1) * 2 * kv + (c - 1) * 2 * kv32 + 2 * kv
  return m.num_layers * config.optimizer.grad_accum_steps * (forward + backward), dict(
      kv=kv, forward=forward, backward=backward)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--topology', default='')
  parser.add_argument('--override', action='append', default=[])
  parser.add_argument('--quick', action='store_true')
  args = parser.parse_args()
  sys.path.insert(0, ROOT)
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jaxlm import config as config_lib, plan, run, topology as topology_lib
  overrides = [tuple(o.split('=', 1)) for o in args.override]
  config = config_lib.load(args.config, overrides)
  devices = topology_lib.devices(topology_lib.parse(args.topology)) if args.topology else None
  s = run.setup(config, devices)
  compiled = run.compile_train_step(s, s.objective.prepare(),
                                    plan.QUICK if args.quick else None)
  hlo = compiled.as_text()
  measured = permute_bytes(hlo)
  shape = dict(s.mesh.shape)
  recompute = config.model.remat_policy != 'none'
  expected, parts = formula(config, shape, recompute)
  m = config.model
  print(f'{m.num_layers} layers, length {m.max_len}, mesh {shape}, '
        f'{config.model.context_parallel}, remat {m.remat_policy} '
        f'(forward ring {"twice" if recompute else "once"})')
  print(f'per layer and micro-batch: forward {parts["forward"] / MiB:.2f} MiB, backward '
        f'{parts["backward"] / MiB:.2f} MiB (a K or V shard {parts["kv"] / MiB:.2f} MiB)')
  print(f'collective-permute per device and step: compiled {measured / MiB:.2f} MiB, formula '
        f'{expected / MiB:.2f} MiB ({100 * (measured - expected) / expected:+.1f}%); '
        f'{overlapped_transfers(hlo)} transfers overlap a block')


if __name__ == '__main__':
  main()
