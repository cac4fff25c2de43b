"""`jaxlm generate`: continue prompts with a causal LM, decoding with a key/value cache.

One jit-compiled function does the whole batch: a prefill pass writes every prompt's keys and
values into the cache (prompts right-padded; each row's own length says where it continues),
then a while loop feeds one token per row per step until `max_new_tokens` or every row has
produced a stop token. Greedy when temperature is 0, else temperature, top-k and top-p
(nucleus) sampling from keys derived from (seed, step): the same seed gives the same text.
With num_beams > 1, beam search instead (`beam_search`), in the same single jit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import data, inference, limits
from jaxlm import run as run_lib
from jaxlm.errors import ConfigError


def sample(logits, rng, temperature=0.0, top_k=0, top_p=1.0):
  """One token per row of logits [B, V]: argmax at temperature 0, else a draw from the
  temperature-scaled distribution restricted to the top_k tokens and the top_p mass."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits), order, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep_sorted = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(len(order))[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature', 'top_k',
                                             'top_p', 'stop_ids'))
def decode(model, params, tokens, lengths, seed, max_new_tokens, temperature=0.0, top_k=0,
           top_p=1.0, stop_ids=(), extra=None):
  """tokens [B, P] (prompts right-padded), lengths [B] -> new tokens [B, max_new_tokens] and how
  many of them each row produced (a row stops after its first stop token). `extra`: the
  model's other variables (TrainState.extra)."""
  batch = tokens.shape[0]
  step, cache, last = _prefill(model, params, tokens, lengths, max_new_tokens, extra)
  stops = jnp.asarray(stop_ids, jnp.int32)

  def body(carry):
    i, cache, last, out, done, count = carry
    token = sample(last, jax.random.fold_in(jax.random.key(seed), i), temperature, top_k,
                   top_p).astype(jnp.int32)
    token = jnp.where(done, 0, token)
    out = out.at[:, i].set(token)
    count = count + (~done).astype(jnp.int32)
    done = done | jnp.isin(token, stops)
    logits, cache = step(cache, token[:, None], (lengths + i)[:, None])
    return i + 1, cache, logits[:, 0], out, done, count

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  init = (0, cache, last, jnp.zeros((batch, max_new_tokens), jnp.int32),
          jnp.zeros(batch, bool), jnp.zeros(batch, jnp.int32))
  _, _, _, out, _, count = jax.lax.while_loop(cond, body, init)
  return out, count


def _prefill(model, params, tokens, lengths, max_new_tokens, extra=None):
  """(step(cache, tokens, positions) -> (logits, cache), the cache holding the prompts, each
  row's logits after its last prompt token [B, V])."""
  batch, prompt_len = tokens.shape
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(
      (batch, prompt_len + max_new_tokens), jnp.int32), decode=True))['cache']
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def step(cache, tokens, positions):
    logits, variables = model.apply({'params': params, 'cache': cache, **(extra or {})},
                                    tokens, positions, decode=True, mutable=['cache'])
    return logits, variables['cache']

  logits, cache = step(cache, tokens, jnp.broadcast_to(jnp.arange(prompt_len), tokens.shape))
  return step, cache, jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]


@functools.partial(jax.jit, static_argnames=('model', 'num_beams', 'max_new_tokens',
                                             'length_penalty', 'stop_ids'))
def beam_search(model, params, tokens, lengths, num_beams, max_new_tokens, length_penalty=1.0,
                stop_ids=(), extra=None):
  """The best continuation of each prompt found by beam search -> (tokens [B, max_new_tokens],
  count [B], score [B]).

  `num_beams` unfinished continuations ("alive" beams) are kept per prompt, with their summed
  log-probabilities. A beam that emits a stop token is finished and scored by log-probability /
  (tokens generated) ** length_penalty; the best `num_beams` finished ones are kept. The search
  ends at max_new_tokens, when alive beams are scored the same way, or earlier once no alive
  beam can beat the worst kept finished one. Each prompt runs as num_beams cache rows, which
  are reordered after every step to follow their beams' parents.
  """
  batch, beams = tokens.shape[0], num_beams
  step, cache, last = _prefill(model, params, jnp.repeat(tokens, beams, axis=0),
                               jnp.repeat(lengths, beams), max_new_tokens, extra)
  row_lengths = jnp.repeat(lengths, beams)
  layer_axis = 1 if model.cfg.scan_layers else 0  # Scanned caches lead with the layer axis.
  stops = jnp.asarray(stop_ids, jnp.int32)
  vocab = last.shape[-1]
  # Enough candidates that num_beams of them never stop, however many beams pick a stop id.
  candidates = beams * (len(stop_ids) + 1)
  never = jnp.float32(-1e9)  # Finite, so that arithmetic on empty beams stays finite.

  def take(x, index):  # x [B, n, ...] at index [B, m] -> [B, m, ...]
    return jnp.take_along_axis(x, index.reshape(*index.shape, *([1] * (x.ndim - 2))), axis=1)

  def normalized(score, length):
    return score / jnp.asarray(length, jnp.float32) ** length_penalty

  def body(carry):
    i, cache, last, alive_score, alive_seq, done_score, done_seq, done_len = carry
    logp = jax.nn.log_softmax(last.astype(jnp.float32)).reshape(batch, beams, vocab)
    score, index = jax.lax.top_k((alive_score[:, :, None] + logp).reshape(batch, -1),
                                 candidates)
    parent, token = index // vocab, (index % vocab).astype(jnp.int32)
    seq = take(alive_seq, parent).at[:, :, i].set(token)
    stopped = jnp.isin(token, stops)
    done_score, pick = jax.lax.top_k(jnp.concatenate(
        [done_score, jnp.where(stopped, normalized(score, i + 1), never)], axis=1), beams)
    done_seq = take(jnp.concatenate([done_seq, seq], axis=1), pick)
    done_len = take(jnp.concatenate([done_len, jnp.full_like(token, i + 1)], axis=1), pick)
    alive_score, pick = jax.lax.top_k(jnp.where(stopped, never, score), beams)
    alive_seq, parent, token = take(seq, pick), take(parent, pick), take(token, pick)
    rows = (jnp.arange(batch)[:, None] * beams + parent).reshape(-1)
    cache = jax.tree.map(lambda c: jnp.take(c, rows, axis=layer_axis), cache)
    logits, cache = step(cache, token.reshape(-1, 1), (row_lengths + i)[:, None])
    return i + 1, cache, logits[:, 0], alive_score, alive_seq, done_score, done_seq, done_len

  def cond(carry):
    i, _, _, alive_score, _, done_score, _, _ = carry
    # An alive beam's final score is at most its score now over the longest length.
    best_possible = normalized(jnp.max(alive_score, axis=1), max_new_tokens)
    return (i < max_new_tokens) & ~jnp.all(jnp.min(done_score, axis=1) >= best_possible)

  empty = jnp.zeros((batch, beams, max_new_tokens), jnp.int32)
  init = (0, cache, last, jnp.where(jnp.arange(beams) == 0, 0.0, never)[None].repeat(batch, 0),
          empty, jnp.full((batch, beams), never), empty, jnp.zeros((batch, beams), jnp.int32))
  i, _, _, alive_score, alive_seq, done_score, done_seq, done_len = jax.lax.while_loop(
      cond, body, init)
  score = jnp.concatenate([done_score, normalized(alive_score, jnp.maximum(i, 1))], axis=1)
  seq = jnp.concatenate([done_seq, alive_seq], axis=1)
  length = jnp.concatenate([done_len, jnp.full_like(done_len, i)], axis=1)
  best = jnp.argmax(score, axis=1)[:, None]
  return take(seq, best)[:, 0], take(length, best)[:, 0], take(score, best)[:, 0]


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, tokens):
  return model.apply({'params': params}, tokens).astype(jnp.float32)


def reference_greedy(model, params, prompt, max_new_tokens, stop_ids=()):
  """Greedy decoding without a cache: the whole sequence through the causal model at every
  step (right-padded to one length, which cannot change earlier positions' logits). Slow; the
  tests' ground truth for `decode`."""
  ids = list(prompt)
  buffer = np.zeros((1, len(ids) + max_new_tokens), np.int32)
  for _ in range(max_new_tokens):
    buffer[0, :len(ids)] = ids
    ids.append(int(jnp.argmax(_forward(model, params, buffer)[0, len(ids) - 1])))
    if ids[-1] in stop_ids:
      break
  return ids[len(prompt):]


def reference_beam(model, params, prompt, num_beams, max_new_tokens, length_penalty=1.0,
                   stop_ids=()):
  """Beam search as `beam_search` defines it, written plainly: lists of hypotheses, the whole
  sequence through the model for every beam at every step, no cache. The tests' ground truth.
  Returns (tokens, score)."""
  width = num_beams * (len(stop_ids) + 1)
  alive, done = [([], 0.0)], []
  for i in range(max_new_tokens):
    expansions = []
    for seq, score in alive:
      ids = list(prompt) + seq
      buffer = np.zeros((1, len(prompt) + max_new_tokens), np.int32)
      buffer[0, :len(ids)] = ids
      logp = np.asarray(jax.nn.log_softmax(_forward(model, params, buffer)[0, len(ids) - 1]))
      expansions += [(seq + [int(t)], score + float(logp[t])) for t in np.argsort(-logp)[:width]]
    expansions = sorted(expansions, key=lambda h: -h[1])[:width]
    done += [(s, score / (i + 1) ** length_penalty) for s, score in expansions
             if s[-1] in stop_ids]
    done = sorted(done, key=lambda h: -h[1])[:num_beams]
    alive = [h for h in expansions if h[0][-1] not in stop_ids][:num_beams]
    best_possible = alive[0][1] / max_new_tokens ** length_penalty
    if len(done) == num_beams and done[-1][1] >= best_possible:
      break
  final = done + [(s, score / len(s) ** length_penalty) for s, score in alive]
  return max(final, key=lambda h: h[1])


def _check_memory(config, rows, prompt_len, max_new_tokens, devices=None):
  """Refuses a decode whose key/value cache (and prefill scores) cannot fit the devices (its
  rows split over them), before the checkpoint is read: a RoPE model takes any length, so only
  memory bounds it."""
  m = config.model
  devices = devices or jax.devices()
  rows = -(-rows // len(devices))  # Per device: the batch axis splits over them.
  length = prompt_len + max_new_tokens
  if length >= 2 ** 31:
    raise ConfigError(f'the longest prompt ({prompt_len} tokens) plus --max_new_tokens='
                      f'{max_new_tokens} is beyond int32 positions')
  cache = 2 * m.num_layers * rows * length * m.num_kv_heads * m.head_dim * np.dtype(
      jnp.dtype(m.dtype)).itemsize
  scores = rows * m.num_heads * prompt_len * length * 4  # The prefill's float32 attention.
  limits.check_devices(cache + scores, list(devices)[:1],
                       f'decoding {rows} rows (prompts x --num_beams) of {length} positions '
                       f'(--max_new_tokens={max_new_tokens})',
                       'ask for fewer new tokens, beams or prompts at once')


def run(config, workdir, prompts, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
        seed=0, step=None, num_beams=1, length_penalty=1.0, devices=None):
  """Continues each prompt on the run's mesh (over `devices`, default all); returns
  [{'prompt', 'completion', 'tokens'}] (stop token dropped)."""
  s = run_lib.setup(config, devices)  # The run's mesh, over `devices`.
  if not s.objective.generates:
    raise ConfigError(f'--workdir={workdir} holds a {s.objective.name!r} model; generate needs '
                      f'a causal LM (objective=causal)')
  tokenizer = data.run_tokenizer(config, workdir)
  tokenizer.check_causal()
  encoded = [[tokenizer.bos_id] + ids for ids in tokenizer.encode(prompts)]
  longest = max(len(ids) for ids in encoded)
  if config.model.position == 'learned' and longest + max_new_tokens > config.model.max_len:
    raise ConfigError(f'the longest prompt ({longest} tokens) plus --max_new_tokens='
                      f'{max_new_tokens} exceeds model.max_len={config.model.max_len}, the '
                      f'length of its learned position table')
  _check_memory(config, len(prompts) * num_beams, longest, max_new_tokens, devices)
  # On the run's mesh, parameters and cache sharded as in training; the batch padded to
  # whole rows per device with copies of the first prompt, dropped below.
  m = inference.load(s, workdir, step)
  rows = m.padded_rows(len(prompts))
  encoded += [encoded[0]] * (rows - len(prompts))
  tokens = np.zeros((rows, longest), np.int32)
  for row, ids in enumerate(encoded):
    tokens[row, :len(ids)] = ids
  lengths = np.array([len(ids) for ids in encoded], np.int32)
  stop_ids = (tokenizer.eos_id,)
  with m.setup.active():
    tokens, lengths = m.put(tokens, ('batch', None)), m.put(lengths, ('batch',))
    if num_beams > 1:
      out, count, _ = beam_search(m.setup.model, m.params, tokens, lengths, num_beams,
                                  max_new_tokens, float(length_penalty), stop_ids, m.extra)
    else:
      out, count = decode(m.setup.model, m.params, tokens, lengths, seed, max_new_tokens,
                          float(temperature), top_k, float(top_p), stop_ids, m.extra)
  out, count = inference.gather(out), inference.gather(count)
  results = []
  for prompt, row, n in zip(prompts, out, count):
    ids = [int(t) for t in row[:n] if t != tokenizer.eos_id]
    results.append({'prompt': prompt, 'completion': tokenizer.decode(ids), 'tokens': ids})
  return results
