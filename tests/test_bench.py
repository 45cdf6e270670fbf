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
    return subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py'), *args],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
def test_bench_prints_every_section_and_the_methods_agree(cache_dir):
    proc = run_bench(*TINY_BENCH, '--cache_dir', cache_dir)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for row in ['plain nanoGPT-style loop', '--record none (bare)', '--record light', '--record all',
                'probe pass', 'h-space decomposition', 'theta+/-', 'position-local opposition, |G|^T |X|',
                'scheduled: JVP prediction', 'MB per step', 'BNSL fit', 'plot.py on the 3 runs',
                '6. model FLOPs', 'TFLOP/s']:
        assert row in out, row
    # the fast methods give the sums of the slow ones (float32: up to rounding)
    for diff in re.findall(r'max relative difference (?:of the sums )?(\S+)', out):
        assert float(diff.rstrip(';')) < 1e-5  # a nan fails here
    assert len(re.findall(r'max relative difference', out)) == 2


def test_bench_bad_flag_is_one_line():
    proc = run_bench('--steps', '2')
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_flops_per_token_counts_every_matmul_of_a_training_step():
    """flops_per_token against PyTorch's FLOP counter on a real forward and backward (attention by
    the math kernel, whose matmuls the counter sees): the same number, exactly."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    import bench
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
    proc = run_bench(*TINY_BENCH, '--cache_dir', cache_dir, '--steps_only', '--dtype', 'bfloat16',
                     '--peak_tflops', '0.001')
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert '(bfloat16)' in out and '2. each quantity' not in out
    mfus = [float(m) for m in re.findall(r'MFU\s+(\S+)%', out)]
    assert len(mfus) == 4 and all(m > 0 for m in mfus[:2]), out  # light: nan in a run this short
