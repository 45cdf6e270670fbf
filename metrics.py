"""
The measurements of both results, one function per quantity, in this notation: token i (one next-token
prediction), target y_i, h_i the output-layer hidden state (after the final LayerNorm), U the (V, d)
LM-head matrix, z_i = U h_i the logits, p_i = softmax(z_i), l_i = -log p_i[y_i] the token's loss, theta
the parameters, g_i = d l_i / d theta. Torch tensors in and out, scalars as 0-dim tensors, in the
caller's dtype (fp32 in training, float64 in the tests, which check each against brute-force autograd).
"""

import contextlib

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from model import per_token_loss

NEAR_TOTAL = 0.99  # D_j above this: near-total opposition (opposition_summary's 'near_total')

# 1. destructive interference ---------------------------------------------------------------------


def interference_from_sums(total, total_abs):
    """D = 1 - |sum_i x_i| / sum_i |x_i|, from the two sums. In [0, 1]: 1 = complete cancellation,
    0 = all x_i of one sign. NaN where every x_i is 0 (undefined)."""
    return 1 - total.abs() / total_abs


def destructive_interference(x, dim=-1):
    """D(x) = 1 - |sum_i x_i| / sum_i |x_i| over `dim`."""
    return interference_from_sums(x.sum(dim), x.abs().sum(dim))


def interference_magnitude(x, dim=-1):
    """M(x) = mean_i |x_i|. |mean_i x_i| = (1 - D) M: the mean change is (1 - D) M, however large each."""
    return x.abs().mean(dim)


def sign_flip_null(x, dim=-1, generator=None, draws=64):
    """The null of D(x): the mean over `draws` draws (one wanders) of D of the |x_i| with random signs
    (1 - D ~ 1/sqrt(N)). Compare a measured D with it, never with 1. generator: a CPU torch.Generator."""
    dim = dim % x.dim()  # the draws come first
    signs = torch.randint(0, 2, (draws,) + x.shape, generator=generator).to(device=x.device, dtype=x.dtype)
    return destructive_interference(x.abs() * (2 * signs - 1), dim + 1).mean(0)


def expected_null_interference(sum_abs, sum_sq):
    """E[D] under random signs (sum_i s_i |x_i| is about normal, variance sum_i x_i^2), in [0, 1]:
        D_null = 1 - sqrt(2 / pi) sqrt(sum_i x_i^2) / sum_i |x_i|
    exact as N grows (for one number: 0.20, not 0). The null of D_j, where only these sums exist."""
    return (1 - (2 / torch.pi) ** 0.5 * sum_sq.sqrt() / sum_abs).clamp(0, 1)


# 2. output-layer decomposition, per token --------------------------------------------------------


def grad_z_plus(p, y):
    """Attractive part of dl/dz: grad_z+ = -(1 - p_y) e_y, raises the true logit only. (N, V)"""
    return torch.zeros_like(p).scatter_(1, y[:, None], -(1 - p.gather(1, y[:, None])))


def grad_z_minus(p, y):
    """Repulsive part of dl/dz: grad_z- = p with p_y set to 0, lowers each false logit in
    proportion to its probability. grad_z+ + grad_z- = p - e_y = dl/dz. (N, V)"""
    return p.scatter(1, y[:, None], 0.0)


def cosine(a, b):
    """cos(a, b) = <a, b> / (|a| |b|) along the last dimension; NaN where a vector is zero (no direction:
    a 0 would read as orthogonal, e.g. grad_h+ when p_y rounds to 1). Average with torch.nanmean."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def output_decomposition(h, U, y, probs=None):
    """Per token, with h (N, d), U (V, d), y (N,), p = softmax(U h):
        grad_h+ = -(1 - p_y) U_y,   grad_h- = U^T p - p_y U_y,   grad_h+ + grad_h- = dl/dh
    Returns (N,) tensors: p_y; cos(h, grad_h+) (= -cos(h, U_y)), cos(h, grad_h-), the dissent
    cos(grad_h+, grad_h-); |grad_h+|, |grad_h-|, |dl/dh|. probs: p (N, V) if the caller has it."""
    p = torch.softmax(h @ U.T, dim=-1) if probs is None else probs  # (N, V)
    p_y = p.gather(1, y[:, None]).squeeze(1)  # (N,)
    U_y = U[y]  # (N, d)
    g_plus = -(1 - p_y)[:, None] * U_y  # (N, d)
    g_minus = p @ U - p_y[:, None] * U_y  # (N, d): no per-token V x d tensor
    return dict(p_y=p_y, cos_h_plus=cosine(h, g_plus), cos_h_minus=cosine(h, g_minus),
                cos_plus_minus=cosine(g_plus, g_minus), norm_plus=g_plus.norm(dim=-1),
                norm_minus=g_minus.norm(dim=-1), norm_grad=(g_plus + g_minus).norm(dim=-1))


# 3. parameter-space decomposition over a batch (gradient dissent) --------------------------------


def theta_decomposition(logits, targets, params, grads=None, average=None, h=None, head=None, losses=None):
    """grad_theta± = (1/N) sum_i (dz_i/dtheta)^T grad_z±_i over the MEAN loss (N = B*T, as trained) and
    grad_theta- = grad_theta - grad_theta+, as dissent_norms (batch-level: per token they lie in other rows
    of U). logits (B, T, V) in the graph; params: name -> parameter; grads: their gradient (p.grad), else a
    backward; average: in-place mean over DDP processes. With h (B, T, d) in the graph, head (U's name) and
    losses (l_i, so p_y = exp(-l_i)): U's part a row scatter, the rest one backward from h:
        grad_U+ = (1/N) sum_i -(1 - p_yi) e_yi h_i^T,   grad_h+_i = -(1 - p_yi) U_yi / N"""
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
    return dissent_norms(plus, grads)


def dissent_norms(plus, grads):
    """name (and 'model', all as one vector) -> cos(grad+, grad-), |grad+|, |grad-|, |grad|, grad- = grad -
    grad+, as 0-dim CPU tensors; 'model' sums the tensors' sums in float64 (fp32 norm() loses digits)."""
    dots = []
    for name in plus:
        g_plus, g = plus[name].flatten(), grads[name].flatten().to(plus[name].dtype)
        g_minus = g - g_plus
        dots.append(torch.stack([(g_plus * g_minus).sum(), (g_plus * g_plus).sum(), (g_minus * g_minus).sum(),
                                 (g * g).sum()]))
    dots = torch.stack(dots).double().cpu()  # (n_names, 4), one device sync
    dots = torch.cat([dots, dots.sum(0, keepdim=True)])  # (n_names + 1, 4): row 'model'
    norms = dots[:, 1:].sqrt()  # |grad+|, |grad-|, |grad|
    cos = dots[:, 0] / (norms[:, 0] * norms[:, 1])  # NaN where a part is zero, as `cosine`
    keys, rows = ['cos', 'norm_plus', 'norm_minus', 'norm_grad'], torch.column_stack([cos, norms])
    return {n: dict(zip(keys, row)) for n, row in zip(list(plus) + ['model'], rows)}


# 4. gradient opposition between tokens, per parameter coordinate j: g_i is the gradient of token i's OWN
# loss (not of the mean); the sums (sum_i g_ij, sum_i |g_ij|, sum_i g_ij^2) are shaped as the parameter.


def per_token_gradient_sums_looped(model, idx, targets, names=None, n_tokens=None):
    """param name -> (sum_i g_i, sum_i |g_i|, sum_i g_i^2) over the tokens of idx, targets (B, T): the
    definition, one backward per token, the fast paths' reference. names: the parameters (default all);
    n_tokens: the first n_tokens tokens only (row-major)."""
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
    """name -> module of the layers whose per-token gradient is outer(G_s, X_s) at one position s (their
    output at s reaches only l_s): the LM head (untied), ln_f, the last block's ln_2, MLP and attn.c_proj.
    Not the last attn.c_attn (its keys and values at s feed later positions) nor anything before."""
    last, prefix = model.transformer.h[-1], f"transformer.h.{len(model.transformer.h) - 1}"
    modules = {} if model.config.tie_weights else {'lm_head': model.lm_head}
    modules.update({'transformer.ln_f': model.transformer.ln_f, f"{prefix}.ln_2": last.ln_2,
                    f"{prefix}.attn.c_proj": last.attn.c_proj, f"{prefix}.mlp.c_fc": last.mlp.c_fc,
                    f"{prefix}.mlp.c_proj": last.mlp.c_proj})
    return modules


@contextlib.contextmanager
def module_inputs_outputs(modules, keep=lambda X, output: (X, output)):
    """Yields name -> keep(input, output) of each module's last forward inside the block (default: both)."""
    io = {}
    handles = [module.register_forward_hook(
        lambda module, inputs, output, name=name: io.__setitem__(name, keep(inputs[0], output)))
        for name, module in modules.items()]
    try:
        yield io
    finally:
        for handle in handles:
            handle.remove()


def capture_activations(modules):
    """A with-block yielding name -> [X, G]: each module's input X, and its output gradient G in the FIRST
    backward through that graph."""
    def keep(X, output):
        def save_grad(G):  # the first backward only
            if X_G[1] is None:
                X_G[1] = G.detach()
        X_G = [X.detach(), None]
        if output.requires_grad:
            output.register_hook(save_grad)
        return X_G
    return module_inputs_outputs(modules, keep)


def position_local_gradient_sums(modules, acts, n_tokens, grads=None):
    """param name -> (sum_s g_s, sum_s |g_s|, sum_s g_s^2) of the position-local layers, exact, from X and
    G of one backward of the MEAN over n_tokens (G = dl_s/dout / n_tokens; rescaled after the matmuls):
        Linear, X (N, in), G (N, out): sum_s g_s = G^T X, sum_s |g_s| = |G|^T |X|, sum_s g_s^2 = (G^2)^T X^2
    LayerNorm: g_s = G_s * xhat_s; biases: g_s = G_s. grads: that loss's gradients, sum_s g_s / n_tokens."""
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


def per_token_gradient_sums(model, idx, targets, chunk_size=16, delta=None):
    """per_token_gradient_sums_looped's sums, up to rounding, for EVERY parameter (a tied matrix once): one
    backward of sum_i l_i gives every sum_i g_i and the local layers' sums (batch_gradient_sums); the other
    layers reach l_s only through r_s, the residual stream after the last attention, so one backward per
    position s from r_s, batched over sequences (position_backwards), gives their g_i. The attention KEY
    biases get exact zeros, their true gradient (q_s . b shifts all scores of query s: softmax ignores it).
    chunk_size: positions per forward. delta (optional): name -> an update theta_{t+1} - theta_t; then
    returns (sums, dots), dots: name -> (N,) <g_i, delta>, tokens row-major (their sum: the JVP)."""
    B, T = idx.shape
    local = position_local_modules(model)
    inner = {name: module for name, module in model.transformer.h.named_modules(prefix='transformer.h')
             if isinstance(module, (nn.Linear, nn.LayerNorm)) and name not in local}  # the per-position ones
    sums, acts, h, g_z, g_r = batch_gradient_sums(model, idx, targets, local)
    delta = None if delta is None else key_bias_zeroed(model, delta)
    dots = None if delta is None else batch_dots(model, local, acts, delta, h, g_z)
    tied = model.transformer.wte.weight is model.lm_head.weight
    ids, slot = sequence_rows(idx)  # (B, R), (B, T)
    for s, layers, g_e in position_backwards(model, idx, inner, g_r, chunk_size):
        tokens = torch.arange(B, device=idx.device) * T + s  # the tokens at s, row-major as idx.flatten()
        for name, module in inner.items():
            for suffix, g in token_gradients(module, *layers[name]).items():
                if dots is not None:
                    dots[name + suffix][tokens] = g.flatten(1) @ delta[name + suffix].flatten()
                add_abs_sums(sums[name + suffix], g)
        head_rows = (g_z[:, s].gather(1, ids)[:, :, None] * h[:, s, None, :]).flatten(0, 1) if tied else None
        add_embedding_sums(sums, g_e, ids, slot, head_rows, dots, delta, tokens)
    sums = {name: tuple(key_bias_zeroed(model, {name: t})[name] for t in sums[name]) for name in sums}
    return sums if delta is None else (sums, dots)


def batch_gradient_sums(model, idx, targets, local):
    """One backward of sum_i l_i: sums (every sum_i g_i; the local layers' other two, tied also the head
    part of the embedding's; else 0), local X and G, h (B, T, d), dl/dz (B, T, V), dl/dr (r: ln_2's input)."""
    params = dict(model.named_parameters())
    with capture_activations(local) as acts, module_inputs_outputs({'r': model.transformer.h[-1].ln_2}) as io:
        h = model.hidden(idx)  # (B, T, d)
        logits = model.lm_head(h)  # (B, T, V)
    g_r, g_z, *total = torch.autograd.grad(per_token_loss(logits, targets).sum(),
                                           [io['r'][0], logits] + list(params.values()))
    total = dict(zip(params, total))  # sum_i g_i
    local_sums = position_local_gradient_sums(local, acts, 1, grads=total)
    sums = {name: local_sums.get(name, (total[name], torch.zeros_like(p), torch.zeros_like(p)))
            for name, p in params.items()}
    if model.transformer.wte.weight is model.lm_head.weight:  # each sequence's rows: add_embedding_sums
        head = position_local_gradient_sums({'U': model.lm_head}, {'U': [h.detach(), g_z]}, 1)['U.weight']
        sums['transformer.wte.weight'] = (total['transformer.wte.weight'],) + head[1:]
    return sums, acts, h.detach(), g_z, g_r


def batch_dots(model, local, acts, delta, h, g_z):
    """name -> (N,) <g_i, delta>: zeros, but for the position-local layers, with no g_i formed,
        Linear: G_i . (delta_W X_i),   LayerNorm: G_i . (delta_w * xhat_i),   bias: G_i . delta_b,
    and, tied, the head part of the embedding's: dl_i/dz_i . (delta_U h_i)."""
    dots = {name: h.new_zeros(h.shape[0] * h.shape[1]) for name, _ in model.named_parameters()}
    for name, module in local.items():
        X, G = acts[name]
        X, G = layer_input(module, X.reshape(-1, X.shape[-1])), G.reshape(-1, G.shape[-1])  # (N, in/out)
        d_weight = delta[name + '.weight']
        moved = X @ d_weight.T if isinstance(module, nn.Linear) else X * d_weight  # (N, out)
        dots[name + '.weight'] = (G * moved).sum(-1)
        if module.bias is not None:
            dots[name + '.bias'] = G @ delta[name + '.bias']
    if model.transformer.wte.weight is model.lm_head.weight:
        moved = h @ delta['transformer.wte.weight'].T  # (B, T, V)
        dots['transformer.wte.weight'] += (g_z * moved).sum(-1).flatten()
    return dots


def position_backwards(model, idx, inner, g_r, chunk_size):
    """One backward per position s from r (the last ln_2's input), batched over sequences, cotangent g_r at s
    (0 elsewhere); one forward of positions 0..b-1 serves the chunk a..b-1 (l_s sees 0..s only). Yields s,
    name -> (layer_input X, output gradient G) of each inner layer, and dl_s/de (e: embeddings), at 0..s."""
    T, last = idx.shape[1], model.transformer.h[-1]
    for a in range(0, T, chunk_size):
        b = min(a + chunk_size, T)
        with module_inputs_outputs(dict(inner, r=last.ln_2, wte=model.transformer.wte)) as io:
            model.hidden(idx[:, :b])  # the causal prefix of positions a..b-1
        outputs = [io[name][1] for name in inner] + [io['wte'][1]]
        X = {name: layer_input(module, io[name][0]) for name, module in inner.items()}  # (B, b, in)
        cotangent = torch.zeros_like(io['r'][0])  # (B, b, d)
        for s in range(a, b):
            cotangent.zero_()
            cotangent[:, s] = g_r[:, s]  # token (n, s): dl/dr at its own position
            *grads, g_e = torch.autograd.grad(io['r'][0], outputs, cotangent, retain_graph=True)
            layers = {name: (X[name][:, :s + 1], G[:, :s + 1]) for name, G in zip(inner, grads)}
            yield s, layers, g_e[:, :s + 1]  # positions 0..s


def layer_input(module, X):
    """What a Linear's or LayerNorm's weight gradient multiplies: X, or the normalised xhat. (..., in)"""
    X = X.detach()
    return X if isinstance(module, nn.Linear) else F.layer_norm(X, module.normalized_shape, eps=module.eps)


def token_gradients(module, X, G):
    """Per-token gradients of a Linear or LayerNorm: (K, S, in), (K, S, out) -> suffix -> (K, *shape),
        Linear:    weight g_k = sum_s outer(G_ks, X_ks) = G_k^T X_k,   bias g_k = sum_s G_ks
        LayerNorm: weight g_k = sum_s G_ks * xhat_ks,                  bias g_k = sum_s G_ks"""
    weight = G.transpose(1, 2) @ X if isinstance(module, nn.Linear) else (G * X).sum(1)
    return {'.weight': weight} | ({'.bias': G.sum(1)} if module.bias is not None else {})


def add_abs_sums(sums, g):
    """Add a batch of per-token gradients g (K, *shape) to sums = (., sum |g|, sum g^2), in place (g too)."""
    sums[1].add_(g.abs_().sum(0))
    sums[2].add_(g.square_().sum(0))


def sequence_rows(idx):
    """The token-embedding rows each sequence uses: ids (B, R), the distinct ids of sequence n in
    ids[n, :R_n] (then 0s, which get no gradient), and slot (B, T): ids.flatten()[slot] = idx."""
    found = [torch.unique(row, return_inverse=True) for row in idx]
    R = max(len(u) for u, _ in found)
    ids = torch.stack([F.pad(u, (0, R - len(u))) for u, _ in found])  # (B, R)
    return ids, torch.stack([where + n * R for n, (_, where) in enumerate(found)])


def add_embedding_sums(sums, g_e, ids, slot, head_rows=None, dots=None, delta=None, tokens=None):
    """Add the embeddings' g_i of the tokens at s to sums from g_e = dl/de_t (B, s+1, d): wpe row t is
    dl_i/de_t, wte row r of ids sums it over the t holding r; tied, |rows + head_rows| replaces the head's."""
    (B, R), S = ids.shape, g_e.shape[1]
    rows = g_e.new_zeros(B * R, g_e.shape[-1]).index_add_(0, slot[:, :S].flatten(), g_e.flatten(0, 1))
    if dots is not None:
        delta_rows = delta['transformer.wte.weight'][ids]  # (B, R, d)
        dots['transformer.wte.weight'][tokens] += (rows.view(B, R, -1) * delta_rows).sum((1, 2))
        dots['transformer.wpe.weight'][tokens] = (g_e * delta['transformer.wpe.weight'][:S]).sum((1, 2))
    wpe, wte, ids = sums['transformer.wpe.weight'], sums['transformer.wte.weight'], ids.flatten()
    add_abs_sums((None, wpe[1][:S], wpe[2][:S]), g_e)
    if head_rows is None:
        wte[1].index_add_(0, ids, rows.abs_())
        wte[2].index_add_(0, ids, rows.square_())
    else:
        rows += head_rows
        wte[1].index_add_(0, ids, rows.abs() - head_rows.abs())
        wte[2].index_add_(0, ids, rows.pow(2) - head_rows.pow(2))


def key_bias_zeroed(model, tensors):
    """tensors (name -> tensor), the attention key biases c_attn.bias[d:2d] copied at 0, their gradient."""
    keys = torch.arange(model.config.n_embd, 2 * model.config.n_embd)
    return {name: t.index_fill(0, keys.to(t.device), 0) if name.endswith('attn.c_attn.bias') else t
            for name, t in tensors.items()}


def coordinate_opposition(sum_g, sum_abs_g, *_):
    """D_j = 1 - |sum_i g_ij| / sum_i |g_ij| per coordinate j some token moves (sum_i |g_ij| > 0). (n,)"""
    return interference_from_sums(*used_coordinates(sum_g.flatten(), sum_abs_g.flatten()))  # (n,)


def used_coordinates(sum_g, sum_abs_g, *rest):
    """The flat sums (n,) cut to the coordinates with sum_i |g_ij| > 0 (all used: as they are, no copy)."""
    used = sum_abs_g > 0
    if bool(used.all()):
        return (sum_g, sum_abs_g) + rest
    return tuple(t[used] for t in (sum_g, sum_abs_g) + rest)


def opposition_group(name):
    """The layer of a parameter: 'h.3' ('transformer.h.3.*'), 'embeddings' (wte, wpe), 'ln_f', 'lm_head'."""
    parts = name.split('.')
    if parts[:2] == ['transformer', 'h']:
        return 'h.' + parts[2]
    if parts[:2] in (['transformer', 'wte'], ['transformer', 'wpe']):
        return 'embeddings'
    return parts[-2]  # 'transformer.ln_f.weight' -> 'ln_f', 'lm_head.weight' -> 'lm_head'


def is_block_matrix(name):
    """A block's weight matrix (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj), as the published headline?"""
    parts = name.split('.')
    return (parts[:2] == ['transformer', 'h'] and parts[-1] == 'weight'
            and '.'.join(parts[3:-1]) in ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj'))


def opposition_members(names, total='model'):
    """key -> the parameter names it covers, keys in order: each tensor, its layer (opposition_group,
    by first appearance), 'blocks' (is_block_matrix; if any), `total` (all: 'model', or 'local')."""
    members = {name: [name] for name in names}
    for name in names:
        members.setdefault(opposition_group(name), []).append(name)
    blocks = [name for name in names if is_block_matrix(name)]
    return members | ({'blocks': blocks} if blocks else {}) | {total: list(names)}


def opposition_keys(names, total='model'):
    """The keys of opposition_summary for the parameters `names` (see opposition_members)."""
    return list(opposition_members(names, total))


def scale_free_opposition(D, n_tokens):
    """sqrt(N) (1 - D), N the tokens of a D (or mean D_j): the null's 1 - D shrinks as 1 / sqrt(N), so this
    compares D with its null at any N on one scale."""
    return (1 - D) * n_tokens ** 0.5


def opposition_summary(sums, bins=20, total='model'):
    """D_j (coordinate_opposition) per key of opposition_keys, as CPU tensors: 'mean' over coordinates;
    'weighted' by sum_i |g_ij|, = 1 - sum_j |sum_i g_ij| / sum_j sum_i |g_ij|; 'hist' (bins,) over [0, 1];
    'n' coordinates; 'null' the mean expected_null_interference; 'near_total' the share > NEAR_TOTAL."""
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
        s = {k: sum(per[name][k] for name in names) for k in per[names[0]]}  # over the key's tensors
        n, nan = s['n'], torch.tensor(float('nan'), dtype=torch.float64)
        mean, null, near_total = (s[k] / n if n else nan for k in ('D_sum', 'null_sum', 'near_total'))
        summary = dict(mean=mean, weighted=interference_from_sums(s['abs_total'], s['total_abs']), null=null,
                       near_total=torch.as_tensor(near_total, dtype=torch.float64), hist=s['hist'].long())
        out[key] = {name: x.cpu() for name, x in summary.items()} | {'n': torch.tensor(n)}
    return out


def update_weighted_terms(sums, delta, dots, total='model'):
    """The published update-weighted interference terms, p_ij = g_ij delta_j, from per_token_gradient_sums:
        Cg      = sum_j |sum_i p_ij| / sum_j sum_i |p_ij|    tokens agree, per coordinate
        CuG     = |sum_j sum_i p_ij| / sum_j |sum_i p_ij|    coordinates agree, after summing tokens
        Cug     = sum_i |sum_j p_ij| / sum_j sum_i |p_ij|    coordinates agree, per token
        C_i_dli = |sum_i sum_j p_ij| / sum_i |sum_j p_ij|    tokens' predicted changes agree (1 - D)
        M_i_dli = sum_i |sum_j p_ij| / N                     mean size of a predicted change
    per key; sum_i p_ij = delta_j sum_i g_ij, sum_i |p_ij| = |delta_j| sum_i |g_ij|, sum_j p_ij = dots."""
    out = {}
    for key, parts in opposition_members(list(sums), total).items():
        p_sum = torch.cat([(delta[n].double() * sums[n][0].double()).flatten() for n in parts])  # sum_i p_ij
        p_abs = sum((delta[n].double().abs() * sums[n][1].double()).sum() for n in parts)  # sum_ij |p_ij|
        q = sum(dots[n].double() for n in parts)  # (N,): sum_j p_ij over the key's coordinates
        terms = dict(Cg=p_sum.abs().sum() / p_abs, CuG=p_sum.sum().abs() / p_sum.abs().sum(),
                     Cug=q.abs().sum() / p_abs, C_i_dli=q.sum().abs() / q.abs().sum(), M_i_dli=q.abs().mean())
        out[key] = {name: term.cpu() for name, term in terms.items()}
    return out


# 5. update-weighted interference: first-order prediction of each token's loss change -------------


def predicted_loss_change(model, idx, targets, delta, params=None):
    """Delta l_i ~ <grad l_i, delta> = sum_j p_ij, p_ij = (grad l_i)_j delta_j: every token's first-order loss
    change (B, T) along delta (name -> an update), by ONE forward-mode JVP at params (default: the model's),
    with the plain-math attention (the flash and fused kernels have no forward-mode derivative)."""
    theta = dict(model.named_parameters()) if params is None else params
    names = [name for name, _ in model.named_parameters()]
    primals = tuple(theta[name].detach() for name in names)
    tangents = tuple(delta[name].to(p.dtype) for name, p in zip(names, primals))

    def losses(*params):
        return per_token_loss(functional_call(model, dict(zip(names, params)), (idx,))[0], targets)  # (B, T)
    with sdpa_kernel(SDPBackend.MATH):
        return jvp(losses, primals, tangents)[1]


def first_order_agreement(predicted, true):
    """Predicted against true per-token changes: corr (Pearson); r2 = 1 - sum (true - pred)^2 / sum (true -
    mean true)^2; slope = sum pred*true / sum pred^2 (through 0); rel_err = ||true - pred|| / ||true||."""
    pred, true = predicted.flatten().double(), true.flatten().double()
    resid = true - pred
    return dict(corr=torch.corrcoef(torch.stack([pred, true]))[0, 1],
                r2=1 - resid.pow(2).sum() / (true - true.mean()).pow(2).sum(),
                slope=(pred * true).sum() / pred.pow(2).sum(), rel_err=resid.norm() / true.norm())


# 6. saturation companions ------------------------------------------------------------------------


def token_ranks(counts):
    """Rank of every token id in the unigram counts (V,): 0 = most frequent, ties by id. (V,) long"""
    rank = torch.empty(counts.numel(), dtype=torch.long)
    rank[torch.argsort(-counts.double().cpu(), stable=True)] = torch.arange(counts.numel())
    return rank


def frequency_buckets(counts, n_buckets=8):
    """(bucket of every token id (V,), edges): bucket k holds ranks edges[k] .. edges[k+1] - 1, edges[k] =
    round((V + 1)^(k / n_buckets)) - 1, 0 the most frequent (equal edges merge: len(edges) - 1 buckets)."""
    V = counts.numel()
    rank = token_ranks(counts)  # (V,)
    k = torch.arange(n_buckets + 1, dtype=torch.float64)
    edges = torch.unique(torch.round((V + 1.0) ** (k / n_buckets)).long() - 1)  # (n + 1,)
    return torch.searchsorted(edges, rank, right=True) - 1, edges


def unigram_entropy(counts):
    """H_1 = -sum_v q_v log q_v (nats), q_v = c_v / sum c: the loss of predicting every token by its
    training frequency, which a model's loss falls below once it uses the context."""
    q = counts.double() / counts.sum()
    return -(q[q > 0] * torch.log(q[q > 0])).sum()  # 0 log 0 = 0


def zipf_fit(counts, k=3.0):
    """Least-squares log c = intercept + slope * log r over the seen tokens, r = rank + 1: slope, intercept;
    per id (V,) rank, fitted exp(intercept) r^slope, residuals (NaN: unseen); outliers: |residual| > k std."""
    counts = counts.cpu()
    rank = token_ranks(counts) + 1  # (V,)
    seen = torch.argsort(rank)[:int((counts > 0).sum())]  # ids of the seen tokens, by rank
    log_r, log_c = torch.log(rank[seen].double()), torch.log(counts[seen].double())  # (n,) each
    A = torch.stack([torch.ones_like(log_r), log_r], 1)  # (n, 2)
    intercept, slope = torch.linalg.lstsq(A, log_c[:, None]).solution.flatten()
    fitted = torch.exp(intercept + slope * torch.log(rank.double()))  # (V,)
    residuals = torch.full((counts.numel(),), float('nan'), dtype=torch.float64)  # (V,)
    residuals[seen] = log_c - torch.log(fitted[seen])
    outliers = seen[residuals[seen].abs() > k * residuals[seen].std()]
    return dict(slope=slope, intercept=intercept, rank=rank, fitted=fitted, residuals=residuals,
                outliers=outliers)


def bucket_mean(values, targets, bucket_of_token, n_buckets):
    """(..., n_buckets) mean of a per-token quantity (targets' shape after leading dimensions, e.g. steps)
    over the tokens whose TARGET is in each bucket, NaN values left out."""
    assert values.shape[values.dim() - targets.dim():] == targets.shape, "values must end with targets' shape"
    b = bucket_of_token.to(targets.device)[targets.flatten()]  # (N,)
    lead = values.shape[:values.dim() - targets.dim()]
    x = values.reshape(*lead, -1)  # (..., N)
    ok = ~torch.isnan(x)
    total = x.new_zeros(*lead, n_buckets).index_add_(-1, b, torch.where(ok, x, 0))
    count = torch.zeros_like(total).index_add_(-1, b, ok.to(x.dtype))
    return total / count


def improvement_per_doubling(loss, steps):
    """g(t) = 1 - L(t2) / L(t), t2 the first recorded step >= 2t: a loss curve's relative fall over one
    doubling of the step. loss, steps (n,), steps increasing; NaN where t = 0 or no t2."""
    j = torch.searchsorted(steps, 2 * steps)  # (n,) index of the first recorded step >= 2t
    ok = (steps >= 1) & (j < len(steps))
    g = torch.full(loss.shape, float('nan'), dtype=loss.dtype)
    g[ok] = 1 - loss[j[ok]] / loss[ok]
    return g


def plateau_onset(loss, steps, tol=0.01):
    """The smallest index t of a (smoothed, finite) loss curve with g(s) < tol (improvement_per_doubling)
    at every defined s >= t: None if it still improves at the last such s or spans no doubling."""
    assert torch.isfinite(loss).all(), "plateau_onset: drop the NaN rows first"
    g = improvement_per_doubling(loss, steps)
    defined = torch.nonzero(torch.isfinite(g)).flatten()  # indices s with 2s recorded
    if not len(defined) or g[defined[-1]] >= tol:
        return None
    fast = defined[g[defined] >= tol]  # the last doubling that still improved by tol or more
    return int(defined[0] if not len(fast) else defined[defined > fast[-1]][0])


def rise_onset(loss, rise=0.01):
    """argmin_t L(t) of a (smoothed, finite) loss curve (n,) if L(last) > (1 + rise) min_t L(t) (it got
    worse); None otherwise, or when the best is the first value."""
    assert torch.isfinite(loss).all(), "rise_onset: drop the NaN rows first"
    best = int(torch.argmin(loss))
    return best if best > 0 and loss[-1] > (1 + rise) * loss[best] else None


def never_improved(loss):
    """min_{t > 0} L(t) >= L(0) for a finite loss curve (n,): no plateau or rise onset. False for n = 1."""
    assert torch.isfinite(loss).all(), "never_improved: drop the NaN rows first"
    return bool(len(loss) > 1 and loss[1:].min() >= loss[0])


def dissent_ratio(norm_grad, norm_plus, norm_minus):
    """|grad| / (|grad+| + |grad-|), elementwise: 1 = no dissent, -> 0 total (NaN where both are 0)."""
    return norm_grad / (norm_plus + norm_minus)


def singular_values(U):
    """Singular values of the LM-head matrix U (V, d), largest first: (min(V, d),)."""
    return torch.linalg.svdvals(U)


def spectral_entropy(s):
    """H = -sum_k q_k log q_k (nats), q_k = s_k^2 / sum s^2, U's energy per singular direction."""
    q = s.pow(2) / s.pow(2).sum()
    return -(q * torch.log(q.clamp_min(torch.finfo(q.dtype).tiny))).sum()  # 0 log 0 = 0


def anisotropy(h):
    """Mean pairwise cosine of the rows of h (N, d), i != j, in O(N d): with unit rows u_i,
    sum_{i != j} <u_i, u_j> = |sum_i u_i|^2 - N, over N (N - 1) pairs."""
    u = F.normalize(h.reshape(-1, h.shape[-1]), dim=-1)  # (N, d)
    N = u.shape[0]
    return (u.sum(0).pow(2).sum() - N) / (N * (N - 1))


# 7. recording passes: fp32 forwards, the zero-sum-learning measurement, parameters at theta_t ----


@torch.no_grad()
def fp32_forward(model, x, y):
    """Per-token losses (B, T), h (B, T, d), logits (B, T, V) in fp32: the recording pass, no autocast."""
    logits, _, h = model(x, return_hidden=True)
    return per_token_loss(logits, y), h, logits


@torch.no_grad()
def fp32_probe_forward(model, x, y):
    """fp32_forward, and p = softmax(z) (B*T, V) for output_decomposition from the same log-softmax (the
    losses are per_token_loss's bitwise: cross_entropy is this log-softmax)."""
    logits, _, h = model(x, return_hidden=True)
    log_p = F.log_softmax(logits.reshape(-1, logits.size(-1)), dim=-1)  # (B*T, V)
    losses = -log_p.gather(1, y.reshape(-1, 1)).view(y.shape)  # (B, T)
    return losses, h, logits, log_p.exp_()


def loss_change_interference(change, generator):
    """(D, M, sign-flip null) of per-token loss changes (any shape), one float64 vector; generator: signs."""
    x = change.flatten().double()
    return (destructive_interference(x).item(), interference_magnitude(x).item(),
            sign_flip_null(x, generator=generator).item())


@contextlib.contextmanager
def parameters_at(params, values=None):
    """Inside the block each parameter holds values[name] (e.g. theta_t; None: free to change), after it
    exactly what it held on entry."""
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
