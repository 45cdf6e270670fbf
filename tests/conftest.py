import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a tiny model that trains in a second or two on 2 CPU cores
TINY = ['--n_layer', '2', '--n_head', '2', '--n_embd', '16', '--block_size', '16', '--batch_size', '4',
        '--vocab_size', '300', '--probe_seqs', '3', '--warmup_iters', '2', '--log_interval', '5']


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory):
    """One tokenizer cache for the whole session: the cache is keyed by content, so sharing it
    is safe, and it spares every run the tokenizer training."""
    return str(tmp_path_factory.mktemp('data_cache'))


def run_train(*args, check=True):
    """Run train.py in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *args],
                          capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory, cache_dir):
    """A few-step run of a tiny model on the default corpus, shared by the record tests."""
    out = str(tmp_path_factory.mktemp('run') / 'tiny')
    run_train(*TINY, '--max_iters', '12', '--ckpt_interval', '6', '--cache_dir', cache_dir, '--out_dir', out)
    return out
