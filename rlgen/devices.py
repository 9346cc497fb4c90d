"""Where models and tensors live: one resolver for `--device` / `run.device` (auto | cpu | cuda | cuda:N).

`auto` is CUDA when a GPU is visible, else the CPU; under torchrun with GPUs every process takes the GPU of
its LOCAL_RANK. Asking for CUDA where there is none is one RlgenError line (exit 2), never a traceback.
"""
from __future__ import annotations

import os
import re

import torch

from rlgen.errors import RlgenError, show_value

DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N"
_SPEC = re.compile(r"^(auto|cpu|cuda)(:(\d+))?$")


def check_device_spec(spec, key: str = "--device") -> str:
    """The spec itself when it is well formed (auto, cpu, cuda, cuda:N), else one line naming the key."""
    match = _SPEC.match(spec) if isinstance(spec, str) else None
    if match is None or (match.group(3) is not None and match.group(1) != "cuda"):
        raise RlgenError(f"{key} must be {DEVICE_HELP}, got {show_value(spec)}")
    return spec


def resolve_device(spec: str = "auto", key: str = "--device", local_rank: int | None = None) -> torch.device:
    """The torch.device of a spec. `local_rank` (torchrun's LOCAL_RANK when None) picks the GPU of a
    process of a multi-process run for `auto` and a bare `cuda`."""
    check_device_spec(spec, key)
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if spec == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if spec == "auto":
        return torch.device("cuda", local_rank % torch.cuda.device_count()) if available else torch.device("cpu")
    if not available:
        raise RlgenError(f"{key} {spec}: no CUDA device is available here (torch {torch.__version__}, "
                         f"torch.cuda.is_available() is False); use --device cpu or auto")
    count = torch.cuda.device_count()
    index = int(spec.split(":")[1]) if ":" in spec else local_rank % count
    if index >= count:
        raise RlgenError(f"{key} {spec}: there {'is' if count == 1 else 'are'} only {count} CUDA device"
                         f"{'' if count == 1 else 's'} (cuda:0 .. cuda:{count - 1})")
    return torch.device("cuda", index)


def module_device(module) -> torch.device:
    """Where a module computes: its `compute_device` when the trainer set one (FSDP with CPU-offloaded
    parameters computes on the GPU), else its first parameter's device (the CPU for none, or no module)."""
    declared = getattr(module, "compute_device", None)
    if isinstance(declared, torch.device):
        return declared
    parameters = getattr(module, "parameters", None)
    for param in (parameters() if parameters is not None else ()):
        return param.device
    return torch.device("cpu")


def device_listing() -> list[dict]:
    """Every device a run can use, for `rlgen env`."""
    devices = [{"device": "cpu", "name": "cpu", "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append({"device": f"cuda:{index}", "name": props.name,
                            "memory_gib": round(props.total_memory / 2**30, 1),
                            "capability": f"{props.major}.{props.minor}",
                            "bf16": torch.cuda.is_bf16_supported()})
    return devices
