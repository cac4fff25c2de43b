"""Masked-LM recipes side by side at the same CPU-time budget; prints a table.

    python bench/mlm_recipe_bench.py [--budget_cpu_s=300] [--eval_rows=2048] [--cpus=0,1] \
        [--workdir=/tmp/mlm_recipes] classic modern ...

Each recipe (a config file and overrides, RECIPES below) runs in its own process pinned to one
core and one XLA thread, so a shared machine's load changes its wall time but hardly its CPU
time. A short calibration run measures the process CPU time per train step (the step, the
masking and the input pipeline; from step 20 on, past compilation); train_steps is then set
so that the steps spend --budget_cpu_s, and the run trains from scratch with that many steps
(its learning-rate schedule fitted to them). Every recipe is scored the same way: masked-token
accuracy at BERT's 15% masking on the same --eval_rows held-out rows of 128 tokens, whatever
rate it trained with. All recipes share one 2048-piece tokenizer and token cache.
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import threading
from concurrent import futures

from table import print_table  # bench/table.py: scripts run from bench/.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: (config file, overrides). 'classic' is BERT's recipe as bert_tiny shipped it.
CLASSIC = 'configs/bert_tiny_classic.py'
# modernbert's gated MLP has three matrices: mlp_dim 512 keeps the classic 768's parameters.
MODERN = (('model.family', 'modernbert'), ('model.mlp_dim', '512'), ('masking.rate', '0.3'))
RECIPES = {
    'classic': (CLASSIC, ()),
    'classic_rate30': (CLASSIC, (('masking.rate', '0.3'),)),
    'modern': (CLASSIC, MODERN),
    'modern_lr2e-3': (CLASSIC, MODERN + (('optimizer.learning_rate', '2e-3'),
                                         ('optimizer.warmup_steps', '100'))),
    'modern_lr3e-3': (CLASSIC, MODERN + (('optimizer.learning_rate', '3e-3'),
                                         ('optimizer.warmup_steps', '100'))),
    'modern_rate40_lr2e-3': (CLASSIC, MODERN + (
        ('masking.rate', '0.4'), ('optimizer.learning_rate', '2e-3'),
        ('optimizer.warmup_steps', '100'))),
    'modern_b16_lr2e-3': (CLASSIC, MODERN + (
        ('batch_size', '16'), ('optimizer.learning_rate', '2e-3'),
        ('optimizer.warmup_steps', '100'))),
    'shipped': ('configs/bert_tiny.py', ()),
}
# What every run shares: no evaluation or checkpoint inside the budget, one input thread.
COMMON = (('eval_every_steps', '0'), ('eval_batches', '1'), ('log_every_steps', '100'),
          ('checkpoint.save_every_steps', '1000000'), ('data.num_threads', '1'),
          ('data.prefetch', '2'))
CALIBRATION = (20, 100)  # Process CPU time between these train steps (calls).


def cpu_s():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def counting_steps(marks):
  """Wraps run.compile_train_step so that the process CPU time is noted at every call."""
  from jaxlm import run as run_lib
  compile_step = run_lib.compile_train_step

  def compile_and_count(*args, **kwargs):
    compiled = compile_step(*args, **kwargs)

    def step(*a):
      marks.append(cpu_s())
      return compiled(*a)
    step.memory_analysis = compiled.memory_analysis
    return step
  run_lib.compile_train_step = compile_and_count  # What each phase calls to compile.


def child(args):
  """One recipe in this (pinned) process; prints its result as the last line, JSON."""
  from jaxlm import config as config_lib, train
  path, overrides = RECIPES[args.child]
  shared = os.path.join(args.workdir, 'shared')
  common = COMMON + (('data.tokenizer', os.path.join(shared, 'tokenizer.model')),
                     ('data.cache_dir', os.path.join(shared, 'data')))
  marks = []
  counting_steps(marks)
  config = config_lib.load(os.path.join(ROOT, path), common + overrides)
  calibrate = config_lib.load(os.path.join(ROOT, path), common + overrides + (
      ('train_steps', str(CALIBRATION[1])),
      ('optimizer.warmup_steps', str(min(config.optimizer.warmup_steps, CALIBRATION[1])))))
  work = os.path.join(args.workdir, args.child)
  train.train(calibrate, os.path.join(work, 'calibration'))
  per_step = (marks[CALIBRATION[1] - 1] - marks[CALIBRATION[0] - 1]) / (
      CALIBRATION[1] - CALIBRATION[0])
  steps = max(config.optimizer.warmup_steps, int(args.budget_cpu_s / per_step))
  config = config_lib.load(os.path.join(ROOT, path), common + overrides + (
      ('train_steps', str(steps)),))
  marks.clear()
  train.train(config, os.path.join(work, 'run'))
  spent = cpu_s() - marks[0]  # From the first step to the end (one final small eval).
  result = {'recipe': args.child, 'steps': steps, 'batch': config.batch_size,
            'cpu_ms_per_step': 1e3 * per_step, 'train_cpu_s': spent,
            **held_out(config, os.path.join(work, 'run'), args.eval_rows)}
  print(json.dumps(result))


def held_out(config, workdir, rows):
  """Masked accuracy at 15% masking on `rows` held-out rows of the run's final parameters."""
  import jax
  from jaxlm import config as config_lib, data, resume, steps
  from jaxlm import mesh as mesh_lib
  config = config_lib.from_json(config_lib.to_json(config))
  config.masking.rate, config.masking.max_predictions = 0.15, 0
  config.masking.mask_fraction, config.masking.random_fraction = 0.8, 0.1
  config.batch_size, config.eval_batches = 64, rows // 64
  s, params, _ = resume.restore_for_inference(config, workdir, batch_size=64)
  corpus = data.prepare(config, workdir, s.objective.frame)
  prepare = s.objective.prepare(corpus.tokenizer)
  eval_step = jax.jit(steps.make_eval_step(s.model, s.objective, prepare))
  batches = data.eval_batches(corpus.validation, config)
  totals = {}
  with s.active():
    for batch in batches:
      stats = jax.device_get(eval_step(params, mesh_lib.to_device(batch, s.batch_sharding)))
      totals = {k: totals.get(k, 0.0) + float(v) for k, v in stats.items()}
  masked, accuracy = totals['weight'], totals['correct'] / totals['weight']
  # Binomial standard error over the masked tokens (masks within a row are nearly independent).
  return {'eval_rows': len(batches) * 64, 'masked_tokens': int(masked), 'accuracy': accuracy,
          'stderr': math.sqrt(accuracy * (1 - accuracy) / masked),
          'eval_loss': totals['loss_sum'] / masked}


def prepare_shared(workdir):
  """The shared tokenizer and token cache, built once (by the classic config's data fields)."""
  shared = os.path.join(workdir, 'shared')
  if not os.path.exists(os.path.join(shared, 'tokenizer.model')):
    from jaxlm import config as config_lib, data, objectives
    config = config_lib.load(os.path.join(ROOT, RECIPES['classic'][0]))
    config.data.cache_dir = os.path.join(shared, 'data')
    data.prepare(config, shared, objectives.get(config).frame)


def run_pinned(name, cpu, args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', JAXLM_COMPILE_CACHE='',
             XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1',
             OMP_NUM_THREADS='1')
  command = ['taskset', '-c', str(cpu), sys.executable, os.path.abspath(__file__),
             f'--child={name}', f'--workdir={args.workdir}', f'--budget_cpu_s={args.budget_cpu_s}',
             f'--eval_rows={args.eval_rows}']
  done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  with open(os.path.join(args.workdir, f'{name}.log'), 'w') as f:
    f.write(done.stdout + done.stderr)
  if done.returncode:
    return {'recipe': name, 'error': done.stderr.strip().splitlines()[-1:]}
  return json.loads(done.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('recipes', nargs='*', default=['classic', 'shipped'])
  parser.add_argument('--budget_cpu_s', type=float, default=300.0)
  parser.add_argument('--eval_rows', type=int, default=2048)
  parser.add_argument('--cpus', default='0,1', help='cores to pin runs to, one run per core')
  parser.add_argument('--workdir', default='/tmp/mlm_recipes')
  parser.add_argument('--child', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(args)
  unknown = [r for r in args.recipes if r not in RECIPES]
  if unknown:
    parser.error(f'unknown recipe {unknown[0]!r}; choose from {", ".join(RECIPES)}')
  os.makedirs(args.workdir, exist_ok=True)
  prepare_shared(args.workdir)
  cpus = args.cpus.split(',')
  with futures.ThreadPoolExecutor(len(cpus)) as pool:
    free, lock = list(cpus), threading.Lock()  # A core is lent to one run at a time.

    def run(name):
      with lock:
        cpu = free.pop()
      try:
        return run_pinned(name, cpu, args)
      finally:
        with lock:
          free.append(cpu)
    results = list(pool.map(run, args.recipes))
  for r in results:
    print(json.dumps(r))
  print_table([r for r in results if 'error' not in r])


if __name__ == '__main__':
  sys.exit(main())
