#!/usr/bin/env bash
# Reproducible recipe for the built-in model `tiny-arith` (CPU, about 8 minutes on 2 cores):
#   1. a random 4-layer Llama (d=128) with rlgen's character tokenizer,
#   2. SFT demonstrations of the arithmetic task's train split from a "sloppy annotator" (see make_data.py),
#   3. `rlgen train sft` on them; the final model is copied into the package.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${WORK:-runs/recipe-tiny-arith}
steps=${STEPS:-5000}
rm -rf "$work"
mkdir -p "$work"
python recipes/tiny-arith/init_model.py "$work/init" --seed 0
python recipes/tiny-arith/make_data.py "$work/sloppy.jsonl" --sloppy 0.5 --seed 0
rlgen train sft --model "$work/init" --data "$work/sloppy.jsonl" --out "$work/sft" --steps "$steps" \
    --seed 0 --set optim.lr=1e-3 --set optim.lr_scheduler=cosine --set optim.warmup_steps=100 \
    --set algorithm.batch_size=64 --set run.threads=1 --set run.eval_every=0
target=rlgen/builtin_models/tiny-arith
rm -rf "$target"
mkdir -p "$target"
cp "$work"/sft/final/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json} "$target/"
cp recipes/tiny-arith/rlgen_defaults.toml "$target/"
rlgen eval --model tiny-arith --task arithmetic --json
