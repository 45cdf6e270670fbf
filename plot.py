"""
Every figure of both results, and a report, from the run folders of train.py (and measure.py).

    python plot.py out/                      # every run under out/, out/ itself included
    python plot.py out/L2 out/L4 --out figs --format png pdf

Figures and report.md go to FIRST_PATH/figures/ (or --out DIR); docs/figures.md says what each shows.
A run still training is drawn as far as it is recorded; a figure leaves out the runs that lack its
records, and the report says so. Each quantity comes from the function of metrics.py or bnsl.py named
after it. A panel for a new record is one entry in FIGURES; a report section, one entry in REPORT.
"""

import io
import math
import os
import re
import textwrap
import warnings

import numpy as np
import torch
import matplotlib
matplotlib.use('Agg')  # files only, no screen
import matplotlib.pyplot as plt
from matplotlib import ticker
from matplotlib.collections import PathCollection
from matplotlib.lines import Line2D

import bnsl
import metrics
from runs import checked, fail, foreign, nonnegative, parser, read_json, remove_owned, write_atomic

plt.rcParams.update({'axes.formatter.min_exponent': 7,  # log ticks as plain numbers (8.3, not 8.3x10^0)
                     'lines.markersize': 3, 'axes.titlesize': 8})
N_BUCKETS = 6  # token-frequency buckets, log-spaced in rank (metrics.frequency_buckets)
DT_LONG = 10  # the longer interval of the probe-set interference, in steps (besides dt = 1)
MAX_SCATTER = 3000  # points per run in the first-order scatter
ONCE = ['train_counts', 'probe_tokens', 'hidden_steps', 'grad_steps', 'train_probe_tokens']  # saved once
GUIDE = 'guide'  # gid of what is not data: reference lines (y = x, the collapse star, contours), t_d
# what plot.py reads in config.json and in measure.py's folders; a file without them is older
CONFIG_KEYS = ['records', 'n_params', 'n_layer', 'n_embd', 'record', 'theta_names', 'local_opposition_keys',
               'opposition_keys', 'batch_tokens', 'probe_tokens', 'opposition_tokens']
PAPER_KEYS = ['steps', 'tokens', 'windows', 'batches', 'opposition_keys']
PAPER_RECORDS = ['steps', 'loss_D_batch', 'loss_D_batch_null', 'loss_D_heldout', 'loss_D_heldout_null',
                 'loss_D_dtt', 'loss_D_dtt_null', 'opposition_mean', 'opposition_null',
                 'opposition_near_total', 'update_Cg', 'update_Cug', 'update_C_i_dli']
OLDER = "{}: made by an older version of {}; rerun it"
# settings of config.json (the keys before n_params) that say where or how fast a run went, not what it is
NOT_WHAT = {'out_dir', 'cache_dir', 'device', 'compile', 'threads', 'log_interval', 'log_seconds',
            'ckpt_interval', 'keep_ckpts', 'resume', 'overwrite', 'n_layer', 'n_embd'}

# -----------------------------------------------------------------------------
# reading runs


def shown(text):
    """A file name as text: bytes that are not UTF-8 shown escaped ('\\xff')."""
    return str(text).encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')


def find_runs(paths):
    """The run folders (holding config.json) at or below PATHs; links never followed, each folder once."""
    found = {}
    for path in paths:
        if not os.path.isdir(path):
            fail(f"{path}: no such directory")
        below = sorted(folder for folder, _, files in os.walk(path) if 'config.json' in files)
        if not below:
            fail(f"{path}: no run directories (folders with config.json) in it")
        for folder in below:
            found.setdefault(os.path.realpath(folder), os.path.normpath(folder))
    return list(found.values())


def load_record(path, spec=None):
    """One .npy record, memory-mapped; its [shape, dtype] checked against config.json's spec."""
    try:
        a = np.load(path, mmap_mode='r', allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        fail(f"{path}: corrupt or truncated record ({e})")
    if spec and (list(a.shape) != list(spec[0]) or a.dtype.name != spec[1]):
        fail(f"{path}: shape {list(a.shape)} {a.dtype.name}, config.json says {spec[0]} {spec[1]}")
    return a


def load_run(path):
    """A run: path, name, config, rec (records; measure.py's as 'papers', and 'paper' of most rows), missing."""
    config = read_json(path, 'config.json', 'train.py')
    if not isinstance(config, dict) or not isinstance(config.get('records'), dict):
        fail(f"{os.path.join(path, 'config.json')}: not a config.json written by train.py")
    if any(k not in config for k in CONFIG_KEYS):
        fail(OLDER.format(path, 'train.py'))
    rec, missing, papers = {}, [], []
    for name, spec in list(config['records'].items()) + [(n, None) for n in ONCE]:
        if os.path.isfile(os.path.join(path, name + '.npy')):
            rec[name] = load_record(os.path.join(path, name + '.npy'), spec)
        elif spec is not None or name == 'train_counts':
            missing.append(name)
    if 'train_loss' not in rec:
        fail(f"{path}: train_loss.npy is missing (the one record every figure needs)")
    for sub in [d for d in sorted(os.listdir(path)) if re.fullmatch(r'paper(_N\d+)?', d) and
                os.path.isfile(os.path.join(path, d, 'progress.json'))]:  # one measure.py finished a row in
        settings, folder = read_json(path, os.path.join(sub, 'progress.json'), 'measure.py'), os.path.join(path, sub)
        if not isinstance(settings, dict) or any(k not in settings for k in PAPER_KEYS) or \
                any(not os.path.isfile(os.path.join(folder, n + '.npy')) for n in PAPER_RECORDS):
            fail(OLDER.format(folder, 'measure.py'))
        n = len(settings['steps'])
        paper = {k: np.asarray(load_record(os.path.join(folder, k + '.npy'))[:n], float) for k in PAPER_RECORDS}
        if any(len(a) < n for a in paper.values()):
            fail(f"{folder}: fewer rows than progress.json lists")
        papers.append(dict({k: v[np.argsort(paper['steps'])] for k, v in paper.items()}, settings=settings))
    if papers:  # fewest tokens first
        rec['papers'] = sorted(papers, key=lambda p: p['settings']['tokens'])
        rec['paper'] = max(rec['papers'], key=lambda p: (len(p['steps']), p['settings']['tokens']))
    return dict(path=path, name=shown(os.path.basename(os.path.abspath(path))), config=config, rec=rec,
                missing=missing, label=f"{config['n_layer']}L/{config['n_embd']}d ({config['n_params'] / 1e6:.2g}M)")


def label_runs(runs):
    """Each run's label: its size, the settings in which the runs differ, and its name where those agree."""
    settings = [list(r['config'])[:list(r['config']).index('n_params')] for r in runs]
    differ = [k for k in dict.fromkeys(sum(settings, [])) if k not in NOT_WHAT and
              len({repr(r['config'].get(k)) for r in runs}) > 1]
    for r in runs:
        r['label'] += ''.join(f", {k}={r['config'].get(k)}" for k in differ)
    same = [sum(q['label'] == r['label'] for q in runs) > 1 for r in runs]
    for r, named in zip(runs, same):
        r['label'] += f" [{r['name']}]" if named else ''


# -----------------------------------------------------------------------------
# what a line draws: records, measure.py's records and quantities computed from them


def recorded(values, steps=None):
    """(steps, values) of the rows recorded so far: NaN rows (not yet written) dropped."""
    values = np.asarray(values, dtype=float)
    steps = np.arange(len(values)) if steps is None else np.asarray(steps)[:len(values)]
    return steps[np.isfinite(values)], values[np.isfinite(values)]


def series(values, steps=None, smoothed=False):
    """(steps, values) after step 0 for a log axis; `smoothed` (bnsl.log_moving_average) over consecutive steps."""
    steps, values = recorded(values, steps)
    if smoothed and len(values) and np.all(np.diff(steps) == 1):
        values = bnsl.log_moving_average(values)
    return steps[steps > 0], values[steps > 0]


def token_mean(run, name, values=None):
    """(rows,): a per-token record (rows, P, T), or `values` of that shape, averaged over the tokens."""
    a = np.asarray(run['rec'][name] if values is None else values, dtype=np.float64)
    return np.nanmean(a.reshape(len(a), -1), axis=1)  # NaN for a row not yet recorded


def buckets(run, name='probe_loss'):
    """(bucket of each token id, edges, (rows, T) targets of record `name`): metrics.frequency_buckets."""
    if 'buckets' not in run:
        counts = torch.from_numpy(np.array(run['rec']['train_counts']))
        run['buckets'] = metrics.frequency_buckets(counts, N_BUCKETS)
    tokens = run['rec']['train_probe_tokens' if name.startswith('train_probe') else 'probe_tokens']
    return *run['buckets'], torch.from_numpy(np.asarray(tokens)[:, 1:].astype(np.int64))


def bucket_series(run, name, values=None):
    """(rows, n_buckets): a per-token record (or its `values`) per bucket of targets (metrics.bucket_mean)."""
    cache = run.setdefault('bucket_series', {})
    if name not in cache:
        v = torch.from_numpy(np.asarray(run['rec'][name] if values is None else values, dtype=np.float64))
        bucket, edges, targets = buckets(run, name)
        cache[name] = metrics.bucket_mean(v, targets, bucket, len(edges) - 1).numpy()
    return cache[name]


def bucket_labels(run):
    """A run's own bucket labels, by rank counted from 1 (its vocabulary and counts set the edges)."""
    edges = buckets(run)[1]
    return [f"ranks {int(a) + 1}-{int(b)}" for a, b in zip(edges[:-1], edges[1:])]


def shared_bucket_labels(runs, sep=' | '):
    """(labels, what they list or None) of a column per bucket: each run's own ranks, `sep` between."""
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


def columns(run, name, key):
    """The index of column `key` of a record, or 'layers': those of metrics.opposition_group's layers."""
    keys = run['rec']['paper']['settings']['opposition_keys'] if name.startswith('paper.') else \
        run['config']['theta_names' if name.startswith('theta_') else
                      'local_opposition_keys' if name.startswith('local_') else 'opposition_keys']
    if key != 'layers':
        return keys.index(key)
    groups = list(dict.fromkeys(metrics.opposition_group(k) for k in keys if k.endswith(('.weight', '.bias'))))
    return [keys.index(g) for g in groups]


def dissent_ratio(run, prefix):
    """metrics.dissent_ratio per probe token ('probe_', (S + 1, P, T)), or of all parameters ('theta_', (S,))."""
    norms = [np.asarray(run['rec'][prefix + n], float) for n in ('norm_grad', 'norm_plus', 'norm_minus')]
    if prefix == 'theta_':
        norms = [np.ascontiguousarray(a[:, columns(run, 'theta_', 'model')]) for a in norms]
    return metrics.dissent_ratio(*map(torch.from_numpy, norms)).numpy()


def probe_interference(run, null):
    """D of the per-token probe-loss changes over DT_LONG steps (row t: t to t + dt), or its analytic null."""
    loss = torch.from_numpy(np.asarray(run['rec']['probe_loss'], dtype=np.float64))
    change = (loss[DT_LONG:] - loss[:-DT_LONG]).flatten(1)  # (S + 1 - dt, P T)
    if null:
        return metrics.expected_null_interference(change.abs().sum(-1), change.pow(2).sum(-1)).numpy()
    return metrics.destructive_interference(change).numpy()


def first_order(run):
    """Steps, pred and true per-token loss changes (B T,), corr and slope (metrics.first_order_agreement)."""
    if 'first_order' not in run:
        rec, out = run['rec'], dict(steps=[], pred=[], true=[], corr=[], slope=[])
        for k, s in enumerate(rec['grad_steps'][:len(rec['train_loss_pred'])]):
            pred, post, pre = (np.asarray(a, dtype=float).ravel() for a in
                               (rec['train_loss_pred'][k], rec['train_loss_post'][s], rec['train_loss_pre'][s]))
            true = post - pre
            if np.isfinite(pred).all() and np.isfinite(true).all():
                agree = metrics.first_order_agreement(torch.from_numpy(pred), torch.from_numpy(true))
                for key, v in zip(out, [int(s), pred, true, float(agree['corr']), float(agree['slope'])]):
                    out[key].append(v)
        run['first_order'] = out
    return run['first_order']


# quantities computed from records, by name: run -> (steps, or None for 0, 1, ..., values)
DERIVED = {
    'probe_dissent_ratio': lambda r: (None, dissent_ratio(r, 'probe_')),
    'theta_dissent_ratio': lambda r: (None, dissent_ratio(r, 'theta_')),
    'probe_D_long': lambda r: (None, probe_interference(r, null=False)),
    'probe_D_long_null': lambda r: (None, probe_interference(r, null=True)),
    'spectral_entropy': lambda r: (r['rec']['hidden_steps'], [float(metrics.spectral_entropy(torch.from_numpy(
        np.asarray(s, dtype=float)))) for s in r['rec']['head_singular_values']]),  # NaN: not recorded
    'hidden_norm': lambda r: (r['rec']['hidden_steps'], np.linalg.norm(r['rec']['probe_hidden'], axis=-1)),
    'first_order_corr': lambda r: (first_order(r)['steps'], first_order(r)['corr']),
    'first_order_slope': lambda r: (first_order(r)['steps'], first_order(r)['slope']),
}


def line_data(run, name, col):
    """(steps, values) of a record, 'paper.NAME' or DERIVED; col: a column, 'layers', 'tokens', 'buckets', 'k'."""
    if name in DERIVED:
        cache = run.setdefault('derived', {})
        steps, v = cache[name] if name in cache else cache.setdefault(name, DERIVED[name](run))
    elif name.startswith('paper.'):
        steps, v = run['rec']['paper']['steps'], run['rec']['paper'][name[6:]]
    else:  # a row per step, or per grad step
        v = run['rec'][name]
        steps = run['rec']['grad_steps'] if name.startswith(('opposition_', 'update_')) else None
    steps = np.arange(len(v)) if steps is None else np.asarray(steps, dtype=int)[:len(v)]
    if col in ('tokens', 'buckets'):
        v = (token_mean if col == 'tokens' else bucket_series)(run, name, v)
    elif col == 'k mean':
        v = np.asarray(v).mean(1)
    elif col not in (None, 'k'):
        v = np.asarray(v)[:, columns(run, name, col)]
    return steps, np.asarray(v, dtype=float)


def fit_run(run, min_step):
    """bnsl.fit_curve of the run's training loss, or no fit and the reason (too few points)."""
    try:
        return bnsl.fit_curve(*recorded(run['rec']['train_loss']), min_step=min_step)
    except ValueError as e:
        return dict(identifiable=False, fitted=False, reason=str(e), published=None)


def interval(fit, key):
    """The 95% interval of a fitted quantity: the block bootstrap's, else the covariance's, or None."""
    return fit.get(key + '_ci_boot') or fit.get(key + '_ci_cov')


# -----------------------------------------------------------------------------
# figures: a table of panels, one function that draws a time-series panel


def draw_line(ax, run, name, col, smooth, fmt, *_):
    """One run's line: 'raw', 'smooth', or 'both' (faint under smoothed); a colour per bucket or layer."""
    steps, v = line_data(run, name, col)
    if col == 'k':  # measure.py's k batches: their mean +- sd
        ok = np.isfinite(v).all(1) & (steps > 0)
        ax.errorbar(steps[ok], v[ok].mean(1), yerr=v[ok].std(1), fmt=fmt, color=run['color'], capsize=2)
        return
    lines = [(run['color'], None, v)]
    if v.ndim == 2:
        labels = bucket_labels(run) if col == 'buckets' else [run['config']['opposition_keys'][j]
                                                              for j in columns(run, name, 'layers')]
        lines = zip(plt.cm.plasma(np.linspace(0, 0.9, len(labels))), labels, v.T)
    for color, label, values in lines:
        if smooth == 'both':
            ax.plot(*series(values, steps), color=color, alpha=0.25, lw=0.5)
        x, y = series(values, steps, smoothed=smooth != 'raw')
        if len(y) or label is None:
            ax.plot(x, y, fmt, color=color, label=label)


def draw_panel(ax, runs, panel, everyone):
    """One panel of FIGURES: its own 'draw' or each run's lines and labelled t_d; legend; title fields."""
    if 'draw' in panel:
        panel['draw'](ax, runs)
    for r in runs if 'lines' in panel else []:
        for line in panel['lines']:
            draw_line(ax, r, *line)
        if 'hline' in panel:
            ax.axhline(panel['hline'](r), color=r['color'], lw=0.6, ls='--')
        if r['fit'].get('t_d') is not None:
            ax.axvline(r['fit']['t_d'], color=r['color'], ls=':', lw=1, gid='t_d')
            ax.text(r['fit']['t_d'], 0.98, 't_d ', color=r['color'], fontsize=6, rotation=90, ha='right',
                    va='top', transform=ax.get_xaxis_transform(), gid='t_d')
    if 'lines' in panel:
        ax.set(xscale='log', xlabel=panel.get('x', 'step t') + ' (log)')
    if panel.get('log'):
        ax.set_yscale('log')
    keys = [Line2D([], [], color='0.3', ls=f.lstrip('o.sxk') or 'None', marker=f[0] if f[0] in 'o.sx' else 'None',
                   mfc='none' if f[0] == 's' else None, label=label)  # FIGURES' styles in grey: 'o--', dots by dashes
            for f, label in panel.get('keys', []) + [line[3:] for line in panel.get('lines', []) if len(line) > 4]]
    if handles := [line for line in ax.lines if line.get_label()[0] != '_'] + keys:
        ax.legend(handles=handles, fontsize=6, ncol=2)
    n = lambda what: 'N = ' + '/'.join(f"{v:,}" for v in dict.fromkeys(r['config'][what] for r in everyone))
    papers = [r['rec']['paper']['settings'] for r in everyone if 'paper' in r['rec']]
    ax.set(ylabel=panel.get('y', ''), title=panel['title'].format(
        run=runs[0]['label'] if runs else '', N_batch=n('batch_tokens'), N_probe=n('probe_tokens'),
        N_opposition=n('opposition_tokens'), N_paper=', '.join(sorted({f"{s['tokens']:,}" for s in papers})),
        k_paper=', '.join(sorted({str(s['batches']) for s in papers}))))


def loss_panel(ax, runs):
    """fig1: the training loss, its 1-break BNSL fit, the fit's two power laws and (t_d, L_d)."""
    for r in runs:
        draw_line(ax, r, 'train_loss', None, 'both', '-')
        fit, c, published = r['fit'], r['color'], r['fit'].get('published') or {}
        if fit.get('t_d') is None:
            continue
        t = np.geomspace(fit['t_range'][0], fit['t_range'][1], 200)
        ax.plot(t, bnsl.bnsl_1break(t, fit['b'], fit['c0'], fit['c1'], fit['t_d'], fit['f1']), 'k--', lw=1)
        pre, post = t[t <= fit['t_d'] * 3], t[t >= fit['t_d'] / 3]
        ax.plot(pre, bnsl.loss_at_break(fit['b'], fit['c0'], pre), color=c, lw=1, ls=':')  # b t^-c0
        ax.plot(post, bnsl.post_break_loss(post, fit['L_d'], fit['t_d'], fit['r_d']), color=c, lw=1, ls=':')
        ax.plot([fit['t_d']], [fit['L_d']], 'o', color=c, mec='k', ms=7, zorder=5)
        if published.get('t_d') is not None:  # the published convention's break, lagged by smoothing
            ax.plot([published['t_d']], [published['L_d']], 's', mfc='none', mec=c, mew=1.5, ms=9, zorder=5)
    ax.set(xscale='log', xlabel='step t (log)')


def size_panel(ax, runs, key):
    """fig2: t_d, L_d or r_d against size with 95% intervals, or best and last validation loss."""
    for r in runs:
        fit, n, c = r['fit'], r['config']['n_params'], r['color']
        _, probe = recorded(token_mean(r, 'probe_loss')) if 'probe_loss' in r['rec'] else (None, [])
        if key == 'validation' and len(probe):
            ax.plot([n], [probe.min()], 'o', color=c)
            ax.plot([n], [probe[-1]], 'x', color=c, ms=8)
        elif key != 'validation' and fit.get(key) is not None:
            ci = interval(fit, key)
            ci = [fit[key]] * 2 if ci is None or None in ci else ci  # a percentile interval may exclude its
            yerr = [[max(fit[key] - ci[0], 0)], [max(ci[1] - fit[key], 0)]]  # estimate: clip the bars at it
            ax.errorbar([n], [fit[key]], yerr=yerr, fmt='o', color=c, capsize=3)
    unfit = [r['name'] for r in runs if r['fit'].get(key) is None and r['fit'].get('fitted', True)]
    short = [r['name'] for r in runs if not r['fit'].get('fitted', True)]
    for names, what, y, gid in [(unfit, 'no identifiable break', 0.02, None),  # a result of the fit
                                (short, 'too few steps to fit', 0.98, GUIDE)]:  # no result: why
        if names and key != 'validation':  # outside the layout: long names must not squeeze panels
            ax.text(0.02, y, textwrap.fill(f"{what}: {', '.join(names)}", 40), fontsize=7, transform=ax.transAxes,
                    va='bottom' if y < 0.5 else 'top', in_layout=False, clip_on=True, gid=gid)
    ax.set(xscale='log', xlabel='parameters (log)')


def change_histogram(ax, runs):
    """fig3: the first run's x_i = l_i(t+1) - l_i(t) on 40 bins, before t_d / 2 and at the last step."""
    loss = np.asarray(runs[0]['rec']['probe_loss'], dtype=np.float64).reshape(len(runs[0]['rec']['probe_loss']), -1)
    x, t_d = loss[1:] - loss[:-1], runs[0]['fit'].get('t_d')  # (S, P T)
    done = np.flatnonzero(np.isfinite(x).all(1))
    early = done[done < t_d / 2] if t_d is not None else done[:0]
    steps = [early[-1] if len(early) else done[0], done[-1]] if len(done) else []
    lim = max([np.abs(x[t]).max() for t in steps] + [1e-12])
    edges = np.linspace(-lim, lim, 41)
    for t, color in zip(steps, ['0.6', runs[0]['color']]):
        ax.plot((edges[:-1] + edges[1:]) / 2, np.histogram(x[t], edges)[0], drawstyle='steps-mid', color=color,
                label=f"t = {t}")
    ax.axvline(0, color='k', lw=0.6, gid=GUIDE)
    ax.set_xlabel('x_i = l_i(t+1) - l_i(t), probe tokens (nats)')


def dm_plane(ax, runs):
    """fig3: every probe step in the D-M plane, over contours of |mean Delta l| = (1 - D) M."""
    for r in runs:
        D, M = (np.asarray(r['rec']['probe_' + k], dtype=float) for k in ('D', 'M'))  # (S,) each
        ok = np.isfinite(D) & np.isfinite(M) & (M > 0)  # D is NaN (0/0) when no probe loss changed
        ax.scatter(D[ok], M[ok], s=3, color=r['color'], alpha=0.5)
    ax.set(xlim=(0, 1), xlabel='D (probe set, step t to t+1)')
    if ax.collections and np.isfinite(ax.dataLim.intervaly).all():  # contours around the points
        ax.set_yscale('log')
        lo, hi = ax.get_ylim()
        for level in 10.0 ** np.arange(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
            D = np.linspace(0, 0.999, 300)
            ax.plot(D, level / (1 - D), color='0.6', lw=0.6, gid=GUIDE)
            ax.text(0.01, level * 1.05, f"|mean dl| = {level:.0e}", fontsize=6, color='0.4', clip_on=True, gid=GUIDE)
        ax.set_ylim(lo, hi)


def first_order_scatter(ax, runs):
    """fig5: predicted against true per-token loss change (a random subset per run), y = x."""
    lim = 0
    for r in [r for r in runs if first_order(r)['steps']]:
        pred, true = np.concatenate(first_order(r)['pred']), np.concatenate(first_order(r)['true'])
        pick = np.random.default_rng(0).choice(len(pred), min(len(pred), MAX_SCATTER), replace=False)
        ax.scatter(pred[pick], true[pick], s=2, color=r['color'], alpha=0.4)
        lim = max(lim, np.abs(true).max(), np.abs(pred).max())
    ax.set_xscale('symlog', linthresh=1e-3)
    ax.set_yscale('symlog', linthresh=1e-3)
    if lim > 0:
        ax.plot([-lim, lim], [-lim, lim], color='k', lw=0.8, gid=GUIDE)
    ax.set_xlabel('predicted <grad l_i, delta> (nats, symlog)')


def zipf_panel(ax, runs):
    """fig6: the Zipf plot of each distinct corpus and vocabulary, its fit, outliers, bucket edges."""
    distinct = {(r['config']['data_key'], len(r['rec']['train_counts'])): r for r in runs[::-1]}
    for r in list(distinct.values())[::-1]:  # the first run of each
        counts = torch.from_numpy(np.array(r['rec']['train_counts']))
        zipf = metrics.zipf_fit(counts)
        c, rank, fitted = counts.numpy(), zipf['rank'].numpy(), zipf['fitted'].numpy()  # (V,) each, by id
        order = np.argsort(rank)  # token ids by rank
        ax.loglog(rank[order[c[order] > 0]], c[order[c[order] > 0]], color=r['color'], lw=1.2, label=f"V = {len(c)}")
        ax.loglog(rank[order], fitted[order], color='k', lw=0.7, ls='--')
        ax.plot(rank[zipf['outliers'].numpy()], c[zipf['outliers'].numpy()], 'rx', ms=5)
        for e in buckets(r)[1][1:-1].numpy():
            ax.axvline(e + 0.5, color='0.7', lw=0.5)
    ax.set_xlabel('rank in the training counts, from 1 (log)')


def bucket_loss_panel(ax, runs):
    """fig6: best (o) and last (x) validation loss per bucket, the training windows' dotted."""
    for r in runs:
        for name, ls in zip(['probe_loss'] + ['train_probe_loss'] * ('train_probe_loss' in r['rec']), ['-', ':']):
            best, last = zip(*[(v.min(), v[-1]) if len(v) else (np.nan, np.nan)
                               for v in (recorded(c)[1] for c in bucket_series(r, name).T)])
            ax.plot(best, color=r['color'], marker='o', ls=ls, mfc='none' if ls == ':' else None)
            ax.plot(last, color=r['color'], marker='x', ls='--' if ls == '-' else ls)
    ticks, label = shared_bucket_labels(runs)  # each run's own ranks: vocabularies may differ
    ax.set_xticks(range(len(ticks)), ticks, rotation=30, fontsize=6)
    ax.set_xlabel(label or '', fontsize=7)


def bucket_curves(ax, runs, name):
    """fig6: a run's per-bucket loss; dot: best step, v: plateau onset, ^: rise onset (`onsets`)."""
    loss, labels = bucket_series(runs[0], name), bucket_labels(runs[0])
    for k, (c, label) in enumerate(zip(plt.cm.plasma(np.linspace(0, 0.9, len(labels))), labels)):
        steps, v = series(loss[:, k])
        if len(v):
            ax.plot(steps, v, color=c, lw=1, label=label)
            ax.plot(steps[np.argmin(v)], v.min(), 'o', color=c, ms=4)
            o = onsets(loss[:, k])
            for step, marker in [(o['plateau'], 'v'), (o['rise'], '^')]:
                if step is not None and step in steps:
                    ax.plot(step, v[steps == step][0], marker, color=c, mec='k', mew=0.6, ms=6)
    ax.set(xscale='log', xlabel='step t (log)')


def singular_values(ax, runs):
    """fig9: the LM head's singular values over the largest, at the first (dotted) and last step."""
    for r in runs:
        s = np.asarray(r['rec']['head_singular_values'], dtype=float)  # (K, R)
        done = np.flatnonzero(np.isfinite(s).all(1))
        for row, ls in zip(done[[0, -1]] if len(done) else [], [':', '-']):
            ax.plot(np.arange(1, s.shape[1] + 1), s[row] / s[row, 0], color=r['color'], ls=ls)
    ax.set(yscale='log', xlabel='index k')


def basis_panel(ax, runs):
    """fig7: a run's (cos(h, grad_h+), cos(h, grad_h-)) per bucket; red star: the collapse (-1, +1)."""
    plus, minus = bucket_series(runs[0], 'probe_cos_h_plus'), bucket_series(runs[0], 'probe_cos_h_minus')
    labels = bucket_labels(runs[0])
    for k, (c, label) in enumerate(zip(plt.cm.plasma(np.linspace(0, 0.9, len(labels))), labels)):
        ok = np.isfinite(plus[:, k]) & np.isfinite(minus[:, k])  # recorded rows
        if ok.any():
            ax.plot(plus[ok, k], minus[ok, k], color=c, lw=0.8, label=label)
            ax.plot(plus[ok, k][-1], minus[ok, k][-1], 'o', color=c, ms=4)
    ax.plot([-1], [1], marker='*', color='r', ms=10, gid=GUIDE)
    ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), xlabel='cos(h, grad_h+)')


P = 'checkpoint step t'  # the step axis of measure.py's records
NORMS = [('norm_grad', '-', '|grad|'), ('norm_plus', '--', '|grad+|'), ('norm_minus', ':', '|grad-|')]
D_J = [('mean', '-', 'blocks'), ('weighted', '--', 'blocks, |g|-weighted'), ('null', '-.', 'null of blocks')]
# Every figure: name, the records it needs (runs without them are left out), its grid (columns, width and
# height of a panel in inches), a one-line caption and its panels (docs/figures.md explains each). A panel
# is an own function ('draw', with 'keys' for its line styles) or lines (record, column, smoothing,
# matplotlib format ('o-': a point per row), legend key) against the step; 'per_run': a panel per run;
# 'paper': drawn only where a run holds measure.py's records.
FIGURES = [
    dict(name='fig1_loss', needs=['train_loss'], grid=(1, 7, 5), panels=[
        dict(draw=loss_panel, log=True, y='training loss (nats/token, log)', title='loss deceleration',
             keys=[('k--', '1-break BNSL fit'), (':', 'its two power laws'), ('o', '(t_d, L_d)'),
                   ('s', '(t_d, L_d), published convention')])],
         caption="Training loss, its 1-break BNSL fit and the break (t_d, L_d): look for the bend."),
    dict(name='fig2_deceleration', needs=['train_loss'], grid=(4, 3.4, 3.2), panels=[
        dict(draw=lambda ax, runs: size_panel(ax, runs, 't_d'), y='t_d (steps)', title='95% intervals'),
        dict(draw=lambda ax, runs: size_panel(ax, runs, 'L_d'), y='L_d (nats/token)', title=''),
        dict(draw=lambda ax, runs: size_panel(ax, runs, 'r_d'), y='r_d (slope after t_d)', title=''),
        dict(draw=lambda ax, runs: size_panel(ax, runs, 'validation'), title='validation = the probe set',
             y='validation loss', keys=[('o', 'best'), ('x', 'last')])],
         caption="t_d, L_d, r_d (95% intervals) and the best and last validation loss against model size."),
    dict(name='fig3_zero_sum', grid=(2, 5.5, 3.6), panels=[
        dict(title='training batch ({N_batch}), before vs after its update', y='D of per-token loss changes',
             lines=[('train_D', None, 'both', '-', 'D'), ('train_D_null', None, 'smooth', '--', 'null')]),
        dict(title='probe set ({N_probe})', y='D of per-token loss changes',
             lines=[('probe_D', None, 'both', '-', 't to t+1'), ('probe_D_null', None, 'smooth', '--', 'null'),
                    ('probe_D_long', None, 'smooth', '-.', f't to t+{DT_LONG}'),
                    ('probe_D_long_null', None, 'smooth', ':', 'null')]),
        dict(title='magnitude', log=True, y='M = mean |Delta l_i| (nats)',
             lines=[('train_M', None, 'smooth', '-', 'training batch'), ('probe_M', None, 'smooth', '--', 'probe')]),
        dict(draw=dm_plane, y='M (nats, log)', title='D-M plane'),
        dict(draw=change_histogram, y='probe tokens', title='{run}: the per-token loss changes')],
         needs=['train_D', 'train_M', 'train_D_null', 'probe_D', 'probe_M', 'probe_D_null', 'probe_loss'],
         caption="Zero-sum learning: interference D of the per-token loss changes, its null, M and x_i."),
    dict(name='fig4_opposition', grid=(4, 3.8, 3.2), panels=[
        dict(title="position-local layers, training batch ({N_batch})", y='gradient opposition D_j',
             lines=[(f'local_opposition_{k}', 'blocks', 'smooth', ls, lab) for k, ls, lab in D_J] +
             [('local_opposition_mean', 'local', 'smooth', ':', 'all local')]),
        dict(title="all parameters, probe tokens ({N_opposition})", y='gradient opposition D_j',
             lines=[(f'opposition_{k}', 'blocks', 'raw', 'o' + ls, lab) for k, ls, lab in D_J] +
             [('opposition_mean', 'model', 'raw', 'o:', 'every coordinate')]),
        dict(title="update-weighted terms, blocks ({N_opposition})", y='C (1: agreement)',
             lines=[('update_Cg', 'blocks', 'raw', 'o-', 'Cg'), ('update_Cug', 'blocks', 'raw', 'o--', 'Cug'),
                    ('update_C_i_dli', 'blocks', 'raw', 'o:', 'C_i_dli')]),
        dict(per_run=True, title='{run}: per layer', y='gradient opposition D_j',
             lines=[('opposition_mean', 'layers', 'raw', 'o-')])],
         needs=['local_opposition_mean', 'local_opposition_weighted', 'local_opposition_null', 'opposition_mean',
                'opposition_weighted', 'opposition_null', 'update_Cg', 'update_Cug', 'update_C_i_dli', 'grad_steps'],
         caption="Gradient opposition D_j between tokens per parameter coordinate, beside its null."),
    dict(name='fig5_first_order', grid=(3, 4.3, 3.8),
         needs=['train_loss_pred', 'train_loss_pre', 'train_loss_post', 'grad_steps'], panels=[
        dict(draw=first_order_scatter, y='true Delta l_i (nats, symlog)', title='per token, training batch'),
        dict(title='', y='correlation(predicted, true)', lines=[('first_order_corr', None, 'raw', 'o-')]),
        dict(title='', y='slope of true on predicted', hline=lambda r: 1,
             lines=[('first_order_slope', None, 'raw', 'o-')])],
         caption="First-order prediction <grad l_i, delta> of each token's loss change against the true."),
    dict(name='fig6_saturation', needs=['probe_loss', 'train_counts', 'probe_tokens'], grid=(4, 3.8, 3.2), panels=[
        dict(draw=zipf_panel, y='count (log)', title='Zipf plot and the bucket edges',
             keys=[('k--', 'fit'), ('x', 'outliers')]),
        dict(draw=bucket_loss_panel, y='validation loss (nats/token)', title='per frequency bucket',
             keys=[('o-', 'best'), ('x--', 'last'), ('o:', 'training windows')]),
        dict(per_run=True, draw=lambda ax, runs: bucket_curves(ax, runs, 'probe_loss'),
             y='validation loss (nats/token)', title='{run}: held-out, per bucket'),
        dict(per_run=True, needs=['train_probe_loss', 'train_probe_tokens'],
             draw=lambda ax, runs: bucket_curves(ax, runs, 'train_probe_loss'),
             y='training-window loss (nats/token)', title='{run}: training windows, per bucket')],
         caption="Saturation per token-frequency bucket: where the loss stops falling or rises again."),
    dict(name='fig7_basis', needs=['probe_cos_h_plus', 'probe_cos_h_minus', 'train_counts', 'probe_tokens'],
         grid=(3, 4, 4), panels=[dict(per_run=True, draw=basis_panel, y='cos(h, grad_h-)', title='{run}')],
         caption="The shared 2D basis (cos(h, grad_h+), cos(h, grad_h-)) per bucket; star: the collapse."),
    dict(name='fig8_dissent', grid=(2, 5.5, 3.2), needs=['probe_cos_plus_minus', 'theta_cos'] + [
        w + n for w in ('probe_', 'theta_') for n, _, _ in NORMS], panels=[
        dict(title='h, mean over probe tokens', y='cos(grad_h+, grad_h-)',
             lines=[('probe_cos_plus_minus', 'tokens', 'raw', '-')]),
        dict(title='theta, training batch: batch-level cosine', y='cos(grad+, grad-)',
             lines=[('theta_cos', 'model', 'both', '-')]),
        dict(title='h, mean over probe tokens', y='|grad_h| / (|grad_h+| + |grad_h-|)',
             lines=[('probe_dissent_ratio', 'tokens', 'raw', '-')]),
        dict(title='theta, training batch', y='|grad| / (|grad+| + |grad-|)',
             lines=[('theta_dissent_ratio', None, 'both', '-')]),
        dict(title='h, mean over probe tokens', y='norm (log)', log=True,
             lines=[('probe_' + n, 'tokens', 'raw', ls, lab) for n, ls, lab in NORMS]),
        dict(title='theta, training batch', y='norm (log)', log=True,
             lines=[('theta_' + n, 'model', 'smooth', ls, lab) for n, ls, lab in NORMS]),
        dict(per_run=True, title='{run}: h, per bucket', y='cos(grad_h+, grad_h-)',
             lines=[('probe_cos_plus_minus', 'buckets', 'raw', '-')]),
        dict(per_run=True, title='{run}: h, per bucket', y='|grad_h| / (|grad_h+| + |grad_h-|)',
             lines=[('probe_dissent_ratio', 'buckets', 'raw', '-')])],
         caption="Gradient dissent: the attractive and repulsive parts of the gradient, in h and in theta."),
    dict(name='fig9_geometry', needs=['head_singular_values', 'hidden_steps', 'probe_anisotropy'],
         grid=(3, 4.3, 3.6), panels=[
        dict(draw=singular_values, y='s_k / s_1 (log)', title='LM-head singular values',
             keys=[(':', 'first step'), ('-', 'last step')]),
        dict(title='spectral entropy; dashed: its maximum', y='spectral entropy (nats)',
             hline=lambda r: math.log(r['rec']['head_singular_values'].shape[1]),
             lines=[('spectral_entropy', None, 'raw', '.-')]),
        dict(title='anisotropy of h over the probe tokens', y='mean pairwise cos(h_i, h_j)',
             lines=[('probe_anisotropy', None, 'raw', '-')]),
        dict(per_run=True, needs=['probe_hidden', 'train_counts', 'probe_tokens'], y='mean |h|, probe tokens',
             title='{run}: |h| per bucket', lines=[('hidden_norm', 'buckets', 'raw', '.-')])],
         caption="Geometry of the output layer: the LM head's spectrum, the anisotropy and the size of h."),
    dict(name='fig10_paper_protocol', needs=['paper'], paper=True, grid=(3, 4.2, 3.4), panels=[
        dict(x=P, title="opposition, N = {N_paper} held-out tokens", y='gradient opposition D_j',
             lines=[('paper.opposition_mean', 'blocks', 'raw', 'o-', 'blocks'),
                    ('paper.opposition_null', 'blocks', 'raw', ':', 'nulls'),
                    ('paper.opposition_mean', 'model', 'raw', 'o--', 'every coordinate'),
                    ('paper.opposition_null', 'model', 'raw', ':')]),
        dict(x=P, title="dt = 1, k = {k_paper} batches", y='D of per-token loss changes',
             lines=[('paper.loss_D_batch', 'k', 'raw', 'o-', 'on the batch'),
                    ('paper.loss_D_heldout', 'k', 'raw', 'o--', 'held-out'),
                    ('paper.loss_D_batch_null', 'k mean', 'raw', ':', 'nulls'),
                    ('paper.loss_D_heldout_null', 'k mean', 'raw', ':')]),
        dict(x=P, title="dt = t: theta_t to theta_2t, held-out", y='D of per-token loss changes',
             lines=[('paper.loss_D_dtt', None, 'raw', 'o-', 'D'),
                    ('paper.loss_D_dtt_null', None, 'raw', ':', 'null')])],
         caption="The published checkpoint protocol (measure.py): opposition and interference."),
]
NEEDS = {f['name']: f['needs'] for f in FIGURES}


def draw_figure(name, runs):
    """Figure `name` for these runs: its panels in a grid, the per-run ones once per run, run by run."""
    spec = next(f for f in FIGURES if f['name'] == name)
    todo = [(p, runs) for p in spec['panels'] if not p.get('per_run')]
    todo += [(p, [r]) for r in runs for p in spec['panels']
             if p.get('per_run') and all(k in r['rec'] for k in p.get('needs', []))]
    ncols, width, height = min(spec['grid'][0], max(len(todo), 1)), *spec['grid'][1:]  # no empty columns
    nrows = math.ceil(len(todo) / ncols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, figsize=(width * ncols, height * nrows + 0.4))
    for ax in axes.flat[len(todo):]:
        ax.remove()
    for ax, (panel, have) in zip(axes.flat, todo):
        draw_panel(ax, have, panel, runs)
    return fig


def panel_points(ax):
    """(n, 2): the data points a panel shows (finite, positive on a log axis); guides aside."""
    xy = [a.get_xydata() for a in ax.lines if a.get_gid() != GUIDE and a.get_transform() == ax.transData]
    xy += [a.get_offsets() for a in ax.collections if isinstance(a, PathCollection) and a.get_gid() != GUIDE]
    xy = np.concatenate([np.asarray(a, dtype=float).reshape(-1, 2) for a in xy] + [np.zeros((0, 2))])
    ok = np.isfinite(xy).all(1)
    for k, axis in enumerate([ax.xaxis, ax.yaxis]):
        ok &= (xy[:, k] > 0) | (axis.get_scale() != 'log')
    return xy[ok]


def readable_ticks(ax):
    """A log axis spanning under two decades: labels at round values (20k, 1.5M, 5.5)."""
    for axis in (ax.xaxis, ax.yaxis):
        lo, hi = sorted(axis.get_view_interval())
        if axis.get_scale() == 'log' and 0 < lo and hi < 100 * lo:
            axis.set_major_locator(ticker.MaxNLocator(4) if hi < 10 * lo else ticker.LogLocator(subs=(1, 2, 5)))
            axis.set_major_formatter(lambda v, _: f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k" if v >= 1e4
                                     else f"{v:g}")
            axis.set_minor_formatter(ticker.NullFormatter())


def finish(fig, runs):
    """Lay out a drawn figure (empty panels say so, run legend on top); False when it shows nothing."""
    shown = False
    for ax in fig.axes:
        if len(panel_points(ax)):
            shown = True
            for line in ax.lines:  # a line of one point is invisible without a marker
                if line.get_marker() in ('None', '') and np.isfinite(line.get_xydata()).all(1).sum() == 1:
                    line.set(marker='o')
            readable_ticks(ax)
            continue
        shown |= any(t.get_gid() is None for t in ax.texts)  # a result in words: 'no identifiable break'
        for a in ax.lines + ax.collections + ax.texts:  # e.g. step 0, which a linear axis would show
            a.set_visible(a.get_gid() in ((None, GUIDE) if a in ax.texts else (GUIDE,)))
        if ax.get_legend():
            ax.get_legend().remove()
        for a in [a for a in 'xy' if getattr(ax, f"get_{a}scale")() == 'log']:  # no positive value to draw
            ax.set(**{a + 'scale': 'linear', a + 'ticks': []})
        if not any(t.get_visible() for t in ax.texts):
            ax.text(0.5, 0.5, 'nothing recorded\nthat this panel can draw', transform=ax.transAxes,
                    ha='center', va='center', fontsize=8, color='0.4', gid=GUIDE)
            ax.set(xticks=[], yticks=[])
    handles = [Line2D([], [], color=r['color'], lw=2, label=r['label']) for r in runs]
    for ncol in range(min(len(runs), 4), 0, -1):
        legend = fig.legend(handles=handles, loc='upper center', ncol=ncol, fontsize=8, frameon=False)
        box = legend.get_window_extent(fig.canvas.get_renderer())
        if box.width <= fig.bbox.width or ncol == 1:
            break
        legend.remove()
    for t in legend.get_texts() + [t for ax in fig.axes for t in ax.texts + [ax.title, ax.xaxis.label] + (
            ax.get_legend().get_texts() if ax.get_legend() else [])]:
        t.set_parse_math(False)  # a '$' in a run's name is a dollar sign, not the start of math
    fig.set_figwidth(max(fig.get_figwidth(), box.width / fig.dpi + 0.1))
    top = max(0.35, box.height / fig.dpi + 0.05)  # draw_figure leaves 0.4 inches above the panels
    fig.set_figheight(fig.get_figheight() + top - 0.35)
    fig.tight_layout(rect=(0, 0, 1, 1 - top / fig.get_figheight()))
    return shown


# -----------------------------------------------------------------------------
# the report: a table of sections (title, what it holds, a function giving its tables)


def onsets(values):
    """never, plateau and rise onsets (metrics.py) of a loss series' log moving average; None if unrecorded."""
    steps, v = recorded(values)
    if not len(v):
        return None
    loss = torch.from_numpy(bnsl.log_moving_average(v) if np.all(np.diff(steps) == 1) else v)
    if metrics.never_improved(loss):
        return dict(never=True, plateau=None, rise=None)
    step = lambda i: None if i is None else int(steps[i])
    return dict(never=False, plateau=step(metrics.plateau_onset(loss, torch.from_numpy(steps))),
                rise=step(metrics.rise_onset(loss)))


def fmt(v, spec, ci=None):
    """v in format spec with its interval ci (' [lo, hi]', '?' for None); 'n/a' for None or not finite."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return 'n/a'
    return format(v, spec) + (f" [{', '.join('?' if e is None else format(e, spec) for e in ci)}]" if ci else '')


def fit_rows(r):
    """BNSL fit, validation loss and its onset, probe D before and after t_d, L_d / H_1 (unigram entropy)."""
    fit, rec, pub = r['fit'], r['rec'], r['fit'].get('published') or {}
    val, D, H1 = ['n/a'] * 3, ['n/a'] * 2, None
    steps, loss = recorded(token_mean(r, 'probe_loss')) if 'probe_loss' in rec else ([], [])
    if len(loss):
        o = onsets(token_mean(r, 'probe_loss'))
        val = [f"{loss.min():.4f} (step {steps[np.argmin(loss)]})", f"{loss[-1]:.4f} (step {steps[-1]})",
               'never improved' if o['never'] else 'none' if o['rise'] is None else f"step {o['rise']}"]
    if fit.get('t_d') is not None and 'probe_D' in rec:
        s, v = recorded(rec['probe_D'])
        null = np.asarray(rec['probe_D_null'], dtype=float)[s]
        D = [f"{v[w].mean():.4f} (null {np.nanmean(null[w]):.4f})" if w.any() else 'n/a'
             for w in (s < fit['t_d'], s >= fit['t_d'])]
    if 'train_counts' in rec:
        H1 = float(metrics.unigram_entropy(torch.from_numpy(np.array(rec['train_counts']))))
    return [[r['name'], f"{r['config']['n_params']:,}", len(recorded(rec['train_loss'])[0])] +
            [fmt(f.get(k), s, interval(f, k)) for f, k, s in [(fit, 't_d', '.4g'), (pub, 't_d', '.4g'),
                                                             (fit, 'L_d', '.4g'), (fit, 'r_d', '.3g')]] +
            [fmt(fit.get('rsle'), '.3g'), 'yes' if fit['identifiable'] else f"no: {fit['reason']}", *val,
             f"{r['config']['probe_tokens']:,}", *D, fmt(H1, '.4f'),
             fmt(fit['L_d'] / H1 if fit.get('L_d') and H1 else None, '.3f')]]


def bucket_cells(run, name, k):
    """(tokens, best (step), final, plateau onset, rise onset) of bucket k's loss `name`, and its onsets."""
    bucket, edges, targets = buckets(run, name)
    n = np.bincount(bucket[targets].flatten().numpy(), minlength=len(edges) - 1)[k]
    o, (steps, v) = onsets(bucket_series(run, name)[:, k]), recorded(bucket_series(run, name)[:, k])
    if o is None:
        return [n] + ['n/a'] * 4, None
    return [n, f"{v.min():.3f} ({steps[np.argmin(v)]})", f"{v[-1]:.3f}"] + (['-', 'never improved'] if o['never']
            else [str(o[key]) if o[key] is not None else 'none' for key in ('plateau', 'rise')]), o


def together(held, train):
    """What a bucket's held-out and training-window onsets say together."""
    h, t = ('never improved' if o['never'] else 'rises' if o['rise'] is not None else
            'plateaus' if o['plateau'] is not None else 'improving' for o in (held, train))
    both = 'overfitting' if h == 'rises' and t in ('plateaus', 'improving') else \
        'capacity saturation' if h in ('plateaus', 'rises') and t in ('plateaus', 'rises') else \
        'a growing gap' if h == 'plateaus' and t == 'improving' else None
    return f"held-out {h}, training {t}" + (f": {both}" if both else '')


def bucket_tables(runs):
    """Per run and bucket: bucket_cells of the probe tokens and of the training windows, and together()."""
    rows, trained = [], any('train_probe_loss' in r['rec'] for r in runs)
    for r in [r for r in runs if all(k in r['rec'] for k in NEEDS['fig6_saturation'])]:
        for k, label in enumerate(bucket_labels(r)):
            held, o_held = bucket_cells(r, 'probe_loss', k)
            train, o_train = bucket_cells(r, 'train_probe_loss', k) if 'train_probe_loss' in r['rec'] else ([], None)
            both = [together(o_held, o_train) if o_held and o_train else 'n/a'] * bool(train)
            row = [r['name'], label] + held + train + both
            rows.append(row + ['n/a'] * (13 - len(row)) * trained)
    header = ['run', 'bucket', 'probe tokens', 'best (step)', 'final', 'plateau onset', 'rise onset']
    return [('', header + trained * ['training-window tokens', 'train. best (step)', 'train. final',
                                     'train. plateau onset', 'train. rise onset', 'which plateaus or rises'], rows)]


def dissent_rows(r):
    """The mean of each dissent measurement per phase: start, t_d, saturation onset, end."""
    norms = ['norm_plus', 'norm_minus', 'norm_grad']
    lines = [('theta_' + n, 'model', ['theta_' + n]) for n in ['cos'] + norms]  # (name, column, needs)
    lines += [('probe_' + n, 'tokens', ['probe_' + n]) for n in ['cos_plus_minus'] + norms]
    lines += [(w + '_dissent_ratio', c, [f"{w}_{n}" for n in norms])
              for w, c in [('theta', None), ('probe', 'tokens')]]
    cols = [line_data(r, name, c)[1] if all(k in r['rec'] for k in needs) else None for name, c, needs in lines]
    if all(v is None or not np.isfinite(v).any() for v in cols):  # e.g. --record none
        return []
    S, t_d = len(r['rec']['train_loss']), r['fit'].get('t_d') if r['fit']['identifiable'] else None
    o = onsets(token_mean(r, 'probe_loss')) if 'probe_loss' in r['rec'] else None
    cuts = [(0, 'start'), (S, 'end')] + ([(math.ceil(t_d), 't_d')] if t_d is not None and t_d < S else [])
    cuts = sorted(cuts + ([(o['rise'], 'saturation onset')] if o and o['rise'] is not None else []))
    return [[r['name'], f"{a_name} to {b_name} (steps {a}-{b - 1})"] +
            ['n/a' if v is None or not np.isfinite(v[a:b]).any() else f"{np.nanmean(v[a:b]):.3g}" for v in cols]
            for (a, a_name), (b, b_name) in zip(cuts[:-1], cuts[1:]) if b > a]


def per_bucket(name, cell):
    """A section of a row per run that figure `name` draws, a column per bucket: cell(run, bucket)."""
    def tables(runs):
        runs = [r for r in runs if all(k in r['rec'] for k in NEEDS[name])]
        labels, what = shared_bucket_labels(runs, sep=r' \| ') if runs else ([], None)
        rows = [[r['name']] + [cell(r, k) for k in range(len(bucket_labels(r)))] for r in runs]
        return [(f"Columns: {what}." if what else '', ['run'] + labels,
                 [row + [''] * (1 + len(labels) - len(row)) for row in rows])]
    return tables


def bucket_dissent_cell(r, k):
    """cos(grad_h+, grad_h-) and the dissent ratio of bucket k, at its first -> last recorded step."""
    cos, ratio = (line_data(r, n, 'buckets')[1][:, k] for n in ('probe_cos_plus_minus', 'probe_dissent_ratio'))
    steps = np.flatnonzero(np.isfinite(cos) & np.isfinite(ratio))
    if not len(steps):
        return 'n/a'
    a, b = steps[0], steps[-1]
    return f"cos {cos[a]:+.2f} -> {cos[b]:+.2f}, ratio {ratio[a]:.2f} -> {ratio[b]:.2f} (at {a} -> {b})"


def basis_cell(r, k):
    """The 2D basis of bucket k at its best validation loss -> at the last recorded step."""
    loss, plus, minus = (bucket_series(r, n)[:, k] for n in ('probe_loss', 'probe_cos_h_plus', 'probe_cos_h_minus'))
    steps, _ = recorded(loss)
    if not len(steps):
        return 'n/a'
    best, last = steps[np.nanargmin(loss[steps])], steps[-1]
    return f"({plus[best]:+.2f}, {minus[best]:+.2f}) at {best} -> ({plus[last]:+.2f}, {minus[last]:+.2f})"


def paper_tables(runs):
    """Per run and N, a row per checkpoint of measure.py's numbers, C terms of blocks and model."""
    out = []
    for r, p in [(r, p) for r in runs for p in r['rec'].get('papers', [])]:
        s, j = p['settings'], [p['settings']['opposition_keys'].index(c) for c in ('blocks', 'model')]
        D = lambda i, c: f"{p['opposition_mean'][i, c]:.4f} ({p['opposition_null'][i, c]:.4f})"
        free = lambda i, k: f"{metrics.scale_free_opposition(p['opposition_' + k][i, j[0]], s['tokens']):.2f}"
        dt1 = lambda i, w: f"{p[f'loss_D_{w}'][i].mean():.4f} +- {p[f'loss_D_{w}'][i].std():.4f} " \
            f"({p[f'loss_D_{w}_null'][i].mean():.4f})"
        C = lambda i, c: ', '.join(f"{p['update_' + t][i, c]:.3f}" for t in ('Cg', 'Cug', 'C_i_dli'))
        rows = [[int(t), D(i, j[0]), D(i, j[1]), f"{free(i, 'mean')} ({free(i, 'null')})",
                 f"{p['opposition_near_total'][i, j[0]]:.4f}", dt1(i, 'batch'), dt1(i, 'heldout'),
                 f"{p['loss_D_dtt'][i]:.4f} ({p['loss_D_dtt_null'][i]:.4f})", C(i, j[0]), C(i, j[1])]
                for i, t in enumerate(p['steps'])]
        out.append((f"{r['name']}: N = {s['tokens']:,} held-out tokens ({s['windows']} windows), "
                    f"k = {s['batches']} batches.", PAPER_HEADER, rows))
    return out


def matched_tables(runs):
    """Runs measured at one N at their common checkpoints: blocks' D_j (null), sqrt(N)(1 - D_j), t_d side."""
    by_N = {}
    for r, p in [(r, p) for r in runs for p in r['rec'].get('papers', [])]:
        by_N.setdefault(p['settings']['tokens'], []).append((r, p, p['settings']['opposition_keys'].index('blocks')))
    def cell(t, N, r, p, j):
        mean, null = (p['opposition_' + k][list(p['steps']).index(t), j] for k in ('mean', 'null'))
        side = '' if r['fit'].get('t_d') is None else ' <' if t < r['fit']['t_d'] else ' >'
        return f"{mean:.4f} ({null:.4f}), {metrics.scale_free_opposition(mean, N):.2f}{side}"
    out = []
    for N, members in [(N, m) for N, m in sorted(by_N.items()) if len(m) > 1]:
        steps = sorted(set.intersection(*[set(int(t) for t in p['steps']) for _, p, _ in members]))
        out.append((f"N = {N:,} held-out tokens.", ['step t'] + [r['name'] for r, _, _ in members],
                    [[t] + [cell(t, N, *member) for member in members] for t in steps]))
    return out


def per_run(header, rows):
    """A section's tables: one, of header and rows(run) of each run."""
    return lambda runs: [('', header, [row for r in runs for row in rows(r)])]


PAPER_HEADER = ['step t', 'D_j blocks (null)', 'D_j model (null)', 'sqrt(N)(1 - D_j) blocks (null)',
                'share D_j > 0.99 blocks', 'dt=1 D batch (null)', 'dt=1 D held-out (null)', 'dt=t D held-out (null)',
                'Cg, Cug, C_i_dli blocks', 'Cg, Cug, C_i_dli model (the published set)']
FIT_HEADER = ['run', 'params', 'steps', 't_d', 't_d published', 'L_d', 'r_d', 'RSLE', 'identifiable',
              'best val. loss', 'last val. loss', 'saturation onset', 'probe N', 'D before t_d', 'D after t_d',
              'H_1 (nats)', 'L_d / H_1']
DISSENT_HEADER = ['run', 'phase'] + [f"{q} {w}" for w in ('theta', 'h') for q in (
    'cos(g+, g-)', r'\|g+\|', r'\|g-\|', r'\|g\|')] + [rf"\|g\| / (\|g+\| + \|g-\|) {w}" for w in ('theta', 'h')]
# the report's sections: title, what it holds (docs/figures.md says more), its tables [(line, header, rows)]
REPORT = [
    ('Deceleration and validation loss', "The 1-break BNSL fit (bnsl.py, 95% intervals); validation: the "
     "probe set; D: its interference beside its null; H_1: the training split's unigram entropy.",
     per_run(FIT_HEADER, fit_rows)),
    ('Saturation per token-frequency bucket', "Loss of the probe tokens by bucket of their target; the "
     "training windows' beside it.", bucket_tables),
    ('Dissent by phase', "Means over each phase's recorded steps; theta: all parameters, training batch; h: "
     "per probe token.", per_run(DISSENT_HEADER, dissent_rows)),
    ('Dissent in h per frequency bucket', "cos(grad_h+, grad_h-) and |grad_h| / (|grad_h+| + |grad_h-|), at "
     "the first -> last recorded step.", per_bucket('fig8_dissent', bucket_dissent_cell)),
    ('The 2D basis per frequency bucket', "(cos(h, grad_h+), cos(h, grad_h-)) at the bucket's best "
     "validation loss -> at the last step.", per_bucket('fig7_basis', basis_cell)),
    ('The published checkpoint protocol (measure.py)', "At each kept checkpoint; the paper's C figure "
     "uses every parameter (model).", paper_tables),
    ('The runs at matched checkpoints (measure.py)', "The blocks' D_j (null) and sqrt(N)(1 - D_j) where "
     "runs measured at one N; < before t_d.", matched_tables),
]


def report_text(runs, drawn, notes, ext):
    """report.md: the runs, each section of REPORT that has rows (a bar in a cell escaped: a run's name must
    not split a cell), the drawn figures, the notes."""
    parts = ['# Training dynamics report', '', "Runs (ordered and coloured by parameter count): "
             f"{'; '.join(r['name'] + ': ' + r['label'] for r in runs)}. What to look for: docs/figures.md.", '']
    for title, what, tables in REPORT:
        tables = [t for t in tables(runs) if t[2]]
        parts += [f"## {title}", '', what, ''] * bool(tables)
        for line, header, rows in tables:
            parts += [line, ''] * bool(line) + ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
            parts += ['| ' + ' | '.join(str(c).replace('|', r'\|') for c in row) + ' |' for row in rows] + ['']
    parts += ['## Figures', '']
    for f in [f for f in FIGURES if f['name'] in drawn]:
        parts += [f"### {f['name']}", '', f"![{f['name']}]({f['name']}.{ext})", '', f['caption'], '']
    return '\n'.join(parts + (['## Not plotted', ''] + [f"- {n}" for n in notes] + [''] if notes else []))


# -----------------------------------------------------------------------------
# main

def render(spec, runs, formats, dpi, notes):
    """{file name: bytes} of a figure drawn for the runs holding its records; what it leaves out to notes."""
    have = [r for r in runs if all(k in r['rec'] for k in spec['needs'])]
    lacking = '; '.join(f"{r['name']} lacks {', '.join(k for k in spec['needs'] if k not in r['rec'])}"
                        for r in runs if r not in have)
    files = {}
    if have:
        fig = draw_figure(spec['name'], have)
        for ext in formats if finish(fig, have) else []:
            fig.savefig(files.setdefault(f"{spec['name']}.{ext}", io.BytesIO()), format=ext, dpi=dpi)
        plt.close(fig)
        lacking = lacking if files else "nothing recorded that it can draw: too few steps, or none after step 0"
    if lacking:
        notes.append(f"{spec['name']}: {'leaves out runs' if files else 'not drawn'} ({lacking})")
    return {name: f.getvalue() for name, f in files.items()}


def main(argv=None):
    p = parser(__doc__, [
        ('out', None, str, 'folder for the figures and report.md (default: FIRST_PATH/figures)'),
        ('min_step', bnsl.MIN_STEP, nonnegative, 'BNSL fit: drop the transient steps t <= min_step'),
        ('dpi', 110, checked(int, lambda v: 0 < v <= 600, 'between 1 and 600'), 'resolution of PNG figures')])
    p.add_argument('paths', nargs='+', help='run folders, or folders holding run folders')
    p.add_argument('--format', nargs='+', default=['png'], choices=['png', 'pdf'], help='figure file formats')
    args = p.parse_args(argv)
    np.seterr(all='ignore')  # NaN rows not yet recorded: NaN, not a warning
    warnings.simplefilter('ignore')  # ... and log axes without a positive value, which finish() makes linear
    runs = sorted(map(load_run, find_runs(args.paths)), key=lambda r: (r['config']['n_params'], r['path']))
    print(f"{len(runs)} run{'s' * (len(runs) != 1)} found: {', '.join(shown(r['path']) for r in runs)}")
    label_runs(runs)
    for r, c in zip(runs, plt.cm.viridis(np.linspace(0.05, 0.85, len(runs)) if len(runs) > 1 else [0.3])):
        r.update(color=c, fit=fit_run(r, args.min_step))
    if args.out and os.path.lexists(args.out) and not os.path.isdir(args.out):
        fail(f"--out {args.out}: exists and is not a folder")
    # the folder whose manifest lists the figures: FIRST_PATH (figures/ in it), or --out itself (with a
    # trailing separator: remove_owned never takes --out itself for a folder it emptied)
    root, under = (os.path.join(args.out, ''), '') if args.out else (args.paths[0], 'figures')
    out = os.path.join(root, under)
    if under == '' and any(os.path.exists(os.path.join(root, f)) for f in ('config.json', 'progress.json')):
        fail(f"--out {root}: a run folder (or measure.py's); choose another --out")
    if foreign(root, under):
        fail(f"{out} holds files plot.py did not write ({', '.join(foreign(root, under)[:3])}); "
             "move them or choose another --out")
    for name in [f"{f['name']}.{ext}" for f in FIGURES for ext in args.format] + ['report.md']:
        if os.path.isdir(os.path.join(out, name)):
            fail(f"{os.path.join(out, name)}: a folder where plot.py writes a file; move it or choose another --out")
    notes = [f"{r['name']} was recorded with --record {r['config']['record']}: what that level does not "
             "record is left out" for r in runs if r['config']['record'] != 'all']
    notes += [f"{r['name']} lacks {', '.join(r['missing'])} (listed in its config.json, not in the directory)"
              for r in runs if r['missing']]
    figures, files = [f for f in FIGURES if not f.get('paper') or any('paper' in r['rec'] for r in runs)], {}
    for f in figures:
        files.update(render(f, runs, args.format, args.dpi, notes))
    if not files:
        fail(f"nothing to plot: {', '.join(r['name'] for r in runs)} recorded nothing that a figure can draw "
             "(too few steps, or none after step 0, which a log step axis cannot show)")
    drawn = [f['name'] for f in figures if f"{f['name']}.{args.format[0]}" in files]
    files['report.md'] = report_text(runs, drawn, notes, args.format[0]).encode('utf-8')
    os.makedirs(root, exist_ok=True)
    remove_owned(root, under)  # the figures of the last time, then the new ones
    for name, data in files.items():
        write_atomic(root, os.path.join(under, name), lambda f: f.write(data))
    print(f"{len(drawn)} figures and report.md for {len(runs)} runs in {shown(os.path.normpath(out))}")
    print(''.join(f"  note: {n}\n" for n in notes), end='')


if __name__ == '__main__':
    main()
