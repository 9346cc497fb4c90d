"""Supervised fine-tuning: cross-entropy on prompt -> completion (completion tokens only by default).
Multi-process, each rank trains on its shard of the global batch; the loss is the token mean over all ranks."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlgen.models.logprobs import completion_logprobs
from rlgen.data.chat import message_problem, message_text
from rlgen.data.records import check_text_or_messages
from rlgen.errors import RlgenError
from rlgen.rollout.engine import check_context, context_limit
from rlgen.rollout.groups import ModelInputs
from rlgen.training.micro_batches import even_passes, micro_batches, row_costs, trimmed
from rlgen.training.data import PromptSampler
from rlgen.training.parts import summed_over_ranks
from rlgen.config import section, setting
from rlgen.training.config import OptimConfig, RunConfig, TrainConfig
from rlgen.training.trainer import Trainer, load_records


@dataclass
class SFTAlgoConfig:
    batch_size: int = setting(32, "examples per optimiser step")
    completion_only_loss: bool = setting(True, "loss on the completion tokens only; false trains on the prompt tokens too")
    completion_field: str = setting("answer", "the record field used as the completion when a record has no `completion`")
    max_new_tokens: int = setting(256, "completion length of the periodic held-out evaluation")


@dataclass
class SFTConfig(TrainConfig):
    algorithm: SFTAlgoConfig = section(SFTAlgoConfig, "SFT's batch and loss options")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5))  # TRL's SFT default
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/sft", steps=200))


def conversation_examples(data, record: dict) -> list[dict]:
    """An SFT record with a `messages` list (TRL's conversational format) as one example per assistant turn:
    its prompt the conversation before the turn, its completion the turn, so that every assistant turn is
    trained on and nothing else is; other records unchanged."""
    if "messages" not in record or "prompt" in record:
        return [record]
    where = f"{data.path or data.task}, " + (f"line {record['_line']}" if "_line" in record else "a record")
    messages = record["messages"]
    problem = message_problem(messages)
    if problem:
        raise RlgenError(f"{where}: field 'messages': {problem}")
    if messages[-1]["role"] != "assistant" or messages[0]["role"] == "assistant":
        raise RlgenError(f"{where}: field 'messages' must end with an assistant message after at least one other")
    rest = {k: v for k, v in record.items() if k != "messages"}
    examples, start = [], None
    for i, message in enumerate([*messages, {"role": ""}]):  # a sentinel closes the last run of assistant turns
        if message["role"] == "assistant" and start is None:
            start = i
        elif message["role"] != "assistant" and start is not None:
            examples.append({**rest, "prompt": messages[:start], "completion": messages[start:i]})
            start = None
    return examples


def eval_example(cfg, record: dict) -> dict:
    """A held-out SFT example with the `answer` exact-match compares against: its own, else its target's text."""
    if "answer" in record or "prompt" not in record:
        return record
    target = record.get("completion", record.get(cfg.algorithm.completion_field))
    return {**record, "answer": message_text(target)} if target is not None else record


class SFTTrainer(Trainer):
    config: SFTConfig
    supports_distributed = True

    def prepare_data(self) -> None:
        cfg = self.config
        # split whole conversations (their turns never straddle training and held-out), then one example per turn
        train, held = self.split_held_out(load_records(cfg.data, cfg.data.split, required=()), required=())
        self.records = [example for r in train for example in conversation_examples(cfg.data, r)]
        # a held-out conversation is evaluated on its last turn, against its reference answer (`answer`, else the
        # target completion's text: exact-match of the greedy completion)
        self.eval_records = [eval_example(cfg, conversation_examples(cfg.data, r)[-1]) for r in held] if held else held
        for record in self.records:
            if "prompt" not in record:
                where = f"line {record['_line']}" if "_line" in record else "a record"
                raise RlgenError(f"{cfg.data.path or cfg.data.task}, {where}: missing field 'prompt' (or 'messages')")
            if "completion" not in record and cfg.algorithm.completion_field not in record:
                where = f"line {record['_line']}" if "_line" in record else "a record"
                raise RlgenError(f"{cfg.data.path or cfg.data.task}, {where}: missing field 'completion' or '{cfg.algorithm.completion_field}'")
            # the target must be text or assistant messages (a null would train on the word "None")
            check_text_or_messages(cfg.data.path or cfg.data.task, record,
                                   "completion" if "completion" in record else cfg.algorithm.completion_field)
        self.sampler = PromptSampler(self.records, cfg.algorithm.batch_size, cfg.run.seed)

    def prepare(self) -> None:
        self.engine = self.text_engine()
        self.check_fits_context()

    def check_fits_context(self) -> None:
        """Training examples and the held-out generation must fit the model's context: one line now
        instead of an IndexError (learned positions) at the first long batch or evaluation."""
        limit = context_limit(self.model)
        if not limit:
            return
        cfg = self.config
        special = self.chat.add_special_tokens
        if self.eval_records:
            check_context(self.model, self.tokenizer, [r["prompt"] for r in self.rendered(self.eval_records)],
                          cfg.algorithm.max_new_tokens, "algorithm.max_new_tokens", special)
        longest, where = 0, None
        for start in range(0, len(self.records), 1024):
            batch = self.records[start : start + 1024]
            prompts, completions = self.example_texts([r["prompt"] for r in batch], [self.completion_of(r) for r in batch])
            completions = self.engine.tokenize_completions(completions)
            prompt_lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=special).input_ids]
            for record, prompt_length, completion in zip(batch, prompt_lengths, completions):
                # the last completion token (the stop token) is predicted, never fed: one position less
                length = prompt_length + len(completion) - 1
                if length > longest:
                    longest, where = length, record
        if longest > limit:
            line = f"line {where['_line']}" if "_line" in where else "a record"
            raise RlgenError(f"{cfg.data.path or cfg.data.task}, {line}: prompt plus completion take {longest} positions, "
                             f"more than the model's context of {limit}")

    def extra_state(self) -> dict:
        return {"sampler": self.sampler.state()}

    def restore_extra_state(self, state: dict) -> None:
        self.sampler.restore(state["sampler"])

    def completion_of(self, record: dict):
        """The target: `completion` (a string or assistant messages), else the completion field."""
        value = record.get("completion", record.get(self.config.algorithm.completion_field))
        return value if isinstance(value, list) else str(value)

    def encode(self, batch: list[dict]):
        prompts, completions = self.example_texts([r["prompt"] for r in batch], [self.completion_of(r) for r in batch])
        prompt_ids, prompt_mask = self.engine.encode_prompts(prompts)
        completion_ids, completion_mask = self.engine.encode_completions(completions)
        return prompt_ids, prompt_mask, completion_ids, completion_mask

    def train_step(self) -> dict:
        cfg = self.config
        batch = self.dist.shard(self.sampler.next_batch())  # this rank's share of the global batch
        local_tokens, loss_sum = 0, 0.0
        if batch:  # a rank without examples (a global batch smaller than the world) only joins the collectives
            prompt_ids, prompt_mask, completion_ids, completion_mask = self.encode(batch)
            if not cfg.algorithm.completion_only_loss:
                # Train on prompt tokens too: move them into the "completion" part after the first token.
                completion_ids = torch.cat([prompt_ids[:, 1:], completion_ids], dim=1)
                completion_mask = torch.cat([prompt_mask[:, 1:], completion_mask], dim=1)
                prompt_ids, prompt_mask = prompt_ids[:, :1], prompt_mask[:, :1]
            local_tokens = int(completion_mask.sum())
        total_tokens = max(int(self.dist.sum(local_tokens)), 1)  # the global batch's: the loss is its token mean
        if batch:
            inputs = ModelInputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
            budget = cfg.optim.max_tokens_per_micro_batch
            chunks = micro_batches(len(batch), budget, cfg.optim.gradient_accumulation_steps, row_costs(inputs) if budget else None)
            # under FSDP every rank runs as many passes as the others (the budget may split shards unevenly)
            for idx, real in even_passes(chunks, self.dist if self.fsdp and budget else None):
                part = inputs.rows(idx.to(prompt_ids.device))
                part = trimmed(part) if budget else part  # a short micro-batch computes on its own width only
                logp, _ = completion_logprobs(self.model, *part)
                loss = -(logp * part.completion_mask.float()).sum() / total_tokens
                self.backward(loss if real else loss * 0.0)
                loss_sum += float(loss.detach()) if real else 0.0
        grad_norm = self.optimizer_step()
        return {"loss": summed_over_ranks(self.dist, {"loss": loss_sum})["loss"], "grad_norm": grad_norm, "tokens": total_tokens}

    @property
    def eval_max_new_tokens(self) -> int:
        return self.config.algorithm.max_new_tokens
