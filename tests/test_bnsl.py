"""bnsl.py: the 1-break BNSL fit of loss deceleration, its preprocessing, and its command line."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import bnsl
from studies.bnsl_synthetic import STUDY_FORM, synthetic_curve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T_LOG = np.unique(np.round(np.geomspace(1, 5000, 200)))  # ~150 log-spaced integer steps, 1..5000
T_ALL = np.arange(5000, dtype=float)  # every step of a run, as in train_loss.npy (row t = step t)

# (t_d, c0, c1, f1): decelerating (c1 < 0: slope c0 before, r_d = c0 + c1 < c0 after), sharp
# and gradual breaks, early and late, and one accelerating curve (c1 > 0)
CASES = [(30, 0.3, -0.25, 0.05), (150, 0.6, -0.45, 0.3), (400, 0.8, -0.6, 1.0),
         (1500, 0.3, -0.2, 0.1), (200, 0.5, 0.3, 0.5)]


def curve(t, t_d, c0, c1, f1, b=5.0, noise=0.0, seed=0):
    """A BNSL loss curve at steps t (t = 0 evaluated at t = 1), with multiplicative log-normal noise."""
    L = bnsl.bnsl_1break(np.maximum(t, 1), b, c0, c1, t_d, f1)
    return L * np.exp(noise * np.random.default_rng(seed).standard_normal(len(t)))


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'bnsl.py'), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def write_csv(path, steps, loss, header=True):
    with open(path, 'w') as f:
        f.write('step,loss\n' if header else '')
        f.writelines(f"{s:g},{float(v)!r}\n" for s, v in zip(steps, loss))
    return path


def write_run(path, loss, n_rows, dtype=np.float32):
    """A run directory as train.py writes it: train_loss.npy preallocated with NaN, filled in front."""
    os.makedirs(path)
    rec = np.full(n_rows, np.nan, dtype=dtype)
    rec[:len(loss)] = loss
    np.save(os.path.join(path, 'train_loss.npy'), rec)
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump({'max_iters': n_rows}, f)
    return path

# -----------------------------------------------------------------------------
# the functional form


def test_nbreak_form_matches_closed_form_and_1break():
    t = np.geomspace(1, 1e4, 50)
    b, c0, cs, ds, fs = 4.0, 0.5, [-0.3, 0.1], [50.0, 2000.0], [0.2, 0.7]
    closed = b * t ** -c0 * np.prod([(1 + (t / d) ** (1 / f)) ** (-c * f) for c, d, f in zip(cs, ds, fs)],
                                    axis=0)
    np.testing.assert_allclose(bnsl.bnsl(t, b, c0, cs, ds, fs), closed, rtol=1e-12)
    np.testing.assert_allclose(bnsl.bnsl_1break(t, b, c0, -0.3, 50.0, 0.2),
                               bnsl.bnsl(t, b, c0, [-0.3], [50.0], [0.2]), rtol=1e-15)
    # slopes: c0 well before the break, c0 + c1 well after (for one break)
    x = np.log([1e-6, 2e-6, 1e9, 2e9])
    y = bnsl.log_bnsl(x, 0.0, c0, [-0.3], [math.log(50.0)], [0.2])
    assert -(y[1] - y[0]) / (x[1] - x[0]) == pytest.approx(c0, abs=1e-9)
    assert -(y[3] - y[2]) / (x[3] - x[2]) == pytest.approx(c0 - 0.3, abs=1e-9)


def test_softplus_is_stable_for_sharp_breaks():
    y = bnsl.log_bnsl(np.log([1.0, 1e6]), 0.0, 0.5, [-0.3], [math.log(10.0)], [1e-3])
    assert np.all(np.isfinite(y))


def test_mirror_solution_is_the_same_curve():
    """The trap the bound f1 > 0 removes: (log b, c0, c1, f1) -> (log b + c1 log d1, c0 + c1, -c1, -f1)
    gives the same curve."""
    x = np.log(T_LOG)
    y = bnsl.log_bnsl(x, 1.0, 0.6, [-0.45], [math.log(150)], [0.3])
    y_mirror = bnsl.log_bnsl(x, 1.0 - 0.45 * math.log(150), 0.6 - 0.45, [0.45], [math.log(150)], [-0.3])
    np.testing.assert_allclose(y_mirror, y, atol=1e-12)


def test_jacobian_matches_finite_differences():
    x = np.log(T_LOG)
    p = np.array([1.2, 0.6, -0.45, math.log(150), 0.3])
    J = bnsl.log_bnsl_jacobian(x, p)
    for k in range(5):
        h = np.zeros(5)
        h[k] = 1e-6
        fd = (bnsl.log_bnsl(x, *(p + h)[:2], [(p + h)[2]], [(p + h)[3]], [(p + h)[4]])
              - bnsl.log_bnsl(x, *(p - h)[:2], [(p - h)[2]], [(p - h)[3]], [(p - h)[4]])) / 2e-6
        np.testing.assert_allclose(J[:, k], fd, atol=1e-7)



def averaged_case(n_rows=400, factor=1.2):
    """A grid of rows 5..n_rows-1 and the trailing windows of a log-spaced subset of them."""
    steps = np.arange(5.0, n_rows)
    starts = bnsl.window_starts(n_rows, factor)[5:] - 5  # windows in grid rows (all start >= row 4 - 4)
    kept = np.unique(np.round(np.geomspace(10, n_rows - 6, 40)).astype(int))
    return steps, starts[kept], kept


def test_averaged_form_matches_brute_force():
    """log A_i = log mean(L(t_k)) over each window, against an explicit float64 loop."""
    steps, first, last = averaged_case()
    p = np.array([1.2, 0.6, -0.45, math.log(60), 0.3])
    L = bnsl.bnsl_1break(steps, math.exp(p[0]), p[1], p[2], math.exp(p[3]), p[4])
    brute = [math.log(np.mean(L[a:b + 1])) for a, b in zip(first, last)]
    np.testing.assert_allclose(bnsl.log_averaged_bnsl(np.log(steps), first, last, p), brute, rtol=1e-12)
    p_far = p + np.array([800.0, 0, 0, 0, 0])  # exp(800) overflows; the averaged form must not
    np.testing.assert_allclose(bnsl.log_averaged_bnsl(np.log(steps), first, last, p_far),
                               np.array(brute) + 800.0, rtol=1e-12)


def test_averaged_jacobian_matches_finite_differences():
    steps, first, last = averaged_case()
    xg = np.log(steps)
    for p in [np.array([1.2, 0.6, -0.45, math.log(60), 0.3]), np.array([0.5, 0.3, 0.2, math.log(200), 0.05])]:
        J = bnsl.log_bnsl_jacobian(xg, p, first, last)
        assert J.shape == (len(first), 5)
        for k in range(5):
            h = np.zeros(5)
            h[k] = 1e-6
            fd = (bnsl.log_averaged_bnsl(xg, first, last, p + h)
                  - bnsl.log_averaged_bnsl(xg, first, last, p - h)) / 2e-6
            np.testing.assert_allclose(J[:, k], fd, atol=1e-7)


def test_log_window_mean_matches_brute_force():
    y = np.random.default_rng(1).normal(size=300) * 3
    first, last = np.array([0, 5, 17, 100, 299]), np.array([0, 9, 200, 100, 299])
    brute = [math.log(np.mean(np.exp(y[a:b + 1]))) for a, b in zip(first, last)]
    # differences of cumulative sums lose digits where a small window follows large values (e^9 here)
    np.testing.assert_allclose(bnsl.log_window_mean(y, first, last), brute, rtol=0, atol=1e-9)

# -----------------------------------------------------------------------------
# preprocessing


def test_log_moving_average_matches_brute_force():
    y = np.random.default_rng(0).random(1000)
    for factor in [1.2, 1.5, 2.0]:
        brute = [np.mean(y[math.floor(j / factor):j + 1]) for j in range(len(y))]
        np.testing.assert_allclose(bnsl.log_moving_average(y, factor), brute, rtol=1e-12)


def test_kept_rows_log_subsample():
    steps = np.arange(1, 100001, dtype=float)
    i = bnsl.kept_rows(steps, min_step=0, n_points=200)
    assert i[0] == 0 and i[-1] == len(steps) - 1 and np.all(np.diff(i) > 0) and len(i) <= 200
    gaps = np.diff(np.log(steps[i]))[-50:]  # where steps are dense, the spacing in log t is even
    np.testing.assert_allclose(gaps, gaps.mean(), rtol=0.01)
    np.testing.assert_array_equal(bnsl.kept_rows(steps[:50], min_step=0, n_points=200), np.arange(50))


def test_preprocess_switches():
    loss = curve(T_ALL, 150, 0.6, -0.45, 0.3, noise=0.05)
    s, v = bnsl.preprocess(T_ALL, loss, smooth=False, subsample=False, min_step=0)
    np.testing.assert_array_equal(s, T_ALL[1:])  # only t = 0 (no log) is dropped
    np.testing.assert_array_equal(v, loss[1:])
    s, v = bnsl.preprocess(T_ALL, loss, subsample=False, min_step=100)
    assert s[0] == 101  # the transient t <= min_step is cut after smoothing every row
    np.testing.assert_allclose(v, bnsl.log_moving_average(loss)[101:])
    s, v = bnsl.preprocess(T_ALL, loss)
    assert s[0] == bnsl.MIN_STEP + 1 and s[-1] == 4999 and len(s) <= 200

# -----------------------------------------------------------------------------
# the fit


@pytest.mark.parametrize('t_d,c0,c1,f1', CASES)
def test_recovers_noiseless_parameters(t_d, c0, c1, f1):
    r = bnsl.fit_bnsl(T_LOG, curve(T_LOG, t_d, c0, c1, f1), n_boot=0)
    assert r['identifiable'] and r['reason'] is None
    for key, true in [('t_d', t_d), ('c0', c0), ('c1', c1), ('f1', f1), ('b', 5.0), ('r_d', c0 + c1),
                      ('L_d', 5.0 * t_d ** -c0)]:
        assert r[key] == pytest.approx(true, rel=1e-4), key
    assert r['rsle'] < 1e-8 and r['n_points'] == len(T_LOG)
    assert r['final_loss_pred'] == pytest.approx(5.0 * t_d ** -c0 * (5000 / t_d) ** -(c0 + c1), rel=1e-4)


@pytest.mark.parametrize('t_d,c0,c1,f1', CASES)
@pytest.mark.parametrize('seed', [0, 1])
def test_recovers_parameters_under_noise_raw(t_d, c0, c1, f1, seed):
    """Stated tolerance, raw path (~150 log-spaced points, 2 % multiplicative noise): t_d within
    15 %, slopes c0 and r_d within 0.03. (f1 is poorly determined by noisy data: not checked.)"""
    r = bnsl.fit_bnsl(T_LOG, curve(T_LOG, t_d, c0, c1, f1, noise=0.02, seed=seed), n_boot=0)
    assert r['identifiable']
    assert r['t_d'] == pytest.approx(t_d, rel=0.15)
    assert r['c0'] == pytest.approx(c0, abs=0.03) and r['r_d'] == pytest.approx(c0 + c1, abs=0.03)
    assert r['f1'] > 0 and np.sign(r['c1']) == np.sign(c1)


@pytest.mark.parametrize('t_d,c0,c1,f1', [(150, 0.6, -0.45, 0.3), (500, 0.8, -0.5, 0.5),
                                         (300, 0.4, -0.3, 0.2)])
def test_recovers_parameters_under_noise_preprocessed(t_d, c0, c1, f1):
    """Stated tolerance, published preprocessing of every step 0..4999 with 5 % noise: t_d within
    20 % (the trailing average alone delays t_d by about sqrt(1.2), +9 %), c0 and r_d within 0.05."""
    r = bnsl.fit_bnsl(*bnsl.preprocess(T_ALL, curve(T_ALL, t_d, c0, c1, f1, noise=0.05)), n_boot=20)
    assert r['identifiable']
    assert r['t_d'] == pytest.approx(t_d, rel=0.2) and r['t_d'] > t_d  # the delay of the trailing window
    assert r['c0'] == pytest.approx(c0, abs=0.05) and r['r_d'] == pytest.approx(c0 + c1, abs=0.05)
    for k in ['t_d', 'L_d', 'r_d']:  # intervals bracket the estimate
        for s in ['cov', 'boot']:
            lo, hi = r[f'{k}_ci_{s}']
            assert lo <= r[k] <= hi, (k, s)


@pytest.mark.parametrize('noise', [0.0, 0.05])
def test_never_the_mirror(noise):
    """Deceleration: true c1 < 0, so r_d = c0 + c1 < c0. The fit must return c1 < 0 with f1 > 0,
    not the mirror (c1 > 0, f1 < 0, 'r_d' = the pre-break slope)."""
    for t_d, c0, c1, f1 in [(150, 0.6, -0.45, 0.3), (80, 0.5, -0.4, 0.2), (1000, 0.5, -0.3, 1.0),
                            (2000, 0.3, -0.15, 0.05)]:
        r = bnsl.fit_bnsl(*bnsl.preprocess(T_ALL, curve(T_ALL, t_d, c0, c1, f1, noise=noise)), n_boot=0)
        assert r['identifiable'], r['reason']
        assert r['f1'] > 0 and r['c1'] < 0 and r['r_d'] < r['c0']
        assert r['r_d'] == pytest.approx(c0 + c1, abs=0.05) and r['c0'] == pytest.approx(c0, abs=0.05)


@pytest.mark.parametrize('noise,raw', [(0.0, True), (0.02, True), (0.0, False), (0.1, False)])
def test_pure_power_law_is_not_identifiable(noise, raw):
    steps = T_LOG if raw else T_ALL
    factor = np.exp(noise * np.random.default_rng(3).standard_normal(len(steps)))  # log-normal noise
    loss = 5.0 * np.maximum(steps, 1) ** -0.4 * factor
    steps, loss = (steps, loss) if raw else bnsl.preprocess(steps, loss)
    r = bnsl.fit_bnsl(steps, loss)
    assert not r['identifiable'] and r['reason']
    for k in ['t_d', 'L_d', 'r_d', 'final_loss_pred', 't_d_ci_cov', 't_d_ci_boot', 'r_d_ci_boot']:
        assert r[k] is None, k
    json.dumps(r, allow_nan=False)


def test_break_outside_the_data_is_not_identifiable():
    r = bnsl.fit_bnsl(T_LOG[T_LOG > 300], curve(T_LOG[T_LOG > 300], 20, 0.6, -0.45, 0.1), n_boot=0)
    assert not r['identifiable'] and r['t_d'] is None


def test_deterministic():
    steps, loss = bnsl.preprocess(T_ALL, curve(T_ALL, 150, 0.6, -0.45, 0.3, noise=0.05))
    a, b = bnsl.fit_bnsl(steps, loss, n_boot=30, seed=1), bnsl.fit_bnsl(steps, loss, n_boot=30, seed=1)
    assert json.dumps(a) == json.dumps(b)
    assert bnsl.fit_bnsl(steps, loss, n_boot=30, seed=2)['t_d_ci_boot'] != a['t_d_ci_boot']



def test_unbiased_recovers_a_clean_break_the_published_convention_lags():
    """A clean 1-break curve, every step 0..9999, break at 1000: the default (unbiased) fit recovers
    every parameter; the published convention's t_d lags by about sqrt(1.2) (+9 %) and its own
    bootstrap interval excludes the truth."""
    steps, loss = synthetic_curve(1000, 10000)
    r = bnsl.fit_curve(steps, loss, n_boot=20)
    f = STUDY_FORM
    assert r['convention'] == 'unbiased' and r['identifiable']
    for key, true in [('t_d', 1000), ('c0', f['c0']), ('c1', f['c1']), ('f1', f['f1']), ('b', f['b']),
                      ('r_d', f['c0'] + f['c1']), ('L_d', f['b'] * 1000 ** -f['c0'])]:
        assert r[key] == pytest.approx(true, rel=1e-6), key
    assert r['rsle'] < 1e-9
    pub = r['published']
    assert pub['convention'] == 'published' and pub['identifiable']
    assert 1.05 < pub['t_d'] / 1000 < 1.12
    assert pub['t_d_ci_boot'][0] > 1000 and pub['t_d_ci_cov'][0] > 1000  # the truth is excluded


def test_smoothed_fit_is_the_smoothed_curve():
    """The fitted form passed through the trailing average at every row equals the smoothed data of a
    clean curve (the unbiased fit recovers the curve), from row 2 on (row 1's window holds t = 0)."""
    steps, loss = synthetic_curve(100, 2000)
    r = bnsl.fit_curve(steps, loss, n_boot=0)
    p = [math.log(r['b']), r['c0'], r['c1'], math.log(r['t_d']), r['f1']]
    rows = np.arange(2, len(steps))
    first = bnsl.window_starts(len(steps))[rows]
    Lhat = np.exp(bnsl.log_averaged_bnsl(np.log(steps[1:]), first - 1, rows - 1, p))  # grid: rows 1 on
    np.testing.assert_allclose(Lhat, bnsl.log_moving_average(loss)[2:], rtol=1e-6)


def test_published_convention_is_the_form_fitted_to_the_preprocessed_points():
    """convention='published' (and the 'published' fit beside the default one) is exactly fit_bnsl of
    preprocess's points, as they are."""
    loss = curve(T_ALL, 150, 0.6, -0.45, 0.3, noise=0.05)
    old = bnsl.fit_bnsl(*bnsl.preprocess(T_ALL, loss), n_boot=20)
    pub = bnsl.fit_curve(T_ALL, loss, convention='published', n_boot=20)
    assert pub.pop('convention') == 'published' and pub.pop('published') is None
    assert json.dumps(pub) == json.dumps(old)
    beside = bnsl.fit_curve(T_ALL, loss, n_boot=20)['published']
    assert beside.pop('convention') == 'published' and json.dumps(beside) == json.dumps(old)
    unsmoothed = bnsl.fit_curve(T_ALL, loss, smooth=False, n_boot=0)
    assert unsmoothed['convention'] == 'unsmoothed' and unsmoothed['published'] is None
    assert unsmoothed['t_d'] == bnsl.fit_bnsl(*bnsl.preprocess(T_ALL, loss, smooth=False), n_boot=0)['t_d']


def test_published_fit_unchanged():
    """The published convention's numbers on a fixed curve, pinned to catch any change of the
    published fit."""
    r = bnsl.fit_curve(*synthetic_curve(1000, 10000), n_boot=20)['published']
    assert r['t_d'] == pytest.approx(1089.9583299641006, rel=1e-7)
    assert r['L_d'] == pytest.approx(0.6305157213067037, rel=1e-7)
    assert r['r_d'] == pytest.approx(0.09949048152288653, rel=1e-6)
    np.testing.assert_allclose(r['t_d_ci_boot'], [1087.0078485493307, 1094.4619718250733], rtol=1e-6)


@pytest.mark.parametrize('t_d,c0,c1,f1', [(150, 0.6, -0.45, 0.3), (500, 0.8, -0.5, 0.5),
                                         (300, 0.4, -0.3, 0.2)])
def test_unbiased_recovers_parameters_under_noise(t_d, c0, c1, f1):
    """Stated tolerance, default (unbiased) fit of every step 0..4999 with 5 % noise: t_d within 12 %,
    c0 and r_d within 0.05, and the bootstrap interval (raw rows resampled) covers the true t_d."""
    r = bnsl.fit_curve(T_ALL, curve(T_ALL, t_d, c0, c1, f1, noise=0.05), n_boot=20)
    assert r['identifiable']
    assert r['t_d'] == pytest.approx(t_d, rel=0.12)
    assert r['c0'] == pytest.approx(c0, abs=0.05) and r['r_d'] == pytest.approx(c0 + c1, abs=0.05)
    lo, hi = r['t_d_ci_boot']
    assert lo <= t_d <= hi and lo <= r['t_d'] <= hi


@pytest.mark.parametrize('noise', [0.0, 0.1])
def test_unbiased_pure_power_law_is_not_identifiable(noise):
    loss = 5.0 * np.maximum(T_ALL, 1) ** -0.4 * np.exp(noise * np.random.default_rng(3).standard_normal(5000))
    r = bnsl.fit_curve(T_ALL, loss)
    assert not r['identifiable'] and r['reason'] and r['t_d'] is None and r['t_d_ci_boot'] is None
    json.dumps(r, allow_nan=False)


def test_unbiased_windows_never_reach_step_0():
    """The form has no value at t = 0: at min_step 0 the unbiased convention drops row 1 (whose window
    is rows 0..1); the published one keeps it. Every kept row's window lies inside the grid."""
    loss = curve(T_ALL[:300], 50, 0.6, -0.45, 0.3)
    fits = bnsl.fit_inputs(T_ALL[:300], loss, min_step=0, subsample=False)
    t, l, (grid, raw, first, last) = fits['unbiased']
    assert t[0] == 2 and fits['published'][0][0] == 1
    assert np.all(grid > 0) and first.min() == 0 and last.max() == len(grid) - 1
    np.testing.assert_array_equal(grid[last], t)
    np.testing.assert_allclose(l, [np.mean(raw[a:b + 1]) for a, b in zip(first, last)], rtol=1e-12)
    r = bnsl.fit_curve(T_ALL[:300], loss, min_step=0, subsample=False, n_boot=0)
    assert r['t_d'] == pytest.approx(50, rel=1e-6)


# -----------------------------------------------------------------------------
# command line


def test_cli_run_directory_with_nan_tail(tmp_path):
    run = write_run(str(tmp_path / 'run'), curve(T_ALL[:3000], 150, 0.6, -0.45, 0.3, noise=0.03), 5000)
    p = run_cli(run, '--n_boot', '20')
    assert p.returncode == 0 and p.stderr == '', p.stderr
    r = json.loads(p.stdout)
    keys = {'t_d', 'L_d', 'c0', 'c1', 'r_d', 'f1', 'b', 'rsle', 'n_points', 'identifiable', 'reason',
            'final_loss_pred', 'path', 't_d_ci_cov', 't_d_ci_boot', 'L_d_ci_cov', 'L_d_ci_boot',
            'r_d_ci_cov', 'r_d_ci_boot'}
    assert keys <= set(r) and r['path'] == run and r['identifiable']
    assert r['t_range'] == [bnsl.MIN_STEP + 1, 2999]  # rows before the first NaN, transient cut
    assert r['t_d'] == pytest.approx(150, rel=0.2) and r['r_d'] == pytest.approx(0.15, abs=0.05)


def test_cli_reports_both_conventions(tmp_path):
    """The default JSON: the unbiased fit and, under 'published', the published-convention fit with its
    intervals; --published prints that fit alone, the same numbers; --table shows both."""
    run = write_run(str(tmp_path / 'run'), curve(T_ALL[:3000], 150, 0.6, -0.45, 0.3, noise=0.03), 3000)
    r = json.loads(run_cli(run, '--n_boot', '10').stdout)
    assert r['convention'] == 'unbiased' and r['published']['convention'] == 'published'
    for k in ['t_d', 'L_d', 'r_d']:
        assert r['published'][k] is not None and len(r['published'][f'{k}_ci_boot']) == 2
    assert r['published']['t_d'] > r['t_d']  # the lag
    p = run_cli(run, '--n_boot', '10', '--published')
    assert p.returncode == 0, p.stderr
    only = json.loads(p.stdout)
    assert only.pop('convention') == 'published' and only.pop('published') is None
    assert only.pop('path') == run and only == {k: v for k, v in r['published'].items() if k != 'convention'}
    p = run_cli(run, '--n_boot', '0', '--table')
    assert p.returncode == 0 and 'unbiased convention' in p.stdout and 't_d published' in p.stdout
    raw = json.loads(run_cli(run, '--n_boot', '0', '--raw').stdout)
    assert raw['convention'] == 'unsmoothed' and raw['published'] is None


@pytest.mark.parametrize('args,words', [([], 'required: paths'), (['x.csv', '--seed', '-1'], '--seed'),
                                        (['x.csv', '--n_boot', 'many'], '--n_boot'),
                                        (['x.csv', '--n_points', '1'], '--n_points')])
def test_cli_bad_flags_one_line_exit_2(args, words):
    p = run_cli(*args)
    assert p.returncode == 2 and p.stdout == '' and len(p.stderr.splitlines()) == 1, p.stderr
    assert words in p.stderr and 'Traceback' not in p.stderr


def test_cli_every_flag_is_range_checked_on_a_curve_with_a_break(tmp_path):
    """Each flag's out-of-range value, on a curve whose break the bootstrap would resample: one line
    naming the flag, exit status 2, nothing printed; the values at the edge of each range are fine."""
    path = write_csv(str(tmp_path / 'c.csv'), T_LOG, curve(T_LOG, 150, 0.6, -0.45, 0.3, noise=0.02))
    for flag, value in [('--seed', '-1'), ('--n_boot', '-1'), ('--block', '-2'), ('--n_points', '0'),
                        ('--min_step', '-1'), ('--min_step', 'nan'), ('--min_step', 'inf'), ('--seed', '1.5')]:
        p = run_cli(path, f'{flag}={value}')
        assert p.returncode == 2 and p.stdout == '' and len(p.stderr.splitlines()) == 1, (flag, value, p.stderr)
        assert p.stderr.startswith(f'bnsl.py: error: {flag}') and value in p.stderr, p.stderr
    p = run_cli(path, '--seed', '0', '--n_boot', '2', '--block', '0', '--min_step', '0')
    assert p.returncode == 0 and json.loads(p.stdout)['identifiable'], p.stderr


def test_cli_help_is_short_and_points_to_the_docs():
    p = run_cli('--help')
    assert p.returncode == 0 and 'docs/bnsl.md' in p.stdout and len(p.stdout.splitlines()) < 50
    assert os.path.isfile(os.path.join(ROOT, 'docs', 'bnsl.md'))


def test_cli_csv_with_and_without_header_and_several_paths(tmp_path):
    loss = curve(T_LOG, 150, 0.6, -0.45, 0.3)
    a = write_csv(str(tmp_path / 'a.csv'), T_LOG, loss, header=True)
    b = write_csv(str(tmp_path / 'b.csv'), T_LOG, loss, header=False)
    p = run_cli(a, b, '--raw', '--n_boot', '10')
    assert p.returncode == 0, p.stderr
    ra, rb = [json.loads(line) for line in p.stdout.splitlines()]
    assert ra['path'] == a and rb['path'] == b
    assert ra['t_d'] == pytest.approx(150, rel=1e-4) and ra['n_points'] == len(T_LOG)
    assert {k: v for k, v in ra.items() if k != 'path'} == {k: v for k, v in rb.items() if k != 'path'}
    p = run_cli(a, '--raw', '--table', '--n_boot', '0')
    assert p.returncode == 0 and 't_d' in p.stdout and 'r_d' in p.stdout


def test_cli_pure_power_law_reports_null(tmp_path):
    path = write_csv(str(tmp_path / 'pl.csv'), T_LOG, 3.0 * T_LOG ** -0.3)
    r = json.loads(run_cli(path, '--raw').stdout)
    assert r['identifiable'] is False and r['t_d'] is None and r['reason']


def bad_inputs(tmp):
    """(name, path) of each kind of bad input."""
    os.makedirs(tmp / 'empty_dir')
    good = [f"{s:g},{float(v)!r}" for s, v in zip(T_LOG, curve(T_LOG, 150, 0.6, -0.45, 0.3))]
    files = {
        'few.csv': 'step,loss\n' + '\n'.join(good[:5]),
        'zero.csv': '\n'.join(good[:20] + ['500,0.0'] + good[60:70]),
        'negative.csv': '\n'.join(good[:20] + ['500,-1.5']),
        'nan.csv': '\n'.join(good[:20] + ['500,nan']),
        'inf.csv': '\n'.join(good[:20] + ['500,inf']),
        'garbage.csv': 'step,loss\n1,2\nthis is not, a number\n',
        'three_cols.csv': '\n'.join(g + ',1' for g in good),
        'unsorted.csv': '\n'.join(good[20:40] + good[:20]),
        'binary.csv': b'\xff\xfe\x00\x81 not text',
    }
    for name, text in files.items():
        (tmp / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    yield from [(n, str(tmp / n)) for n in files]
    yield 'missing', str(tmp / 'no_such.csv')
    yield 'dir without record', str(tmp / 'empty_dir')
    yield 'run with too few rows', write_run(str(tmp / 'short_run'), np.linspace(5, 4, 25), 1000)
    yield 'run with inf', write_run(str(tmp / 'inf_run'), np.r_[np.linspace(5, 4, 500), np.inf], 1000)


@pytest.mark.slow  # 13 bnsl.py processes
def test_cli_bad_input_one_line_exit_2(tmp_path):
    for name, path in bad_inputs(tmp_path):
        p = run_cli(path)
        assert p.returncode == 2, (name, p.returncode, p.stdout, p.stderr)
        lines = p.stderr.splitlines()
        assert len(lines) == 1 and path in lines[0] and 'Traceback' not in p.stderr, (name, p.stderr)
        assert p.stdout == '', name


def test_cli_csv_with_a_byte_order_mark(tmp_path):
    """A UTF-8 BOM (as some editors save CSVs) never changes which line is a header: without a
    header every one of the 100 rows is fitted, with one the header is still skipped."""
    steps = np.arange(1, 101) * 50.0
    loss = curve(steps, 800, 0.6, -0.45, 0.3)
    plain = write_csv(str(tmp_path / 'plain.csv'), steps, loss, header=False)
    paths = [plain]
    for name, header in [('bom.csv', False), ('bom_header.csv', True)]:
        path = str(tmp_path / name)
        with open(plain, 'rb') as f:
            text = (b'step,loss\n' if header else b'') + f.read()
        with open(path, 'wb') as f:
            f.write(b'\xef\xbb\xbf' + text)
        paths.append(path)
    p = run_cli(*paths, '--raw', '--n_boot', '0')
    assert p.returncode == 0, p.stderr
    fits = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r['n_points'] for r in fits] == [100, 100, 100]
    without_path = [{k: v for k, v in r.items() if k != 'path'} for r in fits]
    assert without_path[1] == without_path[0] and without_path[2] == without_path[0]
    for path in paths:  # and from Python
        np.testing.assert_array_equal(bnsl.load_curve(path)[0], steps)


def test_cli_exact_duplicate_rows_are_merged_with_a_note(tmp_path):
    """Published curves repeat rows: exact duplicates (same step, same loss) are merged, with one note."""
    loss = curve(T_LOG, 150, 0.6, -0.45, 0.3)
    lines = [f"{s:g},{float(v)!r}" for s, v in zip(T_LOG, loss)]
    clean = write_csv(str(tmp_path / 'clean.csv'), T_LOG, loss)
    dup = tmp_path / 'dup.csv'
    dup.write_text('step,loss\n' + '\n'.join(lines[:10] + lines[9:50] + lines[49:51] + lines[50:]) + '\n')
    p = run_cli(str(dup), clean, '--raw', '--n_boot', '0')
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == [f"bnsl.py: note: {dup}: 3 exact duplicate rows merged"]
    r_dup, r_clean = [json.loads(line) for line in p.stdout.splitlines()]
    assert r_dup['n_points'] == len(T_LOG) and r_dup.pop('path') == str(dup)
    assert r_clean.pop('path') == clean and r_dup == r_clean


def test_cli_conflicting_duplicate_steps_are_one_line_exit_2(tmp_path):
    lines = [f"{s:g},{float(v)!r}" for s, v in zip(T_LOG, curve(T_LOG, 150, 0.6, -0.45, 0.3))]
    path = str(tmp_path / 'conflict.csv')
    with open(path, 'w') as f:
        f.write('\n'.join(lines[:30] + [lines[29].split(',')[0] + ',0.123'] + lines[30:]) + '\n')
    p = run_cli(path)
    assert p.returncode == 2 and p.stdout == ''
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and path in lines[0] and 'Traceback' not in p.stderr, p.stderr
    assert f"step {T_LOG[29]:g}" in lines[0] and 'different losses' in lines[0], lines[0]
