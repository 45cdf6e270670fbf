"""bench.py runs end to end on a tiny model, prints every section, and its method comparisons agree."""
import re
import subprocess
import sys
import os

import pytest

from conftest import ROOT

TINY_BENCH = ['--n_layer', '2', '--n_head', '2', '--n_embd', '16', '--block_size', '16', '--batch_size', '4',
              '--vocab_size', '300', '--probe_seqs', '3', '--steps', '40', '--rounds', '1', '--reps', '1']


def run_bench(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'bench.py'), *args],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
def test_bench_prints_every_section_and_the_methods_agree(cache_dir):
    proc = run_bench(*TINY_BENCH, '--cache_dir', cache_dir)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for row in ['plain nanoGPT step (written in bench.py)', '--record none (bare)', '--record light',
                '--record all',
                'probe pass', 'h-space decomposition', 'theta+/-', 'position-local opposition, |G|^T |X|',
                'scheduled: JVP prediction', 'MB per step', 'BNSL fit', 'plot.py on the 3 runs',
                '6. model FLOPs', 'TFLOP/s', 'an MFU analogue', '7. a step by pass', 'post-update forward (fp32)',
                'opposition, position-local', 'writes', 'other']:
        assert row in out, row
    # on the CPU every training variant is a positive fraction of the measured matmul throughput
    fractions = [float(f) for f in re.findall(r'(\S+)% of matmul', out)]
    assert len(fractions) == 4 and all(f > 0 for f in fractions), out
    # the fast methods give the sums of the slow ones (float32: up to rounding)
    for diff in re.findall(r'max relative difference (?:of the sums )?(\S+)', out):
        assert float(diff.rstrip(';')) < 1e-5  # a nan fails here
    # the project's method against the published port on 1 and 3 (all) probe sequences, and its ratio
    assert len(re.findall(r'max relative difference', out)) == 4
    rows = re.findall(r'^\s+(\d+)\s+\d+\s+\d+\s+\d+\s+(\S+)x\s+(\S+)\s+(\S+)\s+max relative', out, re.M)
    assert [n for n, *_ in rows] == ['1', '3'], out
    assert all(float(v) > 0 for _, *values in rows for v in values), out  # the ratio and both FLOP counts


@pytest.mark.parametrize('flags, words', [
    (['--steps', '2'], '--steps must be more than 4'), (['--vocab_size', '100'], '--vocab_size must be in 257..65536'),
    (['--peak_tflops', 'nan'], '--peak_tflops must be'), (['--rounds', '0'], '--rounds must be positive'),
    (['--n_embd', '10', '--n_head', '4'], 'not divisible'), (['--block_size', '100000000'], 'fewer than one window'),
    (['--cache_dir', 'README.md'], 'README.md')])
def test_bench_bad_flag_is_one_line(flags, words, cache_dir):
    """Every flag range-checked before any work: one line naming it, exit status 2, nothing printed."""
    proc = run_bench('--cache_dir', cache_dir, *flags)  # a later --cache_dir wins
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and words in lines[0] and proc.stdout == '', proc.stderr


def test_flops_per_token_counts_every_matmul_of_a_training_step():
    """flops_per_token against PyTorch's FLOP counter on a real forward and backward (attention by
    the math kernel, whose matmuls the counter sees): the same number, exactly."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from bench import bench
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    for tie in (False, True):
        config = GPTConfig(block_size=16, vocab_size=300, n_layer=2, n_head=2, n_embd=32, tie_weights=tie)
        model = GPT(config)
        x = torch.randint(0, 300, (3, 16))
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x, x)[1].backward()
        assert counter.get_total_flops() == bench.flops_per_token(config) * x.numel()


@pytest.mark.slow
def test_bench_steps_only_in_bf16_prints_the_mfu(cache_dir):
    """Also a run too short for --record light: at 6 steps every timed step is on the log schedule
    of the post-update pass, so its rows say so instead of printing nan."""
    proc = run_bench(*TINY_BENCH, '--cache_dir', cache_dir, '--steps_only', '--dtype', 'bfloat16',
                     '--peak_tflops', '0.001', '--steps', '6')  # the last --steps wins
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert '(bfloat16)' in out and '2. each quantity' not in out
    mfus = [float(m) for m in re.findall(r'MFU\s+(\S+)%', out)]
    assert len(mfus) == 3 and all(m > 0 for m in mfus[:2]), out  # plain, none, all (light: n/a)
    light = [line for line in out.splitlines() if '--record light' in line]
    assert len(light) == 2 and not re.search(r'\bnan\b', out), out
    assert 'n/a: no unscheduled step among the timed steps' in light[0] and '--steps 17' in light[0], out
    assert 'n/a' in light[1], out


@pytest.mark.parametrize('device', ['tpu', 'mps'])
def test_bench_unknown_or_absent_device_is_one_line(device, cache_dir):
    import torch
    if device == 'mps' and torch.backends.mps.is_available():
        pytest.skip('this machine has an MPS device')
    proc = run_bench('--device', device, '--cache_dir', cache_dir)  # the repo's cache untouched if it runs on
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert f"--device {device}" in lines[0] and proc.stdout == '', proc.stderr


def tiny_plain(bias=True):
    """A PlainGPT of a tiny size and model.GPT's config of the same size."""
    from bench import bench
    from model import GPTConfig
    config = GPTConfig(block_size=16, vocab_size=300, n_layer=2, n_head=2, n_embd=32, bias=bias)
    plain = bench.PlainGPT(config.vocab_size, config.block_size, config.n_layer, config.n_head,
                           config.n_embd, bias)
    return plain, config


def test_plain_gpt_computes_model_gpt_with_its_weights():
    """bench.py's independent GPT has model.GPT's parameter count and, given model.GPT's weights
    (the same tensors in the same order), its logits and loss: the baseline does the same work."""
    import torch
    from torch.nn import functional as F
    from model import GPT
    torch.manual_seed(0)
    for bias in (True, False):
        plain, config = tiny_plain(bias)
        model = GPT(config)
        ours, theirs = list(plain.parameters()), list(model.parameters())
        assert sum(p.numel() for p in ours) == model.num_params()
        assert [p.shape for p in ours] == [p.shape for p in theirs]
        with torch.no_grad():
            for p, q in zip(ours, theirs):
                p.copy_(q)
        x, y = torch.randint(0, 300, (3, 16)), torch.randint(0, 300, (3, 16))
        logits = plain(x)
        expected_logits, expected_loss = model(x, y)
        torch.testing.assert_close(logits, expected_logits)
        torch.testing.assert_close(F.cross_entropy(logits.view(-1, 300), y.view(-1)), expected_loss)


def test_plain_steps_lower_the_loss():
    """A few plain steps (AdamW as train.py's, weight decay on the 2-D tensors only) on one batch:
    finite losses that go down."""
    import argparse
    from contextlib import nullcontext
    import torch
    from bench import bench
    args = argparse.Namespace(block_size=16, n_layer=2, n_head=2, n_embd=32, device='cpu')
    defaults, model, opt = bench.plain_model(args, {'vocab_size': 300})
    assert [g['weight_decay'] for g in opt.param_groups] == [defaults.weight_decay, 0.0]
    assert all(p.dim() >= 2 for p in opt.param_groups[0]['params'])
    x, y = torch.randint(0, 300, (4, 16)), torch.randint(0, 300, (4, 16))
    losses = [bench.plain_step(model, model, opt, x, y, nullcontext(), 1.0).item() for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


def test_matmul_tflops_is_positive():
    from bench import bench
    ms = bench.matmul_ms(n=64, reps=2)
    assert len(ms) == 2 and bench.matmul_tflops(ms, n=64) > 0
    # 2 n^3 = 2e9 FLOPs in the median 2 ms: 1 TFLOP/s
    assert bench.matmul_tflops([2.0, 1.0, 3.0], n=1000) == pytest.approx(1.0)


@pytest.mark.parametrize('bias', [True, False])
def test_the_published_port_gives_the_sums_of_the_definition(bias):
    """bench.py's port of the published method (one backward per position of the batch, per-sequence
    gradients inside each layer) against the definition, one plain backward per token, on a tiny
    float64 model whose sequences repeat token ids (the embedding rows sum over positions)."""
    import torch
    from bench import bench
    import metrics
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    config = GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=16, bias=bias)
    model = GPT(config).double()
    with torch.no_grad():  # away from the near-uniform initial state
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, y = torch.randint(0, 11, (3, 8)), torch.randint(0, 11, (3, 8))
    assert any(len(set(row.tolist())) < 8 for row in x)  # repeated ids within a sequence
    port = bench.published_gradient_sums(model, x, y)
    looped = metrics.per_token_gradient_sums_looped(model, x, y)
    assert list(port) == list(looped)
    for name in looped:
        for k in range(3):
            torch.testing.assert_close(port[name][k], looped[name][k], rtol=1e-9, atol=1e-12)
    assert not any(m._forward_hooks for m in model.modules())  # its hooks are gone


@pytest.mark.slow
def test_a_step_by_pass_adds_up_and_counts_every_host_read(cache_dir, monkeypatch):
    """by_pass on tiny runs: the passes and 'other' add up to the step's own time; the bare level has
    no recording pass; five extra .item() calls in each loss_change_interference (two a full step:
    the batch's change and the probe's) show as ten more host reads a step in its pass, and nowhere
    else; every patch is undone."""
    import torch
    from bench import bench
    import metrics
    args = bench.get_args(TINY_BENCH + ['--steps', '8', '--cache_dir', cache_dir])
    item, to_bool, runs = torch.Tensor.item, torch.Tensor.__bool__, {}
    for level in ['none', 'all']:
        runs[level] = bench.by_pass(args, level, os.path.join(cache_dir, 'by_pass', level))
        step = runs[level].pop('step (step_ms)')
        assert sum(v[0] for v in runs[level].values()) == pytest.approx(step[0], rel=1e-9)
        assert sum(v[1] for v in runs[level].values()) == step[1] and step[2] == 0  # no CUDA here
    assert set(runs['none']) <= {'forward', 'backward', 'clip', 'AdamW step', 'copy of theta_t', 'writes', 'other'}
    assert {'probe forward (fp32)', 'post-update forward (fp32)', 'decomposition in h', 'opposition, position-local',
            'decomposition in theta (grad+ backward)', 'D, M and nulls', 'copy of theta_t'} <= set(runs['all'])
    original = metrics.loss_change_interference

    def reading(change, generator):
        for _ in range(5):
            change.sum().item()
        return original(change, generator)
    monkeypatch.setattr(metrics, 'loss_change_interference', reading)
    more = bench.by_pass(args, 'all', os.path.join(cache_dir, 'by_pass', 'more'))
    assert more['D, M and nulls'][1] == runs['all']['D, M and nulls'][1] + 10
    assert all(more[k][1] == v[1] for k, v in runs['all'].items() if k != 'D, M and nulls'), (more, runs['all'])
    assert torch.Tensor.item is item and torch.Tensor.__bool__ is to_bool
