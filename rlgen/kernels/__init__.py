"""Per-token log-probs and entropies: the hot path of every LM trainer.

    token_logprobs(logits, targets, temperature=1.0)                  -> (logprobs, entropy)
    linear_token_logprobs(hidden, weight, targets, temperature=1.0)   -> (logprobs, entropy)

Both are differentiable in every tensor input (entropy included) and return fp32 for fp32 / bf16
input (fp64 for fp64). Neither materialises log_softmax over [N, V]; the linear form does not even
build the [N, V] logits. Backends, chosen per device:
  native-cpu   rlgen._native (C++17, OpenMP, AVX2 / AVX-512 picked at run time)
  native-cuda  rlgen._native_cuda (CUDA kernels)
  torch        the same chunked algorithm in torch operations (when the extension is not built)
Modes (`use(mode)`, or the RLGEN_KERNELS environment variable at start-up):
  auto       native kernels where built, else the torch fallback (the default)
  native     the native kernels, and an error where they are not built
  torch      the torch fallback everywhere (what a build without a compiler runs)
  reference  the eager torch reference (log_softmax + gather, full logits), for debugging
"""
from __future__ import annotations

import os
import sys

import torch

from rlgen.kernels import reference
from rlgen.kernels.functions import LinearTokenLogprobs, TokenLogprobs
from rlgen.kernels.segments import NativeCPU, NativeCUDA, TorchSegments

MODES = ("auto", "native", "torch", "reference")
DEFAULT_TOKEN_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 4096

_mode = os.environ.get("RLGEN_KERNELS", "auto")
if _mode not in MODES:  # not fatal: one line on stderr, then the default
    sys.stderr.write(f"rlgen: warning: RLGEN_KERNELS={_mode!r} is not one of {', '.join(MODES)}; using 'auto'\n")
    _mode = "auto"
_loaded: dict[str, object] = {}


def _import_native(name: str):
    if name not in _loaded:
        try:
            module = __import__(f"rlgen.{name}", fromlist=["_"])
        except ImportError as exc:
            module = exc
        _loaded[name] = module
    module = _loaded[name]
    return None if isinstance(module, ImportError) else module


def native_import_error(name: str = "_native") -> str | None:
    """Why the compiled module could not be imported (None when it was)."""
    _import_native(name)
    error = _loaded[name]
    return str(error) if isinstance(error, ImportError) else None


def use(mode: str) -> str:
    """Select the kernels for later calls (one of MODES); returns the previous mode."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "native" and _import_native("_native") is None:
        raise RuntimeError(f"the native kernels are not built ({native_import_error()}); "
                           "reinstall rlgen with a C++ compiler, or use kernels 'auto' or 'reference'")
    previous, _mode = _mode, mode
    return previous


def mode() -> str:
    return _mode


def segment_ops(device: torch.device | str = "cpu"):
    """The segment backend for tensors on `device` (None in reference mode)."""
    if _mode == "reference":
        return None
    if _mode == "torch":
        return TorchSegments()
    device = torch.device(device)
    if device.type == "cpu":
        module = _import_native("_native")
        if module is not None:
            return NativeCPU(module)
    elif device.type == "cuda":
        module = _import_native("_native_cuda")
        if module is not None:
            return NativeCUDA(module)
    if _mode == "native":
        raise RuntimeError(f"no native kernels for device '{device.type}'")
    return TorchSegments()


def backend_name(device: torch.device | str = "cpu") -> str:
    """'native-cpu', 'native-cuda', 'torch' (the fallback) or 'reference'."""
    ops = segment_ops(device)
    return "reference" if ops is None else ops.name


def describe(device: torch.device | str = "cpu") -> str:
    ops = segment_ops(device)
    return "reference" if ops is None else ops.describe()


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *,
                   ignore_index: int = -100, inplace_backward: bool = False):
    """Log-prob of each target under softmax(logits / temperature) and that distribution's entropy.

    logits [..., V] (fp32, bf16 or fp64; -inf entries are a masked vocabulary), targets [...] (int).
    A target equal to `ignore_index` gets log-prob 0 and no gradient. `inplace_backward=True`
    overwrites the logits with their gradient during backward (no [N, V] allocation); the caller
    must not read the logits after backward.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ops = segment_ops(logits.device)
    if ops is None or logits.dtype == torch.float16:  # fp16 is not a kernel dtype
        return reference.token_logprobs(logits, targets, temperature, ignore_index)
    return TokenLogprobs.apply(logits, targets, temperature, ops, inplace_backward, ignore_index)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                          *, bias: torch.Tensor | None = None, ignore_index: int = -100,
                          token_chunk: int = DEFAULT_TOKEN_CHUNK, vocab_chunk: int = DEFAULT_VOCAB_CHUNK):
    """token_logprobs(hidden @ weight.T + bias, targets, temperature) without the [N, V] logits.

    hidden [..., H], weight [V, H] (an lm_head's), targets [...]. Peak extra memory is one
    [token_chunk, vocab_chunk] block of logits whatever N and V are; backward recomputes the blocks.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the weight's {weight.shape[-1]}")
    ops = segment_ops(hidden.device)
    if ops is None or hidden.dtype == torch.float16:
        return reference.linear_token_logprobs(hidden, weight, targets, temperature, bias, ignore_index)
    return LinearTokenLogprobs.apply(hidden, weight, bias, targets, temperature, ops, ignore_index,
                                     max(1, int(token_chunk)), max(1, int(vocab_chunk)))
