"""The specification of metrics.py: every measurement against a brute-force computation that
loops over tokens and calls autograd on one loss at a time, on a tiny GPT in float64."""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

import metrics as M
from model import GPT, GPTConfig, per_token_loss

B, T, V = 2, 8, 37
RTOL = 1e-6


def tiny(tie=False, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=2, n_head=2, n_embd=16, tie_weights=tie)).double()
    # move away from the near-uniform initial state so that the gradients are not degenerate
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    return model, x, y


def per_token_grads(model, x, y):
    """Brute force: g_i = d l_i / d theta for each token, one autograd call per token."""
    params = dict(model.named_parameters())
    losses = per_token_loss(model(x)[0], y).reshape(-1)
    return [dict(zip(params, torch.autograd.grad(l, list(params.values()), retain_graph=True))) for l in losses]


def close(a, b):
    np.testing.assert_allclose(torch.as_tensor(a).detach().numpy(), torch.as_tensor(b).detach().numpy(), rtol=RTOL, atol=1e-12)


# 1. destructive interference ---------------------------------------------------------------

def test_interference_extremes_and_identity():
    x = torch.tensor([1.0, -1.0, 2.5, -2.5], dtype=torch.float64)
    assert M.destructive_interference(x).item() == 1.0  # exact cancellation
    assert M.destructive_interference(x.abs()).item() == 0.0  # one sign
    r = torch.randn(5, 1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.1
    D, Mag = M.destructive_interference(r), M.interference_magnitude(r)
    assert torch.all((D >= 0) & (D <= 1))
    close(r.mean(-1).abs(), (1 - D) * Mag)  # |mean x| = (1 - D) M
    close(M.destructive_interference(r, dim=0), 1 - r.sum(0).abs() / r.abs().sum(0))
    assert torch.isnan(M.destructive_interference(torch.zeros(3)))


def test_sign_flip_null_is_seeded_and_near_one_for_many_tokens():
    x = torch.rand(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # all positive: D = 0
    a = M.sign_flip_null(x, generator=torch.Generator().manual_seed(1))
    b = M.sign_flip_null(x, generator=torch.Generator().manual_seed(1))
    assert a == b and M.destructive_interference(x) == 0 and a > 0.9


# 2. output-layer decomposition -------------------------------------------------------------

def test_output_decomposition_matches_autograd_per_token():
    model, x, y = tiny()
    h = model.hidden(x).detach().reshape(-1, 16)
    U = model.lm_head.weight.detach()
    yf = y.reshape(-1)
    out = M.output_decomposition(h, U, yf)
    for i in range(h.shape[0]):
        hi = h[i].clone().requires_grad_(True)
        z = U @ hi
        p = torch.softmax(z, -1).detach()
        # seeding the logits with grad_z+ / grad_z- and backpropagating gives grad_h+ / grad_h-
        gp = torch.autograd.grad(z, hi, M.grad_z_plus(p[None], yf[i:i + 1])[0], retain_graph=True)[0]
        gm = torch.autograd.grad(z, hi, M.grad_z_minus(p[None], yf[i:i + 1])[0], retain_graph=True)[0]
        g = torch.autograd.grad(F.cross_entropy(z[None], yf[i:i + 1]), hi)[0]
        close(gp + gm, g)  # grad_h+ + grad_h- = dl/dh
        close(out['cos_h_plus'][i], F.cosine_similarity(hi, gp, dim=0, eps=0))
        close(out['cos_h_minus'][i], F.cosine_similarity(hi, gm, dim=0, eps=0))
        close(out['cos_plus_minus'][i], F.cosine_similarity(gp, gm, dim=0, eps=0))
        close(out['cos_h_plus'][i], -F.cosine_similarity(hi, U[yf[i]], dim=0, eps=0))
        close(out['norm_plus'][i], gp.norm())
        close(out['norm_minus'][i], gm.norm())
        close(out['norm_grad'][i], g.norm())
        close(out['p_y'][i], p[yf[i]])


def test_grad_z_parts_sum_to_the_logit_gradient():
    p = torch.softmax(torch.randn(6, V, dtype=torch.float64), -1)
    y = torch.randint(0, V, (6,))
    close(M.grad_z_plus(p, y) + M.grad_z_minus(p, y), p - F.one_hot(y, V))
    assert torch.all(M.grad_z_plus(p, y) <= 0) and torch.all(M.grad_z_minus(p, y) >= 0)


# 3. parameter-space decomposition ----------------------------------------------------------

@pytest.mark.parametrize('tie', [False, True])
def test_theta_decomposition_matches_per_token_loop(tie):
    model, x, y = tiny(tie)
    params = dict(model.named_parameters())
    logits = model(x)[0]
    out = M.theta_decomposition(logits, y, params)
    # brute force: each token's logit row seeded with grad_z+ / N, one backward per token
    N = B * T
    plus = {n: torch.zeros_like(p) for n, p in params.items()}
    full = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in range(B):
        for t in range(T):
            z = model(x)[0][b, t]
            p = torch.softmax(z, -1).detach()
            gp = torch.autograd.grad(z, list(params.values()), M.grad_z_plus(p[None], y[b, t:t + 1])[0] / N,
                                     retain_graph=True, allow_unused=True)
            g = torch.autograd.grad(F.cross_entropy(z[None], y[b, t:t + 1]) / N, list(params.values()), allow_unused=True)
            for n, a, c in zip(params, gp, g):
                plus[n] += 0 if a is None else a
                full[n] += 0 if c is None else c
    full_batch = dict(zip(params, torch.autograd.grad(per_token_loss(model(x)[0], y).mean(), list(params.values()))))
    for n in params:
        close(full[n], full_batch[n])  # the loop is right
        minus = full[n] - plus[n]
        close(out[n]['cos'], F.cosine_similarity(plus[n].flatten(), minus.flatten(), dim=0, eps=0))
        close(out[n]['norm_plus'], plus[n].norm())
        close(out[n]['norm_minus'], minus.norm())
        close(out[n]['norm_grad'], full[n].norm())
    cat = lambda d: torch.cat([v.flatten() for v in d.values()])
    close(out['model']['cos'], F.cosine_similarity(cat(plus), cat(full) - cat(plus), dim=0, eps=0))
    # handing in the gradients of the training backward gives the same answer
    logits = model(x)[0]
    again = M.theta_decomposition(logits, y, params, grads=full_batch)
    close(again['model']['norm_minus'], out['model']['norm_minus'])


# 4. gradient opposition --------------------------------------------------------------------

def brute_sums(model, x, y):
    grads = per_token_grads(model, x, y)
    return {n: (sum(g[n] for g in grads), sum(g[n].abs() for g in grads)) for n in grads[0]}


def test_position_local_sums_equal_the_per_token_loop():
    model, x, y = tiny()
    modules = M.position_local_modules(model)
    assert 'transformer.h.1.attn.c_attn' not in modules and not any('h.0' in n for n in modules)
    with M.capture_activations(modules) as acts:
        logits = model(x)[0]
        loss = per_token_loss(logits, y).mean()
        loss.backward(retain_graph=True)
        M.theta_decomposition(logits, y, dict(model.named_parameters()))  # a second backward: ignored
    local = M.position_local_gradient_sums(modules, acts, B * T)
    brute = brute_sums(model, x, y)
    assert set(local) == {'lm_head.weight', 'transformer.ln_f.weight', 'transformer.ln_f.bias',
                          'transformer.h.1.ln_2.weight', 'transformer.h.1.ln_2.bias',
                          'transformer.h.1.attn.c_proj.weight', 'transformer.h.1.attn.c_proj.bias',
                          'transformer.h.1.mlp.c_fc.weight', 'transformer.h.1.mlp.c_fc.bias',
                          'transformer.h.1.mlp.c_proj.weight', 'transformer.h.1.mlp.c_proj.bias'}
    for n, (s, a) in local.items():
        close(s, brute[n][0])
        close(a, brute[n][1])


def test_the_local_recipe_would_be_wrong_for_the_last_blocks_c_attn():
    model, x, y = tiny()
    c_attn = {'transformer.h.1.attn.c_attn': model.transformer.h[1].attn.c_attn}
    with M.capture_activations(c_attn) as acts:
        per_token_loss(model(x)[0], y).mean().backward()
    wrong = M.position_local_gradient_sums(c_attn, acts, B * T)['transformer.h.1.attn.c_attn.weight']
    right = brute_sums(model, x, y)['transformer.h.1.attn.c_attn.weight']
    close(wrong[0], right[0])  # the sum of gradients is always right (it is the batch gradient) ...
    assert (wrong[1] - right[1]).abs().max() > 1e-3 * right[1].abs().max()  # ... the sum of |g_i| is not


@pytest.mark.parametrize('tie', [False, True])
def test_batched_exact_opposition_equals_the_loop(tie):
    model, x, y = tiny(tie)
    fast = M.per_token_gradient_sums(model, x, y, chunk_size=5)  # a chunk that does not divide N
    brute = brute_sums(model, x, y)
    assert set(fast) == set(brute)
    for n in brute:
        close(fast[n][0], brute[n][0])
        close(fast[n][1], brute[n][1])
    if tie:  # the tied matrix is not local and gets both of its uses
        assert 'lm_head' not in M.position_local_modules(model)
        assert 'transformer.wte.weight' in fast and 'lm_head.weight' not in fast


def test_opposition_summary_is_the_exact_coordinate_mean():
    model, x, y = tiny()
    brute = brute_sums(model, x, y)
    summary = M.opposition_summary(brute, bins=10)
    grads = per_token_grads(model, x, y)
    n = 'transformer.h.0.mlp.c_fc.weight'
    g = torch.stack([gi[n] for gi in grads])  # (N, *shape)
    D = 1 - g.sum(0).abs() / g.abs().sum(0)
    close(summary[n]['mean'], D.mean())
    close(summary[n]['weighted'], (D * g.abs().sum(0)).sum() / g.abs().sum())
    assert summary[n]['hist'].sum() == D.numel()
    n_coords = sum(p.numel() for p in model.parameters())
    assert summary['model']['hist'].sum() <= n_coords and 'block 0' in summary and 'lm_head' in summary
    assert 0 <= summary['model']['mean'] <= 1


# 5. first-order prediction along the update ----------------------------------------------

@pytest.mark.parametrize('tie', [False, True])
def test_jvp_prediction_equals_the_sum_of_update_weighted_gradients(tie):
    model, x, y = tiny(tie)
    delta = {n: 1e-3 * torch.randn_like(p) for n, p in model.named_parameters()}
    pred = M.predicted_loss_change(model, x, y, delta)
    grads = per_token_grads(model, x, y)
    brute = torch.stack([sum((g[n] * delta[n]).sum() for n in delta) for g in grads])  # sum_j p_ij
    close(pred.reshape(-1), brute)
    # and it predicts the true change of a small step well
    before = per_token_loss(model(x)[0], y).detach()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(delta[n])
    true = per_token_loss(model(x)[0], y).detach() - before
    agreement = M.first_order_agreement(pred, true)
    assert agreement['r2'] > 0.99 and abs(agreement['slope'] - 1) < 0.05


# 6. saturation companions ------------------------------------------------------------------

def test_frequency_buckets_follow_rank():
    counts = torch.tensor([5, 100, 0, 7, 50, 1, 1, 3, 20, 9] * 10)
    bucket, edges = M.frequency_buckets(counts, n_buckets=4)
    assert bucket.min() == 0 and bucket.max() == len(edges) - 2 and edges[0] == 0 and edges[-1] == 100
    order = torch.argsort(-counts, stable=True)
    assert torch.all(bucket[order][1:] >= bucket[order][:-1])  # monotone in rank
    loss = torch.rand(3, 4, dtype=torch.float64)
    targets = torch.randint(0, 100, (3, 4))
    per_bucket = M.bucket_mean_loss(loss, targets, bucket, len(edges) - 1)
    for k in range(len(edges) - 1):
        sel = bucket[targets] == k
        if sel.any():
            close(per_bucket[k], loss[sel].mean())
        else:
            assert torch.isnan(per_bucket[k])


def test_zipf_fit_recovers_an_exact_law_and_flags_an_outlier():
    ranks = torch.arange(1, 501, dtype=torch.float64)
    counts = torch.round(1e6 * ranks ** -1.1).long()
    fit = M.zipf_fit(counts)
    assert abs(fit['slope'] + 1.1) < 1e-3 and fit['outliers'].numel() == 0
    counts[0] *= 30  # the most frequent token far above the line (as ',' or 'the' often are)
    assert M.zipf_fit(counts)['outliers'].tolist() == [0]


def test_anisotropy_spectrum_against_explicit_versions():
    h = torch.randn(50, 8, dtype=torch.float64) + 0.5
    u = F.normalize(h, dim=-1)
    C = u @ u.T
    close(M.anisotropy(h), (C.sum() - C.diagonal().sum()) / (50 * 49))
    U = torch.randn(37, 8, dtype=torch.float64)
    s = M.singular_values(U)
    close(s, torch.from_numpy(np.linalg.svd(U.numpy(), compute_uv=False)))
    q = s ** 2 / (s ** 2).sum()
    close(M.spectral_entropy(s), -(q * q.log()).sum())
    close(M.spectral_entropy(torch.ones(8, dtype=torch.float64)), np.log(8))
