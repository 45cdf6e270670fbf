"""
The published checkpoint protocol, offline and on many held-out tokens: measure the checkpoints
that train.py --keep_ckpts log2 kept (theta_t, the parameters after t updates, t = 1, 2, 4, ...).

    python train.py --keep_ckpts log2 --out_dir out
    python measure.py out --tokens 16384           # N = 16384 held-out tokens (0: the whole split)

At each kept checkpoint theta_t, on N held-out tokens (the first whole windows of the validation
split, every token a target once), in fp32:
  a. the exact gradient opposition D_j between the N tokens, with its null (metrics.opposition_summary);
  b. dt = 1: D and M of the per-token loss changes, with the sign-flip null, over one simulated AdamW
     step from theta_t (the checkpoint's optimizer state, no clipping) on each of K training batches:
     on that batch and on the N tokens; which batches and which learning rate: --protocol;
  c. dt = t: D and M of the held-out changes from theta_t to theta_2t;
  d. the update-weighted terms (metrics.update_weighted_terms), delta = the simulated update of batch 0.
Records: RUN/paper/ (paper_N<N>/ with --tokens), a row per checkpoint (docs/records.md); a rerun continues.
"""

import argparse
import copy
import os
import re
import time

import numpy as np
import torch

import data
import metrics
import runs
from metrics import fp32_forward, loss_change_interference, parameters_at
from model import build_gpt, per_token_loss
from runs import fail
from train import get_lr

MEASURE_STREAM = 0x6d656173  # 'meas': the dt = 1 batches' seeds are (seed, this, t, k), training's (seed, t)

# Every record of RUN/paper/: (name, shape, dtype, meaning), the file name.npy; docs/records.md says more.
# C = checkpoints measured, K = --batches, N = held-out tokens, n_keys = len(opposition_keys).
PAPER_RECORDS = [
    ('steps', 'C', 'int64', "the step t of each row: theta_t, after t updates"),
    ('heldout_loss', 'C, N', 'float32', "per-token loss l_i(theta_t) of the N held-out tokens"),
    ('loss_D_batch', 'C, K', 'float64', "dt = 1: D of batch k's loss changes over one step"),
    ('loss_M_batch', 'C, K', 'float64', "M of the same change"),
    ('loss_D_batch_null', 'C, K', 'float64', "sign-flip null of the same change"),
    ('loss_D_heldout', 'C, K', 'float64', "dt = 1: D of the held-out changes over the same step"),
    ('loss_M_heldout', 'C, K', 'float64', "M of the same held-out change"),
    ('loss_D_heldout_null', 'C, K', 'float64', "sign-flip null of the same held-out change"),
    ('loss_D_dtt', 'C', 'float64', "dt = t: D of heldout_loss(theta_2t) - heldout_loss(theta_t)"),
    ('loss_M_dtt', 'C', 'float64', "M of the same change"),
    ('loss_D_dtt_null', 'C', 'float64', "sign-flip null of the same change"),
    ('opposition_mean', 'C, n_keys', 'float64', "mean of D_j over each key's coordinates"),
    ('opposition_weighted', 'C, n_keys', 'float64', "sum_i |g_ij|-weighted mean of D_j"),
    ('opposition_null', 'C, n_keys', 'float64', "mean of the analytic null of D_j"),
    ('opposition_n', 'C, n_keys', 'int64', "number of coordinates j with a D_j"),
    ('opposition_near_total', 'C, n_keys', 'float64', "share of D_j > 0.99 (metrics.NEAR_TOTAL)"),
    ('update_Cg', 'C, n_keys', 'float64', "Cg, delta = the simulated update on batch 0"),
    ('update_CuG', 'C, n_keys', 'float64', "CuG, same"),
    ('update_Cug', 'C, n_keys', 'float64', "Cug, same"),
    ('update_C_i_dli', 'C, n_keys', 'float64', "C_i_dli, same"),
    ('update_M_i_dli', 'C, n_keys', 'float64', "M_i_dli, same"),
]
DTT = ['loss_D_dtt', 'loss_M_dtt', 'loss_D_dtt_null']  # derived from heldout_loss at every write


SETTINGS = [  # (name, default, type or choices, help): a flag --name each, after the run folder
    ('tokens', 0, runs.count, 'held-out tokens N, in whole windows (0: the whole validation split)'),
    ('batches', 5, runs.positive, 'training batches k of the dt = 1 step'),
    ('protocol', 'published', ['published', 'ours'], "dt = 1 (b): published: k batches drawn once, the same "
     "at every t, and the checkpoint's rate (of step t - 1); ours: k fresh batches each t, the rate of t"),
    ('steps', '', str, 'only these kept checkpoints, e.g. 32,64 (default: all); a later call adds others'),
    ('dt1', True, bool, 'the dt = 1 loss D and M (b)'),
    ('opposition', True, bool, 'gradient opposition and update-weighted terms (a, d): a backward per token'),
    ('chunk_seqs', 16, runs.positive, 'held-out sequences a pass (memory); fixed at the first run'),
    ('cache_dir', None, str, "token cache (default: the run's)"),
    ('device', 'auto', str, 'auto, cpu, cuda, cuda:N or mps'),
    ('threads', 0, runs.count, "CPU threads (0: one on a CPU, as train.py)"),
    ('overwrite', False, bool, 'measure again: delete the records of this N (RUN/paper/ or RUN/paper_N<N>/)'),
]


def main(argv=None):
    p = runs.parser(__doc__, SETTINGS)
    p.add_argument('run', help='run directory of train.py --keep_ckpts log2')
    args = p.parse_args(argv)
    runs.on_signals(lambda: "the checkpoints measured are kept; the same command continues")  # one line
    if problem := runs.check_device(args.device):
        fail(problem)
    device = args.device if args.device != 'auto' else 'cuda' if torch.cuda.is_available() else 'cpu'
    runs.use_cpu_well(device, args.threads)  # one thread on a CPU unless --threads says
    config, corpus, kept = load_run(args)
    hx, hy = heldout_windows(corpus['val'], config['block_size'], args.tokens)
    model = build_gpt(config, config['vocab_size_actual']).to(device)
    keys = metrics.opposition_keys([n for n, _ in model.named_parameters()])
    settings = dict(tokens=hx.numel(), windows=len(hx), block_size=config['block_size'], batches=args.batches,
                    dt1=args.dt1, opposition=args.opposition, opposition_keys=keys, protocol=args.protocol,
                    chunk_seqs=args.chunk_seqs, data_key=config['data_key'], seed_stream=MEASURE_STREAM)
    for t in kept:  # every check before the first write: each checkpoint opens and holds its step
        runs.load_checkpoint(kept[t], t)
    rel = 'paper' + (f"_N{hx.numel()}" if args.tokens else '')  # the whole split, or N held-out tokens
    lock = runs.open_folder(args.run, rel, overwrite=args.overwrite)  # a second measure.py is refused
    folder = os.path.join(args.run, rel)
    try:  # from here a stop (a signal, a failure) leaves no empty folder behind
        rows = read_rows(args.run, rel, settings)  # record name -> its finished rows
        todo, t0 = [t for t in kept if t not in rows['steps']], time.time()
        print(f"measure.py: {args.run}: steps {', '.join(map(str, kept))}, {len(kept) - len(todo)} measured "
              f"before; N = {hx.numel()} held-out tokens, k = {args.batches} batches", flush=True)
        for i, t in enumerate(todo):
            ckpt = runs.load_checkpoint(kept[t], t, device)
            row = measure_checkpoint(model, ckpt, hx, hy, args, config, corpus, keys, device)
            for name, value in row.items():
                rows[name].append(value)
            write_rows(args.run, rel, rows, settings, config['seed'])
            left = (time.time() - t0) / (i + 1) * (len(todo) - i - 1) / 60  # the rest at the same pace
            print(f"  step {t} measured [{time.time() - t0:.0f} s], about {left:.1f} min left", flush=True)
    finally:
        if not os.listdir(folder):  # stopped before its first row: nothing empty stays behind
            os.rmdir(folder)
    os.close(lock)
    print(f"measure.py: {len(rows['steps'])} checkpoints measured in {folder} ({len(todo)} now)")


def load_run(args):
    """(config, corpus, the kept checkpoints to measure: path by step) of args.run. The kept checkpoints
    are the ckpts/step_NNNNNN.pt that train.py listed in the run's manifest and finished writing."""
    if not os.path.isdir(args.run):
        fail(f"{args.run}: no such folder")
    config = runs.read_json(args.run, 'config.json', 'train.py') or \
        fail(f"{args.run}: not a run of train.py (no config.json)")
    kept = {int(rel[11:-3]): os.path.join(args.run, rel) for rel in runs.owned(args.run)
            if re.fullmatch(r'ckpts/step_\d+\.pt', rel) and os.path.isfile(os.path.join(args.run, rel))}
    if not kept:
        fail(f"{args.run}: no kept checkpoints in ckpts/ (train.py --keep_ckpts log2 keeps them)")
    wanted = args.steps.split(',') if args.steps else kept
    if not all(str(t).isdigit() and int(t) in kept for t in wanted):
        fail(f"--steps {args.steps}: not a list of kept checkpoints ({', '.join(map(str, sorted(kept)))})")
    try:
        corpus = data.prepare(config['data'], config['vocab_size'], args.cache_dir or config['cache_dir'])
    except (ValueError, OSError) as e:
        fail(e)
    if corpus['key'] != config['data_key']:
        fail(f"{args.run}: the corpus at {config['data']} is not the one the run was trained on")
    return config, corpus, {t: kept[t] for t in sorted({int(t) for t in wanted})}


def heldout_windows(val, T, tokens):
    """Inputs and targets (W, T) of the first W = tokens // T windows of the validation split (tokens 0:
    all): window w is val[wT : wT + T] against val[wT + 1 : wT + T + 1]."""
    W = tokens // T if tokens else (len(val) - 1) // T
    if not 0 < W <= (len(val) - 1) // T:
        fail(f"--tokens {tokens}: fewer than one window of {T} + 1 tokens, or more than the validation split")
    return (torch.from_numpy(a) for a in data.get_windows(val, np.arange(W) * T, T))


def dt1_batch(seed, t, k, config, corpus, device):
    """Training batch k of the dt = 1 step at t: B random windows from a generator seeded by (seed,
    MEASURE_STREAM, t, k), never training's (seeded by (seed, t)); t = 0: the same at every checkpoint."""
    B, T = config['batch_size'], config['block_size']
    offsets = np.random.default_rng([seed, MEASURE_STREAM, t, k]).integers(0, len(corpus['train']) - T, B)
    return (torch.from_numpy(a).to(device) for a in data.get_windows(corpus['train'], offsets, T))


def null_generator(seed, step, k, which):
    """The sign-flip null's random signs: a function of (seed, t, k, which record)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, MEASURE_STREAM, step, k, which])
                                             .generate_state(1)[0]))


def heldout_losses(model, x, y, chunk, device):
    """Per-token losses (W, T) of the held-out windows, fp32, chunk sequences at a time."""
    return torch.cat([fp32_forward(model, x[a:a + chunk].to(device), y[a:a + chunk].to(device))[0].cpu()
                      for a in range(0, len(x), chunk)])


def simulated_step(model, ckpt, x, y, lr, config, device):
    """One AdamW step on (x, y) from theta_t and the checkpoint's optimizer state, as training's step t
    without clipping. Changes the parameters in place; returns delta."""
    optimizer = model.configure_optimizers(config['weight_decay'], lr, (config['beta1'], config['beta2']),
                                           'cuda' if device.startswith('cuda') else device)
    optimizer.load_state_dict(copy.deepcopy(ckpt['optimizer']))  # a copy: every batch starts from it
    for group in optimizer.param_groups:
        group['lr'] = lr
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    per_token_loss(model(x)[0], y).mean().backward()  # fp32, the batch's mean loss, as in training
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return {n: p.detach() - theta[n] for n, p in model.named_parameters()}


def gradient_sums(model, x, y, delta, chunk, device):
    """metrics.per_token_gradient_sums over the held-out windows, chunk sequences at a time: the
    sums added, the per-token dots <g_i, delta> concatenated (row-major tokens)."""
    sums, dots = None, []
    for a in range(0, len(x), chunk):
        s, q = metrics.per_token_gradient_sums(model, x[a:a + chunk].to(device), y[a:a + chunk].to(device),
                                               delta=delta)
        sums = s if sums is None else {n: tuple(u + v for u, v in zip(sums[n], s[n])) for n in sums}
        dots.append(q)
    return sums, {n: torch.cat([q[n] for q in dots]) for n in dots[0]}


def measure_checkpoint(model, ckpt, hx, hy, args, config, corpus, keys, device):
    """The row of one kept checkpoint (record name -> value; see PAPER_RECORDS)."""
    t, K, seed = int(ckpt['step']), args.batches, config['seed']
    model.load_state_dict(ckpt['model'])
    before = heldout_losses(model, hx, hy, args.chunk_seqs, device)  # (W, T) at theta_t
    row = {'steps': t, 'heldout_loss': before.flatten().numpy()}
    for name, shape, dtype, _ in [r for r in PAPER_RECORDS[2:] if r[0] not in DTT]:  # NaN, -1: not measured
        row[name] = np.full(K if shape.endswith('K') else len(keys), -1 if dtype == 'int64' else np.nan)
    ours = args.protocol == 'ours'  # published: the checkpoint's rate, of step t - 1 (which made theta_t)
    lr, delta = get_lr(t if ours else t - 1, argparse.Namespace(**config)), None
    for k in range(K if args.dt1 else 1 if args.opposition else 0):
        x, y = dt1_batch(seed, t if ours else 0, k, config, corpus, device)
        batch_before = fp32_forward(model, x, y)[0]
        with parameters_at(dict(model.named_parameters())):  # back to theta_t after the step
            update = simulated_step(model, ckpt, x, y, lr, config, device)
            delta = update if k == 0 else delta
            if args.dt1:
                changes = [('batch', fp32_forward(model, x, y)[0] - batch_before),
                           ('heldout', heldout_losses(model, hx, hy, args.chunk_seqs, device) - before)]
                for which, (where, change) in enumerate(changes):
                    D, M, null = loss_change_interference(change, null_generator(seed, t, k, which))
                    row[f'loss_D_{where}'][k], row[f'loss_M_{where}'][k] = D, M
                    row[f'loss_D_{where}_null'][k] = null
    if args.opposition:
        sums, dots = gradient_sums(model, hx, hy, delta, args.chunk_seqs, device)
        summary = metrics.opposition_summary(sums, total='model')
        terms = metrics.update_weighted_terms(sums, delta, dots, total='model')
        for prefix, table in [('opposition_', summary), ('update_', terms)]:  # a column per key
            for name in [r[0] for r in PAPER_RECORDS if r[0].startswith(prefix)]:
                row[name] = np.array([float(table[key][name[len(prefix):]]) for key in keys])
    return row


def read_rows(run, rel, settings):
    """The rows of RUN/rel that its progress.json lists, record name -> list; a folder measured with
    other settings, or a record shorter than progress.json says: one line, exit 2."""
    progress = runs.read_json(run, f"{rel}/progress.json", 'measure.py') or dict(settings, steps=[])
    steps = progress.pop('steps', None)
    if progress != settings:
        changed = sorted(k for k in set(progress) | set(settings) if progress.get(k) != settings.get(k))
        fail(f"{run}/{rel} was measured with other settings ({', '.join(changed)}): the same flags continue "
             "it, --overwrite measures again")
    rows = {name: [] for name, *_ in PAPER_RECORDS if name not in DTT}
    width = dict(K=settings['batches'], N=settings['tokens'], n_keys=len(settings['opposition_keys']))
    for name, shape, dtype, _ in [r for r in PAPER_RECORDS if r[0] in rows] if steps else []:
        try:
            a = np.load(os.path.join(run, rel, name + '.npy'), allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            fail(f"{run}/{rel}/{name}.npy: missing or corrupt ({e}); --overwrite measures again")
        cols = tuple(width[w] for w in shape.split(', ')[1:])  # the shape of a row
        if len(a) < len(steps) or a.dtype != dtype or a.shape[1:] != cols:
            fail(f"{run}/{rel}/{name}.npy: {a.shape} {a.dtype}, not {len(steps)} rows of {cols} {dtype}; "
                 "--overwrite measures again")
        rows[name] = list(a[:len(steps)])  # rows past progress.json's: an interrupted write
    return rows


def write_rows(run, rel, rows, settings, seed):
    """The records of the finished rows into RUN/rel, then progress.json, which makes them count; dt = t
    derived here, from the held-out losses of steps t and 2t (NaN where 2t is not measured)."""
    steps = [int(t) for t in rows['steps']]
    arrays = {name: np.array(rows[name], dtype) for name, _, dtype, _ in PAPER_RECORDS if name not in DTT}
    arrays.update(zip(DTT, np.full((3, len(steps)), np.nan)))
    for i, t in enumerate(steps):
        if 2 * t in steps:
            loss = rows['heldout_loss']
            change = torch.from_numpy(loss[steps.index(2 * t)].astype(np.float64) - loss[i])
            for name, value in zip(DTT, loss_change_interference(change, null_generator(seed, t, 0, 2))):
                arrays[name][i] = value
    for name, array in arrays.items():
        runs.write_atomic(run, f"{rel}/{name}.npy", lambda f: np.save(f, array))
    runs.write_json(run, f"{rel}/progress.json", dict(settings, steps=steps))


if __name__ == '__main__':
    main()
