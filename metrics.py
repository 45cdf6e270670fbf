"""
The measurements of both results, one function per quantity, in this notation:

    token i (one next-token prediction), target y_i, h_i the output-layer hidden state (after the
    final LayerNorm), U the (V, d) LM-head matrix, z_i = U h_i the logits, p_i = softmax(z_i),
    l_i = -log p_i[y_i] the token's loss, theta the parameters, g_i = d l_i / d theta.

1. destructive interference D and magnitude M of any numbers (loss changes, gradients)
2. the output-layer decomposition per token: attractive grad+ and repulsive grad- in z and h
3. the same decomposition in parameter space, over a batch (gradient dissent)
4. gradient opposition between tokens, per parameter coordinate: the definition (one backward
   per token), and two fast paths that give the same sums (cheap for position-local layers,
   exact for all parameters by one backward per position, batched over the sequences)
5. the first-order predicted per-token loss change along the real update (one JVP)
6. saturation companions: frequency buckets, Zipf fit, onsets of a loss curve, dissent ratio,
   LM-head spectrum, anisotropy of h

Everything takes and returns torch tensors (scalars as 0-dim tensors: float(x) for JSON; the
small per-batch summaries of theta_decomposition and opposition_summary come back on the CPU,
ready for numpy records). Callers choose the dtype (fp32 in training, float64 in the tests,
which check every function against brute-force autograd). A cosine with a zero vector is NaN
(see `cosine`).
"""

import contextlib

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from model import per_token_loss

NEAR_TOTAL = 0.99  # D_j above this: near-total opposition (opposition_summary's 'near_total')

# -----------------------------------------------------------------------------
# 1. destructive interference


def interference_from_sums(total, total_abs):
    """D = 1 - |sum_i x_i| / sum_i |x_i|, from the two sums (total, total_abs). In [0, 1]:
    1 = complete cancellation, 0 = all x_i of one sign. NaN where every x_i is 0 (undefined)."""
    return 1 - total.abs() / total_abs


def destructive_interference(x, dim=-1):
    """D(x) = 1 - |sum_i x_i| / sum_i |x_i| over `dim` (the formula: `interference_from_sums`)."""
    return interference_from_sums(x.sum(dim), x.abs().sum(dim))


def interference_magnitude(x, dim=-1):
    """M(x) = mean_i |x_i|. With D: |mean_i x_i| = (1 - D) M, so a mean loss improvement is
    bounded by (1 - D) M however large the individual changes are."""
    return x.abs().mean(dim)


def sign_flip_null(x, dim=-1, generator=None, draws=64):
    """The sign-flip null of D(x): the mean, over `draws` independent draws, of D of the same
    magnitudes |x_i| with random signs, the value D takes at this N when the signs carry no
    structure (1 - D ~ 1/sqrt(N)). Compare a measured D with it, never with 1. A mean of draws,
    not one draw, because one draw wanders: its standard error is the spread of the draws divided by
    sqrt(draws) (tests/test_metrics.py measures it). `generator`: a CPU torch.Generator, for a
    reproducible null."""
    dim = dim % x.dim()  # the draws come first
    signs = torch.randint(0, 2, (draws,) + x.shape, generator=generator).to(device=x.device, dtype=x.dtype)
    return destructive_interference(x.abs() * (2 * signs - 1), dim + 1).mean(0)


def expected_null_interference(sum_abs, sum_sq):
    """E[D] under random signs from two sums of the magnitudes, sum_i |x_i| and sum_i x_i^2:

        D_null = 1 - sqrt(2 / pi) sqrt(sum_i x_i^2) / sum_i |x_i|

    (by the central limit theorem sum_i s_i |x_i| with random signs s_i = +-1 is about normal with
    variance sum_i x_i^2, and E|normal| = sqrt(2 / pi) sd). Exact as N grows; off for a few numbers
    (one: 0.20 instead of 0; two equal ones: 0.44 instead of 0.5) or when a few |x_i| dominate.
    Clamped to [0, 1]. Used for the per-coordinate null of D_j, where only the sums over tokens
    exist, never the per-token values; sign_flip_null draws it where they do."""
    return (1 - (2 / torch.pi) ** 0.5 * sum_sq.sqrt() / sum_abs).clamp(0, 1)


# -----------------------------------------------------------------------------
# 2. output-layer decomposition, per token


def grad_z_plus(p, y):
    """Attractive part of dl/dz: grad_z+ = -(1 - p_y) e_y, raises the true logit only. (N, V)"""
    return torch.zeros_like(p).scatter_(1, y[:, None], -(1 - p.gather(1, y[:, None])))


def grad_z_minus(p, y):
    """Repulsive part of dl/dz: grad_z- = p with p_y set to 0, lowers each false logit in
    proportion to its probability. grad_z+ + grad_z- = p - e_y = dl/dz. (N, V)"""
    return p.scatter(1, y[:, None], 0.0)


def cosine(a, b):
    """cos(a, b) = <a, b> / (|a| |b|) along the last dimension. NaN where a vector is zero: it has
    no direction, and a 0 would read as "orthogonal" and bias averages (e.g. grad_h+ = 0 when
    p_y rounds to 1 in fp32). Average with torch.nanmean."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def output_decomposition(h, U, y, probs=None):
    """Per token, with h (N, d), U (V, d), y (N,), p = softmax(U h):

        grad_h+ = -(1 - p_y) U_y,   grad_h- = U^T p - p_y U_y,   grad_h+ + grad_h- = dl/dh

    Returns a dict of (N,) tensors: p_y; the shared 2D basis cos(h, grad_h+) (= -cos(h, U_y)) and
    cos(h, grad_h-); dissent cos(grad_h+, grad_h-); and |grad_h+|, |grad_h-|, |dl/dh| (norm_grad).
    grad_h- = p @ U - p_y U_y, so no per-token V x d tensor is ever formed. Cosines: see `cosine`.
    probs: p (N, V) if the caller has it already (the probe pass takes it from the log-softmax of its
    losses, fp32_probe_forward); else p = softmax(h U^T) is computed here."""
    p = torch.softmax(h @ U.T, dim=-1) if probs is None else probs  # (N, V)
    p_y = p.gather(1, y[:, None]).squeeze(1)  # (N,)
    U_y = U[y]  # (N, d)
    g_plus = -(1 - p_y)[:, None] * U_y  # (N, d)
    g_minus = p @ U - p_y[:, None] * U_y  # (N, d)
    return dict(p_y=p_y, cos_h_plus=cosine(h, g_plus), cos_h_minus=cosine(h, g_minus),
                cos_plus_minus=cosine(g_plus, g_minus), norm_plus=g_plus.norm(dim=-1),
                norm_minus=g_minus.norm(dim=-1), norm_grad=(g_plus + g_minus).norm(dim=-1))


# -----------------------------------------------------------------------------
# 3. parameter-space decomposition over a batch (gradient dissent)


def theta_decomposition(logits, targets, params, grads=None, average=None, h=None, head=None, losses=None):
    """grad_theta+ = (dz/dtheta)^T grad_z+ and grad_theta- = grad_theta - grad_theta+ (linearity),
    for the MEAN loss over the batch's N = B*T tokens (each seed is divided by N, as in training):

        grad_theta± = (1/N) sum_i (dz_i/dtheta)^T grad_z±_i

    logits (B, T, V) must still hold its autograd graph (kept: retain_graph=True); targets (B, T);
    params: dict name -> parameter; grads: dict name -> gradient of the mean loss of THIS batch if
    the caller has it (p.grad after the training backward, before clipping, one micro-batch),
    else computed here by a second backward. average: optional function averaging a tensor over
    data-parallel processes in place, applied to the gradients computed here so that they match
    p.grad, which DDP has already averaged (the global mean loss, given equal tokens per process).
    h, head (optional, together): the LM head's input h (B, T, d), still in the graph, and the name in
    params of its matrix U (logits = h U^T). grad_z+ has one nonzero per token, -(1 - p_y) at y, so
    then no backward runs through the head (V x d per token): its part is a row scatter and only
    the parameters below h need a backward, from h (the same sums, up to rounding):

        grad_U+ = (1/N) sum_i -(1 - p_yi) e_yi h_i^T,   grad_h+_i = -(1 - p_yi) U_yi / N

    losses (optional, with h and grads): the per-token losses l_i of these logits (per_token_loss):
    then p_y = exp(-l_i) and no softmax over the vocabulary is needed at all.
    Returns, per parameter name and for 'model' (all parameters as one vector), a dict of 0-dim
    CPU tensors (one device sync): cos(grad+, grad-), |grad+|, |grad-|, |grad|. Per token, grad_U+
    and grad_U- sit in different rows of U, so the opposition measured here is batch-level."""
    B, T, V = logits.shape
    N, y = targets.numel(), targets.reshape(-1)
    dtype = torch.promote_types(logits.dtype, torch.float32)  # softmax in at least fp32, as the loss
    with torch.no_grad():
        if h is None or grads is None or losses is None:
            p = torch.softmax(logits.detach().reshape(N, V).to(dtype), -1)  # (N, V)
            p_y = p.gather(1, y[:, None])  # (N, 1)
        else:
            p_y = torch.exp(-losses.detach().reshape(N, 1).to(dtype))  # l_i = -log p_y
    names, tensors = list(params), list(params.values())
    if h is None:  # a backward from the logits, seeded with grad_z+ / N
        seed_plus = (grad_z_plus(p, y) / N).view(B, T, V).to(logits.dtype)  # (B, T, V)
        plus = dict(zip(names, torch.autograd.grad(logits, tensors, seed_plus, retain_graph=True)))
    else:  # a row scatter for U, a backward from h for the rest
        with torch.no_grad():
            U, h_rows = params[head].detach(), h.detach().reshape(N, -1).to(dtype)  # (V, d), (N, d)
            attract = (-(1 - p_y) / N).to(dtype)  # (N, 1): grad_z+_i at y_i, / N
            seed_h = (attract * U[y].to(dtype)).view(h.shape).to(h.dtype)  # grad_h+ (B, T, d)
            head_plus = torch.zeros(U.shape, dtype=dtype, device=U.device).index_add_(0, y, attract * h_rows)
        below = torch.autograd.grad(h, tensors, seed_h, retain_graph=True, allow_unused=True)  # U: tied only
        plus = {name: torch.zeros_like(params[name]) if g is None else g for name, g in zip(names, below)}
        plus[head] = plus[head] + head_plus.to(plus[head].dtype)
    if grads is None:
        seed = ((p - F.one_hot(y, V).to(p.dtype)) / N).view(B, T, V).to(logits.dtype)  # dl/dz / N
        grads = dict(zip(names, torch.autograd.grad(logits, tensors, seed, retain_graph=True)))
        for g in grads.values() if average is not None else []:
            average(g)
    for g in plus.values() if average is not None else []:
        average(g)
    # per tensor the dot products <grad+, grad->, <grad+, grad+>, <grad-, grad->, <grad, grad>; 'model'
    # adds them up over the tensors in float64, so no all-parameter vector is formed and no fp32
    # reduction runs over a million coordinates. sum(a * b) is a pairwise sum: fp32 norm() and dot()
    # were off by 1e-6 to 1e-4 at 1e5 to 1e6 coordinates on a CPU (results/bench.md)
    dots = []
    for name in names:
        g_plus, g = plus[name].flatten(), grads[name].flatten().to(plus[name].dtype)
        g_minus = g - g_plus
        dots.append(torch.stack([(g_plus * g_minus).sum(), (g_plus * g_plus).sum(), (g_minus * g_minus).sum(),
                                 (g * g).sum()]))
    dots = torch.stack(dots).double().cpu()  # (n_names, 4), one device sync
    dots = torch.cat([dots, dots.sum(0, keepdim=True)])  # (n_names + 1, 4): row 'model'
    norms = dots[:, 1:].sqrt()  # |grad+|, |grad-|, |grad|
    cos = dots[:, 0] / (norms[:, 0] * norms[:, 1])  # NaN where a part is zero, as `cosine`
    keys = ['cos', 'norm_plus', 'norm_minus', 'norm_grad']
    return {n: dict(zip(keys, row)) for n, row in zip(names + ['model'], torch.column_stack([cos, norms]))}


# -----------------------------------------------------------------------------
# 4. gradient opposition between tokens, per parameter coordinate
#
# Tokens are the examples: g_i = d l_i / d theta is the gradient of token i's OWN loss (not of
# the batch mean, which would scale every g_i by 1/N; D_j is scale-free, sums are not).
# The sums below are (sum_i g_ij, sum_i |g_ij|, sum_i g_ij^2) per coordinate j, each with the
# parameter's shape: D_j needs the first two, its null (expected_null_interference) the last two.


def per_token_gradient_sums_looped(model, idx, targets, names=None, n_tokens=None):
    """param name -> (sum_i g_i, sum_i |g_i|, sum_i g_i^2), g_i = d l_i / d theta, for the N tokens of
    idx (B, T) against targets (B, T): the definition, one ordinary backward per token (autograd.grad of
    l_i alone, l = per_token_loss of model(idx)). Slow: N backward passes, each through the graph of
    the whole forward of idx. (The published method runs one backward per position, for the tokens of
    all sequences at that position at once: bench.published_gradient_sums.)
    names: the parameter names to sum (e.g. the position-local ones), in their order; by default
    all of model.named_parameters() (a tied matrix once, its g_i including both of its uses).
    n_tokens: sum over the first n_tokens tokens of idx only (row-major, as idx.flatten()), e.g.
    to time a subset of a batch; the forward is still of all of idx. All N by default.

    The fast paths give the same sums: per_token_gradient_sums (batched backward passes, every
    parameter) and position_local_gradient_sums (|G|^T |X| for the position-local layers), up to
    rounding, with one exception: per_token_gradient_sums sets the attention key biases
    (c_attn.bias[d:2d]) to exact 0, their true gradient, where this loop gives rounding noise.
    The reference the tests and bench.py check both fast paths against."""
    params = dict(model.named_parameters())
    params = {name: params[name] for name in (params if names is None else names)}
    losses = per_token_loss(model(idx)[0], targets).flatten()[:n_tokens]  # (N,): l_i
    sums = {name: tuple(torch.zeros_like(p) for _ in range(3)) for name, p in params.items()}
    for loss in losses:  # one backward per token
        grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True)
        for (total, total_abs, total_sq), g in zip(sums.values(), grads):
            total.add_(g)
            total_abs.add_(g.abs())
            total_sq.add_(g.pow(2))
    return sums


def position_local_modules(model):
    """name -> module for the layers whose per-token gradient is outer(g_s, x_s) of one position s:
    their parameters act on each position separately AND the output at s reaches only l_s.

    - lm_head (U): z_s = U h_s feeds l_s only (left out when tied: U is then also the token
      embedding, whose output is mixed across positions by every attention layer);
    - transformer.ln_f: h_s = ln_f(x_s), per position, then only z_s;
    - last block's ln_2, mlp.c_fc, mlp.c_proj: the MLP branch works per position and writes into
      position s of the residual stream, after which only ln_f and the head follow;
    - last block's attn.c_proj: its input y_s is already mixed across positions, but c_proj maps
      y_s to position s only, and nothing after it mixes positions again.
    NOT local: the last block's attn.c_attn (keys and values at s feed the attention of every
    later position, so l_i depends on it through all s <= i), ln_1, and everything earlier."""
    last, prefix = model.transformer.h[-1], f"transformer.h.{len(model.transformer.h) - 1}"
    modules = {} if model.config.tie_weights else {'lm_head': model.lm_head}
    modules.update({'transformer.ln_f': model.transformer.ln_f, f"{prefix}.ln_2": last.ln_2,
                    f"{prefix}.attn.c_proj": last.attn.c_proj, f"{prefix}.mlp.c_fc": last.mlp.c_fc,
                    f"{prefix}.mlp.c_proj": last.mlp.c_proj})
    return modules


@contextlib.contextmanager
def capture_activations(modules):
    """Yields dict name -> [X, G]: each module's input X (recorded by a forward hook during the
    caller's forward) and its output gradient G (recorded by a tensor hook on the output during
    the FIRST backward through it; later passes over the same graph, such as those of
    theta_decomposition, are ignored). The backward may run inside or after the with block.
    Forward hooks are removed on exit. Run one forward (not several micro-batches) inside."""
    acts, handles = {}, []

    def make_hook(name):
        def save_grad(G):
            if acts[name][1] is None:
                acts[name][1] = G.detach()

        def forward_hook(module, inputs, output):
            acts[name] = [inputs[0].detach(), None]
            if output.requires_grad:
                output.register_hook(save_grad)
        return forward_hook
    for name, module in modules.items():
        handles.append(module.register_forward_hook(make_hook(name)))
    try:
        yield acts
    finally:
        for handle in handles:
            handle.remove()


def position_local_gradient_sums(modules, acts, n_tokens, grads=None):
    """param name -> (sum_s g_s, sum_s |g_s|, sum_s g_s^2), g_s = d l_s / d theta, exact, from the X and
    G of one ordinary backward of the MEAN loss over n_tokens: G = (1/n_tokens) dl_s/dout, so the sums are
    multiplied by n_tokens (the squares by n_tokens^2) here, after the matmuls: the smaller tensors
    (if the caller's loss has another scale, pass N / that scale; n_tokens > 0).
    Linear with inputs X (N, in), output gradients G (N, out): g_s = outer(G_s, X_s), so
        sum_s g_s = G^T X,   sum_s |g_s| = |G|^T |X|,   sum_s g_s^2 = (G^2)^T (X^2)
    (one matmul each); bias: sum G, sum |G|, sum G^2.
    LayerNorm with normalised input xhat_s: weight g_s = G_s * xhat_s, bias g_s = G_s.
    grads (optional): param name -> the gradient of that same loss, which its backward computed anyway
    (p.grad): sum_s g_s is n_tokens times it, so only |G|^T |X| and (G^2)^T (X^2) need a matmul.
    For these layers the sums equal those of the definition, per_token_gradient_sums_looped (one
    backward per token), up to rounding, at the cost of one matmul per tensor and sum."""
    sums, signed = {}, grads is None  # signed: sum_s g_s by a matmul too
    for name, module in modules.items():
        X, G = acts[name]
        assert G is not None, f"no output gradient recorded for {name}: run a backward first"
        dtype = torch.promote_types(X.dtype, torch.float32)  # bf16 activations summed in fp32
        X = X.reshape(-1, X.shape[-1]).to(dtype)  # (N, in)
        G = G.reshape(-1, G.shape[-1]).to(dtype)  # (N, out), n_tokens G = the gradients of l_s
        if isinstance(module, nn.Linear):
            G_abs = G.abs()  # (N, out); squared in place below, once |G|^T |X| is taken: |G|^2 = G^2
            total_abs = G_abs.T @ X.abs()
            sums[name + '.weight'] = (G.T @ X if signed else None, total_abs,
                                      G_abs.mul_(G_abs).T @ X.pow(2))  # (out, in) each
        else:
            assert isinstance(module, nn.LayerNorm), f"{name}: only Linear and LayerNorm are local"
            G_xhat = G * F.layer_norm(X, module.normalized_shape, eps=module.eps)  # (N, d)
            sums[name + '.weight'] = (G_xhat.sum(0) if signed else None, G_xhat.abs().sum(0),
                                      G_xhat.pow(2).sum(0))
        if module.bias is not None:
            sums[name + '.bias'] = (G.sum(0) if signed else None, G.abs().sum(0), G.pow(2).sum(0))
    for key, (total, total_abs, total_sq) in sums.items():
        total = total if signed else grads[key].to(total_abs.dtype, copy=True)  # sum_s g_s / n_tokens
        sums[key] = (total.mul_(n_tokens), total_abs.mul_(n_tokens), total_sq.mul_(n_tokens ** 2))
    return sums


@contextlib.contextmanager
def module_inputs_outputs(modules):
    """Yields dict name -> (input, output) of each module's forward inside the block (its last one),
    both still in the autograd graph (module forward hooks, removed on exit)."""
    io, handles = {}, []
    for name, module in modules.items():
        handles.append(module.register_forward_hook(
            lambda module, inputs, output, name=name: io.__setitem__(name, (inputs[0], output))))
    try:
        yield io
    finally:
        for handle in handles:
            handle.remove()


def layer_input(module, X):
    """What a Linear or LayerNorm's weight gradient multiplies: its input X, or for a LayerNorm the
    normalised input xhat. (..., in) -> (..., in), outside the autograd graph."""
    X = X.detach()
    return X if isinstance(module, nn.Linear) else F.layer_norm(X, module.normalized_shape, eps=module.eps)


def token_gradients(module, X, G):
    """Per-token gradients of a Linear or LayerNorm whose token k has output gradients G_k at the
    positions s of its sequence, and X_k its inputs (layer_input) there: (K, S, out), (K, S, in) ->
    name suffix -> (K, *shape), with
        Linear:    weight g_k = sum_s outer(G_ks, X_ks) = G_k^T X_k,   bias g_k = sum_s G_ks
        LayerNorm: weight g_k = sum_s G_ks * xhat_ks,                  bias g_k = sum_s G_ks"""
    weight = G.transpose(1, 2) @ X if isinstance(module, nn.Linear) else (G * X).sum(1)
    return {'.weight': weight} | ({'.bias': G.sum(1)} if module.bias is not None else {})


def position_local_dots(modules, acts, delta, n_tokens):
    """param name -> (N,) <g_s, delta> for every token s, for the position-local layers, from the X and G
    of position_local_gradient_sums (same arguments, delta: name -> tensor shaped like each parameter),
    without forming g_s = outer(G_s, X_s):
        Linear: G_s . (delta_W X_s),   LayerNorm: G_s . (delta_w * xhat_s),   bias: G_s . delta_b"""
    dots = {}
    for name, module in modules.items():
        X, G = acts[name]
        X, G = layer_input(module, X.reshape(-1, X.shape[-1])), G.reshape(-1, G.shape[-1])  # (N, in/out)
        d_weight = delta[name + '.weight']
        moved = X @ d_weight.T if isinstance(module, nn.Linear) else X * d_weight  # (N, out)
        dots[name + '.weight'] = n_tokens * (G * moved).sum(-1)
        if module.bias is not None:
            dots[name + '.bias'] = n_tokens * (G @ delta[name + '.bias'])
    return dots


def add_abs_sums(sums, g):
    """Add a batch of per-token gradients g (K, *shape) to sums = (., sum |g|, sum g^2), in place (g too)."""
    sums[1].add_(g.abs_().sum(0))
    sums[2].add_(g.square_().sum(0))


def sequence_rows(idx):
    """The token-embedding rows each sequence uses: ids (B, R), the distinct token ids of sequence n
    in ids[n, :R_n] (R = max_n R_n; the rest 0, rows that get no gradient), and slot (B, T), the place
    of idx[n, s] in the flat (B * R) list of them: ids.flatten()[slot[n, s]] = idx[n, s]."""
    found = [torch.unique(row, return_inverse=True) for row in idx]
    R = max(len(u) for u, _ in found)
    ids = torch.zeros(len(found), R, dtype=idx.dtype, device=idx.device)
    for n, (u, _) in enumerate(found):
        ids[n, :len(u)] = u
    return ids, torch.stack([where + n * R for n, (_, where) in enumerate(found)])


def per_token_gradient_sums(model, idx, targets, chunk_size=16, delta=None):
    """param name -> (sum_i g_i, sum_i |g_i|, sum_i g_i^2) for EVERY parameter, g_i = d l_i / d theta,
    exact, for the N tokens of idx (B, T). Names as model.named_parameters() gives them (a tied head /
    embedding matrix once, its g_i including both of its uses). No per-token tensor of the vocabulary's
    size V x d is ever formed:

    - sum_i g_i of every parameter is the gradient of sum_i l_i: one ordinary backward of the batch;
    - the position-local layers (position_local_modules: the LM head unless tied, ln_f, the last
      block's ln_2, attn.c_proj and MLP): g_i = outer(G_i, X_i) at token i's position only, so
      |G|^T |X| and (G^2)^T (X^2) from the same backward (position_local_gradient_sums);
    - every other parameter acts on l_i only through r_i, the residual stream at token i's position
      after the last block's attention (the input of its ln_2): one backward per position s, batched
      over the B sequences, from r at position s with cotangent dl_s/dr_s (from the first backward,
      zero elsewhere), on the causal prefix: l_s depends on positions 0..s of its own sequence only,
      so the forward runs on the first b positions of the sequences, for each chunk of chunk_size
      positions ending at b, and serves the backward passes of its positions. Each backward gives
      every Linear and LayerNorm its output gradients G at positions 0..s, per sequence; their
      per-token weight gradients are G^T X (token_gradients), one batched matmul;
    - the token embedding: g_i is nonzero only in the rows of the token ids of i's sequence, row r
      the sum over the positions t holding r of dl_i/de_t (e the embedding output, from the same
      backward); the position embedding: row t is dl_i/de_t. With tying the head part
      outer(dl_i/dz_i, h_i) adds to every row: the rows of i's sequence get both parts before the
      absolute value, the others the head part only (position-local, as the LM head's).

    On a 2-core CPU (2 threads, freed memory kept: train.keep_freed_memory), 4L/128d, 16 sequences of
    128 tokens: 3.7 s and 398 GFLOP, against 9.3 s and 1039 GFLOP for a port of the published method
    (bench.py: one backward per position of the whole batch, through the LM head too, each sequence's
    gradient of every parameter formed at every position). An earlier form of this function (one
    sequence at a time, 16 positions per backward by autograd's is_grads_batched) was slower: its vmap
    has no batching rules for the CPU attention and LayerNorm backward, and loops.

    The attention KEY biases (c_attn.bias[d:2d]) get exact zeros: their true gradient is 0, since
    q_s . (k_j + b) shifts every score of query s by the same q_s . b and softmax ignores shifts;
    the computed one is rounding noise, and its D_j would be noise too (it moved the fp32 mean D
    of a c_attn.bias by up to 3% from the float64 value).

    Apart from those key biases, the sums equal those of the definition,
    per_token_gradient_sums_looped (one plain backward per token), up to rounding.

    delta (optional): dict name -> tensor shaped like each parameter, e.g. the update theta_{t+1} -
    theta_t. Then the return value is (sums, dots), dots: name -> (N,) tensor, the per-token dot
    product <g_i, delta> restricted to that parameter, tokens in row-major order of idx (their sum
    over the parameters is the first-order change predicted_loss_change computes). The update-
    weighted terms need them (update_weighted_terms): from the per-token gradients where they are
    formed, and for the position-local layers from their G and X (position_local_dots)."""
    params = dict(model.named_parameters())
    wte, head, last = model.transformer.wte, model.lm_head, model.transformer.h[-1]
    tied = wte.weight is head.weight
    local = position_local_modules(model)
    inner = {name: module for name, module in model.transformer.h.named_modules(prefix='transformer.h')
             if isinstance(module, (nn.Linear, nn.LayerNorm)) and name not in local}  # the per-position ones
    B, T = idx.shape
    # the whole batch: one forward, one backward of sum_i l_i
    with capture_activations(local) as acts, module_inputs_outputs({'r': last.ln_2}) as io:
        h = model.hidden(idx)  # (B, T, d)
        logits = head(h)  # (B, T, V)
    g_r, g_z, *total = torch.autograd.grad(per_token_loss(logits, targets).sum(),
                                           [io['r'][0], logits] + list(params.values()))
    total = dict(zip(params, total))  # sum_i g_i
    local_sums = position_local_gradient_sums(local, acts, 1, grads=total)
    sums = {name: local_sums.get(name, (total[name], torch.zeros_like(p), torch.zeros_like(p)))
            for name, p in params.items()}
    if tied:  # the head part of every row, per token; the rows of each token's sequence corrected below
        head_part = position_local_gradient_sums({'head': head}, {'head': [h.detach(), g_z]}, 1)
        sums['transformer.wte.weight'] = (total['transformer.wte.weight'],) + head_part['head.weight'][1:]
    if delta is not None:
        delta = key_bias_zeroed(model, delta)  # the key biases: no per-token gradient (see above)
        dots = {name: torch.zeros(B * T, dtype=h.dtype, device=h.device) for name in params}
        dots.update(position_local_dots(local, acts, delta, 1))
    ids, slot = sequence_rows(idx)  # (B, R), (B, T)
    R = ids.shape[1]
    if delta is not None:
        delta_rows = delta['transformer.wte.weight'][ids]  # (B, R, d): the update of each sequence's rows
        if tied:  # the head part: <outer(dl_i/dz_i, h_i), delta_U> = dl_i/dz_i . (delta_U h_i)
            moved = h.detach() @ delta['transformer.wte.weight'].T  # (B, T, V)
            dots['transformer.wte.weight'] += (g_z * moved).sum(-1).flatten()
    wte_sums, wpe_sums = sums['transformer.wte.weight'], sums['transformer.wpe.weight']
    for a in range(0, T, chunk_size):
        b = min(a + chunk_size, T)
        with module_inputs_outputs(dict(inner, r=last.ln_2, wte=wte)) as io:
            model.hidden(idx[:, :b])  # the causal prefix of positions a..b-1
        outputs = [io[name][1] for name in inner] + [io['wte'][1]]
        X = {name: layer_input(module, io[name][0]) for name, module in inner.items()}  # (B, b, in)
        cotangent = torch.zeros_like(io['r'][0])  # (B, b, d)
        for s in range(a, b):  # one backward per position, batched over the sequences
            cotangent.zero_()
            cotangent[:, s] = g_r[:, s]  # token (n, s): dl/dr at its own position
            *grads, g_e = torch.autograd.grad(io['r'][0], outputs, cotangent, retain_graph=True)
            tokens = torch.arange(B, device=idx.device) * T + s  # row-major, as idx.flatten()
            for (name, module), G in zip(inner.items(), grads):
                G, X_s = G[:, :s + 1], X[name][:, :s + 1]  # (B, s+1, out), (B, s+1, in): positions 0..s
                for suffix, g in token_gradients(module, X_s, G).items():
                    if delta is not None:
                        dots[name + suffix][tokens] = g.flatten(1) @ delta[name + suffix].flatten()
                    add_abs_sums(sums[name + suffix], g)
            g_e = g_e[:, :s + 1]  # (B, s+1, d): dl/de_t at positions t = 0..s
            rows = torch.zeros(B * R, g_e.shape[-1], dtype=g_e.dtype, device=g_e.device).index_add_(
                0, slot[:, :s + 1].flatten(), g_e.flatten(0, 1))  # (B * R, d): the rows of each sequence
            if delta is not None:
                dots['transformer.wte.weight'][tokens] += (rows.view(B, R, -1) * delta_rows).sum((1, 2))
                delta_wpe = delta['transformer.wpe.weight'][:s + 1]  # (s+1, d)
                dots['transformer.wpe.weight'][tokens] = (g_e * delta_wpe).sum((1, 2))
            add_abs_sums((None, wpe_sums[1][:s + 1], wpe_sums[2][:s + 1]), g_e)  # row t: dl_i/de_t
            if tied:  # rows of the sequence: |embedding part + head part| replaces |head part|
                u = g_z[:, s].gather(1, ids)[:, :, None] * h.detach()[:, s, None, :]  # (B, R, d): dl/dz_r h
                u = u.flatten(0, 1)
                rows += u
                wte_sums[1].index_add_(0, ids.flatten(), rows.abs() - u.abs())
                wte_sums[2].index_add_(0, ids.flatten(), rows.pow(2) - u.pow(2))
            else:
                wte_sums[1].index_add_(0, ids.flatten(), rows.abs_())
                wte_sums[2].index_add_(0, ids.flatten(), rows.square_())
    d = model.config.n_embd
    for i, block in enumerate(model.transformer.h):
        if block.attn.c_attn.bias is not None:
            for part in sums[f"transformer.h.{i}.attn.c_attn.bias"]:
                part[d:2 * d] = 0  # the key bias: no coordinate of D (see above)
    return sums if delta is None else (sums, dots)


def key_bias_zeroed(model, delta):
    """delta with the attention key biases (c_attn.bias[d:2d]) set to 0: their per-token gradient is
    exactly 0 (see per_token_gradient_sums), so no update-weighted term counts them."""
    delta, d = dict(delta), model.config.n_embd
    for i, block in enumerate(model.transformer.h):
        name = f"transformer.h.{i}.attn.c_attn.bias"
        if block.attn.c_attn.bias is not None:
            delta[name] = delta[name].clone()
            delta[name][d:2 * d] = 0
    return delta


def coordinate_opposition(sum_g, sum_abs_g, *_):
    """D_j = 1 - |sum_i g_ij| / sum_i |g_ij| for every coordinate j of one or more tensors, as a
    flat (n,) tensor over the coordinates with sum_i |g_ij| > 0 only (D is undefined where no token
    moves the coordinate, e.g. the embedding rows of tokens absent from the batch), so NaN-free.
    (A third argument, the sum of squares of a sums triple, is ignored: coordinate_opposition(*sums).)"""
    return interference_from_sums(*used_coordinates(sum_g.flatten(), sum_abs_g.flatten()))  # (n,)


def used_coordinates(sum_g, sum_abs_g, *rest):
    """The flat sums (n,) cut to the coordinates with sum_i |g_ij| > 0 (those some token moves).
    Boolean indexing copies, and costs more than the opposition itself; most tensors have every
    coordinate used (each row of U gets p_v > 0 from every token), so they are returned as they are."""
    used = sum_abs_g > 0
    if bool(used.all()):
        return (sum_g, sum_abs_g) + rest
    return tuple(t[used] for t in (sum_g, sum_abs_g) + rest)


def opposition_group(name):
    """The layer of a parameter: 'h.3' for 'transformer.h.3.*', 'embeddings' (wte, wpe; with
    tying also the head), 'ln_f', 'lm_head'."""
    parts = name.split('.')
    if parts[:2] == ['transformer', 'h']:
        return 'h.' + parts[2]
    if parts[:2] in (['transformer', 'wte'], ['transformer', 'wpe']):
        return 'embeddings'
    return parts[-2]  # 'transformer.ln_f.weight' -> 'ln_f', 'lm_head.weight' -> 'lm_head'


def is_block_matrix(name):
    """Is the parameter one of a Transformer block's weight matrices: the attention input and output
    projections (attn.c_attn, attn.c_proj) or the MLP's (mlp.c_fc, mlp.c_proj)? The published
    headline of gradient opposition averages D_j over these coordinates only (no embeddings, LM
    head, LayerNorms or biases): in small models the embeddings and the LM head hold most of the
    coordinates, and the head's D_j are far lower than the blocks'."""
    parts = name.split('.')
    return (parts[:2] == ['transformer', 'h'] and parts[-1] == 'weight'
            and '.'.join(parts[3:-1]) in ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj'))


def opposition_keys(names, total='model'):
    """The keys of opposition_summary for parameters `names`, in its order: the tensor names, then
    their layers (opposition_group, in order of first appearance), then 'blocks' (the Transformer
    blocks' weight matrices among them, see is_block_matrix; only if there are any), then `total`
    (every tensor of `names`: 'model' when they are all the parameters, 'local' for the
    position-local ones)."""
    groups = list(dict.fromkeys(opposition_group(name) for name in names))
    blocks = ['blocks'] if any(is_block_matrix(name) for name in names) else []
    return list(names) + groups + blocks + [total]


def opposition_members(names, total='model'):
    """key of opposition_keys(names, total) -> the parameter names it covers: a tensor itself, a
    layer its tensors, 'blocks' the blocks' weight matrices, `total` all of them."""
    members = {key: [] for key in opposition_keys(names, total)}
    for name in names:
        for key in (name, opposition_group(name), total) + (('blocks',) if is_block_matrix(name) else ()):
            members[key].append(name)
    return members


def scale_free_opposition(D, n_tokens):
    """sqrt(N) (1 - D): the distance of a D (or of a mean of D_j) from total opposition, scaled by the
    number of tokens N it was measured over. Under the null (random signs) 1 - D shrinks as 1 / sqrt(N)
    (expected_null_interference: 1 - D ~ sqrt(2/pi) sqrt(sum x^2) / sum |x|, which for N magnitudes of
    one distribution is sqrt(2/pi) sqrt(E x^2) / (E|x| sqrt(N))), so this form of the null is the same
    at every N, and D is compared with its null at N = 128 and at N = 16384 on one scale: a value
    below the null's is more opposition than chance, above it less. Any shapes that broadcast."""
    return (1 - D) * n_tokens ** 0.5


def opposition_summary(sums, bins=20, total='model'):
    """Gradient opposition D_j (see coordinate_opposition) summarised per parameter tensor (its
    name), per layer (see opposition_group), over the Transformer blocks' weight matrices
    ('blocks', see is_block_matrix) and over every tensor in `sums` (`total`); keys in the order
    of opposition_keys. Each entry, as CPU tensors:
    'mean': the exact mean of D_j over coordinates (never histogram midpoints);
    'weighted': the mean weighted by sum_i |g_ij|, = 1 - sum_j |sum_i g_ij| / sum_j sum_i |g_ij|;
    'hist': (bins,) counts of D_j in equal bins of [0, 1]; 'n': the number of coordinates counted;
    'null': the mean over the same coordinates of D_j's null, expected_null_interference of
    sum_i |g_ij| and sum_i g_ij^2: what the mean would be if the tokens' signs carried no structure;
    'near_total': the share of those coordinates with D_j > NEAR_TOTAL (0.99), near-total opposition."""
    per = {}  # each tensor once: sum of its D_j, their number, histogram, and the two weighted sums
    for name, (total_g, total_abs, total_sq) in sums.items():
        total_g, total_abs, total_sq = (t.flatten().double() for t in (total_g, total_abs, total_sq))
        abs_total, total_abs_sum = total_g.abs().sum(), total_abs.sum()  # unused coordinates add 0 to both
        total_g, total_abs, total_sq = used_coordinates(total_g, total_abs, total_sq)  # (n,) each
        D = interference_from_sums(total_g, total_abs)  # coordinate_opposition, on coordinates already cut
        null = expected_null_interference(total_abs, total_sq)
        # clamp: rounding can put D a hair outside [0, 1], where histc would silently drop it
        per[name] = dict(D_sum=D.sum(), null_sum=null.sum(), n=D.numel(),
                         hist=torch.histc(D.clamp(0, 1), bins=bins, min=0.0, max=1.0),
                         near_total=(D > NEAR_TOTAL).sum(), abs_total=abs_total, total_abs=total_abs_sum)
    out = {}
    for key, names in opposition_members(list(sums), total).items():  # the union of their coordinates
        parts = [per[name] for name in names]
        n = sum(p['n'] for p in parts)
        nan = torch.tensor(float('nan'), dtype=torch.float64)
        mean = sum(p['D_sum'] for p in parts) / n if n else nan
        null = sum(p['null_sum'] for p in parts) / n if n else nan
        weighted = interference_from_sums(sum(p['abs_total'] for p in parts),
                                          sum(p['total_abs'] for p in parts))
        near_total = sum(p['near_total'] for p in parts) / n if n else nan
        out[key] = dict(mean=mean.cpu(), weighted=weighted.cpu(), null=null.cpu(),
                        near_total=torch.as_tensor(near_total, dtype=torch.float64).cpu(),
                        hist=sum(p['hist'] for p in parts).long().cpu(), n=torch.tensor(n))
    return out


def update_weighted_terms(sums, delta, dots, total='model'):
    """The update-weighted interference terms of the published analysis, with p_ij = g_ij delta_j
    (token i's gradient times the update, coordinate j; its sum over j is token i's first-order
    loss change), for the N tokens of `sums` and `dots` (per_token_gradient_sums(..., delta=delta)):

        Cg      = sum_j |sum_i p_ij| / sum_j sum_i |p_ij|    tokens agree, per coordinate
        CuG     = |sum_j sum_i p_ij| / sum_j |sum_i p_ij|    coordinates agree, after summing tokens
        Cug     = sum_i |sum_j p_ij| / sum_j sum_i |p_ij|    coordinates agree, per token
        C_i_dli = |sum_i sum_j p_ij| / sum_i |sum_j p_ij|    tokens' predicted changes agree (1 - D)
        M_i_dli = sum_i |sum_j p_ij| / N                     mean size of a predicted change

    Each is cheap from sums the opposition computes anyway: sum_i p_ij = delta_j sum_i g_ij,
    sum_i |p_ij| = |delta_j| sum_i |g_ij|, and sum_j p_ij = dots (the per-token dot product with
    delta). A C near 1: agreement; near 0: cancellation. Keys as opposition_summary's (each tensor,
    layer, 'blocks', `total`), the sums over j running over that key's coordinates; CPU scalars."""
    out = {}
    for key, parts in opposition_members(list(sums), total).items():
        p_sum = torch.cat([(delta[n].double() * sums[n][0].double()).flatten() for n in parts])  # sum_i p_ij
        p_abs = sum((delta[n].double().abs() * sums[n][1].double()).sum() for n in parts)  # sum_ij |p_ij|
        q = sum(dots[n].double() for n in parts)  # (N,): sum_j p_ij over the key's coordinates
        out[key] = dict(Cg=(p_sum.abs().sum() / p_abs).cpu(),
                        CuG=(p_sum.sum().abs() / p_sum.abs().sum()).cpu(),
                        Cug=(q.abs().sum() / p_abs).cpu(), C_i_dli=(q.sum().abs() / q.abs().sum()).cpu(),
                        M_i_dli=q.abs().mean().cpu())
    return out


# -----------------------------------------------------------------------------
# 5. update-weighted interference: first-order prediction of each token's loss change


def predicted_loss_change(model, idx, targets, delta, params=None):
    """First-order predicted change of every token's loss along the update delta:

        Delta l_i ~ <grad l_i, delta> = sum_j p_ij,   p_ij = (grad l_i)_j delta_j,

    for all tokens at once from ONE forward-mode JVP. delta: dict name -> tensor, the real update
    theta_{t+1} - theta_t, keyed as model.named_parameters() (a tied matrix once, under
    'transformer.wte.weight': functional_call keeps it tied, so it takes both roles). params:
    optional dict name -> tensor, the point theta_t to expand around (e.g. a copy taken before
    optimizer.step()); by default the model's current parameters. Returns (B, T).
    The default CPU attention kernel (flash) has no forward-mode derivative, nor have the fused
    CUDA ones, so attention runs in the plain-math kernel here: the same function, exact JVP."""
    theta = dict(model.named_parameters()) if params is None else params
    names = [name for name, _ in model.named_parameters()]
    primals = tuple(theta[name].detach() for name in names)
    tangents = tuple(delta[name].to(p.dtype) for name, p in zip(names, primals))

    def losses(*params):
        return per_token_loss(functional_call(model, dict(zip(names, params)), (idx,))[0], targets)  # (B, T)
    with sdpa_kernel(SDPBackend.MATH):
        _, change = jvp(losses, primals, tangents)
    return change


def first_order_agreement(predicted, true):
    """How well the predicted per-token changes match the true ones (any shape, flattened):
    corr: Pearson correlation; r2 = 1 - sum (true - pred)^2 / sum (true - mean true)^2 (the
    prediction as is, not refitted); slope: least squares of true on pred through the origin,
    sum pred*true / sum pred^2; rel_err = ||true - pred|| / ||true|| (L2 norms over all tokens)."""
    pred, true = predicted.flatten().double(), true.flatten().double()
    resid = true - pred
    return dict(corr=torch.corrcoef(torch.stack([pred, true]))[0, 1],
                r2=1 - resid.pow(2).sum() / (true - true.mean()).pow(2).sum(),
                slope=(pred * true).sum() / pred.pow(2).sum(),
                rel_err=resid.norm() / true.norm())


# -----------------------------------------------------------------------------
# 6. saturation companions


def token_ranks(counts):
    """Rank of every token id in the unigram counts (V,): 0 = most frequent, ties by id. (V,) long"""
    rank = torch.empty(counts.numel(), dtype=torch.long)
    rank[torch.argsort(-counts.double().cpu(), stable=True)] = torch.arange(counts.numel())
    return rank


def frequency_buckets(counts, n_buckets=8):
    """Bucket of every token id by its rank in the training unigram counts (V,) (rank 0 = most
    frequent, ties by id), with log-spaced rank edges edges[k] = round((V + 1)^(k / n_buckets)) - 1:
    bucket k holds ranks edges[k] .. edges[k+1] - 1, so bucket 0 is the few most frequent tokens
    and the last one the long tail. A tiny vocabulary may give fewer buckets (equal edges merge):
    use len(edges) - 1. Returns (bucket (V,) long, edges (n+1,) long, from 0 to V)."""
    V = counts.numel()
    rank = token_ranks(counts)  # (V,)
    k = torch.arange(n_buckets + 1, dtype=torch.float64)
    edges = torch.unique(torch.round((V + 1.0) ** (k / n_buckets)).long() - 1)  # (n + 1,)
    return torch.searchsorted(edges, rank, right=True) - 1, edges


def unigram_entropy(counts):
    """H_1 = -sum_v q_v log q_v (nats), q_v = c_v / sum c the unigram distribution of the training counts
    (V,): the loss of a model that ignores the context and predicts every token by its frequency, the
    level a language model's loss falls below once it uses the context (0 log 0 = 0)."""
    q = counts.double() / counts.sum()
    return -(q[q > 0] * torch.log(q[q > 0])).sum()


def zipf_fit(counts, k=3.0):
    """Least-squares line log c = intercept + slope * log r over the tokens with count > 0, r the rank
    from 1 (token_ranks + 1). Returns slope, intercept; per token id (V,): rank (from 1), fitted (the
    line's count exp(intercept) r^slope) and residuals (log c - log fitted, NaN for unseen tokens);
    and outliers: the ids whose |residual| > k * std of the residuals (tokens far off the Zipf line)."""
    counts = counts.cpu()
    rank = token_ranks(counts) + 1  # (V,)
    seen = torch.argsort(rank)[:int((counts > 0).sum())]  # ids of the seen tokens, by rank
    log_r = torch.log(rank[seen].double())  # (n,)
    log_c = torch.log(counts[seen].double())  # (n,)
    A = torch.stack([torch.ones_like(log_r), log_r], 1)  # (n, 2)
    intercept, slope = torch.linalg.lstsq(A, log_c[:, None]).solution.flatten()
    fitted = torch.exp(intercept + slope * torch.log(rank.double()))  # (V,)
    residuals = torch.full((counts.numel(),), float('nan'), dtype=torch.float64)  # (V,)
    residuals[seen] = log_c - torch.log(fitted[seen])
    outliers = seen[residuals[seen].abs() > k * residuals[seen].std()]
    return dict(slope=slope, intercept=intercept, rank=rank, fitted=fitted, residuals=residuals,
                outliers=outliers)


def bucket_mean(values, targets, bucket_of_token, n_buckets):
    """(..., n_buckets) mean of a per-token quantity (a loss, a cosine, ...) over the tokens whose
    TARGET lies in each frequency bucket. values has the shape of targets, optionally after leading
    dimensions (e.g. steps: values (S, B, T) with targets (B, T)). NaN values (a cosine with a zero
    vector, a row not yet recorded) are left out of the mean; NaN for a bucket with none left."""
    assert values.shape[values.dim() - targets.dim():] == targets.shape, "values must end with targets' shape"
    b = bucket_of_token.to(targets.device)[targets.flatten()]  # (N,)
    lead = values.shape[:values.dim() - targets.dim()]
    x = values.reshape(*lead, -1)  # (..., N)
    ok = ~torch.isnan(x)
    total = torch.zeros(*lead, n_buckets, dtype=x.dtype, device=x.device).index_add_(
        -1, b, torch.where(ok, x, 0))
    count = torch.zeros_like(total).index_add_(-1, b, ok.to(x.dtype))
    return total / count


def improvement_per_doubling(loss, steps):
    """g(t) = 1 - L(t2) / L(t): the relative fall of a loss curve over one doubling of the step, at
    every recorded step t >= 1, t2 the first recorded step >= 2t (2t itself when every step is
    recorded). loss, steps (n,), steps increasing; NaN where t = 0 or the curve ends before 2t.
    Negative where the curve rises."""
    j = torch.searchsorted(steps, 2 * steps)  # (n,) index of the first recorded step >= 2t
    ok = (steps >= 1) & (j < len(steps))
    g = torch.full(loss.shape, float('nan'), dtype=loss.dtype)
    g[ok] = 1 - loss[j[ok]] / loss[ok]
    return g


def plateau_onset(loss, steps, tol=0.01):
    """Index of the first recorded step t after which a (smoothed) loss curve improves by less than
    `tol` per doubling of the step, for good: the smallest t with g(s) < tol at every recorded s >= t
    where g = improvement_per_doubling is defined (s up to half the last step). None when it still
    improves by tol or more at the last such s (or the curve spans less than one doubling). A curve
    that never improved plateaus at once: check never_improved first. loss must be finite."""
    assert torch.isfinite(loss).all(), "plateau_onset: drop the NaN rows first"
    g = improvement_per_doubling(loss, steps)
    defined = torch.nonzero(torch.isfinite(g)).flatten()  # indices s with 2s recorded
    if not len(defined) or g[defined[-1]] >= tol:
        return None
    fast = defined[g[defined] >= tol]  # the last doubling that still improved by tol or more
    return int(defined[0] if not len(fast) else defined[defined > fast[-1]][0])


def rise_onset(loss, rise=0.01):
    """Index of the best value of a (smoothed) loss curve (n,), when the curve ends more than `rise`
    (relative) above it: argmin_t L(t), if L(last) > (1 + rise) min_t L(t); the curve stopped improving
    and got worse. None when the last value is within `rise` of the best (still improving, or flat
    at its best), and when the best is the first value: a curve that never improved on its start
    has no onset (never_improved). loss must be finite: drop rows not yet recorded first."""
    assert torch.isfinite(loss).all(), "rise_onset: drop the NaN rows first"
    best = int(torch.argmin(loss))
    return best if best > 0 and loss[-1] > (1 + rise) * loss[best] else None


def never_improved(loss):
    """True when a loss curve (n,) never beats its first (initial) value: min_{t > 0} L(t) >= L(0).
    Such a curve (e.g. a frequency bucket that training only made worse) has no plateau or rise
    onset. False for a curve of one value. loss must be finite."""
    assert torch.isfinite(loss).all(), "never_improved: drop the NaN rows first"
    return bool(len(loss) > 1 and loss[1:].min() >= loss[0])


def dissent_ratio(norm_grad, norm_plus, norm_minus):
    """|grad| / (|grad+| + |grad-|), elementwise on norms (any shape; grad = grad+ + grad-): in [0, 1]
    by the triangle inequality, 1 = no dissent (the two parts point the same way), -> 0 total dissent
    (they cancel, each large, their sum small). NaN where both parts are 0. For one vector pair
    (one token in h, one batch in theta) cos(grad+, grad-) = (|grad|^2 - |grad+|^2 - |grad-|^2) /
    (2 |grad+| |grad-|) is fixed by the same three norms, so cos adds nothing to them; the ratio
    says how much of the two parts' size survives in the gradient, which the cosine hides when
    one part is much larger than the other (cos -1, ratio near 1)."""
    return norm_grad / (norm_plus + norm_minus)


def singular_values(U):
    """Singular values of the LM-head matrix U (V, d), largest first: (min(V, d),)."""
    return torch.linalg.svdvals(U)


def spectral_entropy(s):
    """H = -sum_k q_k log q_k (nats), q_k = s_k^2 / sum s^2: the share of U's energy (squared
    Frobenius norm) in each singular direction. log(rank) when all are used equally, 0 for one."""
    q = s.pow(2) / s.pow(2).sum()
    return -(q * torch.log(q.clamp_min(torch.finfo(q.dtype).tiny))).sum()  # 0 log 0 = 0


def anisotropy(h):
    """Mean pairwise cosine of the rows of h (N, d) over pairs i != j, exact in O(N d): with unit
    rows u_i, sum_{i != j} <u_i, u_j> = |sum_i u_i|^2 - N, divided by N (N - 1) pairs."""
    u = F.normalize(h.reshape(-1, h.shape[-1]), dim=-1)  # (N, d)
    N = u.shape[0]
    return (u.sum(0).pow(2).sum() - N) / (N * (N - 1))


# -----------------------------------------------------------------------------
# 7. recording passes: fp32 forwards, the zero-sum-learning measurement, parameters at theta_t


@torch.no_grad()
def fp32_forward(model, x, y):
    """Per-token losses (B, T), hidden states h (B, T, d) and logits (B, T, V) with fp32 weights,
    logits and log-softmax: the recording pass, kept outside any autocast region."""
    logits, _, h = model(x, return_hidden=True)
    return per_token_loss(logits, y), h, logits


@torch.no_grad()
def fp32_probe_forward(model, x, y):
    """fp32_forward for the probe pass, also returning p = softmax(z) (B*T, V): one log-softmax gives
    both the losses and p. l_i = -log p_i[y_i] is bitwise per_token_loss (cross_entropy is this
    log-softmax, then the target's entry picked and negated), and p = exp(log p) is what the
    output-layer decomposition needs (metrics.output_decomposition). Returns losses, h, logits, p."""
    logits, _, h = model(x, return_hidden=True)
    log_p = F.log_softmax(logits.reshape(-1, logits.size(-1)), dim=-1)  # (B*T, V)
    losses = -log_p.gather(1, y.reshape(-1, 1)).view(y.shape)  # (B, T)
    return losses, h, logits, log_p.exp_()


def loss_change_interference(change, generator):
    """(D, M, sign-flip null) of per-token loss changes (any shape), all tokens as one float64 vector:
    the zero-sum-learning measurement, train.py's and measure.py's alike. generator: the null's signs."""
    x = change.flatten().double()
    return (destructive_interference(x).item(), interference_magnitude(x).item(),
            sign_flip_null(x, generator=generator).item())


@contextlib.contextmanager
def parameters_at(params, values=None):
    """Inside the block, every parameter holds values[name] (e.g. theta_t after optimizer.step()),
    or (values None) what it holds now, free to be changed; on exit each gets back exactly what it
    held on entry."""
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items() if values is not None else []:
            p.copy_(values[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
