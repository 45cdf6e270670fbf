"""
Run folders: the machinery train.py, measure.py and plot.py share, written once. Bad input is one
line and exit status 2 (fail, parser). A folder's manifest lists every path a program wrote, listed
before it is first written; any other file is the user's, never deleted: --overwrite deletes listed
files only and refuses a folder holding anything else. Files are written whole (temporary file,
fsync, rename); lock() keeps one program on a folder; on_signals() stops with one line.
"""

import argparse
import ctypes
import fcntl
import json
import os
import re
import signal
import sys

import torch

MANIFEST = 'manifest.txt'


def fail(msg):
    """Bad input: one line naming the problem and exit status 2, never a traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: {' '.join(str(msg).split())}", file=sys.stderr)
    sys.exit(2)


def parser(doc, settings=()):
    """An argparse parser whose errors are one line ('error: --flag must be ...'), with a flag --name
    for each (name, default, type or choices, help) of settings; type bool: --name and --no-name."""
    p = argparse.ArgumentParser(description=doc.strip().split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: fail(re.sub(r'^argument (\S+): ', r'\1 ', msg))
    for name, default, kind, help in settings:
        how = dict(action=argparse.BooleanOptionalAction) if kind is bool else \
            dict(choices=kind) if isinstance(kind, list) else dict(type=kind)
        p.add_argument('--' + name, default=default, help=help, **how)
    return p


def checked(kind, ok, what):
    """An argparse type: kind(text), refused with '--flag must be <what>, got <text>' unless ok(value)."""
    def convert(text):
        if not ok(value := kind(text)):  # a ValueError in kind is argparse's "invalid int value: 'x'"
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    convert.__name__ = kind.__name__
    return convert


positive = checked(int, lambda v: v > 0, 'positive')
count = checked(int, lambda v: v >= 0, 'a finite number >= 0')
nonnegative = checked(float, lambda v: 0 <= v < float('inf'), 'a finite number >= 0')


def owned(root):
    """The relative paths root's manifest lists (an empty set if it has none)."""
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            return set(f.read().split('\n')) - {''}
    except FileNotFoundError:
        return set()


def own(root, *paths):
    """List paths (relative to root) in root's manifest, before they are written."""
    with open(os.path.join(root, MANIFEST), 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # one program at a time reads and changes the list
        new = [p for p in dict.fromkeys(paths) if p not in owned(root)]
        f.write(''.join(p + '\n' for p in new))


def foreign(root, under=''):
    """The entries below root/under that no program wrote: files not in root's manifest (a listed
    file's '.tmp' twin counts as listed), links (never followed), anything not a plain file or folder,
    and empty folders no listed path lies in."""
    listed = owned(root)
    folders = {f for p in listed for f in ancestors(p)}  # 'a/b/' lists the folder a/b itself too
    listed |= {p + '.tmp' for p in listed} | {MANIFEST}
    out = []
    for folder, dirs, files in os.walk(os.path.join(root, under)):
        for name in sorted(dirs + files):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path) or not (os.path.isfile(path) or os.path.isdir(path)):
                out.append(rel)
            elif os.path.isdir(path):  # a folder holding entries: they tell
                out += [rel] if rel not in folders and not os.listdir(path) else []
            elif rel not in listed:
                out.append(rel)
    return out


def ancestors(rel):
    """The folders a relative path lies in: 'a/b/c' -> ['a', 'a/b'] (a listed folder 'a/b/': the same)."""
    parts = rel.split('/')[:-1]
    return ['/'.join(parts[:i]) for i in range(1, len(parts) + 1)]


def remove_owned(root, under=''):
    """Delete the listed files below root/under (and their '.tmp' twins), then the folders there left
    empty; the manifest keeps the other paths. Call it after foreign() found nothing."""
    if not owned(root):  # no manifest (a new folder): nothing to delete
        return
    base = os.path.join(under, '') if under else ''
    with open(os.path.join(root, MANIFEST), 'r+') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        listed = sorted(owned(root))
        mine = [p for p in listed if p.startswith(base) and p != base]  # root/under itself stays
        for path in (os.path.join(root, p) + tmp for p in mine for tmp in ('', '.tmp')):
            if os.path.isfile(path):
                os.remove(path)
        for folder in sorted({a for p in mine for a in ancestors(p) if a.startswith(base)}, reverse=True):
            if os.path.isdir(os.path.join(root, folder)) and not os.listdir(os.path.join(root, folder)):
                os.rmdir(os.path.join(root, folder))  # deepest first
        f.seek(0)
        f.truncate()
        f.write(''.join(p + '\n' for p in listed if p not in mine))
        f.flush()
        os.fsync(f.fileno())


def open_folder(root, under='', overwrite=False, taken=None):
    """root/under, created if absent, locked and ready to write into; returns the lock. Refused (one
    line, exit 2, nothing changed) if it holds a file no program wrote; unless overwrite, also if it
    holds anything and `taken` says why. With overwrite, its listed files are deleted first."""
    folder, program = os.path.join(root, under), os.path.basename(sys.argv[0])
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        fail(f"{folder}: {e}")
    lock_fd = lock(folder)  # then nothing changes in it while we look
    foreign_entries = [under] if under and os.path.islink(folder) else foreign(root, under)
    if foreign_entries:
        older = '' if os.path.exists(os.path.join(root, MANIFEST)) else \
            f'; a folder without {MANIFEST} may hold a run of an older version: rerun it'
        fail(f"{folder} holds files {program} did not write ({', '.join(foreign_entries[:4])}"
             f"{', ...' if len(foreign_entries) > 4 else ''}){older}")
    if taken and not overwrite and os.listdir(folder):
        fail(f"{folder} {taken}")
    if overwrite and owned(root):
        remove_owned(root, under)
    if under:
        own(root, under + '/')  # the folder itself, so that an empty one is the program's too
    return lock_fd


def write_atomic(root, rel, write):
    """root/rel := what write(f) writes, listed first, then written whole: a temporary file, fsync, rename."""
    own(root, rel)
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'wb') as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + '.tmp', path)


def write_json(root, rel, obj):
    """root/rel := obj as JSON, written whole."""
    write_atomic(root, rel, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def read_json(root, rel, by):
    """The JSON file root/rel that program `by` wrote, or None if there is none; one the manifest does
    not list (an older version's), or a torn one: one line, exit 2."""
    path = os.path.join(root, rel)
    if not os.path.exists(path):
        return None
    if rel not in owned(root):
        fail(f"{path} was made by an older version of {by} (it is not in {MANIFEST}), or not by it; rerun it")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read {path}: {e}")


def lock(folder):
    """An exclusive lock on the folder while this process lives (no lock file: a killed program
    never blocks the next); a second program is refused."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fail(f"{folder} is in use by another {os.path.basename(sys.argv[0])} (it holds the folder's lock)")
    return fd


def on_signals(message):
    """SIGTERM (job schedulers) and Ctrl-C stop with one line, message() (how to continue), and exit
    status 128 + the signal. Returns the handlers it replaced."""
    def stop(signum, frame):
        print(f"\n{os.path.basename(sys.argv[0])}: stopped by {signal.Signals(signum).name}; {message()}",
              file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    return {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}


def check_device(device, dtype='float32'):
    """What is wrong with --device and --dtype on this machine (None if nothing)."""
    if device == 'mps' and not torch.backends.mps.is_available():
        return "--device mps: this machine has no MPS device"
    if device in ('auto', 'cpu', 'mps'):
        return None
    if not re.fullmatch(r'cuda(:\d+)?', device):
        return f"--device {device}: not one of auto, cpu, cuda, cuda:N, mps"
    if int(device[5:] or 0) >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices"
    if dtype == 'bfloat16' and not torch.cuda.is_bf16_supported():
        return f"--dtype bfloat16: {torch.cuda.get_device_name(int(device[5:] or 0))} does not support it"
    return None


def keep_freed_memory():
    """On the CPU, keep the memory a step frees for the next step: glibc returns a freed large block
    (the (B*T, V) logits, 32 MiB at the default sizes) to the system, and the next step pays a page
    fault per 4 KiB, a fifth of a step on 2 cores (results/bench.md). The values are the same.
    glibc only; returns whether both settings were taken."""
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers, from glibc's malloc.h
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl, Windows)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
