"""Fingerprints the compiled train step of some configs and prints a table: a refactor that
must not change the computation (or its speed) leaves every fingerprint as it was.

    python bench/step_fingerprint.py [--config=configs/X.py[:a.b=v,...] ...]

The fingerprint hashes XLA's optimized HLO for one CPU device, without the source locations
(file and function names) it records for profiles. Run it on the commits before and after and
compare the columns: equal hashes mean the same program, so the same losses and step time.
"""

import argparse
import hashlib
import re
import sys

import jax

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm import run as run_lib
from table import print_table  # bench/table.py: scripts run from bench/.

DEFAULT = ('configs/gpt_tiny.py', 'configs/bert_tiny.py', 'configs/llama_10m_cpu.py',
           'configs/gpt_tiny.py:loss_chunk=64,optimizer.grad_accum_steps=2')


def fingerprint(spec):
  path, _, overrides = spec.partition(':')
  config = config_lib.load(path, cli.parse_overrides(
      [f'--config.{o}' for o in overrides.split(',') if o]))
  s = run_lib.setup(config, jax.devices()[:1])
  text = run_lib.compile_train_step(s, s.objective.prepare()).as_text()
  text = re.sub(r', metadata=\{[^}]*\}', '', text)
  if 'StackFrames' in text:  # The tables of source locations end at the first blank line.
    text = text[text.index('\n\n', text.index('StackFrames')):]
  text = re.sub(r', stack_frame_id=\d+', '', text)
  return {'config': spec, 'hlo_sha256': hashlib.sha256(text.encode()).hexdigest()[:16],
          'hlo_chars': len(text)}


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', action='append', default=[])
  args = parser.parse_args(argv)
  print_table([fingerprint(spec) for spec in args.config or DEFAULT])


if __name__ == '__main__':
  main(sys.argv[1:])
