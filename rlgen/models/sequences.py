"""Token-sequence helpers of the causal-LM backbone: padding, runs of rows sharing a prompt, and the KV cache
a shared prompt prefix is computed into once and repeated over its rows (sampling, log-probs, KL)."""
from __future__ import annotations

import torch

from rlgen.models.causal_lm import unwrap_peft


def pad_tokens(token_lists: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, W], mask [B, W]) of token lists padded to the longest, on the left (prompts) or right."""
    width = max((len(t) for t in token_lists), default=0)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        if tokens:
            span = slice(width - len(tokens), width) if left else slice(0, len(tokens))
            ids[row, span] = torch.tensor(tokens, dtype=torch.long)
            mask[row, span] = 1
    return ids, mask


def consecutive_runs(items) -> tuple[list[int], torch.Tensor]:
    """Runs of equal consecutive items: (index of each run's first item, run index of every item [B]).
    Items that all differ give one run each (no sharing)."""
    starts: list[int] = []
    row_group: list[int] = []
    previous = object()
    for i, item in enumerate(items):
        if not starts or item != previous:
            starts.append(i)
            previous = item
        row_group.append(len(starts) - 1)
    return starts, torch.tensor(row_group, dtype=torch.long)


def prefix_runs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`consecutive_runs` for left-padded prompt tensors: (first row of each run [U], run of every row [B])."""
    rows = prompt_ids.shape[0]
    new_run = torch.ones(rows, dtype=torch.bool, device=prompt_ids.device)
    if rows > 1:
        same = (prompt_ids[1:] == prompt_ids[:-1]).all(1) & (prompt_mask[1:] == prompt_mask[:-1]).all(1)
        new_run[1:] = ~same
    return new_run.nonzero().flatten(), new_run.long().cumsum(0) - 1


def plain_decoder(model):
    """The transformers model (under its peft wrapper, if any) when it is a plain decoder-only LM whose
    sequence positions are all real tokens: no prompt-learning adapter (prefix tuning's virtual tokens own
    the cache), no encoder or cross-attention, not stateful; else None. A capability check."""
    base = unwrap_peft(model)
    if base is not model:
        active = getattr(model, "active_peft_config", None)
        if active is None or getattr(active, "is_prompt_learning", False):
            return None
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        return None
    return None if getattr(base, "_is_stateful", False) else base


def supports_shared_prefix(model) -> bool:
    """Whether a prompt's KV cache can be computed once and repeated over rows (a capability check on
    the model class, its config and its cache layout; nothing is run). False -> the plain path."""
    base = plain_decoder(model)
    if base is None:
        return False
    config = base.config
    supports_dynamic = getattr(base, "_supports_default_dynamic_cache", None)
    if supports_dynamic is None or not supports_dynamic():
        return False
    if base.training and any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules()):
        return False  # activation-checkpointed layers drop the cache in training mode
    try:
        import inspect

        accepted = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
    if not {"position_ids", "attention_mask"} <= set(accepted) or cache_keyword(base) is None:
        return False
    return _expandable_layers(config) is not None


def cache_keyword(model) -> str | None:
    """The forward keyword that takes a KV cache: `cache` (transformers >= 5.24) or `past_key_values`."""
    import inspect

    try:
        accepted = inspect.signature(unwrap_peft(model).forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in ("cache", "past_key_values") if name in accepted), None)


def returned_cache(out):
    """The KV cache a forward returned (`cache` from transformers 5.24 on, `past_key_values` before)."""
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def _expandable_layers(config):
    """The layers of a DynamicCache for this config, when every one is a plain full-attention
    DynamicLayer (sliding-window, chunked, linear-attention and shared-KV layers are excluded)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # noqa: BLE001 - a config transformers cannot lay out: not expandable
        return None
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return layers


def new_expandable_cache(model):
    """An empty DynamicCache laid out for `model` when `supports_shared_prefix(model)`, else None.
    The cache is passed to the prefill so that its layout is the one that was checked."""
    if not supports_shared_prefix(model):
        return None
    from transformers.cache_utils import DynamicCache

    return DynamicCache(config=unwrap_peft(model).config)


def repeat_rows(tensor: torch.Tensor, row_run: torch.Tensor) -> torch.Tensor:
    """`tensor[row_run]` along dim 0, for the sorted run index of `prefix_runs`/`consecutive_runs`.
    When all runs have the same length (GRPO's groups) this is a broadcast, whose backward is a plain
    sum over each group, instead of a gather, whose backward is a slower scatter-add. Same values."""
    runs, rows = tensor.shape[0], row_run.shape[0]
    if runs == rows:
        return tensor
    if rows % runs == 0 and int(row_run[rows // runs - 1]) == 0 and bool((torch.bincount(row_run) == rows // runs).all()):
        size = rows // runs
        return tensor.unsqueeze(1).expand(runs, size, *tensor.shape[1:]).reshape(rows, *tensor.shape[1:])
    return tensor.index_select(0, row_run)


def expand_cache(cache, row_run: torch.Tensor) -> None:
    """Repeat the batch rows of a DynamicCache in place: row i becomes old row row_run[i].
    Autograd sums the gradients of repeated rows back into their source row."""
    for layer in cache.layers:
        if layer.is_initialized and layer.keys is not None and layer.keys.numel():
            layer.keys = repeat_rows(layer.keys, row_run)
            layer.values = repeat_rows(layer.values, row_run)
