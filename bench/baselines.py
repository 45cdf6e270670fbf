"""
The baselines bench.py measures the project against, sharing no code with what they judge: a plain
GPT written from scratch (PlainGPT), a port of the published method of the exact all-parameter
opposition (published_gradient_sums), and on the CPU the machine's own matmul rate (matmul_ms).
"""

import math
import statistics
import time

import torch
import torch.nn as nn
from torch.nn import functional as F

MATMUL_N, MATMUL_REPS = 2048, 3  # on the CPU: the (n, n) @ (n, n) fp32 matmul timed, times a round


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


def matmul_ms(n=MATMUL_N, reps=MATMUL_REPS):
    """ms of each of `reps` fp32 (n, n) @ (n, n) matmuls on the CPU, after one untimed."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        out.append(1000 * (time.perf_counter() - start))
    return out


def matmul_tflops(ms, n=MATMUL_N):
    """TFLOP/s of (n, n) @ (n, n) matmuls taking `ms` each: 2 n^3 FLOPs over the median time."""
    return 2 * n ** 3 / (statistics.median(ms) / 1000) / 1e12
