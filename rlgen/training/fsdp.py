"""Sharded data parallelism (`run.distributed = fsdp`) on torch's FSDP2 (`fully_shard`): each rank keeps
1/world_size of the weights, gradients and AdamW states; a block's weights are all-gathered for its forward
and backward, and its gradients reduce-scattered.

The data-parallel contract (rlgen.distributed) stays: losses are normalised by global counts, so the
gradients are *summed* over ranks, not averaged (divide factor 1, plain SUM collectives, which gloo supports
too). FSDP runs collectives inside every forward pass, so under FSDP every rank must run the same number of
forward passes per step (the trainer checks that each rank gets an equal, non-empty share of the batch).

Checkpoints stay world-size independent and pickle-free: the full model state is gathered to rank 0 and
written as a plain Hugging Face directory, the full optimiser state in the single-process layout (parameter
indices, rlgen.training.state); on resume every rank reads the same files.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

# torch.distributed.fsdp / .checkpoint are imported where used: they take over a second to import, and most
# runs never shard.

BLOCK_CONTAINERS = ("down_blocks", "up_blocks")  # diffusers UNets: their down and up blocks (and mid_block)


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The units sharded one by one: a transformer's decoder layers (`model.model.layers`), a diffusers UNet's
    down / mid / up blocks, else the outermost modules of a class in `_no_split_modules` (fully_shard needs
    no unit inside another)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return list(layers)
    unet = [block for name in BLOCK_CONTAINERS for block in getattr(model, name, None) or ()]
    mid = getattr(model, "mid_block", None)
    if unet:
        return unet + ([mid] if mid is not None else [])
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    found: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if type(module).__name__ in no_split and not any(name.startswith(f"{outer}.") for outer in found):
            found[name] = module
    return list(found.values())


def mixed_precision_policy(precision: str):
    """bf16-mixed under FSDP: weights gathered and computed in bf16, gradients reduced in fp32 into the fp32
    sharded master weights (so the all-gathers move half the bytes)."""
    if precision == "bf16-mixed":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def shard_model(model: torch.nn.Module, reshard_after_forward: bool = True, cpu_offload: bool = False,
                mp_policy=None) -> torch.nn.Module:
    """Apply fully_shard to every block, then to the root (what no block holds: embeddings, head, norms);
    the model is changed in place and returned. Gradients are summed over ranks (see the module doc)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

    options: dict = {"reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for block in blocks_of(model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # SUM only: no PREMUL_SUM / AVG, which gloo lacks
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(value):
    """A DTensor (a sharded parameter, a norm of sharded gradients) as a plain tensor; others unchanged."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _gathered():
    """Full (unsharded) states, on rank 0's CPU only (the other ranks get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> dict:
    """The whole model's state dict on rank 0 (CPU tensors); a collective, every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_gathered())


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimiser state on rank 0 in `optimizer.state_dict()`'s single-process layout (states and
    param groups keyed by parameter index), so that any world size, sharded or not, restores it. A
    collective: every rank calls it (the others get {})."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    gathered = get_optimizer_state_dict(model, optimizer, options=_gathered())
    if not gathered:
        return {}
    index, groups = 0, []
    by_name: dict[str, int] = {}
    for group in gathered["param_groups"]:
        indices = []
        for name in group["params"]:
            by_name[name] = index
            indices.append(index)
            index += 1
        groups.append({**group, "params": indices})
    return {"state": {by_name[name]: state for name, state in gathered["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore a single-process-layout optimiser state (every rank passes the same one) into a sharded
    optimiser: each rank keeps its shard of every state tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {param: name for name, param in model.named_parameters()}
    ordered = [names[param] for group in optimizer.param_groups for param in group["params"]]
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError("the optimizer state has a different number of parameter groups")
    groups = [{**group, "params": [ordered[i] for i in group["params"]]} for group in state["param_groups"]]
    by_name = {ordered[int(i)]: value for i, value in state["state"].items()}
    set_optimizer_state_dict(model, optimizer, {"state": by_name, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


def save_full_hf(model: torch.nn.Module, tokenizer, out_dir: Path, state_dict: dict, extra_files: tuple = ()) -> None:
    """A plain Hugging Face directory from a gathered full state dict, atomically (as save_hf). A tied weight
    (the LM head sharing the embeddings) is written once, under its first name, as save_pretrained does."""
    from rlgen.models.causal_lm import copy_side_files, replace_dir

    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(param), name)
    tied = {name for name, param in model.named_parameters(remove_duplicate=False) if first[id(param)] != name}
    state_dict = {name: value for name, value in state_dict.items() if name not in tied}

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    copy_side_files(extra_files, tmp)
    replace_dir(tmp, out_dir)


def local_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The bytes this rank holds of the trained parameters, their gradients and the optimiser states (a
    sharded tensor counts its local shard only), for measuring what sharding saves."""

    def size(tensor) -> int:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return local.numel() * local.element_size()

    params = [p for p in model.parameters() if p.requires_grad]
    # the moments; AdamW's per-parameter step counters are scalars every rank keeps whole
    states = [v for p in params for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor) and v.dim()]
    out = {"params": sum(size(p) for p in params), "grads": sum(size(p.grad) for p in params if p.grad is not None),
           "optimizer": sum(size(v) for v in states)}
    out["total"] = sum(out.values())
    return out


def local_parameter_bytes(module: torch.nn.Module) -> int:
    """The bytes of every parameter, frozen ones included, that this rank holds (a sharded one: its local
    shard), e.g. a frozen reference's."""
    total = 0
    for param in module.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total
