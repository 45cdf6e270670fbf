"""
What recording costs: train.py at each recording level against a plain loop, and each measurement on its own.

    python bench/bench.py                          # train.py's default model and batch, on the CPU
    python bench/bench.py --rounds 5 --steps 60    # more samples; --n_layer, --n_embd, ... other sizes
    python bench/bench.py --device cuda --dtype bfloat16 --compile --steps_only \
        --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --batch_size 8   # MFU, GPT-2-small-like

In one process, the variants interleaved round by round so that machine noise hits them alike.
results/bench.md describes the six sections printed and keeps the measurements.
"""

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
import tempfile
import time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

import bnsl
import data
import metrics
import plot
import recorder
import runs
import train
from model import build_gpt, per_token_loss

WARMUP = 3  # first steps of every run left out of the medians
# dense bf16 tensor-core peaks in TFLOP/s (NVIDIA's datasheets), of the first key in the device's name
PEAK_BF16_TFLOPS = {'H100 PCIe': 756.0, 'H100 NVL': 835.5, 'H200 NVL': 835.5, 'H100': 989.4, 'H200': 989.4,
                    'A100': 312.0}
LOCAL_SUBSET = 64  # tokens timed one backward each for the position-local comparison
METHOD_SEQS = (1, 4, 16)  # probe sequences on which the project's and the published opposition are compared
LOOPED_SEQS = 1  # probe sequences on which the project's and the looped opposition (definition) are compared
MATMUL_N, MATMUL_REPS = 2048, 3  # on the CPU: the (n, n) @ (n, n) fp32 matmul timed, times a round
LABELS = {'plain': 'plain nanoGPT step (written in bench.py)', 'none': 'train.py --record none (bare)',
          'light': 'train.py --record light (unscheduled steps)', 'all': 'train.py --record all'}
LEVELS = ['none', 'light', 'all']  # train.py's --record levels
SETTINGS = [s for s in train.SETTINGS if s[0] in (
    'n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'vocab_size', 'probe_seqs', 'cache_dir')] + [
    ('device', 'cpu', str, 'cpu, cuda, cuda:N or mps'),
    ('dtype', 'float32', ['auto', 'float32', 'bfloat16'], 'training precision, as in train.py'),
    ('compile', False, bool, 'torch.compile the training steps, as in train.py'),
    ('steps_only', False, bool, 'sections 1 and 6 only (the training steps), e.g. for MFU at a large size'),
    ('peak_tflops', 0.0, runs.nonnegative, "the device's peak TFLOP/s at --dtype, for MFU "
     "(0: from PEAK_BF16_TFLOPS for bf16 on a known GPU)"),
    ('steps', 40, runs.positive, 'training steps per run and round'),
    ('rounds', 3, runs.positive, 'rounds; every variant runs once a round'),
    ('reps', 5, runs.positive, 'repetitions of each quantity timed on its own, per round'),
]


def get_args(argv=None):
    args = runs.parser(__doc__, SETTINGS).parse_args(argv)
    if args.steps <= WARMUP + 1:
        runs.fail(f"--steps must exceed {WARMUP + 1}, got {args.steps}")
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


class PlainGPT(nn.Module):
    """The plain loop's GPT, written here and not imported from model.py, so that a slowdown in the
    project's model or loss shows up against it: token + position embeddings, pre-LayerNorm blocks
    (causal self-attention, 4x GELU MLP), a final LayerNorm and an untied LM head, GPT-2's init."""

    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, bias):
        super().__init__()
        d, self.n_head = n_embd, n_head
        self.wte, self.wpe = nn.Embedding(vocab_size, d), nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(  # the layers of one block, in the order used
            ln1=nn.LayerNorm(d, bias=bias), qkv=nn.Linear(d, 3 * d, bias), proj=nn.Linear(d, d, bias),
            ln2=nn.LayerNorm(d, bias=bias), fc=nn.Linear(d, 4 * d, bias), out=nn.Linear(4 * d, d, bias),
        )) for _ in range(n_layer))
        self.ln_f, self.head = nn.LayerNorm(d, bias=bias), nn.Linear(d, vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # matrices N(0, 0.02); the two that write into the residual stream smaller
                residual = name.endswith(('proj.weight', 'out.weight'))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer) if residual else 0.02)
            elif 'ln' not in name:  # Linear biases 0 (LayerNorms keep their 1 and 0)
                nn.init.zeros_(p)

    def forward(self, idx):
        """Logits: (B, T) -> (B, T, V)."""
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, d)
        for b in self.blocks:
            q, k, v = b.qkv(b.ln1(x)).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + b.proj(y.transpose(1, 2).reshape(B, T, -1))  # heads side by side again: (B, T, d)
            x = x + b.out(F.gelu(b.fc(b.ln2(x))))
        return self.head(self.ln_f(x))


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
    ms = np.load(os.path.join(out_dir, 'step_ms.npy'))
    keep = (np.arange(len(ms)) >= WARMUP) & (np.arange(len(ms)) < len(ms) - 1)  # the last: scheduled passes
    if level == 'light':  # its unscheduled steps: no post-update pass recorded
        keep &= np.isnan(np.load(os.path.join(out_dir, 'train_loss_post.npy'))[:, 0, 0])
    return list(ms[keep])


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


def published_gradient_sums(model, idx, targets):
    """name -> (sum g, sum |g|, sum g^2) over the tokens, as the published analysis computes them
    (github.com/mirandrom/zsl, grad_intrf_true.py), ported as the baseline of per_token_gradient_sums,
    sharing no code with it: one forward; per position j one backward of sum_n l_nj, in which each layer
    turns its X and G at positions <= j into each sequence's gradient (their einsum 'Bsd,Bsp->Bpd';
    embeddings: the rows of its tokens) and adds it up. No weight gradient formed; untied heads only."""
    assert model.transformer.wte.weight is not model.lm_head.weight, "the port needs an untied LM head"
    sums = {name: tuple(torch.zeros_like(p) for _ in range(3)) for name, p in model.named_parameters()}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.LayerNorm))}
    saved, embedded, position = {}, [], [0]  # X of each layer; the embedding output; j

    def hooks(name, module):
        def per_sequence_gradients(G):  # G (B, T, out): the output gradient of sum_n l_nj
            j = position[0]
            G, X = G[:, :j + 1], saved[name][:, :j + 1]  # positions after j: no gradient
            linear = isinstance(module, nn.Linear)
            grads = {'.weight': torch.einsum('bso,bsi->boi', G, X) if linear else (G * X).sum(1)}
            grads.update({'.bias': G.sum(1)} if module.bias is not None else {})
            for suffix, g in grads.items():  # g (B, *shape): the gradient of each sequence's token at j
                for total, part in zip(sums[name + suffix], (g, g.abs(), g.pow(2))):
                    total.add_(part.sum(0))

        def keep_input(module, inputs, output):
            X = inputs[0].detach()
            saved[name] = X if isinstance(module, nn.Linear) else F.layer_norm(
                X, module.normalized_shape, eps=module.eps)  # a LayerNorm's weight multiplies xhat
            output.register_hook(per_sequence_gradients)
        return keep_input
    handles = [m.register_forward_hook(hooks(name, m)) for name, m in layers.items()]
    handles.append(model.transformer.wte.register_forward_hook(lambda m, i, out: embedded.append(out)))
    try:
        logits = model(idx)[0]  # (B, T, V), its graph kept for the T backward passes
    finally:
        for handle in handles:
            handle.remove()
    # their reindexing: slot[n, s] numbers sequence n's distinct ids by first appearance (a slot <= s),
    # ids[n, slot] maps back (0 where unused)
    slot, ids = torch.zeros(idx.shape, dtype=torch.long), torch.zeros(idx.shape, dtype=torch.long)
    for n, row in enumerate(idx.tolist()):
        first = {}
        for s, token in enumerate(row):
            slot[n, s] = first.setdefault(token, len(first))
            ids[n, slot[n, s]] = token
    slot, ids = slot.to(idx.device), ids.to(idx.device)
    for j in range(idx.shape[1]):
        position[0] = j
        loss = F.cross_entropy(logits[:, j], targets[:, j], reduction='sum')  # the B tokens at position j
        G, = torch.autograd.grad(loss, embedded[0], retain_graph=True)  # the layers' hooks run on the way
        G = G[:, :j + 1]  # (B, j+1, d)
        rows = torch.zeros_like(G).scatter_add_(1, slot[:, :j + 1, None].expand_as(G), G)  # per sequence
        for total, g in zip(sums['transformer.wte.weight'], (rows, rows.abs(), rows.pow(2))):
            total.index_add_(0, ids[:, :j + 1].flatten(), g.flatten(0, 1))
        for total, g in zip(sums['transformer.wpe.weight'], (G.sum(0), G.abs().sum(0), G.pow(2).sum(0))):
            total[:j + 1] += g
    return sums


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


def matmul_ms(n=MATMUL_N, reps=MATMUL_REPS):
    """ms of each of `reps` fp32 (n, n) @ (n, n) matmuls on the CPU, after one untimed."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    return [timed(lambda _: a @ b, 'cpu') for _ in range(reps)]


def matmul_tflops(ms, n=MATMUL_N):
    """TFLOP/s of (n, n) @ (n, n) matmuls taking `ms` each: 2 n^3 FLOPs over the median time."""
    return 2 * n ** 3 / (statistics.median(ms) / 1000) / 1e12


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
    for variant, ms in median_ms.items():
        if ms is None:
            print(f"   {LABELS[variant]:50s}  n/a (no timed step, see section 1)")
            continue
        tflops = flops * args.batch_size * args.block_size / (ms / 1000) / 1e12
        print(f"   {LABELS[variant]:50s}{tflops:10.3f} TFLOP/s" + (f"   MFU {100 * tflops / peak:5.1f}%"
              if peak else "") + (f"   {100 * tflops / matmul_peak:5.3g}% of matmul" if matmul_peak else ""))


def main(argv=None):
    args = get_args(argv)
    if args.device == 'cpu':  # as train.py does; here before the first step, so every variant runs under it
        runs.keep_freed_memory()
    corpus = data.prepare(None, args.vocab_size, args.cache_dir)
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


if __name__ == '__main__':
    main()
