"""Peak memory and time of `jaxlm convert` both ways on a random GPT-2 and prints a table.

    python bench/convert_bench.py --n_embd=1280 --n_layer=36 [--dir=/tmp/convert_bench]

Needs the test extra (transformers, CPU torch) to build the Hugging Face model. Each
conversion runs in a fresh process; its peak is that process's VmHWM, its baseline the
resident size once jax is up, so the growth is what the conversion itself holds.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from table import print_table  # bench/table.py: scripts run from bench/.

MEASURE = '''
import json, sys
import jax
from jaxlm import cli
def status(key):
  line = next(l for l in open('/proc/self/status') if l.startswith(key + ':'))
  return int(line.split()[1]) * 1024
jax.devices()
before = status('VmRSS')
assert cli.main(sys.argv[1:]) == 0
print(json.dumps({'before': before, 'peak': status('VmHWM')}))
'''


def hf_model(directory, n_embd, n_layer):
  """A random GPT-2 (GPT-2's vocabulary and context) saved as safetensors; its bytes."""
  import transformers
  config = transformers.GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_embd // 64)
  model = transformers.GPT2LMHeadModel(config)
  model.save_pretrained(directory)
  return sum(p.numel() for p in model.parameters()), sum(
      p.numel() * p.element_size() for p in model.parameters())


def measure(*args):
  """({'before': bytes, 'peak': bytes}, seconds) of `jaxlm convert ARGS` in a fresh process
  (also the memory test's measurement, tests/test_convert.py)."""
  start = time.perf_counter()
  out = subprocess.run([sys.executable, '-c', MEASURE, 'convert', *map(str, args)],
                       capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f'jaxlm convert {" ".join(map(str, args))} failed:\n{out.stderr}')
  memory = json.loads(out.stdout.strip().splitlines()[-1])
  return memory, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--n_embd', type=int, default=1024)
  parser.add_argument('--n_layer', type=int, default=24)
  parser.add_argument('--max_shard_mb', type=float, default=1000)
  parser.add_argument('--dir', default='/tmp/convert_bench')
  args = parser.parse_args()
  shutil.rmtree(args.dir, ignore_errors=True)
  hf_dir, run_dir, back = (os.path.join(args.dir, d) for d in ('hf', 'run', 'back'))
  parameters, nbytes = hf_model(hf_dir, args.n_embd, args.n_layer)
  # A random model comes without a tokenizer; any whose vocabulary fits the model's will do.
  tokenizer = os.path.join(args.dir, 'tokenizer.json')
  _byte_level_tokenizer(tokenizer)
  rows = []
  for direction, argv in (
      ('import', ['--from-hf', hf_dir, f'--workdir={run_dir}',
                  f'--config.data.tokenizer={tokenizer}']),
      ('export', ['--to-hf', back, f'--workdir={run_dir}', f'--max_shard_mb={args.max_shard_mb}'])):
    memory, seconds = measure(*argv)
    growth = memory['peak'] - memory['before']
    rows.append({'direction': direction, 'params': f'{parameters / 1e6:.0f}M',
                 'params (GB)': nbytes / 1e9, 'process before (GB)': memory['before'] / 1e9,
                 'peak (GB)': memory['peak'] / 1e9, 'growth / params': growth / nbytes,
                 'time (s)': seconds})
  print_table(rows, float_format='.3g')
  shutil.rmtree(args.dir, ignore_errors=True)


def _byte_level_tokenizer(path):
  """A byte-level BPE tokenizer.json trained on a little standard-library text, with the
  GPT-2 end-of-text token (vocabulary well under GPT-2's 50,257)."""
  import sysconfig
  import tokenizers
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=1000, special_tokens=['<|endoftext|>'],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  stdlib = sysconfig.get_paths()['stdlib']
  tokenizer.train([os.path.join(stdlib, name) for name in ('json/decoder.py', 'os.py')], trainer)
  tokenizer.save(path)


if __name__ == '__main__':
  main()
