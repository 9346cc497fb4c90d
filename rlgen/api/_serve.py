"""`rlgen serve`: a vLLM engine on a process of its own, for trainers with `rollout.vllm_mode = "server"`."""
from __future__ import annotations

import signal
import threading

from rlgen.errors import RlgenError
from rlgen.models.causal_lm import ModelConfig, load_policy

# The CPU backend's KV cache when --kv-cache-gib is not given: the server does not know the runs' lengths.
DEFAULT_CPU_KV_CACHE_GIB = 2.0


def serve(model: str = "tiny-arith", *, host: str = "127.0.0.1", port: int = 8000, max_model_len: int = 0,
          max_num_seqs: int = 256, kv_cache_gib: float = 0.0, gpu_memory_utilization: float = 0.9, dtype: str = "auto",
          device: str = "auto", seed: int = 0, timeout_s: float = 240.0, log=print, ready=None) -> None:
    """Load `model` (rlgen's loader: no code from the directory), start vLLM on it and serve generation and
    weight updates on http://host:port until interrupted (see rlgen.rollout.vllm_server)."""
    from rlgen.devices import resolve_device
    from rlgen.rollout.vllm_engine import VLLMEngine, import_vllm
    from rlgen.rollout.vllm_server import serve as serve_engine

    import_vllm()  # a missing vLLM is one line before the model loads
    policy, tokenizer, _ = load_policy(ModelConfig(path=model))
    where = resolve_device(device)
    if where.type == "cuda" and where.index not in (None, 0):
        raise RlgenError(f"--device {device}: the server runs on the first visible GPU (choose it with CUDA_VISIBLE_DEVICES)")
    policy.to(where).eval()
    engine = VLLMEngine(policy, tokenizer, max_model_len=max_model_len or None, max_num_seqs=max_num_seqs,
                        gpu_memory_utilization=gpu_memory_utilization,
                        kv_cache_gib=kv_cache_gib or DEFAULT_CPU_KV_CACHE_GIB, dtype=dtype, seed=seed)
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops it as Ctrl-C does: cleaned up
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve_engine(engine, host, port, log=log, timeout_s=timeout_s, ready=ready)
    finally:
        engine.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
