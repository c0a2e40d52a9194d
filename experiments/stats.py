"""Confidence intervals of accuracies: the 95% Wilson score interval, in closed form.

  low, high = stats.wilson_interval(5, 10)        # (0.2366, 0.7634)
  summary = stats.with_interval(summary)          # + ci_low, ci_high after `accuracy`

For `k` successes in `n` samples, p = k / n and z = Z95 (the 0.975 normal quantile):

  center = (p + z^2 / 2n) / (1 + z^2 / n)
  half   = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)
  (low, high) = (center - half, center + half)

Unlike the normal (Wald) interval it stays inside [0, 1] and is not empty at k = 0 or k = n:
k = 0 gives low = 0 exactly and k = n gives high = 1 exactly (set, not left to rounding).
n = 0 has no interval: both bounds are NaN (tables show empty cells, plots draw no bar).
Scores in [0, 1] that are not all 0 or 1 (partial credit, e.g. a share of needles found) use
k = the sum of the scores, i.e. the interval of their mean as if it were a proportion.
"""

import numpy as np
import pandas as pd

Z95 = 1.959963984540054  # scipy.stats.norm.ppf(0.975)
LOW, HIGH = 'ci_low', 'ci_high'


def wilson_interval(k, n, z: float = Z95):
  """The Wilson score interval of `k` successes in `n` samples (scalars or arrays).

  Returns:
    `(low, high)`: floats for scalar inputs, else arrays of the broadcast shape; NaN where
    n = 0 (no samples).

  Raises:
    ValueError: n < 0, k < 0 or k > n.
  """
  k_arr, n_arr = np.broadcast_arrays(np.asarray(k, np.float64), np.asarray(n, np.float64))
  if (n_arr < 0).any() or (k_arr < 0).any() or (k_arr > n_arr).any():
    raise ValueError(f'Need 0 <= k <= n. Got k={k!r}, n={n!r}.')
  with np.errstate(divide='ignore', invalid='ignore'):
    p = k_arr / n_arr
    z2 = z * z
    denom = 1 + z2 / n_arr
    center = (p + z2 / (2 * n_arr)) / denom
    half = z * np.sqrt(p * (1 - p) / n_arr + z2 / (4 * n_arr * n_arr)) / denom
  low = np.where(k_arr <= 0, 0.0, np.clip(center - half, 0.0, 1.0))
  high = np.where(k_arr >= n_arr, 1.0, np.clip(center + half, 0.0, 1.0))
  empty = n_arr == 0
  low, high = np.where(empty, np.nan, low), np.where(empty, np.nan, high)
  if low.ndim == 0:
    return float(low), float(high)
  return low, high


def with_interval(frame: pd.DataFrame, value: str = 'accuracy', count: str = 'n',
                  low: str = LOW, high: str = HIGH) -> pd.DataFrame:
  """`frame` with the Wilson interval of its mean `value` over `count` samples per row,
  as columns `low` and `high` right after `value` (k = value x count; NaN where either is
  NaN or count is 0). Returns a copy; a frame without `value` comes back unchanged."""
  if value not in frame:
    return frame
  mean = pd.to_numeric(frame[value], errors='coerce').to_numpy(np.float64)
  n = pd.to_numeric(frame[count], errors='coerce').fillna(0).to_numpy(np.float64)
  known = ~np.isnan(mean)
  lo, hi = wilson_interval(np.where(known, np.clip(mean, 0, 1) * n, 0), n)
  lo, hi = np.where(known, lo, np.nan), np.where(known, hi, np.nan)
  out = frame.drop(columns=[c for c in (low, high) if c in frame])
  at = list(out.columns).index(value) + 1
  out.insert(at, low, lo)
  out.insert(at + 1, high, hi)
  return out
