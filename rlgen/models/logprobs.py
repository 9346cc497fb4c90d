"""Per-token log-probs and entropies of completions under a model (the trainers' forward pass)."""
from __future__ import annotations

import inspect
import sys

import torch

from rlgen import kernels
from rlgen.models.causal_lm import unwrap_peft
from rlgen.models.lm_head import split_head
from rlgen.models.sequences import (cache_keyword, expand_cache, new_expandable_cache, plain_decoder, prefix_runs, repeat_rows,
                                    returned_cache)


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

    Padding-free (`model.padding_free`, which the trainer sets as the attribute `padding_free` on the
    model): the plain path packs the rows' real tokens into rows without padding (`_packed_logprobs`)
    when `supports_packing(model)`; otherwise, and for a row with an empty prompt, it silently runs
    padded. The shared-prefix path, when it applies, still comes first (it already runs each prompt once).
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
    if width > 0 and getattr(model, "padding_free", False) is True and supports_packing(model):
        packed = _packed_logprobs(head, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature,
                                  one_row=_varlen_attention(model))
        if packed is not None:
            return packed
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
        # An FSDP2 root ("FSDP<Class>") gathers its own weights (embeddings, norm, head) in its forward hooks:
        # its decoder called alone would meet sharded weights once the root reshards, so the root runs whole.
        fsdp_root = type(unwrap_peft(model)).__name__.startswith("FSDP")
        split = None if kernels.mode() == "reference" or fsdp_root else split_head(model)
        self.decoder, self.lm_head = split if split is not None else (model, None)

    def forward(self, keep: int | None, **inputs):
        """(features of the last `keep` positions, model output); features are hidden states or logits."""
        if self.lm_head is None:
            out = self.model(**inputs, logits_to_keep=keep or 0)
            return out.logits, out
        out = self.decoder(**inputs)
        hidden = out.last_hidden_state
        return (hidden[:, -keep:, :] if keep else hidden), out

    def features_at(self, rows, cols, **inputs):
        """Features [N, ...] at positions (rows[n], cols[n]) of the output; only those positions are projected."""
        if self.lm_head is None:
            keep = torch.unique(cols)  # sorted: the columns any row needs (transformers takes an index tensor)
            logits = self.model(**inputs, logits_to_keep=keep).logits
            return logits[rows, torch.searchsorted(keep, cols)]
        return self.decoder(**inputs).last_hidden_state[rows, cols]

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


# --- padding-free (packed) passes ------------------------------------------------------------------------

# Attention implementations whose transformers masks turn restarting position_ids into per-sequence
# attention (masking_utils.find_packed_sequence_indices): a block-diagonal causal mask for eager/sdpa,
# a block mask for flex, cu_seqlens for flash-attention (which detects packing only in a batch of one row).
PACKED_MASKS = ("eager", "sdpa")
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
# Layer kinds that only attend (masked like full attention); linear-attention or recurrent layers carry
# state along the row and would leak it from one packed sequence into the next.
ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}
MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask")


def supports_packing(model) -> bool:
    """Whether a packed row (sequences one after another, position_ids restarting at 0 for each, no
    attention mask) gives every sequence the outputs it gets alone: transformers new enough to detect
    packing, a decoder-only model that takes position_ids and builds its masks with transformers'
    masking utilities, an attention implementation those masks cover, attention-only layers, and no
    prompt-learning adapter (virtual tokens). A capability check; nothing is run."""
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        return False  # transformers too old: packed rows would attend across sequences
    base = plain_decoder(model)
    if base is None:
        return False
    config = base.config
    if getattr(config, "_attn_implementation", None) not in PACKED_MASKS + VARLEN_ATTENTION:
        return False
    if not set(getattr(config, "layer_types", None) or ["full_attention"]) <= ATTENTION_LAYERS:
        return False
    try:
        if "position_ids" not in inspect.signature(base.forward).parameters:
            return False
    except (TypeError, ValueError):
        return False
    # The modeling module (of the class or, under FSDP2's generated subclass, of a base class) must build its
    # masks with masking_utils: older or hand-written models build theirs from the attention mask alone.
    builders = {id(getattr(masking_utils, name, None)) for name in MASK_BUILDERS} - {id(None)}
    for klass in type(base).__mro__:
        module = sys.modules.get(klass.__module__)
        if module is not None and any(id(getattr(module, name, None)) in builders for name in MASK_BUILDERS):
            return True
    return False


def _varlen_attention(model) -> bool:
    config = getattr(unwrap_peft(model), "config", None)
    return getattr(config, "_attn_implementation", None) in VARLEN_ATTENTION


def _pack(lengths: list[int], capacity: int) -> tuple[list[int], list[int]]:
    """First-fit decreasing: (packed row, start offset in it) of each sequence, rows of at most `capacity`."""
    row_of, start_of = [0] * len(lengths), [0] * len(lengths)
    filled: list[int] = []
    for seq in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, used in enumerate(filled) if used + lengths[seq] <= capacity), len(filled))
        if row == len(filled):
            filled.append(0)
        row_of[seq], start_of[seq] = row, filled[row]
        filled[row] += lengths[seq]
    return row_of, start_of


def _packed_logprobs(head, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, one_row: bool):
    """`_full_logprobs` without padding, or None when it cannot (an empty prompt before a completion, or
    nothing to score: the padded path then runs, so that every call still runs exactly one forward,
    which FSDP's collectives need).

    Each row's sequence is its prompt's real tokens, then its completion up to the token before its last
    masked one (the last one is only a target); position_ids restart at 0 per sequence and there is no
    attention mask, so transformers attends within each sequence only. Varlen attention (flash, flex)
    takes all sequences in one row; eager/sdpa masks cost rows x width^2, so the sequences are packed
    into rows no wider than the longest (first-fit decreasing): never more attention than padded.
    Log-probs and entropies go back to [B, C] (zeros after each completion's last masked token)."""
    rows, width = completion_ids.shape
    device = completion_ids.device
    cols = torch.arange(width, device=device)
    scored = ((completion_mask != 0) * (cols + 1)).amax(1)  # completion positions up to the last masked token
    in_prompt = prompt_mask != 0
    prompt_len = in_prompt.sum(1)
    active = scored > 0
    if not bool(active.any()) or bool((active & (prompt_len == 0)).any()):
        return None
    # the tokens each row runs, in order: prompt (no padding), then completion[: scored - 1]
    take = torch.cat([in_prompt & active[:, None], cols[None, :] < (scored - 1)[:, None]], dim=1)
    tokens = torch.cat([prompt_ids, completion_ids], dim=1)
    lengths = take.sum(1).tolist()
    seqs = active.nonzero().flatten().tolist()
    seq_lengths = [lengths[i] for i in seqs]
    capacity = sum(seq_lengths) if one_row else max(seq_lengths)
    row_of, start_of = _pack(seq_lengths, capacity)
    packed_rows = max(row_of) + 1
    pack_row = torch.zeros(rows, dtype=torch.long)
    pack_start = torch.zeros(rows, dtype=torch.long)
    pack_row[seqs], pack_start[seqs] = torch.tensor(row_of), torch.tensor(start_of)
    pack_row, pack_start = pack_row.to(device), pack_start.to(device)
    src_row, src_col = take.nonzero(as_tuple=True)
    position = (take.cumsum(1) - 1)[src_row, src_col]
    dst_row, dst_col = pack_row[src_row], pack_start[src_row] + position
    # A row's unused tail is a sequence of its own (positions from 0, token 0): causal, so nothing before it sees it.
    used = torch.zeros(packed_rows, dtype=torch.long, device=device).index_add_(0, dst_row, torch.ones_like(dst_row))
    positions = torch.arange(capacity, device=device).expand(packed_rows, capacity) - used[:, None]
    positions = positions.index_put((dst_row, dst_col), position)
    input_ids = torch.zeros((packed_rows, capacity), dtype=tokens.dtype, device=device)
    input_ids = input_ids.index_put((dst_row, dst_col), tokens[src_row, src_col])
    # Row i's completion token j is predicted at its prompt's last position + j.
    out_row, out_col = (cols[None, :] < scored[:, None]).nonzero(as_tuple=True)
    features = head.features_at(pack_row[out_row], pack_start[out_row] + prompt_len[out_row] - 1 + out_col,
                                input_ids=input_ids, attention_mask=None, position_ids=positions, use_cache=False)
    logp, entropy = head.logprobs(features, completion_ids[out_row, out_col], temperature)
    shape = (rows, width)
    return (logp.new_zeros(shape).index_put((out_row, out_col), logp),
            entropy.new_zeros(shape).index_put((out_row, out_col), entropy))
