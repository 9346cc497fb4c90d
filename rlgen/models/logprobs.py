"""Per-token log-probs and entropies of completions under a model (the trainers' forward pass)."""
from __future__ import annotations

import torch

from rlgen import kernels
from rlgen.models.lm_head import split_head
from rlgen.models.sequences import cache_keyword, expand_cache, new_expandable_cache, prefix_runs, repeat_rows, returned_cache


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float = 1.0,
                        shared_prefix: bool = True):
    """(logprobs [B, C], entropy [B, C]) of each completion token given its prompt.

    When the model's head can be split off (HF models: a decoder plus an nn.Linear lm_head), the
    decoder's last hidden states go straight into the fused linear log-prob kernel and no
    [B, C, V] logits tensor is built (`rlgen.kernels.linear_token_logprobs`). Otherwise only the
    completion positions are projected (logits_to_keep) and the log-prob kernel writes the logits'
    gradient into their own memory. Kernel mode 'reference' takes the eager torch path throughout.

    With `shared_prefix` (the default), rows whose prompts are identical and consecutive (GRPO's
    groups) share one forward pass over their prompt: its KV cache and last position are repeated for
    each row, then the completions run against that cache. Gradients reach the prompt positions
    through the repeated cache (autograd sums them over the rows). The result equals the plain path
    up to float rounding. Models whose cache cannot be repeated (`supports_shared_prefix` is
    False), batches without any repeated prompt, and `shared_prefix=False` take the plain path:
    one forward over prompt + completion.
    """
    head = Head(model)
    width = completion_ids.shape[1]
    # An FSDP2-sharded model ("FSDP<Class>") gathers its weights collectively in every forward: whether a
    # rank's own rows repeat a prompt must not decide how many forwards it runs, so it takes the plain path.
    if shared_prefix and width > 0 and not type(model).__name__.startswith("FSDP"):
        starts, row_run = prefix_runs(prompt_ids, prompt_mask)
        if len(starts) < prompt_ids.shape[0]:
            cache = new_expandable_cache(model)
            if cache is not None:
                return _shared_prefix_logprobs(head, cache, starts, row_run, prompt_ids, prompt_mask, completion_ids,
                                               temperature)
    return _full_logprobs(head, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature)


def token_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float = 1.0,
                   shared_prefix: bool = True) -> torch.Tensor:
    """The log-probs [B, C] of `completion_logprobs` without the entropies (references, KL, DPO scores)."""
    return completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature,
                               shared_prefix)[0]


class Head:
    """Runs the model up to what the log-prob kernel takes: hidden states (fused path) or logits."""

    def __init__(self, model):
        self.model = model
        split = None if kernels.mode() == "reference" else split_head(model)
        self.decoder, self.lm_head = split if split is not None else (model, None)

    def forward(self, keep: int | None, **inputs):
        """(features of the last `keep` positions, model output); features are hidden states or logits."""
        if self.lm_head is None:
            out = self.model(**inputs, logits_to_keep=keep or 0)
            return out.logits, out
        out = self.decoder(**inputs)
        hidden = out.last_hidden_state
        return (hidden[:, -keep:, :] if keep else hidden), out

    def logprobs(self, features, targets, temperature):
        if self.lm_head is None:
            # The logits are ours alone (fresh from the head), so backward may overwrite them.
            return kernels.token_logprobs(features, targets, temperature, inplace_backward=True)
        return kernels.linear_token_logprobs(features, self.lm_head.weight, targets, temperature, bias=self.lm_head.bias)


def _full_logprobs(head, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature):
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask, completion_mask.new_ones(completion_mask.shape)], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    width = completion_ids.shape[1]
    features, _ = head.forward(width + 1, input_ids=input_ids, attention_mask=attention, position_ids=positions,
                               use_cache=False)
    return head.logprobs(features[:, :-1, :], completion_ids, temperature)  # position t predicts token t+1


def _shared_prefix_logprobs(head, cache, starts, row_run, prompt_ids, prompt_mask, completion_ids, temperature):
    unique_ids, unique_mask = prompt_ids.index_select(0, starts), prompt_mask.index_select(0, starts)
    positions = (unique_mask.cumsum(-1) - 1).clamp(min=0)
    keyword = cache_keyword(head.decoder)
    features, out = head.forward(1, input_ids=unique_ids, attention_mask=unique_mask, position_ids=positions,
                                 use_cache=True, **{keyword: cache})
    # The prompt's last position predicts the first completion token of every row of its run.
    first_logp, first_entropy = head.logprobs(repeat_rows(features[:, -1, :], row_run), completion_ids[:, 0], temperature)
    width = completion_ids.shape[1]
    if width == 1:
        return first_logp.unsqueeze(1), first_entropy.unsqueeze(1)
    past = returned_cache(out)
    expand_cache(past, row_run)
    rows = completion_ids.shape[0]
    attention = torch.cat([prompt_mask, prompt_mask.new_ones((rows, width - 1))], dim=1)
    positions = prompt_mask.sum(1, keepdim=True) + torch.arange(width - 1, device=prompt_mask.device)  # cumsum - 1
    features, _ = head.forward(None, input_ids=completion_ids[:, :-1], attention_mask=attention, position_ids=positions,
                               use_cache=True, **{keyword: past})
    rest_logp, rest_entropy = head.logprobs(features, completion_ids[:, 1:], temperature)
    return torch.cat([first_logp.unsqueeze(1), rest_logp], dim=1), torch.cat([first_entropy.unsqueeze(1), rest_entropy], dim=1)
