"""Scaling-law fits (numpy + scipy only): the parametric loss L(N, D) = E + A/N^alpha + B/D^beta
(Chinchilla approach 3) and isoFLOP minima N_opt ~ C^a (approach 2), with bootstrap intervals.

Approach 3 follows Hoffmann et al. (2022), appendix D.2: minimise the Huber loss (delta 1e-3)
of log L_pred - log L over the runs, L_pred written as a log-sum-exp of (a - alpha log N,
b - beta log D, e) with A = exp(a), B = exp(b), E = exp(e), by L-BFGS from the best points of a
grid of initialisations (the objective has many local minima). Intervals come from refitting on
runs resampled with replacement.
"""

import numpy as np
from scipy import optimize, special

HUBER_DELTA = 1e-3
# The Chinchilla paper's initialisation grid, coarsened: every point is evaluated and L-BFGS
# starts from the best few.
GRID = dict(alpha=np.linspace(0.0, 2.0, 5), beta=np.linspace(0.0, 2.0, 5),
            e=np.linspace(-1.0, 1.5, 6), a=np.arange(0.0, 30.0, 5.0), b=np.arange(0.0, 30.0, 5.0))
STARTS = 16


def _huber(r, delta):
  small = np.abs(r) <= delta
  return np.where(small, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta))


def _objective(theta, log_n, log_d, log_loss, delta):
  """Huber loss of the log residuals and its gradient; theta = (a, b, e, alpha, beta)."""
  a, b, e, alpha, beta = theta
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
  lse = special.logsumexp(terms, axis=0)
  r = lse - log_loss
  weights = np.exp(terms - lse)  # d lse / d term
  dr = np.where(np.abs(r) <= delta, r, delta * np.sign(r))
  grad = np.array([np.sum(dr * weights[0]), np.sum(dr * weights[1]), np.sum(dr * weights[2]),
                   -np.sum(dr * weights[0] * log_n), -np.sum(dr * weights[1] * log_d)])
  return float(np.sum(_huber(r, delta))), grad


def _grid_losses(log_n, log_d, log_loss, delta):
  g = np.meshgrid(GRID['a'], GRID['b'], GRID['e'], GRID['alpha'], GRID['beta'], indexing='ij')
  theta = np.stack([x.ravel() for x in g], axis=1)  # (points, 5)
  a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, a.shape[:1] + log_n.shape)])
  r = special.logsumexp(terms, axis=0) - log_loss
  return theta, _huber(r, delta).sum(axis=1)


def fit_parametric(N, D, loss, delta=HUBER_DELTA, starts=None):
  """Fits L(N, D) = E + A/N^alpha + B/D^beta; returns {'E','A','B','alpha','beta','objective'}.

  `starts` (thetas) replaces the grid search, as the bootstrap does with the full fit's answer.
  """
  log_n, log_d, log_loss = (np.log(np.asarray(x, np.float64)) for x in (N, D, loss))
  if starts is None:
    theta, values = _grid_losses(log_n, log_d, log_loss, delta)
    starts = theta[np.argsort(values)[:STARTS]]
  bounds = [(-30, 60), (-30, 60), (-10, 10), (0, 5), (0, 5)]
  best = None
  for start in starts:
    # The objective is tiny (residuals ~1e-3): tolerances far below scipy's defaults, which
    # would stop at the first plateau.
    result = optimize.minimize(_objective, start, args=(log_n, log_d, log_loss, delta),
                               jac=True, method='L-BFGS-B', bounds=bounds,
                               options={'ftol': 1e-15, 'gtol': 1e-12, 'maxiter': 2000})
    if best is None or result.fun < best.fun:
      best = result
  a, b, e, alpha, beta = best.x
  return {'E': float(np.exp(e)), 'A': float(np.exp(a)), 'B': float(np.exp(b)),
          'alpha': float(alpha), 'beta': float(beta), 'objective': float(best.fun),
          'theta': best.x.tolist()}


def predict(law, N, D):
  return law['E'] + law['A'] / np.asarray(N, np.float64) ** law['alpha'] + \
      law['B'] / np.asarray(D, np.float64) ** law['beta']


def bootstrap_parametric(N, D, loss, law, samples=200, seed=0, points=()):
  """Percentile 95% intervals of each constant from refits on resampled runs, and under
  'predictions' those of the law's loss at each (N, D) of `points`."""
  rng = np.random.default_rng(seed)
  N, D, loss = (np.asarray(x, np.float64) for x in (N, D, loss))
  # The full fit's optimum and a few jittered copies: each resample's optimum is nearby.
  starts = [np.array(law['theta'])] + [np.array(law['theta']) * rng.uniform(0.8, 1.2, 5)
                                       for _ in range(3)]
  draws = []
  for _ in range(samples):
    pick = rng.integers(0, len(N), len(N))
    draws.append(fit_parametric(N[pick], D[pick], loss[pick], starts=starts))
  out = {key: _interval([d[key] for d in draws]) for key in ('E', 'A', 'B', 'alpha', 'beta')}
  if points:
    out['predictions'] = [_interval([float(predict(d, n, t)) for d in draws])
                          for n, t in points]
  return out


def _interval(values, level=0.95):
  lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
  return [float(lo), float(hi)]


def compute_optimal(law, budget, flops_per_token):
  """(N, D) minimising L(N, D) under flops_per_token(N) * D = budget (a 1-D search in log N)."""
  def loss_at(log_n):
    n = np.exp(log_n)
    return predict(law, n, budget / flops_per_token(n))
  # From 100 parameters up to 1e15, or to C/6 (where D would fall below one token).
  bounds = (np.log(1e2), min(np.log(budget / 6), np.log(1e15)))
  result = optimize.minimize_scalar(loss_at, bounds=bounds, method='bounded',
                                    options={'xatol': 1e-6})
  n = float(np.exp(result.x))
  return n, float(budget / flops_per_token(n)), float(result.fun)


def isoflop_minima(groups):
  """Approach 2: for each budget C, the minimum of a parabola fitted to loss against log N and
  log D. `groups` maps C to (N, D, loss) arrays; budgets with fewer than 3 sizes or no
  minimum (parabola opening downwards) are left out. Returns rows
  {C, N_opt, D_opt, loss_opt, inside} ('inside': the minimum lies within the sampled sizes)."""
  rows = []
  for budget, (N, D, loss) in sorted(groups.items()):
    N, D, loss = (np.asarray(x, np.float64) for x in (N, D, loss))
    if len(np.unique(N)) < 3:
      continue
    n_opt, loss_opt, inside = _parabola_minimum(np.log(N), loss)
    d_opt, _, _ = _parabola_minimum(np.log(D), loss)
    if n_opt is None or d_opt is None:
      continue
    rows.append({'C': float(budget), 'N_opt': float(np.exp(n_opt)), 'D_opt': float(np.exp(d_opt)),
                 'loss_opt': float(loss_opt), 'inside': bool(inside)})
  return rows


def _parabola_minimum(x, y):
  c2, c1, c0 = np.polyfit(x, y, 2)
  if c2 <= 0:
    return None, None, False
  x_opt = -c1 / (2 * c2)
  return x_opt, c0 + c1 * x_opt + c2 * x_opt ** 2, x.min() <= x_opt <= x.max()


def power_law(C, values):
  """Least-squares fit of log values = exponent * log C + log coefficient."""
  exponent, log_k = np.polyfit(np.log(C), np.log(values), 1)
  return float(exponent), float(np.exp(log_k))


def _inside(minima):
  return [m for m in minima if m['inside']]


def fit_isoflop(groups, samples=200, seed=0):
  """N_opt = kN C^a and D_opt = kD C^b through the isoFLOP minima that lie within their
  budget's sizes (a minimum beyond them is an extrapolation of the parabola, reported but not
  fitted), with bootstrap intervals (runs resampled within each budget). None when fewer than
  two budgets have such a minimum."""
  all_minima = isoflop_minima(groups)
  minima = _inside(all_minima)
  if len(minima) < 2:
    return None
  C = [m['C'] for m in minima]
  a, k_n = power_law(C, [m['N_opt'] for m in minima])
  b, k_d = power_law(C, [m['D_opt'] for m in minima])
  rng = np.random.default_rng(seed)
  draws = []
  for _ in range(samples):
    resampled = {}
    for budget, arrays in groups.items():
      pick = rng.integers(0, len(arrays[0]), len(arrays[0]))
      resampled[budget] = tuple(np.asarray(x)[pick] for x in arrays)
    m = _inside(isoflop_minima(resampled))
    if len(m) >= 2:
      draws.append((power_law([x['C'] for x in m], [x['N_opt'] for x in m])[0],
                    power_law([x['C'] for x in m], [x['D_opt'] for x in m])[0]))
  return {'a': a, 'k_N': k_n, 'b': b, 'k_D': k_d, 'minima': all_minima,
          'budgets_fitted': len(minima),
          'a_interval': _interval([d[0] for d in draws]) if draws else None,
          'b_interval': _interval([d[1] for d in draws]) if draws else None,
          'bootstrap_samples': len(draws)}
