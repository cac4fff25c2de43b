"""Sequence-length phases: one run that trains on short rows first, then long ones.

`data.phases = ((0.9, 128), (1.0, 512))` is BERT's schedule: steps [0, 0.9 N) on rows of 128
tokens, then [0.9 N, N) on rows of 512 (N = train_steps). Attention's cost grows with the row,
so most steps run at the cheap length, and the model still meets the long one before the end.

The model is one model: model.max_len must be the longest phase's length (the learned
position table's size), and each phase runs the same parameters at its own length. The
corpus is re-packed at each phase's length (the same token stream, data.packing's layout),
batches stay `batch_size` rows (so a 512 phase has 4x the tokens of a 128 one per step, as in
BERT), and the batch of step s in a phase is element s of that phase's shuffled rows: a pure
function of (seed, step), whether the run got there straight or resumed.

A phase may also change model fields that hold no parameters, as a third element:
`(1.0, 131072, {'context_parallel': 'ring'})`. A long-context extension (Llama 3's recipe) trains
most steps short and raises the length, RoPE's theta (or Llama 3.1's scaling, `rope_type`) and
context parallelism at the boundary. `model.*` is the model the run ends with (what eval,
generate and convert read), so the RoPE fields of the last phase are model.*'s own and the
earlier phases name the values they differ by:
`model.rope_theta=5e5, data.phases=((0.9, 8192, {'rope_theta': 1e4}), (1.0, 131072))`.

Pure config arithmetic (no jax: config validation reads it); jaxlm/phase_build.py builds
each phase's data and steps, and train.py walks them.
"""

from jaxlm.errors import ConfigError

EXAMPLE = 'e.g. ((0.9, 128), (1.0, 512))'
ROPE_FIELDS = ('rope_theta', 'rope_type', 'rope_scaling_factor', 'rope_low_freq_factor',
               'rope_high_freq_factor', 'rope_original_max_len')
# Model fields a phase may change: none of them shapes a parameter.
MODEL_FIELDS = ROPE_FIELDS + ('context_parallel', 'context_parallel_load_balance',
                              'remat_policy')


def spans(config):
  """[(first step, end step, row length)] of every phase; one phase when data.phases is ()."""
  n, phases = config.train_steps, config.data.phases
  if not phases:
    return [(0, n, config.model.max_len)]
  ends = [round(entry[0] * n) for entry in phases]
  starts = [0] + ends[:-1]
  return [(start, end, entry[1]) for start, end, entry in zip(starts, ends, phases)]


def model_fields(config, index):
  """{model field: value} that phase `index` changes ({} for none, or without phases)."""
  phases = config.data.phases
  return dict(phases[index][2]) if phases and len(phases[index]) == 3 else {}


def index_at(config, step):
  """The phase that runs step `step` (counting from 0); the last one from its start on."""
  return next((i for i, (_, end, _) in enumerate(spans(config)) if step < end),
              len(spans(config)) - 1)


def check(config):
  """One-line ConfigErrors for data.phases (called by config.validate)."""
  phases = config.data.phases
  if not phases:
    return
  for entry in phases:
    if (not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3)
        or isinstance(entry[0], bool) or not isinstance(entry[0], (int, float))
        or not 0 < entry[0] <= 1 or isinstance(entry[1], bool)
        or not isinstance(entry[1], int) or entry[1] <= 0
        or (len(entry) == 3 and not isinstance(entry[2], dict))):
      raise ConfigError(f'data.phases entry {entry!r} must be (end as a fraction of '
                        f'train_steps in (0, 1], row length in tokens[, {{model field: value}}]), '
                        f'{EXAMPLE}')
    unknown = sorted(set(entry[2]) - set(MODEL_FIELDS)) if len(entry) == 3 else []
    if unknown:
      raise ConfigError(f'data.phases entry {entry!r}: a phase cannot change model.{unknown[0]}; '
                        f'it may change {", ".join(MODEL_FIELDS)}')
  if len(phases[-1]) == 3 and set(phases[-1][2]) & set(ROPE_FIELDS):
    field = sorted(set(phases[-1][2]) & set(ROPE_FIELDS))[0]
    raise ConfigError(f'data.phases: the last phase sets {field}; set model.{field} instead '
                      f'(the model the run ends with, which eval, generate and convert read) and '
                      f'give the earlier phases the values they differ by')
  if len(phases) == 1 and len(phases[0]) == 3:
    raise ConfigError('data.phases: a single phase takes its model fields from model.*; drop '
                      'its third element')
  ends = [entry[0] for entry in phases]
  if any(b <= a for a, b in zip(ends, ends[1:])) or ends[-1] != 1:
    raise ConfigError(f'data.phases ends {ends} must increase and the last must be 1.0 (the '
                      f'end of the run), {EXAMPLE}')
  longest = max(entry[1] for entry in phases)
  if longest != config.model.max_len:
    raise ConfigError(f'data.phases: the longest phase is {longest} tokens; set model.max_len='
                      f'{longest} (the position table is sized for it)')
  for start, end, length in spans(config):
    if config.loss_chunk and length % config.loss_chunk:
      raise ConfigError(f'data.phases: loss_chunk={config.loss_chunk} must divide every '
                        f'phase\'s length ({length})')
    if end <= start:
      raise ConfigError(f'data.phases: the phase of {length}-token rows has no steps at '
                        f'train_steps={config.train_steps}; raise train_steps or drop it')
