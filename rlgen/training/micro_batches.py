"""Token-budget micro-batching (`optim.max_tokens_per_micro_batch`): a step's rows split into micro-batches
by token count rather than by row count, so that a step of long sequences runs in more, smaller forward
passes and peak memory follows the budget, not the batch (verl's dynamic batch size).

The losses of the trainers are normalised by global counts (the step's tokens, pairs or examples), so how
the rows are split changes only the order of floating-point sums: the loss and gradient of a step are the
unsplit step's within rounding.

- `token_budget_chunks`: which rows go together (balanced, units such as pairs or groups kept whole);
- `trimmed`: a micro-batch without its all-padding columns, so a short micro-batch computes on fewer tokens;
- `pad_to`: per-token results of a trimmed micro-batch padded back to the batch's width;
- `micro_batches`: the split a trainer uses (the budget when set, else `gradient_accumulation_steps` equal
  row counts, as before);
- `even_passes`: the same number of passes on every rank (FSDP gathers weights inside each forward);
- `map_micro_batches`: a no-gradient per-row pass (reference / old-policy log-probs) run micro-batch by
  micro-batch, its results in the batch's row order.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from rlgen.distributed import Dist
from rlgen.rollout.groups import ModelInputs


def token_budget_chunks(costs: Sequence[int] | torch.Tensor, max_tokens: int,
                        units: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]:
    """Row indices of micro-batches whose padded cost stays within `max_tokens` where possible.

    Cost model: row i costs `costs[i]` tokens (its prompt plus completion tokens); a micro-batch is padded
    to its longest row, so it costs (rows x longest row's cost). A unit (a list of rows that must stay in
    one micro-batch: a preference pair, a GRPO group sharing its prompt's forward) counts with all its rows
    and its longest one; without `units` every row is a unit. A unit that alone exceeds the budget goes
    into a micro-batch of its own.

    Method (deterministic): the units sorted longest first (ties by first row), cut into the fewest
    contiguous runs that fit the budget; then, for that number of micro-batches, the cuts that make the
    most expensive micro-batch as cheap as possible (binary search on the bound). Neighbours in the sorted
    order have similar lengths, so little padding is wasted. Micro-batches come longest first; inside one,
    units in their order in the batch, each unit's rows in the order given."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, not {max_tokens}")
    costs = [int(c) for c in (costs.tolist() if isinstance(costs, torch.Tensor) else costs)]
    n = len(costs)
    if units is None:
        units = [[i] for i in range(n)]
    units = [[int(r) for r in unit] for unit in units if len(unit)]
    seen = sorted(r for unit in units for r in unit)
    if seen != list(range(n)):
        raise ValueError("units must hold every row exactly once")
    if not units:
        return []
    order = sorted(range(len(units)), key=lambda u: (-max(costs[r] for r in units[u]), min(units[u])))
    sizes = [len(units[u]) for u in order]
    longest = [max(costs[r] for r in units[u]) for u in order]

    def cuts(bound: int) -> list[int]:
        """Starts of the fewest contiguous runs of the sorted units whose cost stays <= bound (a unit
        over the bound alone); the first unit of a run is its longest."""
        starts, rows = [0], 0
        for k, size in enumerate(sizes):
            if rows and (rows + size) * longest[starts[-1]] > bound:
                starts.append(k)
                rows = 0
            rows += size
        return starts

    count = len(cuts(max_tokens))
    low, high = 1, max_tokens  # the smallest bound that needs no more micro-batches than the budget does
    while low < high:
        middle = (low + high) // 2
        if len(cuts(middle)) <= count:
            high = middle
        else:
            low = middle + 1
    starts = cuts(low) + [len(order)]
    chunks = []
    for a, b in zip(starts, starts[1:]):
        picked = sorted(order[a:b], key=lambda u: min(units[u]))
        chunks.append(torch.tensor([r for u in picked for r in units[u]], dtype=torch.long))
    return chunks


def padded_cost(costs: Sequence[int] | torch.Tensor, chunk: torch.Tensor) -> int:
    """What a micro-batch costs under `token_budget_chunks`' model: rows x its longest row."""
    values = torch.as_tensor(costs)[chunk]
    return int(values.numel() * int(values.max())) if values.numel() else 0


def row_costs(inputs: ModelInputs) -> torch.Tensor:
    """Tokens per row (prompt plus completion, padding left out): the cost of `token_budget_chunks`."""
    return (inputs.prompt_mask.sum(1) + inputs.completion_mask.sum(1)).cpu()


def pair_units(rows: int) -> list[list[int]]:
    """Interleaved preference pairs ([chosen_0, rejected_0, chosen_1, ...]) as units of two rows."""
    return [[2 * k, 2 * k + 1] for k in range(rows // 2)]


def group_units(rows: int, group_size: int) -> list[list[int]]:
    """Consecutive groups of `group_size` rows (GRPO's samples of one prompt) as units."""
    return [list(range(start, min(start + group_size, rows))) for start in range(0, rows, group_size)]


def trimmed(inputs: ModelInputs) -> ModelInputs:
    """The inputs without the columns that are padding in every row: leading prompt columns (prompts are
    left-padded) and trailing completion columns (completions are right-padded). Positions come from the
    attention mask's cumulative sum and attention is causal, so every kept position computes what it did
    before; per-token results come back [B, C_trimmed] (`pad_to` widens them again). At least one column of
    each part is kept."""
    prompt_mask, completion_mask = inputs.prompt_mask, inputs.completion_mask
    used = prompt_mask.ne(0).any(0).nonzero()
    first = min(int(used[0]), prompt_mask.shape[1] - 1) if used.numel() else max(prompt_mask.shape[1] - 1, 0)
    used = completion_mask.ne(0).any(0).nonzero()
    end = max(int(used[-1]) + 1, 1) if used.numel() else min(1, completion_mask.shape[1])
    return ModelInputs(inputs.prompt_ids[:, first:], prompt_mask[:, first:], inputs.completion_ids[:, :end],
                       completion_mask[:, :end])


def pad_to(values: torch.Tensor, width: int, value: float = 0.0) -> torch.Tensor:
    """Per-token values [B, C] of a trimmed micro-batch, padded on the right to the batch's width."""
    missing = width - values.shape[1]
    if missing <= 0:
        return values
    return torch.nn.functional.pad(values, (0, missing), value=value)


def micro_batches(rows: int, max_tokens: int, accumulation_steps: int, costs=None,
                  units: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]:
    """The row indices of a step's micro-batches: by token budget (`costs` per row) when `max_tokens` > 0,
    else `accumulation_steps` near-equal runs of consecutive units (rows without `units`), as before the
    budget existed. No rows, no micro-batches."""
    if rows == 0:
        return []
    if max_tokens > 0:
        return token_budget_chunks(costs, max_tokens, units)
    if units is None:
        return list(torch.arange(rows).chunk(min(accumulation_steps, rows)))
    parts = torch.arange(len(units)).chunk(min(accumulation_steps, len(units)))
    return [torch.tensor([r for u in part.tolist() for r in units[u]], dtype=torch.long) for part in parts]


def even_passes(chunks: list[torch.Tensor], dist: Dist | None) -> list[tuple[torch.Tensor, bool]]:
    """(rows, real) per pass: the chunks, then filler passes on the first row of the first chunk (real =
    False: run, but with zero weight and no statistics) up to the largest count of any rank. With `dist`
    None (or one process) the chunks alone. Under FSDP every forward gathers weights collectively, so a
    rank that ran fewer passes than the others would hang them; one collective."""
    passes = [(chunk, True) for chunk in chunks]
    if dist is None or not dist.enabled:
        return passes
    most = int(dist.all_gather_rows(torch.tensor([len(chunks)], dtype=torch.long)).max())
    if len(chunks) < most and not chunks:
        raise ValueError("a rank without rows cannot run filler passes")
    return passes + [(chunks[0][:1], False)] * (most - len(chunks))


def map_micro_batches(fn: Callable[[ModelInputs], torch.Tensor], inputs: ModelInputs, max_tokens: int,
                      units: Sequence[Sequence[int]] | None = None, dist: Dist | None = None) -> torch.Tensor:
    """`fn(inputs)` (per-row results [B] or per-token [B, C]) computed micro-batch by micro-batch of
    `max_tokens` on trimmed inputs, in the batch's row order (per-token results padded with 0 to the
    batch's width); `max_tokens` = 0 runs `fn` once on the whole batch. `dist`: run as many passes as the
    other ranks (FSDP)."""
    rows = inputs.prompt_ids.shape[0]
    if max_tokens <= 0 or rows == 0:
        return fn(inputs)
    width = inputs.completion_ids.shape[1]
    out = None
    for index, real in even_passes(token_budget_chunks(row_costs(inputs), max_tokens, units), dist):
        part = fn(trimmed(inputs.rows(index.to(inputs.prompt_ids.device))))
        if not real:
            continue
        if part.dim() > 1:
            part = pad_to(part, width)
        if out is None:
            out = part.new_zeros((rows, *part.shape[1:]))
        out[index.to(part.device)] = part
    return out
