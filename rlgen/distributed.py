"""Multi-process training on torch.distributed (torchrun): the process group, who does what, and the
collectives the trainers need.

Data parallelism with exact single-process equivalence: every rank draws the same global batch (same seed,
same sampler state), trains on its contiguous share of it with losses normalised by *global* counts
(`Dist.sum`), and the gradients are summed across ranks before clipping (`sync_gradients`). The summed
gradient is then the single-process gradient of the global batch, up to the order of floating-point sums.
Model, optimiser and sampler states stay replicated, so a checkpoint written by rank 0 resumes at any world
size. Rank 0 alone writes the run directory (config, metrics, checkpoints, final/) and reports progress.

Backends: nccl when the run's device is CUDA, gloo on the CPU. Without torchrun's environment (WORLD_SIZE
unset or 1) everything here is a no-op on one process.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlgen.errors import RlgenError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- shares of a global batch ---
    def share(self, n: int) -> range:
        """This rank's contiguous share of n items (the first n % world_size ranks take one more)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def shard(self, items: list) -> list:
        span = self.share(len(items))
        return items[span.start:span.stop]

    # --- collectives (identity on one process) ---
    def sum(self, value):
        """The sum over ranks of a number or tensor (a tensor keeps its dtype and device)."""
        if not self.enabled:
            return value
        tensor = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64)
        tensor = tensor.to(_collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        if isinstance(value, torch.Tensor):
            return tensor.to(value.device)
        return float(tensor)

    def mean_metrics(self, metrics: dict) -> dict:
        """Numeric metrics averaged over ranks (one collective; every rank has the same keys); other values
        are rank 0's."""
        if not self.enabled:
            return metrics
        keys = sorted(k for k, v in metrics.items() if _is_number(v))
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        out = dict(metrics)
        for key, value in zip(keys, (values / self.world_size).tolist()):
            out[key] = int(round(value)) if isinstance(metrics[key], int) and not isinstance(metrics[key], bool) else value
        return out

    def all_gather_rows(self, tensor: torch.Tensor, pad_value=0) -> torch.Tensor:
        """Every rank's rows, concatenated in rank order: the global batch of per-rank shares (`share` is
        contiguous, so this is the single-process order). Ranks may hold different numbers of rows, and
        tensors of 2+ dims different widths along dim 1 (padded at the end to the widest with `pad_value`);
        the other dims must agree. Keeps dtype and device; on one process the tensor itself."""
        if not self.enabled:
            return tensor
        device = _collective_device()
        width = tensor.shape[1] if tensor.dim() > 1 else 0
        sizes = torch.tensor([tensor.shape[0], width], dtype=torch.long, device=device)
        gathered_sizes = [torch.zeros_like(sizes) for _ in range(self.world_size)]
        dist.all_gather(gathered_sizes, sizes)
        rows = [int(s[0]) for s in gathered_sizes]
        widest = max(int(s[1]) for s in gathered_sizes)
        local = tensor.detach()
        if local.dtype == torch.bool:  # gloo has no bool all_gather
            local = local.to(torch.uint8)
        if tensor.dim() > 1 and width < widest:
            pad = torch.full((local.shape[0], widest - width, *local.shape[2:]), pad_value, dtype=local.dtype, device=local.device)
            local = torch.cat([local, pad], dim=1)
        most = max(rows)
        if local.shape[0] < most:  # all_gather needs equal shapes: pad rows, trimmed again below
            filler = torch.zeros((most - local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
            local = torch.cat([local, filler])
        local = local.to(device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        out = torch.cat([part[:n] for part, n in zip(parts, rows)])
        return out.to(device=tensor.device, dtype=tensor.dtype)

    def row_offset(self, local_rows: int) -> int:
        """The global index of this rank's first row when each rank holds `local_rows` rows of one global
        batch in rank order (one collective)."""
        if not self.enabled:
            return 0
        counts = self.all_gather_rows(torch.tensor([local_rows], dtype=torch.long))
        return int(counts[: self.rank].sum())

    def all_gather_json(self, obj) -> list:
        """Every rank's JSON-able object, in rank order (no pickle: JSON text in byte tensors)."""
        if not self.enabled:
            return [obj]
        import json

        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        sizes = self.all_gather_rows(torch.tensor([len(data)], dtype=torch.long)).tolist()
        gathered = self.all_gather_rows(data)
        out, start = [], 0
        for size in sizes:
            out.append(json.loads(bytes(gathered[start:start + size].tolist()).decode()))
            start += size
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's value of a JSON-able object on every rank (no pickle: JSON text in a byte tensor)."""
        if not self.enabled:
            return obj
        import json

        data = json.dumps(obj).encode() if self.is_main else b""
        size = torch.tensor([len(data)], dtype=torch.long, device=_collective_device())
        dist.broadcast(size, 0)
        buffer = torch.zeros(int(size), dtype=torch.uint8, device=_collective_device())
        if self.is_main:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buffer, 0)
        return json.loads(bytes(buffer.cpu().tolist()).decode())


def sync_gradients(params: list[torch.Tensor], ctx: Dist, bucket_bytes: int = 64 << 20) -> None:
    """Sum every parameter's gradient over the ranks, in flat buckets (a parameter without a gradient on
    every rank counts as zero, so ranks never disagree on the collectives they run)."""
    if not ctx.enabled:
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    bucket: list[torch.Tensor] = []
    size = 0
    for param in params:
        bucket.append(param.grad)
        size += param.grad.numel() * param.grad.element_size()
        if size >= bucket_bytes:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for grad in grads:
        by_kind.setdefault((grad.dtype, grad.device), []).append(grad)
    for group in by_kind.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _is_number(value) -> bool:
    # NaN included: every rank must send the same keys (a NaN on any rank makes the mean NaN)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _collective_device() -> torch.device:
    """gloo reduces CPU tensors, nccl CUDA tensors."""
    if dist.is_initialized() and dist.get_backend() == "nccl":  # ("cuda:nccl,cpu:gloo" reduces CPU tensors with gloo)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_distributed(device: torch.device) -> Dist:
    """The process group of a torchrun launch (nccl for CUDA, gloo for the CPU), or one process."""
    if not launched_by_torchrun():
        return Dist()
    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError):
        raise RlgenError("WORLD_SIZE > 1 but RANK / LOCAL_RANK are not set: launch with torchrun "
                         "(or `rlgen train ... --nproc N`)") from None
    if not dist.is_initialized():
        # CUDA: nccl for GPU tensors plus gloo for CPU ones (FSDP's CPU-offloaded states, host-side sums)
        backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return Dist(rank=rank, world_size=world, local_rank=local)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
