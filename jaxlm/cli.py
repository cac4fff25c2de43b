"""`jaxlm <command> --config=FILE --config.a.b=VALUE --workdir=DIR`.

Exit status: 0 on success, 2 on bad input (one line on stderr), 1 on an internal failure.
Config validation runs before jax is imported, so bad input fails in well under a second.
"""

import argparse
import json
import logging
import math
import sys
import threading
import traceback
import warnings

from jaxlm import compile_cache, config as config_lib
from jaxlm.errors import ConfigError, RunError, io_reason


class _Parser(argparse.ArgumentParser):
  """argparse that raises instead of printing usage and exiting, for one-line errors."""

  def error(self, message):
    # A flag's own check (see _number) already names it: drop argparse's "argument --x: ".
    raise ConfigError(message.split(': ', 1)[1] if message.startswith('argument --') and
                      ': --' in message else message)


def _number(flag, kind, ok, rule):
  """An argparse type: text -> `kind` (int or float), finite, with ok(value); else one line
  naming the flag, e.g. '--temperature=nan must be a finite number >= 0'."""
  def parse(text):
    shown = text if text.isprintable() else repr(text)
    try:
      value = kind(text)
    except (ValueError, OverflowError):
      raise argparse.ArgumentTypeError(
          f'{flag}={shown} must be {"an integer" if kind is int else "a number"}') from None
    if kind is float and not math.isfinite(value):
      raise argparse.ArgumentTypeError(f'{flag}={shown} must be a finite number, {rule}')
    if not ok(value):
      raise argparse.ArgumentTypeError(f'{flag}={shown} must be {rule}')
    return value
  return parse


INT32 = 2 ** 31 - 1  # Token counts, positions and ids are int32 on the device.
# Simulated CPU devices cost ~0.1 MB and a superlinear start-up each (10,000: 4 minutes,
# 1.3 GB); a TPU slice is planned with --topology instead.
MAX_SIMULATED_DEVICES = 4096
MAX_SLICES = 1024
MAX_BOOTSTRAP = 100_000


def _config(args, overrides):
  """--config=FILE, or else the config.json of an existing --workdir; overrides on top."""
  if args.config:
    return config_lib.load(args.config, overrides)
  from jaxlm import workdir as workdir_lib
  config = workdir_lib.read_config(args.workdir) if args.workdir else None
  if config is None:
    raise ConfigError('--config=FILE is required (or a --workdir holding a config.json)')
  config_lib.apply_overrides(config, overrides)
  return config_lib.validate(config)


def _join(config, args):
  """Joins the other processes of a multi-host run (jax is imported from here on)."""
  from jaxlm import distributed
  if not distributed.initialize(config):
    return
  import jax
  if jax.process_index() > 0:  # Process 0 reports; the others only warn, marked with their id.
    _setup_logging(args.verbose, prefix=f'[process {jax.process_index()}] ',
                   level=None if args.verbose else logging.WARNING)
  logging.getLogger('jaxlm').info(
      'process %d of %d joined (%d local devices, %d in all)', jax.process_index(),
      jax.process_count(), jax.local_device_count(), jax.device_count())


def _train(args, overrides):
  config = _config(args, overrides)
  _require_workdir(args)
  _check_command(config, 'train')
  _join(config, args)
  compile_cache.enable(config)
  from jaxlm import train
  return train.train(config, args.workdir)


def _finetune(args, overrides):
  config = _config(args, overrides)
  _require_workdir(args)
  _check_command(config, 'finetune')
  _join(config, args)
  compile_cache.enable(config)
  from jaxlm import train
  return train.train(config, args.workdir)


def _check_command(config, command):
  """Each objective is trained by one command (a classifier by finetune)."""
  from jaxlm import objectives
  objective = objectives.get(config)
  if objective.command == command:
    return
  if command == 'finetune':
    raise ConfigError(f"jaxlm finetune trains a classifier and needs objective='classify' "
                      f"(see configs/finetune_cls.py), not {objective.name!r}")
  raise ConfigError(f"objective={objective.name!r} is not trained by jaxlm {command}: run it "
                    f"with jaxlm {objective.command}")


def _eval(args, overrides):
  _require_workdir(args)
  config = _config(args, overrides)
  _join(config, args)
  compile_cache.enable(config)
  if args.tasks:
    if args.num_fewshot is not None and args.num_fewshot < 0:
      raise ConfigError(f'--num_fewshot={args.num_fewshot} must be >= 0')
    if args.limit is not None and args.limit <= 0:
      raise ConfigError(f'--limit={args.limit} must be positive')
    if args.batch_size is not None and args.batch_size < 1:
      raise ConfigError(f'--batch_size={args.batch_size} must be at least 1')
    from jaxlm import harness
    limit = int(args.limit) if args.limit and args.limit >= 1 else args.limit
    return harness.run(config, args.workdir, args.tasks, args.step, args.num_fewshot, limit,
                       args.include_path, args.batch_size)
  from jaxlm import evaluate
  return evaluate.run(config, args.workdir, args.step)


def _fill_mask(args, overrides):
  _require_workdir(args)
  if not args.text:
    raise ConfigError('--text is required, e.g. --text="The [MASK] sat on the mat."')
  config = _config(args, overrides)
  if args.top_k > config.model.vocab_size:
    raise ConfigError(f'--top_k={args.top_k} is above the vocabulary '
                      f'(model.vocab_size={config.model.vocab_size})')
  from jaxlm import fill_mask
  fill_mask.print_results(fill_mask.run(config, args.workdir, args.text, args.top_k, args.step),
                          sys.stdout)


def _generate(args, overrides):
  _require_workdir(args)
  if not args.prompt:
    raise ConfigError('--prompt is required, e.g. --prompt="def main("')
  if args.num_beams > 1 and (args.temperature or args.top_k or args.top_p < 1):
    raise ConfigError('--num_beams searches for the likeliest text; it cannot be combined with '
                      'sampling (--temperature, --top_k, --top_p)')
  config = _config(args, overrides)
  if args.top_k > config.model.vocab_size:
    raise ConfigError(f'--top_k={args.top_k} is above the vocabulary '
                      f'(model.vocab_size={config.model.vocab_size})')
  from jaxlm import generate
  for r in generate.run(config, args.workdir, args.prompt, args.max_new_tokens,
                        args.temperature, args.top_k, args.top_p, args.seed, args.step,
                        args.num_beams, args.length_penalty):
    print(f'{r["prompt"]}{r["completion"]}\n---')
  return None


def _tokenize(args, overrides):
  config = _config(args, overrides)
  _require_workdir(args)
  from jaxlm import workdir as workdir_lib
  workdir_lib.check_writable(args.workdir)  # Not minutes of tokenizing first.
  _join(config, args)
  from jaxlm import data, objectives
  # Documents are framed as the run that will train on them frames them (BOS/EOS, [CLS]/[SEP]).
  return data.tokenize_command(config, args.workdir, objectives.get(config).frame)


def _report(args, overrides):
  _require_workdir(args)
  if overrides:
    raise ConfigError('jaxlm report reads --workdir only; it takes no --config.* overrides')
  from jaxlm import report
  report.run(args.workdir, sys.stdout)
  return None


def _plan(args, overrides):
  config = _config(args, overrides)
  if args.devices and args.topology:
    raise ConfigError('give --devices=N (simulated CPU devices) or --topology=TYPE (a TPU '
                      'slice), not both')
  if args.num_slices != 1 and not args.topology:
    raise ConfigError('--num_slices needs --topology=TYPE (the type of each slice)')
  from jaxlm import paths
  paths.check_output_file(args.json, '--json')  # Before minutes of compiling, not after.
  if args.devices:
    import os  # Must be set before jax is imported: N simulated CPU devices.
    os.environ['JAX_PLATFORMS'] = 'cpu'
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.devices}')
    if 'jax' in sys.modules:
      raise ConfigError('--devices must be given before jax is imported')
  elif args.topology:  # The host's jax runs on its CPU; the TPU compiler comes from libtpu.
    import os
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  else:
    _join(config, args)
  if not args.topology:  # jax 0.10.2 cannot load a compile-only TPU executable back.
    compile_cache.enable(config)
  from jaxlm import plan
  return plan.run(config, args.topology, args.num_slices, args.json, args.quick)


def _sweep(args, overrides):
  if not args.config:
    raise ConfigError('--config=FILE is required: a sweep config, e.g. configs/scaling/cpu_tiny.py')
  _require_workdir(args)
  from jaxlm import sweep
  config = config_lib.load_sweep(args.config, overrides)
  if args.shard == 'host':  # Before jax starts: it sets the GPUs this process may use.
    from jaxlm import distributed
    shard = distributed.run_alone()
  else:
    shard = sweep.parse_shard(args.shard)
  runs = sweep.plan(config)  # Every run's config is checked before anything is trained.
  _join(config.base, args)
  return sweep.run(config, args.workdir, shard, runs)


def _fit(args, overrides):
  _require_workdir(args)
  if overrides or args.config:
    raise ConfigError('jaxlm fit takes no --config; it reads the sweep\'s --workdir/runs.jsonl')
  from jaxlm import fit
  return fit.run(args.workdir, args.budget, args.bootstrap)


def _convert(args, overrides):
  _require_workdir(args)
  if bool(args.from_hf) == bool(args.to_hf):
    raise ConfigError('give exactly one of --from-hf=HF_DIR (import into --workdir) and '
                      '--to-hf=OUT_DIR (export the run in --workdir)')
  if args.config:
    raise ConfigError('jaxlm convert takes no --config: the model is the checkpoint\'s '
                      '(--config.a.b=V overrides still apply to an import)')
  from jaxlm import convert, paths
  for flag, location in (('--from-hf', args.from_hf), ('--to-hf', args.to_hf)):
    paths.require_utf8(location, flag)
  if args.from_hf:
    return convert.from_hf(args.from_hf, args.workdir, overrides)
  if overrides:
    raise ConfigError('--to-hf exports the run as it was trained; it takes no --config.* '
                      'overrides')
  return convert.to_hf(_config(args, ()), args.workdir, args.to_hf, args.step, args.max_shard_mb,
                       args.dtype)


def _require_workdir(args):
  if not args.workdir:
    raise ConfigError('--workdir=DIR is required')
  from jaxlm import paths
  paths.require_utf8(args.workdir, '--workdir')


COMMANDS = {
    'train': (_train, 'train a model (or resume the run in --workdir)'),
    'finetune': (_finetune, 'fine-tune a sequence classifier (objective=classify)'),
    'eval': (_eval, 'evaluate the latest checkpoint of --workdir on held-out data, or on '
                    'lm-eval-harness --tasks'),
    'fill-mask': (_fill_mask, 'print the likeliest tokens for each [MASK] of --text'),
    'generate': (_generate, 'continue --prompt texts with a causal LM (KV-cache decoding)'),
    'plan': (_plan, 'compile the train step for the mesh; print parameters, FLOPs, memory'),
    'convert': (_convert, 'import a Hugging Face checkpoint as a run, or export a run to one'),
    'sweep': (_sweep, 'train every run of a scaling-law sweep (configs/scaling/)'),
    'fit': (_fit, 'fit scaling laws to the runs of a sweep; write fit.json and plots'),
    'tokenize': (_tokenize, 'tokenize the corpus into shards and a manifest, on every process'),
    'report': (_report, 'summarise a run from --workdir: goodput, step times, PNG plots'),
}


def _parser():
  parser = _Parser(prog='jaxlm', description='JAX/Flax language-model trainer.')
  sub = parser.add_subparsers(dest='command', metavar='COMMAND', parser_class=_Parser)
  for name, (_, help_text) in COMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument('--config', default='', help='a Python file defining get_config()')
    p.add_argument('--workdir', default='', help='the run directory')
    p.add_argument('--verbose', action='store_true', help='debug logging and full tracebacks')
    if name in ('eval', 'fill-mask', 'generate', 'convert'):
      p.add_argument('--step', type=_number('--step', int, lambda v: v >= 0, 'a step >= 0'),
                     default=None, help='checkpoint step (default latest)')
    if name == 'eval':
      p.add_argument('--tasks', default='',
                     help='lm-eval-harness tasks, comma-separated (instead of held-out loss)')
      p.add_argument('--num_fewshot', type=_number('--num_fewshot', int, lambda v: v >= 0,
                                                   'an integer >= 0'), default=None,
                     help='few-shot examples per prompt (default: each task\'s own)')
      p.add_argument('--limit', type=_number('--limit', float, lambda v: v > 0, '> 0'),
                     default=None, help='at most N examples per task (below 1: that fraction)')
      p.add_argument('--include_path', default='',
                     help='a directory of lm-eval task YAML files of your own')
      p.add_argument('--batch_size', type=_number('--batch_size', int, lambda v: v > 0,
                                                  'a positive integer'), default=None,
                     help='sequences per scoring batch (default: lm_eval.batch_size)')
    if name == 'fill-mask':
      p.add_argument('--text', action='append', default=[],
                     help='a text with [MASK] where a token is missing (may be repeated)')
      p.add_argument('--top_k', type=_number('--top_k', int, lambda v: 1 <= v <= INT32,
                                             'in [1, 2**31)'),
                     default=5, help='fillers shown per mask')
    if name == 'generate':
      p.add_argument('--prompt', action='append', default=[],
                     help='a text to continue (may be repeated: one batch)')
      p.add_argument('--max_new_tokens', type=_number('--max_new_tokens', int,
                                                      lambda v: 1 <= v <= INT32,
                                                      'in [1, 2**31)'),
                     default=64, help='tokens added per prompt')
      p.add_argument('--temperature', type=_number('--temperature', float, lambda v: v >= 0,
                                                   '>= 0 (0 = greedy)'),
                     default=0.0, help='0 = greedy')
      p.add_argument('--top_k', type=_number('--top_k', int, lambda v: 0 <= v <= INT32,
                                             'in [0, 2**31) (0 = all)'),
                     default=0, help='sample from the k likeliest (0 = all)')
      p.add_argument('--top_p', type=_number('--top_p', float, lambda v: 0 < v <= 1,
                                             'in (0, 1]'),
                     default=1.0, help='nucleus sampling mass')
      p.add_argument('--seed', type=_number('--seed', int, lambda v: 0 <= v < 2**32,
                                            'in [0, 2**32)'),
                     default=0, help='sampling seed')
      p.add_argument('--num_beams', type=_number('--num_beams', int, lambda v: 1 <= v <= INT32,
                                                 'in [1, 2**31)'),
                     default=1, help='beam search with N beams (1 = off)')
      p.add_argument('--length_penalty', type=_number('--length_penalty', float,
                                                      lambda v: v >= 0, '>= 0'),
                     default=1.0,
                     help='beam search: finished beams score log-prob / length ** this')
    if name == 'convert':
      p.add_argument('--from-hf', dest='from_hf', default='',
                     help='a Hugging Face checkpoint directory to import into --workdir')
      p.add_argument('--to-hf', dest='to_hf', default='',
                     help='a new directory to export the run in --workdir to')
      p.add_argument('--max_shard_mb', type=_number('--max_shard_mb', float, lambda v: v > 0,
                                                    'positive'),
                     default=5000.0,
                     help='export: largest safetensors file; more are written with an index')
      p.add_argument('--dtype', default='', choices=('', 'float32', 'bfloat16', 'float16'),
                     help='export: tensor dtype (default: model.param_dtype)')
    if name == 'sweep':
      p.add_argument('--shard', default='0/1',
                     help='i/n: run only every n-th run, starting from the i-th (0-based); '
                          'host: each process of the job runs its own share alone')
    if name == 'fit':
      p.add_argument('--budget', type=_number('--budget', float, lambda v: v > 0,
                                              'a positive number of FLOPs, e.g. 1e18'),
                     default=None,
                     help='print the compute-optimal N and D for this many training FLOPs')
      p.add_argument('--bootstrap', type=_number('--bootstrap', int,
                                                 lambda v: 1 <= v <= MAX_BOOTSTRAP,
                                                 f'at least 1 (at most {MAX_BOOTSTRAP:,}; '
                                                 f'200 is the default)'),
                     default=200, help='resamples for the confidence intervals')
    if name == 'plan':
      p.add_argument('--devices', type=_number(
          '--devices', int, lambda v: 1 <= v <= MAX_SIMULATED_DEVICES,
          f'a positive number of devices, at most {MAX_SIMULATED_DEVICES} (a TPU slice: '
          f'--topology)'), default=None,
          help='plan for N simulated CPU devices instead of the real ones')
      p.add_argument('--topology', default='',
                     help='compile for a Cloud TPU slice, e.g. v5p-128 (needs libtpu, no TPU)')
      p.add_argument('--num_slices', type=_number('--num_slices', int,
                                                  lambda v: 1 <= v <= MAX_SLICES,
                                                  f'in [1, {MAX_SLICES}]'),
                     default=1, help='with --topology: this many slices joined over DCN')
      p.add_argument('--json', default='', help='also write the report to this file')
      p.add_argument('--quick', action='store_true',
                     help="compile with XLA's least effort: several times faster, memory "
                          'within a few percent (the verdict keeps 10%% spare)')
  return parser


def parse_overrides(rest):
  """Pairs ('a.b', 'text') from `--config.a.b=text` or `--config.a.b text`."""
  pairs, i = [], 0
  while i < len(rest):
    arg = rest[i]
    if not arg.startswith('--config.'):
      raise ConfigError(f'unrecognized argument {arg!r}')
    if '=' not in arg and i + 1 < len(rest) and not rest[i + 1].startswith('--'):
      arg, i = f'{arg}={rest[i + 1]}', i + 1
    pairs.append(config_lib.parse_override(arg))
    i += 1
  return pairs


def _setup_logging(verbose, prefix='', level=None):
  level = level or (logging.DEBUG if verbose else logging.INFO)
  logging.basicConfig(level=level, stream=sys.stderr,
                      format=f'{prefix}%(asctime)s %(levelname).1s %(message)s',
                      datefmt='%H:%M:%S', force=True)
  for noisy in ('jax', 'grain', 'tensorboardX'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  # Orbax logs through absl, and failed background writes also reach asyncio's logger; jaxlm
  # reports those failures itself, once, so their tracebacks show only with --verbose.
  for library in ('absl', 'orbax', 'asyncio'):
    logging.getLogger(library).setLevel(logging.DEBUG if verbose else logging.CRITICAL)
  if not verbose:  # The same for exceptions of their background threads and coroutines.
    quiet = logging.getLogger('jaxlm.background')
    threading.excepthook = lambda args: quiet.debug('thread: %r', args.exc_value)
    sys.unraisablehook = lambda args: quiet.debug('unraisable: %r', args.exc_value)
    warnings.filterwarnings('ignore', message='coroutine .* was never awaited')
    warnings.filterwarnings('ignore', message='Enable tracemalloc')


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = _parser()
  verbose = '--verbose' in argv
  try:
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
      parser.print_help(sys.stderr)
      return 2
    overrides = parse_overrides(rest)
    _setup_logging(args.verbose)
    result = COMMANDS[args.command][0](args, overrides)
  except ConfigError as e:
    if verbose:
      traceback.print_exc()
    message = ' '.join(str(e).split())  # Exactly one line.
    print(f'jaxlm: error: {message}', file=sys.stderr)
    return 2
  except RunError as e:
    if verbose:
      traceback.print_exc()
    print(f'jaxlm: error: {" ".join(str(e).split())}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print('jaxlm: interrupted', file=sys.stderr)
    return 130
  except OSError as e:  # A full disk or a lost mount: the environment, not the input.
    if verbose:
      traceback.print_exc()
    print(f'jaxlm: error: I/O failure: {io_reason(e)}; the run\'s saved checkpoints are kept '
          f'(--verbose shows the traceback)', file=sys.stderr)
    return 1
  except Exception:  # A bug or an environment failure, not the user's input.
    traceback.print_exc()
    print('jaxlm: internal error (traceback above); please report it', file=sys.stderr)
    return 1
  if result is not None and _is_chief():
    print(json.dumps(result))
  return 0


def _is_chief():
  jax = sys.modules.get('jax')
  return jax is None or jax.process_index() == 0


def console_main():
  """The `jaxlm` command: `main` in a process of its own, whose host allocator it may tune
  before jax starts (see host_memory)."""
  from jaxlm import host_memory
  host_memory.keep_host_memory()
  return main()
