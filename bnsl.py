"""
Loss deceleration: a 1-break broken-neural-scaling-law (BNSL) fit of a training-loss curve.

    python bnsl.py out/run                # a run directory (its train_loss.npy): one JSON line
    python bnsl.py curve.csv --table      # a CSV of step,loss lines; a table instead of JSON

The form, in x = log t (t = step > 0), falls with slope c0 before the break and c0 + c1 after it:

    log L(t) = log b - c0 x - c1 f1 log(1 + exp((x - log d1) / f1))

Reported: the break t_d = d1, L_d = b t_d^-c0 (the pre-break power law there) and r_d = c0 + c1,
with 95 % intervals (covariance; block bootstrap). The curve is first smoothed by a trailing log
moving average (row j: the mean of rows floor(j / 1.2) .. j), cut to steps t > MIN_STEP and
log-subsampled. A trailing average lags, so the published convention, which fits the form to the
smoothed points as they are, puts t_d about 9 % late; the default, 'unbiased', convention passes
the form through the same average first, and reports the published fit beside its own. The fit is
bounded (f1 > 0: no mirror solution; d1 inside the data) and started 24 times; a break that cannot
be located (a pure power law fits as well; the break at an edge) is reported as such, not as a t_d.

docs/bnsl.md explains the form, the conventions, the preprocessing, the traps, the intervals and
every output key; studies/bnsl_synthetic.py tests both conventions on curves with a known break.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit

from runs import fail

MIN_POINTS = 8  # fewer points to fit is bad input (the 1-break form has 5 parameters)
MIN_STEP = 20  # default transient cut: steps <= MIN_STEP are dropped (docs/bnsl.md says why 20)
F1_MIN = 0.01  # lower bound of f1 (> 0: no mirror solution); the upper bound is the log range
MIN_SIDE = 3  # a break needs at least this many fitted points on each side,
MIN_GAIN = 0.5  # ... must remove at least half the squared log error of a pure power law,
C1_TOL = 0.02  # ... and must change the slope by at least 2 %
Z95 = 1.959963984540054  # standard normal quantile of 0.975: 95 % intervals

# -----------------------------------------------------------------------------
# the form; p = (log b, c0, c1, log d1, f1) in the fit


def log_bnsl(x, log_b, c0, cs, log_ds, fs):
    """n-break BNSL in log space, x = log t: log L = log b - c0 x - sum_i c_i f_i softplus((x - log d_i) / f_i),
    softplus(z) = log(1 + e^z), computed as np.logaddexp(0, z): no overflow for a sharp break."""
    y = log_b - c0 * np.asarray(x, dtype=float)
    for c, log_d, f in zip(cs, log_ds, fs):
        y = y - c * f * np.logaddexp(0.0, (x - log_d) / f)
    return y


def log_form(x, p):
    """log L of the 1-break form at p = (log b, c0, c1, log d1, f1)."""
    return log_bnsl(x, p[0], p[1], [p[2]], [p[3]], [p[4]])


def bnsl(t, b, c0, cs, ds, fs):
    """n-break BNSL L(t) = b t^-c0 prod_i (1 + (t / d_i)^(1 / f_i))^(-c_i f_i); cs, ds, fs: one entry a break."""
    return np.exp(log_bnsl(np.log(t), math.log(b), c0, cs, np.log(ds), fs))


def bnsl_1break(t, b, c0, c1, d1, f1):
    """The 1-break form L(t) = b t^-c0 (1 + (t / d1)^(1 / f1))^(-c1 f1)."""
    return bnsl(t, b, c0, [c1], [d1], [f1])


def loss_at_break(b, c0, t_d):
    """L_d = b t_d^-c0: the pre-break power law at the break (the curve itself is 2^(-c1 f1) L_d there)."""
    return b * t_d ** -c0


def post_break_loss(t, L_d, t_d, r_d):
    """The post-break line, the asymptote of the form for t >> t_d: L_d (t / t_d)^-r_d."""
    return L_d * (t / t_d) ** -r_d


def break_quantities(p):
    """(t_d, L_d, r_d) = (d1, b d1^-c0, c0 + c1) of the fitted p."""
    log_b, c0, c1, log_d1, f1 = (float(v) for v in p)
    return math.exp(log_d1), loss_at_break(math.exp(log_b), c0, math.exp(log_d1)), c0 + c1


def rsle(log_pred, log_obs):
    """Root mean squared log error RSLE = sqrt(mean((log Lhat - log L)^2))."""
    return float(np.sqrt(np.mean((np.asarray(log_pred) - log_obs) ** 2)))


def log_window_mean(y, first, last):
    """log mean(exp(y_k), k = first_i .. last_i) for each window i, by cumulative sums of exp(y - max y)."""
    top = y.max()  # subtracted so that exp cannot overflow
    csum = np.concatenate([[0.0], np.cumsum(np.exp(y - top))])
    return top + np.log((csum[last + 1] - csum[first]) / (last + 1 - first))


def log_averaged_bnsl(xg, first, last, p):
    """The form passed through the data's trailing average (the unbiased convention): log A_i,
    A_i = mean(L(t_k), k = first_i .. last_i), L the form on the grid xg = log t of every row."""
    return log_window_mean(log_form(xg, p), first, last)


def log_bnsl_jacobian(x, p, first=None, last=None):
    """d log L / d(log b, c0, c1, log d1, f1) of the form at p, z = (x - log d1) / f1: columns
    1, -x, -f1 softplus(z), c1 sigmoid(z), -c1 (softplus(z) - z sigmoid(z)). With windows (first, last):
    that of log A_i, the L-weighted mean sum_k L_k J_k / sum_k L_k of J over each window's rows."""
    log_b, c0, c1, log_d1, f1 = p
    z = (x - log_d1) / f1
    sp, sg = np.logaddexp(0.0, z), expit(z)
    J = np.column_stack([np.ones_like(x), -x, -f1 * sp, c1 * sg, -c1 * (sp - z * sg)])  # (rows, 5)
    if first is None:
        return J
    y = log_form(x, p)
    w = np.exp(y - y.max())
    wJ = np.concatenate([w[None], w * J.T])  # (6, rows): L, then L J
    csum = np.concatenate([np.zeros((6, 1)), np.cumsum(wJ, axis=1)], axis=1)
    sums = csum[:, last + 1] - csum[:, first]  # (6, n): sum of L, then of L J, over each window
    return (sums[1:] / sums[0]).T  # (n, 5)

# -----------------------------------------------------------------------------
# preprocessing


def window_starts(n, factor=1.2):
    """First row floor(j / factor) of the trailing window rows floor(j / factor) .. j of each row j < n."""
    return np.floor(np.arange(n) / factor).astype(int)


def log_moving_average(y, factor=1.2):
    """Trailing log moving average: out[j] = mean(y[floor(j / factor) .. j]), a window whose width is a
    fixed fraction of the row j (rows = evenly spaced steps, as in a run directory)."""
    y = np.asarray(y, dtype=float)
    j = np.arange(len(y))
    lo = window_starts(len(y), factor)
    csum = np.concatenate([[0.0], np.cumsum(y)])
    return (csum[j + 1] - csum[lo]) / (j + 1 - lo)


def log_subsample(steps, n_points=200):
    """Indices of at most n_points steps evenly spaced in log t: the step nearest (in log t) to each of
    n_points log-spaced targets, duplicates removed; the first and last step are always kept."""
    x = np.log(np.asarray(steps, dtype=float))
    if len(x) <= n_points:
        return np.arange(len(x))
    targets = np.linspace(x[0], x[-1], n_points)
    i = np.searchsorted(x, targets).clip(1, len(x) - 1)
    return np.unique(np.where(targets - x[i - 1] < x[i] - targets, i - 1, i))


def kept_rows(steps, min_step=MIN_STEP, subsample=True, n_points=200, starts=None):
    """Indices of the rows fitted: steps t > min_step (and t > 0, which has a log), log-subsampled.
    With `starts` (each row's window start: the unbiased convention) also only rows whose window
    holds no step t <= 0, where the form has no value (row 1 at min_step 0)."""
    steps = np.asarray(steps, dtype=float)
    keep = steps > max(min_step, 0)
    if starts is not None:
        keep &= steps[starts] > 0
    i = np.flatnonzero(keep)
    return i[log_subsample(steps[i], n_points)] if subsample and len(i) else i


def preprocess(steps, loss, smooth=True, subsample=True, min_step=MIN_STEP, n_points=200, factor=1.2):
    """The (steps, loss) the published convention fits as they are: (1) the trailing log moving
    average over every row, (2) the transient cut t <= min_step (and t = 0), (3) log subsampling."""
    steps, loss = np.asarray(steps, dtype=float), np.asarray(loss, dtype=float)
    if smooth:
        loss = log_moving_average(loss, factor)
    i = kept_rows(steps, min_step, subsample, n_points)
    return steps[i], loss[i]


def fit_inputs(steps, loss, convention='unbiased', smooth=True, subsample=True, min_step=MIN_STEP,
               n_points=200, factor=1.2):
    """The fits fit_curve makes, {name: (t, l, window)}, the main one first: 'unbiased' (smoothed rows;
    window = (grid steps, their raw loss, first, last): every row from the first kept row's window
    on, and each kept row's window in it) then 'published' (window None); only 'published' for
    convention='published'; only 'unsmoothed' without smoothing. ValueError: too few points."""
    if convention not in ('unbiased', 'published'):
        raise ValueError(f"convention must be 'unbiased' or 'published', not {convention!r}")
    steps, loss = np.asarray(steps, dtype=float), np.asarray(loss, dtype=float)
    out = {}
    if smooth and convention == 'unbiased':  # smooth every row, keep some, average the form over their windows
        starts = window_starts(len(steps), factor)
        i = kept_rows(steps, min_step, subsample, n_points, starts)
        g, end = (starts[i[0]], i[-1] + 1) if len(i) else (0, 0)  # the grid: every row from the first window on
        window = (steps[g:end], loss[g:end], starts[i] - g, i - g)
        out['unbiased'] = (steps[i], log_moving_average(loss, factor)[i], window)
    out['published' if smooth else 'unsmoothed'] = preprocess(steps, loss, smooth, subsample, min_step,
                                                               n_points, factor) + (None,)
    for name, (t, l, window) in out.items():
        if len(t) < MIN_POINTS:
            raise ValueError(f"{len(t)} points to fit (steps > {min_step:g}"
                             f"{', windows without t = 0' if window is not None else ''}), "
                             f"need at least {MIN_POINTS}")
    return out

# -----------------------------------------------------------------------------
# the fit


def model(x, window=None):
    """(f, jac): log Lhat at the fitted points and its Jacobian, as functions of p. window None: the
    form at x = log t; window = (grid steps, raw loss, first, last): the form averaged as the data were."""
    if window is None:
        return lambda p: log_form(x, p), lambda p: log_bnsl_jacobian(x, p)
    xg, first, last = np.log(window[0]), window[2], window[3]
    return (lambda p: log_averaged_bnsl(xg, first, last, p),
            lambda p: log_bnsl_jacobian(xg, p, first, last))


def fit_from(f, jac, y, p0, lo, hi):
    """One bounded trust-region least-squares fit of the model (f, jac) to y = log L, from p0."""
    return least_squares(lambda p: f(p) - y, p0, jac=jac, bounds=(lo, hi),
                         method='trf', x_scale='jac', ftol=1e-12, xtol=1e-12, gtol=1e-12)


def fit_multistart(x, y, f, jac, n_d1=8, f1_fracs=(0.02, 0.1, 0.3)):
    """The best of the bounded fits from n_d1 log-spaced breaks inside the data times f1 = fractions
    of the log range, (log b, c0, c1) of each start solved linearly (the form is linear in them at
    fixed d1, f1). Bounds: log d1 in [x_0, x_-1], f1 in [F1_MIN, x_-1 - x_0]. Returns (p, lo, hi)."""
    span = x[-1] - x[0]
    lo = np.array([-np.inf, -np.inf, -np.inf, x[0], F1_MIN])
    hi = np.array([np.inf, np.inf, np.inf, x[-1], max(span, 2 * F1_MIN)])
    best = None
    for log_d1 in np.linspace(x[0], x[-1], n_d1 + 2)[1:-1]:
        for frac in f1_fracs:
            f1 = float(np.clip(frac * span, 1.01 * lo[4], 0.99 * hi[4]))
            A = np.column_stack([np.ones_like(x), -x, -f1 * np.logaddexp(0.0, (x - log_d1) / f1)])
            (log_b, c0, c1), *_ = np.linalg.lstsq(A, y, rcond=None)
            fit = fit_from(f, jac, y, np.array([log_b, c0, c1, log_d1, f1]), lo, hi)
            if best is None or fit.cost < best.cost:
                best = fit
    return best.x, lo, hi


def power_law_fit(x, y, f, jac, averaged):
    """log Lhat of the best pure power law b t^-c0 (c1 = 0), compared with y as the 1-break fit is: a
    straight line in log-log, or (averaged) that line averaged as the data were."""
    A = np.column_stack([np.ones_like(x), -x])
    q = np.linalg.lstsq(A, y, rcond=None)[0]
    if not averaged:
        return A @ q
    full = lambda q: np.array([q[0], q[1], 0.0, x[0], 1.0])  # c1 = 0: d1 and f1 do not matter
    q = least_squares(lambda q: f(full(q)) - y, q, jac=lambda q: jac(full(q))[:, :2],
                      ftol=1e-12, xtol=1e-12, gtol=1e-12).x
    return f(full(q))


def unidentifiable_reason(x, p, f1_max, sse, sse_pl):
    """Why the break of p (squared log error sse; sse_pl of the best pure power law) cannot be located
    from the points at x, or '' when it can."""
    log_b, c0, c1, log_d1, f1 = p
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


def covariance_intervals(J, p, resid):
    """95 % intervals of t_d, L_d, r_d from cov = s^2 (J^T J)^-1, s^2 = sum(resid^2) / (n - 5), propagated
    linearly to log t_d = log d1, log L_d = log b - c0 log d1, r_d = c0 + c1. Assumes independent residuals."""
    cov = np.sum(resid ** 2) / max(len(resid) - 5, 1) * np.linalg.pinv(J.T @ J)
    grads = {'t_d': [0, 0, 0, 1, 0], 'L_d': [1, -p[3], 0, -p[1], 0], 'r_d': [0, 1, 1, 0, 0]}
    centres = {'t_d': p[3], 'L_d': p[0] - p[1] * p[3], 'r_d': p[1] + p[2]}
    out = {}
    for k, g in grads.items():
        half = Z95 * math.sqrt(max(float(np.dot(g, cov @ np.array(g, dtype=float))), 0.0))
        lo, hi = centres[k] - half, centres[k] + half
        out[k] = [lo, hi] if k == 'r_d' else [math.exp(lo), math.exp(hi)]  # symmetric in log
    return out


def bootstrap_intervals(refit, base, resid, smooth, n_boot=100, block=0, seed=0):
    """95 % percentile intervals of (t_d, L_d, r_d) from a moving-block bootstrap: n_boot times, draw
    ceil(n / block) random contiguous blocks of the log residuals resid (n,) (block 0: ceil(sqrt(n))),
    add them to base, smooth, refit(y) -> p. Blocks keep the residuals' autocorrelation. Seeded."""
    n = len(resid)
    block = min(block or math.ceil(math.sqrt(n)), n)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        starts = rng.integers(0, n - block + 1, size=math.ceil(n / block))
        draws.append(break_quantities(refit(smooth(base + resid[(starts[:, None] + np.arange(block)).ravel()[:n]]))))
    lo, hi = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
    return {k: [float(lo[i]), float(hi[i])] for i, k in enumerate(['t_d', 'L_d', 'r_d'])}


def fit_bnsl(steps, loss, n_boot=100, block=0, seed=0, window=None):
    """Fit the 1-break form to the points (steps > 0 increasing, loss > 0) as given (the published
    convention after `preprocess`). window = (grid steps, raw loss, first, last), from fit_inputs:
    compare point i with the form averaged over grid rows first_i .. last_i (the unbiased convention).
    Returns the dict of docs/bnsl.md; not identifiable: t_d, L_d, r_d, final_loss_pred, intervals None."""
    t, loss = np.asarray(steps, dtype=float), np.asarray(loss, dtype=float)
    if len(t) < MIN_POINTS or not (np.all(np.isfinite(t)) and np.all(np.isfinite(loss))):
        raise ValueError(f"need at least {MIN_POINTS} finite points, got {len(t)}")
    if np.any(t <= 0) or np.any(loss <= 0) or np.any(np.diff(t) <= 0):
        raise ValueError("steps must be positive and increasing, losses positive")
    if window is not None and (len(window[2]) != len(t) or np.any(window[0] <= 0) or np.any(window[1] <= 0)):
        raise ValueError("window: one (first, last) per point, over grid steps > 0 with losses > 0")
    x, y = np.log(t), np.log(loss)
    f, jac = model(x, window)
    p, lo, hi = fit_multistart(x, y, *model(x))  # the starts with the form itself (cheap), then the
    if window is not None:  # averaged form from the best (its own 24 starts found the same optimum)
        p = fit_from(f, jac, y, p, lo, hi).x
    log_b, c0, c1, log_d1, f1 = (float(v) for v in p)
    y_fit, y_pl = f(p), power_law_fit(x, y, f, jac, window is not None)
    reason = unidentifiable_reason(x, p, hi[4], np.sum((y_fit - y) ** 2), np.sum((y_pl - y) ** 2))
    t_d, L_d, r_d = break_quantities(p)
    res = dict(t_d=t_d, L_d=L_d, c0=c0, c1=c1, r_d=r_d, f1=f1, b=math.exp(log_b), rsle=rsle(y_fit, y),
               n_points=len(t), identifiable=not reason, reason=reason or None,
               final_loss_pred=post_break_loss(float(t[-1]), L_d, t_d, r_d),
               t_range=[float(t[0]), float(t[-1])], rsle_power_law=rsle(y_pl, y))
    if window is None:  # resample the fitted points' log residuals, on the fitted curve
        base, resid, smooth = y_fit, y - y_fit, lambda y: y
    else:  # resample the raw rows' log residuals, on the form at every row, then smooth as the data were
        base = log_form(np.log(window[0]), p)
        resid, smooth = np.log(window[1]) - base, lambda y: log_window_mean(y, window[2], window[3])
    refit = lambda y: fit_from(f, jac, y, p, lo, hi).x
    cov = {} if reason else covariance_intervals(jac(p), p, y - y_fit)
    boot = {} if reason or n_boot == 0 else bootstrap_intervals(refit, base, resid, smooth, n_boot, block, seed)
    for k in ['t_d', 'L_d', 'r_d']:
        res[f'{k}_ci_cov'], res[f'{k}_ci_boot'] = cov.get(k), boot.get(k)
    if reason:
        res.update(t_d=None, L_d=None, r_d=None, final_loss_pred=None)
    finite = lambda v: v if not isinstance(v, float) or math.isfinite(v) else None  # JSON has no NaN
    return {k: [finite(u) for u in v] if isinstance(v, list) else finite(v) for k, v in res.items()}


def fit_curve(steps, loss, convention='unbiased', smooth=True, subsample=True, min_step=MIN_STEP,
              n_points=200, factor=1.2, n_boot=100, block=0, seed=0):
    """Preprocess a whole curve (every row as recorded: steps >= 0 increasing, loss > 0) and fit it:
    fit_bnsl's dict of the main fit plus convention ('unbiased', 'published' or 'unsmoothed') and
    published (the published fit's dict beside an unbiased one, else None). ValueError: too few points."""
    fits = {name: fit_bnsl(t, l, n_boot, block, seed, window)
            for name, (t, l, window) in fit_inputs(steps, loss, convention, smooth, subsample, min_step,
                                                   n_points, factor).items()}
    name = next(iter(fits))
    published = fits['published'] if name == 'unbiased' else None
    return dict(fits[name], convention=name, published=published and dict(published, convention='published'))

# -----------------------------------------------------------------------------
# input and command line


def read_csv(path):
    """(steps, loss) of a CSV file of step,loss lines; a first line that is not two numbers is a header."""
    try:  # utf-8-sig drops a byte-order mark, which would make a first data row look like a header
        with open(path, encoding='utf-8-sig') as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            step, value = map(float, line.split(','))  # exactly two numbers
        except ValueError:
            if i == 0:
                continue  # a header
            raise ValueError(f"{path}: line {i + 1} is not 'step,loss': {line[:40]!r}")
        rows.append((step, value))
    rows = np.array(rows, dtype=float).reshape(-1, 2)
    return rows[:, 0], rows[:, 1]


def load_curve(path):
    """(steps, loss) of a run directory (train_loss.npy: row t = step t, up to the first NaN, so a run
    still in progress can be fitted) or of a CSV file. Exact duplicate rows (published curves repeat
    some) are kept once, with a note on stderr. Bad input: ValueError naming the file and the problem."""
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
    twin = np.flatnonzero(np.diff(steps) == 0)  # row twin + 1 repeats the step of row twin
    conflict = twin[loss[twin] != loss[twin + 1]]
    if len(conflict):
        k = conflict[0]
        raise ValueError(f"{path}: step {steps[k]:g} appears twice with different losses "
                         f"({loss[k]!r} and {loss[k + 1]!r}); steps must be strictly increasing")
    if len(twin):
        print(f"bnsl.py: note: {path}: {len(twin)} exact duplicate row{'s' * (len(twin) > 1)} merged",
              file=sys.stderr)
    steps, loss = np.delete(steps, twin + 1), np.delete(loss, twin + 1)
    if np.any(steps < 0) or np.any(np.diff(steps) <= 0):
        raise ValueError(f"{path}: steps must be >= 0 and strictly increasing")
    return steps, loss


def format_table(res):
    """A human-readable table of one fit (and of its published-convention fit, when there is one)."""
    lines = [f"{res['path']}: {res['n_points']} points, steps {res['t_range'][0]:g}..{res['t_range'][1]:g}, "
             f"{res['convention']} convention"]
    if not res['identifiable']:
        lines.append(f"  break not identifiable: {res['reason']}")
    lines.append(f"  {'':16s}{'value':>12s}  {'95% cov':>23s}  {'95% bootstrap':>23s}")
    fmt = lambda v: 'null' if v is None else f"{v:.4g}"
    pub = res.get('published')
    keys = ['t_d', 'L_d', 'r_d', 'c0', 'c1', 'f1', 'b', 'final_loss_pred', 'rsle', 'rsle_power_law']
    rows = [(k, k, res) for k in keys] + [(k + ' published', k, pub) for k in ['t_d', 'L_d', 'r_d'] if pub]
    for name, k, r in rows:
        ci = [r.get(f'{k}_ci_{s}') for s in ('cov', 'boot')]
        ci = ['' if c is None else f"[{c[0]:.4g}, {c[1]:.4g}]" for c in ci]
        lines.append(f"  {name:16s}{fmt(r[k]):>12s}  {ci[0]:>23s}  {ci[1]:>23s}")
    if pub and not pub['identifiable']:
        lines.append(f"  published convention: break not identifiable: {pub['reason']}")
    return '\n'.join(lines)


def at_least(minimum):
    """An argparse type: an integer >= minimum (else one line, exit status 2)."""
    def integer(s):
        if int(s) < minimum:  # not an integer: ValueError, which argparse reports
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {s}")
        return int(s)
    return integer


def main(argv=None):
    p = argparse.ArgumentParser(description="The 1-break BNSL fit of loss curves: one JSON line a path. "
                                "docs/bnsl.md explains the method, its options and every output key.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = fail  # bad input: one line, exit status 2
    p.add_argument('paths', nargs='*', help='run directories (train_loss.npy) or CSV files (step,loss)')
    p.add_argument('--published', action='store_true',
                   help='only the published convention (the form fitted to the smoothed points as they are)')
    p.add_argument('--raw', action='store_true', help='fit the points as given: no smoothing, subsampling or cut')
    p.add_argument('--no_smooth', action='store_true', help='skip the trailing log moving average')
    p.add_argument('--no_subsample', action='store_true', help='skip the log-spaced subsampling')
    p.add_argument('--min_step', type=float, default=MIN_STEP, help='drop the transient steps t <= min_step')
    p.add_argument('--n_points', type=at_least(2), default=200, help='log-spaced points kept by the subsampling')
    p.add_argument('--n_boot', type=at_least(0), default=argparse.SUPPRESS,  # 100, or the study's
                   help='bootstrap resamples (0: none; default 100, 40 for --synthetic)')
    p.add_argument('--block', type=at_least(0), default=0,
                   help='bootstrap block length: points, or raw rows in the unbiased convention (0: ceil(sqrt(n)))')
    p.add_argument('--seed', type=at_least(0), default=0, help='seed of the bootstrap')
    p.add_argument('--table', action='store_true', help='a human-readable table instead of JSON')
    p.add_argument('--synthetic', action='store_true',
                   help='run studies/bnsl_synthetic.py instead (no paths; --n_seeds, --n_boot, --min_step apply)')
    p.add_argument('--n_seeds', type=at_least(1), default=20, help='noisy curves a case in --synthetic')
    args = p.parse_args(argv)
    if args.synthetic:  # the study of both conventions lives beside the method, in studies/
        if args.paths:
            fail("--synthetic takes no paths")
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'studies'))
        import bnsl_synthetic
        bnsl_synthetic.synthetic_study(args.n_seeds, getattr(args, 'n_boot', bnsl_synthetic.STUDY_N_BOOT),
                                       args.min_step)
        return
    if not args.paths:
        fail("no path given (a run directory or a CSV file; or --synthetic)")
    prep = dict(convention='published' if args.published else 'unbiased',
                smooth=not (args.raw or args.no_smooth), subsample=not (args.raw or args.no_subsample),
                min_step=0 if args.raw else args.min_step, n_points=args.n_points)
    curves = []  # load and check every path first: bad input stops before any output
    for path in args.paths:
        try:
            steps, loss = load_curve(path)
            fit_inputs(steps, loss, **prep)  # too few points to fit: ValueError
        except ValueError as e:
            fail(e if str(e).startswith(path) else f"{path}: {e}")
        curves.append((path, steps, loss))
    for path, steps, loss in curves:
        res = fit_curve(steps, loss, **prep, n_boot=getattr(args, 'n_boot', 100), block=args.block, seed=args.seed)
        print(format_table(dict(res, path=path)) if args.table else json.dumps(dict(res, path=path)), flush=True)


if __name__ == '__main__':
    main()
