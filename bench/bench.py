"""
What recording costs: train.py at each recording level against a plain loop, each measurement on its own,
and a step by pass.

    python bench/bench.py                          # train.py's default model and batch, on the CPU
    python bench/bench.py --rounds 5 --steps 60    # more samples; --n_layer, --n_embd, ... other sizes
    python bench/bench.py --device cuda --dtype bfloat16 --compile --steps_only \
        --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --batch_size 8   # MFU, GPT-2-small-like

The variants interleaved round by round in one process, so that machine noise hits them alike.
results/bench.md describes the seven sections printed and keeps the measurements.
"""

import argparse
import collections
import contextlib
import io
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from unittest import mock
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository root

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

import bnsl
import metrics
import plot
import recorder
import runs
import train
from model import GPT, build_gpt, per_token_loss
if __package__:  # imported as bench.bench (by the tests)
    from bench.baselines import MATMUL_N, PlainGPT, matmul_ms, matmul_tflops, published_gradient_sums
else:  # run as a script: bench/ is sys.path[0]
    from baselines import MATMUL_N, PlainGPT, matmul_ms, matmul_tflops, published_gradient_sums

WARMUP = 3  # first steps of every run left out of the medians
# dense bf16 tensor-core peaks in TFLOP/s (NVIDIA's datasheets), of the first key in the device's name
PEAK_BF16_TFLOPS = {'H100 PCIe': 756.0, 'H100 NVL': 835.5, 'H200 NVL': 835.5, 'H100': 989.4, 'H200': 989.4,
                    'A100': 312.0}
LOCAL_SUBSET = 64  # tokens timed one backward each for the position-local comparison
METHOD_SEQS = (1, 4, 16)  # probe sequences on which the project's and the published opposition are compared
LOOPED_SEQS = 1  # probe sequences on which the project's and the looped opposition (definition) are compared
LABELS = {'plain': 'plain nanoGPT step (written in bench.py)', 'none': 'train.py --record none (bare)',
          'light': 'train.py --record light (unscheduled steps)', 'all': 'train.py --record all'}
LEVELS = ['none', 'light', 'all']  # train.py's --record levels
HOST_READS = ['item', 'cpu', 'tolist', '__bool__', '__float__', '__int__']  # each a device->host copy on a GPU
# the passes of a step: (owner, function, pass); a dict names the pass by the Recorder moment it runs in;
# None: the Recorder moments themselves, whose time outside the passes goes to 'other'
FP32_FORWARD = {'after_update': 'post-update forward (fp32)', 'batch': 'fp32 recompute of the batch (bf16)',
                'probe': 'training-window probe forward (fp32)'}
PASSES = [(GPT, 'forward', 'forward'), (torch.Tensor, 'backward', 'backward'),
          (torch.nn.utils, 'clip_grad_norm_', 'clip'), (torch.optim.AdamW, 'step', 'AdamW step'),
          (recorder.Recorder, 'probe', None), (recorder.Recorder, 'batch', None),
          (recorder.Recorder, 'after_update', None), (metrics, 'fp32_probe_forward', 'probe forward (fp32)'),
          (metrics, 'fp32_forward', FP32_FORWARD), (metrics, 'output_decomposition', 'decomposition in h'),
          (metrics, 'theta_decomposition', 'decomposition in theta (grad+ backward)'),
          (metrics, 'position_local_gradient_sums', 'opposition, position-local'),
          (metrics, 'opposition_summary', 'opposition, position-local'),
          (metrics, 'loss_change_interference', 'D, M and nulls'),
          (recorder.Recorder, 'keep_theta', 'copy of theta_t'), (recorder.Recorder, 'write', 'writes')]
SETTINGS = [s for s in train.SETTINGS if s[0] in (
    'n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'probe_seqs', 'cache_dir')] + [
    ('vocab_size', 4096, runs.checked(int, lambda v: 256 < v <= 65536, 'in 257..65536'), 'BPE vocabulary size'),
    ('device', 'cpu', str, 'cpu, cuda, cuda:N or mps'),
    ('dtype', 'float32', ['auto', 'float32', 'bfloat16'], 'training precision, as in train.py'),
    ('compile', False, bool, 'torch.compile the training steps, as in train.py'),
    ('steps_only', False, bool, 'sections 1 and 6 only (the training steps), e.g. for MFU at a large size'),
    ('peak_tflops', 0.0, runs.nonnegative, "the device's peak TFLOP/s at --dtype, for MFU "
     "(0: from PEAK_BF16_TFLOPS for bf16 on a known GPU)"),
    ('steps', 40, runs.checked(int, lambda v: v > WARMUP + 1, f'more than {WARMUP + 1}'), 'training steps per run'),
    ('rounds', 3, runs.positive, 'rounds; every variant runs once a round'),
    ('reps', 5, runs.positive, 'repetitions of each quantity timed on its own, per round'),
]


def get_args(argv=None):
    args = runs.parser(__doc__, SETTINGS).parse_args(argv)
    if args.n_embd % args.n_head:
        runs.fail(f"--n_embd {args.n_embd} is not divisible by --n_head {args.n_head}")
    problem = runs.check_device(args.device, args.dtype)  # train.py's rules: checked up front, one line
    if problem or args.device == 'auto':
        runs.fail(problem or "--device auto: name the device to measure (cpu, cuda, cuda:N or mps)")
    args.dtype = train.precision(args.dtype, args.device.split(':')[0])[0]  # 'auto' resolved once
    args.probe_seqs = args.probe_seqs or max(1, train.PROBE_TOKENS // args.block_size)  # as train.py's
    args.method_seqs = sorted({min(n, args.probe_seqs) for n in METHOD_SEQS})  # section 3's sizes
    # bench.py's flags over train.py's default settings (seed, optimizer, schedule, a default run)
    return argparse.Namespace(**vars(train.get_args([])) | vars(args))


def timed(fn, device, setup=None):
    """Milliseconds of one call fn(state), state = setup() (untimed, e.g. a fresh autograd graph)."""
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    state = setup() if setup else None
    sync()
    start = time.perf_counter()
    fn(state)
    sync()
    return 1000 * (time.perf_counter() - start)


def plain_model(args, corpus):
    """(train.py's settings, a PlainGPT of the benchmarked size, its AdamW as train.py's, decay on 2-D)."""
    defaults = train.get_args([])
    torch.manual_seed(defaults.seed)
    model = PlainGPT(corpus['vocab_size'], args.block_size, args.n_layer, args.n_head, args.n_embd,
                     defaults.bias).to(args.device)
    with torch.device('meta'):  # model.GPT's count without filling its weights
        reference = build_gpt(vars(defaults) | vars(args), corpus['vocab_size']).num_params()
    n = sum(p.numel() for p in model.parameters())
    assert n == reference, f"PlainGPT has {n} parameters, model.GPT {reference}"
    params = list(model.parameters())
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': defaults.weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    opt = torch.optim.AdamW(groups, lr=defaults.learning_rate, betas=(defaults.beta1, defaults.beta2),
                            fused=args.device.startswith('cuda'))
    return defaults, model, opt


def plain_step(model, step_model, opt, x, y, autocast, grad_clip):
    """One plain nanoGPT step: forward, nanoGPT's mean cross-entropy, backward, clip, AdamW; the loss."""
    with autocast:
        logits = step_model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float('inf'))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def plain_loop(args, corpus):
    """ms per step of the plain loop on train.py's batches and learning-rate schedule."""
    _, model, opt = plain_model(args, corpus)
    autocast = train.precision(args.dtype, args.device.split(':')[0])[1]
    step_model = torch.compile(model) if args.compile else model
    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        # train.py's batch, as contiguous tensors, as nanoGPT's get_batch stacks them (view needs it)
        x, y = (t.contiguous() for t in train.get_batch(args, corpus, step, device=args.device)[1:])
        for group in opt.param_groups:
            group['lr'] = train.get_lr(step, args)
        plain_step(model, step_model, opt, x, y, autocast, args.grad_clip).item()  # train.py reads it too
        times.append(1000 * (time.perf_counter() - start))
    return times[WARMUP:]


def train_py(args, level, out_dir):
    """ms per step of train.py itself at a recording level (its step_ms record)."""
    every = str(args.steps)  # the periodic passes once, at the end
    argv = ['--record', level, '--out_dir', out_dir, '--overwrite'] + ['--compile'] * args.compile
    for name in ['max_iters', 'grad_every', 'hidden_every', 'ckpt_interval', 'log_interval']:
        argv += ['--' + name, every]
    for name in ['n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'vocab_size', 'probe_seqs',
                 'device', 'dtype', 'cache_dir']:
        argv += ['--' + name, str(getattr(args, name))]
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(argv)
    return list(np.load(os.path.join(out_dir, 'step_ms.npy'))[timed_steps(out_dir, level)])


def timed_steps(out_dir, level):
    """The steps train_py times: not the warm-up nor the last; under light the unscheduled ones only."""
    n = len(np.load(os.path.join(out_dir, 'step_ms.npy')))
    keep = (np.arange(n) >= WARMUP) & (np.arange(n) < n - 1)  # the last: the scheduled passes
    if level == 'light':  # no post-update pass recorded
        keep &= np.isnan(np.load(os.path.join(out_dir, 'train_loss_post.npy'))[:, 0, 0])
    return np.flatnonzero(keep)


def by_pass(args, level, out_dir):
    """pass -> (ms, host reads, CUDA syncs), means per timed step of train_py at a level, eager, each
    pass of PASSES between device syncs. A call counts in the outermost pass it is in; what no pass
    holds is 'other'. Host reads: the project's calls of HOST_READS; CUDA syncs: as torch.cuda counts."""
    device, state = args.device.split(':')[0], dict(inside=None, moment=None, reads=0, syncs=0)
    cuda, acc, steps = device == 'cuda', collections.Counter(), []  # acc: (pass, column) -> this step's total
    device_sync = (lambda: (torch.cuda.set_sync_debug_mode(0), torch.cuda.synchronize(),  # between passes,
                            torch.cuda.set_sync_debug_mode(1))) if cuda else (lambda: None)  # not theirs

    def as_pass(fn, name):
        def call(*a, **k):
            label = name.get(state['moment'], 'fp32 forward, elsewhere') if isinstance(name, dict) else name
            if state['inside'] or label is None:  # inside a pass, or a Recorder moment: context only
                moment, state['moment'] = state['moment'], state['moment'] if label else fn.__name__
                try:
                    return fn(*a, **k)
                finally:
                    state['moment'] = moment
            device_sync()
            state['inside'], reads, syncs, start = label, state['reads'], state['syncs'], time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                device_sync()
                state['inside'] = None
                for c, v in enumerate((1000 * (time.perf_counter() - start), state['reads'] - reads,
                                       state['syncs'] - syncs)):
                    acc[label, c] += v
        return call

    def counted(fn):  # a host read by the project's code (not torch's) of a tensor on the run's device
        def call(t, *a, **k):
            where = sys._getframe(1).f_code.co_filename
            state['reads'] += t.device.type == device and where.startswith(ROOT) and 'site-packages' not in where
            return fn(t, *a, **k)
        return call

    def write(rec, name, row, value, _write=recorder.Recorder.write):
        if name == 'step_ms':  # the step is over (its time taken): keep its passes and its time
            steps.append(dict(acc, step=value, total=(state['reads'], state['syncs'])))
            acc.clear()
        return _write(rec, name, row, value)
    patches = [(owner, attr, as_pass(write if attr == 'write' else getattr(owner, attr), name))
               for owner, attr, name in PASSES] + [(torch.Tensor, m, counted(getattr(torch.Tensor, m)))
                                                   for m in HOST_READS]
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter('always')  # CUDA's sync warnings, counted, not shown
        warnings.showwarning = lambda msg, *_: state.update(syncs=state['syncs'] + ('synchroniz' in str(msg)))
        for owner, attr, fn in patches:
            stack.enter_context(mock.patch.object(owner, attr, fn))
        if cuda:  # CUDA counts its syncs until the end
            torch.cuda.set_sync_debug_mode(1), stack.callback(torch.cuda.set_sync_debug_mode, 0)
        train_py(argparse.Namespace(**vars(args) | {'compile': False}), level, out_dir)
    for i, s in list(enumerate(steps))[1:]:  # what no pass holds: the step's time and counts less theirs
        total = (s['step'], *(b - a for a, b in zip(steps[i - 1]['total'], s['total'])))
        s.update({('other', c): total[c] - sum(v for k, v in s.items() if k[1:] == (c,)) for c in range(3)})
        s.update({('step (step_ms)', c): total[c] for c in range(3)})
    kept = [steps[i] for i in timed_steps(out_dir, level)]
    names = {k[0] for s in kept for k in s if k not in ('step', 'total')}
    return {name: tuple(np.mean([s.get((name, c), 0) for s in kept]) for c in range(3)) for name in names}


def print_passes(args, tmp):
    """Section 7: by_pass at each level, a row a pass: ms, host reads (and CUDA syncs) per step."""
    cuda, rows = args.device.startswith('cuda'), {lv: by_pass(args, lv, os.path.join(tmp, lv)) for lv in LEVELS}
    print("\n7. a step by pass (train.py, eager, each pass between device syncs; per step, mean over section 1's "
          "steps): ms, host reads (the project's .item(), .cpu(), .tolist(), bool/float/int of a device tensor: "
          "on a GPU each waits)" + (", CUDA syncs (as set_sync_debug_mode counts)" if cuda else "; CPU: no wait"))
    print(f"   {'pass':44s}" + ''.join(f"{lv + ': ms, reads' + ', syncs' * cuda:>{18 + 6 * cuda}s}" for lv in LEVELS))
    names = [n for *_, n in PASSES if isinstance(n, str)] + [*FP32_FORWARD.values(), 'other', 'step (step_ms)']
    for name in (n for n in dict.fromkeys(names) if any(n in r for r in rows.values())):
        cells = [rows[lv].get(name, (0, 0, 0)) if rows[lv] else None for lv in LEVELS]
        print(f"   {name:44s}" + ''.join(f"{'n/a':>{18 + 6 * cuda}s}" if c is None else f"{c[0]:12.2f}{c[1]:6.1f}"
                                         + f"{c[2]:6.1f}" * cuda for c in cells))  # n/a: no timed step


def subset_graph(model, local, x, y):
    """X and G of the position-local layers, G of the losses of the first LOCAL_SUBSET tokens only."""
    with metrics.capture_activations(local) as acts:
        per_token_loss(model(x)[0], y).reshape(-1)[:LOCAL_SUBSET].sum().backward()  # the other rows of G: 0
    return acts


def quantities(args, model, opt, x, y, px, py):
    """name -> fn(state), or (fn(state), setup() giving the state, untimed): each recorded quantity as
    train.py computes it, and the opposition by each method."""
    m, params, local = metrics, dict(model.named_parameters()), metrics.position_local_modules(model)
    autocast = train.precision(args.dtype, args.device.split(':')[0])[1]
    step_model = torch.compile(model) if args.compile else model
    head_name = next(n for n, p in params.items() if p is model.lm_head.weight)  # the name of U
    _, h, _, probe_p = m.fp32_probe_forward(model, px, py)  # as train.py's probe pass: h and p reused
    h, head = h.reshape(-1, args.n_embd), model.lm_head.weight.detach()
    delta = {n: 1e-3 * torch.randn_like(p) for n, p in params.items()}
    change = torch.randn(x.numel(), dtype=torch.float64, device=args.device)  # stands for post - pre
    lx, ly, N = px[:LOOPED_SEQS], py[:LOOPED_SEQS], x.numel()
    local_names = [f"{name}.{n}" for name, module in local.items() for n, _ in module.named_parameters()]

    def step(_):  # the project's training step (model.GPT, per_token_loss), no recording: the unit
        with autocast:
            loss = step_model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float('inf'))
        opt.step()
        opt.zero_grad(set_to_none=True)

    def graph():  # the training forward and backward, graph kept, the local layers' X and G captured
        with m.capture_activations(local) as acts:
            with autocast:
                logits, _, h = model(x, return_hidden=True)
                losses = per_token_loss(logits, y)
            losses.mean().backward(retain_graph=True)
        return logits, acts, h, losses, {n: p.grad for n, p in params.items()}  # p.grad, as the recorder's

    def scheduled_opposition(_):  # as train.py records it at a grad step: sums, dots, summary, terms
        sums, dots = m.per_token_gradient_sums(model, px, py, delta=delta)
        return m.opposition_summary(sums), m.update_weighted_terms(sums, delta, dots)
    variants = {
        'training step (forward, backward, clip, AdamW)': step,
        'probe pass (fp32 forward, P sequences)': lambda _: m.fp32_probe_forward(model, px, py),
        'h-space decomposition of the probe tokens':
            lambda _: m.output_decomposition(h, head, py.reshape(-1), probs=probe_p),
        'post-update pass (fp32 forward, batch)': lambda _: m.fp32_forward(model, x, y),
        'theta+/- (second backward, from h) and norms': (lambda g: m.theta_decomposition(
            g[0], y, params, g[4], h=g[2], head=head_name, losses=g[3]), graph),
        'position-local opposition, |G|^T |X|': (
            lambda g: m.opposition_summary(m.position_local_gradient_sums(local, g[1], N, g[4])), graph),
        'D, M and null of the batch changes': lambda _: m.loss_change_interference(change, None),
        f'scheduled: opposition, nulls, update-weighted terms ({px.numel()} tokens)': scheduled_opposition,
        f'all-parameter opposition, looped ({LOOPED_SEQS} probe seq)':
            lambda _: m.opposition_summary(m.per_token_gradient_sums_looped(model, lx, ly)),
        'scheduled: JVP prediction of the batch': lambda _: m.predicted_loss_change(model, x, y, delta),
        f'position-local, one backward per token ({LOCAL_SUBSET} tokens)':  # the definition, on those layers
            lambda _: m.per_token_gradient_sums_looped(model, x, y, names=local_names, n_tokens=LOCAL_SUBSET),
        f'position-local, |G|^T |X| ({LOCAL_SUBSET} tokens)': (lambda acts: m.position_local_gradient_sums(
            local, acts, 1), lambda: subset_graph(model, local, x, y)),
    }
    for n in args.method_seqs:  # the same sums and summary by the project's and the published method
        variants[f'all-parameter opposition, project method ({n} probe seq)'] = \
            lambda _, n=n: m.opposition_summary(m.per_token_gradient_sums(model, px[:n], py[:n]))
        variants[f'all-parameter opposition, published method port ({n} probe seq)'] = \
            lambda _, n=n: m.opposition_summary(published_gradient_sums(model, px[:n], py[:n]))
    return variants


def components(args, corpus):
    """(name -> ms of each timed call, checks) on train.py's initial model, first batch and probe set:
    every quantity once a round, --reps times; then, untimed, each pair of methods' sums compared."""
    torch.manual_seed(args.seed)  # the model initialised as train.py does, its AdamW
    model = build_gpt(vars(args), corpus['vocab_size']).to(args.device)
    opt = model.configure_optimizers(args.weight_decay, args.learning_rate, (args.beta1, args.beta2),
                                     args.device.split(':')[0])
    x, y = train.get_batch(args, corpus, 0, device=args.device)[1:]
    px, py = train.fixed_windows(corpus['val'], args.probe_seqs, args.block_size, args.seed, '--probe_seqs',
                                 args.device)[1:]  # train.py's probe set
    variants = quantities(args, model, opt, x, y, px, py)
    times = {name: [] for name in variants}
    if args.compile:
        variants['training step (forward, backward, clip, AdamW)'](None)  # compiles, outside the timings
    for _ in range(args.rounds):
        for name, entry in variants.items():
            fn, setup = entry if isinstance(entry, tuple) else (entry, None)
            times[name] += [timed(fn, args.device, setup) for _ in range(args.reps)]
            model.zero_grad(set_to_none=True)
    local, lx, ly = metrics.position_local_modules(model), px[:LOOPED_SEQS], py[:LOOPED_SEQS]
    looped_local = f'position-local, one backward per token ({LOCAL_SUBSET} tokens)'

    def max_rel_diff(fast, slow, skip=()):  # the largest max |fast - slow| / max |slow| of a tensor
        return max(float((fast[n][k] - slow[n][k]).abs().max() / slow[n][k].abs().max().clamp_min(1e-30))
                   for n in slow if n not in skip for k in (0, 1))
    # the attention biases hold the key biases: exact zeros in the project's sums, rounding noise elsewhere
    key_biases = [f"transformer.h.{i}.attn.c_attn.bias" for i in range(args.n_layer)]
    checks = {'all-parameter: project vs looped': max_rel_diff(metrics.per_token_gradient_sums(model, lx, ly),
              metrics.per_token_gradient_sums_looped(model, lx, ly), skip=key_biases),
              'position-local: |G|^T|X| vs looped': max_rel_diff(metrics.position_local_gradient_sums(
                  local, subset_graph(model, local, x, y), 1), variants[looped_local](None))}
    for n in args.method_seqs:
        with FlopCounterMode(display=False) as ours:
            project = metrics.per_token_gradient_sums(model, px[:n], py[:n])
        with FlopCounterMode(display=False) as theirs:
            published = published_gradient_sums(model, px[:n], py[:n])
        checks[f'all-parameter: project vs published ({n})'] = max_rel_diff(project, published, key_biases)
        checks[f'GFLOP: project, published ({n})'] = [c.get_total_flops() / 1e9 for c in (ours, theirs)]
    return times, checks


def print_components(args, times, checks):
    """Sections 2 to 4: each quantity's median ms and its ratio to a training step; the methods compared."""
    median_ms, N = {k: statistics.median(t) for k, t in times.items()}, args.batch_size * args.block_size
    step_ms = median_ms['training step (forward, backward, clip, AdamW)']
    print(f"\n2. each quantity on its own (batch of {N} tokens)           median ms   "
          "ratio to a training step")
    for name, ms in median_ms.items():
        print(f"   {name:60s}{ms:10.2f}{ms / step_ms:10.3f}")
    scheduled = [name for name in median_ms if name.startswith('scheduled: opposition')][0]
    S = args.max_iters  # train.py's default run
    n_grad = len(recorder.log_schedule(S - 1, points=recorder.GRAD_POINTS))
    print(f"   over a default run ({S} steps, {n_grad} scheduled steps) the scheduled opposition adds "
          f"{n_grad * median_ms[scheduled] / (S * step_ms):.2f} training steps' time per step")
    print("\n3. all-parameter exact opposition (attention key biases left out of the checks): the project's "
          "method against the published one (a port)\n   sequences  tokens   project ms  published ms   "
          "published / project   GFLOP project  published")
    for n in args.method_seqs:
        ours = median_ms[f'all-parameter opposition, project method ({n} probe seq)']
        theirs = median_ms[f'all-parameter opposition, published method port ({n} probe seq)']
        flops_ours, flops_theirs = checks[f'GFLOP: project, published ({n})']
        print(f"   {n:9d}{n * args.block_size:8d}{ours:13.0f}{theirs:14.0f}{theirs / ours:14.2f}x"
              f"{flops_ours:19.4g}{flops_theirs:11.4g}"
              f"   max relative difference {checks[f'all-parameter: project vs published ({n})']:.1e}")
    ours = median_ms[f'all-parameter opposition, project method ({LOOPED_SEQS} probe seq)']
    looped_ms = median_ms[f'all-parameter opposition, looped ({LOOPED_SEQS} probe seq)']
    print(f"   and one plain backward per token (the definition), {LOOPED_SEQS} sequence: "
          f"{looped_ms:.0f} ms, {looped_ms / ours:.1f}x the project's; max relative difference "
          f"{checks['all-parameter: project vs looped']:.1e}")
    loop_ms = median_ms[f'position-local, one backward per token ({LOCAL_SUBSET} tokens)']
    local_ms = median_ms[f'position-local, |G|^T |X| ({LOCAL_SUBSET} tokens)']
    loop_batch_ms = loop_ms * N / LOCAL_SUBSET  # extrapolated to the N tokens of the batch
    matmul_batch_ms = median_ms['position-local opposition, |G|^T |X|']
    print(f"4. position-local opposition: one backward per token / |G|^T|X| = {loop_ms / local_ms:.0f}x "
          f"on {LOCAL_SUBSET} tokens; extrapolated to the batch of {N}: {loop_batch_ms:.0f} ms "
          f"vs {matmul_batch_ms:.1f} ms ({loop_batch_ms / matmul_batch_ms:.0f}x); max relative difference "
          f"{checks['position-local: |G|^T|X| vs looped']:.1e}")


def print_outputs(args, tmp):
    """Section 5: bytes written (the --record all run's config.json), the BNSL fit, plot.py on tmp's runs."""
    S = args.max_iters  # train.py's default run
    records = runs.read_json(os.path.join(tmp, 'all'), 'config.json', 'train.py')['records'].items()
    scheduled = {'hidden': len(recorder.log_schedule(S)),  # rows of the scheduled records
                 'grad': len(recorder.log_schedule(S - 1, points=recorder.GRAD_POINTS))}
    rows = {name: scheduled[when] for name, _, _, when, _ in recorder.RECORDS if when in scheduled}
    row_bytes = {name: math.prod(shape[1:]) * np.dtype(dtype).itemsize for name, (shape, dtype) in records}
    per_step = sum(b for name, b in row_bytes.items() if name not in rows)
    total = sum(b * rows.get(name, S + 1) for name, b in row_bytes.items())  # + 1: the probe's final row
    print(f"\n5. --record all writes {per_step / 1e6:.2f} MB per step, {total / 1e9:.2f} GB for a run of "
          f"{S} steps of this model (hidden states and spectra on the default log schedule)")
    steps = np.arange(1, S + 1.0)
    loss = bnsl.bnsl_1break(steps, 20.0, 0.3, -0.2, 90.0, 0.1) * np.exp(
        0.01 * np.random.default_rng(0).standard_normal(len(steps)))  # with 1 % noise
    fit_ms = [timed(lambda _: bnsl.fit_bnsl(*bnsl.preprocess(steps, loss)), 'cpu') for _ in range(3)]
    print(f"   BNSL fit of a {S}-step curve (preprocessed, 100 bootstrap resamples): "
          f"{statistics.median(fit_ms) / 1000:.2f} s")
    with contextlib.redirect_stdout(io.StringIO()):
        ms = timed(lambda _: plot.main([os.path.join(tmp, level) for level in LEVELS]), 'cpu')
    print(f"   plot.py on the {len(LEVELS)} runs made here ({args.steps} steps each): {ms / 1000:.1f} s")


def flops_per_token(config):
    """Model FLOPs of one training token, forward and backward, counting a multiply-add as 2 FLOPs and
    the backward as twice the forward (the PaLM paper's appendix B, as nanoGPT's MFU):
        F = 6 (12 L d^2 + V d) + 12 L T d
    over the weights that multiply activations and attention over the full context of T."""
    L, d, V, T = config.n_layer, config.n_embd, config.vocab_size, config.block_size
    return 6 * (12 * L * d * d + V * d) + 12 * L * T * d


def print_flops(args, corpus, median_ms, matmuls):
    """Section 6: model TFLOP/s, MFU (TFLOP/s / peak), on the CPU the share of matmuls' (ms of each)."""
    with torch.device('meta'):
        flops = flops_per_token(build_gpt(vars(args), corpus['vocab_size']).config)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else args.device
    # the peak: --peak_tflops, else the datasheet's of a known GPU in bf16
    peak = args.peak_tflops or (next((p for key, p in PEAK_BF16_TFLOPS.items() if key in device_name), None)
                                if args.device.startswith('cuda') and args.dtype == 'bfloat16' else None)
    matmul_peak = matmul_tflops(matmuls) if matmuls else None
    print(f"\n6. model FLOPs of the training step: {flops / 1e6:.2f} MFLOP per token "
          f"(the recording's work not counted), {args.dtype} on {device_name}; "
          + (f"MFU against a peak of {peak:.4g} TFLOP/s" if peak else "no peak known for this device "
             "(--peak_tflops), no MFU"))
    if matmul_peak:
        print(f"   an MFU analogue: achieved model FLOP/s / measured matmul FLOP/s (fp32 {MATMUL_N} x "
              f"{MATMUL_N} @ {MATMUL_N} x {MATMUL_N}, median of {len(matmuls)}, timed in the rounds: "
              f"{matmul_peak:.3f} TFLOP/s)")
    for variant, ms in median_ms.items():  # None: no timed step
        tflops = ms and flops * args.batch_size * args.block_size / (ms / 1000) / 1e12
        print(f"   {LABELS[variant]:50s}" + ("  n/a (no timed step, see section 1)" if ms is None else
              f"{tflops:10.3f} TFLOP/s" + (f"   MFU {100 * tflops / peak:5.1f}%" if peak else "")
              + (f"   {100 * tflops / matmul_peak:5.3g}% of matmul" if matmul_peak else "")))


def main(argv=None):
    args = get_args(argv)
    runs.use_cpu_well(args.device, 0)  # as train.py does, before the first step: every variant runs under it
    corpus = train.load_corpus(args, master=False)  # the default corpus; bad values: one line, exit 2
    print(f"bench.py: GPT {args.n_layer}L/{args.n_embd}d, batch {args.batch_size} x {args.block_size}, "
          f"vocabulary {corpus['vocab_size']}, probe {args.probe_seqs} x {args.block_size}, "
          f"{args.device} ({args.dtype}{', compiled' if args.compile else ''}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.rounds} rounds of {args.steps} steps per variant",
          flush=True)
    with tempfile.TemporaryDirectory(prefix='bench-') as tmp:  # the runs made here, removed at the end
        steps, matmuls = {variant: [] for variant in LABELS}, []  # ms of every timed step; of each matmul
        for round_no in range(1, args.rounds + 1):  # interleaved: every variant once a round
            steps['plain'] += plain_loop(args, corpus)
            for level in LEVELS:
                steps[level] += train_py(args, level, os.path.join(tmp, level))
            matmuls += matmul_ms() if args.device == 'cpu' else []  # on the CPU, timed as the steps are
            print(f"  round {round_no}/{args.rounds} done", file=sys.stderr, flush=True)
        # None where there are no steps (light: none unscheduled in a short run)
        median_ms = {variant: statistics.median(ms) if ms else None for variant, ms in steps.items()}
        fewest, tokens = WARMUP + 2, args.batch_size * args.block_size  # fewest: --steps timing a light step
        while not set(range(WARMUP, fewest - 1)) - set(recorder.log_schedule(fewest - 1)):
            fewest += 1
        print("\n1. training step                                       median ms   ratio to bare   tokens/s")
        for variant, ms in median_ms.items():
            if ms is None:  # light in a short run: the log schedule covers every step, not timed then
                print(f"   {LABELS[variant]:50s}  n/a: no unscheduled step among the timed steps; "
                      f"use --steps {fewest} or more")
            else:
                ratio = ms / median_ms['none']
                print(f"   {LABELS[variant]:50s}{ms:10.1f}{ratio:14.2f}{tokens / ms * 1000:12.0f}")
        if not args.steps_only:
            print_components(args, *components(args, corpus))
            print_outputs(args, tmp)
        print_flops(args, corpus, median_ms, matmuls)
        print_passes(args, tmp)


if __name__ == '__main__':
    main()
