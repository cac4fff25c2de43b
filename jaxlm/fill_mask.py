"""`jaxlm fill-mask`: the most likely tokens for each [MASK] of a text, from a masked LM."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import data, resume, steps
from jaxlm import run as run_lib
from jaxlm.errors import ConfigError

MASK = '[MASK]'


def encode(tokenizer, text, max_len):
  """[CLS] text [SEP] with one [MASK] id per '[MASK]' in the text.

  A mask stands for a whole piece with its leading space ('The [MASK] sat' -> '▁cat'), as in
  pretraining, where text is encoded in one piece: so the space before a mask is dropped, and
  the text after it is encoded as the start of a new text (whose implicit leading '▁' is the
  space that followed the mask).
  """
  parts = text.split(MASK)
  if len(parts) == 1:
    raise ConfigError(f'--text={text!r} has no {MASK}; write e.g. --text="The {MASK} sat."')
  mask_id = tokenizer.special_id(MASK)
  ids = [tokenizer.special_id('[CLS]')]
  for i, part in enumerate(parts):
    if i > 0:
      ids.append(mask_id)
      part = part[1:] if part.startswith(' ') else part
    if i < len(parts) - 1:
      part = part.rstrip(' ')
    if part:
      ids.extend(tokenizer.encode([part])[0])
  ids.append(tokenizer.special_id('[SEP]'))
  if len(ids) > max_len:
    raise ConfigError(f'--text is {len(ids)} tokens, more than model.max_len={max_len}')
  return ids


def run(config, workdir, texts, top_k=5, step=None):
  """Prints, for each [MASK] of each text, the top_k fillers with their probabilities."""
  s = run_lib.inference_setup(config)  # Texts go through one at a time, on one device.
  if not s.objective.fills_masks:
    raise ConfigError(f'--workdir={workdir} holds a {s.objective.name!r} model; fill-mask needs '
                      f'a masked LM (objective=masked)')
  tokenizer = data.run_tokenizer(config, workdir)
  tokenizer.check_specials()
  params, step = resume.restore_params(s, workdir, step)
  extra = resume.restore_extra(s, workdir, step)
  special = tokenizer.special_table(config.model.vocab_size)  # Never a filler.
  mask_id = tokenizer.special_id(MASK)
  with s.active():

    @jax.jit
    def probabilities(params, extra, tokens):
      batch = {'tokens': tokens, 'positions': jnp.arange(tokens.shape[1])[None],
               'segment_ids': jnp.ones_like(tokens)}
      logits = steps.apply(s.model, params, batch, extra).astype(jnp.float32)
      return jax.nn.softmax(jnp.where(special, -jnp.inf, logits), axis=-1)

    results = []
    for text in texts:
      ids = encode(tokenizer, text, config.model.max_len)
      probs = np.asarray(probabilities(params, extra, jnp.asarray([ids], jnp.int32)))[0]
      masks = [i for i, t in enumerate(ids) if t == mask_id]
      for n, position in enumerate(masks):
        best = np.argsort(-probs[position])[:top_k]
        fillers = []
        for token in best:
          filled = [int(token) if i == position else t for i, t in enumerate(ids)]
          fillers.append({'token': tokenizer.token_text(int(token)),
                          'probability': float(probs[position, token]),
                          'text': _show(tokenizer, filled)})
        results.append({'text': text, 'mask': n, 'fillers': fillers})
  return results


def _show(tokenizer, ids):
  """The text of [CLS] ids [SEP] on one line, remaining masks shown as [MASK] (decoding drops
  control pieces) and newlines as \\n."""
  mask_id, out, run = tokenizer.special_id(MASK), '', []

  def flush():
    nonlocal out
    if run:
      space = ' ' if out and tokenizer.word_start(run[0]) else ''
      out += space + tokenizer.decode(run)
    run.clear()

  for t in ids[1:-1]:
    if t == mask_id:
      flush()
      out += f' {MASK}' if out else MASK
    else:
      run.append(t)
  flush()
  return out.replace('\n', '\\n')


def print_results(results, out):
  for r in results:
    suffix = f' (mask {r["mask"] + 1})' if r['mask'] else ''
    print(f'{r["text"]}{suffix}', file=out)
    for f in r['fillers']:
      print(f'  {f["probability"]:.4f}  {f["token"]!r:16}  {f["text"]}', file=out)
