"""
What recording costs, measured in one process, the variants interleaved round by round so that
machine noise hits them alike. Prints a table of medians and ratios.

    python bench.py                          # train.py's default model and batch, on the CPU
    python bench.py --rounds 5 --steps 60    # more samples
    python bench.py --n_layer 2 --n_embd 64  # another size

1. training steps: a minimal plain nanoGPT-style loop written here, and train.py itself at
   --record none (the bare step) / light / all, timed by train.py (step_ms.npy, the wall time of
   each step, recording included, checkpoint excluded); the first steps of a run are warm-up and
   dropped. light: the median over its unscheduled steps (the scheduled ones cost what all costs);
2. each recorded quantity on its own, on the same model, batch and probe set;
3. exact per-token gradient opposition of every parameter on one probe sequence: batched backward
   passes (metrics.per_token_gradient_sums) against the published method, one backward per token;
4. exact opposition of the position-local layers: |G|^T |X| from the ordinary backward against one
   backward per token for those layers (timed on a subset of tokens and scaled to the batch);
5. bytes written per step and for a default run, the BNSL fit, plot.py on the runs made here;
6. model FLOPs of the training steps: TFLOP/s achieved and, where the peak of the device is known
   (or given with --peak_tflops), model FLOPs utilisation (MFU). On a GPU, at a GPT-2-small-like size:
   python bench.py --device cuda --dtype bfloat16 --compile --steps_only --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --batch_size 8
Sections 3 and 4 also check that both methods give the same sums. --dtype and --compile apply to the
training steps (the plain loop, train.py, and the training step of section 2). As in train.py, the
probe, post-update and per-token passes are fp32, while theta+/- and |G|^T |X| reuse the training
forward and backward and so carry the training precision (under bf16, section 4 compares a bf16
|G|^T |X| with an fp32 loop).
"""

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import bnsl
import data
import metrics
import plot
import train
from model import GPT, GPTConfig, per_token_loss

WARMUP = 3  # first steps of every run left out of the medians
# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets, by device name;
# the first name found in torch.cuda.get_device_name() is used
PEAK_BF16_TFLOPS = {'H100 PCIe': 756.0, 'H100 NVL': 835.5, 'H200 NVL': 835.5, 'H100': 989.4, 'H200': 989.4, 'A100': 312.0}
LOCAL_SUBSET = 64  # tokens timed one backward each for the position-local comparison
OPPOSITION_SEQS = 1  # probe sequences of the scheduled all-parameter opposition (train.py's default)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = fail
    d = train.get_args([])  # train.py's defaults
    for name in ['n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'vocab_size', 'probe_seqs']:
        p.add_argument('--' + name, type=int, default=getattr(d, name), help=f"as in train.py")
    p.add_argument('--device', default='cpu', help='cpu, cuda, cuda:N or mps')
    p.add_argument('--dtype', default='float32', choices=['auto', 'float32', 'bfloat16'], help='training precision, as in train.py')
    p.add_argument('--compile', action='store_true', help='torch.compile the training steps, as in train.py')
    p.add_argument('--steps_only', action='store_true', help='sections 1 and 6 only (the training steps), e.g. for MFU at a large size')
    p.add_argument('--peak_tflops', type=float, default=0.0, help="the device's peak TFLOP/s at --dtype, for MFU (0: from PEAK_BF16_TFLOPS for bf16 on a known GPU)")
    p.add_argument('--steps', type=int, default=40, help='training steps per run and round')
    p.add_argument('--rounds', type=int, default=3, help='rounds; every variant runs once a round')
    p.add_argument('--reps', type=int, default=5, help='repetitions of each quantity timed on its own, per round')
    p.add_argument('--cache_dir', default=d.cache_dir, help='tokenizer cache, as in train.py')
    args = p.parse_args(argv)
    if args.steps <= WARMUP + 1 or args.rounds < 1 or args.reps < 1:
        p.error(f"--steps must exceed {WARMUP + 1}, --rounds and --reps be positive")
    if not args.peak_tflops >= 0:
        p.error(f"--peak_tflops must be positive or 0, not {args.peak_tflops}")
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available")
    if args.device.startswith('cuda:') and not (args.device[5:].isdigit() and int(args.device[5:]) < torch.cuda.device_count()):
        p.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA devices")
    args.dtype = train.precision(args.dtype, device_type(args.device))[0]  # 'auto' resolved once, as train.py does
    return args


def fail(msg):
    """Bad input: one line naming the problem and exit status 2, never a traceback."""
    print(f"bench.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def device_type(device):
    return 'cuda' if device.startswith('cuda') else device


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def timed(fn, device, setup=None):
    """Milliseconds of one call fn(state), state = setup() (untimed, e.g. a fresh autograd graph)."""
    state = setup() if setup else None
    sync(device)
    t = time.perf_counter()
    fn(state)
    sync(device)
    return 1000 * (time.perf_counter() - t)


def plain_step(model, step_model, opt, x, y, autocast, grad_clip):
    """One training step without recording: forward of step_model (the model, or its compiled
    form) under autocast, mean loss, backward, clip, AdamW. Returns the loss."""
    with autocast:
        _, loss = step_model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def plain_loop(args, corpus, steps):
    """ms per step of a minimal nanoGPT-style loop (forward, mean loss, backward, clip, AdamW) of
    the same model, batches and schedule as train.py, without any recording."""
    d, model, opt = seeded_model(args, corpus)
    autocast = train.precision(args.dtype, device_type(args.device))[1]
    step_model = torch.compile(model) if args.compile else model
    times = []
    for step in range(steps):
        t = time.perf_counter()
        offsets = data.batch_offsets(d.seed, step, args.batch_size, args.block_size, len(corpus['train']))
        x, y = (torch.from_numpy(a).to(args.device) for a in data.get_windows(corpus['train'], offsets, args.block_size))
        for group in opt.param_groups:
            group['lr'] = train.get_lr(step, d)
        loss = plain_step(model, step_model, opt, x, y, autocast, d.grad_clip)
        loss.item()  # train.py reads the loss every step too
        times.append(1000 * (time.perf_counter() - t))
    return times[WARMUP:]


def train_py(args, level, out_dir):
    """ms per step of train.py itself at a recording level (its step_ms record), and its run dir."""
    argv = ['--record', level, '--max_iters', str(args.steps), '--out_dir', out_dir, '--overwrite',
            '--grad_every', str(args.steps), '--hidden_every', str(args.steps), '--ckpt_interval', str(args.steps), '--log_interval', str(args.steps),
            '--device', args.device, '--dtype', args.dtype, '--cache_dir', args.cache_dir] + ['--compile'] * args.compile
    for name in ['n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'vocab_size', 'probe_seqs']:
        argv += ['--' + name, str(getattr(args, name))]
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(argv)
    ms = np.load(os.path.join(out_dir, 'step_ms.npy'))
    keep = np.arange(len(ms)) >= WARMUP
    keep &= np.arange(len(ms)) < len(ms) - 1  # the last step runs the scheduled passes (as the first, a warm-up step)
    if level == 'light':  # its unscheduled steps: no post-update pass recorded
        keep &= np.isnan(np.load(os.path.join(out_dir, 'train_loss_post.npy'))[:, 0, 0])
    return list(ms[keep])


def model_config(args, corpus):
    return GPTConfig(block_size=args.block_size, vocab_size=corpus['vocab_size'], n_layer=args.n_layer,
                     n_head=args.n_head, n_embd=args.n_embd)


def seeded_model(args, corpus):
    """(train.py's default settings, the model initialised as train.py does, its AdamW)."""
    d = train.get_args([])
    torch.manual_seed(d.seed)
    model = GPT(model_config(args, corpus)).to(args.device)
    return d, model, model.configure_optimizers(d.weight_decay, d.learning_rate, (d.beta1, d.beta2), args.device)


def flops_per_token(config):
    """Model FLOPs of one training token, forward and backward, counting a multiply-add as 2 FLOPs
    and the backward as twice the forward (the PaLM paper's appendix B, as nanoGPT's MFU, with N the
    weights that multiply activations rather than every parameter):

        F = 6 (12 L d^2 + V d) + 12 L T d

    12 L d^2 + V d are the weights that multiply activations (per block 4 d^2 in attention and
    8 d^2 in the MLP; the LM head V d); 12 L T d is attention over a context of T (q k^T and the
    weighted sum of v, over all T positions: the causal mask is not subtracted, as kernels compute
    whole tiles). Embedding lookups, biases, LayerNorm, GELU and softmax are left out."""
    L, d, V, T = config.n_layer, config.n_embd, config.vocab_size, config.block_size
    return 6 * (12 * L * d * d + V * d) + 12 * L * T * d


def mfu(flops, tokens, ms, peak):
    """(achieved TFLOP/s, model FLOPs utilisation) of a step of `tokens` tokens taking `ms`:
    TFLOP/s = F * tokens / seconds / 1e12, MFU = TFLOP/s / peak (None without a peak)."""
    tflops = flops * tokens / (ms / 1000) / 1e12
    return tflops, (tflops / peak if peak else None)


def peak_tflops(args):
    """The device's peak TFLOP/s for the MFU: --peak_tflops, else the datasheet bf16 peak of a known
    GPU when training in bf16, else None (no MFU printed)."""
    if args.peak_tflops > 0:
        return args.peak_tflops
    if device_type(args.device) == 'cuda' and args.dtype == 'bfloat16':
        name = torch.cuda.get_device_name(args.device)
        return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)
    return None


def looped_sums(losses, params):
    """The published method: one backward per token loss in `losses` (a flat tensor with its graph),
    (sum_i g_i, sum_i |g_i|) for each of `params` (name -> parameter)."""
    sums = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
    for loss in losses:
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()), retain_graph=True)):
            sums[n][0].add_(g)
            sums[n][1].add_(g.abs())
    return sums


def max_rel_diff(fast, slow, skip=()):
    """Largest relative difference between two sets of sums, tensor by tensor: max |fast - slow| /
    max |slow| of each tensor (so an error in a small tensor is not hidden by a large one)."""
    return max(float((fast[n][k] - slow[n][k]).abs().max() / slow[n][k].abs().max().clamp_min(1e-30))
               for n in slow if n not in skip for k in (0, 1))


def components(args, corpus, rounds):
    """name -> list of ms: each recorded quantity on its own, and the two method comparisons."""
    d, model, opt = seeded_model(args, corpus)
    params = dict(model.named_parameters())
    offsets = data.batch_offsets(d.seed, 0, args.batch_size, args.block_size, len(corpus['train']))
    x, y = (torch.from_numpy(a).to(args.device) for a in data.get_windows(corpus['train'], offsets, args.block_size))
    probe = np.arange(args.probe_seqs) * (args.block_size + 1)
    px, py = (torch.from_numpy(a).to(args.device) for a in data.get_windows(corpus['val'], probe, args.block_size))
    local = metrics.position_local_modules(model)
    local_params = {f"{m}.{n}": p for m, module in local.items() for n, p in module.named_parameters()}
    N = x.numel()
    autocast = train.precision(args.dtype, device_type(args.device))[1]
    step_model = torch.compile(model) if args.compile else model

    def step(_):
        plain_step(model, step_model, opt, x, y, autocast, d.grad_clip)

    def graph():  # the training forward and backward, graph kept, position-local X and G captured
        with metrics.capture_activations(local) as acts:
            with autocast:
                logits = model(x)[0]
                loss = per_token_loss(logits, y).mean()
            loss.backward(retain_graph=True)
        return logits, acts

    def subset_graph():  # the losses of the first LOCAL_SUBSET tokens and their captured X, G
        with metrics.capture_activations(local) as acts:
            losses = per_token_loss(model(x)[0], y).reshape(-1)
            losses[:LOCAL_SUBSET].sum().backward(retain_graph=True)  # G of the subset only (others 0)
        return losses, acts

    _, h, probe_logits = train.fp32_forward(model, px, py)  # as train.py's probe pass: h and logits reused
    h, probe_logits = h.reshape(-1, args.n_embd), probe_logits.reshape(h.shape[0] * h.shape[1], -1)
    delta = {n: 1e-3 * torch.randn_like(p) for n, p in params.items()}
    change = torch.randn(N, dtype=torch.float64, device=args.device)  # stands for post - pre of the batch
    k = OPPOSITION_SEQS
    variants = {
        'training step (forward, backward, clip, AdamW)': (step, None),
        'probe pass (fp32 forward, P sequences)': (lambda _: train.fp32_forward(model, px, py), None),
        'h-space decomposition of the probe tokens': (lambda _: metrics.output_decomposition(h, model.lm_head.weight.detach(), py.reshape(-1), probe_logits), None),
        'post-update pass (fp32 forward, batch)': (lambda _: train.fp32_forward(model, x, y), None),
        'theta+/- (second backward) and norms': (lambda s: metrics.theta_decomposition(s[0], y, params, {n: p.grad for n, p in params.items()}), graph),
        'position-local opposition, |G|^T |X|': (lambda s: metrics.opposition_summary(metrics.position_local_gradient_sums(local, s[1], N)), graph),
        'D, M and null of the batch changes': (lambda _: [f(change) for f in (metrics.destructive_interference, metrics.interference_magnitude, metrics.sign_flip_null)], None),
        f'scheduled: all-parameter opposition, batched ({k} probe seq)': (lambda _: metrics.opposition_summary(metrics.per_token_gradient_sums(model, px[:k], py[:k])), None),
        f'scheduled: all-parameter opposition, looped ({k} probe seq)': (lambda _: metrics.opposition_summary(looped_sums(per_token_loss(model(px[:k])[0], py[:k]).flatten(), params)), None),
        'scheduled: JVP prediction of the batch': (lambda _: metrics.predicted_loss_change(model, x, y, delta), None),
        f'position-local, one backward per token ({LOCAL_SUBSET} tokens)': (lambda s: looped_sums(s[0][:LOCAL_SUBSET], local_params), subset_graph),
        f'position-local, |G|^T |X| ({LOCAL_SUBSET} tokens)': (lambda s: metrics.position_local_gradient_sums(local, s[1], 1), subset_graph),
    }
    times = {name: [] for name in variants}
    if args.compile:
        step(None)  # compiles, outside the timings
    for _ in range(rounds):
        for name, (fn, setup) in variants.items():
            for _ in range(args.reps):
                times[name].append(timed(fn, args.device, setup))
            model.zero_grad(set_to_none=True)
    # the same numbers: batched vs looped on the probe sequence; |G|^T|X| vs looped on the subset
    batched = metrics.per_token_gradient_sums(model, px[:k], py[:k])
    looped = looped_sums(per_token_loss(model(px[:k])[0], py[:k]).flatten(), params)
    # the attention biases hold the key biases, exact zeros in the batched sums, rounding noise in the loop
    key_biases = [f"transformer.h.{i}.attn.c_attn.bias" for i in range(args.n_layer)]
    losses, acts = subset_graph()
    checks = {'all-parameter: batched vs looped': max_rel_diff(batched, looped, skip=key_biases),
              'position-local: |G|^T|X| vs looped': max_rel_diff(metrics.position_local_gradient_sums(local, acts, 1),
                                                                  looped_sums(losses[:LOCAL_SUBSET], local_params))}
    return times, checks, N


def record_bytes(run_dir, default_steps):
    """(bytes of one step's rows, bytes of a default-length run) from a run's config.json."""
    with open(os.path.join(run_dir, 'config.json')) as f:
        cfg = json.load(f)
    rows = {'probe_hidden': len(train.log_schedule(default_steps)),  # the scheduled records
            'head_singular_values': len(train.log_schedule(default_steps))}
    rows.update({name: len(train.log_schedule(default_steps - 1)) for name in
                 ['opposition_mean', 'opposition_weighted', 'opposition_hist', 'train_loss_pred']})
    per_step, total = 0, 0
    for name, (shape, dtype) in cfg['records'].items():
        row = math.prod(shape[1:]) * np.dtype(dtype).itemsize
        per_step += 0 if name in rows else row
        total += row * rows.get(name, default_steps + 1)  # + 1: the probe records' final row
    return per_step, total


def method_and_record_costs(args, corpus, tmp, n_runs):
    """Sections 2 to 5: each recorded quantity, the two method comparisons, bytes, BNSL and plot.py
    (on the n_runs train.py runs in tmp)."""
    times, checks, N = components(args, corpus, args.rounds)
    cmed = {k: statistics.median(v) for k, v in times.items()}
    base = cmed['training step (forward, backward, clip, AdamW)']
    print(f"\n2. each quantity on its own (batch of {N} tokens)           median ms   ratio to a training step")
    for name, ms in cmed.items():
        print(f"   {name:60s}{ms:10.2f}{ms / base:10.3f}")
    b = cmed[f'scheduled: all-parameter opposition, batched ({OPPOSITION_SEQS} probe seq)']
    l = cmed[f'scheduled: all-parameter opposition, looped ({OPPOSITION_SEQS} probe seq)']
    print(f"\n3. all-parameter exact opposition: batched {l / b:.1f}x faster than looped (attention biases left out of the check); "
          f"max relative difference of the sums {checks['all-parameter: batched vs looped']:.1e}")
    slow = cmed[f'position-local, one backward per token ({LOCAL_SUBSET} tokens)']
    fast = cmed[f'position-local, |G|^T |X| ({LOCAL_SUBSET} tokens)']
    print(f"4. position-local opposition: one backward per token / |G|^T|X| = {slow / fast:.0f}x on {LOCAL_SUBSET} tokens; "
          f"extrapolated to the batch of {N}: {slow * N / LOCAL_SUBSET:.0f} ms vs {cmed['position-local opposition, |G|^T |X|']:.1f} ms "
          f"({slow * N / LOCAL_SUBSET / cmed['position-local opposition, |G|^T |X|']:.0f}x); max relative difference "
          f"{checks['position-local: |G|^T|X| vs looped']:.1e}")

    default_steps = train.get_args([]).max_iters
    per_step, total = record_bytes(os.path.join(tmp, 'all'), default_steps)
    print(f"\n5. --record all writes {per_step / 1e6:.2f} MB per step, {total / 1e9:.2f} GB for a run of {default_steps} steps "
          f"of this model (hidden states and spectra on the default log schedule)")
    t = np.arange(1, default_steps + 1.0)
    loss = bnsl.bnsl_1break(t, 20.0, 0.3, -0.2, 90.0, 0.1) * np.exp(0.01 * np.random.default_rng(0).standard_normal(len(t)))
    fits = [timed(lambda _: bnsl.fit_bnsl(*bnsl.preprocess(t, loss)), 'cpu') for _ in range(3)]
    print(f"   BNSL fit of a {default_steps}-step curve (preprocessed, 100 bootstrap resamples): {statistics.median(fits) / 1000:.2f} s")
    with contextlib.redirect_stdout(io.StringIO()):
        ms = timed(lambda _: plot.main([tmp, '--out', os.path.join(tmp, 'figures')]), 'cpu')
    print(f"   plot.py on the {n_runs} runs made here ({args.steps} steps each): {ms / 1000:.1f} s")


def main(argv=None):
    args = get_args(argv)
    corpus = data.prepare(None, args.vocab_size, args.cache_dir)
    with tempfile.TemporaryDirectory(prefix='bench-') as tmp:  # the runs made here, removed at the end
        levels = ['none', 'light', 'all']
        steps = {'plain': [], **{level: [] for level in levels}}
        print(f"bench.py: GPT {args.n_layer}L/{args.n_embd}d, batch {args.batch_size} x {args.block_size}, vocabulary "
              f"{corpus['vocab_size']}, probe {args.probe_seqs} x {args.block_size}, {args.device} "
              f"({args.dtype}{', compiled' if args.compile else ''}), torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; {args.rounds} rounds of {args.steps} steps per variant", flush=True)
        for r in range(args.rounds):  # interleaved: every variant once per round
            steps['plain'] += plain_loop(args, corpus, args.steps)
            for level in levels:
                steps[level] += train_py(args, level, os.path.join(tmp, level))
            print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        med = {k: statistics.median(v) if v else float('nan') for k, v in steps.items()}  # light: none unscheduled in a very short run
        tokens = args.batch_size * args.block_size
        print("\n1. training step                                       median ms   ratio to bare   tokens/s")
        names = {'plain': 'plain nanoGPT-style loop (bench.py)', 'none': 'train.py --record none (bare)',
                 'light': 'train.py --record light (unscheduled steps)', 'all': 'train.py --record all'}
        for k in ['plain', 'none', 'light', 'all']:
            print(f"   {names[k]:50s}{med[k]:10.1f}{med[k] / med['none']:14.2f}{tokens / med[k] * 1000:12.0f}")

        if not args.steps_only:
            method_and_record_costs(args, corpus, tmp, len(levels))

        flops, peak = flops_per_token(model_config(args, corpus)), peak_tflops(args)
        name = torch.cuda.get_device_name(args.device) if device_type(args.device) == 'cuda' else args.device
        print(f"\n6. model FLOPs of the training step: {flops / 1e6:.2f} MFLOP per token (the recording's work not counted), {args.dtype} on {name}; "
              + (f"MFU against a peak of {peak:.4g} TFLOP/s" if peak else "no peak known for this device (--peak_tflops), no MFU"))
        for k in ['plain', 'none', 'light', 'all']:
            tflops, util = mfu(flops, tokens, med[k], peak)
            print(f"   {names[k]:50s}{tflops:10.3f} TFLOP/s" + (f"   MFU {100 * util:5.1f}%" if peak else ""))


if __name__ == '__main__':
    main()
