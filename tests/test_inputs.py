"""What a first-time user can do to train.py: never lose a file that train.py did not write, one line
and exit status 2 for every bad setting before anything is written, one run per folder, a resume
that keeps the run directory true, a clean stop on SIGTERM and Ctrl-C, and progress from the start."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import runs
import train
from conftest import ROOT, TINY, run_train
from test_resume import assert_identical_runs, snapshot

SHORT = [*TINY, '--max_iters', '3']
LONG = [*TINY, '--max_iters', '150', '--ckpt_interval', '20', '--record', 'light', '--threads', '1']


@pytest.fixture(scope='module')
def long_reference(tmp_path_factory, cache_dir):
    out = str(tmp_path_factory.mktemp('long') / 'run')
    run_train(*LONG, '--cache_dir', cache_dir, '--out_dir', out)
    return out


def assert_one_line(proc, message):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert 'Traceback' not in proc.stderr


# --- --overwrite and a new run never delete or mix with what train.py did not write --------------

def test_overwrite_refuses_a_folder_with_files_train_did_not_write(tmp_path, cache_dir):
    notes = tmp_path / 'notes'
    notes.mkdir()
    (notes / 'thesis.tex').write_text('months of work')
    (notes / 'config.json').write_text('{"mine": true}')  # a name train.py also writes, but not its file
    before = snapshot(notes)
    for flags in [['--overwrite'], []]:
        proc = run_train(*SHORT, *flags, '--cache_dir', cache_dir, '--out_dir', str(notes), check=False)
        assert_one_line(proc, 'holds files train.py did not write')
    assert snapshot(notes) == before


def test_overwrite_of_the_working_folder_touches_nothing(tmp_path, cache_dir):
    """`--out_dir . --overwrite` in a folder of one's own files."""
    (tmp_path / 'analysis.py').write_text('print(1)\n')
    (tmp_path / 'data').mkdir()
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *SHORT, '--cache_dir', cache_dir,
                           '--out_dir', '.', '--overwrite'],
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert_one_line(proc, 'holds files train.py did not write')
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_a_run_with_a_user_file_added(tiny_run, tmp_path, cache_dir):
    import shutil
    run = tmp_path / 'run'
    shutil.copytree(tiny_run, run)
    (run / 'figures').mkdir()
    (run / 'figures' / 'my_sketch.svg').write_text('<svg/>')
    before = snapshot(run)
    proc = run_train(*SHORT, '--overwrite', '--cache_dir', cache_dir, '--out_dir', str(run), check=False)
    assert_one_line(proc, 'figures/my_sketch.svg')
    assert snapshot(run) == before


def test_overwrite_refuses_a_user_file_among_measurements(tiny_run, tmp_path, cache_dir):
    import shutil
    run = tmp_path / 'run'
    shutil.copytree(tiny_run, run)
    runs.write_atomic(str(run), 'paper/steps.npy', lambda f: f.write(b'npy'))  # as measure.py lists its rows
    (run / 'paper' / 'mine.txt').write_text('my notes on the measurement')
    before = snapshot(run)
    proc = run_train(*SHORT, '--overwrite', '--cache_dir', cache_dir, '--out_dir', str(run), check=False)
    assert_one_line(proc, 'paper/mine.txt')
    assert snapshot(run) == before


@pytest.mark.slow
def test_overwrite_replaces_a_run_and_its_figures(tiny_run, tmp_path, cache_dir):
    import shutil
    run = tmp_path / 'run'
    shutil.copytree(tiny_run, run)
    (run / 'figures').mkdir()
    (run / 'figures' / 'fig1_loss.png').write_bytes(b'png')
    (run / 'figures' / 'report.md').write_text('# report')
    runs.own(str(run), 'figures/fig1_loss.png', 'figures/report.md')  # as plot.py lists its figures
    runs.write_atomic(str(run), 'paper_N64/steps.npy', lambda f: f.write(b'npy'))  # and measure.py its rows
    run_train(*SHORT, '--overwrite', '--cache_dir', cache_dir, '--out_dir', str(run))
    assert not (run / 'figures').exists() and not (run / 'paper_N64').exists()
    assert json.load(open(run / 'progress.json'))['steps_done'] == 3
    assert np.load(run / 'train_loss.npy').shape == (3,)


def test_a_new_run_goes_into_an_empty_folder(tmp_path, cache_dir):
    empty = tmp_path / 'empty'
    empty.mkdir()
    run_train(*SHORT, '--record', 'none', '--cache_dir', cache_dir, '--out_dir', str(empty))
    assert json.load(open(empty / 'progress.json'))['steps_done'] == 3


# --- one run per folder -------------------------------------------------------------------------

@pytest.mark.slow
def test_two_runs_started_together_on_one_folder_one_is_refused(tmp_path, cache_dir):
    out = str(tmp_path / 'shared')
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), *TINY, '--max_iters', '30',
           '--cache_dir', cache_dir, '--out_dir', out]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert len(refused.strip().splitlines()) == 1
    assert 'in use by another train.py' in refused or 'already holds a run' in refused
    assert json.load(open(os.path.join(out, 'progress.json')))['steps_done'] == 30
    assert np.isfinite(np.load(os.path.join(out, 'probe_loss.npy'))).all()


@pytest.mark.slow
def test_a_folder_in_use_is_refused_to_resume_and_overwrite(tmp_path, cache_dir):
    """While a run is training, neither --resume nor --overwrite may touch its folder (one such
    run truncated the memmaps of the other, which died of SIGBUS); the first run goes on."""
    out = str(tmp_path / 'busy')
    busy = [*TINY, '--max_iters', '100000', '--ckpt_interval', '10', '--record', 'none', '--threads', '1',
            '--cache_dir', cache_dir, '--out_dir', out]  # far longer than this test waits
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *busy], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
    while not os.path.exists(os.path.join(out, 'progress.json')) and first.poll() is None:
        time.sleep(0.01)  # until its first checkpoint
    for flag in ['--resume', '--overwrite']:
        assert_one_line(run_train(*busy, flag, check=False), 'in use by another train.py')
    assert first.poll() is None  # still training
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate()
    assert first.returncode == 128 + signal.SIGTERM and 'stopped by SIGTERM' in stderr, stderr


# --- every setting checked up front: one line, exit status 2, nothing written ---------------------

@pytest.mark.parametrize('flags, message', [
    (['--beta1', '2'], '--beta1 must be in [0, 1)'),
    (['--beta2', '1'], '--beta2 must be in [0, 1)'),
    (['--device', 'tpu'], 'not one of auto, cpu, cuda'),
    (['--seed', '-1'], '--seed must be in 0'),
    (['--threads', '-1'], '--threads must be'),
    (['--log_seconds', '0'], '--log_seconds must be positive'),
    (['--vocab_size', '100'], 'must be in 257..65536'),
    (['--n_embd', '65536', '--n_head', '1'], "more than this machine's memory"),  # weights of 100s of GB
])
def test_bad_setting_is_one_line_and_nothing_is_written(flags, message, tmp_path, cache_dir):
    proc = run_train(*SHORT, *flags, '--cache_dir', cache_dir, '--out_dir', str(tmp_path / 'x'), check=False)
    assert_one_line(proc, message)
    assert not (tmp_path / 'x').exists()


@pytest.mark.parametrize('device, available', [
    ('cuda', torch.cuda.is_available()), ('cuda:7', torch.cuda.device_count() > 7),
    ('mps', torch.backends.mps.is_available())])
def test_a_device_this_machine_lacks_is_one_line(device, available, tmp_path, cache_dir):
    if available:
        pytest.skip(f"this machine has {device}")
    proc = run_train(*SHORT, '--device', device, '--cache_dir', cache_dir, '--out_dir', str(tmp_path / 'x'),
                     check=False)
    assert_one_line(proc, f"--device {device}: this machine has")
    assert not (tmp_path / 'x').exists()


@pytest.mark.parametrize('flag', ['--out_dir', '--cache_dir'])
@pytest.mark.parametrize('tail', ['x/' + 'y' * 300, ('d' * 200 + '/') * 21])  # a name; a path too long
def test_a_path_longer_than_the_system_allows_is_one_line_and_creates_nothing(flag, tail, tmp_path, cache_dir):
    flags = {'--out_dir': str(tmp_path / 'x'), '--cache_dir': cache_dir, flag: str(tmp_path / tail)}
    proc = run_train(*SHORT, *[text for pair in flags.items() for text in pair], check=False)
    assert_one_line(proc, 'longer than this system allows')
    assert os.listdir(tmp_path) == []


def test_resume_and_overwrite_together_is_one_line(tmp_path, cache_dir):
    proc = run_train(*SHORT, '--resume', '--overwrite', '--cache_dir', cache_dir, '--out_dir', str(tmp_path / 'x'),
                     check=False)
    assert_one_line(proc, '--resume continues the run in --out_dir, --overwrite replaces it')
    assert os.listdir(tmp_path) == []


def test_paths_that_are_not_what_they_must_be(tmp_path, cache_dir):
    (tmp_path / 'a_file').write_text('x')
    os.mkfifo(tmp_path / 'fifo')
    for flags, message in [(['--out_dir', str(tmp_path / 'a_file')], 'is a file, not a folder'),
                           (['--cache_dir', str(tmp_path / 'a_file'), '--out_dir', str(tmp_path / 'x')],
                            'is a file, not a folder'),
                           (['--data', '/dev/null', '--out_dir', str(tmp_path / 'x')], 'a character device'),
                           (['--data', str(tmp_path / 'fifo'), '--out_dir', str(tmp_path / 'x')],
                            'a named pipe')]:
        args = [*SHORT, '--cache_dir', cache_dir, *flags]
        assert_one_line(run_train(*args, check=False), message)
    assert not (tmp_path / 'x').exists() and (tmp_path / 'a_file').read_text() == 'x'


@pytest.mark.slow
def test_a_batch_too_large_for_memory_is_one_line_before_anything_is_written(tmp_path, cache_dir):
    # the first activation, (B, T, d) = (500000, 128, 1024) in fp32, is 262 GB: no machine here has it
    proc = run_train('--n_layer', '1', '--n_head', '1', '--n_embd', '1024', '--vocab_size', '300',
                     '--batch_size', '500000', '--probe_seqs', '1', '--max_iters', '1', '--record', 'none',
                     '--cache_dir', cache_dir, '--out_dir', str(tmp_path / 'x'), check=False)
    assert_one_line(proc, 'out of memory for one step of 500000 x 128 tokens')
    assert not (tmp_path / 'x').exists()


def test_records_larger_than_the_disk_are_one_line_before_anything_is_written(tmp_path, cache_dir):
    proc = run_train(*TINY, '--max_iters', '1000000000', '--cache_dir', cache_dir,
                     '--out_dir', str(tmp_path / 'x'), check=False)
    assert_one_line(proc, 'the records of this run need')
    assert not (tmp_path / 'x').exists()


# --- resume: the run directory keeps describing the run ------------------------------------------

def test_resume_refuses_another_learning_rate_and_records_what_may_change(tmp_path, cache_dir):
    out = str(tmp_path / 'run')
    args = [*TINY, '--max_iters', '4', '--ckpt_interval', '2', '--record', 'light', '--cache_dir', cache_dir,
            '--out_dir', out]
    run_train(*args)
    before = snapshot(out)
    proc = run_train(*args, '--resume', '--learning_rate', '0.5', check=False)
    assert_one_line(proc, 'other settings: learning_rate')
    assert snapshot(out) == before
    run_train(*args, '--resume', '--log_interval', '3', '--threads', '1')
    config = json.load(open(os.path.join(out, 'config.json')))
    assert config['learning_rate'] == 1e-3 and config['log_interval'] == 5  # the run as it was made
    assert config['resumed'] == [dict(step=4, device_used='cpu',
                                      **{k: config[k] for k in train.RESUME_MAY_CHANGE
                                         if k not in ('log_interval', 'threads')},
                                      log_interval=3, threads=1)]


# --- edge runs ----------------------------------------------------------------------------------

def test_a_one_step_run_has_its_scheduled_rows_among_its_steps(tmp_path, cache_dir):
    out = str(tmp_path / 'one')
    run_train(*TINY, '--max_iters', '1', '--cache_dir', cache_dir, '--out_dir', out)
    assert np.load(os.path.join(out, 'grad_steps.npy')).tolist() == [0]  # among 0..S-1
    assert np.load(os.path.join(out, 'hidden_steps.npy')).tolist() == [0, 1]  # among 0..S
    assert np.isfinite(np.load(os.path.join(out, 'opposition_mean.npy'))).all()


# --- SIGTERM and Ctrl-C: one line, and --resume continues bitwise --------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_with_one_line_and_resume_is_bitwise(sig, long_reference, tmp_path, cache_dir):
    out = str(tmp_path / 'run')
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *LONG, '--cache_dir', cache_dir,
                             '--out_dir', out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    while not os.path.exists(os.path.join(out, 'progress.json')) and proc.poll() is None:
        time.sleep(0.01)  # until the first checkpoint
    proc.send_signal(sig)
    _, stderr = proc.communicate()
    assert proc.returncode == 128 + sig, stderr  # 143 for SIGTERM, 130 for Ctrl-C
    assert len(stderr.strip().splitlines()) == 1 and 'Traceback' not in stderr
    assert f"stopped by {signal.Signals(sig).name}" in stderr and '--resume' in stderr
    run_train(*LONG, '--cache_dir', cache_dir, '--out_dir', out, '--resume')
    assert_identical_runs(long_reference, out)


# --- progress -----------------------------------------------------------------------------------

def test_progress_starts_before_the_tokenizer_trains(tmp_path):
    """A fresh cache: the first line says what takes the time, before it starts."""
    proc = run_train(*SHORT, '--record', 'none', '--cache_dir', str(tmp_path / 'cache'),
                     '--out_dir', str(tmp_path / 'x'))
    assert proc.stdout.splitlines()[0].startswith('training a BPE tokenizer of 300 tokens')


def test_the_eta_comes_from_recent_ordinary_steps():
    class Rec:  # the two values a progress line reads from the Recorder
        train_loss, probe_loss = 5.0, 5.1
    assert 'ETA ?' in train.progress_line(0, 100, Rec, 1e-3, [])  # step 0 alone says nothing
    line = train.progress_line(9, 100, Rec, 1e-3, [100.0, 120.0, 110.0, 5000.0, 105.0])
    assert '110.0 ms/step' in line and 'ETA 0.2 min' in line  # the median: the 5000 ms step does not count


def test_a_run_without_a_manifest_is_one_line_saying_rerun(tiny_run, tmp_path, cache_dir):
    """A run folder of an older version (no manifest.txt): no program trusts or deletes its files."""
    import shutil
    run = tmp_path / 'old'
    shutil.copytree(tiny_run, run)
    os.remove(run / 'manifest.txt')
    before = snapshot(run)
    for flags in [['--resume'], ['--overwrite']]:
        proc = run_train(*TINY, '--max_iters', '12', '--ckpt_interval', '6', *flags, '--cache_dir', cache_dir,
                         '--out_dir', str(run), check=False)
        assert_one_line(proc, 'older version')
    assert snapshot(run) == before
