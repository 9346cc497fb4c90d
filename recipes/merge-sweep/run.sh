#!/usr/bin/env bash
# Rewarded soups on the built-in LM: two GRPO fine-tunes of tiny-arith from the same start, one for
# correctness (exact-match) and one for short answers (length, weight -1), then `rlgen merge --sweep`
# interpolates their weights (linear, 11 points) and evaluates every point on the held-out problems.
#   bash recipes/merge-sweep/run.sh [OUT]
# Writes OUT/sweep/{sweep.jsonl,summary.json,front.png}; trainings already in OUT are reused.
set -euo pipefail
out=${1:-runs/merge-sweep}
mkdir -p "$out"
train() {  # NAME [flags]
  local name=$1; shift
  if [ -d "$out/$name/final" ]; then return; fi
  local start=$SECONDS
  rlgen train grpo --model tiny-arith --task arithmetic --seed 0 --out "$out/$name" --quiet "$@"
  echo "train $name: $((SECONDS - start)) s" >> "$out/times.txt"
}
train correct --reward exact-match               # 150 steps (tiny-arith's recommended GRPO settings)
train short --reward length:-1 --steps 40        # shorter completions; correctness is not rewarded
rm -rf "$out/sweep"
start=$SECONDS
rlgen merge "$out/correct/final" "$out/short/final" --sweep --grid 11 --method linear \
  --task arithmetic --reward exact-match --reward length:-1 --hv-ref 0,4 --out "$out/sweep"
echo "sweep: $((SECONDS - start)) s" >> "$out/times.txt"
