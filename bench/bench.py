"""
What recording costs, measured in one process, the variants interleaved round by round so that
machine noise hits them alike. Prints a table of medians and ratios.

    python bench.py                          # train.py's default model and batch, on the CPU
    python bench.py --rounds 5 --steps 60    # more samples
    python bench.py --n_layer 2 --n_embd 64  # another size

1. training steps: a minimal plain nanoGPT loop written here, independently of model.py (its own
   GPT of the same size and parameter count, AdamW as train.py's, nanoGPT's loss
   F.cross_entropy(logits.view(-1, V), targets.view(-1))), so that a slowdown in the project's
   model or loss shows against it; and train.py itself at
   --record none (the bare step) / light / all, timed by train.py (step_ms.npy, the wall time of
   each step, recording included, checkpoint excluded); the first steps of a run are warm-up and
   dropped. light: the median over its unscheduled steps (the scheduled ones cost what all costs;
   a short run has none, as its log schedule covers every step: the row then says so);
2. each recorded quantity on its own, on the same model, batch and probe set;
3. exact per-token gradient opposition of every parameter: the project's method
   (metrics.per_token_gradient_sums) against a port of the published one (published_gradient_sums,
   written here: one backward per position of the whole batch, per-sequence gradients in each layer)
   on 1, 4 and 16 probe sequences (METHOD_SEQS), and against the definition, one plain backward per
   token (metrics.per_token_gradient_sums_looped), on one;
4. exact opposition of the position-local layers: |G|^T |X| from the ordinary backward against one
   backward per token for those layers (per_token_gradient_sums_looped on those layers, through
   the graph of the whole batch, timed on its first LOCAL_SUBSET tokens and scaled to the batch;
   its time includes its one forward of the batch);
5. bytes written per step and for a default run, the BNSL fit, plot.py on the runs made here;
6. model FLOPs of the training steps: TFLOP/s achieved and, where the peak of the device is known
   (or given with --peak_tflops), model FLOPs utilisation (MFU). On the CPU also an MFU analogue:
   achieved model FLOP/s / this machine's fp32 matmul FLOP/s, measured here (a 2048 x 2048 matmul,
   MATMUL_REPS times a round, interleaved with the steps). On a GPU, at a GPT-2-small-like size:
   python bench.py --device cuda --dtype bfloat16 --compile --steps_only \
       --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --batch_size 8
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
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

import bnsl
import data
import metrics
import plot
import recorder
import train
from model import GPT, GPTConfig, per_token_loss

WARMUP = 3  # first steps of every run left out of the medians
# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets, by device name;
# the first name found in torch.cuda.get_device_name() is used
PEAK_BF16_TFLOPS = {'H100 PCIe': 756.0, 'H100 NVL': 835.5, 'H200 NVL': 835.5, 'H100': 989.4, 'H200': 989.4,
                    'A100': 312.0}
LOCAL_SUBSET = 64  # tokens timed one backward each for the position-local comparison
METHOD_SEQS = (1, 4, 16)  # probe sequences on which the project's and the published opposition are compared
LOOPED_SEQS = 1  # probe sequences on which the project's and the looped opposition (definition) are compared
MATMUL_N, MATMUL_REPS = 2048, 3  # on the CPU: the (n, n) @ (n, n) fp32 matmul timed, times a round


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.error = fail
    defaults = train.get_args([])  # train.py's default settings
    for name in ['n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'vocab_size', 'probe_seqs']:
        parser.add_argument('--' + name, type=int, default=getattr(defaults, name), help="as in train.py")
    parser.add_argument('--device', default='cpu', help='cpu, cuda, cuda:N or mps')
    parser.add_argument('--dtype', default='float32', choices=['auto', 'float32', 'bfloat16'],
                        help='training precision, as in train.py')
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the training steps, as in train.py')
    parser.add_argument('--steps_only', action='store_true',
                        help='sections 1 and 6 only (the training steps), e.g. for MFU at a large size')
    parser.add_argument('--peak_tflops', type=float, default=0.0,
                        help="the device's peak TFLOP/s at --dtype, for MFU "
                             "(0: from PEAK_BF16_TFLOPS for bf16 on a known GPU)")
    parser.add_argument('--steps', type=int, default=40, help='training steps per run and round')
    parser.add_argument('--rounds', type=int, default=3, help='rounds; every variant runs once a round')
    parser.add_argument('--reps', type=int, default=5,
                        help='repetitions of each quantity timed on its own, per round')
    parser.add_argument('--cache_dir', default=defaults.cache_dir, help='tokenizer cache, as in train.py')
    args = parser.parse_args(argv)
    if args.steps <= WARMUP + 1 or args.rounds < 1 or args.reps < 1:
        parser.error(f"--steps must exceed {WARMUP + 1}, --rounds and --reps be positive")
    if not args.peak_tflops >= 0:
        parser.error(f"--peak_tflops must be positive or 0, not {args.peak_tflops}")
    problem = train.check_device(args.device, args.dtype)  # train.py's rules: checked up front, one line
    if problem or args.device == 'auto':
        parser.error(problem or "--device auto: name the device to measure (cpu, cuda, cuda:N or mps)")
    # 'auto' resolved once, as train.py does
    args.dtype = train.precision(args.dtype, device_type(args.device))[0]
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
    start = time.perf_counter()
    fn(state)
    sync(device)
    return 1000 * (time.perf_counter() - start)


def project_step(model, step_model, opt, x, y, autocast, grad_clip):
    """One training step of the project's model (model.GPT, its per_token_loss) without recording:
    forward of step_model (the model, or its compiled form) under autocast, mean loss, backward,
    clip, AdamW. Section 2's unit of cost. Returns the loss."""
    with autocast:
        _, loss = step_model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float('inf'))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


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
        self.ln_f = nn.LayerNorm(d, bias=bias)
        self.head = nn.Linear(d, vocab_size, bias=False)
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
            # q, k, v, each (B, heads, T, head size)
            q, k, v = b.qkv(b.ln1(x)).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + b.proj(y.transpose(1, 2).reshape(B, T, -1))  # heads side by side again: (B, T, d)
            x = x + b.out(F.gelu(b.fc(b.ln2(x))))
        return self.head(self.ln_f(x))


def plain_model(args, corpus):
    """(train.py's default settings, a PlainGPT of the benchmarked size, its AdamW as train.py's:
    weight decay on the 2-D tensors only, the same betas, fused on GPUs)."""
    defaults = train.get_args([])
    torch.manual_seed(defaults.seed)
    model = PlainGPT(corpus['vocab_size'], args.block_size, args.n_layer, args.n_head, args.n_embd,
                     defaults.bias).to(args.device)
    with torch.device('meta'):  # model.GPT's count without filling its weights
        reference = GPT(model_config(args, corpus)).num_params()
    n = sum(p.numel() for p in model.parameters())
    assert n == reference, f"PlainGPT has {n} parameters, model.GPT {reference}"
    params = list(model.parameters())
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': defaults.weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    opt = torch.optim.AdamW(groups, lr=defaults.learning_rate, betas=(defaults.beta1, defaults.beta2),
                            fused=device_type(args.device) == 'cuda')
    return defaults, model, opt


def plain_step(model, step_model, opt, x, y, autocast, grad_clip):
    """One plain nanoGPT step: forward, nanoGPT's mean cross-entropy, backward, clip, AdamW. Returns
    the loss."""
    with autocast:
        logits = step_model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float('inf'))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def plain_loop(args, corpus, steps):
    """ms per step of the plain loop (PlainGPT, written here) on train.py's batches and learning-rate
    schedule, without any recording."""
    defaults, model, opt = plain_model(args, corpus)
    autocast = train.precision(args.dtype, device_type(args.device))[1]
    step_model = torch.compile(model) if args.compile else model
    times = []
    for step in range(steps):
        start = time.perf_counter()
        # train.py's batch, as contiguous tensors, as nanoGPT's get_batch stacks them (view needs it)
        x, y = (t.contiguous() for t in batch(args, corpus, defaults, step))
        for group in opt.param_groups:
            group['lr'] = train.get_lr(step, defaults)
        loss = plain_step(model, step_model, opt, x, y, autocast, defaults.grad_clip)
        loss.item()  # train.py reads the loss every step too
        times.append(1000 * (time.perf_counter() - start))
    return times[WARMUP:]


def matmul_ms(n=MATMUL_N, reps=MATMUL_REPS):
    """ms of each of `reps` fp32 (n, n) @ (n, n) matmuls on the CPU, after one untimed."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    return [timed(lambda _: a @ b, 'cpu') for _ in range(reps)]


def matmul_tflops(ms, n=MATMUL_N):
    """The matmul throughput in TFLOP/s from the ms of (n, n) @ (n, n) matmuls: 2 n^3 FLOPs over the
    median time."""
    return 2 * n ** 3 / (statistics.median(ms) / 1000) / 1e12


def train_py(args, level, out_dir):
    """ms per step of train.py itself at a recording level (its step_ms record), and its run dir."""
    every = str(args.steps)  # the periodic passes once, at the end
    argv = ['--record', level, '--max_iters', str(args.steps), '--out_dir', out_dir, '--overwrite',
            '--grad_every', every, '--hidden_every', every, '--ckpt_interval', every, '--log_interval', every,
            '--device', args.device, '--dtype', args.dtype, '--cache_dir', args.cache_dir]
    argv += ['--compile'] * args.compile
    for name in ['n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'vocab_size', 'probe_seqs']:
        argv += ['--' + name, str(getattr(args, name))]
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(argv)
    ms = np.load(os.path.join(out_dir, 'step_ms.npy'))
    keep = np.arange(len(ms)) >= WARMUP
    # the last step runs the scheduled passes (as the first, a warm-up step)
    keep &= np.arange(len(ms)) < len(ms) - 1
    if level == 'light':  # its unscheduled steps: no post-update pass recorded
        keep &= np.isnan(np.load(os.path.join(out_dir, 'train_loss_post.npy'))[:, 0, 0])
    return list(ms[keep])


def fewest_steps_for_light():
    """The fewest --steps at which train_py times a --record light step: its post-update pass runs on
    the log schedule, which covers every step of a short run, and a scheduled step is not timed."""
    steps = WARMUP + 2
    while not set(range(WARMUP, steps - 1)) - set(recorder.log_schedule(steps - 1)):
        steps += 1
    return steps


def model_config(args, corpus):
    return GPTConfig(block_size=args.block_size, vocab_size=corpus['vocab_size'], n_layer=args.n_layer,
                     n_head=args.n_head, n_embd=args.n_embd)


def seeded_model(args, corpus):
    """(train.py's default settings, the model initialised as train.py does, its AdamW)."""
    defaults = train.get_args([])
    torch.manual_seed(defaults.seed)
    model = GPT(model_config(args, corpus)).to(args.device)
    opt = model.configure_optimizers(defaults.weight_decay, defaults.learning_rate,
                                     (defaults.beta1, defaults.beta2), args.device)
    return defaults, model, opt


def batch(args, corpus, defaults, step):
    """(x, y) of train.py's training batch at `step`, each (batch_size, block_size), on the device."""
    offsets = data.batch_offsets(defaults.seed, step, args.batch_size, args.block_size, len(corpus['train']))
    return (torch.from_numpy(a).to(args.device)
            for a in data.get_windows(corpus['train'], offsets, args.block_size))


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


def method_sizes(args):
    """The numbers of probe sequences on which section 3 compares the methods: METHOD_SEQS, at most
    --probe_seqs."""
    return sorted({min(n, args.probe_seqs) for n in METHOD_SEQS})


def max_rel_diff(fast, slow, skip=()):
    """Largest relative difference between two sets of sums, tensor by tensor: max |fast - slow| /
    max |slow| of each tensor (so an error in a small tensor is not hidden by a large one)."""
    return max(float((fast[n][k] - slow[n][k]).abs().max() / slow[n][k].abs().max().clamp_min(1e-30))
               for n in slow if n not in skip for k in (0, 1))


def components(args, corpus, rounds):
    """name -> list of ms: each recorded quantity on its own, and the two method comparisons."""
    defaults, model, opt = seeded_model(args, corpus)
    params = dict(model.named_parameters())
    x, y = batch(args, corpus, defaults, 0)
    probe_offsets = np.arange(args.probe_seqs) * (args.block_size + 1)
    probe_x, probe_y = (torch.from_numpy(a).to(args.device)
                        for a in data.get_windows(corpus['val'], probe_offsets, args.block_size))
    local = metrics.position_local_modules(model)
    local_names = [f"{m}.{n}" for m, module in local.items() for n, _ in module.named_parameters()]
    N = x.numel()
    autocast = train.precision(args.dtype, device_type(args.device))[1]
    step_model = torch.compile(model) if args.compile else model

    def step(_):
        project_step(model, step_model, opt, x, y, autocast, defaults.grad_clip)

    head_name = next(n for n, p in params.items() if p is model.lm_head.weight)  # the name of U

    def grads():  # the training gradient, as train.py's recorder takes it from p.grad
        return {n: p.grad for n, p in params.items()}

    def graph():  # the training forward and backward, graph kept, position-local X and G captured
        with metrics.capture_activations(local) as acts:
            with autocast:
                logits, _, h = model(x, return_hidden=True)
                losses = per_token_loss(logits, y)
            losses.mean().backward(retain_graph=True)
        return logits, acts, h, losses

    def subset_graph():  # X and G captured, G of the losses of the first LOCAL_SUBSET tokens only
        with metrics.capture_activations(local) as acts:
            losses = per_token_loss(model(x)[0], y).reshape(-1)
            losses[:LOCAL_SUBSET].sum().backward()  # G of the subset only (the other rows 0)
        return acts

    def looped_local(_):  # the definition for the position-local layers, on the same tokens
        return metrics.per_token_gradient_sums_looped(model, x, y, names=local_names, n_tokens=LOCAL_SUBSET)

    # as train.py's probe pass: h and p reused
    _, h, _, probe_p = metrics.fp32_probe_forward(model, probe_x, probe_y)
    h = h.reshape(-1, args.n_embd)
    head = model.lm_head.weight.detach()
    delta = {n: 1e-3 * torch.randn_like(p) for n, p in params.items()}
    change = torch.randn(N, dtype=torch.float64, device=args.device)  # stands for post - pre of the batch
    sizes = method_sizes(args)  # sequences for the project's method against the published one
    looped_x, looped_y = probe_x[:LOOPED_SEQS], probe_y[:LOOPED_SEQS]
    n_tokens = probe_x.numel()  # train.py's default: the opposition on every probe sequence

    def scheduled_opposition(_):  # as train.py records it at a grad step: sums, dots, summary, terms
        sums, dots = metrics.per_token_gradient_sums(model, probe_x, probe_y, delta=delta)
        return metrics.opposition_summary(sums), metrics.update_weighted_terms(sums, delta, dots)

    variants = {  # name -> (fn(state), setup() giving the state, untimed)
        'training step (forward, backward, clip, AdamW)': (step, None),
        'probe pass (fp32 forward, P sequences)': (
            lambda _: metrics.fp32_probe_forward(model, probe_x, probe_y), None),
        'h-space decomposition of the probe tokens': (
            lambda _: metrics.output_decomposition(h, head, probe_y.reshape(-1), probs=probe_p), None),
        'post-update pass (fp32 forward, batch)': (lambda _: metrics.fp32_forward(model, x, y), None),
        'theta+/- (second backward, from h) and norms': (
            lambda state: metrics.theta_decomposition(state[0], y, params, grads(), h=state[2],
                                                      head=head_name, losses=state[3]), graph),
        'position-local opposition, |G|^T |X|': (
            lambda state: metrics.opposition_summary(
                metrics.position_local_gradient_sums(local, state[1], N, grads())), graph),
        'D, M and null of the batch changes': (
            lambda _: [f(change) for f in (metrics.destructive_interference, metrics.interference_magnitude,
                                           metrics.sign_flip_null)], None),
        f'scheduled: opposition, nulls, update-weighted terms ({n_tokens} tokens)': (
            scheduled_opposition, None),
        f'all-parameter opposition, looped ({LOOPED_SEQS} probe seq)': (
            lambda _: metrics.opposition_summary(
                metrics.per_token_gradient_sums_looped(model, looped_x, looped_y)), None),
        'scheduled: JVP prediction of the batch': (
            lambda _: metrics.predicted_loss_change(model, x, y, delta), None),
        f'position-local, one backward per token ({LOCAL_SUBSET} tokens)': (looped_local, None),
        f'position-local, |G|^T |X| ({LOCAL_SUBSET} tokens)': (
            lambda acts: metrics.position_local_gradient_sums(local, acts, 1), subset_graph),
    }
    for n in sizes:  # the same sums (and their summary) by the project's method and the published one
        x_n, y_n = probe_x[:n], probe_y[:n]
        variants[f'all-parameter opposition, project method ({n} probe seq)'] = (
            lambda _, x_n=x_n, y_n=y_n: metrics.opposition_summary(
                metrics.per_token_gradient_sums(model, x_n, y_n)), None)
        variants[f'all-parameter opposition, published method port ({n} probe seq)'] = (
            lambda _, x_n=x_n, y_n=y_n: metrics.opposition_summary(published_gradient_sums(model, x_n, y_n)),
            None)
    times = {name: [] for name in variants}
    if args.compile:
        step(None)  # compiles, outside the timings
    for _ in range(rounds):
        for name, (fn, setup) in variants.items():
            for _ in range(args.reps):
                times[name].append(timed(fn, args.device, setup))
            model.zero_grad(set_to_none=True)
    # the same numbers: the project's method vs looped on the probe sequence, and vs the published one
    # on each size; |G|^T|X| vs looped on the subset
    project = metrics.per_token_gradient_sums(model, looped_x, looped_y)
    looped = metrics.per_token_gradient_sums_looped(model, looped_x, looped_y)
    # the attention biases hold the key biases: exact zeros in the project's sums, rounding noise elsewhere
    key_biases = [f"transformer.h.{i}.attn.c_attn.bias" for i in range(args.n_layer)]
    checks = {'all-parameter: project vs looped': max_rel_diff(project, looped, skip=key_biases),
              'position-local: |G|^T|X| vs looped': max_rel_diff(
                  metrics.position_local_gradient_sums(local, subset_graph(), 1), looped_local(None))}
    for n in sizes:  # untimed, so their FLOPs are counted too (PyTorch's counter)
        with FlopCounterMode(display=False) as ours:
            project = metrics.per_token_gradient_sums(model, probe_x[:n], probe_y[:n])
        with FlopCounterMode(display=False) as theirs:
            published = published_gradient_sums(model, probe_x[:n], probe_y[:n])
        checks[f'all-parameter: project vs published ({n})'] = max_rel_diff(project, published, skip=key_biases)
        checks[f'GFLOP: project, published ({n})'] = (ours.get_total_flops() / 1e9, theirs.get_total_flops() / 1e9)
    return times, checks, N


def published_gradient_sums(model, idx, targets):
    """The exact per-token gradient sums as the published analysis computes them (github.com/mirandrom/zsl,
    analyses/02-interference/grad_intrf_true.py with zsl_utils/grad_analysis), ported to this model as
    the baseline of the project's method, metrics.per_token_gradient_sums, with which it shares no code.
    One forward of the batch, its graph kept; then, for each position j, one backward of
    sum_n l_nj, the loss of the B tokens at position j (every sequence at once), through the whole graph.
    Inside that backward each layer turns its saved input X and its output gradient G, cut to positions
    0..j (later ones get none), into the gradient of each sequence n, i.e. of token (n, j), and adds it
    up per coordinate: sum_n g_n, sum_n |g_n| and (here also) sum_n g_n^2, which the null needs:
        Linear weight  g_n = sum_{s<=j} outer(G_ns, X_ns)   (their einsum 'Bsd,Bsp->Bpd')
        Embedding      g_n = the rows of sequence n's tokens, row r = sum of G_ns over the s holding r
    They replace each nn.Linear and nn.Embedding by an autograd.Function whose backward does this and
    returns no weight gradient; here forward hooks keep X and a hook on each layer's output receives G,
    and autograd is asked for the embedding output's gradient only, so it computes no weight gradient
    either. Their code covers Linear weights without bias and embeddings; the same per-sequence rule
    gives here the biases (g_n = sum_s G_ns), the LayerNorm weights (sum_s G_ns * xhat_ns) and the
    position embedding (row s: G_ns at the embedding output). Their per-token norms and update products
    are left out (the project's method computes no norms either). Untied heads only (theirs unties it).
    Returns name -> (sum g, sum |g|, sum g^2), as per_token_gradient_sums."""
    assert model.transformer.wte.weight is not model.lm_head.weight, "the port needs an untied LM head"
    sums = {name: tuple(torch.zeros_like(p) for _ in range(3)) for name, p in model.named_parameters()}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.LayerNorm))}
    saved, embedded, position = {}, [], [0]  # X of each layer; the embedding output; j

    def accumulate(name, g):  # g (B, *shape): the gradient of each sequence's token at position j
        total, total_abs, total_sq = sums[name]
        total.add_(g.sum(0))
        total_abs.add_(g.abs().sum(0))
        total_sq.add_(g.pow(2).sum(0))

    def hooks(name, module):
        def per_sequence_gradients(G):  # G (B, T, out): the output gradient of sum_n l_nj
            j = position[0]
            G, X = G[:, :j + 1], saved[name][:, :j + 1]  # positions after j: no gradient
            if isinstance(module, nn.Linear):
                accumulate(name + '.weight', torch.einsum('bso,bsi->boi', G, X))
            else:
                accumulate(name + '.weight', (G * X).sum(1))
            if module.bias is not None:
                accumulate(name + '.bias', G.sum(1))

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
    B, T = idx.shape
    # their reindexing: slot[n, s] numbers the distinct ids of sequence n in order of first appearance,
    # ids[n, slot] maps back (0 where unused): a token at position s sits in a slot <= s
    slot, ids = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    for n, row in enumerate(idx.tolist()):
        first = {}
        for s, token in enumerate(row):
            slot[n, s] = first.setdefault(token, len(first))
            ids[n, slot[n, s]] = token
    slot, ids = slot.to(idx.device), ids.to(idx.device)
    wte = sums['transformer.wte.weight']
    for j in range(T):
        position[0] = j
        loss = F.cross_entropy(logits[:, j], targets[:, j], reduction='sum')  # the B tokens at position j
        G, = torch.autograd.grad(loss, embedded[0], retain_graph=True)  # the layers' hooks run on the way
        G = G[:, :j + 1]  # (B, j+1, d)
        rows = torch.zeros_like(G).scatter_add_(1, slot[:, :j + 1, None].expand_as(G), G)  # per sequence
        for total, g in zip(wte, (rows, rows.abs(), rows.pow(2))):
            total.index_add_(0, ids[:, :j + 1].flatten(), g.flatten(0, 1))
        for total, g in zip(sums['transformer.wpe.weight'], (G.sum(0), G.abs().sum(0), G.pow(2).sum(0))):
            total[:j + 1] += g
    return sums


def record_bytes(run_dir, default_steps):
    """(bytes of one step's rows, bytes of a default-length run) from a run's config.json."""
    with open(os.path.join(run_dir, 'config.json')) as f:
        cfg = json.load(f)
    scheduled = {'hidden': len(recorder.log_schedule(default_steps)),  # rows of the scheduled records
                 'grad': len(recorder.log_schedule(default_steps - 1, points=recorder.GRAD_POINTS))}
    rows = {name: scheduled[when] for name, _, _, when, _ in recorder.RECORDS if when in scheduled}
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
    median_ms = {name: statistics.median(ms) for name, ms in times.items()}
    step_ms = median_ms['training step (forward, backward, clip, AdamW)']
    print(f"\n2. each quantity on its own (batch of {N} tokens)           median ms   "
          f"ratio to a training step")
    for name, ms in median_ms.items():
        print(f"   {name:60s}{ms:10.2f}{ms / step_ms:10.3f}")
    scheduled = [name for name in median_ms if name.startswith('scheduled: opposition')][0]
    defaults = train.get_args([])
    n_grad = len(recorder.log_schedule(defaults.max_iters - 1, points=recorder.GRAD_POINTS))
    print(f"   over a default run ({defaults.max_iters} steps, {n_grad} scheduled steps) the scheduled "
          f"opposition adds {n_grad * median_ms[scheduled] / (defaults.max_iters * step_ms):.2f} training "
          f"steps' time per step")
    print("\n3. all-parameter exact opposition (attention key biases left out of the checks): the project's "
          "method against the published one (a port)\n   sequences  tokens   project ms  published ms   "
          "published / project   GFLOP project  published")
    for n in method_sizes(args):
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
    matmul_ms = median_ms[f'position-local, |G|^T |X| ({LOCAL_SUBSET} tokens)']
    loop_batch_ms = loop_ms * N / LOCAL_SUBSET  # extrapolated to the N tokens of the batch
    matmul_batch_ms = median_ms['position-local opposition, |G|^T |X|']
    print(f"4. position-local opposition: one backward per token / |G|^T|X| = {loop_ms / matmul_ms:.0f}x "
          f"on {LOCAL_SUBSET} tokens; extrapolated to the batch of {N}: {loop_batch_ms:.0f} ms "
          f"vs {matmul_batch_ms:.1f} ms ({loop_batch_ms / matmul_batch_ms:.0f}x); max relative difference "
          f"{checks['position-local: |G|^T|X| vs looped']:.1e}")

    default_steps = train.get_args([]).max_iters
    per_step, total = record_bytes(os.path.join(tmp, 'all'), default_steps)
    print(f"\n5. --record all writes {per_step / 1e6:.2f} MB per step, {total / 1e9:.2f} GB for a run of "
          f"{default_steps} steps of this model (hidden states and spectra on the default log schedule)")
    steps = np.arange(1, default_steps + 1.0)
    noise = np.exp(0.01 * np.random.default_rng(0).standard_normal(len(steps)))
    loss = bnsl.bnsl_1break(steps, 20.0, 0.3, -0.2, 90.0, 0.1) * noise
    fit_ms = [timed(lambda _: bnsl.fit_bnsl(*bnsl.preprocess(steps, loss)), 'cpu') for _ in range(3)]
    print(f"   BNSL fit of a {default_steps}-step curve (preprocessed, 100 bootstrap resamples): "
          f"{statistics.median(fit_ms) / 1000:.2f} s")
    with contextlib.redirect_stdout(io.StringIO()):
        ms = timed(lambda _: plot.main([tmp, '--out', os.path.join(tmp, 'figures')]), 'cpu')
    print(f"   plot.py on the {n_runs} runs made here ({args.steps} steps each): {ms / 1000:.1f} s")


def main(argv=None):
    args = get_args(argv)
    if args.device == 'cpu':  # as train.py does; here before the first step, so every variant runs under it
        train.keep_freed_memory()
    corpus = data.prepare(None, args.vocab_size, args.cache_dir)
    with tempfile.TemporaryDirectory(prefix='bench-') as tmp:  # the runs made here, removed at the end
        levels = ['none', 'light', 'all']
        variants = ['plain'] + levels
        steps = {variant: [] for variant in variants}  # ms of every timed step
        on_cpu = args.device == 'cpu'
        matmuls = []  # on the CPU: ms of each fp32 matmul, timed in the rounds as the steps are
        print(f"bench.py: GPT {args.n_layer}L/{args.n_embd}d, batch {args.batch_size} x {args.block_size}, "
              f"vocabulary {corpus['vocab_size']}, probe {args.probe_seqs} x {args.block_size}, "
              f"{args.device} ({args.dtype}{', compiled' if args.compile else ''}), "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"{args.rounds} rounds of {args.steps} steps per variant", flush=True)
        for round_no in range(1, args.rounds + 1):  # interleaved: every variant once per round
            steps['plain'] += plain_loop(args, corpus, args.steps)
            for level in levels:
                steps[level] += train_py(args, level, os.path.join(tmp, level))
            matmuls += matmul_ms() if on_cpu else []
            print(f"  round {round_no}/{args.rounds} done", file=sys.stderr, flush=True)
        # None where there are no steps (light: none unscheduled in a short run), a note in its rows
        median_ms = {variant: statistics.median(ms) if ms else None for variant, ms in steps.items()}
        no_steps = (f"n/a: no unscheduled step among the timed steps; use --steps {fewest_steps_for_light()} "
                    f"or more")
        tokens = args.batch_size * args.block_size
        print("\n1. training step                                       median ms   ratio to bare   tokens/s")
        labels = {'plain': 'plain nanoGPT step (written in bench.py)',
                  'none': 'train.py --record none (bare)',
                  'light': 'train.py --record light (unscheduled steps)', 'all': 'train.py --record all'}
        for variant in variants:
            ms = median_ms[variant]
            if ms is None:
                print(f"   {labels[variant]:50s}  {no_steps}")
                continue
            ratio = ms / median_ms['none']
            print(f"   {labels[variant]:50s}{ms:10.1f}{ratio:14.2f}{tokens / ms * 1000:12.0f}")

        if not args.steps_only:
            method_and_record_costs(args, corpus, tmp, len(levels))

        flops, peak = flops_per_token(model_config(args, corpus)), peak_tflops(args)
        on_cuda = device_type(args.device) == 'cuda'
        device_name = torch.cuda.get_device_name(args.device) if on_cuda else args.device
        print(f"\n6. model FLOPs of the training step: {flops / 1e6:.2f} MFLOP per token "
              f"(the recording's work not counted), {args.dtype} on {device_name}; "
              + (f"MFU against a peak of {peak:.4g} TFLOP/s" if peak
                 else "no peak known for this device (--peak_tflops), no MFU"))
        # on the CPU, an MFU analogue against this machine's measured fp32 matmul throughput
        matmul_peak = matmul_tflops(matmuls) if on_cpu else None
        if matmul_peak:
            print(f"   an MFU analogue: achieved model FLOP/s / measured matmul FLOP/s (fp32 {MATMUL_N} x "
                  f"{MATMUL_N} @ {MATMUL_N} x {MATMUL_N}, median of {len(matmuls)}, timed in the rounds: "
                  f"{matmul_peak:.3f} TFLOP/s)")
        for variant in variants:
            if median_ms[variant] is None:
                print(f"   {labels[variant]:50s}  n/a (no timed step, see section 1)")
                continue
            tflops, utilisation = mfu(flops, tokens, median_ms[variant], peak)
            print(f"   {labels[variant]:50s}{tflops:10.3f} TFLOP/s"
                  + (f"   MFU {100 * utilisation:5.1f}%" if peak else "")
                  + (f"   {100 * tflops / matmul_peak:5.1f}% of matmul" if matmul_peak else ""))


if __name__ == '__main__':
    main()
