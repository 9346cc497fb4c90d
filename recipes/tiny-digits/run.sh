#!/usr/bin/env bash
# Reproduces the built-in tiny-digits models and the digit classifier from scikit-learn's digits dataset:
#   bash recipes/tiny-digits/run.sh [WORK_DIR]
# then copies the results into rlgen/builtin_models/. About 20 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${1:-runs/tiny-digits-recipe}
mkdir -p "$work"
python recipes/tiny-digits/train_classifier.py --out "$work/digit-classifier"
python recipes/tiny-digits/make_init.py "$work/init"
for variant in tiny-digits tiny-digits-flow; do
  rlgen train diffusion-sft --model "$work/init/$variant" --out "$work/$variant" --steps 1000 --seed 0 --set data.label_noise=0.3 \
    --set optim.lr=1e-3 --set optim.lr_scheduler=cosine --set optim.warmup_steps=100 \
    --set data.eval_samples=0 --set run.threads=2 --quiet
done
for name in digit-classifier; do
  rm -rf "rlgen/builtin_models/$name" && cp -r "$work/$name" "rlgen/builtin_models/$name"
done
for variant in tiny-digits tiny-digits-flow; do
  rm -rf "rlgen/builtin_models/$variant" && cp -r "$work/$variant/final" "rlgen/builtin_models/$variant"
  cp "recipes/tiny-digits/rlgen_defaults.toml" "rlgen/builtin_models/$variant/rlgen_defaults.toml"
done
echo "tiny-digits recipe: done"
