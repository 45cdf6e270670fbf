#!/usr/bin/env bash
# The study behind results/README.md, from scratch, in the published regime: warmup then a constant
# learning rate, a learning rate per model size, opposition over 2048 held-out tokens on the schedule
# and the log2 checkpoints measured offline. Every run uses the same seed, hence the same data order
# and probe set for a given vocabulary.
#
#   bash studies/sweep.sh              # all three parts, one after the other
#   bash studies/sweep.sh sizes        # 4 sizes, 900 steps: loss deceleration, gradient opposition, zero-sum
#                              # learning, recorded online
#   bash studies/sweep.sh measure      # measure.py on the size sweep's checkpoints at N = 128, 2048, 16384
#   bash studies/sweep.sh warmup       # 4L/128d with 10, 40, 50 and 100 warmup steps: does t_d track warmup?
#   bash studies/sweep.sh saturation   # 2 layers at widths 8 to 64, vocabulary 2048, 10-20M tokens each
#
# The parts are independent: on a machine with cores to spare, run them side by side. Runs go to
# $OUT (default out/sweep), each part's figures and report.md to $OUT/<part>/figures. Each run and
# part prints how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root, wherever it is called from
OUT=${OUT:-out/sweep}  # relative to the repository root
what=${1:-all}
THREADS=${THREADS:-0}  # torch threads per run (0: its default); 1 when parts run side by side
export PYTHONUNBUFFERED=1

took() {  # "took M min S s" since $1 (a $SECONDS value)
  echo "$(( (SECONDS - $1) / 60 )) min $(( (SECONDS - $1) % 60 )) s"
}

train() {  # train one model into $1 (more train.py arguments follow), then say how long it took
  local dir=$1; shift
  local t0=$SECONDS
  python train.py --out_dir "$dir" --overwrite --log_interval 100 --threads "$THREADS" "$@"
  echo "sweep.sh: $dir took $(took $t0)"
}

lr_for() {  # the published rule for the peak learning rate: lr = 2e-3 (P / P_0)^-0.27, P the parameter
  # count of n_layer $1 at width $2 with vocabulary $3, P_0 that of n_layer $4 at width $5, the
  # smallest model of the sweep (which gets 2e-3)
  python -c "
from model import GPT, GPTConfig
P = lambda L, d: GPT(GPTConfig(n_layer=L, n_embd=d, n_head=max(1, d // 32), vocab_size=$3)).num_params()
print(f'{2e-3 * (P($1, $2) / P($4, $5)) ** -0.27:.3g}')"
}

if [[ $what == all || $what == sizes ]]; then
  t0=$SECONDS
  # head width 32, vocabulary 4096, batch 16 x 128, 900 steps (1.95 passes over the 0.95M training
  # tokens), 50 warmup steps; every record, opposition over the 16 probe sequences (2048 tokens) on
  # the grad schedule, and the parameters with their AdamW state kept at steps 1, 2, 4, ..., 512
  for spec in "2 64" "3 96" "4 128" "6 192"; do
    read -r L d <<< "$spec"
    train "$OUT/sizes/L${L}_d${d}" --n_layer "$L" --n_embd "$d" --n_head $(( d / 32 )) \
      --learning_rate "$(lr_for "$L" "$d" 4096 2 64)" --max_iters 900 --keep_ckpts log2
  done
  python plot.py "$OUT/sizes"
  echo "sweep.sh: the size sweep took $(took $t0)"
fi

if [[ $what == all || $what == measure ]]; then
  t0=$SECONDS
  # the published protocol at three N: 128 and 2048 held-out tokens at the kept checkpoints from 16
  # to 512, and 16384 at 64 and 256, either side of the loss's deceleration
  for run in "$OUT"/sizes/L*; do
    t1=$SECONDS
    for N in 128 2048; do
      python measure.py "$run" --tokens $N --steps 16,32,64,128,256,512 --overwrite --threads "$THREADS"
    done
    python measure.py "$run" --tokens 16384 --steps 64,256 --overwrite --threads "$THREADS"
    echo "sweep.sh: measure.py on $run took $(took $t1)"
  done
  python plot.py "$OUT/sizes"
  echo "sweep.sh: measure.py on the size sweep took $(took $t0)"
fi

if [[ $what == all || $what == warmup ]]; then
  t0=$SECONDS
  # the 4L/128d model of the size sweep with 10, 40, 50 (as in the size sweep) and 100 warmup steps;
  # the loss curve only
  lr=$(lr_for 4 128 4096 2 64)
  for w in 10 40 50 100; do
    train "$OUT/warmup/warmup${w}" --warmup_iters "$w" --learning_rate "$lr" --max_iters 900 --record none
  done
  python plot.py "$OUT/warmup"
  echo "sweep.sh: the warmup ablation took $(took $t0)"
fi

if [[ $what == all || $what == saturation ]]; then
  t0=$SECONDS
  # 2 layers, vocabulary 2048 (tail tokens seen hundreds of times in the 1.05M training tokens), the
  # narrowest trained longest: 20M tokens (9766 steps of 2048) at widths 8 and 16, 10M at 32 and 64;
  # a probe of 32 sequences (4096 tokens; report.md counts them per frequency bucket), 32 fixed training
  # windows, opposition over 16 of the probe sequences, --record light
  for spec in "8 9766" "16 9766" "32 4883" "64 4883"; do
    read -r d steps <<< "$spec"
    train "$OUT/saturation/d${d}" --n_layer 2 --n_embd "$d" --n_head $(( d > 32 ? d / 32 : 1 )) \
      --vocab_size 2048 --learning_rate "$(lr_for 2 "$d" 2048 2 8)" --max_iters "$steps" \
      --record light --probe_seqs 32 --train_probe_seqs 32 --opposition_seqs 16
  done
  python plot.py "$OUT/saturation"
  echo "sweep.sh: the saturation sweep took $(took $t0)"
fi
