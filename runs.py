"""
Run folders: the machinery train.py, measure.py and plot.py share, written once.

- fail(msg): bad input is one line naming the problem and exit status 2, never a traceback.
- A folder a program writes into keeps a manifest (MANIFEST, one relative path a line). A program
  adds a path to it *before* it first writes the file, so the manifest says which files the
  programs wrote; any other file is the user's. --overwrite deletes listed files only, and refuses a
  folder holding anything else. A listed file's temporary twin (name + '.tmp') counts as listed.
- Files are written whole: a temporary file, fsync, rename (a reader never sees half a file).
- lock(folder): one program at a time on a folder, released by the kernel however the process ends.
- on_signals(message): SIGTERM and Ctrl-C stop with one line and exit status 128 + the signal.
"""

import fcntl
import json
import os
import signal
import sys

MANIFEST = 'manifest.txt'


def fail(msg):
    """Bad input: one line naming the problem and exit status 2, never a traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: {' '.join(str(msg).split())}", file=sys.stderr)
    sys.exit(2)


def owned(root):
    """The relative paths root's manifest lists (an empty set if it has none)."""
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            return set(f.read().split('\n')) - {''}
    except FileNotFoundError:
        return set()


def own(root, *paths):
    """List paths (relative to root) in root's manifest, before they are written."""
    new = [p for p in dict.fromkeys(paths) if p not in owned(root)]
    if new:
        with open(os.path.join(root, MANIFEST), 'a') as f:  # appends of a few lines do not interleave
            f.write(''.join(p + '\n' for p in new))


def foreign(root, under=''):
    """The entries below root/under that no program wrote: files not in root's manifest, links, and
    anything that is not a plain file or folder. Links are never followed."""
    listed = owned(root)
    listed |= {p + '.tmp' for p in listed} | {MANIFEST}
    out = []
    for folder, dirs, files in os.walk(os.path.join(root, under)):
        for name in sorted(dirs + files):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path) or not (os.path.isfile(path) or os.path.isdir(path)):
                out.append(rel)
            elif os.path.isfile(path) and rel not in listed:
                out.append(rel)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
    return out


def remove_owned(root, under=''):
    """Delete the listed files below root/under (and their temporary twins), then the folders left
    empty there. Call it after foreign() found nothing."""
    listed = owned(root)
    base = os.path.join(under, '') if under else ''
    for rel in sorted(listed):
        if rel.startswith(base):
            for path in (os.path.join(root, rel), os.path.join(root, rel) + '.tmp'):
                if os.path.isfile(path):
                    os.remove(path)
    for folder, _, _ in sorted(os.walk(os.path.join(root, under)), reverse=True):  # deepest first
        if folder != root and not os.listdir(folder):
            os.rmdir(folder)
    keep = [p for p in sorted(listed) if not p.startswith(base)]
    write_atomic(root, MANIFEST, lambda f: f.write(''.join(p + '\n' for p in keep).encode()), own_it=False)


def write_atomic(root, rel, write, own_it=True):
    """root/rel := what write(f) writes to a binary file: a temporary file, fsync, rename."""
    if own_it:
        own(root, rel)
    path = os.path.join(root, rel)
    with open(path + '.tmp', 'wb') as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + '.tmp', path)


def write_json(root, rel, obj):
    """root/rel := obj as JSON, written whole."""
    write_atomic(root, rel, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def lock(folder):
    """An exclusive lock on the folder, held as long as this process lives; a second program on the
    same folder is refused. No file is written for it, so a killed program never blocks the next."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fail(f"{folder} is in use by another program (it holds the folder's lock)")
    return fd


def on_signals(message):
    """SIGTERM (what job schedulers send) and Ctrl-C stop the program with one line, message() (how
    to continue), and exit status 128 + the signal. Returns the handlers it replaced."""
    def stop(signum, frame):
        print(f"\n{os.path.basename(sys.argv[0])}: stopped by {signal.Signals(signum).name}; {message()}",
              file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    return {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
