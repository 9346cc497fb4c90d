#!/usr/bin/env bash
# The built-in preference demo: on-policy pairs from tiny-arith's own samples (correct vs incorrect
# answers to three-digit additions), then DPO, SimPO, KTO, online DPO and a reward model, and best-of-8 with that RM.
# Offline; about 3 minutes on a 2-core CPU. Usage: bash recipes/preference-demo/run.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs/preference-demo}
mkdir -p "$OUT"

# 1. Pairs: 8 samples per prompt, scored by exact match; best vs worst of each prompt's group for
#    DPO / SimPO, every (correct, distinct incorrect) pair for the reward model.
rlgen sample --model tiny-arith --task arithmetic --split train --limit 4000 -n 8 --max-new-tokens 8 --seed 0 -q \
  | rlgen score -r exact-match -q -o "$OUT/train_scored.jsonl"
rlgen pairs "$OUT/train_scored.jsonl" -o "$OUT/train_pairs.jsonl"
rlgen pairs "$OUT/train_scored.jsonl" --mode all -o "$OUT/train_pairs_all.jsonl"
rlgen sample --model tiny-arith --task arithmetic --split test -n 8 --max-new-tokens 8 --seed 1 -q \
  | rlgen score -r exact-match -q | rlgen pairs -o "$OUT/test_pairs.jsonl"

# 2. Preference optimisation and a reward model (tiny-arith's recommended settings: rlgen_defaults.toml).
rlgen train dpo   --data "$OUT/train_pairs.jsonl" --task arithmetic --out "$OUT/dpo" -q
rlgen train simpo --data "$OUT/train_pairs.jsonl" --task arithmetic --out "$OUT/simpo" -q
rlgen train kto   --data "$OUT/train_pairs.jsonl" --task arithmetic --out "$OUT/kto" -q
rlgen train online-dpo --task arithmetic --reward exact-match --out "$OUT/online-dpo" -q   # pairs made on the fly
rlgen train rm    --data "$OUT/train_pairs_all.jsonl" --set data.eval_path="$OUT/test_pairs.jsonl" --out "$OUT/rm" -q

# 3. Held-out evaluation (the task's 500 test problems; the RM on pairs from those problems).
rlgen eval --model tiny-arith     --task arithmetic --max-new-tokens 8 --json -q > "$OUT/eval_base.json"
rlgen eval --model "$OUT/dpo/final"   --task arithmetic --max-new-tokens 8 --json -q > "$OUT/eval_dpo.json"
rlgen eval --model "$OUT/simpo/final" --task arithmetic --max-new-tokens 8 --json -q > "$OUT/eval_simpo.json"
rlgen eval --model "$OUT/kto/final"   --task arithmetic --max-new-tokens 8 --json -q > "$OUT/eval_kto.json"
rlgen eval --model "$OUT/online-dpo/final" --task arithmetic --max-new-tokens 8 --json -q > "$OUT/eval_online_dpo.json"
rlgen eval --rm "$OUT/rm/final" --data "$OUT/test_pairs.jsonl" --json -q > "$OUT/eval_rm.json"
rlgen eval --model tiny-arith --task arithmetic --max-new-tokens 8 --sampler best-of-n --sampler-opt n=8 \
  --sampler-reward "rm:$OUT/rm/final" --json -q > "$OUT/eval_best_of_8.json"

python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def get(name, key="accuracy"):
    return json.load(open(f"{out}/eval_{name}.json"))[key]
rows = [("tiny-arith, greedy", get("base")), ("after train dpo, greedy", get("dpo")),
        ("after train simpo, greedy", get("simpo")), ("after train kto, greedy", get("kto")),
        ("after train online-dpo, greedy", get("online_dpo")), ("tiny-arith, best-of-8 by the RM", get("best_of_8"))]
print(f"{'held-out accuracy (500 arithmetic test problems)':<52} value")
for name, value in rows:
    print(f"{name:<52} {value:.3f}")
rm = json.load(open(f"{out}/eval_rm.json"))
print(f"{'reward model, held-out pairwise accuracy (%d pairs)' % rm['num_pairs']:<52} {rm['accuracy']:.3f}")
PY
