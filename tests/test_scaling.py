"""Scaling laws: FLOP counts against XLA, the fitters against known laws, the sweep runner
(plan, skip, resume after preemption, shards) and `jaxlm fit` (fit.json and plots)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import ROOT, env, tiny_config
from jaxlm import cli, flops, laws, objectives, sweep, run as run_lib
from jaxlm import config as config_lib
from jaxlm.config import ConfigError

# Hoffmann et al. (2022), approach 3.
CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def synthetic_isoflop(noise, seed=0, budgets=np.logspace(18, 22, 5), sizes=7):
  """Losses of the Chinchilla law at isoFLOP points (C = 6ND) with multiplicative noise."""
  rng = np.random.default_rng(seed)
  N, D, C = [], [], []
  for c in budgets:
    for n in 0.1 * c ** 0.45 * np.logspace(-0.8, 0.8, sizes):  # Around the optimum.
      N.append(n), D.append(c / 6 / n), C.append(c)
  N, D, C = map(np.array, (N, D, C))
  return N, D, C, laws.predict(CHINCHILLA, N, D) * np.exp(rng.normal(0, noise, len(N)))


# ---------------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize('family,objective', [('llama', 'causal'), ('gpt2', 'causal'),
                                              ('bert', 'masked')])
def test_flops_per_token_matches_xla_cost_analysis(family, objective):
  """XLA counts every op of the compiled step (unrolled layers, so each is counted); the
  matmuls are all but 1-4% of it here: norms, softmax, GELU and AdamW make up the rest."""
  c = tiny_config(model__family=family, objective=objective, model__num_layers=2,
                  model__emb_dim=256, model__num_heads=4, model__mlp_dim=1024,
                  model__vocab_size=2048, model__max_len=128, batch_size=4,
                  model__scan_layers=False, mesh__fsdp=1)
  c = config_lib.validate(c)
  s = run_lib.setup(c, jax.devices()[:1])
  analysis = run_lib.compile_train_step(s, s.objective.prepare()).cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  xla = analysis['flops'] / (c.batch_size * c.model.max_len)
  ours = flops.of_run(c, s.objective.predictions())  # BERT's head runs on its gathered predictions only.
  assert 1.0 <= xla / ours < 1.04, (xla, ours)
  # The variants count strictly less, by exactly the terms they leave out.
  m = c.model
  attention = 12 * m.num_layers * m.num_heads * m.head_dim * m.max_len
  full = flops.flops_per_token(m)
  assert flops.flops_per_token(m, causal_halved=True) == full - attention // 2
  assert flops.flops_per_token(m, embeddings=False) == full - 6 * m.emb_dim * m.vocab_size


def test_mfu_arithmetic_on_known_inputs():
  # 1000 tokens/s of a 1e9-FLOP/token model on 2 devices of 1e12 FLOP/s each: 50%.
  assert flops.mfu(1000, 1e9, 2, 1e12) == pytest.approx(0.5)


# --------------------------------------------------------------------------------- fitters


def test_parametric_fit_recovers_chinchilla_constants_from_noisy_losses():
  """35 isoFLOP runs over 4 decades of compute with 0.5% loss noise: the exponents come back
  within 0.02-0.03 and the irreducible loss within 0.06; B is the least determined constant
  (it trades off against beta), so its tolerance is a factor of 2."""
  N, D, _, loss = synthetic_isoflop(noise=0.005)
  law = laws.fit_parametric(N, D, loss)
  assert law['alpha'] == pytest.approx(0.34, abs=0.02)
  assert law['beta'] == pytest.approx(0.28, abs=0.03)
  assert law['E'] == pytest.approx(1.69, abs=0.06)
  assert 1 / 1.3 < law['A'] / 406.4 < 1.3
  assert 1 / 2 < law['B'] / 410.7 < 2
  intervals = laws.bootstrap_parametric(N, D, loss, law, samples=40)
  for key in ('alpha', 'beta', 'E'):
    lo, hi = intervals[key]
    assert lo <= law[key] <= hi and lo <= CHINCHILLA[key] <= hi, (key, lo, hi)


def test_parametric_fit_is_exact_without_noise():
  N, D, _, loss = synthetic_isoflop(noise=0.0)
  law = laws.fit_parametric(N, D, loss)
  for key, value in CHINCHILLA.items():
    assert law[key] == pytest.approx(value, rel=1e-3), key


def test_isoflop_method_recovers_the_optimal_size_exponent():
  """Under L = E + A/N^a + B/D^b with C = 6ND, N_opt ~ C^(b/(a+b)) = C^0.4516."""
  N, D, C, loss = synthetic_isoflop(noise=0.002)
  groups = {c: (N[C == c], D[C == c], loss[C == c]) for c in np.unique(C)}
  fit = laws.fit_isoflop(groups, samples=100)
  expected = 0.28 / (0.34 + 0.28)
  assert fit['a'] == pytest.approx(expected, abs=0.02)
  assert fit['b'] == pytest.approx(1 - expected, abs=0.02)
  assert fit['a_interval'][0] <= expected <= fit['a_interval'][1]
  assert all(m['inside'] for m in fit['minima'])


def test_compute_optimal_matches_chinchillas_closed_form():
  a, b = CHINCHILLA['alpha'], CHINCHILLA['beta']
  G = (a * CHINCHILLA['A'] / (b * CHINCHILLA['B'])) ** (1 / (a + b))
  for budget in (1e19, 1e21, 1e23):
    n, d, _ = laws.compute_optimal(CHINCHILLA, budget, lambda n: 6 * n)
    assert n == pytest.approx(G * (budget / 6) ** (b / (a + b)), rel=1e-3)
    assert 6 * n * d == pytest.approx(budget, rel=1e-9)


# -------------------------------------------------------------------------------- fit CLI


def write_runs(directory, N, D, C, loss):
  rows = [{'name': f'run{i}', 'N': float(n), 'D': float(d), 'C': float(c), 'budget': float(c),
           'eval_loss': float(l), 'wall_s': 1.0, 'config': {}}
          for i, (n, d, c, l) in enumerate(zip(N, D, C, loss))]
  (directory / 'runs.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))


def test_fit_command_writes_fit_json_and_plots(tmp_path, capsys):
  N, D, C, loss = synthetic_isoflop(noise=0.003)
  write_runs(tmp_path, N, D, C, loss)
  # Held-out rows (a sweep's `holdout`) at 10x the largest budget: predicted, not fitted.
  n = np.array([3e10, 8e10])
  held = [{'name': f'holdout-{i}', 'N': float(a), 'D': float(b), 'C': 1e23, 'budget': 1e23,
           'eval_loss': float(laws.predict(CHINCHILLA, a, b)), 'holdout': True}
          for i, (a, b) in enumerate(zip(n, 1e23 / 6 / n))]
  with open(tmp_path / 'runs.jsonl', 'a') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in held))
  assert cli.main(['fit', f'--workdir={tmp_path}', '--budget=1e21', '--bootstrap=20']) == 0
  fit = json.loads((tmp_path / 'fit.json').read_text())
  assert fit['runs'] == len(N)
  assert [h['run'] for h in fit['held_out']] == ['holdout-0', 'holdout-1']
  for h in fit['held_out']:
    assert abs(h['relative_error']) < 0.02
    assert h['interval'][0] < h['predicted_loss'] < h['interval'][1]
  printed = capsys.readouterr()
  assert 'held-out run holdout-0 (C=1e+23): predicted loss' in printed.err
  assert fit['alpha'] == pytest.approx(0.34, abs=0.03) and fit['beta'] > 0
  for key in ('E', 'A', 'B', 'alpha', 'beta'):
    assert fit['intervals'][key][0] <= fit[key] <= fit['intervals'][key][1]
  assert fit['isoflop']['a'] == pytest.approx(0.4516, abs=0.05)
  holdout = fit['holdout']  # The largest model at the largest budget, predicted by the rest.
  assert abs(holdout['relative_error']) < 0.02
  optimum = fit['budget']['parametric']
  assert 6 * optimum['N'] * optimum['D'] == pytest.approx(1e21, rel=1e-6)
  for name in ('loss_vs_compute.png', 'isoflop.png', 'residuals.png'):
    data = (tmp_path / name).read_bytes()
    assert data.startswith(b'\x89PNG') and len(data) > 10_000, name
  assert not list(tmp_path.glob('*.tmp*'))
  printed = json.loads(printed.out.strip().splitlines()[-1])
  assert printed['alpha'] == fit['alpha']


def test_fit_without_enough_runs_is_a_one_line_error(tmp_path, capsys):
  assert cli.main(['fit', f'--workdir={tmp_path}']) == 2
  assert 'runs.jsonl not found' in capsys.readouterr().err
  N, D, C, loss = synthetic_isoflop(noise=0)
  write_runs(tmp_path, N[:3], D[:3], C[:3], loss[:3])
  assert cli.main(['fit', f'--workdir={tmp_path}']) == 2
  err = capsys.readouterr().err
  assert 'has 3 finished run(s)' in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / 'fit.json').exists()
  for bad, message in (('--budget=-1', 'must be a positive number of FLOPs'),
                       ('--bootstrap=0', 'must be at least 1'),
                       ('--config=configs/gpt_tiny.py', 'jaxlm fit takes no --config')):
    assert cli.main(['fit', f'--workdir={tmp_path}', bad]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------- sweep plans


def test_cpu_tiny_plan_follows_its_rules():
  s = config_lib.load_sweep(os.path.join(ROOT, 'configs/scaling/cpu_tiny.py'))
  runs = sweep.plan(s)
  assert len({r.name for r in runs}) == len(runs) == len(s.sizes) * len(s.budgets)
  for r in runs:
    m = r.config.model
    assert r.C == pytest.approx(r.budget, rel=1 / r.config.train_steps)
    assert r.D == r.config.train_steps * r.config.batch_size * m.max_len
    assert r.C == flops.flops_per_token(m) * r.D
    assert m.num_heads * s.head_dim == m.emb_dim and m.mlp_dim % 8 == 0
    assert r.config.optimizer.learning_rate == pytest.approx(
        s.learning_rate * (s.lr_reference_width / m.emb_dim) ** s.lr_width_exponent)
    assert r.config.train_steps >= s.min_steps
  by_size = sorted({(r.config.model.emb_dim, r.N) for r in runs})
  assert [n for _, n in by_size] == sorted(n for _, n in by_size)  # N grows with the shape.


def test_batch_follows_compute_and_tokens_grid():
  s = sweep_config(tiny_config(), budgets=(), tokens=(1e5, 4e5), batch_compute_exponent=0.5)
  runs = sweep.plan(s)
  assert {r.name for r in runs} == {'L1-d32-D1e5', 'L1-d32-D4e5', 'L2-d64-D1e5', 'L2-d64-D4e5'}
  smallest = min(r.C for r in runs)
  for r in runs:  # 4x the compute doubles the batch.
    expected = s.base.batch_size * 2 ** round(0.5 * np.log2(r.C / smallest))
    assert r.config.batch_size == expected
    assert r.budget == 0.0


@pytest.mark.parametrize('field,value,message', [
    ('sizes', (), 'sizes is empty'),
    ('sizes', ((2, 100),), 'head_dim=16 must divide emb_dim=100'),
    ('sizes', ((2,),), 'must be (num_layers, emb_dim)'),
    ('tokens', (1e6,), 'set exactly one of budgets'),
    ('budgets', (-1.0,), 'must all be positive'),
    ('min_steps', 10**9, 'every run of the sweep is outside'),
    ('warmup_fraction', 1.0, 'warmup_fraction=1.0 must be in [0, 1)'),
])
def test_bad_sweeps_are_one_line_errors(field, value, message):
  s = sweep_config(tiny_config())
  s[field] = value
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')
                     .replace('[', r'\[')):
    sweep.plan(s)


def test_run_and_sweep_configs_are_not_confused(tmp_path, capsys):
  sweep_file = os.path.join(ROOT, 'configs/scaling/cpu_tiny.py')
  assert cli.main(['train', f'--config={sweep_file}', f'--workdir={tmp_path}']) == 2
  assert 'is a scaling sweep: run it with jaxlm sweep' in capsys.readouterr().err
  run_file = os.path.join(ROOT, 'configs/gpt_tiny.py')
  assert cli.main(['sweep', f'--config={run_file}', f'--workdir={tmp_path}']) == 2
  assert 'jaxlm sweep needs a sweep' in capsys.readouterr().err
  assert cli.main(['sweep', f'--config={sweep_file}', f'--workdir={tmp_path}',
                   '--shard=2/2']) == 2
  assert 'need 0 <= i < n' in capsys.readouterr().err
  assert not os.listdir(tmp_path)


def sweep_config(base, **fields):
  s = config_lib.sweep_defaults(base)
  s.sizes = ((1, 32), (2, 64))
  s.head_dim = 16
  s.budgets = (3e9, 6e9)
  s.min_steps = 5
  s.learning_rate = 3e-3
  s.lr_reference_width = 64
  for key, value in fields.items():
    s[key] = value
  return s


# --------------------------------------------------------------------------- sweep runner


def write_sweep(path, s):
  base = config_lib.to_json(s.base)
  fields = {k: v for k, v in s.items() if k != 'base'}
  path.write_text('from jaxlm import config\n\n\ndef get_config():\n'
                  f'  s = config.sweep_defaults(config.from_json({base!r}))\n'
                  + ''.join(f'  s.{k}.update({v.to_dict()!r})\n' if hasattr(v, 'to_dict') else
                            f'  s.{k} = {v!r}\n' for k, v in fields.items()) + '  return s\n')
  return str(path)


def start_sweep(path, workdir, *extra):
  return subprocess.Popen([sys.executable, '-m', 'jaxlm', 'sweep', f'--config={path}',
                           f'--workdir={workdir}', *extra], cwd=ROOT, env=env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sweep_trains_skips_resumes_and_fits(tmp_path, shared_data):
  """A 6-run sweep is preempted (SIGTERM) in its last run; run again, it skips the finished
  runs, resumes the interrupted one from its checkpoint, and `jaxlm fit` reads the result.
  Three sizes (1-3 layers of width 64) at two budgets: 1,186 steps in all for the six runs,
  three sizes N and six token counts D (the fewest `jaxlm fit` takes for its five constants),
  and a last run long enough to preempt."""
  base = tiny_config(log_every_steps=10, checkpoint__save_every_steps=100, eval_batches=1,
                     data__cache_dir=str(shared_data / 'data'),
                     data__tokenizer=str(shared_data / 'tokenizer.model'))
  s = sweep_config(base, sizes=((1, 64), (2, 64), (3, 64)), budgets=(2e10, 1.4e11))
  runs = sweep.plan(s)
  assert len(runs) == 6 and runs[-1].config.train_steps > 200  # Long enough to preempt.
  path = write_sweep(tmp_path / 'sweep.py', s)
  workdir = tmp_path / 'sweep'
  last = workdir / 'runs' / runs[-1].name
  first = start_sweep(path, workdir)
  deadline = time.time() + 240
  while not (last / 'checkpoints' / '100').exists():  # Preempt it after its first checkpoint.
    assert first.poll() is None and time.time() < deadline, first.communicate()
    time.sleep(0.05)
  first.send_signal(signal.SIGTERM)
  out, err = first.communicate(timeout=120)
  assert first.returncode == 0, err
  assert json.loads(out.strip().splitlines()[-1])['preempted'] == runs[-1].name
  assert len((workdir / 'runs.jsonl').read_text().splitlines()) == 5
  finished = {r.name: (workdir / 'runs' / r.name / 'result.json').stat().st_mtime_ns
              for r in runs[:-1]}

  second = start_sweep(path, workdir)
  out, err = second.communicate(timeout=240)
  assert second.returncode == 0, err
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary == {'runs': 6, 'this_shard': 6, 'trained': 1, 'skipped': 5, 'failed': [],
                     'finished': 6}
  assert 'resumed from the checkpoint of step' in err
  for name, mtime in finished.items():  # Skipped means untouched.
    assert (workdir / 'runs' / name / 'result.json').stat().st_mtime_ns == mtime
  rows = [json.loads(line) for line in (workdir / 'runs.jsonl').read_text().splitlines()]
  assert [r['name'] for r in rows] == [r.name for r in runs]
  for row, r in zip(rows, runs):
    assert (row['N'], row['D'], row['C']) == (r.N, r.D, r.C)
    assert np.isfinite(row['eval_loss']) and row['wall_s'] > 0
    assert row['config']['model']['emb_dim'] == r.config.model.emb_dim
  # A shard of a finished sweep only looks at its own runs.
  third = start_sweep(path, workdir, '--shard=1/4')
  out, err = third.communicate(timeout=120)
  assert third.returncode == 0, err
  summary = json.loads(out.strip().splitlines()[-1])
  assert (summary['this_shard'], summary['skipped'], summary['trained']) == (2, 2, 0)
  assert cli.main(['fit', f'--workdir={workdir}', '--bootstrap=5']) == 0
  assert json.loads((workdir / 'fit.json').read_text())['runs'] == 6


# ------------------------------------------------------------- tuning once, held-out runs


def test_sweep_tunes_once_at_the_smallest_size_and_carries_it(tmp_path, shared_data,
                                                              monkeypatch):
  """A muP sweep with a tuning grid, end to end on tiny models: the grid trains at the
  smallest size first (DIR/tune), and the values of its lowest held-out loss reach the runs."""
  monkeypatch.setattr(sweep, 'fit_mesh', lambda config, setup: (config, jax.devices()[:1]))
  base = tiny_config(log_every_steps=10, eval_batches=1, checkpoint__save_every_steps=1000,
                     model__family='llama', model__parametrization='mup',
                     model__mup_base_width=32, model__mup_base_head_dim=16,
                     data__cache_dir=str(shared_data / 'data'),
                     data__tokenizer=str(shared_data / 'tokenizer.model'))
  s = sweep_config(base, sizes=((1, 32),), budgets=(2e10,), lr_width_exponent=0.0, min_steps=5)
  s.tune.learning_rates, s.tune.output_multipliers, s.tune.tokens = (1e-3, 1e-2), (2.0,), 5e3
  summary = sweep.run(s, str(tmp_path))
  assert summary['tune']['trained'] == 2 and summary['trained'] == 1
  tuned = json.loads((tmp_path / 'tune' / 'tuned.json').read_text())
  grid = {json.loads(p.read_text())['name']: json.loads(p.read_text())['eval_loss']
          for p in (tmp_path / 'tune' / 'runs').glob('*/result.json')}
  assert set(grid) == {'lr0.001-out2', 'lr0.01-out2'} and tuned['width'] == 32
  assert tuned['run'] == min(grid, key=grid.get)
  [row] = sweep.read_runs(str(tmp_path))  # The grid's runs are not the sweep's.
  assert row['config']['optimizer']['learning_rate'] == tuned['values']['optimizer.learning_rate']
  assert row['config']['model']['mup_output_multiplier'] == 2.0 and row['cpu_s'] > 0


@pytest.mark.parametrize('kind', ['mup', 'standard'])
def test_tuned_values_reach_every_size_and_the_held_out_run(kind):
  """cpu_mup.py's plan: the tuned rate reaches every width unchanged under muP, and by the
  width rule (lr_width_exponent) under the standard parametrization; the held-out run comes
  last, at 10x the largest budget."""
  s = config_lib.load_sweep(os.path.join(ROOT, 'configs/scaling/cpu_mup.py'))
  if kind == 'standard':
    s.base.model.parametrization, s.lr_width_exponent = 'standard', 0.5
  runs = sweep.plan(s)
  grid = sweep.tuning_runs(s, runs)
  assert {g.config.model.emb_dim for g in grid} == {32} and len(grid) == 6
  sweep.apply_tuned(s, runs, {'width': 32, 'values': {'optimizer.learning_rate': 8e-3}})
  for r in runs:
    expected = 8e-3 * ((32 / r.config.model.emb_dim) ** 0.5 if kind == 'standard' else 1)
    assert r.config.optimizer.learning_rate == pytest.approx(expected)
  assert runs[-1].holdout and runs[-1].name == 'holdout-L2-d128-C1.8e13'
  assert runs[-1].C == pytest.approx(10 * max(r.C for r in runs[:-1]), rel=1e-2)
  assert not any(r.holdout for r in runs[:-1])
  s.base.model.parametrization, s.lr_width_exponent = 'mup', 0.5
  with pytest.raises(ConfigError, match="lr_width_exponent=0.5 must be 0 with base.model"):
    sweep.plan(s)
