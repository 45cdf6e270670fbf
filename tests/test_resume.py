"""Never lose a run: a run killed with SIGKILL anywhere and resumed ends bitwise identical to an
uninterrupted one; bad input is one line, exit status 2, nothing written or changed; two gloo
processes record what one process records."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, run_train

pytestmark = pytest.mark.slow  # every test here runs train.py several times in subprocesses

# checkpoints after steps 3, 7, 11
ARGS = [*TINY, '--max_iters', '12', '--ckpt_interval', '4', '--grad_every', '3']
TIMING = {'step_ms'}  # wall-clock records: never identical


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache_dir):
    """The uninterrupted run."""
    out = str(tmp_path_factory.mktemp('reference') / 'run')
    run_train(*ARGS, '--cache_dir', cache_dir, '--out_dir', out)
    return out


def files(folder):
    """The relative path of every file below folder."""
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)


def assert_identical_runs(a, b):
    """The same files, each the same bytes: every record (NaN rows too), the checkpoints (model, optimizer,
    step, random state, settings), the kept checkpoints, progress.json, the manifest. Except the timing
    record, and in config.json where the run is and the resumes it lists."""
    assert files(a) == files(b)
    for rel in files(a):
        if rel == 'config.json':
            ja, jb = (json.load(open(os.path.join(r, rel))) for r in (a, b))
            assert {k: v for k, v in ja.items() if k not in ('out_dir', 'resumed')} == \
                {k: v for k, v in jb.items() if k not in ('out_dir', 'resumed')}
        elif rel[:-4] not in TIMING:
            assert open(os.path.join(a, rel), 'rb').read() == open(os.path.join(b, rel), 'rb').read(), rel


@pytest.mark.parametrize('point,n', [
    ('ckpt', 1),      # torn first checkpoint: nothing to resume from, the run starts again
    ('update', 6),    # after the optimizer step of step 5, before its records
    ('record', 9),    # between two record writes, mid-run
    ('ckpt', 2),      # torn second checkpoint: resume from the first
    ('backward', 10), # during step 9's second backward, past the second checkpoint
    ('ckpt', 3),      # torn final checkpoint
])
def test_killed_run_resumes_bitwise_identical(point, n, reference, tmp_path, cache_dir):
    out = str(tmp_path / 'run')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'crash_train.py'), point, str(n),
                           *ARGS, '--cache_dir', cache_dir, '--out_dir', out],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if point == 'ckpt':
        assert os.path.exists(os.path.join(out, 'ckpt.pt.tmp'))  # the torn file, never trusted
    run_train(*ARGS, '--cache_dir', cache_dir, '--out_dir', out, '--resume')
    assert_identical_runs(reference, out)


@pytest.fixture(scope='module')
def reference_log2(tmp_path_factory, cache_dir):
    """The uninterrupted run, keeping theta_t at t = 1, 2, 4, 8."""
    out = str(tmp_path_factory.mktemp('reference_log2') / 'run')
    run_train(*ARGS, '--keep_ckpts', 'log2', '--cache_dir', cache_dir, '--out_dir', out)
    return out


@pytest.mark.parametrize('point,n', [('update', 6), ('ckpt', 5)])  # mid-run; a torn kept step_000008.pt
def test_kept_checkpoints_of_a_killed_run_are_the_same_bytes(point, n, reference_log2, tmp_path, cache_dir):
    out = str(tmp_path / 'run')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'crash_train.py'), point, str(n),
                           *ARGS, '--keep_ckpts', 'log2', '--cache_dir', cache_dir, '--out_dir', out],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run_train(*ARGS, '--keep_ckpts', 'log2', '--cache_dir', cache_dir, '--out_dir', out, '--resume')
    assert 'ckpts/step_000008.pt' in files(out)
    assert_identical_runs(reference_log2, out)


def test_resume_of_a_finished_run_changes_nothing(reference, tmp_path, cache_dir):
    out = str(tmp_path / 'copy')
    shutil.copytree(reference, out)
    run_train(*ARGS, '--cache_dir', cache_dir, '--out_dir', out, '--resume')
    assert_identical_runs(reference, out)


def test_non_finite_loss_stops_with_consistent_records(tmp_path, cache_dir):
    out = str(tmp_path / 'diverge')
    proc = run_train(*TINY, '--max_iters', '20', '--ckpt_interval', '1', '--learning_rate', '1e30',
                     '--grad_clip', '0', '--cache_dir', cache_dir, '--out_dir', out, check=False)
    assert proc.returncode == 2 and 'non-finite training loss at step' in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and 'Traceback' not in proc.stderr
    bad = int(proc.stderr.split('at step ')[1].split(':')[0])
    loss = np.load(os.path.join(out, 'train_loss.npy'))
    assert np.isfinite(loss[:bad]).all() and np.isnan(loss[bad:]).all()  # complete up to the last good step
    done = json.load(open(os.path.join(out, 'progress.json')))['steps_done']
    assert done <= bad and torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['step'] == done


def snapshot(folder):
    """(name, size, mtime) of every file below folder: 'nothing written or changed'."""
    return sorted((os.path.relpath(os.path.join(d, f), folder), os.path.getsize(os.path.join(d, f)),
                   os.path.getmtime(os.path.join(d, f))) for d, _, files in os.walk(folder) for f in files)


def bad_inputs(tmp, reference):
    """(train.py arguments, text the one-line error must hold) for each kind of bad input."""
    (tmp / 'empty.txt').write_text('')
    (tmp / 'latin1.txt').write_bytes('caf\xe9 au lait\n'.encode('latin-1') * 50)
    (tmp / 'a_file').write_text('x')
    runs = {}
    for name in ['torn_ckpt', 'other_config', 'bad_record', 'bad_config', 'short_record', 'long_record',
                 'old_ckpt', 'unwritten_rows', 'no_ckpt']:
        runs[name] = tmp / name
        shutil.copytree(reference, runs[name])
    with open(runs['torn_ckpt'] / 'ckpt.pt', 'r+b') as f:
        f.truncate(1000)
    size = os.path.getsize(runs['short_record'] / 'probe_loss.npy')
    os.truncate(runs['short_record'] / 'probe_loss.npy', size - 100)  # an interrupted copy, a full disk
    os.truncate(runs['long_record'] / 'probe_loss.npy', size + 8)
    ckpt = torch.load(runs['old_ckpt'] / 'ckpt.pt', weights_only=True)
    torch.save(dict(ckpt, step=8), runs['old_ckpt'] / 'ckpt.pt')  # older than progress.json's 12 steps
    np.load(runs['unwritten_rows'] / 'train_loss.npy', mmap_mode='r+')[5] = np.nan  # a step never recorded
    os.remove(runs['no_ckpt'] / 'ckpt.pt')
    (runs['bad_record'] / 'probe_loss.npy').write_bytes(b'\x93NUMPY garbage')
    (runs['bad_config'] / 'config.json').write_text('{"n_layer": ')
    out = ['--out_dir', str(tmp / 'new')]
    return [
        (['--n_layers', '2', *out], 'unrecognized arguments'),
        (['--n_layer', '-1', *out], 'must be positive'),
        (['--batch_size', '0', *out], 'must be positive'),
        (['--n_embd', '10', '--n_head', '4', *out], 'not divisible'),
        (['--learning_rate', 'abc', *out], "invalid float value: 'abc'"),
        (['--learning_rate', 'nan', *out], 'finite'),
        (['--block_size', '100000', *out], 'fewer than'),  # no window of that length fits the corpus
        (['--data', str(tmp / 'missing.txt'), *out], 'no such file'),
        (['--data', str(tmp / 'empty.txt'), *out], 'empty'),
        (['--data', str(tmp / 'latin1.txt'), *out], 'not UTF-8'),
        (['--out_dir', str(tmp / 'a_file' / 'run')], 'a_file is a file, not a folder'),
        (['--resume', *out], 'no run in'),
        ([*ARGS, '--resume', '--out_dir', str(runs['other_config']), '--n_embd', '32'],
         'other settings: n_embd'),
        ([*ARGS, '--resume', '--out_dir', str(runs['torn_ckpt'])], 'cannot resume from checkpoint'),
        ([*ARGS, '--resume', '--out_dir', str(runs['bad_record'])], 'probe_loss.npy: corrupt'),
        ([*ARGS, '--resume', '--out_dir', str(runs['bad_config'])], 'cannot read'),
        ([*ARGS, '--resume', '--out_dir', str(runs['short_record'])], 'probe_loss.npy: corrupt or truncated'),
        ([*ARGS, '--resume', '--out_dir', str(runs['long_record'])], 'not a whole'),
        ([*ARGS, '--resume', '--out_dir', str(runs['old_ckpt'])], '12 steps done): it holds step 8'),
        ([*ARGS, '--resume', '--out_dir', str(runs['unwritten_rows'])], 'train_loss.npy: steps before 12'),
        ([*ARGS, '--resume', '--out_dir', str(runs['no_ckpt'])], 'ckpt.pt (progress.json: 12 steps done): '
         '[Errno 2] No such file'),
        ([*ARGS, '--out_dir', str(runs['other_config'])], 'already holds a run'),
    ], runs


def test_bad_input_is_one_line_exit_2_and_changes_nothing(reference, tmp_path, cache_dir):
    cases, runs = bad_inputs(tmp_path, reference)
    before = {name: snapshot(path) for name, path in runs.items()}
    for args, message in cases:
        args = [*TINY, *args] if '--n_head' not in args else args
        proc = run_train(*args, '--cache_dir', cache_dir, check=False)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, (args, proc.stderr)
        assert 'Traceback' not in proc.stderr
        assert not (tmp_path / 'new').exists()
    assert {name: snapshot(path) for name, path in runs.items()} == before


def test_two_gloo_processes_record_what_one_process_records(reference, tmp_path, cache_dir):
    out = str(tmp_path / 'ddp')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                           '--nproc_per_node', '2', os.path.join(ROOT, 'train.py'), *ARGS,
                           '--cache_dir', cache_dir, '--out_dir', out],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.load(open(os.path.join(out, 'config.json')))
    assert config['world_size'] == 2
    for name, (shape, dtype) in config['records'].items():  # the same layout as one process
        a, b = np.load(os.path.join(out, name + '.npy')), np.load(os.path.join(reference, name + '.npy'))
        assert a.shape == b.shape == tuple(shape) and a.dtype == b.dtype, name
    # the same global batch: the per-step mean loss and the gathered per-token losses agree
    for name in ['train_loss', 'train_loss_pre', 'train_loss_post', 'probe_loss', 'train_D', 'theta_cos',
                 'local_opposition_mean']:
        np.testing.assert_allclose(np.load(os.path.join(out, name + '.npy')),
                                   np.load(os.path.join(reference, name + '.npy')),
                                   rtol=1e-4, atol=1e-5, err_msg=name)
