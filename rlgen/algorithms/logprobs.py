"""Per-token log-probs and entropies of completions under a model (the trainers' forward pass)."""
from __future__ import annotations

import torch

from rlgen import ops
from rlgen.rollout.engine import expand_cache, new_expandable_cache, prefix_runs, repeat_rows


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float = 1.0,
                        shared_prefix: bool = True):
    """(logprobs [B, C], entropy [B, C]) of each completion token given its prompt.

    Only the completion positions are projected to the vocabulary (logits_to_keep), so the
    [B, P+C, V] logits tensor is never built.

    With `shared_prefix` (the default), rows whose prompts are identical and consecutive (GRPO's
    groups) share one forward pass over their prompt: its KV cache and last logits are repeated for
    each row, then the completions run against that cache. Gradients reach the prompt positions
    through the repeated cache (autograd sums them over the rows). The result equals the plain path
    up to float rounding. Models whose cache cannot be repeated (`supports_shared_prefix` is
    False), batches without any repeated prompt, and `shared_prefix=False` take the plain path:
    one forward over prompt + completion.
    """
    width = completion_ids.shape[1]
    if shared_prefix and width > 0:
        starts, row_run = prefix_runs(prompt_ids, prompt_mask)
        if len(starts) < prompt_ids.shape[0]:
            cache = new_expandable_cache(model)
            if cache is not None:
                return _shared_prefix_logprobs(model, cache, starts, row_run, prompt_ids, prompt_mask, completion_ids,
                                               temperature)
    return _full_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature)


def _full_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature):
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask, completion_mask.new_ones(completion_mask.shape)], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    width = completion_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, logits_to_keep=width + 1, use_cache=False)
    logits = out.logits[:, :-1, :]  # position t predicts token t+1
    return ops.token_logprobs(logits, completion_ids, temperature)


def _shared_prefix_logprobs(model, cache, starts, row_run, prompt_ids, prompt_mask, completion_ids, temperature):
    unique_ids, unique_mask = prompt_ids.index_select(0, starts), prompt_mask.index_select(0, starts)
    positions = (unique_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=unique_ids, attention_mask=unique_mask, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    # The prompt's last position predicts the first completion token of every row of its run.
    first_logp, first_entropy = ops.token_logprobs(repeat_rows(out.logits[:, -1, :], row_run), completion_ids[:, 0],
                                                   temperature)
    width = completion_ids.shape[1]
    if width == 1:
        return first_logp.unsqueeze(1), first_entropy.unsqueeze(1)
    past = out.past_key_values
    expand_cache(past, row_run)
    rows = completion_ids.shape[0]
    attention = torch.cat([prompt_mask, prompt_mask.new_ones((rows, width - 1))], dim=1)
    positions = prompt_mask.sum(1, keepdim=True) + torch.arange(width - 1, device=prompt_mask.device)  # cumsum - 1
    out = model(input_ids=completion_ids[:, :-1], attention_mask=attention, position_ids=positions,
                past_key_values=past, use_cache=True)
    rest_logp, rest_entropy = ops.token_logprobs(out.logits, completion_ids[:, 1:], temperature)
    return torch.cat([first_logp.unsqueeze(1), rest_logp], dim=1), torch.cat([first_entropy.unsqueeze(1), rest_entropy], dim=1)
