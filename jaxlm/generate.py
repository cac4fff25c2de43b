"""`jaxlm generate`: continue prompts with a causal LM, decoding with a key/value cache.

One jit-compiled function does the whole batch: a prefill pass writes every prompt's keys and
values into the cache (prompts right-padded; each row's own length says where it continues),
then a while loop feeds one token per row per step until `max_new_tokens` or every row has
produced a stop token. Greedy when temperature is 0, else temperature, top-k and top-p
(nucleus) sampling from keys derived from (seed, step): the same seed gives the same text.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import data
from jaxlm import train as train_lib
from jaxlm.config import ConfigError
from jaxlm.data import tokenizer as tokenizer_lib


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
           top_p=1.0, stop_ids=()):
  """tokens [B, P] (prompts right-padded), lengths [B] -> new tokens [B, max_new_tokens] and how
  many of them each row produced (a row stops after its first stop token)."""
  batch, prompt_len = tokens.shape
  cache_len = prompt_len + max_new_tokens
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(
      (batch, cache_len), jnp.int32), decode=True))['cache']
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def step(cache, tokens, positions):
    logits, variables = model.apply({'params': params, 'cache': cache}, tokens, positions,
                                    decode=True, mutable=['cache'])
    return logits, variables['cache']

  positions = jnp.broadcast_to(jnp.arange(prompt_len), tokens.shape)
  logits, cache = step(cache, tokens, positions)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
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


def reference_greedy(model, params, prompt, max_new_tokens, stop_ids=()):
  """Greedy decoding without a cache: the whole sequence through the causal model at every
  step (right-padded to one length, which cannot change earlier positions' logits). Slow; the
  tests' ground truth for `decode`."""
  ids = list(prompt)
  buffer = np.zeros((1, len(ids) + max_new_tokens), np.int32)
  forward = jax.jit(lambda tokens: model.apply({'params': params}, tokens))
  for _ in range(max_new_tokens):
    buffer[0, :len(ids)] = ids
    ids.append(int(jnp.argmax(forward(buffer)[0, len(ids) - 1])))
    if ids[-1] in stop_ids:
      break
  return ids[len(prompt):]


def run(config, workdir, prompts, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
        seed=0, step=None):
  """Continues each prompt; returns [{'prompt', 'completion', 'tokens'}] (stop token dropped)."""
  if config.objective != 'causal':
    raise ConfigError(f'--workdir={workdir} holds a {config.objective!r} model; generate needs '
                      f'a causal LM (objective=causal)')
  tokenizer = tokenizer_lib.load(config.data.tokenizer or data.tokenizer_path(workdir))
  encoded = [[tokenizer.bos_id] + ids for ids in tokenizer.encode(prompts)]
  longest = max(len(ids) for ids in encoded)
  if config.model.position == 'learned' and longest + max_new_tokens > config.model.max_len:
    raise ConfigError(f'the longest prompt ({longest} tokens) plus --max_new_tokens='
                      f'{max_new_tokens} exceeds model.max_len={config.model.max_len}, the '
                      f'length of its learned position table')
  # One device: decoding a few prompts needs no mesh.
  s, params, _ = train_lib.restore_for_inference(config, workdir, step, len(prompts))
  tokens = np.zeros((len(prompts), longest), np.int32)
  for row, ids in enumerate(encoded):
    tokens[row, :len(ids)] = ids
  lengths = np.array([len(ids) for ids in encoded], np.int32)
  out, count = jax.device_get(decode(s.model, params, tokens, lengths, seed, max_new_tokens,
                                     float(temperature), top_k, float(top_p),
                                     (tokenizer.eos_id,)))
  results = []
  for prompt, row, n in zip(prompts, out, count):
    ids = [int(t) for t in row[:n] if t != tokenizer.eos_id]
    results.append({'prompt': prompt, 'completion': tokenizer.decode(ids), 'tokens': ids})
  return results
