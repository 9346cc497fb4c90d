#!/usr/bin/env bash
# The image demo: RL on the built-in tiny-digits models against the built-in digit classifier, then
# test-time search, all offline on CPU.
#   bash recipes/digits-demo/run.sh [OUT]
# Prints one table (OUT/summary.txt); grids of the held-out prompts (a row per digit, 8 fixed seeds) go to
# OUT/grids/ and side by side to OUT/digits-demo.png. Trainings already in OUT are reused.
set -euo pipefail
out=${1:-runs/digits-demo}
mkdir -p "$out/grids"
# Each method is compared with the base under the same sampler and the same seeds:
ode=(--num-steps 20 --eta 0)     # deterministic DDIM / Euler, 20 steps (reward-backprop, flow-grpo, reno)
sde=(--num-steps 10 --eta 1.0)   # DDPO's training sampler: DDIM eta = 1, 10 steps (ddpo, best-of-n, fk-steering)
evaluate() {  # MODEL NAME [eval flags]: mean digit-classifier reward, 10 held-out prompts x 8 fixed seeds
  local model=$1 name=$2; shift 2
  rlgen eval --model "$model" --task digits -k 8 --seed 0 --json --quiet "$@" > "$out/eval-$name.json"
  python -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'{sys.argv[2]:<44} {r[\"reward_mean\"]:.3f}')" "$out/eval-$name.json" "$name" | tee -a "$out/summary.txt"
}
grid() {  # MODEL NAME [sample flags]: the held-out prompts' images as one PNG
  local model=$1 name=$2; shift 2
  rm -rf "$out/samples-$name.jsonl" "$out/samples-${name}_images"
  rlgen sample --model "$model" --task digits -n 8 --seed 0 --quiet --out "$out/samples-$name.jsonl" --grid "$out/grids/$name.png" "$@" > /dev/null
}
train() {  # ALGO [flags]
  local algo=$1; shift
  if [ -d "$out/$algo/final" ]; then return; fi
  local start=$SECONDS
  rlgen train "$algo" --out "$out/$algo" --quiet "$@"
  echo "train $algo: $((SECONDS - start)) s" >> "$out/times.txt"
}
SECONDS=0
train ddpo --model tiny-digits
train reward-backprop --model tiny-digits
train flow-grpo   # flow-grpo's default model is tiny-digits-flow
if [ ! -f "$out/pairs/pairs.jsonl" ]; then  # Diffusion-DPO on preference pairs of the base's own samples
  mkdir -p "$out/pairs"
  rlgen sample --model tiny-digits --task digits --split train -n 16 --num-steps 10 --eta 1.0 --seed 0 --quiet --out "$out/pairs/samples.jsonl"
  rlgen score "$out/pairs/samples.jsonl" -r digit-classifier --quiet --out "$out/pairs/scored.jsonl"
  rlgen pairs "$out/pairs/scored.jsonl" --mode all --margin 0.5 --quiet --out "$out/pairs/pairs.jsonl"
fi
train diffusion-dpo --model tiny-digits --data "$out/pairs/pairs.jsonl"
: > "$out/summary.txt"
evaluate tiny-digits "tiny-digits (base), ddim eta=1 10 steps" "${sde[@]}"
evaluate "$out/ddpo/final" "ddpo, ddim eta=1 10 steps" "${sde[@]}"
evaluate tiny-digits "tiny-digits (base), ode 20 steps" "${ode[@]}"
evaluate "$out/reward-backprop/final" "reward-backprop, ode 20 steps" "${ode[@]}"
evaluate tiny-digits-flow "tiny-digits-flow (base), ode 20 steps" "${ode[@]}"
evaluate "$out/flow-grpo/final" "flow-grpo, ode 20 steps" "${ode[@]}"
evaluate "$out/diffusion-dpo/final" "diffusion-dpo, ode 20 steps" "${ode[@]}"
evaluate tiny-digits "base + reno, ode 20 steps" "${ode[@]}" --sampler reno --sampler-reward digit-classifier
evaluate tiny-digits "base + best-of-n n=8, ddim eta=1 10 steps" "${sde[@]}" --sampler best-of-n --sampler-opt n=8 --sampler-reward digit-classifier
evaluate tiny-digits "base + fk-steering 8 particles, eta=1 10 steps" "${sde[@]}" --sampler fk-steering --sampler-opt particles=8 --sampler-reward digit-classifier
grid tiny-digits base "${sde[@]}"
grid "$out/ddpo/final" ddpo "${sde[@]}"
grid "$out/reward-backprop/final" reward-backprop "${ode[@]}"
grid tiny-digits base-ode "${ode[@]}"
grid tiny-digits-flow flow-base "${ode[@]}"
grid "$out/flow-grpo/final" flow-grpo "${ode[@]}"
python "$(dirname "$0")/figure.py" "$out" "$out/digits-demo.png"
cat "$out/times.txt"
echo "digits demo: ${SECONDS} s in all; grids in $out/grids"
