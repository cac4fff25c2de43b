"""Scaling-law sweeps: a sweep config (configs/scaling/) becomes one ordinary training run per
(model size, compute budget) or (model size, token count), each in its own workdir.

DIR/runs/<name>/             a normal `jaxlm train` workdir: interrupted runs resume from it
DIR/runs/<name>/result.json  written once the run has finished: its row of runs.jsonl
DIR/runs.jsonl               one row per finished run (N, D, C, eval_loss, wall_s, cpu_s,
                             holdout, config),
                             rebuilt from the result files after every run, so shards on several
                             machines sharing DIR never overwrite each other's rows
DIR/tokenizer.model, DIR/data/  one tokenizer and one token cache for every run: all runs see
                             the same tokens, so their losses are comparable
DIR/tune/runs/<name>/, DIR/tune/tuned.json  with `tune` set: the grid of hyperparameters
                             trained at one size first, and the values every run then uses

Tuning once and carrying the result to every size is what muP is for (jaxlm/parametrization.py:
with base.model.parametrization='mup' the best learning rate, initialisation and output
multiplier do not move with the width); under the standard parametrization the tuned rate is
carried by the width rule (lr_width_exponent). `holdout` runs are trained like the others but
left out of the law `jaxlm fit` fits, which predicts them instead (jaxlm/fit.py).

N counts the weights that take part in matrix multiplications and C = FLOPs per token * D, both
from jaxlm/flops.py, the one place FLOPs are counted.
"""

import copy
import dataclasses
import itertools
import json
import logging
import math
import resource
import time

from jaxlm import config as config_lib
from jaxlm import flops, paths
from jaxlm import workdir as workdir_lib
from jaxlm.errors import ConfigError, RunError
from jaxlm.schema import MESH_AXES

log = logging.getLogger('jaxlm')


@dataclasses.dataclass
class Run:
  name: str
  config: object  # The complete, validated run config.
  N: int  # Matmul parameters (flops.param_counts(...)['matmul']).
  D: int  # Training tokens: train_steps * batch_size * max_len.
  C: float  # Training FLOPs: flops_per_token * D.
  budget: float  # The isoFLOP budget this run belongs to; 0 in a token grid.
  holdout: bool = False  # Left out of the fit, which predicts it (sweep.holdout).


def check(sweep):
  """One-line errors for a sweep's own fields (its base config is checked per run)."""
  for name in ('head_dim', 'mlp_ratio', 'learning_rate', 'lr_reference_width', 'min_steps'):
    if not sweep[name] > 0:
      raise ConfigError(f'{name}={sweep[name]!r} must be positive')
  if not sweep.sizes:
    raise ConfigError('sizes is empty: list the model shapes, e.g. sizes=((2, 64), (4, 128))')
  for size in sweep.sizes:
    if (not isinstance(size, (tuple, list)) or len(size) != 2
        or not all(isinstance(v, int) and v > 0 for v in size)):
      raise ConfigError(f'sizes entry {size!r} must be (num_layers, emb_dim), positive integers')
    if size[1] % sweep.head_dim:
      raise ConfigError(f'sizes entry {tuple(size)}: head_dim={sweep.head_dim} must divide '
                        f'emb_dim={size[1]}')
  if bool(sweep.budgets) == bool(sweep.tokens):
    raise ConfigError('set exactly one of budgets (isoFLOP: FLOPs per run) and tokens (a grid '
                      'of training tokens per run)')
  for name in ('budgets', 'tokens'):
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               and v > 0 for v in sweep[name]):
      raise ConfigError(f'{name}={tuple(sweep[name])!r} must all be positive finite numbers')
  for name in ('sizes', 'budgets', 'tokens'):
    twice = next((v for i, v in enumerate(sweep[name]) if v in sweep[name][:i]), None)
    if twice is not None:
      raise ConfigError(f'{name} lists {twice!r} twice; each run is trained once')
  if not 0 <= sweep.warmup_fraction < 1:
    raise ConfigError(f'warmup_fraction={sweep.warmup_fraction!r} must be in [0, 1)')
  if not 0 <= sweep.batch_compute_exponent <= 1:
    raise ConfigError(f'batch_compute_exponent={sweep.batch_compute_exponent!r} must be in '
                      f'[0, 1]')
  if sweep.max_steps < 0:
    raise ConfigError(f'max_steps={sweep.max_steps} must be >= 0 (0 = no limit)')
  if sweep.base.model.parametrization == 'mup' and sweep.lr_width_exponent:
    raise ConfigError(f'lr_width_exponent={sweep.lr_width_exponent!r} must be 0 with '
                      f"base.model.parametrization='mup': muP sets each parameter's rate from "
                      f'the width itself')
  t = sweep.tune
  for name in TUNED:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
               for v in t[name]):
      raise ConfigError(f'tune.{name}={tuple(t[name])!r} must all be positive numbers')
  if t.size and tuple(t.size) not in {tuple(size) for size in sweep.sizes}:
    raise ConfigError(f'tune.size={tuple(t.size)!r} must be one of sizes')
  if not t.tokens >= 0:
    raise ConfigError(f'tune.tokens={t.tokens!r} must be >= 0 (0 = the size\'s longest run)')
  for entry in sweep.holdout:
    if (not isinstance(entry, (tuple, list)) or len(entry) != 3
        or not all(isinstance(v, int) and v > 0 for v in entry[:2])
        or not isinstance(entry[2], (int, float)) or not entry[2] > 0):
      raise ConfigError(f'holdout entry {entry!r} must be (num_layers, emb_dim, C), C the '
                        f'training FLOPs (tokens D in a token grid)')
    if entry[1] % sweep.head_dim:
      raise ConfigError(f'holdout entry {tuple(entry)}: head_dim={sweep.head_dim} must divide '
                        f'emb_dim={entry[1]}')


# tune.<field> -> the run config field it sets.
TUNED = {'learning_rates': 'optimizer.learning_rate',
         'input_multipliers': 'model.mup_input_multiplier',
         'output_multipliers': 'model.mup_output_multiplier',
         'init_stds': 'model.init_std'}


def plan(sweep):
  """The sweep's runs, smallest compute first (held-out runs last), each with its complete
  config."""
  check(sweep)
  base = sweep.base
  shapes = ([(L, d, sweep.budgets or sweep.tokens, False) for L, d in sweep.sizes] +
            [(L, d, (target,), True) for L, d, target in sweep.holdout])
  candidates = []
  for num_layers, emb_dim, targets, holdout in shapes:
    config = _sized(base, num_layers, emb_dim, sweep)
    per_token = _flops_per_token(config)
    for target in targets:
      budget = float(target) if sweep.budgets else 0.0
      candidates.append((config, per_token, budget, budget or per_token * target, holdout))
  smallest = min(c[3] for c in candidates if not c[4])
  runs = []
  for config, per_token, budget, compute, holdout in candidates:
    config = copy.deepcopy(config)
    doublings = round(sweep.batch_compute_exponent * math.log2(compute / smallest))
    config.batch_size = base.batch_size * 2 ** doublings
    tokens_per_step = config.batch_size * config.model.max_len
    steps = max(1, round(compute / per_token / tokens_per_step))
    name = ('holdout-' if holdout else '') + (
        f'L{config.model.num_layers}-d{config.model.emb_dim}-' +
        (f'C{_short(budget)}' if budget else f'D{_short(compute / per_token)}'))
    if not holdout and (steps < sweep.min_steps or (sweep.max_steps and
                                                    steps > sweep.max_steps)):
      log.info('sweep: leaving out %s (%d steps, outside [min_steps, max_steps])', name, steps)
      continue
    config.train_steps = steps
    config.optimizer.warmup_steps = round(sweep.warmup_fraction * steps)
    config.log_every_steps = min(base.log_every_steps, steps)
    config.eval_every_steps = 0  # Only the final loss enters the fit.
    config_lib.validate(config)
    D = steps * tokens_per_step
    runs.append(Run(name, config, flops.param_counts(config.model)['matmul'], D,
                    float(per_token * D), budget, holdout))
  if not any(not r.holdout for r in runs):
    raise ConfigError('every run of the sweep is outside [min_steps, max_steps]; lower '
                      'min_steps or change budgets/tokens')
  named = {}
  for r in runs:  # A run is found by its name: two of one name would train once.
    other = named.setdefault(r.name, r)
    if other is not r:
      field = 'budgets' if sweep.budgets else 'tokens'
      raise ConfigError(f'two entries of {field}={tuple(sweep[field])!r} give the same run name '
                        f'{r.name} (names keep 3 significant digits); make them differ in the '
                        f'first 3 digits')
  return sorted(runs, key=lambda r: (r.holdout, r.budget or r.C, r.N))


def tuning_runs(sweep, runs):
  """The grid of `sweep.tune` as runs at its size (with the config of that size's longest run
  in `runs`, or tune.tokens), named by the values they try; [] without a grid."""
  grid = {name: tuple(sweep.tune[name]) for name in TUNED if sweep.tune[name]}
  if not grid:
    return []
  regular = [r for r in runs if not r.holdout]
  if sweep.tune.size:
    size = tuple(sweep.tune.size)
    mine = [r for r in regular if (r.config.model.num_layers, r.config.model.emb_dim) == size]
    if not mine:
      raise ConfigError(f'tune.size={size!r}: none of its runs is in the sweep (all outside '
                        f'[min_steps, max_steps]?)')
  else:
    smallest = min(r.N for r in regular)
    mine = [r for r in regular if r.N == smallest]
  longest = max(mine, key=lambda r: r.D)
  tokens_per_step = longest.config.batch_size * longest.config.model.max_len
  steps = (max(1, round(sweep.tune.tokens / tokens_per_step)) if sweep.tune.tokens
           else longest.config.train_steps)
  out = []
  for values in itertools.product(*grid.values()):
    config = copy.deepcopy(longest.config)
    config.train_steps = steps
    config.optimizer.warmup_steps = round(sweep.warmup_fraction * steps)
    config.log_every_steps = min(sweep.base.log_every_steps, steps)
    for name, value in zip(grid, values):
      config_lib.set_field(config, TUNED[name], float(value))
    config_lib.validate(config)
    name = '-'.join(f'{_TAGS[n]}{_short(v)}' for n, v in zip(grid, values))
    D = steps * tokens_per_step
    out.append(Run(name, config, longest.N, D, float(_flops_per_token(config) * D), 0.0))
  return out


_TAGS = {'learning_rates': 'lr', 'input_multipliers': 'in', 'output_multipliers': 'out',
         'init_stds': 'std'}


def tuned_values(sweep, grid, rows):
  """{run config field: value} of the grid run with the lowest finite held-out loss among
  `rows` (its finished runs), or None while some grid run has not finished."""
  by_name = {r['name']: r for r in rows}
  if any(g.name not in by_name for g in grid):
    return None
  finite = [g for g in grid if math.isfinite(by_name[g.name]['eval_loss'])]
  if not finite:
    raise RunError('sweep: every tuning run diverged; lower tune.learning_rates')
  best = min(finite, key=lambda g: by_name[g.name]['eval_loss'])
  values = {TUNED[n]: config_lib.get_field(best.config, TUNED[n])
            for n in TUNED if sweep.tune[n]}
  return {'run': best.name, 'eval_loss': by_name[best.name]['eval_loss'],
          'width': best.config.model.emb_dim, 'values': values}


def apply_tuned(sweep, runs, tuned):
  """Sets the tuned values in every run's config: the learning rate carried from the tuned
  width by lr_width_exponent (0 under muP, whose rules move each parameter's rate)."""
  for r in runs:
    for field, value in tuned['values'].items():
      if field == 'optimizer.learning_rate':
        value *= (tuned['width'] / r.config.model.emb_dim) ** sweep.lr_width_exponent
      config_lib.set_field(r.config, field, value)
    config_lib.validate(r.config)


def _sized(base, num_layers, emb_dim, sweep):
  config = copy.deepcopy(base)
  m = config.model
  m.num_layers, m.emb_dim = num_layers, emb_dim
  m.num_heads = emb_dim // sweep.head_dim
  m.head_dim = sweep.head_dim
  if base.model.num_kv_heads:  # Keep the base's grouping (heads per key/value head).
    m.num_kv_heads = max(1, m.num_heads * base.model.num_kv_heads // base.model.num_heads)
  else:
    m.num_kv_heads = 0
  m.mlp_dim = 8 * math.ceil(sweep.mlp_ratio * emb_dim / 8)
  config.optimizer.learning_rate = sweep.learning_rate * (
      sweep.lr_reference_width / emb_dim) ** sweep.lr_width_exponent
  return config


def _short(x):
  """1e12 -> '1e12', 2.5e5 -> '2.5e5': short, and distinct for distinct 3-digit values."""
  text = f'{x:.3g}'
  if 'e' not in text:
    return text
  mantissa, exponent = text.split('e')
  return f'{mantissa}e{int(exponent)}'



def result_path(run_dir):
  return paths.join(run_dir, 'result.json')


def runs_path(workdir):
  return paths.join(workdir, 'runs.jsonl')


def parse_shard(text):
  """'i/n' -> (i, n): this machine runs every n-th run starting from the i-th."""
  try:
    index, count = (int(v) for v in text.split('/'))
  except ValueError:
    raise ConfigError(f'--shard={text!r} must be i/n, e.g. --shard=0/4') from None
  if not 0 <= index < count:
    raise ConfigError(f'--shard={text!r}: need 0 <= i < n')
  return index, count


def run(sweep, workdir, shard=(0, 1), runs=None):
  """Trains this shard's runs (of `runs`, default plan(sweep)) that have not finished, after
  the tuning grid when the sweep has one; returns a summary."""
  import jax  # Not at import time: plans and errors come before any device is touched.

  from jaxlm import distributed

  runs = plan(sweep) if runs is None else runs
  workdir_lib.create(workdir)
  chief = jax.process_index() == 0
  tokenizer = _shared_tokenizer(sweep.base, workdir, chief, distributed)
  data_dir = paths.join(workdir, 'data')
  grid = tuning_runs(sweep, runs)
  tune = {}
  if grid:
    tune_dir = paths.join(workdir, 'tune')
    tune = _train_all(grid, shard, tune_dir, tokenizer, data_dir, chief)
    if 'preempted' in tune:
      return {'tune': tune}
    tuned = tuned_values(sweep, grid, _result_rows(tune_dir))
    if tuned is None:
      raise RunError(f'sweep: some tuning runs of {tune_dir} have not finished (other shards '
                     f'train them); run this shard again once they have')
    if chief:
      workdir_lib.atomic_write(paths.join(tune_dir, 'tuned.json'),
                               json.dumps(tuned, indent=2) + '\n')
    log.info('sweep: tuned at width %d: %s (held-out loss %.4f, run %s)', tuned['width'],
             ', '.join(f'{k}={v:.4g}' for k, v in tuned['values'].items()),
             tuned['eval_loss'], tuned['run'])
    apply_tuned(sweep, runs, tuned)
  summary = _train_all(runs, shard, workdir, tokenizer, data_dir, chief)
  if tune:
    summary['tune'] = tune
  log.info('sweep: this process used %.0f CPU seconds', cpu_seconds())
  return summary


def _train_all(runs, shard, workdir, tokenizer, data_dir, chief):
  """Trains this shard's share of `runs` in workdir/runs/ (finished ones are skipped)."""
  from jaxlm import run, train

  mine = runs[shard[0]::shard[1]]
  summary = {'runs': len(runs), 'this_shard': len(mine), 'trained': 0, 'skipped': 0,
             'failed': []}
  for i, r in enumerate(mine):
    run_dir = paths.join(workdir, 'runs', r.name)
    if paths.exists(result_path(run_dir)):
      summary['skipped'] += 1
      log.info('sweep: %s has finished; skipping it', r.name)
      continue
    r.config.data.tokenizer = tokenizer
    r.config.data.cache_dir = r.config.data.cache_dir or data_dir
    log.info('sweep: run %d of %d: %s (N=%.3g, D=%.3g, C=%.3g, %d steps of %d x %d tokens, '
             'lr %.3g)', i + 1, len(mine), r.name, r.N, r.D, r.C, r.config.train_steps,
             r.config.batch_size, r.config.model.max_len, r.config.optimizer.learning_rate)
    start, cpu = time.perf_counter(), cpu_seconds()
    try:
      config, devices = fit_mesh(r.config, run.setup)
      outcome = train.train(config, run_dir, devices)
    except RunError as e:  # One diverged run must not cost the others.
      log.error('sweep: %s failed: %s', r.name, e)
      summary['failed'].append(r.name)
      continue
    if outcome.get('preempted'):
      log.warning('sweep: preempted during %s; run the same command to resume', r.name)
      summary['preempted'] = r.name
      break
    if chief:
      _write_result(r, run_dir, time.perf_counter() - start, cpu_seconds() - cpu)
      collect(workdir)
    summary['trained'] += 1
  if chief:
    summary['finished'] = len(collect(workdir))
  if summary['failed']:
    raise RunError(f'sweep: {len(summary["failed"])} run(s) failed: '
                   f'{", ".join(summary["failed"])} (see the log above); the others are in '
                   f'{runs_path(workdir)}')
  return summary


def cpu_seconds():
  """CPU seconds (user + system, every thread) this process and its children have used: a
  run's cost on a machine whose other tenants make wall time meaningless."""
  own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                       resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def fit_mesh(config, setup):
  """(config, devices) of a mesh the run's shapes divide over: the configured mesh over every
  device if they do; else plain FSDP x data parallelism over every device, the largest FSDP
  first; else the same over fewer devices, an equal number per process. A sweep's small models
  rarely divide over a whole pod, and one that does not must not abort the others.
  `setup(config, devices)` raises ConfigError for a mesh that does not fit (run.setup)."""
  import jax
  devices = jax.devices()
  try:
    setup(config, devices)
    return config, devices
  except ConfigError as e:
    first = e
  local = max(len([d for d in devices if d.process_index == p])
              for p in range(jax.process_count()))
  for per_process in (k for k in range(local, 0, -1) if local % k == 0):
    subset = [d for d in devices if _local_index(d, devices) < per_process]
    for fsdp in (f for f in range(len(subset), 0, -1) if len(subset) % f == 0):
      candidate = copy.deepcopy(config)
      for axis in MESH_AXES:
        candidate.mesh[axis] = candidate.mesh[f'dcn_{axis}'] = 1
      candidate.mesh.data, candidate.mesh.fsdp = len(subset) // fsdp, fsdp
      try:
        setup(candidate, subset)
      except ConfigError:
        continue
      log.warning('sweep: %s; this run uses mesh data=%d x fsdp=%d over %d of the %d devices',
                  first, len(subset) // fsdp, fsdp, len(subset), len(devices))
      return candidate, subset
  raise RunError(f'no mesh fits this run ({first})')


def _local_index(device, devices):
  return [d for d in devices if d.process_index == device.process_index].index(device)


def _shared_tokenizer(base, workdir, chief, distributed):
  """The path of the tokenizer every run uses: base.data.tokenizer, or one trained once here."""
  if base.data.tokenizer:
    return base.data.tokenizer
  from jaxlm import data
  path = data.tokenizer_path(workdir)
  if chief and not paths.exists(path):
    data.save_tokenizer(data.get_tokenizer(base, workdir), workdir)
  distributed.barrier('process 0 has trained the sweep\'s tokenizer')
  return paths.normalize(path)


def _flops_per_token(config, **kwargs):
  """flops.of_run of a planned run, its objective's predictions included (a masked LM's head
  runs on its gathered predictions only)."""
  from jaxlm import objectives  # Here: an objective's module imports jax.
  return flops.of_run(config, objectives.get(config).predictions(), **kwargs)


def _write_result(r, run_dir, wall_s, cpu_s):
  final = _final_eval(run_dir, r.config.train_steps)
  row = {'name': r.name, 'N': r.N, 'D': r.D, 'C': r.C, 'budget': r.budget,
         'eval_loss': final['eval_loss'], 'eval_perplexity': final['eval_perplexity'],
         'wall_s': round(wall_s, 2), 'cpu_s': round(cpu_s, 2), 'holdout': r.holdout,
         'params': flops.param_counts(r.config.model),
         'flops_per_token': _flops_per_token(r.config),
         'flops_per_token_halved': _flops_per_token(r.config, causal_halved=True),
         'config': r.config.to_dict()}
  workdir_lib.atomic_write(result_path(run_dir), json.dumps(row, default=list) + '\n')


def _final_eval(run_dir, train_steps):
  """The eval row at the last step in metrics.jsonl (a resumed run may have written it before
  being interrupted, so it is read back rather than taken from train()'s return value)."""
  with paths.open(workdir_lib.metrics_path(run_dir)) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  for row in reversed(rows):
    if row['step'] == train_steps and 'eval_loss' in row:
      return row
  raise RunError(f'{workdir_lib.metrics_path(run_dir)} has no evaluation at step '
                 f'{train_steps}; remove {run_dir} and run the sweep again')


def collect(workdir):
  """Rebuilds runs.jsonl from every finished run's result.json; returns the rows. Only the
  sweep writes it: readers (`jaxlm fit`) use `read_runs`, which never writes."""
  rows = _result_rows(workdir)
  workdir_lib.atomic_write(runs_path(workdir), ''.join(json.dumps(r) + '\n' for r in rows))
  return rows


def _result_rows(workdir):
  rows = []
  for path in sorted(paths.glob(paths.join(workdir, 'runs', '*', 'result.json'))):
    try:
      rows.append(check_row(json.loads(paths.read_text(path)), path))
    except ValueError as e:
      raise ConfigError(f'{path} is not valid JSON: {e}') from e
  rows.sort(key=lambda r: (bool(r.get('holdout')), r['budget'] or r['C'], r['N']))  # plan()'s.
  return rows


def read_runs(workdir):
  """The rows of the finished runs, each checked: from the run directories' result.json when
  they are there (the freshest), else from DIR/runs.jsonl. Reads only."""
  if paths.isdir(paths.join(workdir, 'runs')):
    return _result_rows(workdir)
  path = runs_path(workdir)
  if not paths.exists(path):
    raise ConfigError(f'{path} not found: run jaxlm sweep --workdir={workdir} first')
  rows = []
  try:
    with paths.open(path, encoding='utf-8') as f:
      for number, line in enumerate(f, 1):
        if line.strip():
          try:
            rows.append(check_row(json.loads(line), f'{path}, line {number}'))
          except ValueError as e:
            if isinstance(e, ConfigError):
              raise
            raise ConfigError(f'{path}, line {number} is not JSON: {e}') from e
  except UnicodeDecodeError as e:
    raise ConfigError(f'{path} is not UTF-8 text: {e}') from e
  except OSError as e:  # A directory or a FIFO where the file should be.
    raise ConfigError(f'{path} cannot be read: {e.strerror or e}') from e
  return rows


def check_row(row, where):
  """A runs.jsonl row, or a ConfigError naming the first field that is missing or wrong:
  name a string, N, D, C positive numbers, eval_loss a number (NaN for a diverged run),
  holdout (if there) true or false."""
  if not isinstance(row, dict):
    raise ConfigError(f'{where}: a row must be a JSON object, not {type(row).__name__}')
  if not isinstance(row.get('name'), str):
    raise ConfigError(f'{where}: the row has no name (a string)')
  if not isinstance(row.get('holdout', False), bool):
    raise ConfigError(f'{where}: holdout={row["holdout"]!r} must be true or false '
                      f'(run {row["name"]})')
  for key in ('N', 'D', 'C', 'eval_loss', 'budget'):
    value = row.get(key)
    if key == 'budget' and value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f'{where}: {key}={value!r} must be a number (run {row["name"]})')
    if key != 'eval_loss' and not (math.isfinite(value) and value >= 0
                                   and (value > 0 or key == 'budget')):
      raise ConfigError(f'{where}: {key}={value!r} must be a positive number '
                        f'(run {row["name"]})')
  return row
