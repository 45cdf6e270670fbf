"""data.py on nanoGPT's format: a folder of train.bin and val.bin (uint16 token ids), memory-mapped,
counted once and cached, checked before anything is written, and trained on end to end."""
import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

import data
import train
from conftest import ROOT, TINY

TEXT = ''.join(f"line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i % 13}.\n" for i in range(600))


class Unpickled:
    """Unpickling this object creates the file `marker` (a meta.pkl that must never be read)."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, 'w')


def token_folder(folder, tokenizer=True):
    """nanoGPT's layout, as its prepare.py scripts write it: ids of a BPE tokenizer of 300 tokens trained
    on TEXT, the first 9/10 as train.bin and the rest as val.bin (uint16), a meta.pkl beside them, and
    (tokenizer) the tokenizer.json that made the ids. Returns the folder and the ids."""
    os.makedirs(folder)
    tok = data.train_tokenizer(TEXT, 300)
    ids = np.array(tok.encode(TEXT).ids, dtype=np.uint16)
    cut = len(ids) * 9 // 10
    ids[:cut].tofile(os.path.join(folder, 'train.bin'))
    ids[cut:].tofile(os.path.join(folder, 'val.bin'))
    with open(os.path.join(folder, 'meta.pkl'), 'wb') as f:
        pickle.dump(Unpickled(os.path.join(folder, 'unpickled')), f)
    if tokenizer:
        tok.save(os.path.join(folder, 'tokenizer.json'))
    return folder, ids[:cut], ids[cut:]


def test_unigram_counts_in_chunks_are_bincount():
    ids = np.random.default_rng(0).integers(0, 50, 1001).astype(np.uint16)
    for chunk in (7, 1000, 1 << 24):
        assert np.array_equal(data.unigram_counts(ids, 60, 'x', chunk=chunk), np.bincount(ids, minlength=60))


def test_a_token_folder_is_mapped_counted_once_and_cached(tmp_path):
    folder, train_ids, val_ids = token_folder(str(tmp_path / 'ids'))
    lines = []
    corpus = data.prepare(folder, 300, str(tmp_path / 'cache'), log=lines.append)
    assert isinstance(corpus['train'], np.memmap) and isinstance(corpus['val'], np.memmap)
    assert np.array_equal(corpus['train'], train_ids) and np.array_equal(corpus['val'], val_ids)
    assert np.array_equal(corpus['counts'], np.bincount(train_ids, minlength=300))
    assert (corpus['vocab_size'], corpus['train_tokens'], corpus['val_tokens']) == (300, len(train_ids), len(val_ids))
    assert corpus['tokenizer'] == os.path.join(folder, 'tokenizer.json') and "nanoGPT's" in corpus['corpus']
    assert len(lines) == 1 and lines[0].startswith('counting the tokens')
    again = data.prepare(folder, 300, str(tmp_path / 'cache'), log=lines.append)  # from the cache
    assert len(lines) == 1 and again['key'] == corpus['key'] and np.array_equal(again['counts'], corpus['counts'])
    assert data.prepare(folder, 400, str(tmp_path / 'cache'))['key'] != corpus['key']  # keyed by V too
    os.remove(os.path.join(folder, 'tokenizer.json'))
    assert data.prepare(folder, 300, str(tmp_path / 'cache'))['tokenizer'] is None  # ids not decoded
    assert not os.path.exists(os.path.join(folder, 'unpickled'))  # meta.pkl never unpickled


def bad_folders(tmp_path):
    """(name, folder, vocab_size, words of the message) of each kind of bad folder of token ids."""
    folder, train_ids, val_ids = token_folder(str(tmp_path / 'good'))
    V = int(max(train_ids.max(), val_ids.max()))  # one less than needed
    for name, edit in [('odd', lambda f: open(os.path.join(f, 'val.bin'), 'ab').write(b'\x00')),
                       ('empty', lambda f: open(os.path.join(f, 'train.bin'), 'wb').close()),
                       ('no_val', lambda f: os.remove(os.path.join(f, 'val.bin'))),
                       ('no_train', lambda f: os.remove(os.path.join(f, 'train.bin')))]:
        shutil.copytree(folder, str(tmp_path / name))
        edit(str(tmp_path / name))
    yield 'id >= V in train', folder, int(train_ids.max()), f"token id {train_ids.max()} >= --vocab_size"
    only_val = str(tmp_path / 'val_id')
    shutil.copytree(folder, only_val)
    np.append(val_ids, np.uint16(V + 5)).tofile(os.path.join(only_val, 'val.bin'))
    yield 'id >= V in val', only_val, V + 1, f"val.bin: token id {V + 5} >= --vocab_size {V + 1}"
    yield 'odd size', str(tmp_path / 'odd'), 300, 'bytes, not uint16 token ids'
    yield 'empty', str(tmp_path / 'empty'), 300, 'train.bin: 0 bytes'
    yield 'no val.bin', str(tmp_path / 'no_val'), 300, 'val.bin: missing'
    yield 'no train.bin', str(tmp_path / 'no_train'), 300, 'train.bin: missing'
    yield 'vocabulary over 16 bits', folder, 70000, 'must be in 1..65536'


def test_bad_token_folders_raise_one_line_and_cache_nothing(tmp_path):
    cache = tmp_path / 'cache'
    for name, folder, V, words in bad_folders(tmp_path):
        with pytest.raises(ValueError) as e:
            data.prepare(folder, V, str(cache))
        assert words in str(e.value) and '\n' not in str(e.value), (name, str(e.value))
        assert not cache.exists() or not os.listdir(cache), name  # no cache, not even a partial one


@pytest.mark.slow
def test_train_py_refuses_a_bad_token_folder_in_one_line(tmp_path):
    for name, folder, V, words in list(bad_folders(tmp_path))[1:5]:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--data', folder, '--vocab_size',
                               str(V), '--cache_dir', str(tmp_path / 'cache'), '--out_dir', str(tmp_path / 'x')],
                              capture_output=True, text=True, cwd=ROOT)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], (name, proc.stderr)
        assert not (tmp_path / 'x').exists(), name


@pytest.mark.parametrize('tokenizer', [True, False])
def test_a_tiny_model_trains_on_a_token_folder(tmp_path, tokenizer):
    """End to end: train.py on nanoGPT's files; the records and one-off files come from them (the
    counts of train.bin, the probe windows of val.bin); with a tokenizer.json, it decodes the probe."""
    folder, train_ids, val_ids = token_folder(str(tmp_path / 'ids'), tokenizer)
    out = str(tmp_path / 'run')
    with contextlib.redirect_stdout(io.StringIO()):
        train.main([*TINY, '--data', folder, '--max_iters', '4', '--threads', '1',
                    '--cache_dir', str(tmp_path / 'cache'), '--out_dir', out])
    config = json.load(open(os.path.join(out, 'config.json')))
    assert config['vocab_size_actual'] == 300 and config['train_tokens'] == len(train_ids)
    assert np.array_equal(np.load(os.path.join(out, 'train_counts.npy')), np.bincount(train_ids, minlength=300))
    probe = np.load(os.path.join(out, 'probe_tokens.npy'))  # (P, T + 1)
    assert np.array_equal(probe, np.stack([val_ids[o:o + 17] for o in config['probe_offsets']]))
    assert np.all(np.isfinite(np.load(os.path.join(out, 'probe_loss.npy'))))
    assert np.all(np.isfinite(np.load(os.path.join(out, 'train_D.npy'))))
    assert os.path.exists(os.path.join(out, 'tokenizer.json')) == tokenizer
    if tokenizer:
        from tokenizers import Tokenizer
        assert Tokenizer.from_file(os.path.join(out, 'tokenizer.json')).decode(probe[0].tolist()) in TEXT
    assert not os.path.exists(os.path.join(folder, 'unpickled'))
