"""
A compact GPT in the style of nanoGPT: token + position embeddings, pre-norm Transformer
blocks (causal self-attention, MLP), a final LayerNorm and a linear LM head.

The one addition: the model is split into `hidden(idx)`, which returns the output-layer hidden
states h (the input of the LM head, after the final norm), and `lm_head(h)`, which turns them
into logits. Everything the measurements need (h, the (V, d) head matrix U and the logits
z = U h, in the notation of metrics.py) is then available without hooks into the model's inside.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 128  # context length T
    vocab_size: int = 4096  # V, set from the tokenizer
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128  # width d of h
    bias: bool = True  # biases in Linear and LayerNorm layers
    tie_weights: bool = False  # share the LM head matrix U with the token embedding


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # output projection
        self.n_head = config.n_head

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        # U, the (V, d) LM-head matrix: logits z = U h (no bias, as in GPT-2)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # with tying, U is also the token embedding, whose output every attention layer mixes
            # across positions, so U is no longer "position-local" (its per-token gradient is not
            # one outer product): metrics.position_local_modules leaves it out
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=False):
        """Parameter count (a tied matrix counted once). Non-embedding drops wpe and wte,
        and keeps the LM head unless it is tied to wte."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.transformer.wte.weight.numel()
        return n

    def hidden(self, idx):
        """Output-layer hidden states h (after the final LayerNorm): (B, T) -> (B, T, d)."""
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of length {T} > block_size {self.config.block_size}"
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, d)
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)  # (B, T, d)

    def forward(self, idx, targets=None, return_hidden=False):
        """Logits z = U h for every position, and the mean cross-entropy if targets are given.
        With return_hidden=True, also returns h, so that callers need no hooks."""
        h = self.hidden(idx)  # (B, T, d)
        logits = self.lm_head(h)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = per_token_loss(logits, targets).mean()
        if return_hidden:
            return logits, loss, h
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, published=False):
        """AdamW with weight decay on matrices only (Linear weights, embeddings), as in nanoGPT. published:
        as the published runs, eps 1e-5 (torch's default: 1e-8) and no decay on the embeddings (wte, wpe;
        tied, U too); their beta2 0.95 comes in `betas`."""
        no_decay = {id(p) for p in self.parameters() if p.dim() < 2}
        if published:
            no_decay |= {id(self.transformer.wte.weight), id(self.transformer.wpe.weight)}
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {'params': [p for p in params if id(p) not in no_decay], 'weight_decay': weight_decay},
            {'params': [p for p in params if id(p) in no_decay], 'weight_decay': 0.0},
        ]
        fused = device_type == 'cuda'  # the fused kernel is faster on GPUs
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=1e-5 if published else 1e-8,
                                 fused=fused)


def build_gpt(settings, vocab_size):
    """The GPT of a run's settings (train.py's flags, or the config.json of a run) and vocabulary size
    V, its parameters initialised from torch's current random state."""
    names = ['block_size', 'n_layer', 'n_head', 'n_embd', 'bias', 'tie_weights']
    return GPT(GPTConfig(vocab_size=vocab_size, **{name: settings[name] for name in names}))


def per_token_loss(logits, targets):
    """l_i = -log p_i[y_i], computed in fp32 whatever the logits' dtype: (B, T, V), (B, T) -> (B, T).

    Per-token loss changes are small, and a bf16 log-softmax (8 significant bits) would bury
    them in rounding noise, so the cast to fp32 happens before the log-softmax."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    # on flattened (B*T, V) logits, as nanoGPT calls it: the (B, V, T) layout that cross_entropy also
    # accepts runs a strided kernel, more than twice as slow on a CPU for the same numbers
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction='none')
    return losses.view(targets.shape)  # (B, T)
