"""
Run folders, the machinery every program shares. Bad input: one line and exit 2 (fail, parser). A
folder's manifest lists each path a program wrote, before its first write; anything else is the user's
(open_folder). Files are written whole; lock() keeps one program on a folder; load_run() reads a run.
"""

import argparse
import ctypes
import fcntl
import json
import os
import re
import signal
import sys

import numpy as np
import torch

from model import build_gpt

MANIFEST = 'manifest.txt'


def fail(msg):  # bad input: one line naming the problem and exit status 2, never a traceback
    print(f"{os.path.basename(sys.argv[0])}: error: {' '.join(str(msg).split())}", file=sys.stderr)
    sys.exit(2)


def parser(doc, settings=()):
    """An argparse parser with one-line errors, a flag --name per (name, default, type or choices, help)."""
    p = argparse.ArgumentParser(description=doc.strip().split('\n')[0])
    p.error = lambda msg: fail(re.sub(r'^argument (\S+): ', r'\1 ', msg))
    for name, default, kind, help in settings:
        how = dict(action=argparse.BooleanOptionalAction) if kind is bool else \
            dict(choices=kind) if isinstance(kind, list) else dict(type=kind)  # bool: --name, --no-name
        shown = '' if default is None or 'default:' in help else ' (default: %(default)s)'  # a default once
        p.add_argument('--' + name, default=default, help=help + shown, **how)
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


def owned(root):  # the relative paths root's manifest lists
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            return set(f.read().split('\n')) - {''}
    except FileNotFoundError:
        return set()


def own(root, *paths):  # list paths (relative to root) in root's manifest, before they are written
    with open(os.path.join(root, MANIFEST), 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # one program at a time reads and changes the list
        new = [p for p in dict.fromkeys(paths) if p not in owned(root)]
        f.write(''.join(p + '\n' for p in new))


def foreign(root, under=''):
    """The entries below root/under no program wrote: files the manifest does not list (a listed file's
    '.tmp' twin counts), links (never followed), non-files, and empty folders no listed path lies in."""
    listed = owned(root)
    folders = {f for p in listed for f in ancestors(p)}  # 'a/b/' lists the folder a/b itself too
    listed |= {p + '.tmp' for p in listed} | {MANIFEST}
    out = []
    for folder, dirs, files in os.walk(os.path.join(root, under)):
        for name in sorted(dirs + files):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path) or not (os.path.isfile(path) or os.path.isdir(path)) or (
                    rel not in folders and not os.listdir(path) if os.path.isdir(path) else rel not in listed):
                out.append(rel)  # (a folder holding entries: they tell)
    return out


def ancestors(rel):  # the folders a relative path lies in: 'a/b/c' (or 'a/b/c/') -> ['a', 'a/b']
    return ['/'.join(rel.split('/')[:i]) for i in range(1, rel.count('/') + 1)]


def remove_owned(root, under=''):
    """Delete the listed files below root/under (and '.tmp' twins), then the folders left empty."""
    if not owned(root):  # no manifest (a new folder): nothing to delete
        return
    base = under and under + '/'
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
        f.truncate(0)  # (its file position is at the start)
        f.write(''.join(p + '\n' for p in listed if p not in mine))
        f.flush()
        os.fsync(f.fileno())


def open_folder(root, under='', overwrite=False, taken=None):
    """root/under's lock, created if absent; refused if it holds a file no program wrote, or any if `taken`."""
    folder, program = os.path.join(root, under), os.path.basename(sys.argv[0])
    check_folder(folder)
    os.makedirs(folder, exist_ok=True)
    lock_fd = lock(folder)  # then nothing changes in it while we look
    foreign_entries = [under] if under and os.path.islink(folder) else foreign(root, under)
    if foreign_entries:
        older = '' if os.path.exists(os.path.join(root, MANIFEST)) else \
            f'; a folder without {MANIFEST} may hold a run of an older version: rerun it'
        fail(f"{folder} holds files {program} did not write ({', '.join(foreign_entries[:4])}"
             f"{', ...' if len(foreign_entries) > 4 else ''}){older}")
    if taken and not overwrite and os.listdir(folder):
        fail(f"{folder} {taken}")
    if overwrite:
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
    write_atomic(root, rel, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def read_json(root, rel, by):
    """The JSON file root/rel that program `by` wrote, None if absent; unlisted (older) or torn: exit 2."""
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


def check_folder(path):
    """The nearest existing folder on the way to `path`; exit 2 if `path` cannot be made a folder."""
    full = base = os.path.abspath(path)
    while not os.path.lexists(base):
        base = os.path.dirname(base)
    if not os.path.isdir(base) or not os.access(base, os.W_OK | os.X_OK):
        fail(f"{base} is {'not writable' if os.path.isdir(base) else 'a file, not a folder'}")
    name_max, path_max = os.pathconf(base, 'PC_NAME_MAX'), os.pathconf(base, 'PC_PATH_MAX') - 100  # (files in it)
    if len(os.fsencode(full)) > path_max or max(len(os.fsencode(n)) for n in full.split(os.sep)) > name_max:
        fail(f"{path[:40]}{'...' * (len(path) > 40)}: longer than this system allows (names of at most "
             f"{name_max} bytes, paths of {path_max})")
    return base


def check_records(root, records, rows=0, every=()):
    """Exit 2 unless each record (name -> (shape, dtype)) is a whole .npy of that shape, those in `every`
    written (not NaN or -1) in rows 0..rows-1. Read-only: a memmap opened to write would extend it."""
    for name, (shape, dtype) in records.items():
        path = os.path.join(root, name + '.npy')
        try:
            r = np.load(path, mmap_mode='r', allow_pickle=False)  # a short file: ValueError
        except (OSError, ValueError, EOFError) as e:
            fail(f"{path}: corrupt or truncated record ({e})")
        if (r.shape, r.dtype.name, os.path.getsize(path)) != (tuple(shape), dtype, r.offset + r.nbytes):
            fail(f"{path}: {os.path.getsize(path)} bytes of {r.shape} {r.dtype}, not a whole {tuple(shape)} {dtype}")
        if name in every and (np.isnan(r[:rows]) if r.dtype.kind == 'f' else r[:rows] < 0).any():
            fail(f"{path}: steps before {rows}, the checkpoint's, are missing")


def load_run(folder, step=None):
    """A run, for forks: (config.json's settings, its records as read-only memmaps by name, and the model
    theta_step on the CPU from ckpts/step_NNNNNN.pt or ckpt.pt if one holds that step; None: no step)."""
    config = read_json(folder, 'config.json', 'train.py') or fail(f"{folder}: no run (no config.json)")
    check_records(folder, config['records'])
    records = {name: np.load(os.path.join(folder, name + '.npy'), mmap_mode='r') for name in config['records']}
    if step is None:
        return config, records, None
    path = next((p for p in [f"{folder}/ckpts/step_{step:06d}.pt", f"{folder}/ckpt.pt"] if os.path.exists(p)), '')
    ckpt = load_checkpoint(path) if path else {}
    if ckpt.get('step') != step:
        fail(f"{folder}: no checkpoint of step {step} (ckpts/step_{step:06d}.pt, or ckpt.pt at that step)")
    model = build_gpt(config, config['vocab_size_actual'])
    model.load_state_dict(ckpt['model'])
    return config, records, model


def load_checkpoint(path, step=None, device='cpu'):
    """A checkpoint of train.py (of `step`, if given); a torn or foreign file: one line, exit 2, never trusted."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        if step is not None and int(ckpt['step']) != step:
            raise ValueError(f"it holds step {ckpt['step']}")
        return ckpt
    except Exception as e:
        fail(f"{path}: not a checkpoint{f' of step {step}' if step is not None else ''} "
             f"({' '.join(str(e).split())[:200]})")


def lock(folder):
    """A folder's lock while this process lives (no lock file: a killed program never blocks the next)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fail(f"{folder} is in use by another {os.path.basename(sys.argv[0])} (it holds the folder's lock)")
    return fd


def on_signals(message):
    """SIGTERM and Ctrl-C stop with one line and message(), exit 128 + signal; the handlers replaced."""
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


def use_cpu_well(device, threads):
    """--threads, or one thread on a CPU: torch's default of one per core spin-waits for all of them, so a
    core that another program holds stalls every matmul (steps several times slower on a shared machine)."""
    if device == 'cpu':
        keep_freed_memory()
    if threads or device == 'cpu':
        torch.set_num_threads(threads or 1)


def keep_freed_memory():
    """Keep what a step frees for the next (else glibc returns it and page-faults it in); True if set."""
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers, from glibc's malloc.h
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl, Windows)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
