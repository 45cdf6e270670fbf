"""
What train.py records, and when: the table of every per-step record (RECORDS), and the Recorder, which
measures them at each moment of a training step into .npy memmaps for the whole run (process 0 only).
"""

import os
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

import data
import metrics
import runs

HIST_BINS = 20  # bins of the D_j histograms over [0, 1]
LOG_POINTS = 32  # number of log-spaced steps in a default schedule (first and last always included)
GRAD_POINTS = 12  # the same for the grad steps, fewer: each costs many training steps' time (bench.py)

# Every per-step record: (name, shape, dtype, when, meaning); the file is name.npy. Shapes and 'when'
# are explained in docs/records.md, which shows this table (tests/test_train.py keeps the two the same).
RECORDS = [
    # the training step
    ('lr', 'S', 'float64', 'every', "learning rate of step t"),
    ('train_loss', 'S', 'float64', 'every', "mean training loss at theta_t on step t's batch"),
    ('grad_norm', 'S', 'float64', 'every', "global gradient norm, before clipping"),
    ('update_norm', 'S', 'float64', 'every', "|theta_{t+1} - theta_t|, the real AdamW update"),
    ('step_ms', 'S', 'float64', 'every', "wall time of step t in ms, its recording included"),
    ('train_offsets', 'S, B', 'int64', 'every', "start of each window of step t's batch"),
    # zero-sum learning on the training batch: the same tokens before and after their own update
    ('train_loss_pre', 'S, B, T', 'float32', 'step', "per-token loss l_i(theta_t) of step t's batch"),
    ('train_loss_post', 'S, B, T', 'float32', 'full', "per-token loss l_i(theta_{t+1}) of the same batch"),
    ('train_D', 'S', 'float64', 'full', "D = 1 - |sum_i x_i| / sum_i |x_i| of x = post - pre"),
    ('train_M', 'S', 'float64', 'full', "M = mean_i |x_i| of the same x"),
    ('train_D_null', 'S', 'float64', 'full', "sign-flip null of train_D (64 draws)"),
    ('train_loss_pred', 'G, B, T', 'float32', 'grad', "first-order change <grad l_i, delta> of every token"),
    # the fixed held-out probe set
    ('probe_loss', 'S+1, P, T', 'float32', 'step', "per-token probe loss at theta_t; row S: the final model"),
    ('train_probe_loss', 'S+1, Q, T', 'float32', 'step', "as probe_loss, on Q fixed training windows"),
    ('probe_D', 'S', 'float64', 'step', "D of x = probe_loss[t+1] - probe_loss[t]"),
    ('probe_M', 'S', 'float64', 'step', "M of the same probe change"),
    ('probe_D_null', 'S', 'float64', 'step', "sign-flip null (64 draws) of the same probe change"),
    ('probe_p_y', 'S+1, P, T', 'float32', 'step', "p_y, the probability of the target, at theta_t"),
    ('probe_cos_h_plus', 'S+1, P, T', 'float32', 'step', "cos(h, grad_h+), grad_h+ = -(1 - p_y) U_y"),
    ('probe_cos_h_minus', 'S+1, P, T', 'float32', 'step', "cos(h, grad_h-), grad_h- = U^T p - p_y U_y"),
    ('probe_cos_plus_minus', 'S+1, P, T', 'float32', 'step', "cos(grad_h+, grad_h-): dissent in h"),
    ('probe_norm_plus', 'S+1, P, T', 'float32', 'step', "|grad_h+|"),
    ('probe_norm_minus', 'S+1, P, T', 'float32', 'step', "|grad_h-|"),
    ('probe_norm_grad', 'S+1, P, T', 'float32', 'step', "|dl/dh| = |grad_h+ + grad_h-|"),
    ('probe_anisotropy', 'S+1', 'float64', 'step', "anisotropy of h: mean pairwise cosine"),
    ('probe_hidden', 'K, P, T, d', 'float32', 'hidden', "h of every probe token at step hidden_steps[k]"),
    ('head_singular_values', 'K, R', 'float32', 'hidden', "singular values of U, largest first"),
    # dissent in parameter space, on the training batch at theta_t
    ('theta_cos', 'S, n_theta', 'float64', 'full', "cos(grad_theta+, grad_theta-) of the batch's mean loss"),
    ('theta_norm_plus', 'S, n_theta', 'float64', 'full', "|grad_theta+|, same rows and columns"),
    ('theta_norm_minus', 'S, n_theta', 'float64', 'full', "|grad_theta-|"),
    ('theta_norm_grad', 'S, n_theta', 'float64', 'full', "|grad_theta| (column model: grad_norm[t])"),
    # gradient opposition between tokens, per parameter coordinate j
    ('local_opposition_mean', 'S, n_local', 'float64', 'full', "mean of D_j = 1 - |sum_i g_ij|/sum_i |g_ij|"),
    ('local_opposition_weighted', 'S, n_local', 'float64', 'full', "mean of D_j weighted by sum_i |g_ij|"),
    ('local_opposition_null', 'S, n_local', 'float64', 'full', "the mean of D_j's analytic random-sign null"),
    ('local_opposition_hist', 'S, n_local, H', 'int64', 'full', "counts of D_j in H equal bins of [0, 1]"),
    ('opposition_mean', 'G, n_all', 'float64', 'grad', "mean of D_j, every parameter, on the probe tokens"),
    ('opposition_weighted', 'G, n_all', 'float64', 'grad', "weighted mean, as local_opposition_weighted"),
    ('opposition_null', 'G, n_all', 'float64', 'grad', "analytic null, as local_opposition_null"),
    ('opposition_hist', 'G, n_all, H', 'int64', 'grad', "histogram, as local_opposition_hist"),
    # update-weighted interference, p_ij = g_ij delta_j: the same tokens at theta_t and the real update
    ('update_Cg', 'G, n_all', 'float64', 'grad', "Cg = sum_j |sum_i p_ij| / sum_j sum_i |p_ij|"),
    ('update_CuG', 'G, n_all', 'float64', 'grad', "CuG = |sum_j sum_i p_ij| / sum_j |sum_i p_ij|"),
    ('update_Cug', 'G, n_all', 'float64', 'grad', "Cug = sum_i |sum_j p_ij| / sum_j sum_i |p_ij|"),
    ('update_C_i_dli', 'G, n_all', 'float64', 'grad', "C_i_dli = |sum_i sum_j p_ij| / sum_i |sum_j p_ij|"),
    ('update_M_i_dli', 'G, n_all', 'float64', 'grad', "M_i_dli = sum_i |sum_j p_ij| / N"),
]


def record_shape(shape, sizes):
    """The shape of a record in a run: 'S+1, P, T' -> (sizes['S'] + 1, sizes['P'], sizes['T'])."""
    dims = [dim.strip().partition('+') for dim in shape.split(',')]
    return tuple(sizes[name] + int(extra or 0) for name, _, extra in dims)


def log_schedule(last, every=0, points=LOG_POINTS):
    """Steps 0..last at which a scheduled record is written: every `every` steps, or (every=0)
    `points` log-spaced steps (fewer after rounding). The first and the last step are always included."""
    if every > 0:
        steps = set(range(0, last + 1, every))
    else:
        steps = set(np.unique(np.round(np.geomspace(1, max(1, last), points))).astype(int).tolist())
    return sorted(step for step in steps | {0, last} if step <= last)


class Recorder:
    """The records of one run and everything needed to fill them: the memmaps (process 0 only),
    the schedules, the probe sets, the null's random signs. One method per moment of a step."""

    def __init__(self, args, model, corpus, probe, dtype, rank=0, world=1, train_probe=(None, None)):
        self.args, self.model, self.corpus = args, model, corpus  # model: the plain fp32 module
        self.px, self.py = probe  # (P, T) inputs and targets of the held-out probe set
        self.tx, self.ty = train_probe  # (Q, T) fixed training windows; None: --train_probe_seqs 0
        self.dtype = dtype  # training precision; the probe and post - pre passes are fp32 whatever it is
        self.master, self.world = rank == 0, world  # only process 0 writes
        self.recording = args.record != 'none'
        self.params = dict(model.named_parameters())  # a tied matrix appears once
        self.head = next(n for n, p in self.params.items() if p is model.lm_head.weight)  # U's name
        self.local_modules = metrics.position_local_modules(model)
        S = args.max_iters
        self.hidden_steps = log_schedule(S, args.hidden_every)  # probe rows are 0..S (S: the final model)
        self.grad_steps = log_schedule(S - 1, args.grad_every, GRAD_POINTS)  # exact opposition, JVP
        self.light_steps = set(log_schedule(S - 1)) | set(self.grad_steps)  # full steps under --record light
        self.hidden_row = {s: k for k, s in enumerate(self.hidden_steps)}
        self.grad_row = {s: k for k, s in enumerate(self.grad_steps)}
        # the columns of the parameter-space records
        local_names = [f"{m}.{n}" for m, mod in self.local_modules.items() for n, _ in mod.named_parameters()]
        self.theta_names = list(self.params) + ['model']
        self.local_keys = metrics.opposition_keys(local_names, total='local')
        self.all_keys = metrics.opposition_keys(list(self.params))
        # name -> (shape, dtype) of this run's records: under --record none only 'every'; none of size 0
        sizes = dict(S=S, B=args.batch_size, T=args.block_size, P=args.probe_seqs, d=args.n_embd,
                     R=min(args.n_embd, corpus['vocab_size']), K=len(self.hidden_steps), H=HIST_BINS,
                     G=len(self.grad_steps), Q=args.train_probe_seqs, n_theta=len(self.theta_names),
                     n_local=len(self.local_keys), n_all=len(self.all_keys))
        self.specs = {name: (record_shape(shape, sizes), np.dtype(dtype))
                      for name, shape, dtype, when, _ in RECORDS
                      if (self.recording or when == 'every') and 0 not in record_shape(shape, sizes)}
        self.records = {}  # name -> memmap (process 0, after open)
        self.probe_loss = self.train_loss = float('nan')  # the last values, for the progress line
        self.loss_pre = self.theta_t = None  # the batch's losses and theta_t, until after_update()

    def open(self, out_dir, create):
        """The records as .npy memmaps in out_dir, listed in its manifest: created (float rows NaN,
        integer rows -1: not yet written), or opened to continue a run (checked by train.open_run_dir)."""
        runs.own(out_dir, *(name + '.npy' for name in self.specs))
        for name, (shape, dtype) in self.specs.items():
            r = np.lib.format.open_memmap(os.path.join(out_dir, name + '.npy'), 'w+' if create else 'r+', dtype, shape)
            if create:
                r[...] = np.nan if dtype.kind == 'f' else -1
            self.records[name] = r

    def write(self, name, row, value):
        """Row `row` of record `name` := value (a tensor or a number), if this process and level keep it."""
        if name in self.records:
            self.records[name][row] = value.cpu().numpy() if torch.is_tensor(value) else value

    def flush(self):  # to disk, before a checkpoint counts the rows done
        for r in self.records.values():
            r.flush()

    def full(self, step):  # a step with every measurement (RECORDS' 'full')
        return self.args.record == 'all' or (self.args.record == 'light' and step in self.light_steps)

    def kind(self, step):
        """0: an ordinary step, 1: a full one, 2: a grad step (each kind takes longer than the one before)."""
        return 2 if self.recording and step in self.grad_row else int(self.full(step))

    # --- the moments of a step, in order ----------------------------------------------------

    def probe(self, step):
        """Probe measures at theta_step (probe row `step`; row S: the final model), on process 0: losses
        and their change since step - 1, the output-layer decomposition, anisotropy; on schedule h, U."""
        if not (self.master and self.recording):
            return
        (P, T), d = self.px.shape, self.args.n_embd
        # losses (P, T), h (P, T, d), logits (P, T, V) and p = softmax(logits) as (P*T, V)
        loss, h, logits, p = metrics.fp32_probe_forward(self.model, self.px, self.py)
        self.write('probe_loss', step, loss)
        self.probe_loss = loss.mean().item()
        if self.tx is not None:  # the fixed training windows, measured as the probe set
            self.write('train_probe_loss', step, metrics.fp32_forward(self.model, self.tx, self.ty)[0])
        if step > 0:  # the change theta_{step-1} -> theta_step, from the stored rows (as a resumed run)
            change = self.records['probe_loss'][step] - self.records['probe_loss'][step - 1]
            self.write_interference('probe', step - 1, torch.from_numpy(change), step)
        U = self.model.lm_head.weight.detach()  # (V, d)
        with torch.no_grad():
            out = metrics.output_decomposition(h.view(-1, d), U, self.py.flatten(), probs=p)
            for name, value in out.items():  # p_y, the 2D basis, dissent in h, the norms
                self.write('probe_' + name, step, value.view(P, T))
            self.write('probe_anisotropy', step, metrics.anisotropy(h.view(-1, d)))
            if step in self.hidden_row:
                self.write('probe_hidden', self.hidden_row[step], h)
                self.write('head_singular_values', self.hidden_row[step], metrics.singular_values(U))

    def capture(self, step):
        """On full steps, keeps the inputs X and output gradients G of the position-local layers."""
        return metrics.capture_activations(self.local_modules) if self.full(step) else nullcontext({})

    def batch(self, step, x, y, logits, losses, acts, h):
        """Training-batch measures at theta_t from this process's rows of the training forward, after the
        backward, before clipping (on full steps logits and h still hold their graph)."""
        if self.full(step):
            grads = {n: p.grad for n, p in self.params.items()}  # the training gradient (DDP: averaged)
            # dissent in theta: grad+ by a row scatter into U and a second backward from h
            dissent = metrics.theta_decomposition(logits, y, self.params, grads, self.average, h, self.head, losses)
            self.write_columns('theta', step, dissent, self.theta_names)
            # exact opposition of the position-local layers from this backward: |G|^T |X|, and the
            # signed sums N * p.grad (DDP: each process's N times the global mean, then added up)
            sums = metrics.position_local_gradient_sums(self.local_modules, acts, losses.numel(), grads)
            for total in [t for triple in sums.values() for t in triple] if self.world > 1 else []:
                dist.all_reduce(total)  # sums over tokens add up across processes
            opposition = metrics.opposition_summary(sums, HIST_BINS, total='local')
            self.write_columns('local_opposition', step, opposition, self.local_keys)
        if self.full(step) and self.dtype != 'float32':  # post - pre needs fp32: bf16 rounding buries it
            losses, _, logits = metrics.fp32_forward(self.model, x, y)  # else: the training forward's
        self.loss_pre = self.gather(losses.detach())  # (B, T): the rows of every process
        self.write('train_loss_pre', step, self.loss_pre)
        self.train_loss = self.loss_pre.mean().item()
        self.write('train_loss', step, self.train_loss)

    def keep_theta(self):
        """A copy of theta_t, taken just before optimizer.step()."""
        self.theta_t = {n: p.detach().clone() for n, p in self.params.items()} if self.recording else None

    def after_update(self, step, x, y, offsets, lr, grad_norm):
        """After optimizer.step(): the update delta, the step's scalars; on full steps the batch at theta_{t+1};
        on grad steps (process 0) the prediction along delta, the probe tokens' opposition and update terms."""
        update_norm = float('nan')
        if self.recording:
            delta = {n: p.detach() - self.theta_t[n] for n, p in self.params.items()}
            update_norm = torch.stack([v.pow(2).sum() for v in delta.values()]).double().sum().sqrt().item()
        for name, value in dict(lr=lr, grad_norm=grad_norm, update_norm=update_norm, train_offsets=offsets).items():
            self.write(name, step, value)
        if self.full(step):
            loss_post = self.gather(metrics.fp32_forward(self.model, x, y)[0])  # (B, T)
            self.write('train_loss_post', step, loss_post)
            self.write_interference('train', step, loss_post - self.loss_pre, step)
        if self.master and self.recording and step in self.grad_row:
            row = self.grad_row[step]
            # at theta_t along the real delta, on the global batch (rebuilt from all the offsets)
            windows = data.get_windows(self.corpus['train'], offsets, self.args.block_size)
            xg, yg = (torch.from_numpy(a).to(x.device) for a in windows)
            self.write('train_loss_pred', row, metrics.predicted_loss_change(self.model, xg, yg, delta,
                                                                             params=self.theta_t))
            # exact opposition between the first probe sequences' tokens at theta_t, with the update-weighted
            # terms (the per-token g_i exist only inside per_token_gradient_sums, and delta only now)
            px, py = self.px[:self.args.opposition_seqs], self.py[:self.args.opposition_seqs]
            with metrics.parameters_at(self.params, self.theta_t):
                sums, dots = metrics.per_token_gradient_sums(self.model, px, py, delta=delta)
            self.write_columns('opposition', row, metrics.opposition_summary(sums, HIST_BINS), self.all_keys)
            self.write_columns('update', row, metrics.update_weighted_terms(sums, delta, dots), self.all_keys)

    def write_interference(self, prefix, row, change, step):
        """Row `row` of prefix_D, _M and _D_null; the null's signs are a function of (seed, step)."""
        signs = torch.Generator().manual_seed(self.args.seed * 1_000_003 + step)
        for stat, value in zip(('D', 'M', 'D_null'), metrics.loss_change_interference(change, signs)):
            self.write(f"{prefix}_{stat}", row, value)

    def write_columns(self, prefix, row, table, keys):
        """Row `row` of each record prefix_stat (if there is one), a column per key: table[key][stat]."""
        for stat in table[keys[0]]:
            self.write(f"{prefix}_{stat}", row, torch.stack([table[k][stat] for k in keys]))

    def gather(self, t):
        """Concatenate a per-process (B/world, ...) tensor into the global (B, ...) one."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def average(self, t):
        """Mean of a tensor over the processes, in place."""
        if self.world > 1:
            dist.all_reduce(t)
            t.div_(self.world)
