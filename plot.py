"""
Every figure of both results from run directories written by train.py, and a report.

    python plot.py out/                      # a run directory, or a folder of run directories
    python plot.py out/L2 out/L4 out/L6      # several paths: runs ordered and coloured by size
    python plot.py out/ --out figs --format png pdf

Figures go to FIRST_PATH/figures/ (or --out DIR), with report.md beside them: each figure with a
caption that says what to look for, and tables per run (t_d, L_d, r_d with intervals, best and
final validation loss, saturation onset, interference before and after t_d), per run and
frequency bucket (validation loss, the 2D basis), and per run and phase (dissent). A run still training
is plotted as far as it is recorded (rows not yet written are NaN and skipped); a run recorded
with less than everything (e.g. --record none) is left out of the figures that need what it lacks,
and the report says so. A panel with nothing to draw yet (step axes are log: step 0 alone gives no
point) says so, a figure with nothing at all is left out and noted; with nothing for any figure,
one line and exit status 2, nothing written. In its folder plot.py replaces only its own files
(figN_*.png/pdf, report.md; never through a link) and leaves everything else alone. Every quantity
is computed by the function of metrics.py or bnsl.py named after it; this file only reads records
and draws.
"""

import argparse
import glob
import json
import math
import os
import re
import sys
import textwrap
import warnings

import numpy as np
import torch
import matplotlib
matplotlib.use('Agg')  # files only, no screen
import matplotlib.pyplot as plt
from matplotlib import ticker
from matplotlib.collections import PathCollection
from matplotlib.colors import LogNorm
from matplotlib.lines import Line2D

import bnsl
import metrics
import train

N_BUCKETS = 6  # token-frequency buckets, log-spaced in rank (metrics.frequency_buckets)
DT_LONG = 10  # the longer interval of the probe-set interference, in steps (besides dt = 1)
MAX_TRAJ = 150  # points per trajectory in the 2D-basis figure (log-spaced steps)
MAX_SCATTER = 3000  # points per run in the first-order scatter
ONCE = ['train_counts', 'probe_tokens', 'hidden_steps', 'grad_steps', 'train_probe_tokens']  # saved once
GUIDE = 'guide'  # gid of the reference lines drawn in data coordinates (y = x, the collapse star, contours)

# -----------------------------------------------------------------------------
# reading runs


def fail(msg):
    """Bad input: one line naming the problem and exit status 2, never a traceback."""
    print(f"plot.py: error: {' '.join(str(msg).split())}", file=sys.stderr)
    sys.exit(2)


def find_runs(paths):
    """The run directories (holding config.json) given as PATHs or found below them."""
    runs = []
    for path in paths:
        if not os.path.isdir(path):
            raise ValueError(f"{path}: no such directory")
        if os.path.isfile(os.path.join(path, 'config.json')):
            runs.append(path)
            continue
        configs = glob.glob(os.path.join(path, '**', 'config.json'), recursive=True)
        found = sorted(os.path.dirname(c) for c in configs)
        if not found:
            raise ValueError(f"{path}: no run directories (folders with config.json) in it")
        runs += found
    return list(dict.fromkeys(os.path.normpath(r) for r in runs))


def load_record(path, shape=None, dtype=None):
    """One .npy record, memory-mapped; a corrupt or truncated file, or one whose shape or dtype is
    not what config.json says, raises ValueError naming the file."""
    try:
        a = np.load(path, mmap_mode='r', allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: corrupt or truncated record ({e})")
    if shape is not None and (list(a.shape) != list(shape) or a.dtype.name != dtype):
        raise ValueError(f"{path}: shape {list(a.shape)} {a.dtype.name}, "
                         f"config.json says {list(shape)} {dtype}")
    return a


def load_run(path):
    """A run as a dict: path, name, config, rec (record name -> array) and missing (record names
    that config.json lists but the directory lacks)."""
    try:
        with open(os.path.join(path, 'config.json')) as f:
            config = json.load(f)
        specs = config['records']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{os.path.join(path, 'config.json')}: not a config.json written by train.py ({e})")
    rec, missing = {}, []
    for name, spec in [(n, s) for n, s in specs.items()] + [(n, None) for n in ONCE]:
        file = os.path.join(path, name + '.npy')
        if os.path.isfile(file):
            rec[name] = load_record(file, *(spec or [None, None]))
        elif spec is not None or name == 'train_counts':
            missing.append(name)
    if 'train_loss' not in rec:
        raise ValueError(f"{path}: train_loss.npy is missing (the one record every figure needs)")
    # measure.py's records, one folder per N (paper/: the whole split; paper_N<N>/), fewest tokens first;
    # 'paper', which fig10 draws, is the one of most checkpoints (of those, the most tokens)
    folders = glob.glob(os.path.join(path, train.MEASURE_DIR + '*', 'progress.json'))
    papers = [load_paper(os.path.dirname(f)) for f in folders
              if re.fullmatch(train.MEASURE_DIRS, os.path.basename(os.path.dirname(f)))]
    if papers:
        rec['papers'] = sorted(papers, key=lambda p: p['settings']['tokens'])
        rec['paper'] = max(rec['papers'], key=lambda p: (len(p['steps']), p['settings']['tokens']))
    name = os.path.basename(os.path.abspath(path))
    return dict(path=path, name=name, config=config, rec=rec, missing=missing,
                label=f"{name} ({config['n_layer']}L/{config['n_embd']}d, {config['n_params'] / 1e6:.2g}M)")


def load_paper(folder):
    """measure.py's records (RUN/paper/): the rows its progress.json lists as finished, ordered by
    step, and its settings ('settings'); a corrupt or short record raises ValueError naming it."""
    try:
        with open(os.path.join(folder, 'progress.json')) as f:
            settings = json.load(f)
        n = len(settings['steps'])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{folder}/progress.json: not measure.py's ({e})")
    paper = {}
    for name in ['steps', 'loss_D_batch', 'loss_D_batch_null', 'loss_D_heldout', 'loss_D_heldout_null',
                 'loss_D_dtt', 'loss_D_dtt_null', 'opposition_mean', 'opposition_null',
                 'opposition_near_total']:
        file = os.path.join(folder, name + '.npy')
        if name == 'opposition_near_total' and not os.path.isfile(file):  # measured before it existed
            paper[name] = np.full_like(paper['opposition_mean'], np.nan)
            continue
        paper[name] = np.asarray(load_record(file)[:n], dtype=float)
        if len(paper[name]) < n:
            raise ValueError(f"{folder}/{name}.npy: fewer rows than progress.json lists")
    order = np.argsort(paper['steps'])
    return dict({k: v[order] for k, v in paper.items()}, settings=settings)


def recorded(values, steps=None):
    """(steps, values) of the rows recorded so far: NaN rows (not yet written) dropped."""
    values = np.asarray(values, dtype=float)
    steps = np.arange(len(values)) if steps is None else np.asarray(steps)
    ok = np.isfinite(values)
    return steps[ok], values[ok]


def series(values, steps=None, smoothed=False):
    """(steps, values) to draw against a log step axis: the recorded rows (NaN rows, not yet written
    or not recorded at this --record level, dropped); when `smoothed`, the trailing log moving
    average of bnsl.py (factor 1.2), but only where the rows are consecutive steps (rows on a
    schedule, e.g. under --record light, are drawn as recorded); step 0 last dropped (no log)."""
    steps, values = recorded(values, steps)
    if smoothed and len(values) and np.all(np.diff(steps) == 1):
        values = bnsl.log_moving_average(values)
    return steps[steps > 0], values[steps > 0]


def buckets(run):
    """(bucket of every token id, edges, targets (P, T) of the probe set) of a run, computed once."""
    if 'buckets' not in run:
        counts = torch.from_numpy(np.array(run['rec']['train_counts']))
        bucket, edges = metrics.frequency_buckets(counts, N_BUCKETS)
        targets = torch.from_numpy(np.asarray(run['rec']['probe_tokens'])[:, 1:].astype(np.int64))
        run['buckets'] = bucket, edges, targets
    return run['buckets']


def bucket_targets(run, name):
    """The targets whose buckets a per-token record averages over: the training windows'
    (train_probe_tokens) for train_probe_loss, the probe set's for every other record. (rows, T)"""
    if name.startswith('train_probe'):
        return torch.from_numpy(np.asarray(run['rec']['train_probe_tokens'])[:, 1:].astype(np.int64))
    return buckets(run)[2]


def bucket_series(run, name, values=None):
    """(rows, n_buckets): the per-token record `name` (rows, P, T), or `values` of that shape computed
    from records and named `name`, averaged per frequency bucket of its tokens' targets
    (bucket_targets), computed once per run and name (figures and report tables share it)."""
    cache = run.setdefault('bucket_series', {})
    if name not in cache:
        bucket, edges, _ = buckets(run)
        values = np.asarray(run['rec'][name] if values is None else values, dtype=np.float64)
        cache[name] = metrics.bucket_mean(torch.from_numpy(values), bucket_targets(run, name), bucket,
                                          len(edges) - 1).numpy()
    return cache[name]


def bucket_tokens(run, name='probe_loss'):
    """(n_buckets,): how many tokens of the probe set (or, for train_probe_loss, of the training
    windows) have their target in each frequency bucket."""
    bucket, edges, _ = buckets(run)
    return np.bincount(bucket[bucket_targets(run, name)].flatten().numpy(), minlength=len(edges) - 1)


def token_mean(run, name, values=None):
    """(rows,): the per-token record `name` (rows, P, T), or `values` of that shape, averaged over
    the probe tokens."""
    a = np.asarray(run['rec'][name] if values is None else values, dtype=np.float64)
    return np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in a.reshape(len(a), -1)])


def probe_dissent_ratio(run):
    """(S + 1, P, T): |grad_h| / (|grad_h+| + |grad_h-|) of every probe token (metrics.dissent_ratio)."""
    norms = [torch.from_numpy(np.array(run['rec']['probe_' + n], dtype=np.float64))
             for n in ('norm_grad', 'norm_plus', 'norm_minus')]
    return metrics.dissent_ratio(*norms).numpy()


def theta_dissent_ratio(run):
    """(S,): |grad| / (|grad+| + |grad-|) in theta, all parameters as one vector, on each step's
    training batch (metrics.dissent_ratio of the theta_norm_* records' column model)."""
    j = run['config']['theta_names'].index('model')
    norms = [torch.from_numpy(np.array(run['rec']['theta_' + n][:, j], dtype=np.float64))
             for n in ('norm_grad', 'norm_plus', 'norm_minus')]
    return metrics.dissent_ratio(*norms).numpy()


def onsets(values):
    """The saturation onsets of a loss series (rows = steps, NaN rows not recorded), on its trailing
    log moving average (as `series`, but with step 0 kept: never_improved compares with it): a dict
    of steps and smoothed (the recorded rows), plateau and rise (steps, metrics.plateau_onset and
    rise_onset, None without one or for a curve that never improved), never (metrics.never_improved);
    None when no row is recorded."""
    steps, v = recorded(values)
    if not len(v):
        return None
    if np.all(np.diff(steps) == 1):
        v = bnsl.log_moving_average(v)
    loss = torch.from_numpy(v)
    never = metrics.never_improved(loss)
    plateau = None if never else metrics.plateau_onset(loss, torch.from_numpy(steps))
    rise = None if never else metrics.rise_onset(loss)
    step = lambda i: None if i is None else int(steps[i])
    return dict(steps=steps, smoothed=v, never=never, plateau=step(plateau), rise=step(rise))


def onset_state(o):
    """One word for a curve's onsets: never improved, rises, plateaus or improving."""
    return 'never improved' if o['never'] else 'rises' if o['rise'] is not None else \
        'plateaus' if o['plateau'] is not None else 'improving'


def saturation_reading(held, train):
    """What a bucket's held-out (probe set) and training-window curves say together (their onsets):
    the held-out loss rises while the training windows' does not: overfitting; both plateau or rise:
    capacity saturation; the held-out loss plateaus while the training windows' still improves: a
    growing gap. The two states, and the reading where one applies."""
    h, t = onset_state(held), onset_state(train)
    text = f"held-out {h}, training {t}"
    if h == 'rises' and t in ('plateaus', 'improving'):
        return text + ': overfitting'
    if h in ('plateaus', 'rises') and t in ('plateaus', 'rises'):
        return text + ': capacity saturation'
    if h == 'plateaus' and t == 'improving':
        return text + ': a growing gap'
    return text


def bucket_names(edges):
    """Labels of frequency buckets by their ranks counted from 1, as on the Zipf plot."""
    return [f"ranks {int(a) + 1}-{int(b)}" for a, b in zip(edges[:-1], edges[1:])]


def bucket_labels(run):
    """The labels of a run's own frequency buckets (its vocabulary and counts set the edges)."""
    return bucket_names(buckets(run)[1])


def shared_bucket_labels(runs, sep=' | '):
    """(labels, what they list or None) of the buckets of several runs, for a panel or table with
    a point or column per bucket: the runs' own ranks, each distinct set once, `sep` between sets
    (another vocabulary or corpus gives other edges), the sets named by vocabulary size where that
    tells them apart, else by run."""
    sets = {}
    for r in runs:
        sets.setdefault(tuple(bucket_labels(r)), []).append(r)
    if len(sets) == 1:
        return list(next(iter(sets))), None
    vocab = [{len(r['rec']['train_counts']) for r in have} for have in sets.values()]
    names = [f"V = {min(V)}" if len(V) == 1 and vocab.count(V) == 1 else ', '.join(r['name'] for r in have)
             for V, have in zip(vocab, sets.values())]
    ticks = [sep.join(labels[k].split(' ')[1] if k < len(labels) else '-' for labels in sets)
             for k in range(max(map(len, sets)))]
    return ticks, 'ranks of ' + sep.join(names)


# -----------------------------------------------------------------------------
# the deceleration fit of every run


def fit_run(run, min_step):
    """The BNSL fit of a run's training loss (bnsl.fit_curve: the unbiased t_d, and under 'published'
    the fit in the published convention, which the smoothing's lag delays), or a dict with
    identifiable and fitted False and the reason when there are too few points."""
    try:
        return bnsl.fit_curve(*recorded(run['rec']['train_loss']), min_step=min_step)
    except ValueError as e:
        return dict(identifiable=False, fitted=False, reason=str(e), t_d=None, L_d=None, r_d=None,
                    published=None)


def interval(fit, key):
    """The 95% interval [lo, hi] of a fitted quantity: the block bootstrap's, the covariance's if
    there is none, or None. An end that is not finite is None (bnsl.py writes it as null)."""
    return fit.get(key + '_ci_boot') or fit.get(key + '_ci_cov')


def ci_text(fit, key, fmt):
    """'value [lo, hi]' (see `interval`; an end that is None as '?'), or 'n/a' without a value."""
    if fit.get(key) is None:
        return 'n/a'
    ci = interval(fit, key)
    end = lambda v: '?' if v is None else fmt.format(v)
    return fmt.format(fit[key]) + (f" [{end(ci[0])}, {end(ci[1])}]" if ci else '')


# -----------------------------------------------------------------------------
# figure helpers


def run_legend(fig, runs):
    """One legend for the figure, at its top: a line of each run's colour, smallest model first, in
    as many columns (at most 4) as the figure's width holds (the figure widens for a name longer
    than it). Its height in inches."""
    handles = [Line2D([], [], color=r['color'], lw=2, label=r['label']) for r in runs]
    renderer = fig.canvas.get_renderer()
    for ncol in range(min(len(runs), 4), 0, -1):
        legend = fig.legend(handles=handles, loc='upper center', ncol=ncol, fontsize=8, frameon=False)
        box = legend.get_window_extent(renderer)
        if box.width <= fig.bbox.width or ncol == 1:
            break
        legend.remove()
    fig.set_figwidth(max(fig.get_figwidth(), box.width / fig.dpi + 0.1))
    return box.height / fig.dpi


def panel_points(ax):
    """(n, 2): the data points a panel shows, finite and positive along a log axis; guides (gid
    GUIDE) and lines in axes coordinates (axvline, axhline: t_d, bucket edges) aside."""
    xy = [a.get_xydata() for a in ax.lines if a.get_gid() != GUIDE and a.get_transform() == ax.transData]
    xy += [a.get_offsets() for a in ax.collections if isinstance(a, PathCollection) and a.get_gid() != GUIDE]
    xy = np.concatenate([np.asarray(a, dtype=float).reshape(-1, 2) for a in xy] + [np.zeros((0, 2))])
    ok = np.isfinite(xy).all(1)
    for k, axis in enumerate([ax.xaxis, ax.yaxis]):
        if axis.get_scale() == 'log':
            ok &= xy[:, k] > 0
    return xy[ok]


class PlainLogFormatter(ticker.Formatter):
    """The ticks that a log axis' own formatter labels, as plain numbers: 8.3, not 8.3x10^0."""

    def __init__(self, default):
        self.default = default

    def set_axis(self, axis):
        super().set_axis(axis)
        self.default.set_axis(axis)

    def set_locs(self, locs):
        super().set_locs(locs)
        self.default.set_locs(locs)  # it picks which ticks to label from the view

    def __call__(self, x, pos=None):
        if not self.default(x, pos):
            return ''
        return np.format_float_positional(x, precision=6, fractional=False, trim='-')


def finish(fig, runs):
    """Makes a drawn figure fit to save; False when no panel shows a data point or a result in words
    (e.g. 'no identifiable break'; not 'too few steps to fit', gid GUIDE). A panel without a point
    (nothing recorded yet, or only step 0, which a log step axis cannot show) says so on linear axes
    (a log axis without a positive value cannot be drawn); a lone point gets a marker (a line of one
    point is invisible); a log axis that labels ticks between its decades (it spans less than about
    two) gets plain tick labels, not 8.3x10^0; the run legend goes above the panels, inside the figure."""
    shown = False
    for ax in fig.axes:
        if len(panel_points(ax)):
            shown = True
            for line in ax.lines:
                lone = np.isfinite(line.get_xydata()).all(1).sum() == 1
                if lone and line.get_marker() in ('None', '', ' ', None):
                    line.set_marker('o')
                    line.set_markersize(3)
            continue
        shown |= any(t.get_gid() != GUIDE for t in ax.texts)  # a result, e.g. 'no identifiable break'
        for a in ax.lines + ax.collections:
            if a.get_gid() != GUIDE:  # e.g. step 0, which a linear axis would show
                a.set_visible(False)
        for axis, set_scale in [(ax.xaxis, ax.set_xscale), (ax.yaxis, ax.set_yscale)]:
            if axis.get_scale() == 'log':  # no positive value: a log axis cannot be drawn
                set_scale('linear')
                axis.set_ticks([])
        if not ax.texts:  # a panel that does not say why it is empty
            ax.text(0.5, 0.5, 'nothing recorded\nthat this panel can draw', transform=ax.transAxes,
                    ha='center', va='center', fontsize=8, color='0.4')
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in fig.axes + [c for ax in fig.axes for c in ax.child_axes]:  # child: fig7's colour bar
        for axis in [a for a in (ax.xaxis, ax.yaxis) if a.get_scale() == 'log']:
            # labels between decades read 8.3x10^0: plain numbers instead
            if any(axis.get_minor_formatter().format_ticks(axis.get_minorticklocs())):
                axis.set_major_formatter(PlainLogFormatter(axis.get_major_formatter()))
                axis.set_minor_formatter(PlainLogFormatter(axis.get_minor_formatter()))
    top = max(0.35, run_legend(fig, runs) + 0.05)  # grid() leaves 0.4 inches above the panels
    fig.set_figheight(fig.get_figheight() + top - 0.35)
    fig.tight_layout(rect=(0, 0, 1, 1 - top / fig.get_figheight()))
    return shown


def mark_break(ax, run):
    """A dotted vertical line at the run's t_d, when its break is identifiable."""
    if run['fit'].get('t_d') is not None:
        ax.axvline(run['fit']['t_d'], color=run['color'], ls=':', lw=1)


def grid(n_panels, ncols, width=4.0, height=3.2):
    """A figure with n_panels axes (width x height inches each) in rows of ncols, and space above
    for the legend."""
    nrows = math.ceil(n_panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows + 0.4), squeeze=False)
    for ax in axes.flat[n_panels:]:
        ax.remove()
    return fig, list(axes.flat[:n_panels])


def log_steps(ax, label='step t'):
    ax.set_xscale('log')
    ax.set_xlabel(label + ' (log)')


# -----------------------------------------------------------------------------
# the nine figures: each takes the runs that hold what it needs and returns a figure


def fig_loss(runs):
    fig, (ax,) = grid(1, 1, 7, 5)
    for r in runs:
        ax.plot(*series(r['rec']['train_loss']), color=r['color'], alpha=0.25, lw=0.6)
        ax.plot(*series(r['rec']['train_loss'], smoothed=True), color=r['color'], lw=1.5)
        fit = r['fit']
        if fit.get('t_d') is not None:
            t = np.geomspace(fit['t_range'][0], fit['t_range'][1], 200)
            ax.plot(t, bnsl.bnsl_1break(t, fit['b'], fit['c0'], fit['c1'], fit['t_d'], fit['f1']),
                    color='k', lw=1, ls='--')
            pre = t[t <= fit['t_d'] * 3]
            post = t[t >= fit['t_d'] / 3]
            ax.plot(pre, bnsl.loss_at_break(fit['b'], fit['c0'], pre),
                    color=r['color'], lw=1, ls=':')  # b t^-c0
            ax.plot(post, bnsl.post_break_loss(post, fit['L_d'], fit['t_d'], fit['r_d']),
                    color=r['color'], lw=1, ls=':')
            ax.plot([fit['t_d']], [fit['L_d']], 'o', color=r['color'], mec='k', ms=7, zorder=5)
            published = fit.get('published') or {}
            if published.get('t_d') is not None:  # the published convention's break, lagged by smoothing
                ax.plot([published['t_d']], [published['L_d']], 'o', mfc='none', mec=r['color'], ms=7,
                        zorder=5)
    ax.set_yscale('log')
    log_steps(ax)
    ax.set_ylabel('training loss (nats/token, log)')
    ax.set_title('Loss deceleration: 1-break BNSL fit (dashed), its two power laws (dotted), t_d (dot; '
                 'open: the published convention)', fontsize=9)
    return fig


def fig_deceleration(runs):
    fig, axes = grid(4, 4, 3.4, 3.2)
    n = np.array([r['config']['n_params'] for r in runs])
    labels = ['t_d (steps)', 'L_d (nats/token)', 'r_d (slope after t_d)']
    for ax, key, label in zip(axes, ['t_d', 'L_d', 'r_d'], labels):
        unfit = [r['name'] for r in runs if r['fit'].get(key) is None and r['fit'].get('fitted', True)]
        short = [r['name'] for r in runs if not r['fit'].get('fitted', True)]
        for r, size in zip(runs, n):
            fit = r['fit']
            if fit.get(key) is None:
                continue
            ci = interval(fit, key)
            if ci is None or None in ci:  # no interval (or a non-finite end): the point alone
                ci = [fit[key], fit[key]]
            # a percentile interval may exclude its estimate (t_d near a bound): clip the bars at it
            yerr = [[max(fit[key] - ci[0], 0)], [max(ci[1] - fit[key], 0)]]
            ax.errorbar([size], [fit[key]], yerr=yerr, fmt='o', color=r['color'], capsize=3)
        # wrapped and outside the layout: long run names must not squeeze the panels
        if unfit:  # a result of the fit
            ax.text(0.02, 0.02, textwrap.fill('no identifiable break: ' + ', '.join(unfit), 40),
                    transform=ax.transAxes, fontsize=7, va='bottom', in_layout=False, clip_on=True)
        if short:  # no fit, no result: why the panel lacks them
            ax.text(0.02, 0.98, textwrap.fill('too few steps to fit: ' + ', '.join(short), 40),
                    transform=ax.transAxes, fontsize=7, va='top', in_layout=False, clip_on=True, gid=GUIDE)
        ax.set_xscale('log')
        ax.set_xlabel('parameters (log)')
        ax.set_ylabel(label)
    axes[0].set_title('95% block-bootstrap intervals (covariance if none)', fontsize=8)
    ax = axes[3]
    for r, size in zip(runs, n):
        _, probe = recorded(token_mean(r, 'probe_loss')) if 'probe_loss' in r['rec'] else (None, [])
        if len(probe):  # runs without a probe set (--record none) have no validation loss
            ax.plot([size], [probe.min()], 'o', color=r['color'])
            ax.plot([size], [probe[-1]], 'x', color=r['color'], ms=8)
    ax.set_xscale('log')
    ax.set_xlabel('parameters (log)')
    ax.set_ylabel('validation loss: best (o), last (x)')
    ax.set_title('validation = the probe set', fontsize=8)
    return fig


def probe_interference(run, dt):
    """D of per-token probe-loss changes over dt steps, and its null (the analytic one,
    metrics.expected_null_interference): row t is probe row t to t + dt. Two (S + 1 - dt,) arrays."""
    loss = torch.from_numpy(np.asarray(run['rec']['probe_loss'], dtype=np.float64))
    loss = loss.reshape(len(loss), -1)  # (S + 1, P T)
    change = loss[dt:] - loss[:-dt]
    null = metrics.expected_null_interference(change.abs().sum(-1), change.pow(2).sum(-1))
    return metrics.destructive_interference(change).numpy(), null.numpy()


def n_tokens(run, what):
    """N, the number of tokens behind a run's D: 'batch' (a training batch, B T), 'probe' (the
    probe set, P T) or 'opposition' (the all-parameter opposition's probe sequences)."""
    c = run['config']
    seqs = dict(batch=c['batch_size'], probe=c['probe_seqs'], opposition=c.get('opposition_seqs') or 1)[what]
    return seqs * c['block_size']


def n_label(runs, what):
    """'N = 2,048' when every run has the same N, else the runs' N in their order: 'N = 2,048 / 4,096'."""
    return 'N = ' + ' / '.join(f"{n:,}" for n in dict.fromkeys(n_tokens(r, what) for r in runs))


def fig_zero_sum(runs):
    fig, axes = grid(4, 2, 5.5, 3.6)
    for r in runs:
        for ax, prefix in zip(axes[:2], ['train', 'probe']):
            ax.plot(*series(r['rec'][prefix + '_D']), color=r['color'], alpha=0.2, lw=0.5)
            ax.plot(*series(r['rec'][prefix + '_D'], smoothed=True), color=r['color'], lw=1.5)
            ax.plot(*series(r['rec'][prefix + '_D_null'], smoothed=True), color=r['color'], lw=0.8, ls='--')
            mark_break(ax, r)
        D_long, null_long = probe_interference(r, DT_LONG)
        axes[1].plot(*series(D_long, smoothed=True), color=r['color'], lw=1, ls='-.')
        axes[1].plot(*series(null_long, smoothed=True), color=r['color'], lw=0.6, ls=(0, (1, 3)))
        for prefix, ls in [('train', '-'), ('probe', '--')]:
            axes[2].plot(*series(r['rec'][prefix + '_M'], smoothed=True), color=r['color'], lw=1.2, ls=ls)
        D, M = (np.asarray(r['rec']['probe_' + k], dtype=float) for k in ('D', 'M'))  # (S,) each
        ok = np.isfinite(D) & np.isfinite(M) & (M > 0)  # D is NaN (0/0) when no probe loss changed
        axes[3].scatter(D[ok], M[ok], s=3, color=r['color'], alpha=0.5)
    for ax, title in zip(axes[:2], [f"training batch ({n_label(runs, 'batch')}), before vs after its own "
                                    "update;\ndashed: sign-flip null (64 draws)",
                                    f"probe set ({n_label(runs, 'probe')}), step t to t+1 (solid; dashed: "
                                    f"null) and\nt to t+{DT_LONG} (dash-dot; dotted: its analytic null)"]):
        log_steps(ax)
        ax.set_ylabel('D of per-token loss changes')
        ax.set_title(title, fontsize=8)
    log_steps(axes[2])
    axes[2].set_yscale('log')
    axes[2].set_ylabel('M = mean |Delta l_i| (nats)')
    axes[2].set_title('magnitude of per-token changes: training batch (solid), probe (dashed)', fontsize=8)
    ax = axes[3]
    ax.set_xlim(0, 1)
    if ax.collections and np.isfinite(ax.dataLim.intervaly).all():  # contours around the points, if any
        ax.set_yscale('log')
        lo, hi = ax.get_ylim()
        D = np.linspace(0, 0.999, 300)
        for level in 10.0 ** np.arange(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
            ax.plot(D, level / (1 - D), color='0.6', lw=0.6, gid=GUIDE)  # |Delta L| = (1 - D) M = level
            if lo <= level <= hi:
                ax.text(0.01, level * 1.05, f"|mean dl| = {level:.0e}", fontsize=6, color='0.4', clip_on=True,
                        gid=GUIDE)
        ax.set_ylim(lo, hi)
    ax.set_xlabel('D (probe set, step t to t+1)')
    ax.set_ylabel('M (nats, log)')
    ax.set_title('D-M plane; grey: contours of |mean Delta l| = (1 - D) M', fontsize=8)
    return fig


def layer_names(keys):
    """The per-layer columns of an opposition record (metrics.opposition_keys: tensors, layers, 'model')."""
    tensors = [k for k in keys if k.endswith(('.weight', '.bias'))]
    return list(dict.fromkeys(metrics.opposition_group(k) for k in tensors))


def headline_column(keys, total):
    """The column of an opposition record a figure leads with: 'blocks' (the Transformer blocks'
    weight matrices, the published headline), or the total where the run has no such column."""
    return keys.index('blocks') if 'blocks' in keys else keys.index(total)


def fig_opposition(runs):
    with_terms = [r for r in runs if 'update_Cg' in r['rec']]  # runs recorded before these existed have none
    fig, axes = grid(2 + bool(with_terms) + len(runs), 4, 3.8, 3.2)
    top = axes[:2]
    for r in with_terms:  # the update-weighted terms of the blocks' matrices, p_ij = g_ij delta_j
        keys = r['config']['opposition_keys']
        j = headline_column(keys, 'model')
        for term, ls in [('Cg', '-'), ('Cug', '--'), ('C_i_dli', ':')]:
            axes[2].plot(*series(r['rec']['update_' + term][:, j], r['rec']['grad_steps']), color=r['color'],
                         ls=ls, marker='o', ms=3, lw=1)
        mark_break(axes[2], r)
    if with_terms:
        axes[2].set_title(f"update-weighted terms, blocks' matrices\n({n_label(with_terms, 'opposition')}): "
                          "Cg (solid), Cug (dashed),\nC_i_dli (dotted); 1 = agreement", fontsize=8)
    for r in runs:
        cfg = r['config']
        panels = [(top[0], 'local_opposition_', cfg['local_opposition_keys'], None),  # every step
                  (top[1], 'opposition_', cfg['opposition_keys'], r['rec']['grad_steps'])]
        for ax, prefix, keys, steps in panels:
            total = keys[-1]  # 'model' for every parameter, 'local' (older runs: 'model') for the local ones
            style = dict(marker='o', ms=3, lw=1) if steps is not None else dict(lw=1.3)
            j = headline_column(keys, total)
            for name, ls in [('mean', '-'), ('weighted', '--'), ('null', '-.')]:
                if prefix + name in r['rec']:  # runs recorded before the null existed have none
                    thin = dict(lw=0.7) if name == 'null' else {}
                    ax.plot(*series(r['rec'][prefix + name][:, j], steps, smoothed=steps is None),
                            color=r['color'], ls=ls, **{**style, **thin})
            every = r['rec'][prefix + 'mean'][:, keys.index(total)]
            ax.plot(*series(every, steps, smoothed=steps is None), color=r['color'], ls=':', **style)
        for ax in top:
            mark_break(ax, r)
    top[0].set_title("position-local layers, training batch\n"
                     f"({n_label(runs, 'batch')}), every step, smoothed:\n"
                     "mean D_j over the last block's matrices (solid),\n|g|-weighted (dashed), null "
                     "(dash-dot), all local (dotted)", fontsize=8)
    top[1].set_title("all parameters, exact, probe tokens\n"
                     f"({n_label(runs, 'opposition')}): mean D_j over the "
                     "blocks'\nmatrices (solid), |g|-weighted (dashed), null\n(dash-dot), every coordinate "
                     "(dotted)", fontsize=8)
    for ax, r in zip(axes[2 + bool(with_terms):], runs):
        keys = r['config']['opposition_keys']
        layers = layer_names(keys)
        colors = plt.cm.plasma(np.linspace(0, 0.9, len(layers)))
        for layer, c in zip(layers, colors):
            ax.plot(*series(r['rec']['opposition_mean'][:, keys.index(layer)], r['rec']['grad_steps']),
                    color=c, marker='.', lw=1, label=layer)
        ax.set_title(f"{r['label']}: per layer", fontsize=8)
        ax.legend(fontsize=6, ncol=2)
    for ax in axes:
        log_steps(ax)
        ax.set_ylabel('gradient opposition D_j')
    if with_terms:
        axes[2].set_ylabel('update-weighted term')
    return fig


def first_order_pairs(run):
    """[(step, predicted (B T,), true (B T,))] of the grad steps whose records are complete."""
    pairs = []
    S = len(run['rec']['train_loss_pre'])
    for k, s in enumerate(run['rec']['grad_steps'][:len(run['rec']['train_loss_pred'])]):
        if not 0 <= s < S:  # no batch of that step (older train.py: grad_steps up to S)
            continue
        pred = np.asarray(run['rec']['train_loss_pred'][k], dtype=float).ravel()
        post = np.asarray(run['rec']['train_loss_post'][s], dtype=float).ravel()
        pre = np.asarray(run['rec']['train_loss_pre'][s], dtype=float).ravel()
        true = post - pre
        if np.isfinite(pred).all() and np.isfinite(true).all():
            pairs.append((int(s), pred, true))
    return pairs


def fig_first_order(runs):
    fig, axes = grid(3, 3, 4.3, 3.8)
    lim = 0
    for r in runs:
        pairs = first_order_pairs(r)
        if not pairs:
            continue
        pred, true = np.concatenate([p for _, p, _ in pairs]), np.concatenate([t for _, _, t in pairs])
        pick = np.random.default_rng(0).choice(len(pred), min(len(pred), MAX_SCATTER), replace=False)
        axes[0].scatter(pred[pick], true[pick], s=2, color=r['color'], alpha=0.4)
        lim = max(lim, np.abs(true).max(), np.abs(pred).max())
        agree = [metrics.first_order_agreement(torch.from_numpy(p), torch.from_numpy(t)) for _, p, t in pairs]
        steps = [s for s, _, _ in pairs]
        axes[1].plot(steps, [float(a['corr']) for a in agree], color=r['color'], marker='o', ms=3)
        axes[2].plot(steps, [float(a['slope']) for a in agree], color=r['color'], marker='o', ms=3)
    ax = axes[0]
    ax.set_xscale('symlog', linthresh=1e-3)
    ax.set_yscale('symlog', linthresh=1e-3)
    if lim > 0:
        ax.plot([-lim, lim], [-lim, lim], color='k', lw=0.8, gid=GUIDE)
    ax.set_xlabel('predicted <grad l_i, delta> (nats, symlog)')
    ax.set_ylabel('true Delta l_i (nats, symlog)')
    ax.set_title('per token, training batch, all scheduled steps', fontsize=8)
    for ax, label in [(axes[1], 'correlation(predicted, true)'), (axes[2], 'slope of true on predicted')]:
        log_steps(ax)
        ax.set_ylabel(label)
    axes[2].axhline(1, color='k', lw=0.6)
    return fig


def best_and_last(values):
    """(lowest, last) of the recorded rows of a loss series; NaN, NaN when none is recorded."""
    _, v = recorded(values)
    return (v.min(), v[-1]) if len(v) else (np.nan, np.nan)


def has_train_probe(run):
    """Does the run hold the training-window probe (--train_probe_seqs)?"""
    return 'train_probe_loss' in run['rec'] and 'train_probe_tokens' in run['rec']


def bucket_curves(ax, run, name):
    """The per-bucket loss curves of one record (probe_loss or train_probe_loss) of a run, as
    recorded (no smoothing), a colour per bucket, labelled by its ranks; a dot at each bucket's best
    step, and its onsets (the smoothed curve's, `onsets`): v at the plateau onset, ^ at the rise
    onset, drawn on the recorded curve."""
    loss = bucket_series(run, name)
    names = bucket_labels(run)
    colors = plt.cm.plasma(np.linspace(0, 0.9, len(names)))
    for k, (c, label) in enumerate(zip(colors, names)):
        steps, v = series(loss[:, k])
        if not len(v):
            continue
        ax.plot(steps, v, color=c, lw=1, label=label)
        ax.plot(steps[np.argmin(v)], v.min(), 'o', color=c, ms=4)
        o = onsets(loss[:, k])
        for step, marker in [(o['plateau'], 'v'), (o['rise'], '^')]:
            if step is not None and step in steps:
                ax.plot(step, v[steps == step][0], marker, color=c, mec='k', mew=0.6, ms=6)
    log_steps(ax)
    ax.legend(fontsize=6)


def fig_saturation(runs):
    trained = [r for r in runs if has_train_probe(r)]  # runs with the training-window probe
    fig, axes = grid(2 + len(runs) + len(trained), 4, 3.8, 3.2)
    seen = set()
    for r in runs:  # one Zipf plot per distinct corpus and vocabulary
        key = (r['config'].get('data_key'), len(r['rec']['train_counts']))
        if key in seen:
            continue
        seen.add(key)
        counts = torch.from_numpy(np.array(r['rec']['train_counts']))
        zipf = metrics.zipf_fit(counts)
        # (V,) each, by token id
        c, rank, fitted = counts.numpy(), zipf['rank'].numpy(), zipf['fitted'].numpy()
        order = np.argsort(rank)  # token ids by rank
        nonzero = order[c[order] > 0]
        axes[0].loglog(rank[nonzero], c[nonzero], color=r['color'], lw=1.2, label=f"V = {len(c)}")
        axes[0].loglog(rank[order], fitted[order], color='k', lw=0.7, ls='--')
        out = zipf['outliers'].numpy()
        axes[0].plot(rank[out], c[out], 'rx', ms=5)
        for e in buckets(r)[1][1:-1].numpy():
            axes[0].axvline(e + 0.5, color='0.7', lw=0.5)
    axes[0].set_xlabel('rank in the training counts, from 1 (log)')
    axes[0].set_ylabel('count (log)')
    axes[0].set_title('Zipf plot; dashed: fit, x: outliers, grey: bucket edges', fontsize=8)
    axes[0].legend(fontsize=7)
    for r in runs:
        best, last = zip(*[best_and_last(v) for v in bucket_series(r, 'probe_loss').T])  # per bucket
        axes[1].plot(best, color=r['color'], marker='o')
        axes[1].plot(last, color=r['color'], marker='x', ls='--')
        if has_train_probe(r):  # the training windows' beside them
            best, last = zip(*[best_and_last(v) for v in bucket_series(r, 'train_probe_loss').T])
            axes[1].plot(best, color=r['color'], marker='o', mfc='none', ls=':')
            axes[1].plot(last, color=r['color'], marker='x', ls=':', alpha=0.6)
    ticks, label = shared_bucket_labels(runs)  # each run's own ranks: vocabularies may differ
    axes[1].set_xticks(range(len(ticks)))
    axes[1].set_xticklabels(ticks, rotation=30, fontsize=6)
    if label:
        axes[1].set_xlabel(label, fontsize=7)
    axes[1].set_ylabel('validation loss (nats/token)')
    axes[1].set_title('per frequency bucket: best (o, solid), last (x, dashed);\n'
                      'dotted: training windows, where recorded', fontsize=8)
    for ax, r in zip(axes[2:], runs):
        bucket_curves(ax, r, 'probe_loss')
        ax.set_ylabel('validation loss (nats/token)')
        ax.set_title(f"{r['label']}: held-out, per bucket\n(dot: best; v: plateau onset, ^: rise onset)",
                     fontsize=8)
    for ax, r in zip(axes[2 + len(runs):], trained):
        bucket_curves(ax, r, 'train_probe_loss')
        ax.set_ylabel('training-window loss (nats/token)')
        ax.set_title(f"{r['label']}: training windows, per bucket\n"
                     "(dot: best; v: plateau onset, ^: rise onset)", fontsize=8)
    return fig


def fig_basis(runs):
    n_b = max(len(buckets(r)[1]) - 1 for r in runs)
    fig, axes = grid(n_b * len(runs), n_b, 2.4, 2.4)
    norm = LogNorm(1, max(len(r['rec']['probe_cos_h_plus']) for r in runs))
    for i, r in enumerate(runs):
        plus, minus = bucket_series(r, 'probe_cos_h_plus'), bucket_series(r, 'probe_cos_h_minus')
        bucket, edges, targets = buckets(r)
        present = set(bucket[targets].unique().tolist())  # the buckets of the probe tokens' targets
        for k, name in enumerate(bucket_names(edges)):
            ax = axes[i * n_b + k]
            steps = np.flatnonzero(np.isfinite(plus[:, k]) & np.isfinite(minus[:, k]))  # recorded rows
            if len(steps):
                steps = steps[np.unique(np.round(np.geomspace(1, len(steps), MAX_TRAJ)).astype(int) - 1)]
                ax.plot(plus[steps, k], minus[steps, k], color='0.7', lw=0.6)
                ax.scatter(plus[steps, k], minus[steps, k], c=np.maximum(steps, 1), cmap='viridis', norm=norm,
                           s=6)
            elif k not in present:  # else not recorded yet: finish() says so
                ax.text(0, 0, 'no probe token\nin this bucket', ha='center', va='center', fontsize=7)
            ax.plot([-1], [1], marker='*', color='r', ms=8, gid=GUIDE)
            ax.set_xlim(-1.05, 1.05)
            ax.set_ylim(-1.05, 1.05)
            ax.set_title(f"{r['name']}, {name}", fontsize=7, color=r['color'])
            ax.tick_params(labelsize=6)
            if k == 0:
                ax.set_ylabel('cos(h, grad_h-)', fontsize=7)
            if i == len(runs) - 1:
                ax.set_xlabel('cos(h, grad_h+)', fontsize=7)
    cbar = fig.colorbar(plt.cm.ScalarMappable(norm, 'viridis'),
                        cax=axes[n_b - 1].inset_axes([1.05, 0, 0.05, 1]))
    cbar.set_label('step (log)', fontsize=7)
    return fig


def fig_dissent(runs):
    # left: h, per probe token; right: theta, the training batch; then per run and bucket, in h
    fig, axes = grid(6 + 2 * len(runs), 2, 5.5, 3.2)
    for r in runs:
        ratio_h = token_mean(r, 'probe_dissent_ratio', probe_dissent_ratio(r))
        axes[0].plot(*series(token_mean(r, 'probe_cos_plus_minus')), color=r['color'], lw=1.3)
        axes[2].plot(*series(ratio_h), color=r['color'], lw=1.3)
        for name, ls in [('norm_grad', '-'), ('norm_plus', '--'), ('norm_minus', ':')]:
            axes[4].plot(*series(token_mean(r, 'probe_' + name)), color=r['color'], ls=ls, lw=1.3)
        j = r['config']['theta_names'].index('model')
        for ax, values in [(axes[1], r['rec']['theta_cos'][:, j]), (axes[3], theta_dissent_ratio(r))]:
            ax.plot(*series(values), color=r['color'], lw=0.4, alpha=0.25)
            ax.plot(*series(values, smoothed=True), color=r['color'], lw=1.3)
        for name, ls in [('norm_grad', '-'), ('norm_plus', '--'), ('norm_minus', ':')]:
            axes[5].plot(*series(r['rec']['theta_' + name][:, j], smoothed=True),
                         color=r['color'], ls=ls, lw=1.3)
        for ax in axes[:6]:
            mark_break(ax, r)
    axes[0].set_title('h: mean over probe tokens of cos(grad_h+, grad_h-)', fontsize=8)
    axes[1].set_title('theta, all parameters, training batch: batch-level cos(grad+, grad-)', fontsize=8)
    axes[2].set_title('h: mean over probe tokens of |grad_h| / (|grad_h+| + |grad_h-|)', fontsize=8)
    axes[3].set_title('theta: |grad| / (|grad+| + |grad-|) (1: no dissent, 0: total)', fontsize=8)
    axes[4].set_title('h: mean |grad_h| (solid), |grad_h+| (dashed), |grad_h-| (dotted)', fontsize=8)
    axes[5].set_title('theta: |grad| (solid), |grad+| (dashed), |grad-| (dotted), smoothed', fontsize=8)
    for ax, label in zip(axes[:6], ['cosine', 'cosine', 'dissent ratio', 'dissent ratio', 'norm (log)',
                                    'norm (log)']):
        log_steps(ax)
        ax.set_ylabel(label)
    for ax in axes[4:6]:
        ax.set_yscale('log')
    for i, r in enumerate(runs):  # per frequency bucket, in h: the probe tokens of the bucket
        names = bucket_labels(r)
        colors = plt.cm.plasma(np.linspace(0, 0.9, len(names)))
        panels = [(axes[6 + 2 * i], bucket_series(r, 'probe_cos_plus_minus'), 'cos(grad_h+, grad_h-)'),
                  (axes[7 + 2 * i], bucket_series(r, 'probe_dissent_ratio', probe_dissent_ratio(r)),
                   '|grad_h| / (|grad_h+| + |grad_h-|)')]
        for ax, values, label in panels:
            for k, (c, name) in enumerate(zip(colors, names)):
                steps, v = series(values[:, k])
                if len(v):
                    ax.plot(steps, v, color=c, lw=1, label=name)
            mark_break(ax, r)
            log_steps(ax)
            ax.set_ylabel(label, fontsize=7)
            ax.set_title(f"{r['label']}: h, mean per frequency bucket", fontsize=8)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    return fig


def fig_geometry(runs):
    fig, axes = grid(3, 3, 4.3, 3.6)
    for r in runs:
        steps = np.asarray(r['rec']['hidden_steps'])
        s = np.asarray(r['rec']['head_singular_values'], dtype=float)  # (K, min(V, d))
        done = np.isfinite(s).all(1)
        if not done.any():
            continue
        for row, ls in [(np.flatnonzero(done)[0], ':'), (np.flatnonzero(done)[-1], '-')]:
            axes[0].plot(np.arange(1, s.shape[1] + 1), s[row] / s[row, 0], color=r['color'], ls=ls)
        H = [float(metrics.spectral_entropy(torch.from_numpy(row))) for row in s[done]]
        axes[1].plot(*series(H, steps[done]), color=r['color'], marker='.')
        axes[1].axhline(math.log(s.shape[1]), color=r['color'], lw=0.6, ls='--')
        axes[2].plot(*series(r['rec']['probe_anisotropy']), color=r['color'])
    axes[0].set_yscale('log')
    axes[0].set_xlabel('index k')
    axes[0].set_ylabel('s_k / s_1 (log)')
    axes[0].set_title('LM-head singular values: first (dotted) and last (solid) recorded step', fontsize=8)
    log_steps(axes[1])
    axes[1].set_ylabel('spectral entropy (nats)')
    axes[1].set_title('entropy of s_k^2 / sum s^2; dashed: its maximum log(min(V, d))', fontsize=8)
    log_steps(axes[2])
    axes[2].set_ylabel('mean pairwise cos(h_i, h_j)')
    axes[2].set_title('anisotropy of h over the probe tokens', fontsize=8)
    return fig


def paper_column(p, key):
    """(mean, null, share of D_j > 0.99) of the opposition column `key` ('blocks' or 'model') of
    measure.py's records p (one N), each (C,), NaN without it."""
    keys = p['settings']['opposition_keys']
    if key not in keys:
        return tuple(np.full(len(p['steps']), np.nan) for _ in range(3))
    return tuple(p['opposition_' + k][:, keys.index(key)] for k in ('mean', 'null', 'near_total'))


def fig_paper_protocol(runs):
    fig, axes = grid(3, 3, 4.2, 3.4)
    for r in runs:
        p, c = r['rec']['paper'], r['color']
        steps = p['steps']
        for key, ls in [('blocks', '-'), ('model', '--')]:
            mean, null, _ = paper_column(p, key)
            axes[0].plot(steps, mean, color=c, ls=ls, marker='o', ms=3)
            axes[0].plot(steps, null, color=c, ls=':', lw=1)
        for where, ls, shift in [('batch', '-', 0.97), ('heldout', '--', 1.03)]:  # shifted apart a little
            D = p[f'loss_D_{where}']
            axes[1].errorbar(steps * shift, D.mean(1), yerr=D.std(1), color=c, ls=ls, marker='o', ms=3,
                             capsize=2)
            axes[1].plot(steps * shift, p[f'loss_D_{where}_null'].mean(1), color=c, ls=':', lw=1)
        axes[2].plot(steps, p['loss_D_dtt'], color=c, marker='o', ms=3)
        axes[2].plot(steps, p['loss_D_dtt_null'], color=c, ls=':', lw=1)
    Ns = ', '.join(sorted({f"{r['rec']['paper']['settings']['tokens']:,}" for r in runs}))
    ks = ', '.join(sorted({str(r['rec']['paper']['settings']['batches']) for r in runs}))
    titles = [f"paper protocol, N = {Ns} held-out tokens: mean D_j\nover the blocks' matrices (solid), "
              "every\ncoordinate (dashed)",
              f"paper protocol, dt = 1, k = {ks} fresh batches: loss D\non the batch (solid) and on "
              f"N = {Ns} held-out\ntokens (dashed), mean +- sd",
              f"paper protocol, dt = t, N = {Ns} held-out tokens:\nloss D from theta_t to theta_2t"]
    for ax, title in zip(axes, titles):
        log_steps(ax, 'checkpoint step t')
        ax.set_ylabel('gradient opposition D_j' if ax is axes[0] else 'D of per-token loss changes')
        ax.set_title(title + '; dotted: null', fontsize=8)
    return fig


# name, what it needs, the function, its caption
FIGURES = [
    ('fig1_loss', ['train_loss'], fig_loss,
     "Training loss against step, log-log, every run (faint: per step; solid: trailing log moving "
     "average, factor 1.2). Dashed black: the 1-break BNSL fit of bnsl.py (its unbiased default: the "
     "form passed through the same moving average before it is compared with the smoothed curve, so it "
     "describes the loss itself, ahead of the lagging average); dotted: its pre-break power law b t^-c0 "
     "and post-break line L_d (t/t_d)^-r_d; dot: (t_d, L_d); open circle: the published convention's "
     "(t_d, L_d), which the smoothing's lag puts later. "
     "Look for the bend: a steep early power law that gives way to a shallow one, earlier and at a "
     "lower loss for larger models."),
    ('fig2_deceleration', ['train_loss'], fig_deceleration,
     "t_d, L_d and r_d of each run against its parameter count, with 95% block-bootstrap intervals, "
     "and the best (o) and last (x) validation loss (probe set). Runs whose break is not identifiable "
     "are named in the panel. Expect L_d to fall and r_d to rise with size."),
    ('fig3_zero_sum', ['train_D', 'train_M', 'train_D_null', 'probe_D', 'probe_M', 'probe_D_null',
                       'probe_loss'], fig_zero_sum,
     "Zero-sum learning. Top: destructive interference D of the per-token loss changes (faint: per "
     "step; solid: trailing log moving average), for the training batch of each step before and after "
     "its own update, and for the fixed probe set between consecutive steps (and 10 steps apart, "
     "dash-dot); dashed: the sign-flip null, the mean D of the same magnitudes with random signs (64 "
     "draws; for the 10-step change the analytic null, dotted); N, the number of tokens behind each D, "
     "is in the panel titles: D near 1 means something only above its null at the same N. Dotted "
     "verticals: t_d. Bottom left: the magnitude M = mean |Delta l_i| (smoothed). Bottom right: every "
     "probe step in the D-M plane; along a grey contour the mean change |Delta L| = (1 - D) M is "
     "constant. Look for D rising towards 1 around t_d, far above the null: the improvement is then "
     "bounded by (1 - D) M, however large the individual changes."),
    ('fig4_opposition', ['local_opposition_mean', 'local_opposition_weighted', 'opposition_mean',
                         'opposition_weighted', 'grad_steps'], fig_opposition,
     "Gradient opposition between tokens: D_j = 1 - |sum_i g_ij| / sum_i |g_ij| per parameter "
     "coordinate, g_i the gradient of token i's own loss. Headline, as published: its exact mean over "
     "the coordinates of the Transformer blocks' weight matrices (solid; no embeddings, LM head, "
     "LayerNorms or biases), and the |g|-weighted mean over them (dashed); dotted: the mean over every "
     "coordinate, which in small models the embeddings and the LM head dominate; dash-dot: the null of "
     "the headline, the mean over the same coordinates of D_j's value under random signs at the same N "
     "(1 - sqrt(2/pi) sqrt(sum_i g_ij^2) / sum_i |g_ij|), N in the titles. First panel: the "
     "position-local layers (LM head, final norm, last block's MLP and attention projection), exact "
     "from each step's training backward (smoothed). "
     "Second panel: every parameter, exact per-token backward passes on the opposition's probe tokens "
     "at the scheduled steps. Third (runs that record them): the update-weighted terms of the blocks' "
     "matrices at the same steps, p_ij = g_ij delta_j with delta the real update: Cg = sum_j |sum_i p_ij| / "
     "sum_ij |p_ij| (tokens agree per coordinate), Cug = sum_i |sum_j p_ij| / sum_ij |p_ij| and "
     "C_i_dli = |sum_i sum_j p_ij| / sum_i |sum_j p_ij| (the tokens' predicted changes agree). "
     "Then one panel per run: that mean per layer. Near-total opposition (D_j near 1) after "
     "deceleration is what makes learning zero-sum; expect it weaker for larger models."),
    ('fig5_first_order', ['train_loss_pred', 'train_loss_pre', 'train_loss_post', 'grad_steps'],
     fig_first_order,
     "First-order prediction of each token's loss change along the real AdamW update, "
     "<grad l_i, delta> from one JVP, against the true change of the training batch (post - pre), at "
     "the scheduled steps. Left: every token (a random subset of at most 3000 per run), symlog axes, "
     "black: y = x. Middle and right: correlation and slope per step. Where they are near 1 the "
     "per-token gradients explain the per-token changes, and with them the interference."),
    ('fig6_saturation', ['probe_loss', 'train_counts', 'probe_tokens'], fig_saturation,
     "Saturation per token-frequency bucket (buckets log-spaced in rank of the training counts; "
     "the probe tokens are bucketed by their target). First panel: Zipf plot of the training counts with "
     "the least-squares fit (dashed), its outliers (x) and the bucket edges. Second: best and last "
     "validation loss per bucket (dotted: the training windows', for runs recorded with "
     "--train_probe_seqs). Then: probe loss per bucket over training, one panel per run (no "
     "smoothing; dot: best step; v: plateau onset, the first step after which the smoothed loss falls "
     "by less than 1% per doubling of t for good; ^: rise onset, the best step of the smoothed loss "
     "when the curve ends more than 1% above it), and the same for the training windows where "
     "recorded. Saturation is a bucket whose loss stops falling or rises again: expect it first for "
     "the frequent tokens, and mostly in the long tail for small models; a held-out rise that the "
     "training windows do not share is overfitting, a plateau or rise in both is capacity."),
    ('fig7_basis', ['probe_cos_h_plus', 'probe_cos_h_minus', 'train_counts', 'probe_tokens'], fig_basis,
     "The shared 2D basis: cos(h, grad_h+) against cos(h, grad_h-), averaged over the probe tokens of "
     "each frequency bucket (columns) for each run (rows), coloured by step (at most 150 log-spaced "
     "steps). The red star (-1, +1) is the collapse: h anti-aligned with the attractive part and "
     "aligned with the repulsive part. Look for trajectories heading there as a model saturates."),
    ('fig8_dissent', ['probe_cos_plus_minus', 'probe_norm_plus', 'probe_norm_minus', 'probe_norm_grad',
                      'theta_cos', 'theta_norm_plus', 'theta_norm_minus', 'theta_norm_grad'], fig_dissent,
     "Gradient dissent: the opposition of the attractive (grad+) and repulsive (grad-) parts of the "
     "output-layer gradient. Left of the first three rows: in h, per probe token, averaged over the "
     "probe set (no smoothing). Right: in theta, all parameters as one vector, for the mean loss of "
     "each step's training batch (faint: per step; solid: trailing log moving average); its cosine is "
     "batch-level (per token grad_U+ and grad_U- lie in different rows of U). Rows: cos(grad+, grad-); "
     "the dissent ratio |grad| / (|grad+| + |grad-|) (1: none, 0: the parts cancel); the norms. For one "
     "vector pair the cosine follows from the three norms, and the ratio says how much of the two "
     "parts survives in the gradient. Then, per run, the mean of cos(grad_h+, grad_h-) and of the "
     "ratio in h over the probe tokens of each frequency bucket. Dotted verticals: t_d. Dissent is "
     "cos(grad+, grad-) moving towards -1 and the ratio towards 0 while |grad+| and |grad-| grow and "
     "|grad| does not."),
    ('fig9_geometry', ['head_singular_values', 'hidden_steps', 'probe_anisotropy'], fig_geometry,
     "Geometry of the output layer. Left: singular values of the LM-head matrix U, normalised by "
     "the largest, at the first and last recorded step. Middle: their spectral entropy over training "
     "(a falling entropy means U concentrates in few directions). Right: anisotropy of h, the mean "
     "pairwise cosine of the probe tokens' hidden states (0: isotropic, 1: all parallel)."),
]
# drawn only when a run holds measure.py's records (RUN/paper/), and otherwise not listed as missing
PAPER_FIGURES = [
    ('fig10_paper_protocol', ['paper'], fig_paper_protocol,
     "The published checkpoint protocol (measure.py) at the checkpoints t = 1, 2, 4, ... that "
     "train.py --keep_ckpts log2 kept, on N held-out tokens. Left: gradient opposition, the mean of "
     "D_j over the Transformer blocks' weight matrices (solid, the published headline) and over every "
     "coordinate (dashed), each with its analytic null (dotted). Middle: D of the per-token loss "
     "changes over one simulated AdamW step from theta_t (no clipping) on each of k fresh training "
     "batches, on that batch (solid) and on the held-out tokens (dashed), mean +- sd over the k "
     "batches, with the mean sign-flip null (dotted). Right: D of the held-out loss changes from "
     "theta_t to theta_2t, with its null. D well below its null is structure; D at its null is noise."),
]

# -----------------------------------------------------------------------------
# the report


def md_table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows])


def run_onset(run):
    """The step at which the run's validation loss saturates: the rise onset of the smoothed
    probe-set loss (`onsets`), or None (none, never improved, or nothing recorded)."""
    o = onsets(token_mean(run, 'probe_loss'))
    return None if o is None else o['rise']


def windows(run):
    """(label, first step, end step) of the phases of a run: before t_d, from t_d to the saturation
    onset, after the onset (the phases that the run has; the whole run when it has neither)."""
    S = len(run['rec']['train_loss'])
    t_d = run['fit'].get('t_d') if run['fit']['identifiable'] else None
    onset = run_onset(run) if 'probe_loss' in run['rec'] else None
    cuts = [(0, 'start')] + ([(int(math.ceil(t_d)), 't_d')] if t_d is not None and t_d < S else []) \
        + ([(onset, 'saturation onset')] if onset is not None else []) + [(S, 'end')]
    cuts = sorted(cuts)
    return [(f"{a_name} to {b_name}", a, b) for (a, a_name), (b, b_name) in zip(cuts[:-1], cuts[1:]) if b > a]


def dissent_table(runs):
    """Per run and phase (windows): the mean of the dissent measurements over its recorded steps."""
    rows = []
    for r in runs:
        rec = r['rec']
        j = r['config']['theta_names'].index('model') if 'theta_cos' in rec else None
        cols = [(rec['theta_' + n][:, j] if j is not None and 'theta_' + n in rec else None)
                for n in ['cos', 'norm_plus', 'norm_minus', 'norm_grad']]
        cols += [token_mean(r, 'probe_' + n) if 'probe_' + n in rec else None
                 for n in ['cos_plus_minus', 'norm_plus', 'norm_minus', 'norm_grad']]
        theta = all(j is not None and 'theta_' + n in rec for n in ['norm_plus', 'norm_minus', 'norm_grad'])
        h = all('probe_' + n in rec for n in ['norm_plus', 'norm_minus', 'norm_grad'])
        cols += [theta_dissent_ratio(r) if theta else None,
                 token_mean(r, 'probe_dissent_ratio', probe_dissent_ratio(r)) if h else None]
        if all(v is None or not np.isfinite(v).any() for v in cols):  # e.g. --record none
            continue
        for label, a, b in windows(r):
            cells = []
            for v in cols:
                v = None if v is None else np.asarray(v[a:b], dtype=float)
                cells.append('n/a' if v is None or not np.isfinite(v).any() else f"{np.nanmean(v):.3g}")
            rows.append([r['name'], f"{label} (steps {a}-{b - 1})"] + cells)
    header = ['run', 'phase', 'cos(g+, g-) theta', r'\|g+\| theta', r'\|g-\| theta', r'\|g\| theta',
              'cos(g+, g-) h', r'\|g+\| h', r'\|g-\| h', r'\|g\| h',
              r'\|g\| / (\|g+\| + \|g-\|) theta', r'\|g\| / (\|g+\| + \|g-\|) h']
    return md_table(header, rows) if rows else ''


def basis_table(runs):
    """Per run and bucket: the 2D basis (cos(h, grad_h+), cos(h, grad_h-)) at the bucket's best
    validation loss and at the last recorded step."""
    rows, have = [], []
    for r in runs:
        needs = ['probe_loss', 'probe_cos_h_plus', 'probe_cos_h_minus', 'train_counts', 'probe_tokens']
        if not all(k in r['rec'] for k in needs):
            continue
        have.append(r)
        loss = bucket_series(r, 'probe_loss')
        plus, minus = bucket_series(r, 'probe_cos_h_plus'), bucket_series(r, 'probe_cos_h_minus')
        _, edges, _ = buckets(r)
        cells = []
        for k in range(len(edges) - 1):
            steps, _ = recorded(loss[:, k])
            if not len(steps):
                cells.append('n/a')
                continue
            best = steps[np.nanargmin(loss[steps, k])]
            last = steps[-1]
            cells.append(f"({plus[best, k]:+.2f}, {minus[best, k]:+.2f}) at {best} -> "
                         f"({plus[last, k]:+.2f}, {minus[last, k]:+.2f})")
        rows.append([r['name']] + cells)
    return bucket_md_table(have, rows)


def run_summary(run):
    """Best / last validation loss, saturation onset and probe D before / after t_d of a run."""
    out = dict(best='n/a', last='n/a', onset='n/a', D_before='n/a', D_after='n/a')
    if 'probe_loss' not in run['rec']:
        return out
    steps, loss = recorded(token_mean(run, 'probe_loss'))
    if not len(loss):
        return out
    out.update(best=f"{loss.min():.4f} (step {steps[np.argmin(loss)]})",
               last=f"{loss[-1]:.4f} (step {steps[-1]})")
    o = onsets(token_mean(run, 'probe_loss'))
    out['onset'] = 'never improved' if o['never'] else 'none' if o['rise'] is None else f"step {o['rise']}"
    t_d = run['fit'].get('t_d')
    if t_d is not None and 'probe_D' in run['rec']:
        steps, D = recorded(run['rec']['probe_D'])
        null = np.asarray(run['rec']['probe_D_null'], dtype=float)[steps]
        for key, sel in [('D_before', steps < t_d), ('D_after', steps >= t_d)]:
            out[key] = f"{D[sel].mean():.4f} (null {np.nanmean(null[sel]):.4f})" if sel.any() else 'n/a'
    return out


def opposition_table(runs):
    """Per run: the all-parameter opposition and update-weighted terms at the recorded grad steps
    nearest t_d on either side and at the last one: blocks' and all coordinates' mean D_j, each with
    its null, and Cg, Cug, C_i_dli of the blocks' matrices."""
    rows = []
    for r in runs:
        rec, keys = r['rec'], r['config']['opposition_keys']
        if 'opposition_null' not in rec or 'grad_steps' not in rec:  # recorded before the null existed
            continue
        jb, jm = headline_column(keys, 'model'), keys.index('model')
        mean, null = (np.asarray(rec['opposition_' + k], dtype=float) for k in ('mean', 'null'))
        done = [k for k in range(len(mean)) if np.isfinite(mean[k, jm])]
        if not done:
            continue
        steps = np.asarray(rec['grad_steps'])[done]
        t_d = r['fit'].get('t_d')
        picks = [(steps < t_d).nonzero()[0][-1:], (steps >= t_d).nonzero()[0][:1]] if t_d is not None else []
        for i in sorted({int(k) for pick in picks for k in pick} | {len(done) - 1}):
            k = done[i]
            cells = [f"{mean[k, j]:.4f} (null {null[k, j]:.4f})" for j in (jb, jm)]
            cells += [f"{rec['update_' + term][k, jb]:.3g}" if 'update_' + term in rec else 'n/a'
                      for term in ('Cg', 'Cug', 'C_i_dli')]
            where = '' if t_d is None else (' (before t_d)' if steps[i] < t_d else ' (after t_d)')
            rows.append([r['name'], f"{n_tokens(r, 'opposition'):,}", f"{steps[i]}{where}"] + cells)
    header = ['run', 'N', 'step', "blocks' mean D_j", 'every coordinate', 'Cg (blocks)', 'Cug (blocks)',
              'C_i_dli (blocks)']
    return md_table(header, rows) if rows else ''


def onset_cells(values):
    """Best (step), final loss, plateau onset and rise onset of one bucket's loss series, as table
    cells: best and final as recorded, the onsets of the smoothed curve (`onsets`); a curve that never
    improved on its start says so instead of an onset."""
    o = onsets(values)
    if o is None:
        return ['n/a'] * 4
    steps, v = recorded(values)
    best = f"{v.min():.3f} ({steps[np.argmin(v)]})"
    if o['never']:
        return [best, f"{v[-1]:.3f}", '-', 'never improved']
    step = lambda s: 'none' if s is None else str(s)
    return [best, f"{v[-1]:.3f}", step(o['plateau']), step(o['rise'])]


def bucket_table(runs):
    """Per run and frequency bucket, one row: the number of probe tokens whose target is in the
    bucket, the bucket's best (step) and final validation loss, its plateau and rise onsets (or never
    improved); for runs with the training-window probe the same for the training windows, and which
    of the two curves plateaus or rises (saturation_reading)."""
    rows, trained = [], any(has_train_probe(r) for r in runs)
    for r in runs:
        if not all(k in r['rec'] for k in ['probe_loss', 'train_counts', 'probe_tokens']):
            continue
        held, n_held = bucket_series(r, 'probe_loss'), bucket_tokens(r)
        train = bucket_series(r, 'train_probe_loss') if has_train_probe(r) else None
        n_train = bucket_tokens(r, 'train_probe_loss') if has_train_probe(r) else None
        for k, label in enumerate(bucket_labels(r)):
            row = [r['name'], label, n_held[k]] + onset_cells(held[:, k])
            if train is not None:
                o_held, o_train = onsets(held[:, k]), onsets(train[:, k])
                reading = saturation_reading(o_held, o_train) if o_held and o_train else 'n/a'
                row += [n_train[k]] + onset_cells(train[:, k]) + [reading]
            elif trained:
                row += ['n/a'] * 6
            rows.append(row)
    if not rows:
        return ''
    header = ['run', 'bucket', 'probe tokens', 'best (step)', 'final', 'plateau onset', 'rise onset']
    if trained:
        header += ['training-window tokens', 'train. best (step)', 'train. final', 'train. plateau onset',
                   'train. rise onset', 'which plateaus or rises']
    return md_table(header, rows)


def bucket_dissent_table(runs):
    """Per run and bucket: the mean over the bucket's probe tokens of cos(grad_h+, grad_h-) and of
    |grad_h| / (|grad_h+| + |grad_h-|), at the first and at the last recorded step."""
    rows, have = [], []
    for r in runs:
        needs = ['probe_cos_plus_minus', 'probe_norm_plus', 'probe_norm_minus', 'probe_norm_grad',
                 'train_counts', 'probe_tokens']
        if not all(k in r['rec'] for k in needs):
            continue
        have.append(r)
        cos = bucket_series(r, 'probe_cos_plus_minus')
        ratio = bucket_series(r, 'probe_dissent_ratio', probe_dissent_ratio(r))
        cells = []
        for k in range(cos.shape[1]):
            steps = np.flatnonzero(np.isfinite(cos[:, k]) & np.isfinite(ratio[:, k]))
            if not len(steps):
                cells.append('n/a')
                continue
            a, b = steps[0], steps[-1]
            cells.append(f"cos {cos[a, k]:+.2f} -> {cos[b, k]:+.2f}, "
                         f"ratio {ratio[a, k]:.2f} -> {ratio[b, k]:.2f} (at {a} -> {b})")
        rows.append([r['name']] + cells)
    return bucket_md_table(have, rows)


def bucket_md_table(runs, rows):
    """The table of one row per run and a column per frequency bucket, the columns headed by the
    runs' own ranks (shared_bucket_labels; what they list above the table when vocabularies differ)."""
    if not rows:
        return ''
    labels, what = shared_bucket_labels(runs, sep=r' \| ')
    rows = [row + [''] * (1 + len(labels) - len(row)) for row in rows]
    return (f"Columns: {what}.\n\n" if what else '') + md_table(['run'] + labels, rows)


def figures_for(runs):
    """FIGURES, and PAPER_FIGURES when a run holds measure.py's records."""
    return FIGURES + (PAPER_FIGURES if any('paper' in r['rec'] for r in runs) else [])


def paper_table(runs):
    """Per run with measure.py's records, per N and per checkpoint: the numbers of fig10_paper_protocol,
    with the blocks' share of D_j > 0.99 and their scale-free sqrt(N) (1 - D)."""
    parts = []
    for r in runs:
        for p in r['rec'].get('papers', []):
            s = p['settings']
            blocks, model = paper_column(p, 'blocks'), paper_column(p, 'model')
            scaled = [metrics.scale_free_opposition(v, s['tokens']) for v in blocks[:2]]
            rows = []
            for i, t in enumerate(p['steps']):
                cells = [f"{v[0][i]:.4f} ({v[1][i]:.4f})" for v in (blocks, model)]
                cells += [f"{scaled[0][i]:.2f} ({scaled[1][i]:.2f})", f"{blocks[2][i]:.4f}"]
                for where in ['batch', 'heldout']:
                    D = p[f'loss_D_{where}'][i]
                    null = p[f'loss_D_{where}_null'][i].mean()
                    cells.append(f"{D.mean():.4f} +- {D.std():.4f} ({null:.4f})")
                cells.append(f"{p['loss_D_dtt'][i]:.4f} ({p['loss_D_dtt_null'][i]:.4f})")
                rows.append([int(t)] + cells)
            header = ['step t', 'D_j blocks (null)', 'D_j model (null)', 'sqrt(N)(1 - D_j) blocks (null)',
                      'share D_j > 0.99 blocks', 'dt=1 D batch (null)', 'dt=1 D held-out (null)',
                      'dt=t D held-out (null)']
            parts += [f"{r['name']}: N = {s['tokens']:,} held-out tokens ({s['windows']} windows), "
                      f"k = {s['batches']} fresh batches.", '', md_table(header, rows), '']
    return '\n'.join(parts)


def matched_steps_table(runs):
    """The runs side by side at the checkpoints that all of them measured at the same N: the blocks'
    mean D_j (its null) and sqrt(N)(1 - D_j), marked before or after each run's t_d. '' when fewer
    than two runs share an N."""
    by_N = {}
    for r in runs:
        for p in r['rec'].get('papers', []):
            by_N.setdefault(p['settings']['tokens'], []).append((r, p))
    parts = []
    for N, members in sorted(by_N.items()):
        if len(members) < 2:
            continue
        steps = sorted(set.intersection(*[set(int(t) for t in p['steps']) for _, p in members]))
        rows = []
        for t in steps:
            cells = []
            for r, p in members:
                i = [int(s) for s in p['steps']].index(t)
                mean, null, _ = paper_column(p, 'blocks')
                t_d = r['fit'].get('t_d')
                side = '' if t_d is None else ' <' if t < t_d else ' >'
                cells.append(f"{mean[i]:.4f} ({null[i]:.4f}), "
                             f"{metrics.scale_free_opposition(mean[i], N):.2f}{side}")
            rows.append([t] + cells)
        parts += [f"N = {N:,} held-out tokens.", '',
                  md_table(['step t'] + [r['name'] for r, _ in members], rows), '']
    return '\n'.join(parts)


def report_text(runs, drawn, notes, fmt):
    parts = ['# Training dynamics report', '',
             f"Runs (ordered and coloured by parameter count): {', '.join(r['label'] for r in runs)}.", '']
    parts += ['## Deceleration and validation loss', '',
              "t_d, L_d, r_d from bnsl.py (1-break BNSL, its unbiased default) with 95% block-bootstrap "
              "intervals, and t_d in the published convention (the form compared with the smoothed curve "
              "as it is, which the smoothing's lag delays); validation loss = mean probe-set loss; "
              "saturation onset = the rise onset "
              "(as per bucket below; never improved: never below its value at step 0); D = mean "
              "interference of per-token probe-loss changes (step t to t+1) before and after t_d, over "
              "the N probe tokens, beside the mean of its sign-flip null at the same N.", '']
    rows, scale = [], []
    for r in runs:
        fit, s = r['fit'], run_summary(r)
        cfg, t_d, L_d = r['config'], fit.get('t_d'), fit.get('L_d')
        batch = cfg['batch_size'] * cfg['block_size']
        H1 = (float(metrics.unigram_entropy(torch.from_numpy(np.array(r['rec']['train_counts']))))
              if 'train_counts' in r['rec'] else None)
        scale.append([r['name'], f"{cfg['n_params']:,}", cfg['warmup_iters'], f"{cfg['learning_rate']:.3g}",
                      'n/a' if t_d is None else f"{t_d * batch:,.0f}",
                      'n/a' if t_d is None else f"{t_d * batch / cfg['n_params']:.3g}",
                      'n/a' if t_d is None or not cfg['warmup_iters'] else f"{t_d / cfg['warmup_iters']:.2f}",
                      'n/a' if H1 is None else f"{H1:.4f}",
                      'n/a' if L_d is None or H1 is None else f"{L_d / H1:.3f}"])
        rows.append([r['name'], f"{r['config']['n_params']:,}", len(recorded(r['rec']['train_loss'])[0]),
                     ci_text(fit, 't_d', '{:.4g}'), ci_text(fit.get('published') or {}, 't_d', '{:.4g}'),
                     ci_text(fit, 'L_d', '{:.4g}'),
                     ci_text(fit, 'r_d', '{:.3g}'),
                     'n/a' if fit.get('rsle') is None else f"{fit['rsle']:.3g}",
                     'yes' if fit['identifiable'] else f"no: {fit['reason']}",
                     s['best'], s['last'], s['onset'], f"{n_tokens(r, 'probe'):,}", s['D_before'],
                     s['D_after']])
    header = ['run', 'params', 'steps', 't_d', 't_d published', 'L_d', 'r_d', 'RSLE', 'identifiable',
              'best val. loss',
              'last val. loss', 'saturation onset', 'probe N', 'D before t_d', 'D after t_d']
    parts += [md_table(header, rows), '']
    parts += ["The break in other units: t_d in training tokens (t_d x batch tokens) and in tokens per "
              "parameter; t_d / warmup steps (the published runs: about 2.3 to 3); L_d against H_1, the "
              "entropy of the training split's unigram distribution (metrics.unigram_entropy), the loss "
              "of a model that ignores the context.", '',
              md_table(['run', 'params', 'warmup', 'peak lr', 't_d tokens', 't_d tokens / param',
                        't_d / warmup', 'H_1 (nats)', 'L_d / H_1'], scale), '']
    table = opposition_table(runs)
    if table:
        parts += ['## Gradient opposition', '',
                  "Exact, between the N probe tokens of the all-parameter opposition, at the recorded steps "
                  "nearest t_d on either side and at the last one: the mean over coordinates of D_j = 1 - "
                  "|sum_i g_ij| / sum_i |g_ij| for the Transformer blocks' weight matrices (the published "
                  "headline) and for every coordinate, each beside its null (the mean of D_j's value under "
                  "random signs at the same N); the update-weighted terms of the blocks' matrices, "
                  "p_ij = g_ij delta_j with delta the real update of that step (1 = agreement).", '',
                  table, '']
    table = bucket_table(runs)
    if table:
        parts += ['## Saturation per token-frequency bucket', '',
                  "The loss of the probe tokens whose target is in the bucket (probe tokens: how many): "
                  "its best (at that step) and final value as recorded; plateau onset: the first step after "
                  "which the smoothed loss falls by less than 1% per doubling of t and never again by "
                  "more (metrics.plateau_onset; none: still falling); rise onset: the step of the best "
                  "smoothed loss when the curve ends more than 1% above it (metrics.rise_onset); never "
                  "improved: the smoothed loss never went below its value at step 0. Runs recorded with "
                  "--train_probe_seqs show the same for their fixed training windows, and which curve "
                  "plateaus or rises: a held-out rise that the training windows do not share is "
                  "overfitting, a plateau or rise in both is capacity saturation, a held-out plateau "
                  "while the training windows still improve a growing gap.", '',
                  table, '']
    table = dissent_table(runs)
    if table:
        parts += ['## Dissent by phase', '',
                  "Means over the recorded steps of each phase (t_d from the BNSL fit, the saturation onset "
                  "as above; a phase is missing when the run has no identifiable t_d or no onset; under "
                  "--record light the theta columns hold only the log-scheduled steps). "
                  "theta: all parameters as one vector, gradient of the training batch's mean loss, "
                  "g+ the attractive part (through grad_z+), g- = g - g+. h: per probe token, averaged "
                  "over the probe set. The dissent ratio |g| / (|g+| + |g-|): 1 no dissent, 0 "
                  "total (in h the mean of each token's ratio).", '', table, '']
    table = bucket_dissent_table(runs)
    if table:
        parts += ['## Dissent in h per frequency bucket', '',
                  "cos(grad_h+, grad_h-) and the dissent ratio |grad_h| / (|grad_h+| + |grad_h-|), each "
                  "averaged over the probe tokens of the bucket, at the first recorded step -> at the last.",
                  '', table, '']
    table = basis_table(runs)
    if table:
        parts += ['## The 2D basis per frequency bucket', '',
                  "(cos(h, grad_h+), cos(h, grad_h-)) averaged over the probe tokens of the bucket, at the "
                  "step of the bucket's best validation loss -> at the last recorded step (the final model). "
                  "The collapse point is (-1, +1).", '',
                  table, '']
    table = paper_table(runs)
    if table:
        parts += ['## The published checkpoint protocol (measure.py)', '',
                  "At each kept checkpoint t (train.py --keep_ckpts log2): gradient opposition, the mean of "
                  "D_j over the Transformer blocks' weight matrices and over every coordinate, between the "
                  "N held-out tokens; D of per-token loss changes over one simulated AdamW step (dt = 1), "
                  "mean +- sd over the k fresh batches, on the batch and on the held-out tokens; D of the "
                  "held-out changes from t to 2t (dt = t; nan for the last). In brackets: the null "
                  "(analytic for D_j, sign-flip for the loss D). nan: not measured. sqrt(N)(1 - D_j): the "
                  "blocks' mean on a scale on which its null is the same at every N "
                  "(metrics.scale_free_opposition); share: the blocks' coordinates with D_j > 0.99.", '',
                  table]
    table = matched_steps_table(runs)
    if table:
        parts += ['## The runs at matched checkpoints (measure.py)', '',
                  "The blocks' mean D_j (its null) and sqrt(N)(1 - D_j) at the checkpoints that every run "
                  "measured at the same N; < before the run's t_d, > at or after it. More opposition "
                  "than chance: D_j above its null, sqrt(N)(1 - D_j) below the null's.", '', table]
    parts += ['## Figures', '']
    for name, _, _, caption in figures_for(runs):
        if name in drawn:
            parts += [f"### {name}", '', f"![{name}]({name}.{fmt})", '', caption, '']
    if notes:
        parts += ['## Not plotted', ''] + [f"- {n}" for n in notes] + ['']
    return '\n'.join(parts)


def save(path, write):
    """Write one of plot.py's own files through a new temporary file renamed over `path`: what is
    there is replaced, never written through (a link there is replaced, its target kept), and no
    half-written file is left. Its folder is made on the first write (none is left empty)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(tmp, 'xb')  # 'x': a new file, never one already there
    except OSError as e:
        fail(f"{path}: cannot write it ({e.strerror or e})")
    try:
        with f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        os.remove(tmp)
        if isinstance(e, OSError):
            fail(f"{path}: cannot write it ({e.strerror or e})")
        raise


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = fail
    p.add_argument('paths', nargs='+', help='run directories, or folders holding run directories')
    p.add_argument('--out', default=None,
                   help='folder for the figures and report.md (default: FIRST_PATH/figures)')
    p.add_argument('--format', nargs='+', default=['png'], choices=['png', 'pdf'],
                   help='file format(s) of the figures')
    p.add_argument('--min_step', type=float, default=bnsl.MIN_STEP,
                   help='BNSL fit: drop the transient steps t <= min_step')
    p.add_argument('--dpi', type=int, default=110, help='resolution of PNG figures')
    args = p.parse_args(argv)
    try:
        runs = [load_run(r) for r in find_runs(args.paths)]
    except ValueError as e:
        fail(e)
    runs.sort(key=lambda r: (r['config']['n_params'], r['path']))
    colors = plt.cm.viridis(np.linspace(0.05, 0.85, len(runs))) if len(runs) > 1 else [plt.cm.viridis(0.3)]
    for r, c in zip(runs, colors):
        r['color'] = c
        r['fit'] = fit_run(r, args.min_step)
    out = args.out or os.path.join(args.paths[0], 'figures')
    # plot.py replaces its own files there and nothing else: refuse before drawing, not halfway
    if os.path.lexists(out) and not os.path.isdir(out):
        fail(f"--out {out}: exists and is not a folder")
    names = [name for name, *_ in FIGURES + PAPER_FIGURES]
    for file in [f"{name}.{fmt}" for name in names for fmt in args.format] + ['report.md']:
        if os.path.isdir(os.path.join(out, file)):
            fail(f"{os.path.join(out, file)}: a folder where plot.py writes a file; "
                 "move it or choose another --out")
    drawn, notes = [], []
    for r in runs:
        if r['config'].get('record') != 'all':
            notes.append(f"{r['name']} was recorded with --record {r['config'].get('record')}: "
                         "what that level does not record is left out")
        if r['missing']:
            notes.append(f"{r['name']} lacks {', '.join(r['missing'])} "
                         "(listed in its config.json, not in the directory)")
    for name, needs, draw, _ in figures_for(runs):
        have = [r for r in runs if all(k in r['rec'] for k in needs)]
        lacking = '; '.join(f"{r['name']} lacks {', '.join(k for k in needs if k not in r['rec'])}"
                            for r in runs if r not in have)
        if not have:
            notes.append(f"{name}: not drawn ({lacking})")
            continue
        if lacking:
            notes.append(f"{name}: leaves out runs ({lacking})")
        with np.errstate(all='ignore'), warnings.catch_warnings():
            # a log axis of a panel with nothing to draw yet: finish() makes it linear and says so
            warnings.filterwarnings('ignore', 'Data has no positive values')
            fig = draw(have)
            shown = finish(fig, have)
        if not shown:
            notes.append(f"{name}: not drawn (nothing recorded that it can draw: too few steps, or none "
                         "after step 0, which a log step axis cannot show)")
            plt.close(fig)
            continue
        for fmt in args.format:
            save(os.path.join(out, f"{name}.{fmt}"), lambda f: fig.savefig(f, format=fmt, dpi=args.dpi))
        plt.close(fig)
        drawn.append(name)
    if not drawn:
        fail(f"nothing to plot: {', '.join(r['name'] for r in runs)} recorded nothing that a figure can draw "
             "(too few steps, or none after step 0, which a log step axis cannot show)")
    text = report_text(runs, drawn, notes, args.format[0])
    save(os.path.join(out, 'report.md'), lambda f: f.write(text.encode()))
    print(f"{len(drawn)} figures and report.md for {len(runs)} run{'s' if len(runs) > 1 else ''} in {out}")
    for n in notes:
        print(f"  note: {n}")


if __name__ == '__main__':
    main()
