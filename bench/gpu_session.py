"""One short session on one NVIDIA GPU (an H100/H200): every GPU figure BENCHMARKS.md lacks, in
one table and one JSON.

    PYTHONPATH=. python bench/gpu_session.py [--tiny] [--steps=12]

Parts, each guarded (a failure is a row with its error; the others still run):
1. llama_1b (1.1B, sequence 2048) tokens/s and MFU in bf16, fp8 (current scaling) and fp8
   with delayed scaling (model.matmul; the output layer stays bf16);
2. bert_large (masked LM, sequences of 128 and of 512) sequences/s and MFU, with cuDNN's
   attention and XLA's;
3. packed documents (8 per row of 2048) through a 4-layer llama_1b-width model, cuDNN's
   packed flash attention against XLA's: tokens/s, and the loss and logits of a small packed
   batch under both against each other (numerics).
Steps are timed by bench/train_bench.py (`bench`: a compiled step on batches already on the
device, a few warm-up steps, then --steps timed with one sync). Synthetic tokens: no
tokenizer, no corpus. MFU is against the device's bf16 dense peak (989 TFLOP/s for H100 and
H200) with `6N + 12LHQT` FLOPs per token and the causal-halved variant; 8-bit matmuls do not
change the count.

Besides jax (with CUDA), flax, optax, orbax-checkpoint and sentencepiece, this path imports
ml-collections (with PyYAML), grain (with array-record, cloudpickle, portpicker, attrs),
tokenizers and fsspec (all pure Python but array-record and tokenizers; `pip install
--no-deps` of their wheels is enough). `--parts=llama,bert,packed,numerics` picks parts (a
rerun of the ones that failed).

--tiny runs the same code on stand-in sizes (a few layers of width 64), for a check on a CPU
(where cuDNN does not exist: the attention part then compares XLA with itself). With $OUT set,
the figures are also written to $OUT/gpu_session.json.
"""

import argparse
import json
import os
import sys
import time
import traceback

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm import config as config_lib  # noqa: E402
from jaxlm import steps  # noqa: E402
from jaxlm import run as run_lib  # noqa: E402
from jaxlm import state as state_lib  # noqa: E402
from table import print_table  # noqa: E402 - bench/table.py: scripts run from bench/.
from train_bench import bench  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name, tiny, **fields):
  """configs/<name>.py with `fields` ('a__b': value) set, shrunk to stand-in sizes if tiny."""
  config = config_lib.load(os.path.join(ROOT, 'configs', f'{name}.py'), ())
  config.optimizer.grad_accum_steps = 1
  if tiny:  # The caller's fields win.
    fields = {'model__num_layers': 2, 'model__emb_dim': 64, 'model__num_heads': 4,
              'model__num_kv_heads': 2, 'model__mlp_dim': 128, 'model__vocab_size': 512,
              'model__max_len': min(128, config.model.max_len), 'loss_chunk': 0, **fields}
  for name_, value in fields.items():
    *parents, leaf = name_.split('__')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config_lib.validate(config)


def packed_batch(config, documents=8, seed=0):
  """Random tokens in `documents` documents of random lengths per row: segment ids 1..n,
  positions restarting at each document."""
  rng = np.random.RandomState(seed)
  rows, length = config.batch_size, config.model.max_len
  segment_ids = np.zeros((rows, length), np.int32)
  positions = np.zeros((rows, length), np.int32)
  for r in range(rows):
    cuts = np.sort(rng.choice(np.arange(1, length), documents - 1, replace=False))
    for d, (a, b) in enumerate(zip([0, *cuts], [*cuts, length])):
      segment_ids[r, a:b], positions[r, a:b] = d + 1, np.arange(b - a)
  tokens = rng.randint(0, config.model.vocab_size, (rows, length)).astype(np.int32)
  return {'tokens': tokens, 'segment_ids': segment_ids, 'positions': positions}


def timed(part, config, num_steps, warmup, batch=None, **labels):
  """A row of `bench`'s figures for `config`, or the error that stopped it."""
  start = time.perf_counter()
  try:
    r = bench(config, num_steps, warmup, batch)
    m = config.model
    row = {'part': part, **labels, 'batch': f'{config.batch_size}x{m.max_len}',
           'tokens_per_s': r['tokens_per_s'], 'seqs_per_s': r['tokens_per_s'] / m.max_len,
           'mfu': r['mfu'], 'mfu_causal_halved': r['mfu_causal_halved'], 'step_ms': r['step_ms'],
           'memory_gib': r['memory_mib'] / 1024, 'compile_s': r['compile_s'], 'error': ''}
  except Exception as e:  # noqa: BLE001 - one failed part must not lose the others.
    traceback.print_exc()
    row = {'part': part, **labels, 'error': f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'}
  row['wall_s'] = time.perf_counter() - start
  print(json.dumps(row), flush=True)
  return row


def attention_numerics(tiny, kinds):
  """max |logits difference| and the loss difference of one small packed batch under two
  attention implementations, same parameters."""
  start = time.perf_counter()
  try:
    configs = [load('llama_1b', True, model__attention=k, model__max_len=256, batch_size=2,
                    model__head_dim=64) for k in kinds]
    batch = jax.tree.map(jnp.asarray, packed_batch(configs[0], documents=5, seed=1))
    s = run_lib.setup(configs[0], jax.devices()[:1])
    with s.active():
      params = state_lib.initialize(s.model, s.tx, configs[0], s.shardings).params
    outs = []
    for config in configs:
      s = run_lib.setup(config, jax.devices()[:1])
      prepared = s.objective.prepare()(batch, jax.random.key(0))
      with s.active():
        logits, loss = jax.jit(lambda p, b: (
            steps.apply(s.model, p, b).astype(jnp.float32),
            steps.model_loss(s.model, s.objective, p, b)[1]['loss_sum']))(params, prepared)
      weight = float(jnp.sum(prepared['weights']))
      real = np.asarray(batch['segment_ids']) > 0
      outs.append((np.asarray(logits)[real], float(loss) / weight))
    (a, loss_a), (b, loss_b) = outs
    row = {'part': 'attention numerics', 'attention': ' vs '.join(kinds),
           'batch': f'2x256, 5 documents/row', 'max_abs_logit_diff': float(np.abs(a - b).max()),
           'logit_scale': float(np.abs(b).max()), 'loss': loss_a, 'loss_diff': loss_a - loss_b,
           'error': ''}
  except Exception as e:  # noqa: BLE001
    traceback.print_exc()
    row = {'part': 'attention numerics', 'attention': ' vs '.join(kinds),
           'error': f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'}
  row['wall_s'] = time.perf_counter() - start
  print(json.dumps(row), flush=True)
  return row


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true', help='stand-in sizes (a CPU check)')
  parser.add_argument('--steps', type=int, default=12, help='timed steps per row')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--llama_batch', type=int, default=16, help='sequences of 2048')
  parser.add_argument('--bert_batch', type=int, default=256, help='sequences of 128')
  parser.add_argument('--matmuls', default='default,fp8,fp8_delayed',
                      help='model.matmul kinds of the llama_1b part')
  parser.add_argument('--parts', default='llama,bert,packed,numerics',
                      help='which parts to run (a rerun of the ones that failed)')
  args = parser.parse_args(argv)
  tiny, n, w = args.tiny, args.steps, args.warmup
  device = jax.devices()[0]
  gpu = device.platform == 'gpu'
  print(f'{jax.device_count()} x {device.device_kind} ({device.platform}), jax '
        f'{jax.__version__}', flush=True)
  started = time.perf_counter()
  rows, parts = [], args.parts.split(',')
  kinds = ('cudnn', 'xla') if gpu else ('xla', 'xla')
  # 1. llama_1b, bf16 against fp8 (the output layer stays bf16: model.matmul_keep).
  for matmul in args.matmuls.split(',') if 'llama' in parts else ():
    config = load('llama_1b', tiny, batch_size=4 if tiny else args.llama_batch,
                  model__remat_policy='minimal', model__matmul=matmul)
    rows.append(timed('llama_1b', config, n, w, matmul=matmul, attention=config.model.attention))
  # 2. bert_large at its two phases' lengths (128, then 512 at a quarter of the rows), with
  # cuDNN's attention and XLA's: 'auto' takes XLA's below attention.CUDNN_MIN_LENGTH.
  for length in (128, 512) if 'bert' in parts else ():
    for attention in kinds:
      config = load('bert_large', tiny, batch_size=4 if tiny else args.bert_batch * 128 // length,
                    model__max_len=length, model__remat_policy='none', loss_chunk=0,
                    model__attention=attention)
      rows.append(timed('bert_large', config, n, w, matmul='default', attention=attention))
  # 3. Packed documents: cuDNN's packed flash attention against XLA's.
  for attention in kinds if 'packed' in parts else ():
    config = load('llama_1b', tiny, batch_size=8, model__num_layers=2 if tiny else 4,
                  model__remat_policy='minimal', model__attention=attention)
    rows.append(timed('packed 8 docs/row', config, n, w, packed_batch(config),
                      matmul='default', attention=attention))
  if 'numerics' in parts:
    rows.append(attention_numerics(tiny, kinds))
  columns = list(dict.fromkeys(k for r in rows for k in r))
  print_table([{k: r.get(k, '') for k in columns} for r in rows])
  print(f'all parts: {time.perf_counter() - started:.0f} s', flush=True)
  if os.environ.get('OUT'):
    with open(os.path.join(os.environ['OUT'], 'gpu_session.json'), 'w') as f:
      json.dump({'device': device.device_kind, 'jax': jax.__version__, 'tiny': tiny,
                 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main(sys.argv[1:])
