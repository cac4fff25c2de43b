"""Parameter counts, training FLOPs per token and MFU: the one place they are computed.

FLOPs per token follow Kaplan et al. / PaLM / nanoGPT: `6 N + 12 L H Q T`, where N counts the
weights that take part in matrix multiplications (every dense kernel and the output
projection, whether or not it is tied to the input embedding; not the embedding lookups), L is
the number of layers, H the number of query heads, Q the head width and T the sequence length.
The second term is attention's QK^T and AV; a causal mask makes half of it unnecessary, which
`causal_halved=True` reports (MaxText-style), while the non-halved figure is the convention most
papers quote. `embeddings=False` leaves the output projection out of N as well (Kaplan et
al.'s non-embedding count, whose scaling laws are cleaner for small models).

tests/test_scaling.py checks these counts against XLA's own cost analysis of the compiled step.
"""

import json
import os
import socket
import time

# Dense bf16 peak FLOP/s per chip (no sparsity), from the vendors' data sheets.
PEAK_FLOPS = {
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'NVIDIA A100': 312e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,  # v5e
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,  # v6e (Trillium)
    'TPU v6e': 918e12,
}


def param_counts(m):
  """Analytic parameter counts of a model config: {'total', 'embedding', 'matmul',
  'non_embedding'} ('matmul' = 'non_embedding' + the output projection)."""
  d, f, v, L = m.emb_dim, m.mlp_dim, m.vocab_size, m.num_layers
  q_width, kv_width = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
  bias = 1 if m.use_bias else 0
  attention = d * q_width + 2 * d * kv_width + q_width * d
  attention += bias * (q_width + 2 * kv_width + d)
  mlp_in = 2 if m.gated_mlp else 1
  mlp = mlp_in * d * f + f * d + bias * (mlp_in * f + d)
  norm = d * (2 if m.norm == 'layernorm' and m.use_bias else 1)
  per_layer = attention + mlp + 2 * norm
  token_embed = v * d
  position_embed = m.max_len * d if m.position == 'learned' else 0
  type_embed = m.type_vocab_size * d
  unembed = 0 if m.tied_embeddings else d * v
  head = (d * d + bias * d + norm) if m.head_transform else 0  # BERT's MLM transform.
  output_bias = v if m.output_bias else 0
  total = (L * per_layer + norm + token_embed + position_embed + type_embed + unembed + head
           + output_bias)
  layer_matmul = d * q_width + 2 * d * kv_width + q_width * d + mlp_in * d * f + f * d
  non_embedding = L * layer_matmul + (d * d if m.head_transform else 0)
  return {
      'total': total,
      'embedding': token_embed + position_embed + type_embed,
      'layers': L * layer_matmul,  # The blocks' matmuls: every position runs them.
      'matmul': non_embedding + d * v,  # The output projection always multiplies.
      'non_embedding': non_embedding,
  }


def flops_per_token(m, seq_len=None, causal_halved=False, embeddings=True, head_fraction=1):
  """Training (forward + backward) FLOPs per token: 6 N + 12 L H Q T (halved attention:
  6 L H Q T; embeddings=False: N without the output projection). `head_fraction`: the share
  of positions the output head (BERT's transform and the projection) runs on; a masked LM
  that gathers its predictions runs it on max_predictions of max_len (`of_run`)."""
  seq_len = m.max_len if seq_len is None else seq_len
  attention = 12 * m.num_layers * m.num_heads * m.head_dim * seq_len
  counts = param_counts(m)
  head = counts['matmul' if embeddings else 'non_embedding'] - counts['layers']
  n = counts['layers'] + head * head_fraction
  return 6 * n + (attention // 2 if causal_halved else attention)


def of_run(config, predictions, **kwargs):
  """flops_per_token of a run's model, its head on `predictions` positions per row (the
  objective's, objectives.base.Objective.predictions; None = every position)."""
  return flops_per_token(config.model, head_fraction=head_fraction(config, predictions),
                         **kwargs)


def head_fraction(config, predictions):
  """The share of positions a run's output head runs on (a masked LM's gathered ones)."""
  return 1 if predictions is None else predictions / config.model.max_len


def matmul_weights(m, head_fraction=1):
  """{layer (matmuls.LAYERS): the weights it multiplies each token by}: N of `6 N` by layer,
  the head's scaled by the share of positions it runs on (a classifier's are left out, as
  in param_counts: one row per sequence)."""
  d, f, L = m.emb_dim, m.mlp_dim, m.num_layers
  q_width, kv_width = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
  weights = {'query': L * d * q_width, 'key': L * d * kv_width, 'value': L * d * kv_width,
             'out': L * q_width * d, 'wi': L * d * f, 'wo': L * f * d}
  if m.gated_mlp:
    weights['wi_gate'] = L * d * f
  if m.head_transform:
    weights['head_dense'] = d * d * head_fraction
  weights['output'] = d * m.vocab_size * head_fraction
  return weights


def matmul_precisions(config, predictions):
  """([(layers, what they compute in)], the share of the step's model FLOPs (6N + 12LHQT)
  run in 8 bits) under model.matmul and model.matmul_keep; `predictions` as in `of_run`."""
  from jaxlm import matmuls  # Here: the kinds' modules import jax.
  m = config.model
  groups, eight_bit = {}, 0.0
  for layer, weights in matmul_weights(m, head_fraction(config, predictions)).items():
    kind = matmuls.kind_of(m, layer)
    groups.setdefault(matmuls.precision(kind, m.dtype), []).append(layer)
    eight_bit += 2 * weights * matmuls.eight_bit_passes(kind)  # 2 FLOPs per weight per pass.
  return ([(layers, precision) for precision, layers in groups.items()],
          eight_bit / of_run(config, predictions))


def device_peak_flops(device=None):
  """(peak FLOP/s of one device, where the number came from). Devices without a data sheet
  (CPUs) are measured once per machine and the figure kept (`peak_cache_path`): re-measured
  at every start it moved by 30% on a shared machine, so a resumed run's MFU rose while its
  tokens/s fell."""
  import jax  # Here, not at the top: counting FLOPs must not need a device.
  device = device or jax.devices()[0]
  kind = getattr(device, 'device_kind', '')
  for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(name):
      return peak, f'{kind} data sheet (bf16 dense)'
  path = peak_cache_path()
  key = f'{device.platform}:{kind}:{socket.gethostname()}:{os.cpu_count()} cores'
  cached = _read_peaks(path).get(key)
  source = f'measured float32 matmul rate of this {kind or "device"}'
  if isinstance(cached, (int, float)) and cached > 0:
    return float(cached), f'{source}, kept in {path}'
  peak = measured_matmul_flops()
  if path:
    _write_peak(path, key, peak)
  return peak, source + (f', now kept in {path} (delete it to measure again)' if path else '')


def peak_cache_path():
  """The file of measured peaks per machine: $JAXLM_PEAK_CACHE ('' = none: measure in every
  process), else peak_flops.json in the user's cache directory."""
  if 'JAXLM_PEAK_CACHE' in os.environ:
    return os.environ['JAXLM_PEAK_CACHE']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'jaxlm', 'peak_flops.json')


def _read_peaks(path):
  try:
    with open(path) as f:
      peaks = json.load(f)
  except (OSError, ValueError):
    return {}  # None yet, or unreadable: measure (and write it anew).
  return peaks if isinstance(peaks, dict) else {}


def _write_peak(path, key, peak):
  """Adds the machine's peak to the file (atomically: processes starting together may race;
  either's figure is fine). A cache that cannot be written is not an error."""
  try:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    peaks = {**_read_peaks(path), key: peak}
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      json.dump(peaks, f, indent=1)
    os.replace(tmp, path)
  except OSError:
    pass


_MEASURED = {}


def measured_matmul_flops(n=1024, repeats=24):
  """Sustained FLOP/s of a large float32 matmul on the default device (cached per process).
  The best of many repeats: a shared machine's momentary slowdowns must not lower the peak
  (which would inflate MFU)."""
  import jax
  import jax.numpy as jnp
  if n not in _MEASURED:
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float('inf')
    for _ in range(repeats):
      start = time.perf_counter()
      matmul(a, a).block_until_ready()
      best = min(best, time.perf_counter() - start)
    _MEASURED[n] = 2 * n ** 3 / best
  return _MEASURED[n]


def mfu(tokens_per_s, flops_per_token_, num_devices, peak_per_device):
  """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
  return tokens_per_s * flops_per_token_ / (num_devices * peak_per_device)
