"""Training and recording: what a run writes, and that what it writes is what it claims."""
import json
import os
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import metrics
from conftest import ROOT, TINY, run_train
from model import GPT, GPTConfig, per_token_loss
import recorder
from recorder import RECORDS, log_schedule, record_shape
from runs import keep_freed_memory
from train import get_args, get_lr


def load(run, name):
    return np.load(os.path.join(run, name + '.npy'), allow_pickle=False)


def first_and_last_models(out, cfg):
    """float64 copies of a tiny run's theta_0 (the seeded initialisation, as train.py makes it) and
    of its final checkpoint."""
    conf = GPTConfig(block_size=16, vocab_size=cfg['vocab_size_actual'], n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(cfg['seed'])
    first, last = GPT(conf).double(), GPT(conf)
    last.load_state_dict(torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['model'])
    return first, last.double()


def test_run_writes_every_record_with_the_right_shape(tiny_run):
    """Every record of recorder.RECORDS, with the shape its table entry gives, and config.json
    saying the same; the one-off files; every row of a finished --record all run written."""
    cfg = json.load(open(os.path.join(tiny_run, 'config.json')))
    S, B, T, P, d = 12, 4, 16, 3, 16
    V = cfg['vocab_size_actual']
    hidden_steps, grad_steps = load(tiny_run, 'hidden_steps'), load(tiny_run, 'grad_steps')
    sizes = dict(S=S, B=B, T=T, P=P, d=d, R=min(d, V), K=len(hidden_steps), G=len(grad_steps),
                 H=recorder.HIST_BINS, n_theta=len(cfg['theta_names']),
                 n_local=len(cfg['local_opposition_keys']), n_all=len(cfg['opposition_keys']), Q=0)
    written = [name for name, shape, *_ in RECORDS if 0 not in record_shape(shape, sizes)]  # Q = 0: none
    assert sorted(cfg['records']) == sorted(written)
    for name, shape, dtype, when, meaning in RECORDS:
        if 0 in record_shape(shape, sizes):  # train_probe_loss without --train_probe_seqs: no file
            assert not os.path.exists(os.path.join(tiny_run, name + '.npy')), name
            continue
        a = load(tiny_run, name)
        assert a.shape == record_shape(shape, sizes) and a.dtype == np.dtype(dtype), name
        assert cfg['records'][name] == [list(a.shape), dtype], name
        assert when in ('every', 'step', 'full', 'hidden', 'grad') and meaning, name
        assert np.all(np.isfinite(a)) or name.startswith('probe_cos'), name  # every row written
    for name, shape in {'probe_tokens': (P, T + 1), 'train_counts': (V,)}.items():
        assert load(tiny_run, name).shape == shape, name
    assert hidden_steps[0] == 0 and hidden_steps[-1] == S
    assert np.all(load(tiny_run, 'update_norm') > 0) and np.all(load(tiny_run, 'lr') > 0)
    assert cfg['n_params'] > cfg['n_params_nonembedding'] > 0
    assert json.load(open(os.path.join(tiny_run, 'progress.json')))['steps_done'] == S


def records_markdown():
    """recorder.RECORDS as the markdown table of docs/records.md."""
    lines = ['| file | shape | dtype | when | meaning |', '|---|---|---|---|---|']
    for name, shape, dtype, when, meaning in RECORDS:
        meaning = meaning.replace('|', '\\|')  # a bar inside a markdown table cell
        shape = shape if ',' in shape else shape + ','  # (S,) as numpy writes a 1-D shape
        lines.append(f"| `{name}.npy` | ({shape}) | {dtype} | {when} | {meaning} |")
    return '\n'.join(lines) + '\n'


def test_the_record_reference_is_the_record_table(tiny_run):
    """docs/records.md shows recorder.RECORDS as records_markdown() writes it, and names every file
    a run directory holds, so the reference cannot drift from the code."""
    with open(os.path.join(ROOT, 'docs', 'records.md')) as f:
        doc = f.read()
    assert records_markdown() in doc, \
        "docs/records.md's table differs from recorder.RECORDS; put this in its place:\n" + records_markdown()
    for file in os.listdir(tiny_run):
        assert f"`{file}`" in doc, f"{file} is written by train.py but not described in docs/records.md"


def test_pre_update_token_losses_average_to_the_logged_loss(tiny_run):
    pre = load(tiny_run, 'train_loss_pre').astype(np.float64)
    np.testing.assert_allclose(pre.mean(axis=(1, 2)), load(tiny_run, 'train_loss'), rtol=1e-6)
    # and the update changed them: post differs from pre
    assert np.abs(load(tiny_run, 'train_loss_post') - load(tiny_run, 'train_loss_pre')).max() > 0


def test_records_match_a_recomputation_from_the_checkpoint(tiny_run):
    """The final checkpoint holds theta_S: the probe row S and the post-update losses of the
    last step (theta_S on the batch of step S - 1) must be what that model gives."""
    ckpt = torch.load(os.path.join(tiny_run, 'ckpt.pt'), weights_only=True)
    cfg = json.load(open(os.path.join(tiny_run, 'config.json')))
    model = GPT(GPTConfig(block_size=16, vocab_size=cfg['vocab_size_actual'], n_layer=2, n_head=2, n_embd=16))
    model.load_state_dict(ckpt['model'])
    S = ckpt['step']
    probe = torch.from_numpy(load(tiny_run, 'probe_tokens').astype(np.int64))
    with torch.no_grad():
        logits, _, h = model(probe[:, :-1], return_hidden=True)
        probe_loss = per_token_loss(logits, probe[:, 1:])
    np.testing.assert_allclose(load(tiny_run, 'probe_loss')[S], probe_loss.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(load(tiny_run, 'probe_hidden')[-1], h.numpy(), rtol=1e-5, atol=1e-6)


def test_freed_memory_is_kept_for_the_next_step():
    """After keep_freed_memory (train.py calls it on the CPU), a large tensor allocated again and again,
    as a step's logits are, comes to reuse memory: no page faults once malloc's heap holds it, where
    malloc's default maps it afresh every time and faults once per 4 KiB page."""
    if not keep_freed_memory():
        pytest.skip("malloc is not glibc's: nothing to set")
    size = 33 << 20  # bytes: above 32 MiB, glibc's largest default mmap threshold, as the (B*T, V) logits
    pages = size // resource.getpagesize()

    def page_faults_of_a_large_tensor():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(size, dtype=torch.uint8)  # allocated, every page written, freed
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    for _ in range(10):  # the first rounds grow the heap until a freed block fits the next request
        page_faults_of_a_large_tensor()
    assert max(page_faults_of_a_large_tensor() for _ in range(3)) < pages // 10


def test_probe_pass_gives_the_training_loss_bitwise_and_the_softmax():
    """The probe pass takes both its losses and p from one log-softmax: the losses must be
    per_token_loss's to the bit (cross_entropy is that log-softmax and a pick), p the softmax."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16))
    x, y = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    losses, h, logits_given, p = metrics.fp32_probe_forward(model, x, y)
    with torch.no_grad():
        logits, _, h_ref = model(x, return_hidden=True)
        assert torch.equal(losses, per_token_loss(logits, y))
        assert torch.equal(h, h_ref) and torch.equal(logits_given, logits)
        torch.testing.assert_close(p, torch.softmax(logits.reshape(-1, 50), -1), rtol=1e-6, atol=1e-7)


def test_last_post_update_losses_match_the_final_model(tiny_run, cache_dir):
    """theta_S on the batch of step S - 1, rebuilt from the recorded offsets."""
    ckpt = torch.load(os.path.join(tiny_run, 'ckpt.pt'), weights_only=True)
    cfg = json.load(open(os.path.join(tiny_run, 'config.json')))
    model = GPT(GPTConfig(block_size=16, vocab_size=cfg['vocab_size_actual'], n_layer=2, n_head=2, n_embd=16))
    model.load_state_dict(ckpt['model'])
    corpus = data.prepare(None, 300, cache_dir)
    offsets = load(tiny_run, 'train_offsets')[-1]
    x, y = (torch.from_numpy(a) for a in data.get_windows(corpus['train'], offsets, 16))
    with torch.no_grad():
        loss = per_token_loss(model(x)[0], y)
    np.testing.assert_allclose(load(tiny_run, 'train_loss_post')[-1], loss.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_same_seed_same_losses_other_seed_other_losses(tmp_path, cache_dir, tiny_run):
    common = [*TINY, '--max_iters', '12', '--ckpt_interval', '6', '--cache_dir', cache_dir]
    run_train(*common, '--out_dir', str(tmp_path / 'a'))
    run_train(*common, '--out_dir', str(tmp_path / 'b'), '--seed', '7')
    for name in ['train_loss', 'train_loss_post', 'probe_loss']:
        np.testing.assert_array_equal(load(str(tmp_path / 'a'), name), load(tiny_run, name))
    assert not np.array_equal(load(str(tmp_path / 'b'), 'train_loss'), load(tiny_run, 'train_loss'))


def test_record_none_writes_scalars_only(tmp_path, cache_dir):
    out = str(tmp_path / 'bare')
    run_train(*TINY, '--max_iters', '5', '--record', 'none', '--cache_dir', cache_dir, '--out_dir', out)
    assert np.all(np.isfinite(load(out, 'train_loss')))
    assert not os.path.exists(os.path.join(out, 'probe_loss.npy'))


def test_existing_run_is_refused_and_left_alone(tiny_run, cache_dir):
    before = load(tiny_run, 'train_loss')
    proc = run_train(*TINY, '--max_iters', '3', '--cache_dir', cache_dir, '--out_dir', tiny_run, check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and 'already holds a run' in proc.stderr
    np.testing.assert_array_equal(load(tiny_run, 'train_loss'), before)


@pytest.mark.parametrize('flags, message', [
    (['--n_embd', '10', '--n_head', '4'], 'not divisible'),
    (['--n_layer', '0'], 'must be positive'),
    (['--learning_rate', 'nan'], 'finite'),
])
def test_bad_settings_fail_with_one_line(tmp_path, flags, message):
    proc = run_train(*flags, '--out_dir', str(tmp_path / 'x'), check=False)
    assert proc.returncode == 2 and message in proc.stderr and 'Traceback' not in proc.stderr
    assert not os.path.exists(tmp_path / 'x')


@pytest.mark.slow
def test_bad_data_fails_with_one_line(tmp_path, cache_dir):
    (tmp_path / 'bin.txt').write_bytes(b'\xff\xfe\x00abc')
    (tmp_path / 'small.txt').write_text('only a few words\n')
    for path, message in [(tmp_path / 'missing.txt', 'no such file'), (tmp_path / 'bin.txt', 'binary'),
                          (tmp_path / 'small.txt', 'fewer than')]:
        proc = run_train(*TINY, '--data', str(path), '--cache_dir', cache_dir,
                         '--out_dir', str(tmp_path / 'o'), check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / 'o')


@pytest.mark.slow
def test_user_text_file_trains(tmp_path, cache_dir):
    text = ''.join(f"line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i % 13}.\n"
                   for i in range(400))
    (tmp_path / 'corpus.txt').write_text(text)
    out = str(tmp_path / 'run')
    run_train(*TINY, '--data', str(tmp_path / 'corpus.txt'), '--max_iters', '4', '--cache_dir', cache_dir,
              '--out_dir', out)
    cfg = json.load(open(os.path.join(out, 'config.json')))
    assert 'corpus.txt' in cfg['corpus'] and np.all(np.isfinite(load(out, 'probe_loss')))


def test_default_corpus_is_split_by_book_and_cached(cache_dir):
    train_text, val_text, desc = data.load_kjv()
    assert 'Proverbs' in desc and 0.05 < len(val_text) / (len(train_text) + len(val_text)) < 0.15
    assert 'Train up a child in the way he should go' in val_text  # Proverbs 22:6
    assert 'Train up a child in the way he should go' not in train_text
    first = data.prepare(None, 300, cache_dir)
    again = data.prepare(None, 300, cache_dir)
    assert first['key'] == again['key'] and np.array_equal(first['train'], again['train'])
    assert first['counts'].sum() == len(first['train']) and first['train'].dtype == np.uint16
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(first['tokenizer'])
    assert tok.decode(first['val'][:200].tolist()) in val_text


def test_batches_are_a_function_of_seed_and_step():
    a = data.batch_offsets(1, 5, 8, 16, 1000)
    assert np.array_equal(a, data.batch_offsets(1, 5, 8, 16, 1000))
    assert not np.array_equal(a, data.batch_offsets(1, 6, 8, 16, 1000))
    assert a.min() >= 0 and a.max() + 16 + 1 <= 1000


def test_schedule_and_learning_rate():
    assert log_schedule(100)[0] == 0 and log_schedule(100)[-1] == 100
    assert log_schedule(10, every=4) == [0, 4, 8, 10]
    args = get_args(['--max_iters', '100', '--warmup_iters', '10', '--learning_rate', '1e-3',
                     '--min_lr', '1e-4', '--decay_lr'])
    lrs = [get_lr(t, args) for t in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warmup rises
    assert max(lrs) == pytest.approx(1e-3, rel=1e-2) and min(lrs[10:]) > 1e-4  # never below min_lr
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))  # cosine decay
    constant = get_args(['--max_iters', '100', '--warmup_iters', '10', '--learning_rate', '1e-3'])  # default
    assert [get_lr(t, constant) for t in range(10)] == lrs[:10]  # the same warmup
    assert [get_lr(t, constant) for t in range(10, 100)] == [1e-3] * 90  # then the published constant rate


def test_recorded_measurements_match_a_recomputation(tmp_path, cache_dir):
    """A one-step run: theta_0 is the seeded initialisation and theta_1 the final checkpoint, so
    every record of step 0 can be recomputed in float64 and compared with what train.py wrote."""
    import metrics
    out = str(tmp_path / 'one')
    run_train(*TINY, '--max_iters', '1', '--cache_dir', cache_dir, '--out_dir', out, '--opposition_seqs', '2')
    cfg = json.load(open(os.path.join(out, 'config.json')))
    model0, model1 = first_and_last_models(out, cfg)  # theta_0 and theta_1
    corpus = data.prepare(None, 300, cache_dir)
    x, y = (torch.from_numpy(a) for a in data.get_windows(corpus['train'], load(out, 'train_offsets')[0], 16))
    probe = torch.from_numpy(load(out, 'probe_tokens').astype(np.int64))
    px, py = probe[:, :-1], probe[:, 1:]
    rel = dict(rtol=2e-4, atol=1e-6)

    # zero-sum learning on the train batch and on the probe set
    pre, post = (per_token_loss(m(x)[0], y).detach() for m in (model0, model1))
    np.testing.assert_allclose(load(out, 'train_loss_post')[0], post.numpy(), **rel)
    np.testing.assert_allclose(load(out, 'train_D')[0],
                               metrics.destructive_interference((post - pre).flatten()).item(), rtol=1e-3)
    np.testing.assert_allclose(load(out, 'train_M')[0], (post - pre).abs().mean().item(), rtol=1e-3)
    probe_change = (per_token_loss(model1(px)[0], py) - per_token_loss(model0(px)[0], py)).detach()
    np.testing.assert_allclose(load(out, 'probe_D')[0],
                               metrics.destructive_interference(probe_change.flatten()).item(), rtol=1e-3)
    assert 0 <= load(out, 'probe_D_null')[0] <= 1

    # output-layer decomposition of the probe tokens, at theta_0 and theta_1
    for row, m in [(0, model0), (1, model1)]:
        h = m.hidden(px).detach().reshape(-1, 16)
        ref = metrics.output_decomposition(h, m.lm_head.weight.detach(), py.reshape(-1))
        for k, v in ref.items():
            np.testing.assert_allclose(load(out, 'probe_' + k)[row].reshape(-1), v.numpy(),
                                       rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(load(out, 'probe_anisotropy')[row], float(metrics.anisotropy(h)),
                                   rtol=1e-4)

    # dissent in theta and position-local opposition on the train batch at theta_0
    logits = model0(x)[0]
    theta = metrics.theta_decomposition(logits, y, dict(model0.named_parameters()))
    for j, name in enumerate(cfg['theta_names']):
        np.testing.assert_allclose(load(out, 'theta_cos')[0, j], float(theta[name]['cos']),
                                   rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(load(out, 'theta_norm_minus')[0, j], float(theta[name]['norm_minus']),
                                   rtol=1e-3)
    brute = metrics.per_token_gradient_sums(model0, x, y)  # every parameter, exact
    local = metrics.opposition_summary({n: brute[n] for n in brute if n in set(cfg['local_opposition_keys'])},
                                       total='local')
    for j, key in enumerate(cfg['local_opposition_keys']):
        np.testing.assert_allclose(load(out, 'local_opposition_mean')[0, j], float(local[key]['mean']),
                                   rtol=1e-3)
        np.testing.assert_allclose(load(out, 'local_opposition_weighted')[0, j],
                                   float(local[key]['weighted']), rtol=1e-3)
        np.testing.assert_allclose(load(out, 'local_opposition_null')[0, j], float(local[key]['null']),
                                   rtol=1e-3)
        assert load(out, 'local_opposition_hist')[0, j].sum() == int(local[key]['hist'].sum())

    # exact all-parameter opposition on the probe subset, and the JVP prediction along the real update
    delta = {n: p1.detach() - p0.detach()
             for (n, p0), p1 in zip(model0.named_parameters(), model1.parameters())}
    sums = metrics.per_token_gradient_sums(model0, px[:2], py[:2])  # float64; tested against the definition
    full = metrics.opposition_summary(sums)
    assert cfg['opposition_tokens'] == 2 * 16
    grads = [torch.autograd.grad(l, list(model0.parameters()), retain_graph=True)  # g_i, token by token
             for l in per_token_loss(model0(px[:2])[0], py[:2]).flatten()]
    for j, key in enumerate(cfg['opposition_keys']):
        for stat in ('mean', 'null'):
            np.testing.assert_allclose(load(out, 'opposition_' + stat)[0, j], float(full[key][stat]),
                                       rtol=1e-3, err_msg=f"{stat} {key}")
        if key in ('blocks', 'model'):  # update-weighted terms, p_ij = g_ij delta_j, built token by token
            names = [n for n in delta if key == 'model' or metrics.is_block_matrix(n)]
            p = torch.stack([torch.cat([(g * delta[n]).flatten() for n, g in zip(delta, gi) if n in names])
                             for gi in grads])  # (N, coordinates)
            for term, value in [('Cg', p.sum(0).abs().sum() / p.abs().sum()),
                                ('Cug', p.sum(1).abs().sum() / p.abs().sum()),
                                ('C_i_dli', p.sum().abs() / p.sum(1).abs().sum()),
                                ('M_i_dli', p.sum(1).abs().mean())]:
                np.testing.assert_allclose(load(out, 'update_' + term)[0, j], float(value), rtol=1e-3,
                                           err_msg=f"{term} {key}")
    pred = metrics.predicted_loss_change(model0, x, y, delta)
    np.testing.assert_allclose(load(out, 'train_loss_pred')[0], pred.detach().numpy(), rtol=1e-3, atol=1e-6)
    assert np.corrcoef(pred.detach().numpy().ravel(), (post - pre).numpy().ravel())[0, 1] > 0.9


def test_training_window_probe_matches_a_recomputation(tmp_path, cache_dir):
    """--train_probe_seqs Q: Q disjoint training windows, fixed by the seed, saved once with their
    offsets, and their per-token loss recorded in fp32 at every theta_t like probe_loss: checked
    against a float64 recomputation at theta_0 (the seeded initialisation) and theta_2 (the checkpoint)."""
    import train
    out = str(tmp_path / 'tp')
    run_train(*TINY, '--max_iters', '2', '--train_probe_seqs', '3', '--cache_dir', cache_dir,
              '--out_dir', out)
    cfg = json.load(open(os.path.join(out, 'config.json')))
    assert cfg['records']['train_probe_loss'] == [[3, 3, 16], 'float32'] and cfg['train_probe_seqs'] == 3
    corpus = data.prepare(None, 300, cache_dir)
    offsets = np.array(cfg['train_probe_offsets'])
    assert len(offsets) == 3 and np.all(offsets % 17 == 0) and np.all(np.diff(offsets) >= 17)  # disjoint
    again, _, _ = train.fixed_windows(corpus['train'], 3, 16, [cfg['seed'], 2 ** 32], '--train_probe_seqs')
    other, _, _ = train.fixed_windows(corpus['train'], 3, 16, [7, 2 ** 32], '--train_probe_seqs')
    assert np.array_equal(again, offsets) and not np.array_equal(other, offsets)  # a function of the seed
    tokens = load(out, 'train_probe_tokens')  # (Q, T + 1), from the training split
    assert np.array_equal(tokens, np.stack([corpus['train'][o:o + 17] for o in offsets]).astype(np.int64))
    model0, model2 = first_and_last_models(out, cfg)
    x, y = (torch.from_numpy(tokens[:, :-1]), torch.from_numpy(tokens[:, 1:]))
    record = load(out, 'train_probe_loss')
    assert np.all(np.isfinite(record))
    for row, model in [(0, model0), (2, model2)]:
        with torch.no_grad():
            logp = torch.log_softmax(model(x)[0], -1)  # brute force, float64
        np.testing.assert_allclose(record[row], -logp.gather(-1, y[..., None])[..., 0].numpy(), rtol=1e-5)
    assert not np.array_equal(record[0], record[2])
    # bad values: one line, exit status 2, nothing written
    for value, message in [('-1', 'finite number >= 0'), ('10000000', 'fewer than --train_probe_seqs')]:
        proc = run_train(*TINY, '--train_probe_seqs', value, '--cache_dir', cache_dir,
                         '--out_dir', str(tmp_path / 'bad'), check=False)
        assert proc.returncode == 2 and message in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / 'bad')


@pytest.mark.slow
def test_compile_records_what_eager_records(tmp_path, cache_dir):
    """--compile: the steps that capture activations run eagerly (a compiled graph would skip the
    capture hooks), the others compiled; the records agree with an eager run up to rounding."""
    common = [*TINY, '--max_iters', '40', '--record', 'light', '--grad_every', '20', '--cache_dir', cache_dir]
    run_train(*common, '--out_dir', str(tmp_path / 'eager'))
    run_train(*common, '--compile', '--out_dir', str(tmp_path / 'compiled'))
    for name in ['train_loss', 'probe_loss', 'train_D', 'local_opposition_mean', 'theta_cos']:
        np.testing.assert_allclose(load(str(tmp_path / 'compiled'), name),
                                   load(str(tmp_path / 'eager'), name),
                                   rtol=1e-4, atol=1e-5, err_msg=name)


# The two worked examples of docs/adding-a-measurement.md: (file, the line after which the
# lines go (None: at the end), the lines). The test below checks that the page shows exactly these
# lines, applies them to a copy of the code, trains, and checks the new records.
ENTROPY = '''def prediction_entropy(logits):
    """H_i = -sum_v p_iv log p_iv with p_i = softmax(z_i), in nats: (..., V) -> (...)."""
    return -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
'''
OPPOSITION_HIST_ROW = ('''    ('opposition_hist', 'G, n_all, H', 'int64', 'grad', '''
                       '''"histogram, as local_opposition_hist"),\n''')
ADDING_A_MEASUREMENT = [
    ('metrics.py', None, ENTROPY),
    ('recorder.py', OPPOSITION_HIST_ROW,
     '''    ('probe_entropy', 'S+1, P, T', 'float32', 'step', "entropy of p_i at theta_t, per probe token"),
    ('train_entropy', 'S, B, T', 'float32', 'step', "entropy of p_i at theta_t, per token of the batch"),
'''),
    ('recorder.py', "            self.write('probe_anisotropy', step, metrics.anisotropy(h.view(-1, d)))\n",
     "            self.write('probe_entropy', step, metrics.prediction_entropy(logits))\n"),
    ('recorder.py', "        self.write('train_loss', step, self.train_loss)\n",
     "        self.write('train_entropy', step, self.gather(metrics.prediction_entropy(logits.detach())))\n"),
]


@pytest.mark.slow
def test_adding_a_measurement_as_the_readme_shows(tmp_path, cache_dir):
    with open(os.path.join(ROOT, 'docs', 'adding-a-measurement.md')) as f:
        readme = f.read()
    code = tmp_path / 'code'
    code.mkdir()
    for name in os.listdir(ROOT):
        if name.endswith('.py'):
            (code / name).write_text(open(os.path.join(ROOT, name)).read())
    for file, after, lines in ADDING_A_MEASUREMENT:
        assert lines in readme, f"the README no longer shows:\n{lines}"
        source = (code / file).read_text()
        if after is None:
            source = source + '\n\n' + lines
        else:
            assert source.count(after) == 1, f"{file}: the line to add after is gone:\n{after}"
            source = source.replace(after, after + lines)
        (code / file).write_text(source)
    out = str(tmp_path / 'run')
    proc = subprocess.run([sys.executable, str(code / 'train.py'), *TINY, '--max_iters', '2',
                           '--cache_dir', cache_dir, '--out_dir', out],
                          capture_output=True, text=True, cwd=str(code))
    assert proc.returncode == 0, proc.stderr
    cfg = json.load(open(os.path.join(out, 'config.json')))
    assert cfg['records']['probe_entropy'] == [[3, 3, 16], 'float32']
    assert cfg['records']['train_entropy'] == [[2, 4, 16], 'float32']

    # a float64 recomputation at theta_0 (the seeded initialisation) and at theta_2 (the checkpoint)
    model0, model2 = first_and_last_models(out, cfg)

    def entropy(model, x):
        p = torch.softmax(model(x)[0].detach(), -1)
        return -(p * p.log()).sum(-1).numpy()  # brute force, float64
    probe = torch.from_numpy(load(out, 'probe_tokens')[:, :-1].astype(np.int64))
    np.testing.assert_allclose(load(out, 'probe_entropy')[0], entropy(model0, probe), rtol=1e-5)
    np.testing.assert_allclose(load(out, 'probe_entropy')[2], entropy(model2, probe), rtol=1e-5)
    corpus = data.prepare(None, 300, cache_dir)
    x, _ = (torch.from_numpy(a) for a in data.get_windows(corpus['train'], load(out, 'train_offsets')[0], 16))
    np.testing.assert_allclose(load(out, 'train_entropy')[0], entropy(model0, x), rtol=1e-5)


def test_the_published_optimizer_regime_is_one_named_choice(tmp_path, cache_dir):
    """--optim published: AdamW eps 1e-5, beta2 0.95, no weight decay on the embeddings (tied: U too),
    recorded in config.json; the default stays nanoGPT's (eps 1e-8, decay on every matrix)."""
    torch.manual_seed(0)
    for tied in (False, True):
        model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16, tie_weights=tied))
        embeddings = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
        for published, eps in [(False, 1e-8), (True, 1e-5)]:
            optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', published)
            decay, no_decay = optimizer.param_groups
            assert decay['eps'] == no_decay['eps'] == eps and decay['weight_decay'] == 0.1
            assert {id(p) for p in no_decay['params']} & embeddings == (embeddings if published else set())
            assert all(p.dim() >= 2 for p in decay['params']) and all(p.dim() < 2 or id(p) in embeddings
                                                                      for p in no_decay['params'])
            assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))
    out = str(tmp_path / 'published')
    run_train(*TINY, '--max_iters', '1', '--optim', 'published', '--cache_dir', cache_dir, '--out_dir', out)
    cfg = json.load(open(os.path.join(out, 'config.json')))
    assert cfg['optim'] == 'published' and cfg['beta2'] == 0.95
    groups = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['optimizer']['param_groups']
    assert [(g['betas'], g['eps'], g['weight_decay']) for g in groups] == [((0.9, 0.95), 1e-5, 0.1),
                                                                          ((0.9, 0.95), 1e-5, 0.0)]
    assert get_args([]).optim == 'nanogpt' and get_args([]).beta2 == 0.99


def test_the_default_probe_holds_about_2048_tokens():
    assert [get_args(['--block_size', str(T)]).probe_seqs for T in (128, 1024, 4096, 100)] == [16, 2, 1, 20]
    assert get_args(['--block_size', '1024', '--probe_seqs', '5']).probe_seqs == 5
    assert get_args(['--block_size', '1024']).opposition_seqs == 2  # all of the probe, as before


def test_one_thread_on_a_cpu_unless_told():
    """--threads 0 (the default) is one thread on a CPU, where torch's default of one per core collapses
    when another program holds a core; --threads N is N."""
    import train
    before = torch.get_num_threads()
    try:
        for flags, threads in [([], 1), (['--threads', '2'], 2)]:
            torch.set_num_threads(3)
            train.setup_system(get_args(['--device', 'cpu', *flags]))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_the_eta_counts_the_slow_steps_and_a_heartbeat_speaks_in_long_ones(capsys):
    """Each step left is priced at the median of its kind (grad steps take many ordinary steps' time),
    and while a step runs a line comes at least every --log_seconds."""
    import time
    import train

    class Rec:  # what Progress and a progress line read from the Recorder
        train_loss, probe_loss, args = 5.0, 5.1, get_args(['--max_iters', '12'])
        kind = staticmethod(lambda step: [2, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 1][step])  # 1 is the usual kind
    progress = train.Progress(Rec, 0, 0.05, master=True)
    for step, ms in [(0, 9.0), (1, 100.0), (2, 5000.0), (3, 60000.0), (4, 110.0)]:
        progress.begin(step)
        progress.began -= ms / 1000  # as if the step had taken ms
        assert abs(progress.end(step) - ms) < 50
    assert [len(r) for r in progress.recent] == [0, 3, 1]  # the first step (warm-up) not counted
    line = progress.line(4, Rec, 1e-3)  # 6 full and 1 grad step left
    median = sorted(progress.recent[1])[1]
    eta = (6 * median + progress.recent[2][0]) / 60000
    assert f"{median:6.1f} ms/step" in line and f"ETA {eta:.1f} min" in line
    assert 'ETA ?' in train.progress_line(3, 12, Rec, 1e-3, [100.0], [([], 1)])  # no grad step timed yet
    progress.begin(5)
    time.sleep(0.5)
    progress.step = None  # the loop's end stops the heartbeat
    time.sleep(0.2)
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if line.startswith('step     5/12 running: ')]) >= 3
    assert all(' running: ' in line for line in lines)


def test_training_losses_come_from_the_training_forward_off_full_steps():
    """Under bf16 the training forward's losses are the records of a step that forms no post - pre
    (no fp32 recompute); full steps recompute them in fp32 (docs/records.md)."""
    args = get_args([*TINY, '--max_iters', '40', '--record', 'light', '--dtype', 'bfloat16'])
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16))
    rec = recorder.Recorder(args, model, {'vocab_size': 50}, torch.randint(0, 50, (2, 3, 16)), 'bfloat16')
    x, y = torch.randint(0, 50, (2, 4, 16))
    plain = [s for s in range(40) if not rec.full(s)]
    assert plain and rec.kind(plain[0]) == 0 and rec.kind(0) == 2
    rec.batch(plain[0], x, y, None, torch.full((4, 16), 7.0), {}, None)  # the training forward's losses
    assert rec.train_loss == 7.0 and torch.equal(rec.loss_pre, torch.full((4, 16), 7.0))


def test_a_time_based_checkpoint_resumes_bitwise(tiny_run, tmp_path, cache_dir):
    """--ckpt_minutes 0 writes ckpt.pt after every step whatever --ckpt_interval says: a run killed at
    step 7 resumes from step 7, and ends with the records and model of an uninterrupted run."""
    out = str(tmp_path / 'killed')
    args = [*TINY, '--max_iters', '12', '--ckpt_interval', '1000', '--ckpt_minutes', '0',
            '--cache_dir', cache_dir, '--out_dir', out]
    crash = os.path.join(ROOT, 'tests', 'crash_train.py')
    proc = subprocess.run([sys.executable, crash, 'update', '8', *args], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == -9, proc.stderr  # SIGKILL after step 7's optimizer step
    assert json.load(open(os.path.join(out, 'progress.json')))['steps_done'] == 7
    run_train(*args, '--resume')
    for name in sorted(f for f in os.listdir(tiny_run) if f.endswith('.npy') and f != 'step_ms.npy'):
        assert load(out, name[:-4]).tobytes() == load(tiny_run, name[:-4]).tobytes(), name
    final, reference = (torch.load(os.path.join(r, 'ckpt.pt'), weights_only=True) for r in (out, tiny_run))
    assert final['step'] == reference['step'] == 12
    assert all(torch.equal(final['model'][k], reference['model'][k]) for k in reference['model'])
