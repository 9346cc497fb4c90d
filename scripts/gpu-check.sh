#!/usr/bin/env bash
# One command on a GPU machine: the CUDA tests, then the benchmarks on the GPU, one table each.
#   bash scripts/gpu-check.sh            (from the repository root, rlgen installed with its [test] extras)
# Prints the CUDA tests' outcome, the log-prob kernel benchmark (native vs torch eager, and Liger-Kernel when
# installed), the GRPO / DPO step benchmarks (vs TRL when installed), the diffusion step and merge benchmarks
# and the Qwen2-0.5B-shaped GRPO update (bench/scale.py), with peak memory.
set -uo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu-check: torch sees no CUDA device (torch %s)" % torch.__version__)
print("gpu-check:", torch.cuda.get_device_name(0), "x", torch.cuda.device_count(), "| torch", torch.__version__)
PY
[ $? -eq 0 ] || exit 2
status=0
rlgen env
python -m pytest -q -m cuda tests/test_cuda.py || status=1
scratch="${TMPDIR:-/tmp}/rlgen-gpu-check"
mkdir -p "$scratch"
# bench/merge.py needs a work directory for its generated checkpoints; bench/scale.py is the
# Qwen2-0.5B-shaped GRPO update (fp32 / bf16-mixed, checkpointing, FSDP ranks when available).
for bench in logprob grpo_step dpo_step diffusion_step "merge --work $scratch/merge" scale; do
  name="${bench%% *}"
  echo "== bench/$name.py${bench#"$name"} --device cuda"
  # shellcheck disable=SC2086  # $bench carries the script's extra arguments
  python bench/$name.py ${bench#"$name"} --device cuda --json "$scratch/$name.json" || status=1
done
# The vLLM rollout engine on CUDA (needs `pip install "rlgen[vllm]"`): its tests (weight sync, log-probs against
# the policy, the GRPO demo), then a bf16 GRPO run with sleep mode, and the HF-vs-vLLM rollout benchmark.
if python -c "import vllm" 2>/dev/null; then
  RLGEN_REQUIRE_VLLM=1 python -m pytest -q tests/test_vllm.py || status=1
  rlgen train grpo --device cuda --out "$scratch/grpo-vllm" --set 'rollout.engine="vllm"' --set 'run.precision="bf16-mixed"' \
    --set 'rollout.vllm_dtype="bfloat16"' --set rollout.vllm_enable_sleep_mode=true --set run.steps=50 || status=1
  python bench/rollout.py --shape both --json "$scratch/rollout.json" || status=1
  # server mode across two GPUs (NCCL weight group), when there are two
  if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    CUDA_VISIBLE_DEVICES=1 rlgen serve --model tiny-arith --port 8011 > "$scratch/serve.log" 2>&1 &
    server=$!
    CUDA_VISIBLE_DEVICES=0 rlgen train grpo --device cuda --out "$scratch/grpo-vllm-server" --set 'rollout.engine="vllm"' \
      --set 'rollout.vllm_mode="server"' --set rollout.vllm_server_port=8011 --set run.steps=50 || status=1
    kill "$server"
  fi
else
  echo "gpu-check: vLLM is not installed: the vLLM engine checks did not run"
fi
echo "gpu-check: JSON results in $scratch"
exit $status
