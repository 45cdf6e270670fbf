"""
Loss deceleration: the 1-break BNSL fit of loss curves, one JSON line a path (docs/bnsl.md explains it).

    log L(t) = log b - c0 log t - c1 f1 log(1 + exp((log t - log d1) / f1))

falls with slope c0 before the break and c0 + c1 after it. Reported: t_d = d1, L_d = b t_d^-c0 and
r_d = c0 + c1 with 95 % intervals, or why the break cannot be located. The curve is smoothed by a
trailing moving average, which lags: the default, 'unbiased', convention passes the form through the
same average; the published one (reported beside it) does not, and puts t_d about 9 % late.
"""

import json
import math
import os
import sys

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit

import runs

MIN_POINTS = 8  # fewer points to fit is bad input (the 1-break form has 5 parameters)
MIN_STEP = 20  # default transient cut: steps <= MIN_STEP are dropped (docs/bnsl.md says why 20)
F1_MIN = 0.01  # lower bound of f1 (> 0: no mirror solution); the upper bound is the log range
MIN_SIDE, MIN_GAIN, C1_TOL = 3, 0.5, 0.02  # a break: 3 points each side, halves a power law's error, 2 %
Z95 = 1.959963984540054  # standard normal quantile of 0.975: 95 % intervals

# --- the form; p = (log b, c0, c1, log d1, f1) in the fit ----------------------------------------


def log_bnsl(x, log_b, c0, cs, log_ds, fs):
    """n-break BNSL, x = log t: log L = log b - c0 x - sum_i c_i f_i log(1 + exp((x - log d_i) / f_i))."""
    y = log_b - c0 * np.asarray(x, dtype=float)
    for c, log_d, f in zip(cs, log_ds, fs):
        y = y - c * f * np.logaddexp(0.0, (x - log_d) / f)  # softplus without overflow at a sharp break
    return y


def log_form(x, p):
    """log L of the 1-break form at p = (log b, c0, c1, log d1, f1)."""
    return log_bnsl(x, p[0], p[1], [p[2]], [p[3]], [p[4]])


def bnsl(t, b, c0, cs, ds, fs):
    """n-break BNSL L(t) = b t^-c0 prod_i (1 + (t / d_i)^(1 / f_i))^(-c_i f_i); cs, ds, fs: one per break."""
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
    return math.exp(p[3]), loss_at_break(math.exp(p[0]), float(p[1]), math.exp(p[3])), float(p[1] + p[2])


def log_window_mean(y, first, last):
    """log mean(exp(y_k), k = first_i .. last_i) for each window i (by cumulative sums)."""
    top = y.max()  # subtracted so that exp cannot overflow
    csum = np.concatenate([[0.0], np.cumsum(np.exp(y - top))])
    return top + np.log((csum[last + 1] - csum[first]) / (last + 1 - first))


def log_averaged_bnsl(xg, first, last, p):
    """The form averaged as the data were: log A_i = log mean(L(t_k), k = first_i .. last_i) on the grid xg."""
    return log_window_mean(log_form(xg, p), first, last)


def log_bnsl_jacobian(x, p, first=None, last=None):
    """d log L / d(log b, c0, c1, log d1, f1) at p: 1, -x, -f1 softplus(z), c1 sigmoid(z), -c1 (softplus(z) -
    z sigmoid(z)), z = (x - log d1) / f1; with windows, that of log A_i: sum_k L_k J_k / sum_k L_k."""
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

# --- preprocessing ------------------------------------------------------------------------------


def window_starts(n, factor=1.2):
    """First row floor(j / factor) of each row j's trailing window, rows floor(j / factor) .. j."""
    return np.floor(np.arange(n) / factor).astype(int)


def log_moving_average(y, factor=1.2):
    """Trailing log moving average: out[j] = mean(y[floor(j / factor) .. j]) (width a fraction of j)."""
    csum, lo = np.concatenate([[0.0], np.cumsum(np.asarray(y, dtype=float))]), window_starts(len(y), factor)
    return (csum[1:] - csum[lo]) / (np.arange(1, len(y) + 1) - lo)


def kept_rows(steps, min_step=MIN_STEP, subsample=True, n_points=200):
    """Indices of the rows fitted: the steps t > max(min_step, 0) (log t exists), then (subsample) at
    most n_points of them, the nearest in log t to n_points log-spaced targets (both ends kept)."""
    steps = np.asarray(steps, dtype=float)
    i = np.flatnonzero(steps > max(min_step, 0))
    if not subsample or len(i) <= n_points:
        return i
    x = np.log(steps[i])
    targets = np.linspace(x[0], x[-1], n_points)
    j = np.searchsorted(x, targets).clip(1, len(x) - 1)
    return i[np.unique(np.where(targets - x[j - 1] < x[j] - targets, j - 1, j))]


def preprocess(steps, loss, smooth=True, subsample=True, min_step=MIN_STEP, n_points=200, factor=1.2):
    """The (steps, loss) the published convention fits: smoothed, cut to t > min_step, subsampled."""
    steps, i = np.asarray(steps, dtype=float), kept_rows(steps, min_step, subsample, n_points)
    return steps[i], (log_moving_average(loss, factor) if smooth else np.asarray(loss, dtype=float))[i]


def fit_inputs(steps, loss, convention='unbiased', smooth=True, subsample=True, min_step=MIN_STEP,
               n_points=200, factor=1.2):
    """{name: (t, l, window)} of fit_curve's fits: 'unbiased' (window = (grid steps, their raw loss, each
    kept row's first and last grid row)) and 'published', or one of 'published', 'unsmoothed'."""
    if convention not in ('unbiased', 'published'):
        raise ValueError(f"convention must be 'unbiased' or 'published', not {convention!r}")
    steps, loss = np.asarray(steps, dtype=float), np.asarray(loss, dtype=float)
    out = {}
    if smooth and convention == 'unbiased':
        starts = window_starts(len(steps), factor)
        # a row whose window holds a step t <= 0, where the form has no value, counts as t = 0: not kept
        i = kept_rows(np.where(steps[starts] > 0, steps, 0.0), min_step, subsample, n_points)
        g, end = (starts[i[0]], i[-1] + 1) if len(i) else (0, 0)  # the grid rows
        window = (steps[g:end], loss[g:end], starts[i] - g, i - g)
        out['unbiased'] = (steps[i], log_moving_average(loss, factor)[i], window)
    out['published' if smooth else 'unsmoothed'] = preprocess(steps, loss, smooth, subsample, min_step,
                                                               n_points, factor) + (None,)
    for t, l, window in out.values():
        if len(t) < MIN_POINTS:
            raise ValueError(f"{len(t)} points to fit (steps > {min_step:g}), need at least {MIN_POINTS}")
    return out

# --- the fit ------------------------------------------------------------------------------------


def fit_from(f, jac, y, p0, lo, hi):
    """One bounded trust-region least-squares fit of log Lhat = f(p) (Jacobian jac) to y = log L, from p0."""
    return least_squares(lambda p: f(p) - y, p0, jac=jac, bounds=(lo, hi),
                         method='trf', x_scale='jac', ftol=1e-12, xtol=1e-12, gtol=1e-12)


def fit_multistart(x, y, f, jac, n_d1=8, f1_fracs=(0.02, 0.1, 0.3)):
    """(p, lo, hi): the best fit from n_d1 breaks inside the data times f1 = fractions of the log range,
    bounded to log d1 in [x_0, x_-1] and f1 in [F1_MIN, x_-1 - x_0]."""
    span = x[-1] - x[0]
    lo = np.array([-np.inf, -np.inf, -np.inf, x[0], F1_MIN])
    hi = np.array([np.inf, np.inf, np.inf, x[-1], max(span, 2 * F1_MIN)])
    fits = []
    for log_d1 in np.linspace(x[0], x[-1], n_d1 + 2)[1:-1]:
        for frac in f1_fracs:
            f1 = float(np.clip(frac * span, 1.01 * lo[4], 0.99 * hi[4]))
            # the form is linear in (log b, c0, c1) at fixed (d1, f1): each start solves for those
            A = np.column_stack([np.ones_like(x), -x, -f1 * np.logaddexp(0.0, (x - log_d1) / f1)])
            (log_b, c0, c1), *_ = np.linalg.lstsq(A, y, rcond=None)
            fits.append(fit_from(f, jac, y, np.array([log_b, c0, c1, log_d1, f1]), lo, hi))
    return min(fits, key=lambda fit: fit.cost).x, lo, hi  # the first of the lowest cost


def power_law_fit(x, y, f, jac, averaged):
    """log Lhat of the best pure power law b t^-c0 (c1 = 0): a line in log-log, or that line averaged."""
    A = np.column_stack([np.ones_like(x), -x])
    q = np.linalg.lstsq(A, y, rcond=None)[0]
    if not averaged:
        return A @ q
    full = lambda q: np.array([q[0], q[1], 0.0, x[0], 1.0])  # c1 = 0: d1 and f1 do not matter
    q = least_squares(lambda q: f(full(q)) - y, q, jac=lambda q: jac(full(q))[:, :2],
                      ftol=1e-12, xtol=1e-12, gtol=1e-12).x
    return f(full(q))


def unidentifiable_reason(x, p, f1_max, sse, sse_pl):
    """Why the break of p (squared log error sse; a pure power law's sse_pl) cannot be located, or ''."""
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
    linearly to log d1, log b - c0 log d1 and c0 + c1. Assumes independent residuals."""
    cov = np.sum(resid ** 2) / max(len(resid) - 5, 1) * np.linalg.pinv(J.T @ J)
    out = {}  # quantity: (its gradient in p, its value), for log t_d, log L_d and r_d
    for k, (g, centre) in {'t_d': ([0, 0, 0, 1, 0], p[3]), 'L_d': ([1, -p[3], 0, -p[1], 0], p[0] - p[1] * p[3]),
                           'r_d': ([0, 1, 1, 0, 0], p[1] + p[2])}.items():
        half = Z95 * math.sqrt(max(float(np.dot(g, cov @ np.array(g, dtype=float))), 0.0))
        lo, hi = centre - half, centre + half
        out[k] = [lo, hi] if k == 'r_d' else [math.exp(lo), math.exp(hi)]  # symmetric in log
    return out


def bootstrap_intervals(refit, base, resid, smooth, n_boot=100, block=0, seed=0):
    """95 % intervals of (t_d, L_d, r_d), moving-block bootstrap: n_boot times, refit(smooth(base + resid*)),
    resid* = ceil(n / block) random contiguous blocks of resid (block 0: ceil(sqrt(n))). Seeded."""
    n = len(resid)
    block = min(block or math.ceil(math.sqrt(n)), n)
    rng, draws = np.random.default_rng(seed), []
    for _ in range(n_boot):
        starts = rng.integers(0, n - block + 1, size=math.ceil(n / block))
        e = resid[(starts[:, None] + np.arange(block)).ravel()[:n]]  # (n,) the blocks, cut to n
        draws.append(break_quantities(refit(smooth(base + e))))
    lo, hi = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
    return {k: [float(lo[i]), float(hi[i])] for i, k in enumerate(['t_d', 'L_d', 'r_d'])}


def fit_bnsl(steps, loss, n_boot=100, block=0, seed=0, window=None):
    """Fit the 1-break form to the points as given (after `preprocess`: the published convention), or with
    a window (fit_inputs) the form averaged as the data were (unbiased): the dict of docs/bnsl.md."""
    t, loss = np.asarray(steps, dtype=float), np.asarray(loss, dtype=float)
    ok = (0 < t) & (t < np.inf) & (0 < loss) & (loss < np.inf)  # positive and finite
    if len(t) < MIN_POINTS or not np.all(ok) or np.any(np.diff(t) <= 0):
        raise ValueError(f"need {MIN_POINTS} or more points, steps > 0 increasing, losses > 0, got {len(t)}")
    x, y = np.log(t), np.log(loss)
    f, jac = (lambda p: log_form(x, p)), (lambda p: log_bnsl_jacobian(x, p))
    p, lo, hi = fit_multistart(x, y, f, jac)  # 24 starts with the form itself (cheap)
    if window is not None:  # then the averaged form from the best (its own 24 starts found the same optimum)
        xg, raw, first, last = np.log(window[0]), *window[1:]
        f = lambda p: log_averaged_bnsl(xg, first, last, p)
        jac = lambda p: log_bnsl_jacobian(xg, p, first, last)
        p = fit_from(f, jac, y, p, lo, hi).x
    rsle = lambda log_pred: float(np.sqrt(np.mean((log_pred - y) ** 2)))  # RSLE: root mean squared log error
    y_fit, y_pl = f(p), power_law_fit(x, y, f, jac, window is not None)
    reason = unidentifiable_reason(x, p, hi[4], np.sum((y_fit - y) ** 2), np.sum((y_pl - y) ** 2))
    t_d, L_d, r_d = break_quantities(p)
    res = dict(t_d=t_d, L_d=L_d, c0=float(p[1]), c1=float(p[2]), r_d=r_d, f1=float(p[4]), b=math.exp(p[0]),
               rsle=rsle(y_fit), n_points=len(t), identifiable=not reason, reason=reason or None,
               final_loss_pred=post_break_loss(float(t[-1]), L_d, t_d, r_d),
               t_range=[float(t[0]), float(t[-1])], rsle_power_law=rsle(y_pl))
    if window is None:  # resample the fitted points' log residuals, on the fitted curve
        base, resid, smooth = y_fit, y - y_fit, lambda z: z
    else:  # resample the raw rows' log residuals, on the form at every row, then smooth as the data were
        base = log_form(xg, p)
        resid, smooth = np.log(raw) - base, lambda z: log_window_mean(z, first, last)
    refit = lambda y_star: fit_from(f, jac, y_star, p, lo, hi).x
    cov = {} if reason else covariance_intervals(jac(p), p, y - y_fit)
    boot = {} if reason or n_boot == 0 else bootstrap_intervals(refit, base, resid, smooth, n_boot, block, seed)
    for k in ['t_d', 'L_d', 'r_d']:
        res[f'{k}_ci_cov'], res[f'{k}_ci_boot'] = cov.get(k), boot.get(k)
    res.update(dict(t_d=None, L_d=None, r_d=None, final_loss_pred=None) if reason else {})
    finite = lambda v: v if not isinstance(v, float) or math.isfinite(v) else None  # JSON has no NaN
    return {k: [finite(u) for u in v] if isinstance(v, list) else finite(v) for k, v in res.items()}


def fit_curve(steps, loss, convention='unbiased', smooth=True, subsample=True, min_step=MIN_STEP,
              n_points=200, factor=1.2, n_boot=100, block=0, seed=0):
    """Preprocess every row as recorded and fit: fit_bnsl's dict of the main fit, its convention and
    published (the published fit beside an unbiased one). ValueError: too few points."""
    fits = {name: fit_bnsl(t, l, n_boot, block, seed, window)
            for name, (t, l, window) in fit_inputs(steps, loss, convention, smooth, subsample, min_step,
                                                   n_points, factor).items()}
    name = next(iter(fits))
    published = fits['published'] if name == 'unbiased' else None
    return dict(fits[name], convention=name, published=published and dict(published, convention='published'))

# --- input and command line ---------------------------------------------------------------------


def load_curve(path):
    """(steps, loss) of a run directory (train_loss.npy, row t = step t, up to the first NaN: a run in
    progress) or of a CSV file; exact duplicate rows kept once, with a note. ValueError: bad input."""
    if os.path.isdir(path):
        npy = os.path.join(path, 'train_loss.npy')
        try:
            loss = np.array(np.load(npy, allow_pickle=False), dtype=float)
        except (OSError, ValueError, EOFError) as e:  # missing, or not a .npy file
            raise ValueError(f"{npy}: unreadable, not a run directory's record ({e})")
        loss = loss[:np.isnan(np.append(loss, np.nan)).argmax()]  # the rows before the first NaN
        steps = np.arange(len(loss), dtype=float)
    elif not os.path.isfile(path):
        raise ValueError(f"{path}: no such file or directory")
    else:  # a CSV file of step,loss lines; a first line that is not numbers is a header
        with open(path, encoding='utf-8-sig') as f:  # -sig: a byte-order mark is not part of the first line
            lines = f.read().splitlines()  # not UTF-8: UnicodeDecodeError, a ValueError
        rows = []
        for i, line in enumerate(lines):
            try:
                step, value = map(float, line.split(','))  # exactly two numbers
                rows.append((step, value))
            except ValueError:
                if line.strip() and i > 0:  # blank lines are skipped
                    raise ValueError(f"{path}: line {i + 1} is not 'step,loss': {line[:40]!r}")
        steps, loss = np.array(rows, dtype=float).reshape(-1, 2).T
    bad = np.flatnonzero(~np.isfinite(steps) | ~np.isfinite(loss) | ~(loss > 0))
    if len(bad):
        raise ValueError(f"{path}: step {steps[bad[0]]:g} has loss {loss[bad[0]]:g} (need finite, > 0)")
    twin = np.flatnonzero(np.diff(steps) == 0) + 1  # rows that repeat the step of the row before
    for k in twin:
        if loss[k] != loss[k - 1]:
            raise ValueError(f"{path}: step {steps[k]:g} appears twice with different losses "
                             f"({loss[k - 1]!r} and {loss[k]!r}); steps must be strictly increasing")
    if len(twin):  # exact duplicates, as published curves have: each kept once
        print(f"bnsl.py: note: {path}: {len(twin)} exact duplicate row{'s' * (len(twin) > 1)} merged",
              file=sys.stderr)
    steps, loss = np.delete(steps, twin), np.delete(loss, twin)
    if np.any(steps < 0) or np.any(np.diff(steps) <= 0):
        raise ValueError(f"{path}: steps must be >= 0 and strictly increasing")
    return steps, loss


def format_table(res):
    """A human-readable table of one fit: each quantity and its 95 % intervals, then the published fit's."""
    pub, fmt = res['published'], lambda v: 'null' if v is None else f"{v:.4g}"
    ci = lambda c: '' if c is None else f"[{c[0]:.4g}, {c[1]:.4g}]"
    lines = [f"{res['path']}: {res['n_points']} points, steps {res['t_range'][0]:g}..{res['t_range'][1]:g}, "
             f"{res['convention']} convention", f"{'value':>30s}  {'95% cov':>23s}  {'95% bootstrap':>23s}"]
    keys = ['t_d', 'L_d', 'r_d', 'c0', 'c1', 'f1', 'b', 'final_loss_pred', 'rsle', 'rsle_power_law']
    for name, k, r in [(k, k, res) for k in keys] + [(k + ' published', k, pub) for k in keys[:3] if pub]:
        cov, boot = ci(r.get(k + '_ci_cov')), ci(r.get(k + '_ci_boot'))
        lines.append(f"  {name:16s}{fmt(r[k]):>12s}  {cov:>23s}  {boot:>23s}")
    return '\n'.join(lines + [f"  {name}break not identifiable: {r['reason']}"
                              for name, r in [('', res), ('published: ', pub)] if r and not r['identifiable']])


SETTINGS = [  # the flags with a value: (name, default, type, help); docs/bnsl.md says more
    ('min_step', MIN_STEP, runs.nonnegative, 'cut the steps t <= this'),
    ('n_points', 200, runs.checked(int, lambda v: v >= 2, 'at least 2'), 'log-spaced points kept'),
    ('n_boot', 100, runs.count, 'bootstrap resamples (0: none)'),
    ('block', 0, runs.count, 'bootstrap block length (0: ceil(sqrt(n)))'),
    ('seed', 0, runs.count, 'seed of the bootstrap')]
SWITCHES = [('published', 'only the published convention (t_d lags)'), ('raw', 'no smoothing, subsampling or cut'),
            ('no_smooth', 'skip the trailing log moving average'), ('no_subsample', 'skip the log-spaced subsampling'),
            ('table', 'a human-readable table instead of JSON')]


def main(argv=None):
    p = runs.parser(__doc__, SETTINGS)
    p.add_argument('paths', nargs='+', help='run directories (train_loss.npy) or CSV files (step,loss)')
    for name, help in SWITCHES:
        p.add_argument('--' + name, action='store_true', help=help)
    args = p.parse_args(argv)
    prep = dict(convention='published' if args.published else 'unbiased',
                smooth=not (args.raw or args.no_smooth), subsample=not (args.raw or args.no_subsample),
                min_step=0 if args.raw else args.min_step, n_points=args.n_points)
    curves = []  # load and check every path first: bad input stops before any output
    for path in args.paths:
        try:
            curves.append((path, *load_curve(path)))
            fit_inputs(*curves[-1][1:], **prep)  # too few points to fit: ValueError
        except ValueError as e:
            runs.fail(e if str(e).startswith(path) else f"{path}: {e}")
    for path, steps, loss in curves:
        res = fit_curve(steps, loss, **prep, n_boot=args.n_boot, block=args.block, seed=args.seed)
        print(format_table(res | {'path': path}) if args.table else json.dumps(res | {'path': path}), flush=True)


if __name__ == '__main__':
    main()
