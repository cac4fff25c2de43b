"""lm-eval-harness tasks on a jaxlm model: `jaxlm eval --tasks=a,b` on a checkpoint, and the
`DownstreamEval` hook every `lm_eval.every_steps` during training.

`JaxLM` is an lm-eval `LM` (through its `TemplateLM`, so contexts and continuations are split
into tokens exactly as its Hugging Face backend splits them): loglikelihood,
loglikelihood_rolling and generate_until, in batches of fixed shapes (rows a multiple of the
devices the batch splits over, lengths rounded up to LENGTH_BUCKET) so that a few compiled
programs serve a whole evaluation. It runs on the run's own mesh with the parameters sharded
as in training (inference.py): a model that needs a slice to train is scored on that slice.

Texts are framed as the run's exported Hugging Face tokenizer frames them (hf_tokenizer.py): a
context starts with BOS where that tokenizer adds one, so `jaxlm eval` and lm-eval's `hf`
backend on `jaxlm convert --to-hf`'s export score the same tokens (tests/test_harness.py).
One difference, on purpose: loglikelihood_rolling (perplexity tasks) scores a document's own
tokens after a BOS prefix, where the `hf` backend, whose tokenizer adds BOS, also scores that
BOS given the BOS prefix.
"""

import functools
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import data, hf_tokenizer, inference, paths
from jaxlm import run as run_lib
from jaxlm.errors import ConfigError
from jaxlm.loop import Hook

try:
  from lm_eval.api.model import TemplateLM
except ImportError:  # lm-eval is an extra: `run` says how to install it.
  TemplateLM = object

log = logging.getLogger('jaxlm')

LENGTH_BUCKET = 64  # Sequence lengths are rounded up to a multiple: few compiled shapes.
MAX_GEN_TOKS = 256  # lm-eval's default for generate_until, as its backends use.


def _install_hint(e):
  return ConfigError(f'lm-eval-harness tasks need lm-eval: pip install -e ".[eval]" ({e})')


class JaxLM(TemplateLM):
  """An lm-eval language model over `model` (inference.Model) and the run's tokenizer."""

  def __init__(self, model, tokenizer, config, batch_size=8):
    if TemplateLM is object:
      raise _install_hint('not installed')
    super().__init__()
    self.m, self.tok, self.config = model, tokenizer, config
    self.batch_size = model.padded_rows(batch_size)
    self.max_length = config.model.max_len
    # Whether the exported tokenizer puts BOS before a text (jaxlm's own framing does).
    self.adds_bos = hf_tokenizer.adds_bos(tokenizer, model.setup.objective.frame(tokenizer))
    s = model.setup
    batch = model.sharding(('batch', 'length'))
    whole = NamedSharding(s.mesh, PartitionSpec())  # Every process reads the whole result.
    self._score = jax.jit(functools.partial(_score, s.model),
                          in_shardings=(s.shardings.params, batch, batch),
                          out_shardings=(whole, whole))

  # ---- what TemplateLM asks

  @property
  def eot_token_id(self):
    return self.tok.eos_id

  @property
  def prefix_token_id(self):
    return self.tok.bos_id if self.tok.bos_id >= 0 else self.tok.eos_id

  @property
  def tokenizer_name(self):
    return self.tok.path or 'jaxlm'

  def tok_encode(self, string, add_special_tokens=None, **kwargs):
    ids = self.tok.encode([string])[0]
    if add_special_tokens is False or not self.adds_bos:
      return ids
    return [self.tok.bos_id, *ids]

  def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
    """(log-probability of the continuation, whether greedy decoding gives it) per request
    ((context, continuation) strings, context ids, continuation ids), longest first."""
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
    out = [None] * len(requests)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      # The last max_length + 1 tokens: max_length inputs, each predicting the next.
      seqs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):] for i in chunk]
      length = self._bucket(max(len(q) - 1 for q in seqs), self.max_length)
      inputs = np.zeros((self.batch_size, length), np.int32)
      targets = np.zeros_like(inputs)
      for row, q in enumerate(seqs):
        inputs[row, :len(q) - 1], targets[row, :len(q) - 1] = q[:-1], q[1:]
      with self.m.setup.active():
        logp, greedy = self._score(self.m.params, self.m.put(inputs, ('batch', 'length')),
                                   self.m.put(targets, ('batch', 'length')))
      logp, greedy = np.asarray(logp), np.asarray(greedy)
      for row, (i, q) in enumerate(zip(chunk, seqs)):
        span = slice(len(q) - 1 - len(requests[i][2]), len(q) - 1)
        out[i] = (float(logp[row, span].sum()), bool(greedy[row, span].all()))
        if requests[i][0] is not None:
          self.cache_hook.add_partial('loglikelihood', requests[i][0], out[i])
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    """The log-likelihood of each whole text, in windows of max_length tokens, each
    conditioned on the one before (lm-eval's rolling windows)."""
    from lm_eval import utils
    windows, owner = [], []
    for n, request in enumerate(requests):
      ids = self.tok_encode(request.args[0], add_special_tokens=False)
      for context, continuation in map(utils.make_disjoint_window,
                                       utils.get_rolling_token_windows(
                                           ids, self.prefix_token_id, self.max_length, 1)):
        windows.append((None, context, continuation))
        owner.append(n)
    totals = [0.0] * len(requests)
    for n, (logp, _) in zip(owner, self._loglikelihood_tokens(windows)):
      totals[n] += logp
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', request.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm=False):
    """Greedy (or, with do_sample, sampled) continuations, cut at the first stop sequence."""
    from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                      postprocess_generated_text)
    from jaxlm import generate
    groups = {}
    for i, request in enumerate(requests):
      context, kwargs = request.args
      groups.setdefault(json.dumps(kwargs, sort_keys=True, default=str), []).append(i)
    out = [None] * len(requests)
    eos = self.tok.decode([self.eot_token_id]) or None
    for indices in groups.values():
      kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], MAX_GEN_TOKS)
      until = handle_stop_sequences(kwargs.pop('until', None), eos)
      new = kwargs.pop('max_gen_toks')
      if new >= self.max_length:
        raise ConfigError(f'a task asks for {new} generated tokens; model.max_len='
                          f'{self.max_length} leaves no room for its prompt')
      sampling = dict(temperature=float(kwargs.get('temperature', 0.0)) if kwargs.get(
          'do_sample') else 0.0, top_k=int(kwargs.get('top_k') or 0),
                      top_p=float(kwargs.get('top_p') or 1.0))
      prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - new):]
                 for i in indices}
      order = sorted(indices, key=lambda i: -len(prompts[i]))
      for start in range(0, len(order), self.batch_size):
        chunk = order[start:start + self.batch_size]
        length = self._bucket(len(prompts[chunk[0]]), self.max_length - new)
        tokens = np.zeros((self.batch_size, length), np.int32)
        lengths = np.ones(self.batch_size, np.int32)
        for row, i in enumerate(chunk):
          tokens[row, :len(prompts[i])], lengths[row] = prompts[i], len(prompts[i])
        with self.m.setup.active():
          ids, count = generate.decode(
              self.m.setup.model, self.m.params, self.m.put(tokens, ('batch', None)),
              self.m.put(lengths, ('batch',)), 0, new, stop_ids=(self.eot_token_id,),
              **sampling)
        ids, count = inference.gather(ids), inference.gather(count)
        for row, i in enumerate(chunk):
          text = self.tok.decode([int(t) for t in ids[row, :count[row]]
                                  if t != self.eot_token_id])
          out[i] = postprocess_generated_text(text, until, None)
          self.cache_hook.add_partial('generate_until', requests[i].args, out[i])
    return out

  def _bucket(self, length, limit):
    """`length` rounded up to LENGTH_BUCKET (and to the devices the length splits over), at
    most `limit`."""
    step = int(np.lcm(LENGTH_BUCKET, self.m.splits('length')))
    return max(min(-(-length // step) * step, limit), 1)


def _score(model, params, inputs, targets):
  """Each position's log-probability of its target, and whether it is the argmax."""
  logits = model.apply({'params': params}, inputs).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits)
  target = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return target, jnp.argmax(logits, axis=-1) == targets


def task_names(tasks):
  return [t.strip() for t in tasks.split(',') if t.strip()] if isinstance(tasks, str) else list(
      tasks)


def task_manager(tasks, include_path=''):
  """lm-eval's TaskManager for `tasks`: the tasks under `include_path` alone when they are all
  there (indexing lm-eval's thousands of built-in tasks takes 10 s or more), else those and
  the built-in ones; a ConfigError names a task that is in neither."""
  try:
    import lm_eval
    from lm_eval.tasks import TaskManager
  except ImportError as e:
    raise _install_hint(e) from e
  names = task_names(tasks)
  if include_path and not paths.isdir(include_path):
    raise ConfigError(f'--include_path={include_path} is not a directory of task YAML files')
  if include_path:
    manager = TaskManager(include_path=include_path, include_defaults=False)
    if all(n in manager.all_tasks for n in names):
      return manager
  manager = TaskManager(include_path=include_path or None)
  missing = [n for n in names if n not in manager.all_tasks]
  if missing:
    raise ConfigError(f'{", ".join(missing)} is not an lm-eval task (lm-eval '
                      f'{lm_eval.__version__}; tasks of your own: --include_path=DIR of YAML)')
  return manager


def evaluate(lm, tasks, num_fewshot=None, limit=None, include_path='', bootstrap_iters=100_000,
             manager=None, log_samples=False):
  """lm-eval's `simple_evaluate` of `lm` on `tasks` (names, comma-separated or a list); returns
  its results dict."""
  import lm_eval
  manager = manager or task_manager(tasks, include_path)
  return lm_eval.simple_evaluate(model=lm, tasks=task_names(tasks), num_fewshot=num_fewshot,
                                 limit=limit, task_manager=manager, log_samples=log_samples,
                                 bootstrap_iters=bootstrap_iters)


def metrics_row(results):
  """{'lm_eval/<task>/<metric>': value} of a results dict; a filter other than lm-eval's
  'none' is kept in the name (`exact_match_strict-match`)."""
  row = {}
  for task, metrics in results['results'].items():
    for key, value in metrics.items():
      name, _, filtered = key.partition(',')
      if isinstance(value, (int, float)) and not isinstance(value, bool) and filtered:
        suffix = '' if filtered == 'none' else f'_{filtered}'
        row[f'lm_eval/{task}/{name}{suffix}'] = float(value)
  return row


def save(results, workdir, step):
  """Writes <workdir>/lm_eval/step_<step>.json (the results, per-task configs and versions)."""
  path = paths.join(workdir, 'lm_eval', f'step_{step}.json')
  paths.makedirs(paths.parent(path))
  keep = {k: v for k, v in results.items() if k != 'samples'}
  paths.atomic_write(path, json.dumps({'step': step, **keep}, indent=2, default=str))
  return path


def check(objective):
  """A clear error unless the run's model (of `objective`) can be scored by lm-eval: a causal
  LM."""
  if not objective.generates:
    raise ConfigError(f'lm-eval tasks need a causal LM (objective=causal); this run is '
                      f'{objective.name!r}')


def run(config, workdir, tasks, step=None, num_fewshot=None, limit=None, include_path='',
        batch_size=None):
  """`jaxlm eval --tasks`: the tasks on checkpoint `step` (default: the latest) of the run in
  `workdir`; writes lm_eval/step_<N>.json and a metrics row; returns {task: {metric: value}}."""
  s = run_lib.setup(config)
  check(s.objective)
  tokenizer = data.run_tokenizer(config, workdir)
  model = inference.load(s, workdir, step)
  lm = JaxLM(model, tokenizer, config, batch_size or config.lm_eval.batch_size)
  begin = time.perf_counter()
  results = evaluate(lm, tasks, num_fewshot, limit, include_path)
  log.info('lm-eval %s on step %d: %.0f s', tasks, model.step, time.perf_counter() - begin)
  if jax.process_index() == 0:
    from jaxlm import metrics
    log.info('results in %s', save(results, workdir, model.step))
    writer = metrics.Writer(workdir)
    try:
      writer.write(model.step, metrics_row(results))
    finally:
      writer.close()
  return {'step': model.step, 'results': results['results']}


class DownstreamEval(Hook):
  """lm-eval tasks (`lm_eval.tasks`) on the training parameters every `lm_eval.every_steps`
  and at the end, on the training mesh; results to metrics (`lm_eval/<task>/<metric>`) and
  <workdir>/lm_eval/step_<N>.json."""

  timed_as = 'eval'

  def __init__(self, s, tokenizer, writer, workdir, chief):
    check(s.objective)
    c = s.config.lm_eval
    self.options, self.writer, self.workdir, self.chief = c, writer, workdir, chief
    self.lm = JaxLM(inference.Model(s, None), tokenizer, s.config, c.batch_size)  # Params: each time.
    self.manager = task_manager(c.tasks, c.include_path)  # A bad task name fails at start.
    self.done = None

  def evaluate(self, summary):
    self.lm.m.params = summary.state.params
    o = self.options
    results = evaluate(self.lm, o.tasks, o.num_fewshot if o.num_fewshot >= 0 else None,
                       o.limit or None, bootstrap_iters=0, manager=self.manager)
    row = metrics_row(results)
    self.writer.write(summary.step, row)
    if self.chief:
      save(results, self.workdir, summary.step)
    log.info('step %d: %s', summary.step, ', '.join(f'{k[len("lm_eval/"):]} {v:.4f}'
                                                    for k, v in row.items()))
    self.done = summary.step

  def on_step(self, summary):
    every = self.options.every_steps
    if every and summary.step % every == 0 and summary.step != summary.total:
      self.evaluate(summary)

  def on_end(self, summary):
    if summary.start < summary.total and not summary.stopped and self.done != summary.step:
      self.evaluate(summary)
