"""
The measurements of both results, one function per quantity, in the notation of DESIGN.md:

    token i (one next-token prediction), target y_i, h_i the output-layer hidden state,
    U the (V, d) LM-head matrix, z_i = U h_i, p_i = softmax(z_i), l_i = -log p_i[y_i].

1. destructive interference D and magnitude M of any numbers (loss changes, gradients)
2. the output-layer decomposition per token: attractive grad+ and repulsive grad- in z and h
3. the same decomposition in parameter space, over a batch (gradient dissent)
4. gradient opposition between tokens, per parameter coordinate (cheap for position-local
   layers, exact for all parameters by batched per-token backward passes)
5. the first-order predicted per-token loss change along the real update (one JVP)
6. saturation companions: frequency buckets, Zipf fit, LM-head spectrum, anisotropy of h

Everything takes and returns torch tensors; callers choose the dtype (fp32 in training,
float64 in the tests, which check every function against brute-force autograd).
"""

import contextlib

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from model import per_token_loss

# -----------------------------------------------------------------------------
# 1. destructive interference


def interference(total, total_abs):
    """D = 1 - |sum_i x_i| / sum_i |x_i|, from the two sums. In [0, 1]; 1 = complete
    cancellation, 0 = all x_i of one sign. NaN where every x_i is 0 (D is undefined there)."""
    return 1 - total.abs() / total_abs


def destructive_interference(x, dim=-1):
    """D(x) = 1 - |sum_i x_i| / sum_i |x_i| over `dim` (see `interference`)."""
    return interference(x.sum(dim), x.abs().sum(dim))


def interference_magnitude(x, dim=-1):
    """M(x) = mean_i |x_i|. With D: |mean_i x_i| = (1 - D) M, so a mean loss improvement is
    bounded by (1 - D) M however large the individual changes are."""
    return x.abs().mean(dim)


def sign_flip_null(x, dim=-1, generator=None):
    """D of the same magnitudes |x_i| with independent random signs: the value D takes when
    the signs carry no structure (1 - D ~ 1/sqrt(N)). Compare measured D with it at the same N."""
    signs = torch.randint(0, 2, x.shape, generator=generator).to(device=x.device, dtype=x.dtype) * 2 - 1
    return destructive_interference(x.abs() * signs, dim)


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
    """cos(a, b) along the last dimension; NaN where a vector is zero (no direction)."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def output_decomposition(h, U, y):
    """Per token, with h (N, d), U (V, d), y (N,):

        grad_h+ = -(1 - p_y) U_y,   grad_h- = U^T p - p_y U_y,   grad_h+ + grad_h- = dl/dh

    Returns (N,) tensors: p_y; the shared 2D basis cos(h, grad_h+) (= -cos(h, U_y)) and
    cos(h, grad_h-); dissent cos(grad_h+, grad_h-); and |grad_h+|, |grad_h-|, |dl/dh|.
    grad_h- = p @ U - p_y U_y never forms a per-token V x d gradient."""
    p = torch.softmax(h @ U.T, dim=-1)  # (N, V)
    p_y = p.gather(1, y[:, None]).squeeze(1)  # (N,)
    U_y = U[y]  # (N, d)
    g_plus = -(1 - p_y)[:, None] * U_y  # (N, d)
    g_minus = p @ U - p_y[:, None] * U_y  # (N, d)
    return dict(p_y=p_y, cos_h_plus=cosine(h, g_plus), cos_h_minus=cosine(h, g_minus),
                cos_plus_minus=cosine(g_plus, g_minus), norm_plus=g_plus.norm(dim=-1),
                norm_minus=g_minus.norm(dim=-1), norm_grad=(g_plus + g_minus).norm(dim=-1))


# -----------------------------------------------------------------------------
# 3. parameter-space decomposition over a batch (gradient dissent)


def theta_decomposition(logits, targets, params, grads=None):
    """grad_theta+ = (dz/dtheta)^T grad_z+ and grad_theta- = grad_theta - grad_theta+ (linearity),
    for the MEAN loss over the batch's N tokens (so each seed is divided by N, as in training).

    logits (B, T, V) must still hold its autograd graph (it is kept: retain_graph=True);
    params: dict name -> parameter; grads: the gradient of the mean loss per parameter if the
    caller already has it (p.grad after the training backward), else computed here.
    Returns, per parameter and for 'model' (all parameters as one vector): cos(grad+, grad-),
    |grad+|, |grad-|, |grad|. Per token, grad_U+ and grad_U- sit in different rows of U, so the
    opposition measured here is a batch-level quantity."""
    B, T, V = logits.shape
    y = targets.reshape(-1)
    with torch.no_grad():
        p = torch.softmax(logits.detach().reshape(-1, V).to(torch.promote_types(logits.dtype, torch.float32)), -1)  # (N, V)
        seed_plus = (grad_z_plus(p, y) / y.numel()).view(B, T, V).to(logits.dtype)
    names, tensors = list(params), list(params.values())
    plus = torch.autograd.grad(logits, tensors, seed_plus, retain_graph=True)
    if grads is None:
        seed = ((p - F.one_hot(y, V).to(p.dtype)) / y.numel()).view(B, T, V).to(logits.dtype)
        grads = dict(zip(names, torch.autograd.grad(logits, tensors, seed, retain_graph=True)))
    out, dot, sq_plus, sq_minus = {}, 0.0, 0.0, 0.0
    for name, g_plus in zip(names, plus):
        g_minus = grads[name] - g_plus
        out[name] = dict(cos=cosine(g_plus.flatten(), g_minus.flatten()).item(), norm_plus=g_plus.norm().item(),
                         norm_minus=g_minus.norm().item(), norm_grad=grads[name].norm().item())
        dot += (g_plus * g_minus).sum().item()
        sq_plus += out[name]['norm_plus'] ** 2
        sq_minus += out[name]['norm_minus'] ** 2
    sq_grad = sum(o['norm_grad'] ** 2 for o in out.values())
    out['model'] = dict(cos=dot / (sq_plus * sq_minus) ** 0.5, norm_plus=sq_plus ** 0.5,
                        norm_minus=sq_minus ** 0.5, norm_grad=sq_grad ** 0.5)
    return out


# -----------------------------------------------------------------------------
# 4. gradient opposition between tokens, per parameter coordinate


def position_local_modules(model):
    """Layers whose parameters act on one position only and whose output reaches only that
    position's loss: the LM head, the final norm, and in the last block the attention output
    projection (it maps the already-mixed attention output at position s to position s), the
    second LayerNorm and the MLP. For them the per-token gradient is outer(g_s, x_s), and exact
    per-token statistics come from one ordinary backward. The last block's c_attn is NOT local:
    its keys and values at position s feed the attention of every later position; neither is
    anything earlier. A tied LM head is also the token embedding, so it is not local either."""
    last = model.transformer.h[-1]
    prefix = f"transformer.h.{len(model.transformer.h) - 1}"
    modules = {'transformer.ln_f': model.transformer.ln_f, f"{prefix}.ln_2": last.ln_2,
               f"{prefix}.attn.c_proj": last.attn.c_proj, f"{prefix}.mlp.c_fc": last.mlp.c_fc,
               f"{prefix}.mlp.c_proj": last.mlp.c_proj}
    if not model.config.tie_weights:
        modules['lm_head'] = model.lm_head
    return modules


@contextlib.contextmanager
def capture_activations(modules):
    """Record, for each module, its input X during the forward and its output gradient G
    during the FIRST backward through it (later backward passes over the same graph, such as
    theta_decomposition's, are ignored). Yields dict name -> [X, G]."""
    acts, handles = {}, []

    def hook(name):
        def forward_hook(module, inputs, output):
            acts[name] = [inputs[0].detach(), None]
            if output.requires_grad:
                output.register_hook(lambda g: acts[name].__setitem__(1, g.detach()) if acts[name][1] is None else None)
        return forward_hook
    for name, module in modules.items():
        handles.append(module.register_forward_hook(hook(name)))
    try:
        yield acts
    finally:
        for handle in handles:
            handle.remove()


def position_local_gradient_sums(modules, acts, n_tokens):
    """Per parameter: (sum_i g_i, sum_i |g_i|) over tokens, g_i = d l_i / d theta, exactly, from one
    ordinary backward of the MEAN loss over n_tokens (so G = (1/n_tokens) dl_s/dout, rescaled here).
    Linear with inputs X (N, in) and output gradients G (N, out): g_s = outer(G_s, X_s), so
        sum_s g_s = G^T X,   sum_s |g_s| = |G|^T |X|   (one matmul each), bias: sum G, sum |G|;
    LayerNorm with normalised input xhat: weight g_s = G_s * xhat_s, bias g_s = G_s."""
    sums = {}
    for name, module in modules.items():
        X, G = acts[name]
        X = X.reshape(-1, X.shape[-1]).float() if X.dtype in (torch.float16, torch.bfloat16) else X.reshape(-1, X.shape[-1])
        G = G.reshape(-1, G.shape[-1]).to(X.dtype) * n_tokens  # (N, out)
        if isinstance(module, nn.Linear):
            sums[name + '.weight'] = (G.T @ X, G.abs().T @ X.abs())  # (out, in) each
        else:
            assert isinstance(module, nn.LayerNorm)
            G_xhat = G * F.layer_norm(X, module.normalized_shape, eps=module.eps)  # (N, d)
            sums[name + '.weight'] = (G_xhat.sum(0), G_xhat.abs().sum(0))
        if module.bias is not None:
            sums[name + '.bias'] = (G.sum(0), G.abs().sum(0))
    return sums


def per_token_gradient_sums(model, idx, targets, chunk_size=64):
    """(sum_i g_i, sum_i |g_i|) for EVERY parameter, g_i = d l_i / d theta, exact: one forward,
    then one backward per token position, batched over one-hot cotangents with
    autograd.grad(is_grads_batched=True) in chunks of chunk_size (memory: chunk_size copies of
    the gradient). Correct for a tied head/embedding matrix, which sees both of its uses."""
    params = dict(model.named_parameters())  # a tied matrix appears once
    losses = per_token_loss(model(idx)[0], targets).reshape(-1)  # (N,)
    eye = torch.eye(losses.numel(), dtype=losses.dtype, device=losses.device)
    sums = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in params.items()}
    for start in range(0, losses.numel(), chunk_size):
        grads = torch.autograd.grad(losses, list(params.values()), eye[start:start + chunk_size],
                                    retain_graph=True, is_grads_batched=True)  # each (chunk, *shape)
        for (total, total_abs), g in zip(sums.values(), grads):
            total += g.sum(0)
            total_abs += g.abs().sum(0)
    return sums


def opposition_group(name):
    """The layer a parameter belongs to: 'block 3', 'embeddings', 'ln_f' or 'lm_head'."""
    if name.startswith('transformer.h.'):
        return 'block ' + name.split('.')[2]
    if name.startswith(('transformer.wte', 'transformer.wpe')):
        return 'embeddings'
    return name.split('.')[-2] if name.startswith('transformer.') else name.split('.')[0]


def opposition_summary(sums, bins=20):
    """Gradient opposition D_j = 1 - |sum_i g_ij| / sum_i |g_ij| per coordinate j (tokens as
    examples), summarised per parameter tensor, per layer and for the whole 'model':
    'mean': the exact mean of D_j over coordinates (coordinates with all g_ij = 0 left out);
    'weighted': the mean weighted by sum_i |g_ij|, which equals 1 - sum_j |sum_i g_ij| / sum_ij |g_ij|;
    'hist': counts of D_j in `bins` equal bins of [0, 1]."""
    groups = {}
    for name, pair in sums.items():
        for key in (name, opposition_group(name), 'model'):
            groups.setdefault(key, []).append(pair)
    out = {}
    for key, pairs in groups.items():
        total = torch.cat([s.flatten() for s, _ in pairs]).double()
        total_abs = torch.cat([a.flatten() for _, a in pairs]).double()
        D = interference(total, total_abs)[total_abs > 0]
        out[key] = dict(mean=D.mean().item(), weighted=interference(total.abs().sum(), total_abs.sum()).item(),
                        hist=torch.histc(D, bins=bins, min=0.0, max=1.0).long())
    return out


# -----------------------------------------------------------------------------
# 5. update-weighted interference: first-order prediction of each token's loss change


def predicted_loss_change(model, idx, targets, delta):
    """First-order predicted change of every token's loss along the update delta:
        Delta l_i ~ <grad l_i, delta> = sum_j p_ij,   p_ij = (grad l_i)_j delta_j,
    for all tokens at once from ONE forward-mode JVP. delta: dict name -> tensor, the real
    update theta_{t+1} - theta_t. The JVP runs attention with the plain-math kernel because the
    fused CPU kernels have no forward-mode derivative. Returns (B, T)."""
    names = [name for name, _ in model.named_parameters()]  # a tied matrix once: it takes both roles
    primals = tuple(p.detach() for _, p in model.named_parameters())

    def losses(*params):
        return per_token_loss(functional_call(model, dict(zip(names, params)), (idx,))[0], targets)
    with sdpa_kernel(SDPBackend.MATH):
        _, change = jvp(losses, primals, tuple(delta[name].to(p.dtype) for name, p in zip(names, primals)))
    return change


def first_order_agreement(predicted, true):
    """How well the first-order prediction matches the true per-token change: correlation,
    R^2 = 1 - sum (true - pred)^2 / sum (true - mean true)^2, the least-squares slope of true on
    predicted through the origin, and rel_err = |true - pred| / |true| (vector norms)."""
    pred, true = predicted.flatten().double(), true.flatten().double()
    resid = true - pred
    return dict(corr=torch.corrcoef(torch.stack([pred, true]))[0, 1].item(),
                r2=(1 - resid.pow(2).sum() / (true - true.mean()).pow(2).sum()).item(),
                slope=((pred * true).sum() / pred.pow(2).sum()).item(),
                rel_err=(resid.norm() / true.norm()).item())


# -----------------------------------------------------------------------------
# 6. saturation companions


def frequency_buckets(counts, n_buckets=8):
    """Bucket of every token id by its rank in the training unigram counts (rank 0 = most
    frequent), with log-spaced rank edges: bucket k holds ranks edges[k] .. edges[k+1] - 1, so
    bucket 0 is the few most frequent tokens and the last bucket the long tail. Small
    vocabularies may give fewer buckets (equal edges merge). Returns (bucket (V,), edges)."""
    V = counts.numel()
    rank = torch.empty(V, dtype=torch.long)
    rank[torch.argsort(-counts.double(), stable=True)] = torch.arange(V)
    edges = torch.unique(torch.round(torch.logspace(0, torch.log10(torch.tensor(V + 1.0)), n_buckets + 1)).long() - 1)
    return torch.searchsorted(edges, rank, right=True) - 1, edges


def zipf_fit(counts, k=3.0):
    """Least-squares line log c = intercept + slope * log r over the tokens with count > 0 (r:
    rank from 1); residuals per token id (NaN for unseen tokens) and the outliers: ids whose
    |residual| exceeds k standard deviations of the residuals (tokens far off the Zipf line)."""
    order = torch.argsort(-counts.double(), stable=True)
    seen = order[counts[order] > 0]
    log_r = torch.log(torch.arange(1, seen.numel() + 1, dtype=torch.float64))
    log_c = torch.log(counts[seen].double())
    A = torch.stack([torch.ones_like(log_r), log_r], 1)  # (n, 2)
    intercept, slope = torch.linalg.lstsq(A, log_c[:, None]).solution.flatten().tolist()
    residuals = torch.full((counts.numel(),), float('nan'), dtype=torch.float64)
    residuals[seen] = log_c - (intercept + slope * log_r)
    outliers = seen[(residuals[seen].abs() > k * residuals[seen].std())]
    return dict(slope=slope, intercept=intercept, residuals=residuals, outliers=outliers)


def bucket_mean_loss(loss, targets, bucket_of_token, n_buckets):
    """Mean loss of the tokens whose TARGET lies in each frequency bucket; NaN for an empty one."""
    b = bucket_of_token.to(targets.device)[targets.flatten()]
    total = torch.zeros(n_buckets, dtype=loss.dtype, device=loss.device).index_add_(0, b, loss.flatten())
    count = torch.bincount(b, minlength=n_buckets).to(loss.dtype)
    return total / count


def singular_values(U):
    """Singular values of the LM-head matrix U (V, d), largest first: (min(V, d),)."""
    return torch.linalg.svdvals(U)


def spectral_entropy(s):
    """Shannon entropy (nats) of q_k = s_k^2 / sum s^2, the share of U's energy in each singular
    direction: log(rank) when all directions are used equally, 0 when one dominates."""
    q = s.pow(2) / s.pow(2).sum()
    return -(q * torch.log(q.clamp_min(torch.finfo(q.dtype).tiny))).sum()


def anisotropy(h):
    """Mean pairwise cosine of the rows of h (N, d) over pairs i != j, in O(N d):
    with unit rows u_i, sum_{i != j} <u_i, u_j> = |sum_i u_i|^2 - N."""
    u = F.normalize(h, dim=-1)
    N = u.shape[0]
    return (u.sum(0).pow(2).sum() - N) / (N * (N - 1))
