"""
The synthetic study of bnsl.py: both conventions of the fit on curves with a known break.

    python studies/bnsl_synthetic.py      # minutes; results/bnsl_synthetic.md holds its output

The 1-break form (STUDY_FORM) with its break at t_d = 100, 1000 and 20000 in runs of 2000, 10000
and 1e5 steps, clean and with per-step log-normal noise (independent, and AR(1) with correlation
0.9; sd 0.03), n_seeds noisy curves a case, each fitted by bnsl.fit_curve in both conventions. It
prints a Markdown table: how often a break is found, the median relative error of t_d with its
quartiles, and how often each 95 % interval covers the true t_d.
"""

import math
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import bnsl  # noqa: E402
import runs  # noqa: E402

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
    return steps, bnsl.bnsl_1break(np.maximum(steps, 1), f['b'], f['c0'], f['c1'], t_d, f['f1']) * np.exp(e)


def synthetic_study(n_seeds=20, n_boot=STUDY_N_BOOT, min_step=bnsl.MIN_STEP):
    """For each break of STUDY_BREAKS and noise of STUDY_NOISE (one curve when clean, else n_seeds),
    fit_curve's two conventions; prints a Markdown table: how many fits located a break, the median
    relative error of t_d (t_d / true - 1) with its quartiles, how often each 95 % interval covers
    the true t_d (noisy curves only: on a clean curve the intervals shrink to rounding), and the
    first curve's t_d with its bootstrap interval. Returns the rows."""
    t0 = time.time()
    print(f"# studies/bnsl_synthetic.py: both conventions on curves with a known break\n\n"
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
            fits = [bnsl.fit_curve(*synthetic_curve(t_d, n_steps, sd, phi, seed), min_step=min_step,
                                   n_boot=n_boot) for seed in range(1 if sd == 0 else n_seeds)]
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


if __name__ == '__main__':
    args = runs.parser(__doc__, [('n_seeds', 20, runs.positive, 'noisy curves a case'),
                                 ('n_boot', STUDY_N_BOOT, runs.count, 'bootstrap resamples a fit'),
                                 ('min_step', bnsl.MIN_STEP, runs.nonnegative, "bnsl.py's transient cut")]).parse_args()
    synthetic_study(args.n_seeds, args.n_boot, args.min_step)
