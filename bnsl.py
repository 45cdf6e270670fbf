"""
Loss deceleration: a robust 1-break broken-neural-scaling-law (BNSL) fit of a training-loss curve.

    python bnsl.py out/run                # a run directory: its train_loss.npy, preprocessed
    python bnsl.py curve.csv              # two columns step,loss (header line optional)
    python bnsl.py curve.csv --raw        # the points exactly as given (no smoothing, subsampling, cut)
    python bnsl.py out/a out/b --table    # several paths; a human-readable table instead of JSON
    python bnsl.py out/run --published    # only the published convention (its t_d lags: see below)
    python bnsl.py --synthetic            # both conventions on curves with a known break (minutes)

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

PREPROCESSING (both conventions; preprocess() in Python gives the published one's points)

1. A trailing log moving average over all rows: row j becomes the mean of rows floor(j / 1.2)
   .. j, a window whose width is a fixed fraction of j (rows are evenly spaced steps, as in a
   run directory). This is the published smoothing, row for row.
2. A transient cut: steps t <= --min_step (default 20) are dropped, and t = 0 always (it has no
   log). The published cut is 100 (steps t <= 100 dropped) for runs of 1e4-1e5 steps, which is
   0.1-1 % of the run and 40-50 % of its log-step axis. For this project's 500-5000-step runs
   those two scalings give 0.5-50 and 12-70 steps, and a cut of 100 would remove 54-74 % of the
   log axis, often the break itself. 20 lies in both ranges and is past the initialization
   plateau; raise it to skip a long warmup.
3. Log-spaced subsampling to at most 200 points (--n_points), after the cut: the step nearest in
   log t to each of 200 log-spaced targets between the first and last step left, duplicates
   removed, both ends kept (a 3000-step curve keeps 193 points, about 90 a decade; a 1e5-step
   one 200, about 54 a decade). The published grid is decimal instead, and taken before the cut:
   every step below 100, then every 10th step up to 990, every 100th up to 9900, every 1000th
   from 10000 on, and the last step: 90 points a decade whatever the run's length, evenly spaced
   in t within each decade (so bunched towards each decade's end in log t).

TWO CONVENTIONS: THE SMOOTHING'S LAG

A trailing average lags: row j holds the mean loss over steps j / 1.2 .. j, which is the loss of
an earlier step (about j / sqrt(1.2) on a power law). The published convention fits the form,
unsmoothed, to these smoothed points as they are, so everything it finds is late: on a clean
curve breaking at t = 1000 it reports t_d = 1090, and its bootstrap interval [1087, 1094]
excludes the truth (results/bnsl_synthetic.md: +9.0 to +9.6 % on clean curves breaking at 100,
1000 and 20000, a median +8.8 to +11.3 % on noisy ones but the noisiest).

The default, 'unbiased', convention compares like with like instead: the fitted curve is the
form passed through the same trailing average as the data, at the same rows,

    log A_i = log mean(L(t_k), k = floor(j_i / 1.2) .. j_i),   j_i the i-th kept row,

with L the form evaluated at every row of the grid (every row from the first kept row's window
to the last kept row; smoothing, cut and subsampling as above, so the cut and the subsample only
choose which averages are compared, never what they average). Its Jacobian is the L-weighted
mean of the form's own over each window. The parameters found are those of the loss curve
itself, so t_d, L_d and r_d mean what they mean in THE FORM, without a lag: on the clean curve
above it finds t_d = 1000 to rounding. A row whose window reaches t = 0 (row 1 at --min_step 0),
where the form has no value, is not fitted. Chosen over placing each smoothed row at the step
its window "stands for": that step depends on the local slope of the curve, which changes
across the break, exactly where t_d is read; the averaged form is exact for any curve and any
row grid. The fit starts from the 24-start fit of the form itself to the same points (the
published fit when the points are the same) and refines with the averaged form.

The default output reports both: the unbiased fit's keys, and under 'published' the whole
published-convention fit (its t_d, L_d, r_d and their intervals included). --published fits
only the published convention (the numbers bnsl.py gave before, exactly). Without smoothing
(--raw, --no_smooth) there is nothing to lag and the two conventions are one fit.

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
- *_ci_boot: a moving-block bootstrap, --n_boot (default 100) times, refitted from the optimum
  with the same bounds; the interval is the 2.5 and 97.5 percentiles. Seeded (--seed 0), so
  deterministic. Published convention (and unsmoothed fits): the log residuals of the fitted
  points are resampled as random contiguous blocks of --block points (default ceil(sqrt(n))) and
  added to the fitted curve. Unbiased convention: the whole pipeline is resampled instead: the
  per-row log residuals of the raw rows (log L - log of the form, every grid row) are drawn as
  blocks of --block rows (default ceil(sqrt(rows))), put on the form, smoothed as the data were
  and refitted.

The moving average makes neighbouring residuals correlated (neighbouring rows average over mostly
the same rows), which the covariance ignores, so its intervals understate the uncertainty of a
smoothed curve. Blocks keep that autocorrelation. Smoothed residuals are also far larger early
(short windows) than late (long ones), which blocks of points mix up; resampling raw rows does
not, so the unbiased convention's bootstrap intervals are the honest ones. On noisy synthetic
curves (results/bnsl_synthetic.md) they covered the true t_d in 90-100 % of the fits under
independent per-step noise and 70-95 % under autocorrelated noise; the published convention's
in 0-25 % and 60-100 % (its lag, and wide intervals under autocorrelated noise); the
covariance's in 25-100 % (unbiased) and 0-35 % (published).

COMMAND LINE

A run directory is read from train_loss.npy (step t = row t), up to its first NaN row, so a run
still in progress can be fitted. For each path bnsl.py prints one JSON object on one line, with
the keys fit_curve returns plus path: t_d, L_d, c0, c1, r_d, f1, b, rsle, n_points (points
fitted), identifiable, reason (null when identifiable), final_loss_pred (the post-break line
L_d (t / t_d)^-r_d at the last fitted step), t_range (first and last fitted step),
rsle_power_law, and t_d_ci_cov, t_d_ci_boot, L_d_ci_cov, L_d_ci_boot, r_d_ci_cov, r_d_ci_boot
(each [lo, hi]; the _boot ones null with --n_boot 0), convention ('unbiased', 'published' with
--published, 'unsmoothed' with --raw or --no_smooth), and published: the published-convention
fit beside an unbiased one (an object with the same keys, convention included), else null.
Non-finite numbers are written as null. --table prints each fit as a table instead (the
published t_d, L_d and r_d as extra rows). --raw fits the points as given (only t = 0 is
dropped); --no_smooth, --no_subsample, --min_step and --n_points change one preprocessing step
at a time (the options below).

--synthetic runs the synthetic study instead of fitting paths: the 1-break form with a known
break (t_d = 100, 1000, 20000 in runs of 2000, 10000, 1e5 steps), clean and with per-step
log-normal noise (independent, and AR(1) with correlation 0.9; sd 0.03), --n_seeds noisy curves
each (default 20), fitted in both conventions with --n_boot resamples (default 40 here). It
prints a Markdown table: the median relative error of t_d and its quartiles, and how often each
95 % interval covers the truth. results/bnsl_synthetic.md holds its output; it takes minutes.

Bad input (a missing path, a directory without train_loss.npy, a CSV line that is not
step,loss, a non-finite or non-positive loss, steps that are not strictly increasing, the same
step twice with different losses, fewer than 8 points left to fit, a bad flag value, no path,
a path with --synthetic) stops
bnsl.py with one line naming the problem and exit status 2. Every path is checked before any fit
is printed. Exact duplicate rows (the same step with the same loss, as published curves have)
are not bad input: each is kept once, with one note on stderr, e.g. "bnsl.py: note: curve.csv:
3 exact duplicate rows merged", and the exit status stays 0. A CSV may start with a UTF-8
byte-order mark; it is ignored, so it never turns the first data row into a header.

FROM PYTHON (fit_curve takes every row as recorded and does both conventions)

    import bnsl
    steps, loss = bnsl.load_curve('out')
    res = bnsl.fit_curve(steps, loss)      # the dict above, without 'path'; ValueError: too few points
    pub = res['published']                 # the published convention's fit, or
    pub = bnsl.fit_bnsl(*bnsl.preprocess(steps, loss))  # the same, as before (the points as they are)
    # the fitted curve itself (unbiased: the loss curve, not its trailing average), if identifiable:
    Lhat = bnsl.bnsl_1break(steps[1:], res['b'], res['c0'], res['c1'], res['t_d'], res['f1'])
    # ... and passed through the trailing average, to draw over the smoothed loss like with like:
    t, Lhat_smoothed = bnsl.smoothed_fit(steps, res)

On this project's 2-core CPU (2026-11-25, one thread, CPU time), fit_curve of a 3000-step noisy
synthetic curve (193 points) took 0.21 s without bootstrap and 0.74 s with the default 100
resamples (both conventions; the published one alone 0.10 s and 0.22 s); of a 1e5-step curve
0.43 s and 11.5 s (each unbiased resample refits the form averaged over all 1e5 rows).
"""

import argparse
import json
import math
import os
import platform
import sys
import time

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


def log_window_mean(y, first, last):
    """log mean(exp(y_k), k = first_i .. last_i) for each window i: the log of the trailing average
    of the values exp(y) over each window, by cumulative sums of exp(y - max y) (no overflow)."""
    top = y.max()
    csum = np.concatenate([[0.0], np.cumsum(np.exp(y - top))])
    return top + np.log((csum[last + 1] - csum[first]) / (last + 1 - first))


def log_averaged_bnsl(xg, first, last, p):
    """The 1-break form passed through the data's trailing average (the unbiased convention):
    log A_i, A_i = mean(L(t_k), k = first_i .. last_i), L the form at p on the grid xg = log t of
    every row (not only the rows fitted)."""
    return log_window_mean(log_bnsl(xg, p[0], p[1], [p[2]], [p[3]], [p[4]]), first, last)


def log_averaged_bnsl_jacobian(xg, first, last, p):
    """d log A_i / d(log b, c0, c1, log d1, f1) = sum_k L_k J_k / sum_k L_k over the window of point i:
    the L-weighted mean of the form's own Jacobian J (log_bnsl_jacobian) over the rows averaged."""
    y = log_bnsl(xg, p[0], p[1], [p[2]], [p[3]], [p[4]])
    w = np.exp(y - y.max())
    wJ = np.concatenate([w[None], w * log_bnsl_jacobian(xg, p).T])  # (6, rows): L, then L J
    csum = np.concatenate([np.zeros((6, 1)), np.cumsum(wJ, axis=1)], axis=1)  # row-wise: contiguous
    sums = csum[:, last + 1] - csum[:, first]  # (6, n): sum L, then sum L J over each window
    return (sums[1:] / sums[0]).T

# -----------------------------------------------------------------------------
# preprocessing (the published convention, each step switchable)


def window_starts(n, factor=1.2):
    """First row floor(j / factor) of the trailing window of each row j = 0..n-1 (the window is
    rows floor(j / factor) .. j)."""
    return np.floor(np.arange(n) / factor).astype(int)


def log_moving_average(y, factor=1.2):
    """Trailing log moving average: out[j] = mean(y[floor(j / factor) .. j]), a window whose width
    is a fixed fraction of the row index j (rows = evenly spaced steps, as in a run directory)."""
    y = np.asarray(y, dtype=float)
    j = np.arange(len(y))
    lo = window_starts(len(y), factor)
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


def kept_rows(steps, min_step=MIN_STEP, subsample=True, n_points=200, starts=None):
    """Indices of the rows fitted: steps t > min_step (and t > 0, which has a log), then the
    log-spaced subsample of those. With `starts` (the first row of each row's trailing window: the
    unbiased convention) also only rows whose window holds no step t <= 0 (the form has no value
    there): row 1 of a run at min_step 0."""
    steps = np.asarray(steps, dtype=float)
    keep = steps > max(min_step, 0)
    if starts is not None:
        keep &= steps[starts] > 0
    i = np.flatnonzero(keep)
    return i[log_subsample(steps[i], n_points)] if subsample and len(i) else i


def preprocess(steps, loss, smooth=True, subsample=True, min_step=MIN_STEP, n_points=200, factor=1.2):
    """Published preprocessing: (1) trailing log moving average over all rows, (2) drop the
    transient steps t <= min_step (and always t = 0, which has no log), (3) log-spaced subsampling.
    Returns the (steps, loss) to fit as they are (the published convention; `fit_curve` does the
    unbiased one). The cut and the grid differ from the published ones: see the module docstring."""
    steps, loss = np.asarray(steps, dtype=float), np.asarray(loss, dtype=float)
    if smooth:
        loss = log_moving_average(loss, factor)
    i = kept_rows(steps, min_step, subsample, n_points)
    return steps[i], loss[i]


def fit_inputs(steps, loss, convention='unbiased', smooth=True, subsample=True, min_step=MIN_STEP,
               n_points=200, factor=1.2):
    """The fits `fit_curve` makes, {name: (t, l, window)}, the first the main one: 'unbiased' (the
    smoothed rows kept; window = (grid steps, their raw loss, first, last): every row from the first
    window on, and the first and last grid row of each kept row's trailing window) then
    'published' (the same smoothing, the form compared as it is: window None); only 'published'
    for convention='published'; only 'unsmoothed' (no window) when smooth is False (the two
    conventions are then the same fit). ValueError when a fit would have too few points."""
    if convention not in ('unbiased', 'published'):
        raise ValueError(f"convention must be 'unbiased' or 'published', not {convention!r}")
    steps, loss = np.asarray(steps, dtype=float), np.asarray(loss, dtype=float)
    out = {}
    if not smooth:
        out['unsmoothed'] = preprocess(steps, loss, False, subsample, min_step, n_points) + (None,)
    else:
        smoothed = log_moving_average(loss, factor)
        if convention == 'unbiased':  # smooth every row, keep some, then average the form over their windows
            starts = window_starts(len(steps), factor)
            i = kept_rows(steps, min_step, subsample, n_points, starts)
            g = starts[i[0]] if len(i) else 0  # the grid: every row from the first window on
            grid = slice(g, i[-1] + 1 if len(i) else 0)
            window = (steps[grid], loss[grid], starts[i] - g, i - g)
            out['unbiased'] = (steps[i], smoothed[i], window)
        i = kept_rows(steps, min_step, subsample, n_points)
        out['published'] = (steps[i], smoothed[i], None)
    for name, (t, l, window) in out.items():
        if len(t) < MIN_POINTS:
            raise ValueError(f"{len(t)} points to fit (steps > {min_step:g}"
                             f"{', windows without t = 0' if window is not None else ''}), "
                             f"need at least {MIN_POINTS}")
    return out

# -----------------------------------------------------------------------------
# the fit


def model(x, window=None):
    """(f, jac): log Lhat at the fitted points and its Jacobian, as functions of p = (log b, c0,
    c1, log d1, f1). window None: the 1-break form at x = log t itself; window = (grid steps, raw
    loss, first, last): the form averaged over rows first_i .. last_i of the grid, as the data were."""
    if window is None:
        return (lambda p: log_bnsl(x, p[0], p[1], [p[2]], [p[3]], [p[4]]),
                lambda p: log_bnsl_jacobian(x, p))
    xg, first, last = np.log(window[0]), window[2], window[3]
    return (lambda p: log_averaged_bnsl(xg, first, last, p),
            lambda p: log_averaged_bnsl_jacobian(xg, first, last, p))


def fit_from(f, jac, y, p0, lo, hi):
    """One bounded least-squares fit of the model (f, jac) (see `model`) to y = log L, from p0."""
    return least_squares(lambda p: f(p) - y, p0, jac=jac, bounds=(lo, hi),
                         method='trf', x_scale='jac', ftol=1e-12, xtol=1e-12, gtol=1e-12)


def linear_start(x, y, log_d1, f1):
    """A start at fixed (d1, f1): log L is linear in (log b, c0, c1) there, so solve for those."""
    A = np.column_stack([np.ones_like(x), -x, -f1 * np.logaddexp(0.0, (x - log_d1) / f1)])
    (log_b, c0, c1), *_ = np.linalg.lstsq(A, y, rcond=None)
    return np.array([log_b, c0, c1, log_d1, f1])


def fit_multistart(x, y, f, jac, n_d1=8, f1_fracs=(0.02, 0.1, 0.3)):
    """Best of the bounded fits of the model (f, jac) started from a log-spaced grid of n_d1 breaks
    inside the data times f1 = (fractions of the log range). Bounds: log d1 in [x_0, x_-1], f1 in
    [F1_MIN, x_-1 - x_0]. Returns (p, lo, hi)."""
    span = x[-1] - x[0]
    lo = np.array([-np.inf, -np.inf, -np.inf, x[0], F1_MIN])
    hi = np.array([np.inf, np.inf, np.inf, x[-1], max(span, 2 * F1_MIN)])
    best = None
    for log_d1 in np.linspace(x[0], x[-1], n_d1 + 2)[1:-1]:
        for frac in f1_fracs:
            f1 = float(np.clip(frac * span, 1.01 * lo[4], 0.99 * hi[4]))
            fit = fit_from(f, jac, y, linear_start(x, y, log_d1, f1), lo, hi)
            if best is None or fit.cost < best.cost:
                best = fit
    return best.x, lo, hi


def power_law_fit(x, y, f, jac, averaged):
    """log Lhat of the best pure power law b t^-c0 (the form with c1 = 0), compared with y as the
    1-break fit is: a straight line in log-log, or (averaged) that line averaged as the data were."""
    A = np.column_stack([np.ones_like(x), -x])
    q = np.linalg.lstsq(A, y, rcond=None)[0]
    if not averaged:
        return A @ q
    full = lambda q: np.array([q[0], q[1], 0.0, x[0], 1.0])  # c1 = 0: d1 and f1 do not matter
    q = least_squares(lambda q: f(full(q)) - y, q, jac=lambda q: jac(full(q))[:, :2],
                      ftol=1e-12, xtol=1e-12, gtol=1e-12).x
    return f(full(q))


def unidentifiable_reason(x, p, f1_max, sse, sse_pl):
    """Why the break of the fit p (squared log error sse; sse_pl for the best pure power law)
    cannot be located from the points at x, or '' when it can."""
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
    """95 % intervals of t_d, L_d, r_d from cov = s^2 (J^T J)^-1, s^2 = sum(resid^2) / (n - 5), J the
    model's Jacobian at the optimum, propagated linearly: log t_d = log d1, log L_d = log b - c0 log d1,
    r_d = c0 + c1 (the first two are symmetric in log). Assumes independent residuals."""
    cov = np.sum(resid ** 2) / max(len(resid) - 5, 1) * np.linalg.pinv(J.T @ J)
    grads = {'t_d': [0, 0, 0, 1, 0], 'L_d': [1, -p[3], 0, -p[1], 0], 'r_d': [0, 1, 1, 0, 0]}
    centres = {'t_d': p[3], 'L_d': p[0] - p[1] * p[3], 'r_d': p[1] + p[2]}
    out = {}
    for k, g in grads.items():
        half = Z95 * math.sqrt(max(float(np.dot(g, cov @ np.array(g, dtype=float))), 0.0))
        lo, hi = centres[k] - half, centres[k] + half
        out[k] = [lo, hi] if k == 'r_d' else [math.exp(lo), math.exp(hi)]
    return out


def resample_blocks(resid, block, rng):
    """A moving-block resample of resid (n,): ceil(n / block) random contiguous blocks of `block`
    values (0: ceil(sqrt(n))), concatenated and cut to n."""
    n = len(resid)
    block = min(block or math.ceil(math.sqrt(n)), n)
    starts = rng.integers(0, n - block + 1, size=math.ceil(n / block))
    return resid[(starts[:, None] + np.arange(block)).ravel()[:n]]


def block_bootstrap(f, jac, y_fit, resid, p, lo, hi, n_boot=100, block=0, seed=0):
    """95 % percentile intervals of (t_d, L_d, r_d) from a moving-block bootstrap: n_boot times,
    y* = y_fit + resid* with resid* = ceil(n / block) random contiguous blocks of the log residuals
    (block = 0: ceil(sqrt(n))), refit (model (f, jac)) from p. Blocks keep the residuals'
    autocorrelation (smoothed curves have plenty), which the covariance ignores. Seeded."""
    rng = np.random.default_rng(seed)
    draws = [break_quantities(fit_from(f, jac, y_fit + resample_blocks(resid, block, rng), p, lo, hi).x)
             for _ in range(n_boot)]
    lo_q, hi_q = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
    return {k: [float(lo_q[i]), float(hi_q[i])] for i, k in enumerate(['t_d', 'L_d', 'r_d'])}


def row_bootstrap(f, jac, window, p, lo, hi, n_boot=100, block=0, seed=0):
    """95 % percentile intervals of (t_d, L_d, r_d) for the unbiased convention, the whole pipeline
    resampled: the per-row log residuals e_k = log L_k - log Lhat(t_k) of the raw grid rows are drawn
    again as ceil(rows / block) random contiguous blocks of rows (block = 0: ceil(sqrt(rows))),
    then Lhat(t_k) exp(e*_k) is smoothed as the data were (each kept row's window) and refit (model
    (f, jac)) from p. Rows, not smoothed points, are resampled: smoothed residuals are far larger
    where windows are short (early) than where they are long (late), which point blocks would mix
    up. Seeded."""
    steps, raw, first, last = window
    y_grid = log_bnsl(np.log(steps), p[0], p[1], [p[2]], [p[3]], [p[4]])
    resid = np.log(raw) - y_grid
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        y = log_window_mean(y_grid + resample_blocks(resid, block, rng), first, last)
        draws.append(break_quantities(fit_from(f, jac, y, p, lo, hi).x))
    lo_q, hi_q = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
    return {k: [float(lo_q[i]), float(hi_q[i])] for i, k in enumerate(['t_d', 'L_d', 'r_d'])}


def fit_bnsl(steps, loss, n_boot=100, block=0, seed=0, window=None):
    """Fit the 1-break BNSL to the points (steps > 0, loss > 0) exactly as given (call `preprocess`
    first for the published convention, or use `fit_curve`). window = (grid steps, raw loss, first,
    last): compare point i with the form averaged over grid rows first[i] .. last[i] instead, and
    bootstrap the raw rows (`row_bootstrap`): the unbiased convention, `fit_inputs` builds it.
    Returns a dict: t_d, L_d, c0, c1, r_d, f1, b, rsle,
    n_points, identifiable, reason, final_loss_pred (the post-break line at the last step), 95 %
    intervals {t_d,L_d,r_d}_ci_cov and _ci_boot ([lo, hi]; n_boot = 0: no bootstrap), t_range,
    rsle_power_law. Not identifiable: t_d, L_d, r_d, final_loss_pred and intervals are None."""
    t, loss = np.asarray(steps, dtype=float), np.asarray(loss, dtype=float)
    if len(t) < MIN_POINTS or not (np.all(np.isfinite(t)) and np.all(np.isfinite(loss))):
        raise ValueError(f"need at least {MIN_POINTS} finite points, got {len(t)}")
    if np.any(t <= 0) or np.any(loss <= 0) or np.any(np.diff(t) <= 0):
        raise ValueError("steps must be positive and increasing, losses positive")
    if window is not None and (len(window[2]) != len(t) or np.any(window[0] <= 0) or np.any(window[1] <= 0)):
        raise ValueError("window: one (first, last) per point, over grid steps > 0 with losses > 0")
    x, y = np.log(t), np.log(loss)
    f, jac = model(x, window)
    p, lo, hi = fit_multistart(x, y, *model(x))  # the starts, with the form itself (cheap)
    if window is not None:  # then the averaged form from the best of them (its own 24 starts cost
        p = fit_from(f, jac, y, p, lo, hi).x  # ~3x more and found the same optimum in our trials)
    log_b, c0, c1, log_d1, f1 = (float(v) for v in p)
    y_fit = f(p)
    y_pl = power_law_fit(x, y, f, jac, window is not None)
    reason = unidentifiable_reason(x, p, hi[4], np.sum((y_fit - y) ** 2), np.sum((y_pl - y) ** 2))
    t_d, L_d, r_d = break_quantities(p)
    res = dict(t_d=t_d, L_d=L_d, c0=c0, c1=c1, r_d=r_d, f1=f1, b=math.exp(log_b), rsle=rsle(y_fit, y),
               n_points=len(t), identifiable=not reason, reason=reason or None,
               final_loss_pred=post_break_loss(float(t[-1]), L_d, t_d, r_d),
               t_range=[float(t[0]), float(t[-1])], rsle_power_law=rsle(y_pl, y))
    cov = covariance_intervals(jac(p), p, y - y_fit) if not reason else {}
    boot = {} if reason or n_boot == 0 else (
        block_bootstrap(f, jac, y_fit, y - y_fit, p, lo, hi, n_boot, block, seed) if window is None
        else row_bootstrap(f, jac, window, p, lo, hi, n_boot, block, seed))
    for k in ['t_d', 'L_d', 'r_d']:
        res[f'{k}_ci_cov'], res[f'{k}_ci_boot'] = cov.get(k), boot.get(k)
    if reason:
        res.update(t_d=None, L_d=None, r_d=None, final_loss_pred=None)
    finite = lambda v: v if not isinstance(v, float) or math.isfinite(v) else None  # JSON has no NaN
    return {k: [finite(u) for u in v] if isinstance(v, list) else finite(v) for k, v in res.items()}


def fit_curve(steps, loss, convention='unbiased', smooth=True, subsample=True, min_step=MIN_STEP,
              n_points=200, factor=1.2, n_boot=100, block=0, seed=0):
    """Preprocess a whole curve (every row, as recorded: steps >= 0 increasing, loss > 0) and fit it:
    the fit_bnsl dict of the main fit (see `fit_inputs`) plus convention ('unbiased', 'published'
    or 'unsmoothed') and published (the published-convention fit's dict beside an unbiased one,
    else None). ValueError (naming the problem) on too few points."""
    fits = {name: fit_bnsl(t, l, n_boot, block, seed, window)
            for name, (t, l, window) in fit_inputs(steps, loss, convention, smooth, subsample, min_step,
                                                   n_points, factor).items()}
    name = next(iter(fits))
    published = fits['published'] if name == 'unbiased' else None
    return dict(fits[name], convention=name, published=published and dict(published, convention='published'))

def smoothed_fit(steps, res, factor=1.2):
    """(steps, Lhat): the fitted form of res (fit_curve's or fit_bnsl's dict, identifiable) passed
    through the trailing log moving average at every row of `steps` (all rows, as recorded), to
    draw over the smoothed data like with like; rows whose window holds a step t <= 0 are left out."""
    steps = np.asarray(steps, dtype=float)
    starts = window_starts(len(steps), factor)
    j = np.flatnonzero(steps[starts] > 0)
    g = starts[j[0]]
    p = [math.log(res['b']), res['c0'], res['c1'], math.log(res['t_d']), res['f1']]
    return steps[j], np.exp(log_averaged_bnsl(np.log(steps[g:]), starts[j] - g, j - g, p))

# -----------------------------------------------------------------------------
# the synthetic study: both conventions on curves with a known break

STUDY_BREAKS = [(100, 2000), (1000, 10000), (20000, 100000)]  # (true t_d, steps in the run)
STUDY_N_BOOT = 40  # bootstrap resamples per fit in the study (the refits dominate its time)
STUDY_FORM = dict(b=10.0, c0=0.4, c1=-0.3, f1=0.3)  # slope 0.4 before the break, r_d = 0.1 after
STUDY_NOISE = [('clean', 0.0, 0.0), ('iid 3%', 0.03, 0.0),  # (name, sd, phi) of the per-step log noise
               ('AR(1) 3%, phi 0.9', 0.03, 0.9)]


def synthetic_curve(t_d, n_steps, sd=0.0, phi=0.0, seed=0):
    """(steps 0..n_steps-1, loss) of the 1-break form (STUDY_FORM, break at t_d; step 0 takes step 1's
    value) times exp(e_t): per-step log-normal noise, e_t = phi e_(t-1) + sqrt(1 - phi^2) sd z_t
    (AR(1): stationary sd `sd`, correlation phi between neighbouring steps; phi = 0: independent)."""
    steps = np.arange(n_steps, dtype=float)
    z = sd * np.random.default_rng(seed).standard_normal(n_steps)
    e = z.copy()
    for k in range(1, n_steps):  # the recursion, step by step
        e[k] = phi * e[k - 1] + math.sqrt(1 - phi ** 2) * z[k]
    f = STUDY_FORM
    return steps, bnsl_1break(np.maximum(steps, 1), f['b'], f['c0'], f['c1'], t_d, f['f1']) * np.exp(e)


def synthetic_study(n_seeds=20, n_boot=STUDY_N_BOOT, min_step=MIN_STEP):
    """For each break of STUDY_BREAKS and noise of STUDY_NOISE (one curve when clean, else n_seeds),
    fit_curve's two conventions; prints a Markdown table: how many fits located a break, the median
    relative error of t_d (t_d / true - 1) with its quartiles, how often each 95 % interval covers
    the true t_d (noisy curves only: on a clean curve the intervals shrink to rounding), and the
    first curve's t_d with its bootstrap interval. Returns the rows."""
    t0 = time.time()
    print(f"# bnsl.py --synthetic: both conventions on curves with a known break\n\n"
          f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()}-core CPU ({platform.machine()}, "
          f"Python {platform.python_version()}, numpy {np.__version__}); n_seeds {n_seeds}, n_boot "
          f"{n_boot}, min_step {min_step:g}. The form: {STUDY_FORM} (r_d = "
          f"{STUDY_FORM['c0'] + STUDY_FORM['c1']:g}); noise: per-step log-normal, AR(1) with sd and phi.\n")
    print("| true t_d | steps | noise | convention | fits | break found | median rel. error of t_d "
          "| quartiles | boot covers | cov covers | first curve: t_d [boot 95 %] |\n"
          "|---:|---:|---|---|---:|---:|---:|---|---:|---:|---|", flush=True)
    rows = []
    pct = lambda v: 'n/a' if v is None or not math.isfinite(v) else f"{v:.0%}"
    for t_d, n_steps in STUDY_BREAKS:
        for noise, sd, phi in STUDY_NOISE:
            fits = [fit_curve(*synthetic_curve(t_d, n_steps, sd, phi, seed), min_step=min_step, n_boot=n_boot)
                    for seed in range(1 if sd == 0 else n_seeds)]
            for conv in ['unbiased', 'published']:
                rs = [r if conv == 'unbiased' else r['published'] for r in fits]
                found = [r for r in rs if r['identifiable']]
                err = np.array([r['t_d'] / t_d - 1 for r in found])
                cover = {k: float(np.mean([r[f't_d_ci_{k}'][0] <= t_d <= r[f't_d_ci_{k}'][1] for r in found]))
                         if found and n_boot and sd > 0 else None for k in ['boot', 'cov']}
                q = np.percentile(err, [25, 50, 75]) if len(err) else [math.nan] * 3
                rows.append(dict(t_d=t_d, steps=n_steps, noise=noise, convention=conv, fits=len(rs),
                                 found=len(found), median_rel_err=q[1], quartiles=[q[0], q[2]], **cover))
                first = (f"{rs[0]['t_d']:.4g} [{rs[0]['t_d_ci_boot'][0]:.4g}, {rs[0]['t_d_ci_boot'][1]:.4g}]"
                         if rs[0]['identifiable'] and n_boot else 'n/a')
                print(f"| {t_d} | {n_steps} | {noise} | {conv} | {len(rs)} | {len(found)} | {q[1]:+.2%} | "
                      f"[{q[0]:+.2%}, {q[2]:+.2%}] | {pct(cover['boot'])} | {pct(cover['cov'])} | {first} |",
                      flush=True)
    print(f"\nFits: bnsl.fit_curve with its defaults but n_boot; covers = the share of the fits that found a "
          f"break whose 95 % interval (block bootstrap; covariance) contains the true t_d. "
          f"Wall time {time.time() - t0:.0f} s.")
    return rows

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


def fail(msg):
    """Bad input: one line naming the problem and exit status 2, never a traceback."""
    print(f"bnsl.py: error: {' '.join(str(msg).split())}", file=sys.stderr)
    sys.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: this module's docstring as written (the full reference), then the options with defaults."""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=HelpFormatter)
    p.error = fail
    p.add_argument('paths', nargs='*', help='run directories (train_loss.npy) or CSV files (step,loss)')
    p.add_argument('--published', action='store_true',
                   help="only the published convention (the form compared with the smoothed points as they "
                        "are: t_d lags), as bnsl.py fitted before")
    p.add_argument('--raw', action='store_true',
                   help='fit the points as given: no smoothing, subsampling or transient cut')
    p.add_argument('--no_smooth', action='store_true', help='skip the trailing log moving average')
    p.add_argument('--no_subsample', action='store_true', help='skip the log-spaced subsampling')
    p.add_argument('--min_step', type=float, default=MIN_STEP, help='drop the transient steps t <= min_step')
    p.add_argument('--n_points', type=int, default=200, help='log-spaced points kept by the subsampling')
    p.add_argument('--n_boot', type=int, default=argparse.SUPPRESS,  # its default depends on --synthetic
                   help=f'block-bootstrap resamples (0: none; default 100, {STUDY_N_BOOT} for --synthetic)')
    p.add_argument('--block', type=int, default=0,
                   help='bootstrap block length: fitted points, or raw rows for the unbiased convention '
                        '(0: ceil(sqrt(n)))')
    p.add_argument('--seed', type=int, default=0, help='seed of the bootstrap')
    p.add_argument('--table', action='store_true', help='print a human-readable table instead of JSON')
    p.add_argument('--synthetic', action='store_true',
                   help='run the synthetic study instead (no paths; --n_seeds, --n_boot, --min_step apply)')
    p.add_argument('--n_seeds', type=int, default=20, help='noisy curves per case of the synthetic study')
    args = p.parse_args(argv)
    if 'n_boot' not in args:
        args.n_boot = STUDY_N_BOOT if args.synthetic else 100
    for name in ['n_points', 'n_boot', 'block', 'n_seeds']:
        if getattr(args, name) < (2 if name == 'n_points' else 1 if name == 'n_seeds' else 0):
            fail(f"--{name} is too small: {getattr(args, name)}")
    if args.synthetic:
        if args.paths:
            fail("--synthetic takes no paths")
        synthetic_study(args.n_seeds, args.n_boot, args.min_step)
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
        res = fit_curve(steps, loss, **prep, n_boot=args.n_boot, block=args.block, seed=args.seed)
        res['path'] = path
        print(format_table(res) if args.table else json.dumps(res), flush=True)


if __name__ == '__main__':
    main()
