"""Rollout engines: the one code path that turns prompts into completions, for `rlgen sample`,
evaluation and every trainer. An engine only needs `generate`; `sync_weights` exists so an engine
holding its own copy of the weights (vLLM, a server) can be told that the policy changed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from rlgen.devices import module_device
from rlgen.errors import RlgenError, show_value
from rlgen.models.causal_lm import unwrap_peft
from rlgen.models.sequences import (cache_keyword, consecutive_runs, expand_cache, new_expandable_cache, pad_tokens,
                                    repeat_rows, returned_cache)


@dataclass
class SamplingParams:
    """vLLM's / transformers' sampling settings, with their meanings."""
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability; 0 = off
    repetition_penalty: float = 1.0  # CTRL's: a seen token's logit / p if positive, x p if not; 1 = off
    stop: tuple[str, ...] = ()  # stop strings: a completion ends with the token that completes one (text cut before it)


@dataclass
class Rollouts:
    prompts: list[str]
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, C] right-padded
    completion_mask: torch.Tensor  # [B, C]; 1 up to and including the stop token
    truncated: torch.Tensor  # [B] bool: no stop token within max_new_tokens
    texts: list[str] = field(default_factory=list)
    # [B, C] the engine's log-probability of each sampled token (0 at padding), for engines that report them
    # (vLLM); the trainers compare them with their own (off-policy correction). None: the policy itself sampled.
    logprobs: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())

    def select(self, rows: torch.Tensor) -> "Rollouts":
        """The rollouts at the given row indices, in that order."""
        picked = rows.tolist()
        return Rollouts(
            prompts=[self.prompts[i] for i in picked],
            prompt_ids=self.prompt_ids[rows],
            prompt_mask=self.prompt_mask[rows],
            completion_ids=self.completion_ids[rows],
            completion_mask=self.completion_mask[rows],
            truncated=self.truncated[rows],
            texts=[self.texts[i] for i in picked],
            logprobs=None if self.logprobs is None else self.logprobs[rows],
        )


class RolloutEngine(Protocol):
    def generate(self, prompts: list[str], params: SamplingParams, generator: torch.Generator | None = None,
                 seeds: torch.Tensor | None = None) -> Rollouts:
        """Completions of `prompts`. `seeds` ([B] int64, `row_seeds`): each row's own random stream, like vLLM's
        per-request seed; without them one base seed is drawn from `generator` for the call."""

    def sync_weights(self, model) -> None: ...


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k and outside the smallest set with cumulative probability >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        remove = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token crossing top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def penalize_repetitions(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (transformers' and vLLM's `repetition_penalty`): the logit of every token seen
    in the row (prompt and completion so far; `seen` [B, V] bool) divided by `penalty` if positive, multiplied
    by it if not."""
    logits = logits.float()
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def keep_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Mask tokens whose probability is below `min_p` times the row's most likely token's (min-p sampling)."""
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))


def choose_tokens(logits: torch.Tensor, params: SamplingParams, seeds: torch.Tensor | None, step: int = 0,
                  seen: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of each row: the argmax at temperature 0, else a draw from the tempered, top-k / top-p /
    min-p filtered distribution by inverse CDF with row `i`'s uniform `row_uniforms(seeds, step)[i]`, after the
    repetition penalty (`seen`: the tokens of each row so far). A row's draw depends only on its own seed and
    logits, never on the rest of the batch (vLLM's per-request seed), so a prompt sampled on any rank, in any
    batch, gets the same completion."""
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = penalize_repetitions(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    if params.min_p > 0:
        logits = keep_min_p(logits, params.min_p)
    probs = torch.softmax(logits, dim=-1)
    cdf = probs.double().cumsum(-1)  # float64: the last entries of a 150k-token CDF keep their width
    target = row_uniforms(seeds.to(probs.device), step) * cdf[:, -1]
    token = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
    # a target rounded up to the total would pick past the end (or a trailing zero-probability token)
    last_possible = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(token, last_possible)


# splitmix64 (Steele, Lea and Flood 2014) on int64 tensors: multiplication wraps modulo 2^64 as in C, and
# the right shifts are made logical with a mask.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _wrapped(value: int) -> int:
    """A Python integer as the int64 it wraps to."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def row_seeds(base: int, first_row: int, rows: int, device=None) -> torch.Tensor:
    """[rows] int64 seeds of the rows `first_row ...` of a batch whose draws start from `base`: the
    splitmix64 stream of `base` at those positions, so that row k's seed is the same whichever rank or
    batch holds it."""
    index = torch.arange(first_row + 1, first_row + rows + 1, dtype=torch.long, device=device)
    return _mix64(_wrapped(base) + index * _GOLDEN)


def row_uniforms(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """[B] float64 uniforms in [0, 1): draw `step` of each row's own splitmix64 stream."""
    x = _mix64(seeds + _wrapped((step + 1) * _GOLDEN))
    return _shift_right(x, 11).double() * 2.0**-53


def draw_seed(generator: torch.Generator | None) -> int:
    """One base seed from the run's generator (the global RNG without one): a generate call draws exactly one,
    however many rows it has, so every rank's generator stays in step with the others'."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def check_logits(logits: torch.Tensor, model) -> None:
    """One line instead of multinomial's RuntimeError (or argmax's silent garbage) when the model's next-token
    logits hold NaN or +inf, or a row is all -inf: nothing can be sampled from them."""
    if bool(torch.isnan(logits).any() | torch.isposinf(logits).any() | (logits.amax(-1) == float("-inf")).any()):
        name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        where = f"the model {show_value(str(name))}" if name else "the model"
        raise RlgenError(f"{where} produced non-finite logits (NaN/inf weights?): nothing can be sampled from them")


def context_limit(model) -> int | None:
    """The number of positions the model declares (None: not declared, e.g. no config)."""
    config = getattr(unwrap_peft(model), "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_context(model, tokenizer, prompts: list[str], max_new_tokens: int, option: str,
                  add_special_tokens: bool = True) -> None:
    """Prompt plus `max_new_tokens` must fit the model's declared context: learned position embeddings
    fail with an IndexError past it, rotary ones silently degrade. `option` names the setting to lower
    (e.g. `--max-new-tokens`, `sft.max_new_tokens`) in the one-line error."""
    limit = context_limit(model)
    if not limit or not prompts:
        return
    longest = max(len(ids) for ids in tokenizer(sorted(set(prompts)), add_special_tokens=add_special_tokens).input_ids)
    if longest + max_new_tokens > limit:
        raise RlgenError(
            f"prompts of up to {longest} tokens plus {option}={max_new_tokens} exceed the model's "
            f"context of {limit} positions (lower {option})"
        )


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(i) for i in eos)
    return sorted(ids)


class HFEngine:
    """KV-cached sampling loop over a transformers causal LM (left-padded batch, per-row stopping).

    Prompts usually arrive in groups of identical consecutive prompts (GRPO's G completions per
    prompt, pass@k). Each run of equal consecutive prompts is tokenised once and, when the model's
    cache can be expanded (`supports_shared_prefix`), prefilled once; its KV cache and last logits
    are then repeated for every row of the run before the rows are decoded. Each row samples from its
    own seeded stream (`choose_tokens`), so a row's completion does not depend on its batch (batch size,
    shared prefix or not, the rank it runs on), up to the floating-point effects of batching on the
    logits. The path taken depends
    only on the model (and `shared_prefix`), never on the batch, so every call runs the same code.
    """

    def __init__(self, model, tokenizer, batch_size: int = 256, shared_prefix: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.shared_prefix = shared_prefix
        self.stop_ids = torch.tensor(stop_token_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0].item()
        self._stop_set = set(self.stop_ids.tolist())
        # False for prompts rendered by a chat template, which hold the template's special tokens already
        self.add_special_tokens = True
        # Sharded weights (FSDP) need every rank in every forward: then the trainer sets this to a collective
        # "have all ranks' rows stopped?", and no rank stops decoding before the others.
        self.finished_everywhere: Callable[[bool], bool] | None = None

    def sync_weights(self, model) -> None:
        self.model = model  # same process, same weights: nothing to copy

    @property
    def device(self) -> torch.device:
        """The model's device: every tensor the engine makes lives there (asked each time: models move)."""
        return module_device(self.model)

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (ids [B, P], mask [B, P]); each run of equal consecutive prompts is tokenised once."""
        starts, row_group = consecutive_runs(prompts)
        ids, mask = self._encode_unique([prompts[i] for i in starts])
        return repeat_rows(ids, row_group.to(ids.device)), repeat_rows(mask, row_group.to(ids.device))

    def tokenize_completions(self, completions: list[str]) -> list[list[int]]:
        """Token ids of given completion texts, each ending with the stop token, as if the model had
        generated them (for log-probs of fixed answers: SFT, preferences)."""
        eos = int(self.stop_ids[0]) if self.tokenizer.eos_token_id is None else self.tokenizer.eos_token_id
        return [ids + [eos] for ids in self.tokenizer(list(completions), add_special_tokens=False).input_ids]

    def pad_completions(self, token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (ids [B, C], mask [B, C]) with the mask ending at the first stop token."""
        ids, _ = pad_tokens(token_lists, self.pad_id, left=False)
        ids = ids.to(self.device)
        return ids, completion_mask_from_ids(ids, self.stop_ids.to(ids.device))

    def encode_completions(self, completions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`pad_completions(tokenize_completions(completions))`."""
        return self.pad_completions(self.tokenize_completions(completions))

    def _encode_unique(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = pad_tokens(self.tokenizer(list(prompts), add_special_tokens=self.add_special_tokens).input_ids,
                               self.pad_id, left=True)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams, generator: torch.Generator | None = None,
                 seeds: torch.Tensor | None = None) -> Rollouts:
        if seeds is None:  # greedy decoding draws nothing (and leaves the generator, or the global RNG, alone)
            seeds = row_seeds(draw_seed(generator) if params.temperature > 0 else 0, 0, len(prompts))
        elif len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        seeds = seeds.to(self.device)
        parts = [
            self._generate_batch(prompts[i : i + self.batch_size], params, seeds[i : i + self.batch_size])
            for i in range(0, len(prompts), self.batch_size)
        ]
        return parts[0] if len(parts) == 1 else concat_rollouts(parts, self.pad_id)

    def _generate_batch(self, prompts, params: SamplingParams, seeds: torch.Tensor) -> Rollouts:
        model = self.model
        was_training = model.training
        model.eval()
        batch = len(prompts)
        starts, row_group = consecutive_runs(prompts)
        unique_ids, unique_mask = self._encode_unique([prompts[i] for i in starts])
        device = unique_ids.device
        row_group = row_group.to(device)
        expand = len(starts) != batch
        prompt_ids = repeat_rows(unique_ids, row_group)
        prompt_mask = repeat_rows(unique_mask, row_group)
        width = prompt_ids.shape[1]
        steps = params.max_new_tokens
        limit = context_limit(model)
        if limit and width + steps > limit:  # the callers check with their option's name; this is the backstop
            raise RlgenError(f"a prompt of {width} tokens plus max_new_tokens={steps} exceeds the model's context "
                             f"of {limit} positions")
        # The attention mask for the whole loop, filled once: generated tokens are always attended
        # (finished rows keep feeding padding, exactly as before); each step passes a prefix view.
        attention = torch.ones((batch, width + steps), dtype=prompt_mask.dtype, device=device)
        attention[:, :width] = prompt_mask
        completion_ids = torch.full((batch, steps), self.pad_id, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        ended_by_string: dict[int, int] = {}  # row -> the step whose token completed a stop string
        produced = 0
        if steps > 0:
            cache = new_expandable_cache(model) if self.shared_prefix else None
            if cache is not None:  # prefill each distinct prompt once, then repeat its cache per row
                positions = (unique_mask.cumsum(-1) - 1).clamp(min=0)
                out = model(input_ids=unique_ids, attention_mask=unique_mask, position_ids=positions,
                            use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
                past = returned_cache(out)
                logits = out.logits[:, -1, :]
                if expand:
                    expand_cache(past, row_group)
                    logits = repeat_rows(logits, row_group)
                next_position = repeat_rows(positions[:, -1:], row_group) + 1
            else:
                positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
                out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1)
                past = returned_cache(out)
                logits = out.logits[:, -1, :]
                next_position = positions[:, -1:] + 1
            stop_ids = self.stop_ids.to(device)
            keyword = cache_keyword(model) or "past_key_values"
            seen = seen_tokens(prompt_ids, prompt_mask, logits.shape[-1]) if params.repetition_penalty != 1.0 else None
            rows = torch.arange(batch, device=device)
            for step in range(steps):
                check_logits(logits, model)
                token = choose_tokens(logits, params, seeds, step, seen)
                token = token.masked_fill(finished, self.pad_id)
                completion_ids[:, step] = token
                produced = step + 1
                if seen is not None:
                    seen[rows, token] |= ~finished
                if params.stop:  # a stop string completed by this token ends the row here
                    # the text of the last few tokens: a string completed now lies within them (a token gives
                    # at least one character, or a part of one), so no row is decoded whole at every step
                    window = 2 * max(len(s) for s in params.stop) + 4
                    for row in (~finished).nonzero().flatten().tolist():
                        if self._stop_string_at(completion_ids[row, max(0, produced - window):produced], params.stop) is not None:
                            ended_by_string[row] = step
                            finished[row] = True
                finished |= torch.isin(token, stop_ids)
                done = bool(finished.all())
                if self.finished_everywhere is not None:
                    done = self.finished_everywhere(done)
                if produced == steps or done:
                    break  # no forward pass for logits nobody will sample from
                out = model(
                    input_ids=token.unsqueeze(-1),
                    attention_mask=attention[:, : width + produced],
                    position_ids=next_position,
                    use_cache=True,
                    **{keyword: past},
                )
                past = returned_cache(out)
                logits = out.logits[:, -1, :]
                next_position = next_position + 1
        if was_training:
            model.train()
        completion_ids = completion_ids[:, :produced].contiguous()
        completion_mask = completion_mask_from_ids(completion_ids, self.stop_ids.to(device))
        truncated = ~torch.isin(completion_ids, self.stop_ids.to(device)).any(dim=1)
        for row, step in ended_by_string.items():  # the completion ends with the token that completed the string
            completion_mask[row, step + 1:] = 0
            truncated[row] = False
        texts = self.decode(completion_ids, completion_mask)
        for row in ended_by_string:  # the text stops before the stop string (vLLM's default)
            texts[row] = texts[row][: self._stop_string_at_text(texts[row], params.stop)]
        return Rollouts(list(prompts), prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, texts)

    def _stop_string_at(self, ids: torch.Tensor, stop: tuple[str, ...]) -> int | None:
        """Where the first stop string starts in the text of `ids`, or None."""
        return self._stop_string_at_text(self.tokenizer.decode(ids.tolist(), skip_special_tokens=True), stop)

    @staticmethod
    def _stop_string_at_text(text: str, stop: tuple[str, ...]) -> int | None:
        found = [text.find(s) for s in stop if s and s in text]
        return min(found) if found else None

    def decode(self, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
        stop = self._stop_set
        kept = [
            [t for t, m in zip(ids, mask) if m and t not in stop]
            for ids, mask in zip(completion_ids.tolist(), completion_mask.tolist())
        ]
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in kept]


def seen_tokens(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V] bool: the tokens of each row's prompt (padding excluded), for the repetition penalty."""
    seen = torch.zeros((prompt_ids.shape[0], vocab + 1), dtype=torch.bool, device=prompt_ids.device)
    ids = prompt_ids.clamp(max=vocab - 1).masked_fill(prompt_mask == 0, vocab)  # padding lands in a spare column
    seen.scatter_(1, ids, True)
    return seen[:, :vocab].contiguous()


def completion_mask_from_ids(completion_ids: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """1 for every token up to and including the first stop token, 0 after it."""
    is_stop = torch.isin(completion_ids, stop_ids).long()
    stops_before = is_stop.cumsum(dim=1) - is_stop
    return (stops_before == 0).long()


def concat_rollouts(parts: list[Rollouts], pad_id: int) -> Rollouts:
    def cat(tensors, left: bool, value):
        width = max(t.shape[1] for t in tensors)
        padded = []
        for t in tensors:
            pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
            padded.append(torch.cat([pad, t] if left else [t, pad], dim=1))
        return torch.cat(padded, dim=0)

    return Rollouts(
        prompts=[p for part in parts for p in part.prompts],
        prompt_ids=cat([p.prompt_ids for p in parts], True, pad_id),
        prompt_mask=cat([p.prompt_mask for p in parts], True, 0),
        completion_ids=cat([p.completion_ids for p in parts], False, pad_id),
        completion_mask=cat([p.completion_mask for p in parts], False, 0),
        truncated=torch.cat([p.truncated for p in parts]),
        texts=[t for part in parts for t in part.texts],
        logprobs=None if any(p.logprobs is None for p in parts) else cat([p.logprobs for p in parts], False, 0.0),
    )
