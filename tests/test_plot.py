"""plot.py on real (tiny) runs: every figure drawn and non-blank, the report complete and true to
the records, partial and unfinished runs plotted as far as they go, bad input refused in one line."""
import json
import os
import re
import shutil
import subprocess
import sys

import matplotlib.image as mpimg
import matplotlib.text
import numpy as np
import pytest

import runs
from conftest import ROOT, TINY, run_train
from plot import FIGURES, N_BUCKETS, plt  # pyplot on plot.py's backend (Agg)

pytestmark = pytest.mark.slow  # every test trains tiny runs and runs plot.py in subprocesses
NAMES = [f['name'] for f in FIGURES if not f.get('paper')]  # fig10 needs measure.py
IGNORE = shutil.ignore_patterns('figures')  # a copied run starts without the figures of earlier tests
SHORT = ['--max_iters', '30', '--grad_every', '10', '--ckpt_interval', '30']


def run_plot(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'plot.py'), *args],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope='module')
def sweep(tmp_path_factory, cache_dir):
    """Two tiny models of different sizes, trained for real into one folder."""
    root = tmp_path_factory.mktemp('sweep')
    for name, layers in [('small', '1'), ('large', '2')]:
        args = [*TINY, *SHORT, '--cache_dir', cache_dir, '--out_dir', str(root / 'runs' / name)]
        args[args.index('--n_layer') + 1] = layers
        run_train(*args)
    return root


def assert_figures(folder, names):
    for name in names:
        image = mpimg.imread(os.path.join(folder, name + '.png'))  # (H, W, 4) floats in [0, 1]
        rgb = image[..., :3]
        assert rgb.std() > 0.01, f"{name} is blank"
        assert (rgb < 0.9).mean() > 0.005, f"{name} is (nearly) all white"


def test_a_sweep_gives_every_figure_and_the_report(sweep):
    proc = run_plot(str(sweep / 'runs'))
    assert proc.returncode == 0, proc.stderr
    figures = sweep / 'runs' / 'figures'
    assert_figures(figures, NAMES)
    report = (figures / 'report.md').read_text()
    for name in NAMES:
        assert f"]({name}.png)" in report
    assert 'Not plotted' not in report  # both runs hold every record
    # runs ordered by size: the smaller first, in the legend line and in the table
    assert report.index('| small |') < report.index('| large |')
    for header in ['t_d', 'L_d', 'r_d', 'best val. loss', 'last val. loss', 'saturation onset',
                   'D before t_d']:
        assert header in report


def test_report_numbers_are_the_records(sweep):
    run_plot(str(sweep / 'runs'))
    report = (sweep / 'runs' / 'figures' / 'report.md').read_text()
    for name in ['small', 'large']:
        probe = np.load(sweep / 'runs' / name / 'probe_loss.npy').astype(np.float64)
        mean = probe.reshape(len(probe), -1).mean(1)  # validation loss at every recorded theta_t
        row = next(line for line in report.splitlines() if line.startswith(f'| {name} |'))
        best = re.search(r'\| ([0-9.]+) \(step (\d+)\) \| ([0-9.]+) \(step (\d+)\) \|', row)
        assert float(best.group(1)) == pytest.approx(mean.min(), abs=1e-4)
        assert int(best.group(2)) == mean.argmin()
        assert float(best.group(3)) == pytest.approx(mean[-1], abs=1e-4)
        assert int(best.group(4)) == len(mean) - 1


def test_one_run_and_several_paths_and_pdf(sweep, tmp_path):
    run = sweep / 'runs' / 'small'
    assert run_plot(str(run)).returncode == 0
    assert_figures(run / 'figures', NAMES)
    out = tmp_path / 'both'
    proc = run_plot(str(sweep / 'runs' / 'large'), str(run), '--out', str(out), '--format', 'png', 'pdf')
    assert proc.returncode == 0, proc.stderr
    assert all((out / f"{n}.pdf").stat().st_size > 1000 for n in NAMES)
    assert '| small |' in (out / 'report.md').read_text()


def test_a_run_with_a_record_removed_is_plotted_and_the_gap_reported(sweep, tmp_path):
    partial = tmp_path / 'partial'
    shutil.copytree(sweep / 'runs' / 'small', partial, ignore=IGNORE)
    os.remove(partial / 'theta_cos.npy')
    proc = run_plot(str(partial), str(sweep / 'runs' / 'large'), '--out', str(tmp_path / 'fig'))
    assert proc.returncode == 0, proc.stderr
    assert_figures(tmp_path / 'fig', NAMES)  # the other run still gives fig8
    report = (tmp_path / 'fig' / 'report.md').read_text()
    assert 'partial lacks theta_cos' in report
    assert 'fig8_dissent: leaves out runs (partial lacks theta_cos)' in report
    # alone, the run gives every figure but the one that needs the missing record
    proc = run_plot(str(partial), '--out', str(tmp_path / 'alone'))
    assert proc.returncode == 0 and not (tmp_path / 'alone' / 'fig8_dissent.png').exists()
    assert 'fig8_dissent: not drawn' in (tmp_path / 'alone' / 'report.md').read_text()
    assert_figures(tmp_path / 'alone', [n for n in NAMES if n != 'fig8_dissent'])


def test_a_run_still_training_is_plotted_as_far_as_recorded(sweep, tmp_path):
    """A run cut at step 20 of 30: its per-step rows from there on are still NaN / -1."""
    run = tmp_path / 'unfinished'
    shutil.copytree(sweep / 'runs' / 'large', run, ignore=IGNORE)
    for f in run.glob('*.npy'):
        a = np.load(f, mmap_mode='r+')
        if a.dtype.kind == 'f' and f.stem not in ('probe_hidden', 'head_singular_values', 'opposition_mean',
                                                   'opposition_weighted', 'train_loss_pred') and len(a) >= 30:
            a[20:] = np.nan
            a.flush()
    proc = run_plot(str(run))
    assert proc.returncode == 0, proc.stderr
    assert_figures(run / 'figures', NAMES)
    assert '| unfinished | ' in (run / 'figures' / 'report.md').read_text()
    assert re.search(r'\| unfinished \| [0-9,]+ \| 20 \|', (run / 'figures' / 'report.md').read_text())


def test_a_bare_run_gives_the_loss_figures_and_says_what_is_missing(tmp_path, cache_dir):
    out = tmp_path / 'bare'
    run_train(*TINY, *SHORT, '--record', 'none', '--cache_dir', cache_dir, '--out_dir', str(out))
    proc = run_plot(str(out))
    assert proc.returncode == 0, proc.stderr
    assert_figures(out / 'figures', ['fig1_loss', 'fig2_deceleration'])
    report = (out / 'figures' / 'report.md').read_text()
    assert 'fig3_zero_sum: not drawn' in report and 'record none' in report


def bad_inputs(tmp, sweep):
    """(arguments, what the one-line error must name) for each kind of bad input."""
    empty = tmp / 'empty'
    empty.mkdir()
    truncated = tmp / 'truncated'
    shutil.copytree(sweep / 'runs' / 'small', truncated, ignore=IGNORE)
    with open(truncated / 'probe_loss.npy', 'r+b') as f:
        f.truncate(1000)
    garbage = tmp / 'garbage'
    shutil.copytree(sweep / 'runs' / 'small', garbage, ignore=IGNORE)
    (garbage / 'train_D.npy').write_bytes(b'not a numpy file at all')
    config = tmp / 'config'
    shutil.copytree(sweep / 'runs' / 'small', config, ignore=IGNORE)
    (config / 'config.json').write_text('{"records": ')
    wrong = tmp / 'wrong'
    shutil.copytree(sweep / 'runs' / 'small', wrong, ignore=IGNORE)
    np.save(wrong / 'train_M.npy', np.zeros(7))
    older = tmp / 'older'
    shutil.copytree(sweep / 'runs' / 'small', older, ignore=IGNORE)
    settings = json.loads((older / 'config.json').read_text())
    del settings['opposition_tokens']  # a key that train.py wrote only from a later version on
    (older / 'config.json').write_text(json.dumps(settings))
    return [([str(tmp / 'missing')], 'no such directory'), ([str(empty)], 'no run directories'),
            ([str(truncated)], 'probe_loss.npy'), ([str(garbage)], 'train_D.npy'),
            ([str(config)], 'config.json'), ([str(wrong)], 'train_M.npy'),
            ([str(sweep / 'runs'), '--format', 'gif'], 'invalid choice'),
            ([str(sweep / 'runs'), '--dpi', '0'], '--dpi'), ([str(sweep / 'runs'), '--dpi', '100000'], '--dpi'),
            ([str(sweep / 'runs'), '--min_step', 'nan'], '--min_step'),
            ([str(sweep / 'runs'), '--min_step', 'inf'], '--min_step'),
            ([str(older)], f"{older}: made by an older version of train.py; rerun it")]


def test_bad_input_is_one_line_and_exit_2(sweep, tmp_path):
    for args, name in bad_inputs(tmp_path, sweep):
        proc = run_plot(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and name in proc.stderr, (args, proc.stderr)
        assert 'Traceback' not in proc.stderr
    assert not (tmp_path / 'truncated' / 'figures').exists()  # nothing written for a bad run


def test_a_light_run_draws_its_scheduled_rows_unsmoothed_and_complete(tmp_path, cache_dir):
    """--record light writes train_D and its null on the log schedule only: every recorded row is
    drawn (step 0 aside, on log axes), none is lost to NaN rows, none is averaged with far-off steps."""
    import plot
    out = tmp_path / 'light'
    run_train(*TINY, '--max_iters', '60', '--grad_every', '30', '--record', 'light',
              '--cache_dir', cache_dir, '--out_dir', str(out))
    assert run_plot(str(out)).returncode == 0
    assert_figures(out / 'figures', NAMES)
    run = plot.load_run(str(out))
    run.update(color='k', fit=plot.fit_run(run, plot.bnsl.MIN_STEP))
    fig = plot.draw_figure('fig3_zero_sum', [run])
    raw, smoothed, null = fig.axes[0].lines[:3]  # training batch: per step, "smoothed", sign-flip null
    D = np.load(out / 'train_D.npy')
    steps = np.flatnonzero(np.isfinite(D) & (np.arange(len(D)) > 0))
    assert 0 < len(steps) < 59  # a schedule, not every step
    for line, values in [(raw, D), (smoothed, D), (null, np.load(out / 'train_D_null.npy'))]:
        np.testing.assert_array_equal(line.get_xdata(), steps)
        np.testing.assert_array_equal(line.get_ydata(), values[steps])


def test_the_report_holds_the_bnsl_fit_of_the_recorded_curve(sweep, tmp_path):
    """A run whose training loss follows a known 1-break BNSL: the report and fig1 show bnsl.py's fit."""
    import bnsl
    run = tmp_path / 'known'
    shutil.copytree(sweep / 'runs' / 'large', run, ignore=IGNORE)
    loss = np.load(run / 'train_loss.npy', mmap_mode='r+')
    t = np.arange(len(loss), dtype=float)
    loss[:] = bnsl.bnsl_1break(np.maximum(t, 1), 8.0, 0.4, -0.3, 8.0, 0.2)  # t_d = 8, r_d = 0.1
    loss.flush()
    assert run_plot(str(run), '--min_step', '0').returncode == 0
    fit = bnsl.fit_curve(t, np.array(loss), min_step=0)
    assert fit['identifiable'] and 6 < fit['t_d'] < 10
    report = (run / 'figures' / 'report.md').read_text()
    row = next(line for line in report.splitlines() if line.startswith('| known |'))
    cells = [c.strip() for c in row.split('|')[1:-1]]
    assert cells[3].startswith(f"{fit['t_d']:.4g} [") and cells[6].startswith(f"{fit['r_d']:.3g} [")
    assert cells[4].startswith(f"{fit['published']['t_d']:.4g} [")  # the published convention beside it
    assert cells[8] == 'yes'
    assert cells[12] == f"{16 * 3:,}"  # the probe set's N: 3 sequences of 16 tokens
    assert 'null' in cells[13] and 'null' in cells[14]  # D before and after t_d, each beside its null
    assert_figures(run / 'figures', ['fig1_loss', 'fig2_deceleration'])


def test_dissent_and_basis_tables_are_the_records_by_phase(sweep, tmp_path):
    """A run with a known break (t_d = 8) whose validation loss is made to rise after step 20: the
    dissent table splits it into three phases that tile the run, each cell the mean of its record
    over the phase's steps; the basis table holds the bucket means of the per-token cosines at the
    bucket's best step and at the last step."""
    import bnsl
    import metrics
    import torch
    run = tmp_path / 'known'
    shutil.copytree(sweep / 'runs' / 'large', run, ignore=IGNORE)
    loss = np.load(run / 'train_loss.npy', mmap_mode='r+')
    S = len(loss)
    loss[:] = bnsl.bnsl_1break(np.maximum(np.arange(S, dtype=float), 1), 8.0, 0.4, -0.3, 8.0, 0.2)
    loss.flush()
    probe = np.load(run / 'probe_loss.npy', mmap_mode='r+')  # (S + 1, P, T)
    probe += 0.3 * np.maximum(np.arange(S + 1) - 20, 0)[:, None, None]
    probe.flush()
    assert run_plot(str(run), '--min_step', '0').returncode == 0
    report = (run / 'figures' / 'report.md').read_text().splitlines()

    rows = [[c.strip() for c in line.split('|')[1:-1]] for line in report
            if line.startswith('| known | ') and 'steps ' in line]
    assert [r[1].split(' (')[0] for r in rows] == ['start to t_d', 't_d to saturation onset',
                                                   'saturation onset to end']
    spans = [tuple(int(s) for s in re.search(r'steps (\d+)-(\d+)', r[1]).groups()) for r in rows]
    assert spans[0][0] == 0 and spans[-1][1] == S - 1
    assert all(a[1] + 1 == b[0] for a, b in zip(spans, spans[1:]))  # the phases tile the run
    t_d = bnsl.fit_curve(np.arange(S, dtype=float), np.array(loss), min_step=0)['t_d']
    assert spans[1][0] == int(np.ceil(t_d))  # the first step at or after t_d
    assert 20 <= spans[2][0] <= 23  # the onset, near the planted rise (the curve is smoothed first)
    j = __import__('json').loads((run / 'config.json').read_text())['theta_names'].index('model')
    records = [np.load(run / f'theta_{n}.npy')[:, j] for n in ['cos', 'norm_plus', 'norm_minus', 'norm_grad']]
    records += [np.load(run / f'probe_{n}.npy').reshape(S + 1, -1)
                for n in ['cos_plus_minus', 'norm_plus', 'norm_minus', 'norm_grad']]
    for row, (a, b) in zip(rows, spans):
        for cell, rec in zip(row[2:], records):
            window = rec[a:b + 1]
            expected = np.nanmean(window if window.ndim == 1 else np.nanmean(window, axis=1))
            # printed to 3 significant digits
            assert float(cell) == pytest.approx(expected, rel=5e-3, abs=1e-6)

    row = next(line for line in report if line.startswith('| known | (')).split('|')[2:-1]
    counts = torch.from_numpy(np.load(run / 'train_counts.npy'))
    bucket, edges = metrics.frequency_buckets(counts, N_BUCKETS)
    bucket_of_target = bucket.numpy()[np.load(run / 'probe_tokens.npy')[:, 1:]]  # (P, T)
    plus, minus = np.load(run / 'probe_cos_h_plus.npy'), np.load(run / 'probe_cos_h_minus.npy')
    assert len(row) == len(edges) - 1
    for k, cell in enumerate(row):
        mask = bucket_of_target == k
        if not mask.any():
            assert cell.strip() == 'n/a'
            continue
        best = int(np.argmin([probe[t][mask].mean() for t in range(S + 1)]))
        numbers = [float(x) for x in re.findall(r'[+-]\d\.\d\d', cell)]
        assert int(re.search(r' at (\d+) ', cell).group(1)) == best
        for got, t in zip([numbers[:2], numbers[2:]], [best, S]):
            assert got == pytest.approx([np.nanmean(plus[t][mask]), np.nanmean(minus[t][mask])], abs=0.0051)


GRAD_RECORDS = ['train_loss_pred', 'opposition_mean', 'opposition_weighted', 'opposition_hist']  # (G, ...)


def first_grad_step_only(run):
    """A run rewritten as train.py writes it when grad_steps lie within 0..S-1: a 1-step run
    then has grad_steps [0] and one row in each grad record."""
    config = json.loads((run / 'config.json').read_text())
    np.save(run / 'grad_steps.npy', np.zeros(1, dtype=np.int64))
    for name in GRAD_RECORDS:
        np.save(run / f'{name}.npy', np.load(run / f'{name}.npy')[:1])
        config['records'][name][0][0] = 1
    (run / 'config.json').write_text(json.dumps(config))


def drawn_and_noted(folder, out=False):
    """(figure names in report.md, the report), after checking that the folder holds exactly
    those figures and the report (and, under --out, the manifest), that the manifest of the folder
    plot.py wrote into (the run folder, or --out itself) lists exactly them, each figure non-blank,
    and every other figure noted as not drawn."""
    report = (folder / 'report.md').read_text()
    drawn = [n for n in NAMES if f"]({n}.png)" in report]
    files = [n + '.png' for n in drawn] + ['report.md']
    assert sorted(os.listdir(folder)) == sorted(files + [runs.MANIFEST] * out)
    root, under = (folder, '') if out else (folder.parent, 'figures')
    listed = {p for p in runs.owned(str(root)) if p.startswith(under)}
    assert listed == {os.path.join(under, f) for f in files}
    assert_figures(folder, drawn)
    for name in NAMES:
        assert (name in drawn) != (f"{name}: not drawn" in report), name
    return drawn, report


def test_one_and_two_step_runs_plot_what_they_can_and_say_what_they_cannot(tmp_path, cache_dir):
    runs = []
    for steps in ['1', '2']:
        runs.append(tmp_path / f'steps{steps}')
        run_train(*TINY, '--max_iters', steps, '--cache_dir', cache_dir, '--out_dir', str(runs[-1]))
    runs.append(tmp_path / 'grad0')  # the 1-step run with grad_steps [0], however train.py writes it
    shutil.copytree(runs[0], runs[-1])
    first_grad_step_only(runs[-1])
    for run in runs:
        proc = run_plot(str(run))
        assert proc.returncode == 0 and 'Traceback' not in proc.stderr, (run.name, proc.stderr)
        drawn, report = drawn_and_noted(run / 'figures')
        assert 'fig6_saturation' in drawn and 'fig7_basis' in drawn, run.name  # not against steps
        assert ('fig1_loss' in drawn) == (run.name == 'steps2'), run.name  # step 1 is the first on a log axis
    proc = run_plot(*map(str, runs), '--out', str(tmp_path / 'together'))
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr
    assert 'fig1_loss' in drawn_and_noted(tmp_path / 'together', out=True)[0]


def unwritten(run, rows):
    """The run as train.py leaves it before writing row `rows` of any record: rows from there on
    NaN (integers -1), progress.json saying so."""
    config = json.loads((run / 'config.json').read_text())
    for name in config['records']:
        a = np.load(run / f'{name}.npy', mmap_mode='r+')
        a[rows:] = np.nan if a.dtype.kind == 'f' else -1
        a.flush()
    (run / 'progress.json').write_text(json.dumps(dict(steps_done=rows, max_iters=config['max_iters'])))


def test_a_run_at_its_first_step_plots_what_it_has_and_nothing_is_one_line(sweep, tmp_path, cache_dir):
    for rows in [1, 0]:
        run = tmp_path / f'rows{rows}'
        shutil.copytree(sweep / 'runs' / 'large', run, ignore=IGNORE)
        unwritten(run, rows)
        proc = run_plot(str(run))
        assert proc.returncode == 0 and 'Traceback' not in proc.stderr, (rows, proc.stderr)
        drawn, report = drawn_and_noted(run / 'figures')
        assert 'fig6_saturation' in drawn and 'fig1_loss' not in drawn  # the Zipf plot needs no step
        assert re.search(rf'\| rows{rows} \| [0-9,]+ \| {rows} \|', report)
    # a bare run (--record none) with no row written has nothing any figure can draw
    bare = tmp_path / 'bare'
    run_train(*TINY, '--max_iters', '2', '--record', 'none', '--cache_dir', cache_dir, '--out_dir', str(bare))
    unwritten(bare, 0)
    proc = run_plot(str(bare))
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and 'nothing to plot' in proc.stderr, proc.stderr
    assert not (bare / 'figures').exists()


def test_plot_writes_only_its_own_files_and_never_through_a_link(sweep, tmp_path):
    run = str(sweep / 'runs' / 'small')
    # --out naming a file: one line, the file untouched
    user = tmp_path / 'user.txt'
    user.write_text('mine')
    proc = run_plot(run, '--out', str(user))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert 'not a folder' in proc.stderr and user.read_text() == 'mine'
    # a folder holding files plot.py did not write, or a link: one line, nothing touched
    out = tmp_path / 'figs'
    out.mkdir()
    (out / 'notes.md').write_text('my notes')
    (out / 'fig1_loss.svg').write_text('my drawing')
    (out / 'report.md').write_text('old report')
    os.symlink(user, out / 'fig2_deceleration.png')
    proc = run_plot(run, '--out', str(out))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert 'did not write' in proc.stderr and 'fig1_loss.svg' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert sorted(os.listdir(out)) == ['fig1_loss.svg', 'fig2_deceleration.png', 'notes.md', 'report.md']
    assert (out / 'notes.md').read_text() == 'my notes'
    assert (out / 'fig1_loss.svg').read_text() == 'my drawing'
    assert (out / 'report.md').read_text() == 'old report' and (out / 'fig2_deceleration.png').is_symlink()
    assert user.read_text() == 'mine'
    # its own folder: plot.py's files replaced, and those of an earlier time that it no longer draws deleted
    for name in os.listdir(out):
        os.remove(out / name)
    assert run_plot(run, '--out', str(out)).returncode == 0
    (out / 'report.md').write_text('old report')
    runs.write_atomic(str(out), 'fig10_paper_protocol.png', lambda f: f.write(b'an old figure'))
    proc = run_plot(run, '--out', str(out))
    assert proc.returncode == 0, proc.stderr
    assert 'old report' not in (out / 'report.md').read_text()
    assert_figures(out, NAMES)
    assert sorted(os.listdir(out)) == sorted([n + '.png' for n in NAMES] + ['report.md', runs.MANIFEST])
    assert runs.owned(str(out)) == {n + '.png' for n in NAMES} | {'report.md'}
    # a folder where a figure goes is not plot.py's: one line, nothing written
    out = tmp_path / 'blocked'
    (out / 'fig9_geometry.png').mkdir(parents=True)
    proc = run_plot(run, '--out', str(out))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert 'fig9_geometry.png' in proc.stderr and 'Traceback' not in proc.stderr
    assert os.listdir(out) == ['fig9_geometry.png']


def test_bucket_labels_are_each_runs_own(tmp_path, cache_dir):
    """Two vocabularies give two sets of bucket edges: fig6 labels every run by its own."""
    import metrics
    import torch
    import plot
    paths = []
    for vocab in ['300', '400']:
        paths.append(str(tmp_path / f'V{vocab}'))
        args = [*TINY, '--max_iters', '4', '--cache_dir', cache_dir, '--out_dir', paths[-1]]
        args[args.index('--vocab_size') + 1] = vocab
        run_train(*args)
    runs = [plot.load_run(p) for p in paths]
    labels = []
    for r in runs:
        r.update(color='k', fit=plot.fit_run(r, plot.bnsl.MIN_STEP))
        counts = torch.from_numpy(np.load(os.path.join(r['path'], 'train_counts.npy')))
        _, edges = metrics.frequency_buckets(counts, N_BUCKETS)
        labels.append([f"ranks {int(a) + 1}-{int(b)}" for a, b in zip(edges[:-1], edges[1:])])
        assert plot.bucket_labels(r) == labels[-1]
    assert labels[0] != labels[1]
    # bucket k is ranks a-b of one vocabulary, c-d of the other: 'a-b | c-d'
    both = [' | '.join(lab[k].split(' ')[1] if k < len(lab) else '-' for lab in labels)
            for k in range(max(map(len, labels)))]
    fig = plot.draw_figure('fig6_saturation', runs)
    fig.canvas.draw()
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == both
    assert fig.axes[1].get_xlabel() == 'ranks of V = 300 | V = 400'
    for ax, lab in zip(fig.axes[2:], labels):  # the panel of each run: its own buckets (those with tokens)
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend and legend == [name for name in lab if name in legend]
    # one vocabulary: the labels as they were
    fig = plot.draw_figure('fig6_saturation', runs[:1])
    fig.canvas.draw()
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == labels[0]
    plt.close('all')
    # the report's bucket tables: the same columns
    assert run_plot(*paths, '--out', str(tmp_path / 'f')).returncode == 0
    report = (tmp_path / 'f' / 'report.md').read_text()
    header = '| run | ' + ' | '.join(b.replace(' | ', r' \| ') for b in both) + ' |'
    assert report.count(header) == 2, header  # dissent in h and the 2D basis per bucket
    assert report.count(r'Columns: ranks of V = 300 \| V = 400.') == 2
    for r, lab in zip(runs, labels):  # the saturation table: a row per run and bucket, its own ranks
        assert [row[1] for row in report_rows(report, r['name'])] == lab


def figures_of(monkeypatch, *args):
    """plot.main(args) in this process, its figures kept open instead of closed after saving."""
    import plot
    figs = []
    with monkeypatch.context() as m:
        m.setattr(plot.plt, 'close', figs.append)
        plot.main(list(args))
    return figs


def test_log_axes_under_a_decade_have_plain_tick_labels(sweep, tmp_path, monkeypatch):
    figs = figures_of(monkeypatch, str(sweep / 'runs'), '--out', str(tmp_path / 'f'))
    short = 0
    for fig in figs:
        fig.canvas.draw()
        for ax in fig.axes:
            for axis, (lo, hi) in [(ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())]:
                if axis.get_scale() != 'log' or max(lo, hi) >= 10 * min(lo, hi):
                    continue
                short += 1
                texts = [t.get_text() for t in axis.get_ticklabels() + axis.get_ticklabels(minor=True)]
                assert any(texts), texts
                assert not any('times' in t or '10^' in t for t in texts), texts
    assert short >= 2  # the loss of fig1 and the parameter axes of fig2 at least
    plt.close('all')


def test_the_run_legend_lies_inside_the_figure(sweep, tmp_path, monkeypatch):
    """Four runs with long names: the legend of every figure lies inside it, above the panels. A name
    with '$' or brackets is found, and drawn as written (never as math text)."""
    names = [f'a_rather_long_run_name_{k}' for k in range(3)] + ['a $rather$ long [run] name_3']
    for k, name in enumerate(names):
        shutil.copytree(sweep / 'runs' / ['small', 'large'][k % 2], tmp_path / 'runs' / name, ignore=IGNORE)
    figs = figures_of(monkeypatch, str(tmp_path / 'runs'), '--out', str(tmp_path / 'f'))
    assert len(figs) == len(NAMES)
    assert '| a $rather$ long [run] name_3 |' in (tmp_path / 'f' / 'report.md').read_text()
    for fig in figs:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        box = fig.legends[0].get_window_extent(renderer)
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1, (box, fig.bbox)
        assert len(fig.legends[0].get_texts()) == 4
        assert any('rather' in t.get_text() for t in fig.legends[0].get_texts())
        assert any(t.get_text().endswith('[a $rather$ long [run] name_3]') for t in fig.legends[0].get_texts())
        for text in [t for t in fig.findobj(matplotlib.text.Text) if 'rather' in t.get_text()]:
            assert not text._preprocess_math(text.get_text())[1], text.get_text()  # not math text
        for ax in fig.axes:  # the panels and their titles stay below it
            assert ax.get_tightbbox(renderer).y1 <= box.y0 + 1, ax.get_title()
    plt.close('all')


def bucket_mean_brute(per_token, bucket_of_target, k):
    """(rows,): the mean of a (rows, N, T) record over the tokens whose target is in bucket k, by an
    explicit mask, NaN values left out."""
    mask = bucket_of_target == k
    return np.array([np.nanmean(row[mask]) for row in per_token])


def report_rows(report, name):
    """The cells of the bucket table's rows of run `name` (one per bucket)."""
    return [[c.strip() for c in line.split('|')[1:-1]] for line in report.splitlines()
            if line.startswith(f'| {name} | ranks ')]


def test_bucket_onsets_and_the_training_window_probe(tmp_path, cache_dir):
    """A run with --train_probe_seqs whose records are rewritten with known curves: bucket 0's
    held-out loss falls and then rises while its training-window loss keeps falling (overfitting), bucket
    1 falls and then stays flat in both (capacity saturation), bucket 2's held-out loss only grows
    (never improved). The report's bucket table holds the probe-token counts, best and final loss and
    the onsets of metrics.py on the smoothed bucket curves, and fig6 marks those onsets in a
    held-out and a training-window panel."""
    import bnsl
    import metrics
    import plot
    import torch
    run = tmp_path / 'known'
    run_train(*TINY, *SHORT, '--train_probe_seqs', '4', '--cache_dir', cache_dir, '--out_dir', str(run))
    counts = torch.from_numpy(np.load(run / 'train_counts.npy'))
    bucket, edges = metrics.frequency_buckets(counts, N_BUCKETS)
    t = np.arange(31, dtype=float)
    falls = 5 - 2 * np.log1p(t) / np.log(31)  # falls to 3 at step 30
    shapes = [np.where(t <= 15, falls, falls[15] + 0.1 * (t - 15)), np.where(t <= 10, falls, falls[10]),
              5 + 0.05 * t]  # buckets 0, 1, 2 held-out
    train_shapes = [falls, np.where(t <= 10, falls, falls[10]), 5 + 0.05 * t]
    targets = {}
    for name, curves in [('probe_loss', shapes), ('train_probe_loss', train_shapes)]:
        tokens = np.load(run / ('probe_tokens.npy' if name == 'probe_loss' else 'train_probe_tokens.npy'))
        targets[name] = bucket.numpy()[tokens[:, 1:]]  # (rows, T) bucket of each target
        a = np.load(run / f'{name}.npy', mmap_mode='r+')  # (S + 1, rows, T)
        for k, curve in enumerate(curves):
            a[:, targets[name] == k] = curve[:, None]
        a.flush()
    assert run_plot(str(run)).returncode == 0
    report = (run / 'figures' / 'report.md').read_text()
    rows = report_rows(report, 'known')
    assert len(rows) == len(edges) - 1 and len(rows[0]) == 13
    expected = {}
    for name in ['probe_loss', 'train_probe_loss']:
        loss = np.load(run / f'{name}.npy').astype(np.float64)
        for k in range(len(edges) - 1):
            if not (targets[name] == k).any():
                continue
            curve = bucket_mean_brute(loss, targets[name], k)
            smooth = torch.from_numpy(bnsl.log_moving_average(curve))
            never = bool(smooth[1:].min() >= smooth[0])
            plateau = metrics.plateau_onset(smooth, torch.arange(31))
            expected[name, k] = (int((targets[name] == k).sum()), curve, never, plateau,
                                 metrics.rise_onset(smooth))
    for k, row in enumerate(rows):
        for name, cells in [('probe_loss', row[2:7]), ('train_probe_loss', row[7:12])]:
            if (name, k) not in expected:
                assert cells[0] == '0' and cells[1:] == ['n/a'] * 4, cells
                continue
            n, curve, never, plateau, rise = expected[name, k]
            assert cells[0] == str(n)
            assert cells[1] == f"{curve.min():.3f} ({np.argmin(curve)})" and cells[2] == f"{curve[-1]:.3f}"
            if never:
                assert cells[3:] == ['-', 'never improved'], cells
            else:
                assert cells[3:] == [str(plateau) if plateau is not None else 'none',
                                     str(rise) if rise is not None else 'none'], cells
    # the planted shapes, as the table reads them
    assert expected['probe_loss', 0][4] is not None and expected['train_probe_loss', 0][4] is None
    assert rows[0][12].endswith('overfitting') and rows[1][12].endswith('capacity saturation')
    assert rows[2][6] == 'never improved' and rows[2][11] == 'never improved'
    assert 10 < int(rows[1][5]) <= 15  # the plateau onset near the planted flattening at step 10
    # fig6: a held-out and a training-window panel, each bucket's onsets marked on its curve
    r = plot.load_run(str(run))
    r.update(color='k', fit=plot.fit_run(r, plot.bnsl.MIN_STEP))
    fig = plot.draw_figure('fig6_saturation', [r])
    assert len(fig.axes) == 4 and 'training windows' in fig.axes[3].get_title()
    for ax, name in [(fig.axes[2], 'probe_loss'), (fig.axes[3], 'train_probe_loss')]:
        marks = {m: [tuple(line.get_xydata()[0]) for line in ax.lines if line.get_marker() == m]
                 for m in ['v', '^']}
        onset_steps = {'v': [], '^': []}
        for k in range(len(edges) - 1):
            if (name, k) in expected and not expected[name, k][2]:
                _, curve, _, plateau, rise = expected[name, k]
                onset_steps['v'] += [(plateau, curve[plateau])] if plateau is not None else []
                onset_steps['^'] += [(rise, curve[rise])] if rise is not None else []
        for m in ['v', '^']:  # steps exactly, values to rel 1e-6, pair by pair
            got, want = sorted(marks[m]), sorted(onset_steps[m])
            assert len(got) == len(want), (name, m)
            for (gs, gv), (ws, wv) in zip(got, want):
                assert gs == ws and gv == pytest.approx(wv, rel=1e-6), (name, m)
    assert fig.axes[2].lines and any(line.get_marker() == '^' for line in fig.axes[2].lines)
    plt.close('all')


def test_dissent_figure_and_tables_are_the_records(sweep):
    """fig8: the batch-level cosine in theta labelled so, the dissent ratio |g| / (|g+| + |g-|) in
    theta from the theta_norm_* records, and per run and bucket the mean over the bucket's probe tokens
    of cos(grad_h+, grad_h-) and of the per-token ratio, each against a brute-force recomputation;
    the report's per-bucket h table holds the same at the first and last step."""
    import metrics
    import plot
    import torch
    path = sweep / 'runs' / 'large'
    run = plot.load_run(str(path))
    run.update(color='k', fit=plot.fit_run(run, plot.bnsl.MIN_STEP))
    fig = plot.draw_figure('fig8_dissent', [run])
    assert len(fig.axes) == 8 and 'batch-level' in fig.axes[1].get_title()
    j = json.loads((path / 'config.json').read_text())['theta_names'].index('model')
    norms = {n: np.load(path / f'theta_{n}.npy')[:, j] for n in ['norm_grad', 'norm_plus', 'norm_minus']}
    ratio = norms['norm_grad'] / (norms['norm_plus'] + norms['norm_minus'])
    raw = fig.axes[3].lines[0]  # per step, then smoothed
    np.testing.assert_allclose(raw.get_ydata(), ratio[raw.get_xdata().astype(int)], rtol=1e-12)
    assert np.all((ratio > 0) & (ratio <= 1))
    counts = torch.from_numpy(np.load(path / 'train_counts.npy'))
    bucket, edges = metrics.frequency_buckets(counts, N_BUCKETS)
    of_target = bucket.numpy()[np.load(path / 'probe_tokens.npy')[:, 1:]]
    h = {n: np.load(path / f'probe_{n}.npy').astype(np.float64)
         for n in ['cos_plus_minus', 'norm_grad', 'norm_plus', 'norm_minus']}
    h_ratio = h['norm_grad'] / (h['norm_plus'] + h['norm_minus'])  # per token
    present = [k for k in range(len(edges) - 1) if (of_target == k).any()]
    for ax, values in [(fig.axes[6], h['cos_plus_minus']), (fig.axes[7], h_ratio)]:
        lines = [line for line in ax.lines if line.get_label() in plot.bucket_labels(run)]
        assert [line.get_label() for line in lines] == [plot.bucket_labels(run)[k] for k in present]
        for line, k in zip(lines, present):
            brute = bucket_mean_brute(values, of_target, k)
            np.testing.assert_allclose(line.get_ydata(), brute[line.get_xdata().astype(int)], rtol=1e-9)
    plt.close('all')
    assert run_plot(str(path)).returncode == 0
    report = (path / 'figures' / 'report.md').read_text()
    section = report[report.index('## Dissent in h per frequency bucket'):]
    row = next(line for line in section.splitlines() if line.startswith('| large |')).split('|')[2:-1]
    S = len(h_ratio) - 1
    for k, cell in enumerate(row):
        if k not in present:
            assert cell.strip() == 'n/a'
            continue
        numbers = [float(x) for x in re.findall(r'[+-]?\d\.\d\d', cell)]
        want = [bucket_mean_brute(v, of_target, k)[s] for v in (h['cos_plus_minus'], h_ratio) for s in (0, S)]
        assert numbers == pytest.approx(want, abs=0.0051) and f"(at 0 -> {S})" in cell


def test_loss_change_histogram_and_hidden_norms_are_the_records(sweep):
    """fig3's last panel: the histograms of the first run's per-token probe-loss changes
    x_i = probe_loss[t+1] - probe_loss[t] at the last step before t_d / 2 (the first without a fit) and
    at the last step, on 40 shared bins symmetric around 0; fig9's per-run panel: the mean |h| of the
    probe tokens per frequency bucket at the hidden steps, each against the records."""
    import metrics
    import plot
    import torch
    path = sweep / 'runs' / 'large'
    run = plot.load_run(str(path))
    run.update(color='k', fit=plot.fit_run(run, plot.bnsl.MIN_STEP))
    probe = np.load(path / 'probe_loss.npy').astype(np.float64)
    x = (probe[1:] - probe[:-1]).reshape(len(probe) - 1, -1)  # (S, P T)
    t_d = run['fit'].get('t_d')
    steps = [max(t for t in range(len(x)) if t < t_d / 2) if t_d is not None else 0, len(x) - 1]
    fig = plot.draw_figure('fig3_zero_sum', [run])
    lines = [line for line in fig.axes[4].lines if line.get_label().startswith('t = ')]
    assert [line.get_label() for line in lines] == [f"t = {t}" for t in steps]
    lim = np.abs(x[steps]).max()
    edges = np.linspace(-lim, lim, 41)
    for line, t in zip(lines, steps):
        np.testing.assert_allclose(line.get_xdata(), (edges[:-1] + edges[1:]) / 2)
        np.testing.assert_array_equal(line.get_ydata(), np.histogram(x[t], edges)[0])
        assert line.get_ydata().sum() == x.shape[1]  # every probe token counted once
    fig = plot.draw_figure('fig9_geometry', [run])
    counts = torch.from_numpy(np.load(path / 'train_counts.npy'))
    bucket, edges = metrics.frequency_buckets(counts, N_BUCKETS)
    of_target = bucket.numpy()[np.load(path / 'probe_tokens.npy')[:, 1:]]  # (P, T)
    norms = np.linalg.norm(np.load(path / 'probe_hidden.npy').astype(np.float64), axis=-1)  # (K, P, T)
    hidden_steps = np.load(path / 'hidden_steps.npy')
    present = [k for k in range(len(edges) - 1) if (of_target == k).any()]
    lines = [line for line in fig.axes[3].lines if line.get_label() in plot.bucket_labels(run)]
    assert 'h' in fig.axes[3].get_title() and len(lines) == len(present) > 0
    assert [line.get_label() for line in lines] == [plot.bucket_labels(run)[k] for k in present]
    for line, k in zip(lines, present):
        rows = np.searchsorted(hidden_steps, line.get_xdata())
        np.testing.assert_array_equal(hidden_steps[rows], line.get_xdata())
        assert len(rows) == (hidden_steps > 0).sum()  # every hidden step after 0 (log step axis)
        np.testing.assert_allclose(line.get_ydata(), bucket_mean_brute(norms, of_target, k)[rows], rtol=1e-5)
    plt.close('all')


def test_runs_are_found_below_a_run_once_each_and_labelled_by_what_they_are(sweep, tmp_path, monkeypatch):
    """A run folder holding runs in subfolders, and a link back to its parent: plot.py DIR plots every
    run once, DIR itself included, and says how many it found; the legend names each run by its size
    and what differs between the runs (not by folder names); an undecodable folder name is escaped."""
    top = tmp_path / 'top'
    shutil.copytree(sweep / 'runs' / 'large', top, ignore=IGNORE)
    shutil.copytree(sweep / 'runs' / 'small', top / 'sub', ignore=IGNORE)
    os.symlink(tmp_path, top / 'sub' / 'loop')  # a link to an ancestor: never followed
    proc = run_plot(str(top))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith('2 runs found:'), proc.stdout
    report = (top / 'figures' / 'report.md').read_text()
    assert '| top |' in report and '| sub |' in report and 'loop' not in report
    figs = figures_of(monkeypatch, str(sweep / 'runs'), '--out', str(tmp_path / 'f'))
    labels = [t.get_text() for t in figs[0].legends[0].get_texts()]
    assert [label.split(' (')[0] for label in labels] == ['1L/16d', '2L/16d'], labels
    assert not any('small' in label or 'large' in label for label in labels), labels
    plt.close('all')
    odd = os.path.join(os.fsencode(tmp_path), b'odd\xff')
    shutil.copytree(sweep / 'runs' / 'small', os.fsdecode(odd), ignore=IGNORE)
    proc = run_plot(os.fsdecode(odd), '--out', str(tmp_path / 'odd_figs'))
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr
    assert '| odd\\xff |' in (tmp_path / 'odd_figs' / 'report.md').read_text()


def test_line_styles_are_keyed_in_legends_and_t_d_is_labelled(sweep):
    """fig4 and fig8 key their line styles in each panel's legend (titles stay one line); fig1 keys the
    fit, its power laws and both conventions' break; a run's t_d line is labelled 't_d'."""
    import plot
    run = plot.load_run(str(sweep / 'runs' / 'large'))
    run.update(color='k', label='large', fit=plot.fit_run(run, plot.bnsl.MIN_STEP))
    for name, panel, keys in [('fig4_opposition', 1, ['blocks', 'blocks, |g|-weighted', 'null of blocks',
                                                      'every coordinate']),
                              ('fig8_dissent', 4, ['|grad|', '|grad+|', '|grad-|']),
                              ('fig1_loss', 0, ['1-break BNSL fit', '(t_d, L_d), published convention'])]:
        fig = plot.draw_figure(name, [run])
        assert all('\n' not in ax.get_title() for ax in fig.axes), name
        legend = [t.get_text() for t in fig.axes[panel].get_legend().get_texts()]
        assert all(k in legend for k in keys), (name, legend)
    assert [t.get_text() for t in fig.axes[0].texts] == []  # fig1 marks t_d with its dot
    run['fit'] = dict(identifiable=True, t_d=5.0)  # a break at step 5
    fig = plot.draw_figure('fig3_zero_sum', [run])
    assert [t.get_text().strip() for t in fig.axes[0].texts] == ['t_d']
    plt.close('all')


def test_the_report_gives_the_published_c_terms_beside_the_blocks(tmp_path, cache_dir):
    """measure.py's update-weighted terms in the report: Cg, Cug, C_i_dli of the blocks and of every
    parameter (the published set: 'model'), each the record's value."""
    run = tmp_path / 'kept'
    run_train(*TINY, '--max_iters', '4', '--keep_ckpts', 'log2', '--cache_dir', cache_dir, '--out_dir', str(run))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'measure.py'), str(run), '--tokens', '32',
                           '--batches', '1', '--steps', '2', '--threads', '1'], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert run_plot(str(run)).returncode == 0
    report = (run / 'figures' / 'report.md').read_text()
    assert 'Cg, Cug, C_i_dli model (the published set)' in report
    paper = next(run.glob('paper*'))
    keys = json.loads((paper / 'progress.json').read_text())['opposition_keys']
    terms = {t: np.load(paper / f'update_{t}.npy') for t in ('Cg', 'Cug', 'C_i_dli')}
    row = next(line for line in report.splitlines() if line.startswith('| 2 |')).split('|')[1:-1]
    for cell, key in zip(row[-2:], ['blocks', 'model']):
        assert cell.strip() == ', '.join(f"{terms[t][0, keys.index(key)]:.3f}" for t in terms), (cell, key)
