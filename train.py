"""
Train a compact GPT and record its training dynamics at every step.

    python train.py                       # default corpus (King James Bible), half an hour on a busy CPU
    python train.py --n_layer 6 --out_dir out/L6
    torchrun --nproc_per_node 2 train.py  # DistributedDataParallel

The loop is nanoGPT's (AdamW, warmup and cosine decay, clipping, optional bf16 and torch.compile), with
a Recorder (recorder.py) called at each moment of a step; docs/records.md describes what it writes.
"""

import collections
import gc
import math
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import runs
from metrics import fp32_forward
from model import build_gpt, per_token_loss
from recorder import RECORDS, Recorder
from runs import fail, positive, count, nonnegative

# -----------------------------------------------------------------------------
# settings: (name, default, type or choices, help), each a flag --name; docs/running.md says more
fraction = runs.checked(float, lambda v: 0 <= v < 1, 'in [0, 1)')  # AdamW's moving averages need it
seed = runs.checked(int, lambda v: 0 <= v < 2 ** 32, 'in 0 .. 2^32 - 1')
seconds = runs.checked(float, lambda v: v > 0, 'positive')
here = os.path.dirname(os.path.abspath(__file__))
PROBE_TOKENS = 2048  # the default probe: about this many tokens whatever the context
SETTINGS = [
    # model
    ('n_layer', 4, positive, 'number of Transformer blocks'),
    ('n_head', 4, positive, 'attention heads per block'),
    ('n_embd', 128, positive, 'width d of the residual stream and of h'),
    ('block_size', 128, positive, 'context length T'),
    ('bias', True, bool, 'biases in Linear and LayerNorm layers'),
    ('tie_weights', False, bool, 'share the LM head matrix U with the token embedding'),
    # data
    ('data', None, str, "a UTF-8 text file, a folder of .txt files or of nanoGPT's train.bin, val.bin "
     "(default: the King James Bible)"),
    ('vocab_size', 4096, int,  # checked by data.prepare: a .bin folder's may be below 257
     "the BPE's vocabulary size, or that of the tokenizer that made a .bin folder's ids (GPT-2: 50257)"),
    ('cache_dir', os.path.join(here, 'data_cache'), str, 'where tokenizers and token arrays are cached'),
    ('batch_size', 16, positive, 'sequences per step (the global batch under DDP)'),
    # optimizer and schedule
    ('max_iters', 500, positive, 'number of optimizer steps'),
    ('learning_rate', 1e-3, nonnegative, 'peak learning rate'),
    ('decay_lr', False, bool, 'cosine decay to --min_lr after warmup (nanoGPT); default: constant'),
    ('min_lr', 1e-4, nonnegative, 'learning rate at the end of the cosine decay (0 is allowed)'),
    ('warmup_iters', 50, count, 'steps of linear warmup'),
    ('weight_decay', 0.1, nonnegative, 'AdamW weight decay on matrices'),
    ('beta1', 0.9, fraction, 'AdamW beta1'),
    ('beta2', 0.99, fraction, 'AdamW beta2'),
    ('optim', 'nanogpt', ['nanogpt', 'published'], 'published: eps 1e-5, beta2 0.95, embeddings undecayed'),
    ('grad_clip', 1.0, nonnegative, 'clip the global gradient norm to this (0: no clipping)'),
    # system
    ('device', 'auto', str, 'auto, cpu, cuda, cuda:N or mps'),
    ('dtype', 'auto', ['auto', 'float32', 'bfloat16'], 'training precision (auto: bf16 on GPUs with it)'),
    ('compile', False, bool, 'torch.compile the steps that record no activations (none under --record all)'),
    ('seed', 1337, seed, 'seeds the initialisation, the batches and the probe set'),
    ('threads', 0, count, "CPU threads (0: one on a CPU, where torch's one per core collapses under load)"),
    # recording
    ('out_dir', 'out', str, 'run directory'),
    ('record', 'all', ['all', 'light', 'none'], 'all: every record every step; light: some log-spaced; none: scalars'),
    ('probe_seqs', None, positive, 'held-out probe sequences, chosen once (default: 2048 tokens / T)'),
    ('hidden_every', 0, count, 'probe hidden states every N steps (0: log-spaced; first and last always)'),
    ('grad_every', 0, count, 'exact opposition and first-order prediction every N steps (0: log-spaced)'),
    ('opposition_seqs', None, positive, 'probe sequences of the exact opposition (default: all)'),
    ('train_probe_seqs', 0, count, "fixed training windows recorded as the probe set's (0: off)"),
    ('log_interval', 10, positive, 'steps between progress lines'),
    ('log_seconds', 30.0, seconds, 'a line at least this often, during a long step too'),
    ('ckpt_interval', 250, positive, 'steps between checkpoints (and at the end)'),
    ('ckpt_minutes', 5.0, nonnegative, 'a checkpoint also at least this often (0: every step)'),
    ('keep_ckpts', 'none', ['none', 'log2'], 'log2: also keep theta_t, AdamW state at t = 1, 2, 4, ...'),
    ('resume', False, bool, 'continue the run in --out_dir from its checkpoint'),
    ('overwrite', False, bool, 'replace a run already in --out_dir'),
]
# A resume may change only where and how fast the run goes (config.json's `resumed` lists them);
# every other setting shapes what the run computes and must stay the same.
RESUME_MAY_CHANGE = ['device', 'compile', 'threads', 'cache_dir', 'log_interval', 'log_seconds',
                     'ckpt_interval', 'ckpt_minutes']
RESUME_SAME = [s[0] for s in SETTINGS if s[0] not in RESUME_MAY_CHANGE + ['out_dir', 'resume', 'overwrite']]


def get_args(argv=None):
    args = runs.parser(__doc__, SETTINGS).parse_args(argv)
    args.probe_seqs = args.probe_seqs or max(1, PROBE_TOKENS // args.block_size)
    args.opposition_seqs = args.opposition_seqs or args.probe_seqs
    if args.n_embd % args.n_head:
        fail(f"--n_embd {args.n_embd} is not divisible by --n_head {args.n_head}")
    if args.opposition_seqs > args.probe_seqs:
        fail(f"--opposition_seqs {args.opposition_seqs} is larger than --probe_seqs {args.probe_seqs}")
    need = 16 * (12 * args.n_layer * args.n_embd ** 2 + 2 * args.vocab_size * args.n_embd)  # about: fp32 weights,
    if need > os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'):  # gradients and AdamW's two moments
        fail(f"a model of this size needs about {need / 1e9:,.0f} GB for training, more than this machine's memory")
    if args.resume and args.overwrite:
        fail("--resume continues the run in --out_dir, --overwrite replaces it: give one of them")
    if problem := runs.check_device(args.device, args.dtype):
        fail(problem)
    for path in [args.out_dir] + [args.cache_dir] * (not os.path.isdir(args.cache_dir)):  # a cache may be
        runs.check_folder(path)  # read-only once made; the paths are checked before anything is created
    return args


def main(argv=None):
    args = get_args(argv)
    handlers = runs.on_signals(lambda: how_to_continue(args.out_dir))  # SIGTERM and Ctrl-C: one line
    ddp, rank, world, device, dtype, autocast = setup_system(args)
    master = rank == 0  # only process 0 records, checkpoints and prints
    torch.manual_seed(args.seed)
    S, B, T = args.max_iters, args.batch_size, args.block_size
    args.beta2 = 0.95 if args.optim == 'published' else args.beta2  # the published AdamW's, in config.json

    # data: the corpus, and the held-out probe set and training-window probe, both fixed for the run
    corpus = load_corpus(args, master)
    probe = fixed_windows(corpus['val'], args.probe_seqs, T, args.seed, '--probe_seqs', device)
    train_probe = fixed_windows(corpus['train'], args.train_probe_seqs, T, [args.seed, 2 ** 32],
                                '--train_probe_seqs', device)

    # the model, its optimizer and the recorder; then the run directory, once the run can start
    raw_model = build_gpt(vars(args), corpus['vocab_size']).to(device)  # parameters stay fp32
    optimizer = raw_model.configure_optimizers(args.weight_decay, args.learning_rate, (args.beta1, args.beta2),
                                               device.split(':')[0], args.optim == 'published')
    rec = Recorder(args, raw_model, corpus, probe[1:], dtype, rank, world, train_probe[1:])  # the fp32 module
    check_resources(args, rec, raw_model, autocast, get_batch(args, corpus, 0, rank, world, device)[1:])
    start, lock = open_run_dir(args, corpus, rec, raw_model, optimizer, device, master)
    if master:
        rec.open(args.out_dir, create=start == 0)
        write_run_files(args, start, corpus, raw_model, rec, probe[0], train_probe[0], device, dtype, world)
    # DDP: the backward averages the gradients; steps that capture activations run eagerly (hooks)
    devices = [torch.cuda.current_device()] if device.startswith('cuda') else None
    eager = DDP(raw_model, device_ids=devices) if ddp else raw_model
    model = torch.compile(eager) if args.compile else eager
    if master:
        print(f"GPT {args.n_layer}L/{args.n_embd}d, {raw_model.num_params() / 1e6:.2f}M parameters, vocabulary "
              f"{corpus['vocab_size']}; {S} steps of {B} x {T} tokens on {device} ({dtype}, {world} process"
              f"{'es' * (world > 1)}, threads {torch.get_num_threads()}), record {args.record}", flush=True)
    progress = Progress(rec, start, args.log_seconds, master)  # the ETA; a line at least every --log_seconds

    for step in range(start, S):
        progress.begin(step)
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
                fail(f"non-finite training loss at step {step}: records are complete up to step {step - 1}; "
                     f"{how_to_continue(args.out_dir)}")
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
        rec.write('step_ms', step, progress.end(step))  # the writes waited for the device

        # after the last step: probe measures of the final model theta_S (probe row S)
        if step + 1 == S:
            rec.probe(S)

        # checkpoint and log (process 0): every --ckpt_interval steps and --ckpt_minutes, and at the end;
        # under --keep_ckpts log2 also theta_{t+1} when t+1 = 1, 2, 4, ...
        if master and args.keep_ckpts == 'log2' and (step + 1) & step == 0:
            save_checkpoint(args, f"ckpts/step_{step + 1:06d}.pt", raw_model, optimizer, step + 1)
        if master and ((step + 1) % args.ckpt_interval == 0 or step + 1 == S
                       or time.time() - progress.saved >= 60 * args.ckpt_minutes):
            rec.flush()
            save_checkpoint(args, 'ckpt.pt', raw_model, optimizer, step + 1)
            runs.write_json(args.out_dir, 'progress.json', {'steps_done': step + 1, 'max_iters': S})
            progress.saved = time.time()
        if master and (step % args.log_interval == 0 or step + 1 == S or progress.quiet()):
            progress.say(progress.line(step, rec, lr))

    progress.step = None  # stops the heartbeat
    if master:
        print(f"done: {S - start} steps in {(time.time() - progress.t0) / 60:.1f} min; "
              f"records in {args.out_dir}")
    model = eager = None  # release DDP (its reducer holds gloo work objects) while all is alive
    finish(ddp, lock, handlers)


# -----------------------------------------------------------------------------
# the pieces of main, in the order it uses them

def setup_system(args):
    """(ddp, rank, world size, device, dtype, autocast): under torchrun a device per process."""
    ddp = int(os.environ.get('RANK', -1)) != -1  # started by torchrun
    if ddp:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else 'cpu'
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
        if device.startswith('cuda'):
            torch.cuda.set_device(device)
    else:
        device = args.device if args.device != 'auto' else (
            'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu')
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    if args.batch_size % world:
        fail(f"--batch_size {args.batch_size} is not divisible by the {world} processes")
    runs.use_cpu_well(device, args.threads)
    return (ddp, rank, world, device, *precision(args.dtype, device.split(':')[0]))


def precision(dtype, device_type):
    """(dtype, autocast): auto is bf16 on GPUs with it. Parameters and the recording passes stay fp32."""
    if dtype == 'auto':
        dtype = 'bfloat16' if device_type == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
    return dtype, nullcontext() if dtype == 'float32' else torch.autocast(device_type, dtype=torch.bfloat16)


def load_corpus(args, master):
    """data.prepare's corpus of --data, or one line and exit 2."""
    try:
        corpus = data.prepare(args.data, args.vocab_size, args.cache_dir,
                              log=(lambda msg: print(msg, flush=True)) if master else None)
    except (ValueError, OSError) as e:
        fail(e)
    if len(corpus['train']) < args.block_size + 1:
        fail(f"training split has {len(corpus['train'])} tokens, "
             f"fewer than one window of block_size + 1 = {args.block_size + 1}")
    return corpus


def fixed_windows(tokens, n, T, seed, flag, device='cpu'):
    """offsets, inputs, targets (n, T) of n disjoint windows chosen once by `seed` (Nones if n is 0)."""
    if n == 0:
        return None, None, None
    n_windows = len(tokens) // (T + 1)  # disjoint windows
    if n_windows < n:
        fail(f"the split holds {n_windows} windows of {T + 1} tokens, fewer than {flag} {n}")
    offsets = np.sort(np.random.default_rng(seed).choice(n_windows, n, replace=False)) * (T + 1)
    return offsets, *(torch.from_numpy(a).to(device) for a in data.get_windows(tokens, offsets, T))


def get_batch(args, corpus, step, rank=0, world=1, device='cpu'):
    """Step t's global batch offsets, a function of (seed, step), and this process's x, y (B/world, T)."""
    B, T = args.batch_size, args.block_size
    offsets = data.batch_offsets(args.seed, step, B, T, len(corpus['train']))  # (B,)
    mine = offsets[rank * (B // world):(rank + 1) * (B // world)]
    x, y = (torch.from_numpy(a).to(device) for a in data.get_windows(corpus['train'], mine, T))
    return offsets, x, y


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


def check_resources(args, rec, model, autocast, batch):
    """Before anything is written: disk for a new run's records and checkpoints, memory for a trial step."""
    need = sum(math.prod(shape) * dtype.itemsize for shape, dtype in rec.specs.values())
    need += 12 * model.num_params() * (1 + (args.max_iters.bit_length() if args.keep_ckpts == 'log2' else 0))
    free = shutil.disk_usage(runs.check_folder(args.out_dir)).free  # weights, AdamW's moments: 1, 2, 4, ... too
    if not args.resume and need > free:
        fail(f"the records of this run need {need / 1e9:,.1f} GB, and {args.out_dir} has {free / 1e9:,.1f} GB free")
    try:
        with autocast:
            per_token_loss(model(batch[0])[0], batch[1]).mean().backward()
        if rec.recording:
            fp32_forward(model, rec.px, rec.py)
    except RuntimeError as e:  # torch's out-of-memory errors, CPU and GPU
        if 'memory' not in str(e):
            raise
        fail(f"out of memory for one step of {args.batch_size} x {args.block_size} tokens "
             f"(a smaller --batch_size or --probe_seqs?): {' '.join(str(e).split())[:200]}")
    finally:
        model.zero_grad(set_to_none=True)


def open_run_dir(args, corpus, rec, model, optimizer, device, master):
    """(first step, the folder's lock), checked before any change: a new run, or a --resume whose
    RESUME_SAME settings, corpus, checkpoint and whole records agree with the run's."""
    if not args.resume:
        taken = 'already holds a run: --resume to continue it, --overwrite to replace it'
        return 0, runs.open_folder(args.out_dir, overwrite=args.overwrite, taken=taken) if master else None
    config = runs.read_json(args.out_dir, 'config.json', 'train.py') or fail(f"--resume: no run in {args.out_dir}")
    changed = [k for k in RESUME_SAME if config.get(k) != getattr(args, k)]
    changed += ['the corpus content'] if config.get('data_key') != corpus['key'] else []
    if changed:
        fail(f"--resume: the run in {args.out_dir} was made with other settings: {', '.join(changed)} "
             f"(a resume may change only {', '.join(RESUME_MAY_CHANGE)})")
    lock = runs.lock(args.out_dir) if master else None  # then nothing changes in it while we look
    start = load_checkpoint(args.out_dir, model, optimizer, device)
    runs.check_records(args.out_dir, rec.specs, start, [r[0] for r in RECORDS if r[3] == 'every'])
    return start, lock


def load_checkpoint(out, model, optimizer, device):
    """The step to continue from, its state loaded (0: no checkpoint yet); a bad checkpoint: exit 2."""
    done = (runs.read_json(out, 'progress.json', 'train.py') or {}).get('steps_done', 0)
    if not done and not os.path.exists(os.path.join(out, 'ckpt.pt')):
        return 0
    try:
        ckpt = torch.load(os.path.join(out, 'ckpt.pt'), map_location=device, weights_only=True)
        model.load_state_dict(ckpt['model'])
        keys = lambda d: {sys.intern(k): v for k, v in d.items()}  # one object a name, as in a new optimizer:
        optimizer.load_state_dict(dict(  # pickle's memo then gives the next checkpoints the same bytes
            state={i: keys(s) for i, s in ckpt['optimizer']['state'].items()},
            param_groups=[keys(g) for g in ckpt['optimizer']['param_groups']]))
        torch.set_rng_state(ckpt['rng'])
        if int(ckpt['step']) < done:
            raise ValueError(f"it holds step {ckpt['step']}")
        return int(ckpt['step'])
    except Exception as e:  # missing, torn, foreign or mismatched: say so, never trust it
        fail(f"cannot resume from checkpoint {out}/ckpt.pt (progress.json: {done} steps done): {str(e)[:300]}")


def write_run_files(args, start, corpus, model, rec, probe_offsets, train_probe_offsets, device, dtype, world):
    """The one-off files of a new run (start 0, or a resume before its first checkpoint): tokenizer,
    counts, probe sets, schedules, config.json; a resume adds its step and RESUME_MAY_CHANGE to `resumed`."""
    if start:
        config = runs.read_json(args.out_dir, 'config.json', 'train.py')
        config.setdefault('resumed', []).append(
            dict(step=start, device_used=device, **{k: getattr(args, k) for k in RESUME_MAY_CHANGE}))
        runs.write_json(args.out_dir, 'config.json', config)
        return
    arrays = {'train_counts.npy': corpus['counts'], 'grad_steps.npy': np.array(rec.grad_steps, np.int64),
              'hidden_steps.npy': np.array(rec.hidden_steps, np.int64),
              'probe_tokens.npy': torch.cat([rec.px, rec.py[:, -1:]], 1).cpu().numpy()}  # (P, T + 1)
    if rec.tx is not None:  # the training-window probe, as the probe set: (Q, T + 1)
        arrays['train_probe_tokens.npy'] = torch.cat([rec.tx, rec.ty[:, -1:]], 1).cpu().numpy()
    if corpus['tokenizer']:  # a folder of token ids may come without one: its ids are then not decoded
        with open(corpus['tokenizer'], 'rb') as tokenizer:
            runs.write_atomic(args.out_dir, 'tokenizer.json', lambda f: shutil.copyfileobj(tokenizer, f))
    for name, array in arrays.items():
        runs.write_atomic(args.out_dir, name, lambda f: np.save(f, array))
    runs.write_json(args.out_dir, 'config.json', dict(  # the settings (--resume, --overwrite: how, not what)
        {k: v for k, v in vars(args).items() if k not in ('resume', 'overwrite')}, n_params=model.num_params(),
        n_params_nonembedding=model.num_params(non_embedding=True), vocab_size_actual=corpus['vocab_size'],
        corpus=corpus['corpus'], data_key=corpus['key'], train_tokens=corpus['train_tokens'],
        val_tokens=corpus['val_tokens'], probe_offsets=probe_offsets.tolist(),
        train_probe_offsets=None if train_probe_offsets is None else train_probe_offsets.tolist(),
        device_used=device, dtype_used=dtype, world_size=world, theta_names=rec.theta_names,
        local_opposition_keys=rec.local_keys, opposition_keys=rec.all_keys,
        opposition_tokens=args.opposition_seqs * args.block_size, probe_tokens=args.probe_seqs * args.block_size,
        batch_tokens=args.batch_size * args.block_size, torch_version=torch.__version__,
        records={k: [list(shape), dtype.name] for k, (shape, dtype) in rec.specs.items()}))


def finish(ddp, lock, handlers):
    """Leave as main came: signal handlers restored, folder unlocked."""
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    if lock is not None:
        os.close(lock)  # releases the folder
    if ddp:  # the processes leave together (gloo can abort at exit otherwise)
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def save_checkpoint(args, rel, model, optimizer, step):
    """Model, optimizer, the next step, torch's random state (for forks that add dropout), RESUME_SAME.
    Batches and the null's signs need none: they follow (seed, step)."""
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'step': step,
             'rng': torch.get_rng_state(), 'args': {k: getattr(args, k) for k in RESUME_SAME}}
    runs.write_atomic(args.out_dir, rel, lambda f: torch.save(state, f))


def how_to_continue(out_dir):
    done = (runs.read_json(out_dir, 'progress.json', 'train.py') or {}).get('steps_done', 0)
    return f"continue it with the same command and --resume (from step {done}, its last checkpoint)" \
        if os.path.exists(os.path.join(out_dir, 'config.json')) else "no run had been written yet"


def progress_line(step, S, rec, lr, recent_ms, slow=()):
    """One line of progress. The ETA prices each ordinary step left at the median of recent_ms, and
    each slow one at the median of its kind; slow: (recent ms, steps left) of each slow kind."""
    ms = statistics.median(recent_ms) if recent_ms else float('nan')
    eta = ms * (S - step - 1 - sum(n for _, n in slow))
    eta += sum(statistics.median(t) * n if t else float('nan') for t, n in slow if n)
    return (f"step {step:5d}/{S} | loss {rec.train_loss:.4f} | probe {rec.probe_loss:.4f} | lr {lr:.2e} | "
            f"{ms:6.1f} ms/step | ETA {f'{eta / 60000:.1f} min' if math.isfinite(eta) else '?'}")


class Progress:
    """Progress lines (process 0), the ETA by Recorder.kind (a grad step takes many ordinary steps' time),
    a heartbeat line whenever none came for --log_seconds (the first after 5 s), the last checkpoint's time."""

    def __init__(self, rec, start, seconds, master):
        self.kinds = np.array([rec.kind(s) for s in range(rec.args.max_iters)])  # (S,) Recorder.kind
        self.recent = [collections.deque(maxlen=50) for _ in range(3)]  # the recent steps' ms, of each kind
        self.start, self.step, self.began, self.seconds = start, start, time.perf_counter(), seconds
        self.t0 = self.saved = time.time()
        self.printed = self.t0 - seconds + min(seconds, 5)  # the first heartbeat after 5 s
        if master:
            threading.Thread(target=self.heartbeat, daemon=True).start()

    def heartbeat(self):
        while (step := self.step) is not None:  # None: the loop has ended
            if self.quiet():
                self.say(f"step {step:5d}/{len(self.kinds)} running: {time.perf_counter() - self.began:.0f} s")
            time.sleep(min(1.0, self.seconds / 4))

    def begin(self, step):
        self.step, self.began = step, time.perf_counter()

    def end(self, step):
        """Wall time in ms, kept for the ETA unless it is the run's first step (it warms up too)."""
        ms = 1000 * (time.perf_counter() - self.began)
        if step != self.start:
            self.recent[self.kinds[step]].append(ms)
        return ms

    def quiet(self):  # no line for --log_seconds
        return time.time() - self.printed >= self.seconds

    def say(self, line):
        print(line, flush=True)
        self.printed = time.time()

    def line(self, step, rec, lr):
        usual = np.bincount(self.kinds, minlength=3).argmax()  # the most frequent kind is the ordinary one
        left = np.bincount(self.kinds[step + 1:], minlength=3)
        slow = [(self.recent[k], left[k]) for k in range(3) if k != usual]
        return progress_line(step, len(self.kinds), rec, lr, self.recent[usual], slow)


if __name__ == '__main__':
    main()
