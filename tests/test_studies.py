"""studies/bnsl_synthetic.py: bnsl.py's two conventions on curves with a known break."""

import os
import subprocess
import sys

import numpy as np
import pytest

from studies import bnsl_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_synthetic_curve_noise():
    """The study's noise: log-normal per step with the stated sd, lag-1 correlation phi."""
    for phi in [0.0, 0.9]:
        steps, loss = bnsl_synthetic.synthetic_curve(1000, 100000, sd=0.03, phi=phi, seed=0)
        e = np.log(loss) - np.log(bnsl_synthetic.synthetic_curve(1000, 100000)[1])
        assert np.std(e) == pytest.approx(0.03, rel=0.05)
        assert np.corrcoef(e[:-1], e[1:])[0, 1] == pytest.approx(phi, abs=0.02)


def test_synthetic_study_small(monkeypatch, capsys):
    monkeypatch.setattr(bnsl_synthetic, 'STUDY_BREAKS', [(100, 600)])
    rows = bnsl_synthetic.synthetic_study(n_seeds=2, n_boot=5)
    out = capsys.readouterr().out
    assert len(rows) == 6 and out.count('| 100 | 600 |') == 6
    clean = {r['convention']: r for r in rows if r['noise'] == 'clean'}
    assert abs(clean['unbiased']['median_rel_err']) < 1e-6 and clean['published']['median_rel_err'] > 0.05
    assert clean['unbiased']['boot'] is None  # no coverage on a clean curve


@pytest.mark.parametrize('args', [['--n_seeds', '0'], ['--n_boot', '-1'], ['--min_step', 'nan'], ['extra']])
def test_study_bad_input_is_one_line_exit_2(args):
    """Run as a script from the repository root (it finds bnsl.py itself); bad flags stop before any work."""
    p = subprocess.run([sys.executable, os.path.join('studies', 'bnsl_synthetic.py'), *args],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and p.stdout == '' and len(p.stderr.splitlines()) == 1, p.stderr
    assert 'Traceback' not in p.stderr
