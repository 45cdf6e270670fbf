"""The specification of metrics.py: every measurement against a brute-force computation that
loops over tokens and calls autograd on one loss at a time, on a tiny GPT in float64. Gradient
opposition: the looped definition (metrics.per_token_gradient_sums_looped) is checked against
the per-token Jacobian, and then serves as the reference of both fast paths."""
import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import metrics as M
from model import GPT, GPTConfig, per_token_loss

B, T, V, D_MODEL = 2, 8, 37, 16
N = B * T
RTOL = 1e-6


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # every test deterministic, alone or in any order


def tiny(tie=False, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(block_size=T, vocab_size=V, n_layer=2, n_head=2, n_embd=D_MODEL, tie_weights=tie)
    model = GPT(config).double()
    # move away from the near-uniform initial state so that no gradient is degenerate
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    return model, x, y


def per_token_grads(model, x, y):
    """Brute force: g_i = d l_i / d theta for each token, one autograd call per token."""
    params = dict(model.named_parameters())
    losses = per_token_loss(model(x)[0], y).reshape(-1)
    return [dict(zip(params, torch.autograd.grad(l, list(params.values()), retain_graph=True)))
            for l in losses]


def close(a, b):
    np.testing.assert_allclose(torch.as_tensor(a).detach().numpy(), torch.as_tensor(b).detach().numpy(),
                               rtol=RTOL, atol=1e-12)


def cos(a, b):
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0, eps=0)


# 1. destructive interference ---------------------------------------------------------------

def test_interference_extremes_and_identity():
    x = torch.tensor([1.0, -1.0, 2.5, -2.5], dtype=torch.float64)
    assert M.destructive_interference(x).item() == 1.0  # exact cancellation
    assert M.destructive_interference(x.abs()).item() == 0.0  # one sign
    r = torch.randn(5, 1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.1
    D, Mag = M.destructive_interference(r), M.interference_magnitude(r)
    assert torch.all((D >= 0) & (D <= 1))
    close(r.mean(-1).abs(), (1 - D) * Mag)  # |mean x| = (1 - D) M
    close(Mag, r.abs().mean(-1))
    close(M.destructive_interference(r, dim=0), 1 - r.sum(0).abs() / r.abs().sum(0))
    assert torch.isnan(M.destructive_interference(torch.zeros(3)))  # undefined, not 0 or 1


def test_sign_flip_null_is_seeded_and_keeps_magnitudes():
    x = torch.rand(3, 4096, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # all > 0: D = 0
    a = M.sign_flip_null(x, generator=torch.Generator().manual_seed(1))
    b = M.sign_flip_null(x, generator=torch.Generator().manual_seed(1))
    c = M.sign_flip_null(x, generator=torch.Generator().manual_seed(2))
    assert a.shape == (3,) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.all(M.destructive_interference(x) == 0) and torch.all((a > 0.9) & (a <= 1))
    assert M.sign_flip_null(torch.tensor([2.0]), generator=torch.Generator().manual_seed(0)) == 0  # N = 1
    # the mean of the draws, brute force: D of each draw of signs, then their mean
    x = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    signs = torch.randint(0, 2, (64, 50), generator=torch.Generator().manual_seed(4)).double() * 2 - 1
    draws = torch.stack([1 - (x.abs() * s).sum().abs() / x.abs().sum() for s in signs])
    close(M.sign_flip_null(x, generator=torch.Generator().manual_seed(4)), draws.mean())
    columns = torch.stack([x, -x], 1)  # (50, 2), D over dim 0: the signs (64, 50, 2)
    signs = torch.randint(0, 2, (64, 50, 2), generator=torch.Generator().manual_seed(4)).double() * 2 - 1
    brute = (1 - (columns.abs() * signs).sum(1).abs() / columns.abs().sum(0)).mean(0)  # (2,)
    close(M.sign_flip_null(columns, dim=0, generator=torch.Generator().manual_seed(4)), brute)


@pytest.mark.parametrize('n', [128, 2048])
def test_the_analytic_null_matches_many_sign_draws(n):
    """expected_null_interference (a normal approximation) against a Monte Carlo mean of 20000 sign
    draws, on heavy-tailed magnitudes like real per-token loss changes; and the standard error of the
    default 64-draw null that sign_flip_null's docstring points to."""
    x = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).exp()  # log-normal
    signs = torch.randint(0, 2, (20000, n), generator=torch.Generator().manual_seed(1)).double() * 2 - 1
    draws = 1 - (x * signs).sum(1).abs() / x.sum()  # (20000,) D of each draw
    analytic = M.expected_null_interference(x.sum(), x.pow(2).sum())
    assert abs(analytic - draws.mean()) < 4 * draws.std() / 20000 ** 0.5 + 0.1 / n  # CLT: error O(1/N)
    stderr = draws.std() / 64 ** 0.5  # of a 64-draw mean
    print(f"N = {n}: null {draws.mean():.4f}, analytic {analytic:.4f}, 64-draw standard error {stderr:.4f}")
    assert stderr < (1 - draws.mean()) / 4
    # few numbers: the approximation's documented error
    close(M.expected_null_interference(torch.tensor(2.0), torch.tensor(4.0)), 1 - (2 / np.pi) ** 0.5)
    one = torch.tensor([1.0, 1.0], dtype=torch.float64)
    close(M.expected_null_interference(one.sum(), one.pow(2).sum()), 1 - (2 / np.pi) ** 0.5 * 2 ** 0.5 / 2)


# 2. output-layer decomposition -------------------------------------------------------------

def test_grad_z_parts_sum_to_the_logit_gradient():
    p = torch.softmax(torch.randn(6, V, dtype=torch.float64), -1)
    y = torch.randint(0, V, (6,))
    close(M.grad_z_plus(p, y) + M.grad_z_minus(p, y), p - F.one_hot(y, V))
    assert torch.all(M.grad_z_plus(p, y) <= 0) and torch.all(M.grad_z_minus(p, y) >= 0)
    assert torch.all((M.grad_z_plus(p, y) != 0).sum(1) == 1)  # only the true logit


def test_output_decomposition_matches_autograd_per_token():
    model, x, y = tiny()
    h = model.hidden(x).detach().reshape(-1, D_MODEL)
    U = model.lm_head.weight.detach()
    yf = y.reshape(-1)
    out = M.output_decomposition(h, U, yf)
    assert set(out) == {'p_y', 'cos_h_plus', 'cos_h_minus', 'cos_plus_minus', 'norm_plus', 'norm_minus',
                        'norm_grad'}
    given = M.output_decomposition(h, U, yf, probs=torch.softmax(h @ U.T, -1))  # the caller's p: the same
    for k in out:
        close(given[k], out[k])
    for i in range(N):
        hi = h[i].clone().requires_grad_(True)
        z = U @ hi
        p = torch.softmax(z, -1).detach()
        # seeding the token's logits with grad_z+ / grad_z- and backpropagating gives grad_h+ / grad_h-
        gp = torch.autograd.grad(z, hi, M.grad_z_plus(p[None], yf[i:i + 1])[0], retain_graph=True)[0]
        gm = torch.autograd.grad(z, hi, M.grad_z_minus(p[None], yf[i:i + 1])[0], retain_graph=True)[0]
        g = torch.autograd.grad(F.cross_entropy(z[None], yf[i:i + 1]), hi)[0]
        close(gp + gm, g)  # grad_h+ + grad_h- = dl/dh
        close(out['cos_h_plus'][i], cos(hi, gp))
        close(out['cos_h_minus'][i], cos(hi, gm))
        close(out['cos_plus_minus'][i], cos(gp, gm))
        close(out['cos_h_plus'][i], -cos(hi, U[yf[i]]))
        close(out['norm_plus'][i], gp.norm())
        close(out['norm_minus'][i], gm.norm())
        close(out['norm_grad'][i], g.norm())
        close(out['p_y'][i], p[yf[i]])


def test_cosine_with_a_zero_vector_is_nan():
    assert torch.isnan(M.cosine(torch.zeros(3), torch.ones(3)))


# 3. parameter-space decomposition ----------------------------------------------------------

@pytest.mark.parametrize('tie', [False, True])
def test_theta_decomposition_matches_per_token_loop(tie):
    model, x, y = tiny(tie)
    params = dict(model.named_parameters())
    logits = model(x)[0]
    out = M.theta_decomposition(logits, y, params)
    # brute force: each token's logit row seeded with grad_z+ / N and grad_z- / N, one backward each
    plus = {n: torch.zeros_like(p) for n, p in params.items()}
    minus = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in range(B):
        for t in range(T):
            z = model(x)[0][b, t]
            p = torch.softmax(z, -1).detach()
            for acc, part in ((plus, M.grad_z_plus), (minus, M.grad_z_minus)):
                g = torch.autograd.grad(z, list(params.values()), part(p[None], y[b, t:t + 1])[0] / N,
                                        retain_graph=True, allow_unused=True)
                for n, gn in zip(params, g):
                    acc[n] += 0 if gn is None else gn
    mean_loss = per_token_loss(model(x)[0], y).mean()
    full = dict(zip(params, torch.autograd.grad(mean_loss, list(params.values()))))
    for n in params:
        close(plus[n] + minus[n], full[n])  # grad_theta+ + grad_theta- = grad_theta of the mean loss
        close(out[n]['cos'], cos(plus[n], minus[n]))
        close(out[n]['norm_plus'], plus[n].norm())
        close(out[n]['norm_minus'], minus[n].norm())
        close(out[n]['norm_grad'], full[n].norm())
    cat = lambda d: torch.cat([v.flatten() for v in d.values()])
    close(out['model']['cos'], cos(cat(plus), cat(minus)))
    close(out['model']['norm_grad'], cat(full).norm())
    # the caller's graph survives, and handing in the training gradients gives the same answer
    again = M.theta_decomposition(logits, y, params, grads=full)
    for n in out:
        for k in out[n]:
            close(again[n][k], out[n][k])


def test_theta_decomposition_averages_over_data_parallel_processes():
    # two "processes" hold one sequence each; DDP has averaged p.grad, `average` does the same to grad+
    model, x, y = tiny()
    params = dict(model.named_parameters())
    mean_loss = per_token_loss(model(x)[0], y).mean()
    full = dict(zip(params, torch.autograd.grad(mean_loss, list(params.values()))))
    logits1 = model(x[1:])[0]
    p1 = torch.softmax(logits1.detach(), -1).reshape(T, V)
    seed1 = (M.grad_z_plus(p1, y[1]) / T).view(1, T, V)
    other = iter(torch.autograd.grad(logits1, list(params.values()), seed1))  # grad+ of process 1
    average = lambda t: t.add_(next(other)).div_(2)  # what all_reduce and / world do, in process 0
    out = M.theta_decomposition(model(x[:1])[0], y[:1], params, grads=full, average=average)
    ref = M.theta_decomposition(model(x)[0], y, params)  # one process, the whole batch
    for n in ref:
        for k in ref[n]:
            close(out[n][k], ref[n][k])


@pytest.mark.parametrize('tie', [False, True])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_theta_decomposition_from_h_equals_the_backward_from_the_logits(tie, dtype):
    """The cheaper route of grad_theta+ (U's part a row scatter, one backward from h seeded with grad_h+
    for the rest) against the backward from the logits that the brute-force test above checks: the
    same numbers, up to rounding (largest relative difference printed; -s to see it)."""
    model, x, y = tiny(tie)
    model = model.to(dtype)
    params = dict(model.named_parameters())
    logits, _, h = model(x, return_hidden=True)
    grads = dict(zip(params, torch.autograd.grad(per_token_loss(logits, y).mean(), list(params.values()),
                                                 retain_graph=True)))
    head = 'transformer.wte.weight' if tie else 'lm_head.weight'
    assert params[head] is model.lm_head.weight
    old = M.theta_decomposition(logits, y, params, grads)
    new = M.theta_decomposition(logits, y, params, grads, h=h, head=head)
    # and with p_y = exp(-l_i) from the per-token losses instead of a softmax
    losses = per_token_loss(logits, y)
    from_losses = M.theta_decomposition(logits, y, params, grads, h=h, head=head, losses=losses)
    for route, out in [('from h', new), ('from h and the losses', from_losses)]:
        assert list(out) == list(old)
        # cosines in [-1, 1]: their absolute difference; norms: relative
        cos = max(float((out[n]['cos'] - old[n]['cos']).abs()) for n in old)
        norms = max(float((out[n][k] - old[n][k]).abs() / old[n][k])
                    for n in old for k in old[n] if k != 'cos')
        print(f"theta_decomposition {route}, {dtype}, tie={tie}: largest difference of a cosine {cos:.1e}, "
              f"largest relative difference of a norm {norms:.1e}")
        assert max(cos, norms) < (1e-12 if dtype == torch.float64 else 1e-6)
    # the graph survives for the caller (both routes retain it): once more, the gradient computed here
    again = M.theta_decomposition(logits, y, params, h=h, head=head)['model']['cos']
    assert abs(float(again - new['model']['cos'])) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_theta_decomposition_sums_a_large_fp32_model_without_fp32_rounding():
    """The 'model' column runs over every parameter (here 0.6M): its sums must not be fp32 reductions
    over the whole vector, off by 1e-4 at a million coordinates. |grad| of the model and of each tensor
    against the float64 norm of the same fp32 gradients (the other columns' sums are formed alike)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=4096, n_layer=2, n_head=2, n_embd=64))
    x, y = torch.randint(0, 4096, (4, 32)), torch.randint(0, 4096, (4, 32))
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) > 600_000
    logits, _, h = model(x, return_hidden=True)
    losses = per_token_loss(logits, y)
    grads = dict(zip(params, torch.autograd.grad(losses.mean(), list(params.values()), retain_graph=True)))
    out = M.theta_decomposition(logits, y, params, grads, h=h, head='lm_head.weight', losses=losses)
    whole = torch.cat([g.flatten() for g in grads.values()]).double().norm()
    np.testing.assert_allclose(float(out['model']['norm_grad']), float(whole), rtol=1e-6)
    for name, g in grads.items():
        np.testing.assert_allclose(float(out[name]['norm_grad']), float(g.double().norm()), rtol=1e-6)


def test_position_local_signed_sums_from_the_gradient_equal_the_matmul():
    """position_local_gradient_sums with grads (p.grad of the same mean loss): sum_s g_s = N p.grad, the
    other two sums unchanged, bitwise; the signed sums equal G^T X up to rounding (largest difference
    printed), in float64 and float32."""
    for dtype in (torch.float64, torch.float32):
        model, x, y = tiny()
        model = model.to(dtype)
        modules = M.position_local_modules(model)
        with M.capture_activations(modules) as acts:
            per_token_loss(model(x)[0], y).mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        old = M.position_local_gradient_sums(modules, acts, N)
        new = M.position_local_gradient_sums(modules, acts, N, grads)
        assert list(new) == list(old)
        worst = 0.0
        for n in old:
            assert torch.equal(new[n][1], old[n][1]) and torch.equal(new[n][2], old[n][2])
            worst = max(worst, float((new[n][0] - old[n][0]).abs().max() / old[n][0].abs().max()))
            assert not new[n][0].data_ptr() == grads[n].data_ptr()  # a copy: p.grad untouched
        print(f"position-local signed sums from N p.grad, {dtype}: largest relative difference {worst:.1e}")
        assert worst < (1e-12 if dtype == torch.float64 else 1e-5)


# 4. gradient opposition --------------------------------------------------------------------

LOCAL = {'lm_head.weight', 'transformer.ln_f.weight', 'transformer.ln_f.bias',
         'transformer.h.1.ln_2.weight', 'transformer.h.1.ln_2.bias',
         'transformer.h.1.attn.c_proj.weight', 'transformer.h.1.attn.c_proj.bias',
         'transformer.h.1.mlp.c_fc.weight', 'transformer.h.1.mlp.c_fc.bias',
         'transformer.h.1.mlp.c_proj.weight', 'transformer.h.1.mlp.c_proj.bias'}


@pytest.mark.parametrize('tie', [False, True])
def test_the_looped_definition_is_the_per_token_jacobian(tie):
    """The reference itself, against an independent computation: the Jacobian of the N per-token
    losses with respect to every parameter (torch.func.jacrev: reverse mode vectorised over tokens,
    attention in the plain-math kernel), whose row i is g_i."""
    model, x, y = tiny(tie)
    looped = M.per_token_gradient_sums_looped(model, x, y)
    params = {n: p.detach() for n, p in model.named_parameters()}
    assert list(looped) == list(params)  # a tied matrix once, as named_parameters() gives it

    def losses(p):
        return per_token_loss(functional_call(model, p, (x,))[0], y).reshape(-1)  # (N,)
    with sdpa_kernel(SDPBackend.MATH):
        jacobian = jacrev(losses)(params)  # name -> (N, *shape): row i is g_i
    for n, g in jacobian.items():
        close(looped[n][0], g.sum(0))
        close(looped[n][1], g.abs().sum(0))
        close(looped[n][2], g.pow(2).sum(0))
    # sum_i g_i is the gradient of the summed loss, N times that of the mean
    total = torch.autograd.grad(per_token_loss(model(x)[0], y).sum(), list(model.parameters()))
    for n, g in zip(params, total):
        close(looped[n][0], g)
    # some parameters (in the order given), over the first 5 tokens
    names = ['transformer.ln_f.bias', 'transformer.h.0.attn.c_attn.weight']
    some = M.per_token_gradient_sums_looped(model, x, y, names=names, n_tokens=5)
    assert list(some) == names
    for n in names:
        close(some[n][0], jacobian[n][:5].sum(0))
        close(some[n][1], jacobian[n][:5].abs().sum(0))


@pytest.mark.parametrize('tie', [False, True])
def test_position_local_sums_equal_the_looped_definition(tie):
    model, x, y = tiny(tie)
    modules = M.position_local_modules(model)
    with M.capture_activations(modules) as acts:
        logits = model(x)[0]
        per_token_loss(logits, y).mean().backward(retain_graph=True)
        M.theta_decomposition(logits, y, dict(model.named_parameters()))  # later backward passes: ignored
    assert all(not m._forward_hooks for m in modules.values())  # hooks removed on exit
    local = M.position_local_gradient_sums(modules, acts, N)
    # no attn.c_attn, no ln_1, nothing of block 0, no embeddings; no head when tied
    assert set(local) == LOCAL - ({'lm_head.weight'} if tie else set())
    looped = M.per_token_gradient_sums_looped(model, x, y, names=list(local))
    for n, (s, a, q) in local.items():
        close(s, looped[n][0])
        close(a, looped[n][1])
        close(q, looped[n][2])  # (G^2)^T (X^2)


def test_the_local_recipe_would_be_wrong_for_the_last_blocks_c_attn():
    model, x, y = tiny()
    c_attn = {'transformer.h.1.attn.c_attn': model.transformer.h[1].attn.c_attn}
    with M.capture_activations(c_attn) as acts:
        per_token_loss(model(x)[0], y).mean().backward()
    name = 'transformer.h.1.attn.c_attn.weight'
    wrong = M.position_local_gradient_sums(c_attn, acts, N)[name]
    right = M.per_token_gradient_sums_looped(model, x, y, names=[name])[name]
    close(wrong[0], right[0])  # the sum of gradients is always right (N times the batch gradient) ...
    assert (wrong[1] - right[1]).abs().max() > 1e-3 * right[1].abs().max()  # ... the sum of |g_i| is not


@pytest.mark.parametrize('tie', [False, True])
def test_batched_exact_opposition_equals_the_looped_definition(tie):
    model, x, y = tiny(tie)
    fast = M.per_token_gradient_sums(model, x, y, chunk_size=5)  # a chunk size that does not divide N
    looped = M.per_token_gradient_sums_looped(model, x, y)
    assert set(fast) == set(looped) == set(dict(model.named_parameters()))
    for n in looped:
        for k in range(3):
            close(fast[n][k], looped[n][k])
    # the key bias: exact zeros here, rounding noise in the loop (its true gradient is 0)
    for i in range(2):
        key_bias = looped[f'transformer.h.{i}.attn.c_attn.bias'][1]
        assert torch.all(fast[f'transformer.h.{i}.attn.c_attn.bias'][1][D_MODEL:2 * D_MODEL] == 0)
        assert key_bias[D_MODEL:2 * D_MODEL].max() < 1e-12 * key_bias.max()
    if tie:  # the tied matrix appears once, is not local, and its g_i has both of its uses
        assert 'lm_head' not in M.position_local_modules(model) and 'lm_head.weight' not in fast
        W = model.transformer.wte.weight
        l0 = per_token_loss(model(x)[0], y).reshape(-1)[0]
        g_head = torch.autograd.grad(l0, W, retain_graph=True)[0]
        h = model.hidden(x)
        g_only_head = torch.autograd.grad(per_token_loss(F.linear(h.detach(), W), y).reshape(-1)[0], W)[0]
        assert (g_head - g_only_head).abs().max() > 1e-6  # the embedding use matters ...
        close(looped['transformer.wte.weight'][0], fast['transformer.wte.weight'][0])  # ... and is counted


@pytest.mark.parametrize('tie', [False, True])
def test_per_token_dots_with_an_update_are_exact(tie):
    """With delta, per_token_gradient_sums also gives <g_i, delta> per parameter tensor and token:
    brute force from the per-token gradients (key biases excluded: their per-token gradient is 0)."""
    model, x, y = tiny(tie)
    delta = {n: 1e-3 * torch.randn_like(p) for n, p in model.named_parameters()}
    sums, dots = M.per_token_gradient_sums(model, x, y, chunk_size=5, delta=delta)
    plain = M.per_token_gradient_sums(model, x, y, chunk_size=5)
    for n in plain:
        for k in range(3):
            assert torch.equal(sums[n][k], plain[n][k])  # the sums do not change
    grads = per_token_grads(model, x, y)
    for n in delta:
        brute = torch.stack([(g[n] * delta[n]).sum() for g in grads])  # (N,) sum_j p_ij within tensor n
        if n.endswith('attn.c_attn.bias'):
            brute = torch.stack([(g[n][D_MODEL:2 * D_MODEL] * delta[n][D_MODEL:2 * D_MODEL]).sum()
                                 for g in grads])
            brute = torch.stack([(g[n] * delta[n]).sum() for g in grads]) - brute  # without the key part
        close(dots[n], brute)
    close(sum(dots.values()), M.predicted_loss_change(model, x, y, delta).reshape(-1))  # the JVP


def test_key_bias_zeroed_copies_and_zeros_only_the_key_part():
    """The attention key biases c_attn.bias[d:2d] at exact 0 in a copy; the input and every other
    tensor untouched (per_token_gradient_sums applies it to the caller's update and to its sums)."""
    model, _, _ = tiny()
    delta = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    before = {n: t.clone() for n, t in delta.items()}
    zeroed = M.key_bias_zeroed(model, delta)
    assert list(zeroed) == list(delta)
    for n, t in delta.items():
        assert torch.equal(t, before[n])
        if n.endswith('attn.c_attn.bias'):
            assert torch.all(zeroed[n][D_MODEL:2 * D_MODEL] == 0)
            assert torch.equal(zeroed[n][:D_MODEL], t[:D_MODEL])
            assert torch.equal(zeroed[n][2 * D_MODEL:], t[2 * D_MODEL:])
        else:
            assert zeroed[n] is t


def test_coordinate_opposition_and_summary_are_exact():
    model, x, y = tiny()
    sums = M.per_token_gradient_sums_looped(model, x, y)
    for k in range(3):  # a coordinate no token moves: left out, not NaN
        sums['transformer.wpe.weight'][k][-1, -1] = 0
    summary = M.opposition_summary(sums, bins=10)
    grads = per_token_grads(model, x, y)
    n = 'transformer.h.0.mlp.c_fc.weight'
    g = torch.stack([gi[n] for gi in grads])  # (N, *shape)
    D = 1 - g.sum(0).abs() / g.abs().sum(0)  # brute-force D_j
    close(M.coordinate_opposition(*sums[n]), D.flatten())
    close(summary[n]['mean'], D.mean())
    null = 1 - (2 / np.pi) ** 0.5 * g.pow(2).sum(0).sqrt() / g.abs().sum(0)  # per coordinate
    close(summary[n]['null'], null.clamp(0, 1).mean())
    close(summary[n]['weighted'], (D * g.abs().sum(0)).sum() / g.abs().sum())  # weights sum_i |g_ij|
    close(summary[n]['hist'], np.histogram(D.numpy(), bins=10, range=(0, 1))[0])
    assert summary[n]['hist'].sum() == summary[n]['n'] == D.numel()
    # layers group 'transformer.h.{i}.*'; the model is every coordinate with sum |g| > 0
    block0 = [k for k in sums if k.startswith('transformer.h.0.')]
    D0 = torch.cat([1 - sums[k][0].flatten().abs() / sums[k][1].flatten() for k in block0])
    close(summary['h.0']['mean'], D0.mean())
    assert list(summary) == M.opposition_keys(list(sums))  # the column order train.py records
    assert set(summary) == set(sums) | {'h.0', 'h.1', 'embeddings', 'ln_f', 'lm_head', 'blocks', 'model'}
    # blocks, the published headline: every coordinate of the blocks' weight matrices, brute force
    matrices = [k for k in sums if k.startswith('transformer.h.') and k.endswith(
        ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight'))]
    assert len(matrices) == 4 * 2 and all(M.is_block_matrix(k) for k in matrices)
    assert sum(M.is_block_matrix(k) for k in sums) == len(matrices)  # no bias, norm, embedding or head
    g = torch.cat([torch.stack([gi[k].flatten() for gi in grads]) for k in matrices], 1)  # (N, n_coords)
    moved = g.abs().sum(0) > 0
    D_blocks = 1 - g.sum(0).abs()[moved] / g.abs().sum(0)[moved]
    close(summary['blocks']['mean'], D_blocks.mean())
    null = 1 - (2 / np.pi) ** 0.5 * g.pow(2).sum(0).sqrt()[moved] / g.abs().sum(0)[moved]
    close(summary['blocks']['null'], null.clamp(0, 1).mean())
    close(summary['blocks']['weighted'], 1 - g.sum(0).abs().sum() / g.abs().sum())
    assert summary['blocks']['n'] == moved.sum()
    # near-total opposition: the share of those coordinates with D_j > 0.99, counted one by one
    near = sum(1 for j in range(g.shape[1])
               if moved[j] and 1 - abs(g[:, j].sum()) / g[:, j].abs().sum() > 0.99)
    close(summary['blocks']['near_total'], near / moved.sum().item())
    close(summary[n]['near_total'], (D > M.NEAR_TOTAL).double().mean())
    # another name for the total; no blocks column without a block matrix
    head_and_norm = {k: sums[k] for k in ['lm_head.weight', 'transformer.ln_f.weight']}
    local = M.opposition_summary(head_and_norm, total='local')
    assert list(local) == ['lm_head.weight', 'transformer.ln_f.weight', 'lm_head', 'ln_f', 'local']
    wpe = M.coordinate_opposition(*sums['transformer.wpe.weight'])
    assert wpe.numel() == T * D_MODEL - 1 and not torch.isnan(wpe).any()
    unused_rows = V - x.unique().numel()  # embedding rows of tokens absent from the batch: no gradient
    n_coords = sum(p.numel() for p in model.parameters()) - unused_rows * D_MODEL - 1
    assert summary['model']['hist'].sum() == summary['model']['n'] == n_coords
    assert 0 <= summary['model']['mean'] <= 1


def test_update_weighted_terms_are_exact():
    """Cg, CuG, Cug, C_i_dli, M_i_dli from p_ij = g_ij delta_j built token by token (brute force),
    for a tensor, a layer, the blocks and the model."""
    model, x, y = tiny()
    delta = {n: 1e-3 * torch.randn_like(p) for n, p in model.named_parameters()}
    sums, dots = M.per_token_gradient_sums_looped(model, x, y), None
    _, dots = M.per_token_gradient_sums(model, x, y, delta=delta)
    terms = M.update_weighted_terms(sums, M.key_bias_zeroed(model, delta), dots)
    assert list(terms) == M.opposition_keys(list(sums))
    grads = per_token_grads(model, x, y)
    zeroed = M.key_bias_zeroed(model, delta)
    for key, names in [('transformer.h.0.mlp.c_fc.weight', ['transformer.h.0.mlp.c_fc.weight']),
                       ('h.1', [n for n in sums if n.startswith('transformer.h.1.')]),
                       ('blocks', [n for n in sums if M.is_block_matrix(n)]), ('model', list(sums))]:
        p = torch.stack([torch.cat([(g[n] * zeroed[n]).flatten() for n in names]) for g in grads])  # (N, n_j)
        close(terms[key]['Cg'], p.sum(0).abs().sum() / p.abs().sum())
        close(terms[key]['CuG'], p.sum().abs() / p.sum(0).abs().sum())
        close(terms[key]['Cug'], p.sum(1).abs().sum() / p.abs().sum())
        close(terms[key]['C_i_dli'], p.sum().abs() / p.sum(1).abs().sum())
        close(terms[key]['M_i_dli'], p.sum(1).abs().mean())
        assert 0 <= terms[key]['Cg'] <= 1 and 0 <= terms[key]['Cug'] <= 1


# 5. first-order prediction along the update ----------------------------------------------

@pytest.mark.parametrize('tie', [False, True])
def test_jvp_prediction_equals_the_sum_of_update_weighted_gradients(tie):
    model, x, y = tiny(tie)
    delta = {n: 1e-3 * torch.randn_like(p) for n, p in model.named_parameters()}
    pred = M.predicted_loss_change(model, x, y, delta)
    assert pred.shape == (B, T)
    grads = per_token_grads(model, x, y)
    brute = torch.stack([sum((g[n] * delta[n]).sum() for n in delta) for g in grads])  # sum_j p_ij
    close(pred.reshape(-1), brute)
    # and it predicts the true change of a small step well
    before = per_token_loss(model(x)[0], y).detach()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(delta[n])
    true = per_token_loss(model(x)[0], y).detach() - before
    # expanding around theta_t given explicitly, while the model already holds theta_t + delta
    before = {n: p - delta[n] for n, p in model.named_parameters()}
    close(M.predicted_loss_change(model, x, y, delta, params=before), pred)
    agreement = M.first_order_agreement(pred, true)
    assert agreement['r2'] > 0.99 and abs(agreement['slope'] - 1) < 0.05 and agreement['rel_err'] < 0.1
    close(agreement['corr'], np.corrcoef(pred.flatten().numpy(), true.flatten().numpy())[0, 1])


def test_jvp_works_in_float32_through_attention():
    model, x, y = tiny()
    model.float()
    delta = {n: 1e-3 * torch.randn_like(p) for n, p in model.named_parameters()}
    pred = M.predicted_loss_change(model, x, y, delta)  # the fused CPU attention has no forward AD
    grads = per_token_grads(model, x, y)
    brute = torch.stack([sum((g[n] * delta[n]).sum() for n in delta) for g in grads])
    np.testing.assert_allclose(pred.reshape(-1).numpy(), brute.numpy(), rtol=1e-3, atol=1e-6)


def test_first_order_agreement_on_known_numbers():
    pred = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    a = M.first_order_agreement(pred, 2 * pred)  # true = 2 pred
    close(a['slope'], 2.0)
    close(a['corr'], 1.0)
    close(a['rel_err'], 0.5)
    close(a['r2'], 1 - (pred ** 2).sum() / ((2 * pred - 4) ** 2).sum())


# 6. saturation companions ------------------------------------------------------------------

def test_frequency_buckets_follow_rank_and_bucket_losses():
    counts = torch.tensor([5, 100, 0, 7, 50, 1, 1, 3, 20, 9] * 10)
    bucket, edges = M.frequency_buckets(counts, n_buckets=4)
    n_buckets = len(edges) - 1
    assert edges[0] == 0 and edges[-1] == 100 and torch.all(edges[1:] > edges[:-1])
    assert torch.all(torch.bincount(bucket, minlength=n_buckets) > 0) and bucket.max() == n_buckets - 1
    order = torch.argsort(-counts, stable=True)  # token ids by rank
    assert torch.all(bucket[order][1:] >= bucket[order][:-1])  # monotone in rank
    for k in range(n_buckets):  # bucket k holds ranks edges[k] .. edges[k+1] - 1
        in_bucket = torch.nonzero(bucket == k).flatten()
        assert set(order[edges[k]:edges[k + 1]].tolist()) == set(in_bucket.tolist())
    loss = torch.rand(3, 4, dtype=torch.float64)
    targets = torch.randint(0, 100, (3, 4))
    per_bucket = M.bucket_mean(loss, targets, bucket, n_buckets)
    for k in range(n_buckets):
        sel = bucket[targets] == k
        if sel.any():
            close(per_bucket[k], loss[sel].mean())
        else:
            assert torch.isnan(per_bucket[k])
    b8, e8 = M.frequency_buckets(torch.randint(0, 1000, (4096,)), n_buckets=8)
    assert len(e8) == 9 and e8.tolist()[:3] == [0, 2, 7] and torch.all(torch.bincount(b8) > 0)


def test_bucket_mean_over_steps_skips_nan():
    counts = torch.tensor([5, 100, 0, 7, 50, 1, 1, 3, 20, 9] * 10)
    bucket, edges = M.frequency_buckets(counts, n_buckets=4)
    targets = torch.randint(0, 100, (3, 4))
    values = torch.rand(6, 3, 4, dtype=torch.float64)  # 6 steps of per-token values
    values[2, 0, 0] = values[5] = float('nan')  # a zero-vector cosine; a step not yet recorded
    out = M.bucket_mean(values, targets, bucket, len(edges) - 1)
    assert out.shape == (6, len(edges) - 1) and torch.isnan(out[5]).all()
    for s in range(5):  # explicit loop over steps and buckets
        for k in range(len(edges) - 1):
            v = values[s][bucket[targets] == k]
            v = v[~torch.isnan(v)]
            if v.numel():
                close(out[s, k], v.mean())
            else:
                assert torch.isnan(out[s, k])


def test_improvement_per_doubling_against_a_loop():
    steps = torch.tensor([0, 1, 2, 3, 5, 8, 9, 16, 20])  # a schedule with gaps
    loss = torch.rand(len(steps), dtype=torch.float64) + 1
    g = M.improvement_per_doubling(loss, steps)
    for i, t in enumerate(steps.tolist()):  # brute force: the first recorded step at or after 2t
        later = [j for j, s in enumerate(steps.tolist()) if s >= 2 * t]
        if t == 0 or not later:
            assert torch.isnan(g[i])
        else:
            close(g[i], 1 - loss[later[0]] / loss[i])
    assert torch.isnan(g[-2:]).all() and not torch.isnan(g[1:7]).any()  # 16, 20: 2t beyond 20; 9: 20


def test_plateau_onset_on_hand_built_curves():
    t = torch.arange(0, 401, dtype=torch.float64)
    power = 5 * (t + 1) ** -0.3  # falls by 1 - 2^-0.3 = 19 % per doubling: never a plateau
    assert M.plateau_onset(power, t.long()) is None
    # 5 t^-0.3 until t = 40, then flat: from t = 40 on L(2t) = L(t); t = 20..39 still fall (L(2t) is
    # the flat value); t = 39: 1 - (40/39)^-0.3 ... below 1 %: the onset is the first t whose fall
    # over its doubling, and over every later doubling, is under 1 %
    flat = torch.where(t < 40, 5 * t.clamp(min=1) ** -0.3, 5 * 40.0 ** -0.3)
    onset = M.plateau_onset(flat, t.long())
    fall = [1 - float(flat[2 * s] / flat[s]) for s in range(1, 201)]  # brute force, every doubling
    expected = next(s for s in range(1, 201) if all(f < 0.01 for f in fall[s - 1:]))
    assert onset == expected and 20 < onset <= 40
    assert M.plateau_onset(flat, t.long(), tol=0.5) == 1  # a loose tolerance: at once
    # a curve that falls again after a plateau: the onset is after the last fall
    again = flat - 0.5 * (t >= 100)  # the doublings of t = 50..99 fall
    assert M.plateau_onset(again, t.long()) == 100
    late = flat - 0.5 * (t >= 390)  # falls over the last doubling (t = 195..200): still improving
    assert M.plateau_onset(late, t.long()) is None
    assert M.plateau_onset(torch.ones(1, dtype=torch.float64), torch.tensor([5])) is None  # no doubling


def test_rise_onset_and_never_improved():
    t = torch.arange(1, 101, dtype=torch.float64)
    assert M.rise_onset(5 / t ** 0.3) is None  # still improving
    # +8 % after step 60
    rising = torch.cat([5 / t[:60] ** 0.3, 5 / 60 ** 0.3 * (1 + 0.002 * torch.arange(1, 41))])
    assert M.rise_onset(rising) == 59
    assert M.rise_onset(rising, rise=0.1) is None  # a rise smaller than asked for
    assert not M.never_improved(rising)
    # a bucket that training only made worse: never improved, and no onset at its first step
    worse = 3 + 0.01 * t
    assert M.never_improved(worse) and M.rise_onset(worse) is None
    assert M.never_improved(torch.full((5,), 2.0))  # flat at its start: never beat it
    assert not M.never_improved(torch.tensor([2.0, 2.5, 1.9, 3.0]))  # beat it once
    assert not M.never_improved(torch.tensor([2.0]))


def test_dissent_ratio_against_explicit_vectors():
    """The ratio of the norms against the vectors themselves in float64, and the docstring's
    identity: for one pair, cos(g+, g-) follows from the three norms."""
    plus, minus = torch.randn(7, 50, dtype=torch.float64), torch.randn(7, 50, dtype=torch.float64)
    minus[0] = plus[0] * 2  # no dissent: ratio 1
    minus[1] = -plus[1]  # total dissent: ratio 0
    minus[2] = -0.01 * plus[2]  # opposed but one part tiny: cos -1, ratio near 1
    g = plus + minus
    ratio = M.dissent_ratio(g.norm(dim=-1), plus.norm(dim=-1), minus.norm(dim=-1))
    for k in range(7):  # brute force, one pair at a time
        close(ratio[k], torch.sqrt((g[k] ** 2).sum()) / (torch.sqrt((plus[k] ** 2).sum())
                                                         + torch.sqrt((minus[k] ** 2).sum())))
        a, b = plus[k].norm(), minus[k].norm()
        close(cos(plus[k], minus[k]), (g[k].norm() ** 2 - a ** 2 - b ** 2) / (2 * a * b))
    close(ratio[0], 1.0)
    close(ratio[1], 0.0)
    assert ratio[2] > 0.97 and cos(plus[2], minus[2]) < -0.999
    assert torch.all((ratio >= 0) & (ratio <= 1))
    assert torch.isnan(M.dissent_ratio(*torch.zeros(3, dtype=torch.float64)))
    # in theta: the ratio of theta_decomposition's norms is that of the brute-force gradients
    model, x, y = tiny()
    params = dict(model.named_parameters())
    out = M.theta_decomposition(model(x)[0], y, params)['model']
    logits = model(x)[0]
    p = torch.softmax(logits, -1).detach().reshape(N, V)
    seed = (M.grad_z_plus(p, y.reshape(-1)) / N).view(B, T, V)
    g_plus = torch.cat([v.flatten() for v in torch.autograd.grad(logits, list(params.values()), seed)])
    mean_loss = per_token_loss(model(x)[0], y).mean()
    g_full = torch.cat([v.flatten() for v in torch.autograd.grad(mean_loss, list(params.values()))])
    close(M.dissent_ratio(out['norm_grad'], out['norm_plus'], out['norm_minus']),
          g_full.norm() / (g_plus.norm() + (g_full - g_plus).norm()))


def test_unigram_entropy_is_the_entropy_of_the_counts():
    counts = torch.tensor([5, 0, 3, 2, 10])
    q = [c / 20 for c in (5, 3, 2, 10)]  # the unseen token adds nothing (0 log 0 = 0)
    close(M.unigram_entropy(counts), -sum(p * np.log(p) for p in q))
    close(M.unigram_entropy(torch.full((64,), 7)), np.log(64))  # uniform: log V


def test_scale_free_opposition_makes_the_null_the_same_at_every_N():
    """sqrt(N) (1 - D): the D of N random-sign magnitudes drawn from one distribution gives about the
    same value at N = 128 and at N = 16384 (while D itself moves from about 0.93 to 0.994)."""
    gen = torch.Generator().manual_seed(0)
    values = {}
    for n in (128, 16384):
        x = torch.randn(400, n, dtype=torch.float64, generator=gen).exp()
        signs = torch.randint(0, 2, (400, n), generator=gen).double() * 2 - 1
        D = 1 - (x * signs).sum(1).abs() / x.sum(1)  # (400,) D of random signs
        values[n] = M.scale_free_opposition(D, n).mean().item()
    assert abs(values[128] - values[16384]) < 0.05 * values[16384], values
    close(M.scale_free_opposition(0.99, 10000), 1.0)  # sqrt(10000) * 0.01


def test_zipf_fit_recovers_an_exact_law_and_flags_an_outlier():
    ranks = torch.arange(1, 501, dtype=torch.float64)
    # an exact Zipf law over 500 tokens, and 3 unseen ones
    counts = torch.cat([torch.round(1e6 * ranks ** -1.1).long(), torch.zeros(3, dtype=torch.long)])
    fit = M.zipf_fit(counts)
    assert abs(fit['slope'] + 1.1) < 1e-3 and abs(fit['intercept'] - np.log(1e6)) < 1e-2
    assert fit['outliers'].numel() == 0 and torch.isnan(fit['residuals'][-3:]).all()
    assert fit['rank'][:500].tolist() == list(range(1, 501)) and fit['rank'][-3:].tolist() == [501, 502, 503]
    close(fit['fitted'], torch.exp(fit['intercept']) * fit['rank'].double() ** fit['slope'])
    slope, intercept = np.polyfit(np.log(ranks.numpy()), np.log(counts[:500].double().numpy()), 1)
    close(fit['slope'], slope)
    close(fit['intercept'], intercept)
    counts[0] *= 30  # the most frequent token far above the line (as ',' or 'the' often are)
    assert M.zipf_fit(counts)['outliers'].tolist() == [0]


def test_anisotropy_and_spectrum_against_explicit_versions():
    h = torch.randn(50, 8, dtype=torch.float64) + 0.5
    u = F.normalize(h, dim=-1)
    C = u @ u.T  # explicit N x N cosine matrix
    close(M.anisotropy(h), (C.sum() - C.diagonal().sum()) / (50 * 49))
    U = torch.randn(37, 8, dtype=torch.float64)
    s = M.singular_values(U)
    close(s, np.linalg.svd(U.numpy(), compute_uv=False))
    q = s ** 2 / (s ** 2).sum()
    close(M.spectral_entropy(s), -(q * q.log()).sum())
    close(M.spectral_entropy(torch.ones(8, dtype=torch.float64)), np.log(8))
    close(M.spectral_entropy(torch.tensor([3.0, 0.0], dtype=torch.float64)), 0.0)
