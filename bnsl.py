"""
Loss deceleration: a robust 1-break broken-neural-scaling-law (BNSL) fit of a training-loss curve.

    python bnsl.py out/run                # a run directory: its train_loss.npy, preprocessed
    python bnsl.py curve.csv              # two columns step,loss (header line optional)
    python bnsl.py curve.csv --raw        # the points exactly as given (no smoothing, subsampling, cut)
    python bnsl.py out/a out/b --table    # several paths; a human-readable table instead of JSON

THE FORM

bnsl.py fits a 1-break broken neural scaling law (BNSL, no offset) to a training-loss curve. The
fit is done in natural-log space, with x = log t and t = step > 0 (the number of optimizer
updates):

    log L(t) = log b - c0 x - c1 f1 softplus((x - log d1) / f1),    softplus(z) = log(1 + e^z)

that is, L(t) = b t^-c0 (1 + (t / d1)^(1/f1))^(-c1 f1). Well before the break (t << d1) log L
falls with slope c0, well after it with slope c0 + c1; the loss decelerates when c1 < 0. f1 > 0
is the width of the bend in e-folds of t. Reported, in the published conventions:

- t_d = d1;
- L_d = b t_d^-c0, the pre-break power law evaluated at t_d (the fitted curve itself passes
  2^(-c1 f1) L_d there);
- r_d = c0 + c1, the slope magnitude after the break;
- RSLE = sqrt(mean((log Lhat - log L)^2)) over the fitted points, and rsle_power_law, the same
  for the best pure power law (a straight line in log-log), for comparison.

THE MIRROR SOLUTION

f1 -> -f1, c0 -> c0 + c1, c1 -> -c1 gives the same curve, so an unbounded fit can land on the
mirror, whose "r_d" is silently the pre-break slope; unbounded fits can also diverge. bnsl.py
bounds f1 to [0.01, the log range of the data] (f1 > 0 removes the mirror) and log d1 to the
fitted range, and runs a bounded trust-region least-squares fit with the analytic Jacobian from
24 starts: 8 breaks log-spaced inside the data times f1 = 0.02, 0.1, 0.3 of the log range, with
log b, c0, c1 of each start solved linearly (the form is linear in them at fixed d1, f1). The fit
with the lowest cost is kept.

PREPROCESSING (the published convention; the command line's default, preprocess() in Python)

1. A trailing log moving average over all rows: row j becomes the mean of rows floor(j / 1.2)
   .. j, a window whose width is a fixed fraction of j (rows are evenly spaced steps, as in a
   run directory).
2. A transient cut: steps t <= --min_step (default 20) are dropped, and t = 0 always (it has no
   log). The published cut is 100 for runs of 1e4-1e5 steps, which is 0.1-1 % of the run and
   40-50 % of its log-step axis. For this project's 500-5000-step runs those two scalings give
   0.5-50 and 12-70 steps, and a cut of 100 would remove 54-74 % of the log axis, often the
   break itself. 20 lies in both ranges and is past the initialization plateau; raise it to skip
   a long warmup.
3. Log-spaced subsampling to at most 200 points (--n_points): the step nearest in log t to each
   of 200 log-spaced targets, duplicates removed, first and last step kept (a 3000-step curve
   keeps 193 points).

IDENTIFIABILITY

When the break cannot be located, the result says so instead of printing a t_d: identifiable is
false, reason says why, and t_d, L_d, r_d, final_loss_pred and all intervals are null (c0, c1,
f1, b and both RSLEs are still given). The reasons:

- the curve is a pure power law (a straight line in log-log fits it to rounding);
- a pure power law fits about as well: the break removes less than half of its squared log
  error;
- the break is at the edge of the data: fewer than 3 fitted points on one side (or within 0.1 %
  of the log range of an end);
- the bend is as wide as the data (f1 at its upper bound, the log range);
- the slope hardly changes: |c1| <= 2 % of max(|c0|, |c0 + c1|).

INTERVALS (95 %, for t_d, L_d and r_d), two kinds:

- *_ci_cov: from the covariance s^2 (J^T J)^-1 at the optimum (J the Jacobian, s^2 the sum of
  squared log residuals / (n - 5)), propagated linearly; the intervals of t_d and L_d are
  symmetric in log. This assumes independent residuals.
- *_ci_boot: a moving-block bootstrap: --n_boot (default 100) times, the log residuals are
  resampled as random contiguous blocks of --block points (default ceil(sqrt(n))), added to the
  fitted curve and refitted (from the optimum, same bounds); the interval is the 2.5 and 97.5
  percentiles. Seeded (--seed 0), so deterministic.

The moving average makes neighbouring residuals correlated (neighbouring rows average over mostly
the same rows), which the covariance ignores, so its intervals understate the uncertainty of a
smoothed curve. Blocks keep that autocorrelation, so the bootstrap intervals are the more honest
ones.

COMMAND LINE

A run directory is read from train_loss.npy (step t = row t), up to its first NaN row, so a run
still in progress can be fitted. For each path bnsl.py prints one JSON object on one line, with
the keys fit_bnsl returns plus path: t_d, L_d, c0, c1, r_d, f1, b, rsle, n_points (points
fitted), identifiable, reason (null when identifiable), final_loss_pred (the post-break line
L_d (t / t_d)^-r_d at the last fitted step), t_range (first and last fitted step),
rsle_power_law, and t_d_ci_cov, t_d_ci_boot, L_d_ci_cov, L_d_ci_boot, r_d_ci_cov, r_d_ci_boot
(each [lo, hi]; the _boot ones null with --n_boot 0). Non-finite numbers are written as null.
--table prints each fit as a table instead. --raw fits the points as given (only t = 0 is
dropped); --no_smooth, --no_subsample, --min_step and --n_points change one preprocessing step
at a time (the options below).

Bad input (a missing path, a directory without train_loss.npy, a CSV line that is not
step,loss, a non-finite or non-positive loss, steps that are not strictly increasing, the same
step twice with different losses, fewer than 8 points left to fit, a bad flag value) stops
bnsl.py with one line naming the problem and exit status 2. Every path is checked before any fit
is printed. Exact duplicate rows (the same step with the same loss, as published curves have)
are not bad input: each is kept once, with one note on stderr, e.g. "bnsl.py: note: curve.csv:
3 exact duplicate rows merged", and the exit status stays 0. A CSV may start with a UTF-8
byte-order mark; it is ignored, so it never turns the first data row into a header.

FROM PYTHON (fit_bnsl fits the points exactly as given, so preprocess first)

    import bnsl
    steps, loss = bnsl.load_curve('out')
    res = bnsl.fit_bnsl(*bnsl.preprocess(steps, loss))   # the dict above, without 'path'
    # the fitted curve, for identifiable fits:
    Lhat = bnsl.bnsl_1break(steps[1:], res['b'], res['c0'], res['c1'], res['t_d'], res['f1'])

On this project's 2-core CPU (2026-11-24), fitting a 3000-step synthetic curve (preprocessed to
193 points) took 0.14 s without bootstrap and 0.18 s with the default 100 bootstrap resamples.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit

MIN_POINTS = 8  # fewer points to fit is bad input (the 1-break form has 5 parameters)
MIN_STEP = 20  # default transient cut: steps <= MIN_STEP are dropped (see `preprocess`)
F1_MIN = 0.01  # lower bound of f1 (> 0: no mirror solution); the upper bound is the log range
MIN_SIDE = 3  # a break needs at least this many fitted points on each side
MIN_GAIN = 0.5  # ... and must remove at least half the squared log error of a pure power law
C1_TOL = 0.02  # ... and change the slope by at least 2 %
Z95 = 1.959963984540054  # standard normal quantile of 0.975: 95 % intervals

# -----------------------------------------------------------------------------
# the functional form and the quantities derived from it


def log_bnsl(x, log_b, c0, cs, log_ds, fs):
    """n-break BNSL in log space, x = log t:
    log L = log b - c0 x - sum_i c_i f_i log(1 + exp((x - log d_i) / f_i)).
    The softplus is np.logaddexp(0, z): no overflow for a sharp break (small f_i)."""
    y = log_b - c0 * np.asarray(x, dtype=float)
    for c, log_d, f in zip(cs, log_ds, fs):
        y = y - c * f * np.logaddexp(0.0, (x - log_d) / f)
    return y


def bnsl(t, b, c0, cs, ds, fs):
    """n-break BNSL L(t) = b t^-c0 prod_i (1 + (t / d_i)^(1 / f_i))^(-c_i f_i), for plotting and
    extrapolation (evaluated as exp(log_bnsl)). cs, ds, fs: one entry per break."""
    return np.exp(log_bnsl(np.log(t), math.log(b), c0, cs, np.log(ds), fs))


def bnsl_1break(t, b, c0, c1, d1, f1):
    """The 1-break form L(t) = b t^-c0 (1 + (t / d1)^(1 / f1))^(-c1 f1) (see `bnsl`)."""
    return bnsl(t, b, c0, [c1], [d1], [f1])


def log_bnsl_jacobian(x, p):
    """d log L / d(log b, c0, c1, log d1, f1) of the 1-break form at p, with z = (x - log d1) / f1:
    columns 1, -x, -f1 softplus(z), c1 sigmoid(z), -c1 (softplus(z) - z sigmoid(z))."""
    log_b, c0, c1, log_d1, f1 = p
    z = (x - log_d1) / f1
    sp, sg = np.logaddexp(0.0, z), expit(z)
    return np.column_stack([np.ones_like(x), -x, -f1 * sp, c1 * sg, -c1 * (sp - z * sg)])


def loss_at_break(b, c0, t_d):
    """L_d = b t_d^-c0: the pre-break power law evaluated at the break (published convention)."""
    return b * t_d ** -c0


def post_break_loss(t, L_d, t_d, r_d):
    """The post-break line, the asymptote of the 1-break form for t >> t_d: L_d (t / t_d)^-r_d."""
    return L_d * (t / t_d) ** -r_d


def rsle(log_pred, log_obs):
    """Root mean squared log error RSLE = sqrt(mean((log Lhat - log L)^2))."""
    return float(np.sqrt(np.mean((np.asarray(log_pred) - log_obs) ** 2)))


def break_quantities(p):
    """(t_d, L_d, r_d) = (d1, b d1^-c0, c0 + c1) of fitted parameters p = (log b, c0, c1, log d1, f1)."""
    log_b, c0, c1, log_d1, f1 = (float(v) for v in p)
    return math.exp(log_d1), loss_at_break(math.exp(log_b), c0, math.exp(log_d1)), c0 + c1

# -----------------------------------------------------------------------------
# preprocessing (the published convention, each step switchable)


def log_moving_average(y, factor=1.2):
    """Trailing log moving average: out[j] = mean(y[floor(j / factor) .. j]), a window whose width
    is a fixed fraction of the row index j (rows = evenly spaced steps, as in a run directory)."""
    y = np.asarray(y, dtype=float)
    j = np.arange(len(y))
    lo = np.floor(j / factor).astype(int)
    csum = np.concatenate([[0.0], np.cumsum(y)])
    return (csum[j + 1] - csum[lo]) / (j + 1 - lo)


def log_subsample(steps, n_points=200):
    """Indices of at most n_points steps evenly spaced in log t: the step nearest (in log t) to each
    of n_points log-spaced targets, duplicates removed; the first and last step are always kept."""
    x = np.log(np.asarray(steps, dtype=float))
    if len(x) <= n_points:
        return np.arange(len(x))
    targets = np.linspace(x[0], x[-1], n_points)
    i = np.searchsorted(x, targets).clip(1, len(x) - 1)
    return np.unique(np.where(targets - x[i - 1] < x[i] - targets, i - 1, i))


def preprocess(steps, loss, smooth=True, subsample=True, min_step=MIN_STEP, n_points=200, factor=1.2):
    """Published preprocessing: (1) trailing log moving average over all rows, (2) drop the
    transient steps t <= min_step (and always t = 0, which has no log), (3) log-spaced subsampling.
    The published cut is 100 for runs of 1e4-1e5 steps: 0.1-1 % of the run and 40-50 % of its
    log-step axis. For our 500-5000-step runs those two scalings give 0.5-50 and 12-70 steps, and a
    cut of 100 would remove 54-74 % of the log axis (often the break itself). The default 20 lies in
    both ranges and is past the initialization plateau; raise it to skip a long warmup."""
    steps, loss = np.asarray(steps, dtype=float), np.asarray(loss, dtype=float)
    if smooth:
        loss = log_moving_average(loss, factor)
    keep = steps > max(min_step, 0)
    steps, loss = steps[keep], loss[keep]
    if subsample and len(steps):
        i = log_subsample(steps, n_points)
        steps, loss = steps[i], loss[i]
    return steps, loss

# -----------------------------------------------------------------------------
# the fit


def fit_from(x, y, p0, lo, hi):
    """One bounded least-squares fit of log_bnsl (1 break) to y = log L, from p0."""
    def resid(p):
        return log_bnsl(x, p[0], p[1], [p[2]], [p[3]], [p[4]]) - y
    return least_squares(resid, p0, jac=lambda p: log_bnsl_jacobian(x, p), bounds=(lo, hi),
                         method='trf', x_scale='jac', ftol=1e-12, xtol=1e-12, gtol=1e-12)


def linear_start(x, y, log_d1, f1):
    """A start at fixed (d1, f1): log L is linear in (log b, c0, c1) there, so solve for those."""
    A = np.column_stack([np.ones_like(x), -x, -f1 * np.logaddexp(0.0, (x - log_d1) / f1)])
    (log_b, c0, c1), *_ = np.linalg.lstsq(A, y, rcond=None)
    return np.array([log_b, c0, c1, log_d1, f1])


def fit_multistart(x, y, n_d1=8, f1_fracs=(0.02, 0.1, 0.3)):
    """Best of the bounded fits started from a log-spaced grid of n_d1 breaks inside the data
    times f1 = (fractions of the log range). Bounds: log d1 in [x_0, x_-1], f1 in [F1_MIN, x_-1 - x_0].
    Returns (p, lo, hi)."""
    span = x[-1] - x[0]
    lo = np.array([-np.inf, -np.inf, -np.inf, x[0], F1_MIN])
    hi = np.array([np.inf, np.inf, np.inf, x[-1], max(span, 2 * F1_MIN)])
    best = None
    for log_d1 in np.linspace(x[0], x[-1], n_d1 + 2)[1:-1]:
        for frac in f1_fracs:
            f1 = float(np.clip(frac * span, 1.01 * lo[4], 0.99 * hi[4]))
            fit = fit_from(x, y, linear_start(x, y, log_d1, f1), lo, hi)
            if best is None or fit.cost < best.cost:
                best = fit
    return best.x, lo, hi


def unidentifiable_reason(x, y, p, f1_max):
    """Why the break of the fit p cannot be located from these points, or '' when it can."""
    log_b, c0, c1, log_d1, f1 = p
    sse = np.sum((log_bnsl(x, log_b, c0, [c1], [log_d1], [f1]) - y) ** 2)
    A = np.column_stack([np.ones_like(x), -x])
    sse_pl = np.sum((A @ np.linalg.lstsq(A, y, rcond=None)[0] - y) ** 2)
    if sse_pl <= 1e-20 * len(x):
        return "the curve is a pure power law (no break to locate)"
    if sse > (1 - MIN_GAIN) * sse_pl:
        return (f"a pure power law fits about as well: the break removes only {1 - sse / sse_pl:.0%} "
                f"of its squared log error (< {MIN_GAIN:.0%})")
    before, after = int(np.sum(x < log_d1)), int(np.sum(x > log_d1))
    if min(before, after) < MIN_SIDE or min(log_d1 - x[0], x[-1] - log_d1) < 1e-3 * (x[-1] - x[0]):
        return (f"the break is at the edge of the data (t = {math.exp(log_d1):.4g}; "
                f"{before} points before, {after} after)")
    if f1 >= 0.999 * f1_max:
        return "the bend is as wide as the data (f1 at its upper bound, the log range)"
    if abs(c1) <= C1_TOL * max(abs(c0), abs(c0 + c1)):
        return f"the slope hardly changes (|c1| = {abs(c1):.3g}, below {C1_TOL:.0%} of the slope)"
    return ''


def covariance_intervals(x, p, resid):
    """95 % intervals of t_d, L_d, r_d from cov = s^2 (J^T J)^-1, s^2 = sum(resid^2) / (n - 5), J the
    Jacobian at the optimum, propagated linearly: log t_d = log d1, log L_d = log b - c0 log d1,
    r_d = c0 + c1 (the first two are symmetric in log). Assumes independent residuals."""
    J = log_bnsl_jacobian(x, p)
    cov = np.sum(resid ** 2) / max(len(x) - 5, 1) * np.linalg.pinv(J.T @ J)
    grads = {'t_d': [0, 0, 0, 1, 0], 'L_d': [1, -p[3], 0, -p[1], 0], 'r_d': [0, 1, 1, 0, 0]}
    centres = {'t_d': p[3], 'L_d': p[0] - p[1] * p[3], 'r_d': p[1] + p[2]}
    out = {}
    for k, g in grads.items():
        half = Z95 * math.sqrt(max(float(np.dot(g, cov @ np.array(g, dtype=float))), 0.0))
        lo, hi = centres[k] - half, centres[k] + half
        out[k] = [lo, hi] if k == 'r_d' else [math.exp(lo), math.exp(hi)]
    return out


def block_bootstrap(x, y_fit, resid, p, lo, hi, n_boot=100, block=0, seed=0):
    """95 % percentile intervals of (t_d, L_d, r_d) from a moving-block bootstrap: n_boot times,
    y* = y_fit + resid* with resid* = ceil(n / block) random contiguous blocks of the log residuals
    (block = 0: ceil(sqrt(n))), refit from p. Blocks keep the residuals' autocorrelation (smoothed
    curves have plenty), which the covariance ignores. Seeded: deterministic."""
    n = len(x)
    block = min(block or math.ceil(math.sqrt(n)), n)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        starts = rng.integers(0, n - block + 1, size=math.ceil(n / block))
        e = resid[(starts[:, None] + np.arange(block)).ravel()[:n]]
        draws.append(break_quantities(fit_from(x, y_fit + e, p, lo, hi).x))
    lo_q, hi_q = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
    return {k: [float(lo_q[i]), float(hi_q[i])] for i, k in enumerate(['t_d', 'L_d', 'r_d'])}


def fit_bnsl(steps, loss, n_boot=100, block=0, seed=0):
    """Fit the 1-break BNSL to the points (steps > 0, loss > 0) exactly as given (call `preprocess`
    first for the published convention). Returns a dict: t_d, L_d, c0, c1, r_d, f1, b, rsle,
    n_points, identifiable, reason, final_loss_pred (the post-break line at the last step), 95 %
    intervals {t_d,L_d,r_d}_ci_cov and _ci_boot ([lo, hi]; n_boot = 0: no bootstrap), t_range,
    rsle_power_law. Not identifiable: t_d, L_d, r_d, final_loss_pred and intervals are None."""
    t, loss = np.asarray(steps, dtype=float), np.asarray(loss, dtype=float)
    if len(t) < MIN_POINTS or not (np.all(np.isfinite(t)) and np.all(np.isfinite(loss))):
        raise ValueError(f"need at least {MIN_POINTS} finite points, got {len(t)}")
    if np.any(t <= 0) or np.any(loss <= 0) or np.any(np.diff(t) <= 0):
        raise ValueError("steps must be positive and increasing, losses positive")
    x, y = np.log(t), np.log(loss)
    p, lo, hi = fit_multistart(x, y)
    log_b, c0, c1, log_d1, f1 = (float(v) for v in p)
    y_fit = log_bnsl(x, log_b, c0, [c1], [log_d1], [f1])
    A = np.column_stack([np.ones_like(x), -x])
    reason = unidentifiable_reason(x, y, p, hi[4])
    t_d, L_d, r_d = break_quantities(p)
    res = dict(t_d=t_d, L_d=L_d, c0=c0, c1=c1, r_d=r_d, f1=f1, b=math.exp(log_b), rsle=rsle(y_fit, y),
               n_points=len(t), identifiable=not reason, reason=reason or None,
               final_loss_pred=post_break_loss(float(t[-1]), L_d, t_d, r_d),
               t_range=[float(t[0]), float(t[-1])],
               rsle_power_law=rsle(A @ np.linalg.lstsq(A, y, rcond=None)[0], y))
    cov = covariance_intervals(x, p, y - y_fit) if not reason else {}
    boot = (block_bootstrap(x, y_fit, y - y_fit, p, lo, hi, n_boot, block, seed)
            if not reason and n_boot > 0 else {})
    for k in ['t_d', 'L_d', 'r_d']:
        res[f'{k}_ci_cov'], res[f'{k}_ci_boot'] = cov.get(k), boot.get(k)
    if reason:
        res.update(t_d=None, L_d=None, r_d=None, final_loss_pred=None)
    finite = lambda v: v if not isinstance(v, float) or math.isfinite(v) else None  # JSON has no NaN
    return {k: [finite(u) for u in v] if isinstance(v, list) else finite(v) for k, v in res.items()}

# -----------------------------------------------------------------------------
# input and command line


def read_csv(path):
    """(steps, loss) of a CSV with two comma-separated columns step,loss; the first line may be a header."""
    try:  # utf-8-sig drops a byte-order mark, which would otherwise make a first data row look like a header
        with open(path, encoding='utf-8-sig') as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        parts = line.split(',')
        try:
            if len(parts) != 2:
                raise ValueError
            rows.append((float(parts[0]), float(parts[1])))
        except ValueError:
            if i == 0:
                continue  # a header
            raise ValueError(f"{path}: line {i + 1} is not 'step,loss': {line[:40]!r}")
    rows = np.array(rows, dtype=float).reshape(-1, 2)
    return rows[:, 0], rows[:, 1]


def load_curve(path):
    """(steps, loss) of a run directory (train_loss.npy: row t = step t, the rows before the first
    NaN, which may still be being written) or of a CSV file. Bad input raises ValueError naming
    the problem and the file."""
    if os.path.isdir(path):
        npy = os.path.join(path, 'train_loss.npy')
        if not os.path.isfile(npy):
            raise ValueError(f"{path}: a directory without train_loss.npy (not a run directory)")
        try:
            loss = np.array(np.load(npy, mmap_mode='r', allow_pickle=False), dtype=float)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{npy}: unreadable ({e})")
        if loss.ndim != 1:
            raise ValueError(f"{npy}: expected a 1-D array, got shape {loss.shape}")
        nan = np.flatnonzero(np.isnan(loss))
        loss = loss[:nan[0]] if len(nan) else loss
        steps = np.arange(len(loss), dtype=float)
    elif os.path.isfile(path):
        steps, loss = read_csv(path)
    else:
        raise ValueError(f"{path}: no such file or directory")
    bad = np.flatnonzero(~np.isfinite(steps) | ~np.isfinite(loss))
    if len(bad):
        raise ValueError(f"{path}: non-finite value at step {steps[bad[0]]:g} (loss {loss[bad[0]]})")
    if np.any(loss <= 0):
        raise ValueError(f"{path}: non-positive loss {loss[loss <= 0][0]:g} (log L undefined)")
    steps, loss = merge_exact_duplicates(path, steps, loss)
    if np.any(steps < 0) or np.any(np.diff(steps) <= 0):
        raise ValueError(f"{path}: steps must be >= 0 and strictly increasing")
    return steps, loss


def merge_exact_duplicates(path, steps, loss):
    """(steps, loss) with exact duplicate rows (same step, same loss: published curves have them) kept
    once, with a note on stderr; the same step with two different losses is bad input (ValueError)."""
    first, keep = {}, []  # step -> loss of its first row; rows kept
    for i, (s, v) in enumerate(zip(steps.tolist(), loss.tolist())):
        if s not in first:
            first[s] = v
            keep.append(i)
        elif v != first[s]:
            raise ValueError(f"{path}: step {s:g} appears twice with different losses "
                             f"({first[s]!r} and {v!r}); steps must be strictly increasing")
    merged = len(steps) - len(keep)
    if merged:
        print(f"bnsl.py: note: {path}: {merged} exact duplicate row{'s' * (merged > 1)} merged",
              file=sys.stderr)
    return steps[keep], loss[keep]


def format_table(res):
    """A human-readable table of one fit."""
    lines = [f"{res['path']}: {res['n_points']} points, steps {res['t_range'][0]:g}..{res['t_range'][1]:g}"]
    if not res['identifiable']:
        lines.append(f"  break not identifiable: {res['reason']}")
    lines.append(f"  {'':16s}{'value':>12s}  {'95% cov':>23s}  {'95% bootstrap':>23s}")
    fmt = lambda v: 'null' if v is None else f"{v:.4g}"
    for k in ['t_d', 'L_d', 'r_d', 'c0', 'c1', 'f1', 'b', 'final_loss_pred', 'rsle', 'rsle_power_law']:
        ci = [res.get(f'{k}_ci_{s}') for s in ('cov', 'boot')]
        ci = ['' if c is None else f"[{c[0]:.4g}, {c[1]:.4g}]" for c in ci]
        lines.append(f"  {k:16s}{fmt(res[k]):>12s}  {ci[0]:>23s}  {ci[1]:>23s}")
    return '\n'.join(lines)


def fail(msg):
    """Bad input: one line naming the problem and exit status 2, never a traceback."""
    print(f"bnsl.py: error: {' '.join(str(msg).split())}", file=sys.stderr)
    sys.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: this module's docstring as written (the full reference), then the options with defaults."""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=HelpFormatter)
    p.error = fail
    p.add_argument('paths', nargs='+', help='run directories (train_loss.npy) or CSV files (step,loss)')
    p.add_argument('--raw', action='store_true',
                   help='fit the points as given: no smoothing, subsampling or transient cut')
    p.add_argument('--no_smooth', action='store_true', help='skip the trailing log moving average')
    p.add_argument('--no_subsample', action='store_true', help='skip the log-spaced subsampling')
    p.add_argument('--min_step', type=float, default=MIN_STEP, help='drop the transient steps t <= min_step')
    p.add_argument('--n_points', type=int, default=200, help='log-spaced points kept by the subsampling')
    p.add_argument('--n_boot', type=int, default=100, help='block-bootstrap resamples (0: none)')
    p.add_argument('--block', type=int, default=0, help='bootstrap block length in points (0: ceil(sqrt(n)))')
    p.add_argument('--seed', type=int, default=0, help='seed of the bootstrap')
    p.add_argument('--table', action='store_true', help='print a human-readable table instead of JSON')
    args = p.parse_args(argv)
    for name in ['n_points', 'n_boot', 'block']:
        if getattr(args, name) < (2 if name == 'n_points' else 0):
            fail(f"--{name} is too small: {getattr(args, name)}")
    curves = []  # load and check every path first: bad input stops before any output
    for path in args.paths:
        try:
            steps, loss = load_curve(path)
        except ValueError as e:
            fail(e)
        if args.raw:
            steps, loss = steps[steps > 0], loss[steps > 0]
        else:
            steps, loss = preprocess(steps, loss, not args.no_smooth, not args.no_subsample, args.min_step,
                                     args.n_points)
        if len(steps) < MIN_POINTS:
            fail(f"{path}: {len(steps)} points to fit (steps > {0 if args.raw else args.min_step:g}), "
                 f"need at least {MIN_POINTS}")
        curves.append((path, steps, loss))
    for path, steps, loss in curves:
        res = dict(fit_bnsl(steps, loss, args.n_boot, args.block, args.seed), path=path)
        print(format_table(res) if args.table else json.dumps(res), flush=True)


if __name__ == '__main__':
    main()
