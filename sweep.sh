#!/usr/bin/env bash
# The study behind the README's Results, from scratch: models trained on the default corpus with
# the same seed, hence the same data order, tokens, probe set and schedule, then plotted.
#
#   bash sweep.sh              # both sweeps
#   bash sweep.sh sizes        # a sweep of four model sizes (loss deceleration, zero-sum learning)
#   bash sweep.sh saturation   # narrow models with a large vocabulary, trained long (saturation, dissent)
#   bash sweep.sh paper        # the size sweep in the published regime: constant learning rate after
#                              # warmup, a learning rate per size (not part of "all")
#
# Runs go to $OUT (default out/sweep), figures and report.md to $OUT/<sweep>/figures.
# Each part prints how long it took.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/sweep}
what=${1:-all}

run() {  # train one model into $1, then say how long it took
  local dir=$1; shift
  local t0=$SECONDS
  # --decay_lr: the cosine schedule these results were measured with (train.py's default is now
  # the published constant learning rate after warmup)
  python train.py --out_dir "$dir" --overwrite --log_interval 100 --decay_lr "$@"
  echo "sweep.sh: $dir took $(( (SECONDS - t0) / 60 )) min $(( (SECONDS - t0) % 60 )) s"
}

lr_for() {  # the published rule for the peak learning rate: lr = 2e-3 (P / P_smallest)^-0.27, P the
  # parameter count of n_layer $1, width $2 (vocabulary 4096), the smallest being 2 layers at width 64
  python -c "
from model import GPT, GPTConfig
P = lambda L, d: GPT(GPTConfig(n_layer=L, n_embd=d, n_head=d // 32, vocab_size=4096)).num_params()
print(f'{2e-3 * (P($1, $2) / P(2, 64)) ** -0.27:.3g}')"
}

if [[ $what == paper ]]; then
  t0=$SECONDS
  for spec in "2 64" "4 128" "6 192" "8 256"; do
    read -r L d <<< "$spec"
    lr=$(lr_for "$L" "$d")
    echo "sweep.sh: ${L}L/${d}d at learning rate $lr"
    # no --decay_lr: warmup, then the constant learning rate of the published runs
    dir="$OUT/paper/L${L}_d${d}"; t1=$SECONDS
    python train.py --out_dir "$dir" --overwrite --log_interval 100 --n_layer "$L" --n_embd "$d" \
      --n_head $(( d / 32 )) --learning_rate "$lr" --keep_ckpts log2
    echo "sweep.sh: $dir took $(( (SECONDS - t1) / 60 )) min $(( (SECONDS - t1) % 60 )) s"
  done
  python plot.py "$OUT/paper"
  echo "sweep.sh: the published-regime size sweep took $(( (SECONDS - t0) / 60 )) min"
fi

if [[ $what == all || $what == sizes ]]; then
  t0=$SECONDS
  # n_layer / n_embd from 2/64 to 8/256, head width 32; everything else at train.py's defaults
  for spec in "2 64" "4 128" "6 192" "8 256"; do
    read -r L d <<< "$spec"
    run "$OUT/sizes/L${L}_d${d}" --n_layer "$L" --n_embd "$d" --n_head $(( d / 32 ))
  done
  python plot.py "$OUT/sizes"
  echo "sweep.sh: the size sweep took $(( (SECONDS - t0) / 60 )) min"
fi

if [[ $what == all || $what == saturation ]]; then
  t0=$SECONDS
  # a vocabulary much larger than the width, trained well past the best validation loss
  for d in 16 32 64; do
    run "$OUT/saturation/d${d}" --n_layer 2 --n_embd "$d" --n_head 2 --vocab_size 8192 --max_iters 3000
  done
  python plot.py "$OUT/saturation"
  echo "sweep.sh: the saturation sweep took $(( (SECONDS - t0) / 60 )) min"
fi
