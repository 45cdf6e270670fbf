"""measure.py, the published checkpoint protocol on kept checkpoints: every record against a float64
recomputation from the checkpoints, the published inputs, resume after an interruption or a signal,
bad input and damaged files."""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import measure
import metrics
import plot
import runs
import train
from conftest import ROOT, TINY, run_train
from model import GPT, GPTConfig, per_token_loss

pytestmark = pytest.mark.slow  # runs train.py and measure.py in subprocesses

S, T, TOKENS, K = 8, 16, 40, 2  # kept checkpoints 1, 2, 4, 8; 40 tokens -> 2 windows of 16
PAPER = f"paper_N{2 * T}"  # where measure.py --tokens 40 writes: N = 32 tokens measured


def run_measure(*args, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'measure.py'), *args, '--threads', '1'],
                          capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"measure.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def measure_args(run):
    return [run, '--tokens', str(TOKENS), '--batches', str(K)]


@pytest.fixture(scope='module')
def measured(tmp_path_factory, cache_dir):
    """A tiny run keeping its log2 checkpoints, measured by measure.py."""
    run = str(tmp_path_factory.mktemp('measure') / 'run')
    run_train(*TINY, '--max_iters', str(S), '--keep_ckpts', 'log2', '--threads', '1',
              '--cache_dir', cache_dir, '--out_dir', run)
    run_measure(*measure_args(run))
    return run


def load(run, name):
    return np.load(os.path.join(run, PAPER, name + '.npy'), allow_pickle=False)


def config_of(run):
    with open(os.path.join(run, 'config.json')) as f:
        return json.load(f)


def model64(run, step):
    """The float64 model of kept checkpoint `step` and the checkpoint."""
    cfg = config_of(run)
    ckpt = torch.load(os.path.join(run, 'ckpts', f"step_{step:06d}.pt"), weights_only=True)
    model = GPT(GPTConfig(block_size=T, vocab_size=cfg['vocab_size_actual'], n_layer=2, n_head=2, n_embd=16))
    model.load_state_dict(ckpt['model'])
    return model.double(), ckpt


def heldout(run, cache_dir):
    """The held-out windows (2, T): the first two consecutive windows of the validation split."""
    val = data.prepare(None, 300, cache_dir)['val']
    w = torch.from_numpy(np.asarray(val[:2 * T + 1], dtype=np.int64))
    return w[:-1].reshape(2, T), w[1:].reshape(2, T)


def brute_D(x):
    """D = 1 - |sum x| / sum |x|, M = mean |x|, in float64 numpy."""
    x = np.asarray(x, dtype=np.float64).ravel()
    return 1 - abs(x.sum()) / np.abs(x).sum(), np.abs(x).mean()


def adamw_step64(model, ckpt, cfg, x, y):
    """A step of a float64 model at theta_t on batch (x, y) by a float64 torch.optim.AdamW loaded with
    the checkpoint's state, at the learning rate of step t - 1 (which made theta_t), no clipping.
    Returns delta."""
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': cfg['weight_decay']},
         {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
        betas=(cfg['beta1'], cfg['beta2']))
    optimizer.load_state_dict(ckpt['optimizer'])  # moments cast to float64
    for group in optimizer.param_groups:
        group['lr'] = train.get_lr(ckpt['step'] - 1, argparse.Namespace(**cfg))
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    per_token_loss(model(x)[0], y).mean().backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return {n: p.detach() - theta[n] for n, p in model.named_parameters()}


def test_records_of_each_N_go_to_their_own_folder(measured, tmp_path, cache_dir):
    """The whole split to RUN/paper/, --tokens N to RUN/paper_N<N>/ (N the tokens measured), so that
    several N of one run sit side by side."""
    run = str(tmp_path / 'run')
    shutil.copytree(measured, run)
    run_measure(run, '--steps', '1', '--no-dt1', '--no-opposition', '--chunk_seqs', '4096')
    W = (len(data.prepare(None, 300, cache_dir)['val']) - 1) // T
    assert json.load(open(os.path.join(run, 'paper', 'progress.json')))['tokens'] == W * T
    assert sorted(f for f in os.listdir(run) if f.startswith('paper')) == ['paper', PAPER]


def test_kept_checkpoints_hold_theta_t_and_its_optimizer(measured):
    """ckpts/step_t.pt holds theta_t (the probe loss of row t is its loss), the optimizer state
    after t steps, and step t; the last one is the run's final checkpoint."""
    assert sorted(os.listdir(os.path.join(measured, 'ckpts'))) == [f"step_{t:06d}.pt" for t in (1, 2, 4, 8)]
    probe = torch.from_numpy(np.load(os.path.join(measured, 'probe_tokens.npy')))
    probe_loss = np.load(os.path.join(measured, 'probe_loss.npy'))
    for t in (1, 2, 4, 8):
        model, ckpt = model64(measured, t)
        assert ckpt['step'] == t
        assert all(int(s['step']) == t for s in ckpt['optimizer']['state'].values())
        with torch.no_grad():
            loss = per_token_loss(model(probe[:, :-1])[0], probe[:, 1:]).numpy()
        np.testing.assert_allclose(probe_loss[t], loss, rtol=1e-5)
    final = torch.load(os.path.join(measured, 'ckpt.pt'), weights_only=True)
    kept = torch.load(os.path.join(measured, 'ckpts', 'step_000008.pt'), weights_only=True)
    assert all(torch.equal(final['model'][k], kept['model'][k]) for k in final['model'])


def test_records_have_one_row_per_checkpoint(measured):
    progress = json.load(open(os.path.join(measured, PAPER, 'progress.json')))
    assert progress['steps'] == [1, 2, 4, 8] and progress['tokens'] == 2 * T and progress['batches'] == K
    n_keys = len(progress['opposition_keys'])
    C = 4
    for name, shape, dtype, meaning in measure.PAPER_RECORDS:
        a = load(measured, name)
        sizes = dict(C=C, K=K, N=2 * T, n_keys=n_keys)
        assert a.shape == tuple(sizes[s.strip()] for s in shape.split(',')) and a.dtype == dtype, name
    assert np.isnan(load(measured, 'loss_D_dtt')[-1]) and np.isfinite(load(measured, 'loss_D_dtt')[:-1]).all()
    assert np.isfinite(load(measured, 'loss_D_batch')).all()


def test_dt1_loss_D_against_a_float64_adamw_step(measured, cache_dir):
    """D and M of the per-token loss changes over one step: a float64 copy of theta_t, stepped by a
    float64 torch.optim.AdamW loaded with the checkpoint's state, on the same batches, gives the recorded
    values (which measure.py computes in fp32). The learning rate is the one stored in the checkpoint,
    the schedule's rate of step t - 1, which made theta_t (not of step t: warmup tells them apart)."""
    cfg = config_of(measured)
    corpus = data.prepare(None, 300, cache_dir)
    hx, hy = heldout(measured, cache_dir)
    recorded = {n: load(measured, n) for n in ['loss_D_batch', 'loss_M_batch', 'loss_D_heldout',
                                                'loss_M_heldout']}
    schedule = argparse.Namespace(**cfg)
    assert train.get_lr(0, schedule) != train.get_lr(1, schedule)  # warmup: t - 1 and t differ at t = 1
    for row, t in enumerate(load(measured, 'steps')):
        stored = {g['lr'] for g in model64(measured, int(t))[1]['optimizer']['param_groups']}
        assert stored == {train.get_lr(int(t) - 1, schedule)}  # the checkpoint holds the rate of step t - 1
        for k in range(K):
            model, ckpt = model64(measured, int(t))
            x, y = measure.dt1_batch(cfg['seed'], 0, k, cfg, corpus, 'cpu')
            with torch.no_grad():
                before_b, before_h = (per_token_loss(model(a)[0], b) for a, b in [(x, y), (hx, hy)])
            adamw_step64(model, ckpt, cfg, x, y)
            with torch.no_grad():
                after_b, after_h = (per_token_loss(model(a)[0], b) for a, b in [(x, y), (hx, hy)])
            for where, change in [('batch', after_b - before_b), ('heldout', after_h - before_h)]:
                D, M = brute_D(change.numpy())
                assert abs(recorded[f'loss_D_{where}'][row, k] - D) < 2e-3, (where, t, k)
                np.testing.assert_allclose(recorded[f'loss_M_{where}'][row, k], M, rtol=2e-3)


def test_dtt_loss_D_from_the_checkpoints(measured, cache_dir):
    """dt = t: D and M of the held-out losses from theta_t to theta_2t, in float64 from the checkpoints."""
    hx, hy = heldout(measured, cache_dir)
    losses = {}
    for t in (1, 2, 4, 8):
        with torch.no_grad():
            losses[t] = per_token_loss(model64(measured, t)[0](hx)[0], hy).numpy()
    np.testing.assert_allclose(load(measured, 'heldout_loss'), np.stack([losses[t].ravel() for t in losses]),
                               rtol=1e-5)
    for row, t in enumerate((1, 2, 4)):
        D, M = brute_D(losses[2 * t] - losses[t])
        assert abs(load(measured, 'loss_D_dtt')[row] - D) < 1e-4, t
        np.testing.assert_allclose(load(measured, 'loss_M_dtt')[row], M, rtol=1e-4)


def test_an_interrupted_measure_resumes_to_the_same_records(measured, tmp_path):
    """Killed after writing the records of a row but before progress.json listed it (and with a
    temporary file left): the rerun measures the unlisted rows again, to the same bytes; a rerun of a
    finished folder measures nothing and changes nothing."""
    run = str(tmp_path / 'run')
    shutil.copytree(measured, run)
    paper = os.path.join(run, PAPER)
    reference = {f: open(os.path.join(paper, f), 'rb').read()
                 for f in os.listdir(paper) if f.endswith('.npy')}
    progress = json.load(open(os.path.join(paper, 'progress.json')))
    json.dump(dict(progress, steps=progress['steps'][:2]), open(os.path.join(paper, 'progress.json'), 'w'))
    shutil.copy(os.path.join(paper, 'steps.npy'), os.path.join(paper, 'steps.npy.tmp'))
    out = run_measure(*measure_args(run)).stdout
    assert '2 measured before' in out
    line = r"  step {} measured \[\d+ s\], about {} min left\n"  # the time so far, the rest at the same pace
    assert re.search(line.format(4, r'[0-9.]+') + line.format(8, '0.0'), out)
    for f, content in reference.items():
        assert open(os.path.join(paper, f), 'rb').read() == content, f
    assert json.load(open(os.path.join(paper, 'progress.json'))) == progress
    mtimes = {f: os.stat(os.path.join(paper, f)).st_mtime_ns for f in os.listdir(paper)}
    assert '0 now' in run_measure(*measure_args(run)).stdout
    assert mtimes == {f: os.stat(os.path.join(paper, f)).st_mtime_ns for f in os.listdir(paper)}
    assert runs.foreign(run) == []  # ckpts/ and paper/ are the run's own files


def test_overwrite_of_train_removes_kept_checkpoints_and_measurements(measured, tmp_path, cache_dir):
    run = str(tmp_path / 'run')
    shutil.copytree(measured, run)
    open(os.path.join(run, PAPER, 'notes.txt'), 'w').close()  # a user's file: the folder is not train's
    assert runs.foreign(run) == [f'{PAPER}/notes.txt']
    os.remove(os.path.join(run, PAPER, 'notes.txt'))
    os.makedirs(os.path.join(run, 'paper_x'))  # not a name measure.py writes
    assert runs.foreign(run) == ['paper_x']
    os.rmdir(os.path.join(run, 'paper_x'))
    run_train(*TINY, '--max_iters', '2', '--threads', '1', '--cache_dir', cache_dir, '--out_dir', run,
              '--overwrite')
    assert not os.path.exists(os.path.join(run, PAPER)) and not os.path.exists(os.path.join(run, 'ckpts'))


def test_bad_input_is_one_line_and_exit_2(measured, tiny_run, tmp_path):
    """No run, no kept checkpoints, a flag out of its range, more tokens than the split holds, or other
    settings than the folder was measured with (the protocol and the chunk size too, which move the
    numbers): one line, exit status 2, and the records untouched."""
    paper = os.path.join(measured, PAPER)
    before = {f: os.stat(os.path.join(paper, f)).st_mtime_ns for f in os.listdir(paper)}
    cases = [([str(tmp_path / 'nothing')], 'no such folder'),
             ([str(tmp_path)], 'not a run'),
             ([tiny_run], 'no kept checkpoints'),
             ([measured, '--tokens', '5'], 'fewer than one window'),
             ([measured, '--tokens', '-1'], '--tokens'),
             ([measured, '--batches', '0'], '--batches'),
             ([measured, '--device', 'tpu'], '--device'),
             ([measured, '--tokens', str(TOKENS), '--batches', '3'],
              'other settings (batches)'),
             ([*measure_args(measured), '--no-dt1'], 'other settings (dt1)'),
             ([*measure_args(measured), '--no-opposition'], 'other settings (opposition)'),
             ([*measure_args(measured), '--protocol', 'ours'], 'other settings (protocol)'),
             ([*measure_args(measured), '--chunk_seqs', '1'], 'other settings (chunk_seqs)'),
             ([measured, '--tokens', str(10 ** 9)], 'more than the validation split'),
             ([measured, '--protocol', 'paper'], '--protocol'),
             ([measured, '--chunk_seqs', '0'], '--chunk_seqs'),
             ([measured, '--threads', '-1'], '--threads'),
             ([measured, '--steps', '3'], '--steps'),
             ([measured, '--steps', '1,x'], '--steps')]
    for args, what in cases:
        proc = run_measure(*args, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and what in lines[0], (args, proc.stderr)
        assert 'Traceback' not in proc.stderr
    assert not [f for f in os.listdir(tiny_run) if f.startswith('paper')]
    assert before == {f: os.stat(os.path.join(paper, f)).st_mtime_ns for f in os.listdir(paper)}


def test_dt1_batches_and_the_delta_batch_are_the_same_at_every_t_and_size(measured, tmp_path, cache_dir,
                                                                           monkeypatch):
    """--protocol published, as the published code: the k dt = 1 batches are drawn once, the same at
    every checkpoint and for a run of another size on the same data and seed; the update-weighted
    terms take their delta from the step on batch 0, so from the same batch at every t. Seen from
    inside measure.py: the batches its simulated steps take and the delta its gradient sums get."""
    run, other = str(tmp_path / 'run'), str(tmp_path / 'other')
    shutil.copytree(measured, run)
    run_train(*TINY, '--n_layer', '1', '--n_embd', '8', '--max_iters', '4', '--keep_ckpts', 'log2',
              '--threads', '1', '--cache_dir', cache_dir, '--out_dir', other)
    stepped, summed = [], []  # (t, batch, delta) of each simulated step; the delta of each gradient_sums
    simulated_step, gradient_sums = measure.simulated_step, measure.gradient_sums

    def spy_step(model, ckpt, x, *args):
        stepped.append((int(ckpt['step']), x.clone(), simulated_step(model, ckpt, x, *args)))
        return stepped[-1][2]

    def spy_sums(model, x, y, delta, *args):
        summed.append(delta)
        return gradient_sums(model, x, y, delta, *args)
    monkeypatch.setattr(measure, 'simulated_step', spy_step)
    monkeypatch.setattr(measure, 'gradient_sums', spy_sums)
    monkeypatch.setattr(runs, 'on_signals', lambda message: None)  # pytest keeps its own handlers
    first = {}  # batch k of the first run's first checkpoint
    for path, kept in [(run, (1, 2, 4, 8)), (other, (1, 2, 4))]:
        stepped.clear()
        summed.clear()
        measure.main([path, '--tokens', str(T), '--batches', str(K), '--threads', '1'])
        assert [t for t, _, _ in stepped] == [t for t in kept for _ in range(K)]
        for k in range(K):
            for _, x, _ in stepped[k::K]:
                assert torch.equal(first.setdefault(k, x), x), (path, k)  # at every t, in both runs
        assert len(summed) == len(kept) and all(d is delta for d, (_, _, delta) in zip(summed, stepped[::K]))


def test_one_thread_on_a_cpu_unless_told(measured, monkeypatch):
    """--threads 0 (the default) is one thread on a CPU, as in train.py; --threads N is N (set before the
    run is read: a bad --steps stops after it)."""
    monkeypatch.setattr(runs, 'on_signals', lambda message: None)  # pytest keeps its own handlers
    before = torch.get_num_threads()
    try:
        for flags, threads in [([], 1), (['--threads', '2'], 2)]:
            torch.set_num_threads(3)
            with pytest.raises(SystemExit):
                measure.main([measured, '--device', 'cpu', '--steps', '3', *flags])
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_a_damaged_checkpoint_is_refused_before_anything_is_written(measured, tmp_path):
    """A torn kept checkpoint, or one that holds another step: one line naming it, exit 2, no folder
    created and the manifest unchanged, even though the checkpoints before it are good."""
    run = str(tmp_path / 'run')
    shutil.copytree(measured, run)
    manifest = open(os.path.join(run, runs.MANIFEST)).read()
    ckpt = os.path.join(run, 'ckpts', 'step_000004.pt')
    for damage, what in [(lambda: open(ckpt, 'r+b').truncate(100), 'not a checkpoint of step 4'),
                         (lambda: shutil.copy(ckpt.replace('04.pt', '01.pt'), ckpt), 'holds step 1')]:
        damage()
        proc = run_measure(run, '--tokens', str(T), '--batches', str(K), check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and what in lines[0] and 'step_000004.pt' in lines[0]
        assert not os.path.exists(os.path.join(run, f"paper_N{T}"))
        assert open(os.path.join(run, runs.MANIFEST)).read() == manifest


def test_damaged_rows_are_refused_and_overwrite_deletes_only_its_files(measured, tmp_path):
    """A row file cut short (an interrupted copy) or of another row shape: one line, exit 2, nothing
    changed. --overwrite deletes only the files measure.py listed: a user's file in the folder is kept
    and the folder refused."""
    run = str(tmp_path / 'run')
    shutil.copytree(measured, run)
    paper = os.path.join(run, PAPER)
    good = open(os.path.join(paper, 'heldout_loss.npy'), 'rb').read()
    for damage, what in [(lambda f: open(f, 'r+b').truncate(200), 'missing or corrupt'),
                         (lambda f: np.save(f, np.load(f)[:, :5]), 'rows of (32,) float32')]:
        damage(os.path.join(paper, 'heldout_loss.npy'))
        files = {f: open(os.path.join(paper, f), 'rb').read() for f in os.listdir(paper)}
        proc = run_measure(*measure_args(run), check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and what in lines[0], proc.stderr
        assert files == {f: open(os.path.join(paper, f), 'rb').read() for f in os.listdir(paper)}
        open(os.path.join(paper, 'heldout_loss.npy'), 'wb').write(good)
    open(os.path.join(paper, 'notes.txt'), 'w').write('mine')
    proc = run_measure(*measure_args(run), '--overwrite', check=False)
    assert proc.returncode == 2 and 'did not write (paper_N32/notes.txt)' in proc.stderr
    assert sorted(os.listdir(paper)) == sorted([*files, 'notes.txt'])


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_with_one_line_and_the_rerun_continues(measured, tmp_path, sig):
    """Ctrl-C or SIGTERM while measuring: one line that says how to continue, exit status 128 + the
    signal, no empty folder left behind; the same command then measures to the bytes of an
    uninterrupted run."""
    run = str(tmp_path / 'run')
    shutil.copytree(measured, run)
    command = [sys.executable, os.path.join(ROOT, 'measure.py'), *measure_args(run), '--overwrite',
               '--threads', '1']
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert 'measured before' in proc.stdout.readline()  # the folder is open, the first row begins
    proc.send_signal(sig)
    _, err = proc.communicate()
    lines = err.strip().splitlines()
    assert proc.returncode == 128 + sig and len(lines) == 1 and 'the same command continues' in lines[0], err
    paper = os.path.join(run, PAPER)
    assert not os.path.isdir(paper) or os.listdir(paper)
    assert runs.foreign(run) == []
    run_measure(*measure_args(run))
    for f in os.listdir(os.path.join(measured, PAPER)):
        reference = open(os.path.join(measured, PAPER, f), 'rb').read()
        assert open(os.path.join(paper, f), 'rb').read() == reference, f


def per_token_gradients64(model, x, y):
    """name -> (N, *shape): g_i = d l_i / d theta of every token, one float64 backward each (the
    attention key biases set to their exact gradient, 0: softmax ignores a shift of every score)."""
    losses = per_token_loss(model(x)[0], y).flatten()
    names, params = zip(*model.named_parameters())
    grads = [torch.autograd.grad(l, params, retain_graph=True) for l in losses]
    g = {n: torch.stack([gi[k] for gi in grads]) for k, n in enumerate(names)}
    d = model.config.n_embd
    for n in g:
        if n.endswith('attn.c_attn.bias'):
            g[n][:, d:2 * d] = 0
    return g


def test_opposition_and_update_terms_against_float64_per_token_gradients(measured, cache_dir):
    """At every checkpoint, on the same held-out tokens: the mean of D_j and its analytic null over
    the blocks' weight matrices and over every coordinate, from per-token float64 gradients (and the
    blocks' mean also from metrics.per_token_gradient_sums_looped); the update-weighted terms with
    p_ij = g_ij delta_j, delta the float64 AdamW step on dt = 1 batch 0, the same batch at every t."""
    cfg = config_of(measured)
    corpus = data.prepare(None, 300, cache_dir)
    hx, hy = heldout(measured, cache_dir)
    keys = json.load(open(os.path.join(measured, PAPER, 'progress.json')))['opposition_keys']
    rec = {n: load(measured, n) for n, *_ in measure.PAPER_RECORDS if n.startswith(('opposition', 'update'))}
    for row, t in enumerate(load(measured, 'steps')):
        model, ckpt = model64(measured, int(t))
        g = per_token_gradients64(model, hx, hy)
        looped = metrics.per_token_gradient_sums_looped(model, hx, hy)
        for key, names in [('blocks', [n for n in g if metrics.is_block_matrix(n)]), ('model', list(g))]:
            total = torch.cat([g[n].sum(0).flatten() for n in names])
            total_abs = torch.cat([g[n].abs().sum(0).flatten() for n in names])
            total_sq = torch.cat([g[n].pow(2).sum(0).flatten() for n in names])
            used = total_abs > 0
            D = 1 - total[used].abs() / total_abs[used]
            null = (1 - np.sqrt(2 / np.pi) * total_sq[used].sqrt() / total_abs[used]).clamp(0, 1)
            j = keys.index(key)
            assert abs(rec['opposition_mean'][row, j] - D.mean().item()) < 1e-4, (t, key)
            assert abs(rec['opposition_null'][row, j] - null.mean().item()) < 1e-4, (t, key)
            assert rec['opposition_n'][row, j] == used.sum().item(), (t, key)
            # the share of D_j > 0.99: only coordinates within rounding of 0.99 may count otherwise
            unsure = ((D - metrics.NEAR_TOTAL).abs() < 1e-4).sum().item()
            share = (D > metrics.NEAR_TOTAL).double().mean().item()
            assert abs(rec['opposition_near_total'][row, j] - share) <= unsure / used.sum().item() + 1e-12
            if key == 'blocks':
                s, a = (torch.cat([looped[n][k].flatten() for n in names]) for k in (0, 1))
                D_looped = 1 - s[a > 0].abs() / a[a > 0]
                assert abs(rec['opposition_mean'][row, j] - D_looped.mean().item()) < 1e-4, t
        x, y = measure.dt1_batch(cfg['seed'], 0, 0, cfg, corpus, 'cpu')
        delta = adamw_step64(model, ckpt, cfg, x, y)
        for key, names in [('blocks', [n for n in g if metrics.is_block_matrix(n)]), ('model', list(g))]:
            p = torch.cat([(g[n] * delta[n]).reshape(len(hx) * T, -1) for n in names], 1)  # (N, coordinates)
            brute = dict(Cg=p.sum(0).abs().sum() / p.abs().sum(),
                         CuG=p.sum().abs() / p.sum(0).abs().sum(),
                         Cug=p.sum(1).abs().sum() / p.abs().sum(),
                         C_i_dli=p.sum().abs() / p.sum(1).abs().sum(),
                         M_i_dli=p.sum(1).abs().mean())
            for term, value in brute.items():
                np.testing.assert_allclose(rec['update_' + term][row, keys.index(key)], value.item(),
                                           rtol=1e-3, err_msg=f"{term} {key} step {t}")


def test_plot_draws_the_protocol_and_reports_its_numbers(measured, tmp_path):
    """plot.py draws fig10_paper_protocol from RUN/paper_N<N>/ and its report table shows the records."""
    out = str(tmp_path / 'figs')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'plot.py'), measured, '--out', out],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert os.path.isfile(os.path.join(out, 'fig10_paper_protocol.png'))
    report = open(os.path.join(out, 'report.md')).read()
    keys = json.load(open(os.path.join(measured, PAPER, 'progress.json')))['opposition_keys']
    blocks, D = load(measured, 'opposition_mean')[:, keys.index('blocks')], load(measured, 'loss_D_heldout')
    assert f"N = {2 * T} held-out tokens" in report
    for i, t in enumerate(load(measured, 'steps')):
        assert f"| {t} | {blocks[i]:.4f} (" in report and f"{D[i].mean():.4f} +- {D[i].std():.4f}" in report


def test_a_resumed_run_keeps_the_same_checkpoints(measured, tmp_path, cache_dir):
    """Killed after the optimizer step of step 6 (checkpoint at step 6) and resumed: the kept
    checkpoints are those of the uninterrupted run, bitwise (model and optimizer)."""
    run = str(tmp_path / 'run')
    args = [*TINY, '--max_iters', str(S), '--keep_ckpts', 'log2', '--threads', '1', '--ckpt_interval', '3',
            '--cache_dir', cache_dir, '--out_dir', run]
    crash = os.path.join(ROOT, 'tests', 'crash_train.py')
    proc = subprocess.run([sys.executable, crash, 'update', '7', *args], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == -9, proc.stderr
    assert sorted(os.listdir(os.path.join(run, 'ckpts'))) == [f"step_{t:06d}.pt" for t in (1, 2, 4)]
    run_train(*args, '--resume')
    for t in (1, 2, 4, 8):
        a, b = (torch.load(os.path.join(r, 'ckpts', f"step_{t:06d}.pt"), weights_only=True)
                for r in (measured, run))
        assert a['step'] == b['step'] == t
        assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model']), t
        for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
            assert all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa), t


def test_plot_reports_every_N_and_the_runs_at_matched_checkpoints(measured, tmp_path):
    """Two N of one run each get their table, with the blocks' sqrt(N)(1 - D_j) beside its null's and
    the share of D_j > 0.99 from the records; two runs measured at one N are set side by side at the
    checkpoints both measured, and an N that one run alone measured is not; fig10 draws a run's N of
    most checkpoints. The deceleration table's H_1 is the entropy of the run's training counts."""
    root = tmp_path / 'runs'
    for name in ('a', 'b'):
        shutil.copytree(measured, root / name, ignore=shutil.ignore_patterns('figures'))
    run_measure(str(root / 'a'), '--tokens', str(T), '--batches', str(K), '--steps', '2,4')  # paper_N16
    run_measure(str(root / 'a'), '--tokens', str(3 * T), '--batches', str(K), '--steps', '2')  # paper_N48
    # fig10 draws the N measured at the most checkpoints: 32 tokens at 4, not 48 at 1 or 16 at 2
    assert plot.load_run(str(root / 'a'))['rec']['paper']['settings']['tokens'] == 2 * T
    out = tmp_path / 'figs'
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'plot.py'), str(root), '--out', str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = (out / 'report.md').read_text()
    for N in (T, 2 * T):
        paper = root / 'a' / f"paper_N{N}"
        keys = json.load(open(paper / 'progress.json'))['opposition_keys']
        mean, null, near = (np.load(paper / f"opposition_{k}.npy")[:, keys.index('blocks')]
                            for k in ('mean', 'null', 'near_total'))
        assert f"a: N = {N} held-out tokens" in report
        for i, t in enumerate(np.load(paper / 'steps.npy')):
            scaled = f"{np.sqrt(N) * (1 - mean[i]):.2f} ({np.sqrt(N) * (1 - null[i]):.2f}) | {near[i]:.4f} |"
            assert f"| {t} | {mean[i]:.4f} (" in report and scaled in report, (N, t)
    matched = report[report.index('## The runs at matched checkpoints'):]
    matched = matched[:matched.index('\n## ')]
    assert f"N = {2 * T} held-out tokens." in matched and f"N = {T} held-out tokens." not in matched
    assert '| step t | a | b |' in matched
    cell = r"[0-9.]+ \([0-9.]+\), [0-9.]+ [<>]? ?"  # 'D_j (null), sqrt(N)(1 - D_j) <' of one run
    assert all(re.search(rf"\| {t} \| {cell}\| {cell}\|", matched) for t in (1, 2, 4, 8))
    counts = np.load(root / 'a' / 'train_counts.npy').astype(np.float64)
    q = counts[counts > 0] / counts.sum()
    assert f"| {-(q * np.log(q)).sum():.4f} |" in report
