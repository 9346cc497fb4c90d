"""What every trainer shares: model and optimiser setup, the step loop, metrics, checkpoints, resume."""
from __future__ import annotations

import json
import math
import os
import random
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError

from rlgen import kernels
from rlgen.devices import resolve_device
from rlgen.distributed import Dist, init_distributed, sync_gradients
from rlgen.data.chat import chat_format, reward_view
from rlgen.data.records import read_records
from rlgen.errors import RlgenError
from rlgen.evaluation.metrics import correctness_rewards, evaluate_model
from rlgen.models.backbone import LoadedModel, ReferencePolicy, backbone_named
from rlgen.models.causal_lm import (load_model, load_policy, load_start_model, load_tokenizer, resolve_model_path, save_hf,
                                    side_files)
from rlgen.models.safe_load import load_peft_adapter
from rlgen.plugins import registry
from rlgen.config import to_dict
from rlgen.training import fsdp, trackers
from rlgen.training.config import DataConfig, OptimConfig, RunConfig  # noqa: F401 - re-exported (their home before)
from rlgen.training.precision import PrecisionPolicy
from rlgen.training.run_dir import RunDir
from rlgen.training.sharded_state import ShardedState, is_sharded_checkpoint, save_sharded
from rlgen.training.state import load_state, restore_rng, rng_state, save_state


def load_records(data: DataConfig, split: str, required=("prompt",)) -> list[dict]:
    """A data config's records (its file, or a task's split); prompts may be chat message lists. A file's
    `data.prompt_field` / `data.answer_field` columns become `prompt` / `answer`."""
    if data.path:
        return read_records(data.path, required=required, messages=True, fields=field_names(data))
    if not data.task:
        raise RlgenError("no data: give --task NAME or --data FILE")
    records = registry("task").get(data.task).split(split)
    if not records:
        raise RlgenError(f"task '{data.task}' has an empty '{split}' split")
    return records


def field_names(data) -> dict[str, str]:
    """{record field: the file's column} for the columns a data config renames (prompt_field, answer_field)."""
    names = {"prompt": getattr(data, "prompt_field", "prompt"), "answer": getattr(data, "answer_field", "answer")}
    return {field: column for field, column in names.items() if column != field}


def held_out_split(data: DataConfig, records: list[dict], seed: int, evaluating: bool,
                   required=("prompt",)) -> tuple[list[dict], list[dict] | None, str]:
    """(training records, held-out records, what the held-out set is). The held-out set is `data.eval_path`;
    or, for a file without one, a seeded `data.eval_fraction` of it, taken out of the training records; or a
    task's held-out split. At most `data.eval_samples` held-out records; None when not evaluating."""
    if not evaluating:
        return records, None, ""
    limit = data.eval_samples
    eval_path = getattr(data, "eval_path", None)
    if eval_path:
        held = read_records(eval_path, required=required, messages=True, fields=field_names(data))[:limit]
        return records, held, f"{eval_path} ({len(held)} records)"
    if data.path:
        fraction = getattr(data, "eval_fraction", 0.0)
        if not fraction:
            return records, None, "none (data.eval_fraction = 0 and no data.eval_path)"
        count = max(1, round(len(records) * fraction))
        if count >= len(records):
            raise RlgenError(f"{data.path}: holding out data.eval_fraction = {fraction} of its {len(records)} records "
                             "leaves none to train on (give data.eval_path, or a lower data.eval_fraction)")
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        held_rows = set(order[:count])
        train = [r for i, r in enumerate(records) if i not in held_rows]
        held = [records[i] for i in sorted(held_rows)][:limit]
        return train, held, (f"{len(held)} of {count} records held out of {data.path} (data.eval_fraction = {fraction}, "
                             f"seed {seed}; never trained on)")
    held = registry("task").get(data.task).split(data.eval_split)[:limit]
    return records, held, f"task {data.task}, split {data.eval_split} ({len(held)} records)"


def make_adamw(params: list, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for these tensors (CPU and CUDA floats: one kernel
    per step instead of a dozen multi-tensor passes), else the multi-tensor (foreach) implementation."""
    kwargs = dict(lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not cover
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def lr_lambda(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


class Trainer:
    """Subclasses implement `train_step(step) -> metrics`; this class does the rest: device placement,
    precision, multi-process data parallelism (rlgen.distributed), checkpoints and the loop.

    A trainer that runs multi-process (`supports_distributed = True`) trains on `self.dist.shard(batch)` of
    every global batch and normalises its loss by global counts (`self.dist.sum`), so that the gradients
    summed over ranks in `optimizer_step` are the single-process ones."""

    supports_distributed = False

    def __init__(self, config, run_dir: RunDir, reporter, resume: bool = False):
        self.config = config
        self.run = run_dir
        self.reporter = reporter
        self.resume = resume
        self.step = 0
        self.nonfinite_skipped = 0  # updates skipped in the current step (optim.skip_nonfinite_steps)
        self.dist = Dist()
        self.device = torch.device("cpu")
        self.precision = PrecisionPolicy("fp32", self.device)
        self._runtime_ready = False
        self.trackers: list[tuple[str, object]] = []  # (name, open tracker) of run.report_to, rank 0 only

    def init_runtime(self) -> None:
        """Device, process group and precision, once per trainer (before anything touches the run dir, so
        that only rank 0 writes it). Non-main ranks report nothing; rank 0 speaks for the run."""
        if self._runtime_ready:
            return
        run = self.config.run
        self.device = resolve_device(getattr(run, "device", "auto"), "run.device")
        self.dist = init_distributed(self.device)
        if self.dist.enabled and not self.supports_distributed:
            raise RlgenError(f"{type(self).__name__} does not run multi-process yet (WORLD_SIZE={self.dist.world_size}); "
                             "run it on one process")
        self.precision = PrecisionPolicy(getattr(run, "precision", "fp32"), self.device)
        if self.fsdp:
            self.check_fsdp()
        if not self.dist.is_main:
            from rlgen.events import Events

            self.reporter = Events()
        self._runtime_ready = True

    @property
    def fsdp(self) -> bool:
        """Sharded data parallelism (run.distributed = fsdp, rlgen.training.fsdp); one process never shards."""
        return self.dist.enabled and getattr(self.config.run, "distributed", "ddp") == "fsdp"

    def check_fsdp(self) -> None:
        """What FSDP cannot do here, refused before the model loads. FSDP gathers weights inside every
        forward pass, so every rank must run as many forward passes as the others: an equal, non-empty share
        of each batch."""
        cfg = self.config
        if cfg.run.precision == "fp16-mixed":
            raise RlgenError("run.precision = fp16-mixed does not run with run.distributed = fsdp (the loss scaler would "
                             "see only its rank's gradient shard); use bf16-mixed")
        if getattr(cfg.model, "lora_r", 0) > 0:
            raise RlgenError("model.lora_r > 0 does not run with run.distributed = fsdp (LoRA adapters are small: use ddp)")
        batch_size = getattr(getattr(cfg, "algorithm", None), "batch_size", None)
        world = self.dist.world_size
        if isinstance(batch_size, int) and batch_size % world:
            raise RlgenError(f"algorithm.batch_size = {batch_size} must be a multiple of the {world} processes under "
                             "run.distributed = fsdp (every rank runs the same forward passes)")

    # --- setup ---
    def setup(self) -> None:
        """Set up, and on resume restore the newest sound checkpoint. A checkpoint whose files parse but whose
        state does not restore (hand-edited, wrong content) is skipped with a warning, and the whole set-up
        runs again for the one before it, so that nothing half-restored is kept."""
        damaged: dict[Path, str] = {}
        while True:
            checkpoint = self._setup(damaged)
            if checkpoint is None:
                return
            try:
                self._restore(checkpoint)
            except RESTORE_ERRORS as exc:
                problem = f"its state does not restore: {_describe(exc)}"
            else:
                engine = getattr(self, "engine", None)
                if engine is not None:  # a sharded checkpoint's rows reached the model after the engine started
                    engine.sync_weights(self.model)
                return
            _warn(f"skipping damaged checkpoint {checkpoint} ({problem})")
            damaged[checkpoint] = problem
            self.step = 0

    def _setup(self, damaged: dict[Path, str]) -> Path | None:
        cfg = self.config
        self.init_runtime()
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        try:
            kernels.use(cfg.run.kernels)
        except RuntimeError as exc:
            raise RlgenError(f"run.kernels = '{cfg.run.kernels}': {exc}") from None
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        self.generator = torch.Generator().manual_seed(cfg.run.seed)
        self.prepare_data()  # bad data or rewards fail here, before the (slow) model load
        checkpoint = self.run.latest_checkpoint(warn=_warn, skip=damaged) if self.resume else None
        if self.dist.enabled:  # rank 0's choice for all: ranks must resume at the same step (or collectives desync)
            chosen = self.dist.broadcast_object(str(checkpoint) if checkpoint is not None else None)
            checkpoint = Path(chosen) if chosen is not None else None
        if self.resume and checkpoint is None:
            self.reporter.log(f"no checkpoint in {self.run.root}: starting from step 0")
        # a sharded checkpoint holds no model directory: the base model is loaded, and _restore writes the
        # checkpoint's rows into each rank's shards once the model is placed and sharded
        self.model, self.tokenizer, self.base_path = self._load_model(None if is_sharded_checkpoint(checkpoint) else checkpoint)
        if self.tokenizer is not None:  # how prompts and completions become model text (chat templates)
            self.chat = chat_format(self.tokenizer, self.config.data)
        self.place_model()
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = make_adamw(params, o)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(o.lr_scheduler, o.warmup_steps, cfg.run.steps))
        self.prepare()
        engine = getattr(self, "engine", None)
        if engine is not None and self.chat is not None:  # rendered prompts hold the template's special tokens
            engine.add_special_tokens = self.chat.add_special_tokens
        if self.fsdp and engine is not None and hasattr(engine, "finished_everywhere"):
            # sharded weights gather inside every forward: each rank decodes until every rank's rows have stopped
            engine.finished_everywhere = lambda done: self.dist.sum(0.0 if done else 1.0) == 0
        return checkpoint

    def _load_model(self, checkpoint: Path | None):
        cfg = self.config.model
        if checkpoint is None:
            return load_policy(cfg)
        base_path = resolve_model_path(cfg.path)
        tokenizer = load_tokenizer(base_path)
        if cfg.lora_r > 0:
            # the run's own adapter on the model it started from (an adapter directory: merged into its base)
            model = load_peft_adapter(load_start_model(base_path, cfg.dtype), checkpoint / "model", is_trainable=True)
        else:
            model = load_model(checkpoint / "model", cfg.dtype)
        return model, tokenizer, base_path

    def place_model(self) -> None:
        """The loaded model on the run's device, in the precision's weight dtype, with gradient
        checkpointing when asked for (before the optimiser sees its parameters)."""
        dtype = self.precision.weight_dtype
        self.model.to(device=self.device, dtype=dtype) if dtype is not None else self.model.to(self.device)
        if getattr(self.config.model, "gradient_checkpointing", False):
            self.enable_gradient_checkpointing()
        if self.fsdp:
            self.shard(self.model)
        # where the model computes, also when FSDP keeps its parameters offloaded on the CPU (rlgen.devices)
        self.model.compute_device = self.device
        self.model.padding_free = getattr(self.config.model, "padding_free", False)  # read by completion_logprobs

    def shard(self, module) -> None:
        """FSDP2 over the run's ranks (bf16-mixed: bf16 gathered weights, fp32 gradient reduction)."""
        run = self.config.run
        fsdp.shard_model(module, run.reshard_after_forward, run.cpu_offload and self.device.type == "cuda",
                         fsdp.mixed_precision_policy(run.precision))

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass (transformers' non-reentrant checkpointing)."""
        model = self.model
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):  # a LoRA model's frozen embeddings give no grad to checkpoint
            model.enable_input_require_grads()
        if hasattr(model, "config"):
            model.config.use_cache = False

    def backward(self, loss: torch.Tensor) -> None:
        """Every trainer's backward pass (the fp16 loss scaler scales it here)."""
        self.precision.backward(loss)

    def prepare_data(self) -> None:
        """Algorithm-specific setup that needs no model: data, rewards, registry look-ups."""

    def prepare(self) -> None:
        """Algorithm-specific setup that needs the model: rollout engine, reference model."""

    backbone_name = "causal-lm"  # the backbone (rlgen.models.backbone) whose models this trainer trains

    def reference_policy(self) -> ReferencePolicy:
        """The frozen reference for KL penalties and DPO-family losses, built by the model's backbone (the
        LoRA base with the adapter off, or a frozen copy of the base), the same way for every trainer."""
        handle = LoadedModel(self.model, self.tokenizer, Path(self.base_path))
        reference = backbone_named(self.backbone_name).reference_policy(handle, self.config.model)
        if reference.is_copy:  # the same log-prob path as the policy (packed or padded): equal scores at step 1
            reference.module.padding_free = getattr(self.model, "padding_free", False)
        if reference.is_copy and self.fsdp:
            # Sharded like the policy (a replicated copy would double a large model's memory); it then
            # gathers its weights in every forward, so the trainers run it as many times on every rank.
            # Resharded after each forward: it has no backward to keep the gathered weights for.
            run = self.config.run
            dtype = self.precision.weight_dtype
            reference.module.to(device=self.device, dtype=dtype) if dtype is not None else reference.module.to(self.device)
            fsdp.shard_model(reference.module, True, run.cpu_offload and self.device.type == "cuda",
                             fsdp.mixed_precision_policy(run.precision))
        return reference

    chat = None  # the run's ChatFormat (rlgen.data.chat), set once the tokenizer is loaded

    def text_engine(self):
        """The rollout engine on the policy, tokenising as the run's chat format says (rendered prompts hold
        the template's special tokens: none are added)."""
        from rlgen.rollout.engine import HFEngine

        previous = getattr(getattr(self, "engine", None), "close", None)
        if previous is not None:  # a set-up run again (a damaged checkpoint skipped): one engine at a time
            previous()
        rollout = getattr(self.config, "rollout", None)
        if getattr(rollout, "engine", "hf") == "vllm":
            engine = self._vllm_engine(rollout)
        else:
            engine = HFEngine(self.model, self.tokenizer)
        engine.add_special_tokens = self.chat.add_special_tokens if self.chat is not None else True
        return engine

    def _vllm_engine(self, rollout):
        """A colocated vLLM engine sized for this run: its context holds the longest training or held-out prompt
        plus the longest completion the run asks for; one step's rollouts run at once. Multi-process, one engine
        per rank, each holding the whole model: every rank generates its share, and the weights reach every
        engine at the same generation (under FSDP each parameter is gathered in turn on all ranks together,
        which is why every rank generates at every step and evaluates under FSDP)."""
        from rlgen.rollout.vllm_engine import VLLMEngine

        prompts = [self.prompt_text(r) for r in list(self.records) + list(self.eval_records or [])]
        add = self.chat.add_special_tokens if self.chat is not None else True
        longest = max((len(ids) for ids in self.tokenizer(sorted(set(prompts)), add_special_tokens=add).input_ids), default=0)
        new_tokens = max(rollout.max_new_tokens, self.eval_max_new_tokens if self.eval_records else 0)
        rows = -(-rollout.prompts_per_step // self.dist.world_size) * rollout.num_generations  # this rank's share
        started = time.perf_counter()
        if rollout.vllm_mode == "server":
            from rlgen.rollout.vllm_server import RemoteVLLMEngine

            engine = RemoteVLLMEngine(self.model, self.tokenizer, host=rollout.vllm_server_host,
                                      port=rollout.vllm_server_port, group_port=rollout.vllm_group_port,
                                      timeout_s=rollout.vllm_server_timeout, dist=self.dist if self.dist.enabled else None,
                                      gather_everywhere=bool(self.fsdp))
            if longest + new_tokens > engine.max_model_len:
                raise RlgenError(f"the vLLM server's context ({engine.max_model_len} tokens) is shorter than this run's "
                                 f"longest prompt plus completion ({longest + new_tokens}): rlgen serve --max-model-len")
            self.reporter.log(f"vLLM server at {engine.url} (context {engine.max_model_len} tokens): connected in "
                              f"{time.perf_counter() - started:.1f} s")
            return self._warn_filtered(rollout, engine)
        engine = VLLMEngine(self.model, self.tokenizer, max_model_len=longest + new_tokens, max_num_seqs=max(rows, 1),
                          gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
                          kv_cache_gib=rollout.vllm_kv_cache_gib, enable_sleep_mode=rollout.vllm_enable_sleep_mode,
                          dtype=rollout.vllm_dtype, seed=self.config.run.seed)
        self.reporter.log(f"vLLM rollout engine started in {time.perf_counter() - started:.0f} s (context "
                          f"{engine.max_model_len} tokens, up to {rows} sequences at once)")
        return self._warn_filtered(rollout, engine)

    def _warn_filtered(self, rollout, engine):
        algorithm = getattr(self.config, "algorithm", None)
        filtered = [f"rollout.{key}" for key, off in (("top_p", 1.0), ("top_k", 0), ("min_p", 0.0), ("repetition_penalty", 1.0))
                    if getattr(rollout, key) != off]
        if filtered and getattr(algorithm, "engine_is_correction", "none") != "none":
            self.reporter.log(f"warning: with {', '.join(filtered)} the vLLM engine's log-probs are those of the filtered "
                              "(renormalised, penalised) distribution, the trainer's are not: the importance ratio of "
                              "algorithm.engine_is_correction also measures that difference (engine_is_correction = 'none' "
                              "turns it off)")
        return engine

    def prompt_text(self, record: dict) -> str:
        """A record's prompt as model text (its chat template applied when one is in use, then cut to
        data.max_prompt_length tokens); a bad one is one line naming the record."""
        if self.chat is None:
            return record["prompt"]
        try:
            return self._model_prompt(record["prompt"])
        except RlgenError as exc:
            where = f"line {record['_line']}" if "_line" in record else "a record"
            raise RlgenError(f"{self.data_name()}, {where}: {exc}") from None

    def _model_prompt(self, prompt) -> str:
        text = self.chat.prompt_text(prompt)
        limit = getattr(self.config.data, "max_prompt_length", 0)
        if not limit:
            return text
        cached = self._truncated.get(text)
        if cached is None:  # TRL's way: the prompt's tokens cut, then decoded back to text for the engine
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            if len(ids) > limit:
                keep = ids[-limit:] if self.config.data.prompt_truncation == "left" else ids[:limit]
                cached = self.tokenizer.decode(keep, skip_special_tokens=False)
            else:
                cached = text
            self._truncated[text] = cached
        return cached

    @property
    def _truncated(self) -> dict[str, str]:
        if "_truncated_prompts" not in self.__dict__:
            self._truncated_prompts: dict[str, str] = {}
        return self._truncated_prompts

    def truncation_report(self, records: list[dict]) -> str:
        """`data.max_prompt_length = N: K of M prompts truncated (left)`, or "" when off."""
        limit = getattr(self.config.data, "max_prompt_length", 0)
        if not limit or self.chat is None or not records:
            return ""
        cut = sum(self.prompt_text(r) != self.chat.prompt_text(r["prompt"]) for r in records)
        return (f"data.max_prompt_length = {limit}: {cut} of {len(records)} training prompts truncated "
                f"({self.config.data.prompt_truncation})")

    def split_held_out(self, records: list[dict], evaluating: bool | None = None,
                       required=("prompt",)) -> tuple[list[dict], list[dict] | None]:
        """(training records, held-out records) by `held_out_split`, saying what the evaluation runs on.
        `evaluating`: whether the run evaluates (default: run.eval_every > 0)."""
        cfg = self.config
        evaluating = bool(cfg.run.eval_every) if evaluating is None else evaluating
        train, held, what = held_out_split(cfg.data, records, cfg.run.seed, evaluating, required)
        self.held_out_description = what  # said once the set-up has passed (bad input stays one error line)
        return train, held

    held_out_description = ""

    def example_texts(self, prompts: list, completions: list) -> tuple[list[str], list[str]]:
        """(prompt texts, completion texts) of training examples: with a chat template, the rendered prompt
        and the assistant turn the template puts after it (end-of-turn marker included)."""
        if self.chat is None:
            return list(prompts), list(completions)
        try:
            return ([self._model_prompt(p) for p in prompts],
                    [self.chat.completion_text(p, c) for p, c in zip(prompts, completions)])
        except RlgenError as exc:
            raise RlgenError(f"{self.data_name()}: {exc}") from None

    def rendered(self, records: list[dict]) -> list[dict]:
        """Records whose prompts are model text (for code that takes prompt strings: evaluation)."""
        return [{**r, "prompt": self.prompt_text(r)} for r in records]

    def data_name(self) -> str:
        data = getattr(self.config, "data", None)
        return str(getattr(data, "path", None) or getattr(data, "task", None) or "data")

    # --- checkpoints ---
    def extra_state(self) -> dict:
        return {}

    def restore_extra_state(self, state: dict) -> None:
        pass

    def extra_tensors(self) -> dict:
        """Tensors to keep in checkpoints (e.g. cached reference log-probs), saved as safetensors."""
        return {}

    def restore_extra_tensors(self, tensors: dict) -> None:
        pass

    def save_model(self, out_dir: Path | None, final: bool) -> None:
        """The model in its upstream format: final/ merges LoRA when configured; checkpoints keep the adapter.
        Under FSDP every rank comes here to gather the full weights, and rank 0 (out_dir not None) writes them."""
        # the base's rlgen_defaults.toml goes along: `train grpo --model runs/sft/final` gets the same settings
        keep = side_files(self.base_path) if self.base_path else ()
        if self.fsdp:
            state = fsdp.full_model_state(self.model)
            if out_dir is not None:
                fsdp.save_full_hf(self.model, self.tokenizer, out_dir, state, keep)
            return
        save_hf(self.model, self.tokenizer, out_dir, merge_lora=final and self.config.model.lora_merge_on_save,
                extra_files=keep)

    @property
    def sharded_checkpoints(self) -> bool:
        """run.checkpoint_format: sharded (each rank writes its shards) or full (rank 0 writes gathered states)."""
        chosen = getattr(self.config.run, "checkpoint_format", "auto")
        return chosen == "sharded" or (chosen == "auto" and self.fsdp)

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes the checkpoint. Full format: under FSDP every rank comes here for the gathers (the full
        model and optimiser states, in the single-process layout). Sharded format: every rank writes its own
        rows of the trained weights and AdamW states. Either resumes at any world size."""
        if self.sharded_checkpoints:
            tmp = self.run.begin_checkpoint(self.step) if self.dist.is_main else None
            tmp = Path(self.dist.broadcast_object(str(tmp) if tmp is not None else None))
            if not tmp.is_dir():
                raise RlgenError(f"rank {self.dist.rank} does not see the run directory's {tmp}: sharded checkpoints need "
                                 "a file system every node writes to (or run.checkpoint_format = full)")
            tensors, optimizer_state = self._sharded_state()
            save_sharded(tmp / "shards", tensors, self.dist.rank, self.dist.world_size, self.dist.all_gather_json)
            if not self.dist.is_main:
                return None
        else:
            optimizer_state = fsdp.full_optimizer_state(self.model, self.optimizer) if self.fsdp else self.optimizer.state_dict()
            tmp = self.run.begin_checkpoint(self.step) if self.dist.is_main else None
            self.save_model(tmp / "model" if tmp is not None else None, final=False)
            if tmp is None:
                return None
        save_state(optimizer_state, tmp, "optimizer")
        save_state(rng_state(self.generator), tmp, "rng")
        tensors = self.extra_tensors()
        if tensors:
            save_state(tensors, tmp, "extra")
        state = {"step": self.step, "scheduler": self.scheduler.state_dict(), **self.extra_state()}
        if self.precision.scaler is not None:
            state["grad_scaler"] = self.precision.state_dict()
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        return self.run.commit_checkpoint(tmp, self.step, self.config.run.keep_checkpoints)

    def _trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trained parameters by name (tied ones once); a sharded checkpoint holds these, the rest of the
        model (frozen) comes from the base."""
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def _sharded_state(self) -> tuple[dict, dict]:
        """The tensors of a sharded checkpoint (each parameter and AdamW state, as this rank holds it) and the
        optimiser's JSON part: its groups and every state's place, by parameter name."""
        params = self._trained_parameters()
        names = {id(p): name for name, p in params.items()}
        tensors = {f"model.{name}": p for name, p in params.items()}
        groups, states = [], {}
        for group in self.optimizer.param_groups:
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in group["params"]]})
            for p in group["params"]:
                entry = {}
                for key, value in self.optimizer.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"optimizer.{names[id(p)]}.{key}"] = value
                        entry[key] = {"__shard__": f"optimizer.{names[id(p)]}.{key}"}
                    else:
                        entry[key] = value
                if entry:
                    states[names[id(p)]] = entry
        return tensors, {"format": "sharded", "param_groups": groups, "state": states}

    def _restore_sharded(self, checkpoint: Path, optimizer_state: dict) -> None:
        """Each rank reads its rows of the weights and AdamW states (any world size, sharded or not)."""
        shards = ShardedState(checkpoint / "shards")
        params = self._trained_parameters()
        for name, param in params.items():
            shards.copy_into(f"model.{name}", param)
        ordered = [p for group in self.optimizer.param_groups for p in group["params"]]
        index = {id(p): i for i, p in enumerate(ordered)}
        groups = optimizer_state["param_groups"]
        if len(groups) != len(self.optimizer.param_groups):
            raise ValueError("the optimizer state has a different number of parameter groups")
        for saved, group in zip(groups, self.optimizer.param_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("an optimizer parameter group holds a different number of parameters")
        state = {}
        for name, entry in optimizer_state["state"].items():
            param = params[name]
            state[index[id(param)]] = restored = {}
            for key, value in entry.items():
                if isinstance(value, dict) and "__shard__" in value:
                    shape = shards.shape(value["__shard__"])
                    # a moment is laid out (and sharded) as its parameter; a scalar (AdamW's step) is whole
                    value = shards.like(value["__shard__"], param if shape == param.shape else torch.empty(shape))
                restored[key] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": [
            {**saved, "params": [index[id(params[name])] for name in saved["params"]]} for saved in groups]})

    def _restore(self, checkpoint: Path) -> None:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        self.step = state["step"]
        optimizer_state = load_state(checkpoint, "optimizer")
        if is_sharded_checkpoint(checkpoint):
            self._restore_sharded(checkpoint, optimizer_state)
        elif self.fsdp:
            _check_state_shapes(self.optimizer, optimizer_state)
            fsdp.load_full_optimizer_state(self.model, self.optimizer, optimizer_state)
        else:
            self.optimizer.load_state_dict(optimizer_state)
        _check_optimizer_state(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng(load_state(checkpoint, "rng"), self.generator)
        self.restore_extra_state(state)
        self.precision.load_state_dict(state.get("grad_scaler", {}))
        if (checkpoint / "extra.json").is_file():
            self.restore_extra_tensors(load_state(checkpoint, "extra"))
        self.reporter.log(f"resumed from {checkpoint} (step {self.step})")

    # --- the loop ---
    def train_step(self) -> dict:
        raise NotImplementedError

    def optimizer_step(self) -> float:
        """Clip and apply the update; every trainer goes through here. An update whose gradient norm is NaN/inf
        is never applied: the run stops, or with optim.skip_nonfinite_steps the update is skipped."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.fsdp:  # FSDP has summed (reduce-scattered) them in the backward pass already
            sync_gradients(params, self.dist)  # multi-process: the sum over ranks = the global batch's gradient
        self.precision.unscale(self.optimizer)
        max_norm = self.config.optim.max_grad_norm
        norm = float(fsdp.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))))
        if not math.isfinite(norm) and self.precision.scaler is not None:
            # fp16 overflow: the scaler skips this update and lowers its scale, as every fp16 trainer does
            self.precision.step(self.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
            if self.precision.scaler.get_scale() < MIN_LOSS_SCALE:  # non-finite at any scale: not an overflow
                raise RlgenError(f"step {self.step}: the fp16 loss scale fell below {MIN_LOSS_SCALE:g} (the gradients are "
                                 f"non-finite at any scale); training stopped{self._resume_hint()}")
            with warnings.catch_warnings():  # torch warns when the schedule moves before any applied update
                warnings.filterwarnings("ignore", message=r".*lr_scheduler\.step\(\)` before `optimizer\.step\(\)")
                self.scheduler.step()
            return norm
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            if not self.config.optim.skip_nonfinite_steps:
                raise RlgenError(f"step {self.step}: the gradient norm is {norm} (a non-finite loss or gradient); the update "
                                 f"was not applied and training stopped{self._resume_hint()} (optim.skip_nonfinite_steps "
                                 "= true skips such updates instead)")
            self.nonfinite_skipped += 1
            self.scheduler.step()  # the schedule follows step numbers, skipped or not
            return norm
        self.precision.step(self.optimizer)
        # Finite gradients can still make weights non-finite (an overflowing lr, adam_eps = 0 on a zero
        # gradient); the inf-norm (max |w|) cannot overflow, so it is finite exactly when every weight is.
        if params and not self._weights_finite(params):
            raise RlgenError(f"step {self.step}: the optimizer update made weights non-finite (check optim.lr and "
                             f"optim.adam_eps); training stopped{self._resume_hint()}")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        engine = getattr(self, "engine", None)
        if engine is not None:  # an engine with its own copy of the weights (vLLM) takes the new ones before sampling
            engine.sync_weights(self.model)
        return norm

    def _weights_finite(self, params: list) -> bool:
        """Whether every weight is finite. Under FSDP each rank checks its own shards (an empty one, e.g. of a
        1-element bias, has no inf-norm) and the ranks' largest values are summed: non-finite anywhere
        makes the sum non-finite on every rank, so all ranks stop together."""
        local = [t for t in (p.to_local() if hasattr(p, "to_local") else p for p in params) if t.numel()]
        largest = float(torch.nn.utils.get_total_norm(local, norm_type=float("inf"))) if local else 0.0
        return math.isfinite(self.dist.sum(largest) if self.fsdp else largest)

    def _resume_hint(self) -> str:
        """Where the run can go on from: its last checkpoint, which a failed step never touches."""
        try:
            done = self.run.latest_checkpoint()
        except RlgenError:  # every checkpoint damaged: nothing to point at
            done = None
        return f" ({done.name} is intact: rlgen train --resume {self.run.root})" if done is not None else ""

    def _check_loss(self, metrics: dict) -> None:
        loss = metrics.get("loss")
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            loss = loss.item()
        if isinstance(loss, float) and not math.isfinite(loss) and not self.config.optim.skip_nonfinite_steps:
            raise RlgenError(f"step {self.step}: the loss is {loss}; training stopped{self._resume_hint()}")

    def fit(self) -> dict:
        """Train, holding the run directory's lock throughout: a resumed run from the start, a new one from
        its creation (after the set-up, so that bad input leaves no directory behind). The trackers are
        closed at the end, and when the run fails."""
        try:
            try:
                result = self._fit()
            except BaseException:
                self._close_trackers(failed=True)
                raise
            self._close_trackers(failed=False)
            return result
        finally:
            close = getattr(getattr(self, "engine", None), "close", None)
            if close is not None:  # an engine with resources of its own (vLLM) shuts down with the run
                close()
            if self.dist.is_main:
                self.run.unlock()

    def _loading_notice(self) -> None:
        model = getattr(getattr(self.config, "model", None), "path", None)
        self.reporter.log(f"loading {model} and the data (set-up still running) ..." if model else "setting up ...")

    # --- experiment trackers (run.report_to) ---
    def _tracker_classes(self) -> list[tuple[str, object]]:
        """The trackers of run.report_to, their packages imported: a missing one is one line, before the model loads."""
        names = list(getattr(self.config.run, "report_to", None) or [])
        chosen = [(name, registry("tracker").get(name)) for name in names]
        for name, tracker in chosen:
            trackers.require(name, tracker)
        return chosen

    def _open_trackers(self, chosen: list[tuple[str, object]]) -> None:
        config = to_dict(self.config)
        for name, tracker in chosen:
            try:
                opened = trackers.open_tracker(name, tracker, self.run.root, config=config, run_name=self.run.root.name,
                                               start_step=self.step)
            except RlgenError:
                raise
            except Exception as exc:  # noqa: BLE001 - the tracker's library
                raise RlgenError(f"run.report_to: tracker '{name}' failed to start: {_describe(exc)}") from exc
            self.trackers.append((name, opened))

    def _close_trackers(self, failed: bool) -> None:
        """Close every open tracker (all of them, even when one fails); a failure is one line after a good run,
        a warning after a failed one (whose own error is the one to show)."""
        opened, self.trackers = self.trackers, []
        problem = None
        for name, tracker in reversed(opened):
            try:
                tracker.close(failed=failed)
            except Exception as exc:  # noqa: BLE001 - the tracker's library
                if failed:
                    _warn(f"tracker '{name}' failed to close: {_describe(exc)}")
                elif problem is None:
                    problem = f"run.report_to: tracker '{name}' failed to close: {_describe(exc)}"
        if problem is not None:
            raise RlgenError(problem)

    def completions_due(self) -> bool:
        """Whether this step's completions are logged here (run.log_completions_every, rank 0)."""
        every = getattr(self.config.run, "log_completions_every", 0)
        return bool(every) and self.step % every == 0 and self.dist.is_main

    def log_completions(self, rows: list[dict]) -> None:
        """A step's sample completions (rank 0's rows: prompt as given, completion, reward, reward_NAME ...), every
        run.log_completions_every steps: appended to OUT/completions.jsonl with the step, and a table to the
        trackers (prompts as text). Trainers call it every step; other steps and ranks do nothing."""
        if not self.completions_due():
            return
        rows = [{"step": self.step, **{k: _plain(v) for k, v in row.items()}} for row in rows]
        self.run.log_completions(rows)
        table = [{**row, "prompt": trackers.prompt_as_text(row.get("prompt", ""))} for row in rows]
        for _, tracker in self.trackers:
            tracker.log_table(self.step, "completions", table)

    def _fit(self) -> dict:
        self.init_runtime()
        main = self.dist.is_main  # rank 0 alone writes the run directory
        chosen = self._tracker_classes()  # every rank: a missing package fails before the model loads
        rollout = getattr(self.config, "rollout", None)
        if getattr(rollout, "engine", "hf") == "vllm" and getattr(rollout, "vllm_mode", "colocate") == "colocate":
            from rlgen.rollout.vllm_engine import import_vllm

            import_vllm()  # likewise vLLM
        if main and self.resume:
            self.run.lock()
        elif main:
            self.run.check_fresh()  # early, before the model loads; create() checks again under the lock
        # A slow set-up (a large model loading) says so within seconds; a fast one, or one that fails on bad
        # input, prints nothing more than its own lines (an error stays one line).
        notice = threading.Timer(float(os.environ.get("RLGEN_LOADING_NOTICE_S", LOADING_NOTICE_S)), self._loading_notice)
        notice.daemon = True
        notice.start()
        try:
            self.setup()
        finally:
            notice.cancel()
        failure = None
        if main:
            try:
                self.run.create(self.config, fresh=not self.resume)
                if self.resume:  # the metric lines after the checkpoint (all of them without one) are written again
                    self.run.truncate_metrics(self.step)
                self._open_trackers(chosen)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, once every rank knows
                failure = exc
        # multi-process: the other ranks stop with rank 0 (else they would wait in the first collective)
        if self.dist.enabled and self.dist.sum(0.0 if failure is None else 1.0) and failure is None:
            raise RlgenError("rank 0 could not start the run (its error is in rank 0's output)")
        if failure is not None:
            raise failure
        cfg = self.config.run
        last: dict = {}
        if self.held_out_description:
            self.reporter.log(f"held-out evaluation: {self.held_out_description}")
        truncation = self.truncation_report(getattr(self, "records", None) or [])
        if truncation:
            self.reporter.log(truncation)
        if cfg.eval_every and self.step == 0:  # the starting point of the held-out curve
            self._evaluate_and_log({"step": 0})
        with self.reporter.progress(total=cfg.steps, completed=self.step, description=f"training ({self.run.root})") as advance:
            while self.step < cfg.steps:
                self.step += 1
                self.nonfinite_skipped = 0
                started = time.perf_counter()
                with self.precision.autocast():
                    metrics = self.train_step()
                metrics = self.dist.mean_metrics(metrics)
                self._check_loss(metrics)
                if self.config.optim.skip_nonfinite_steps:
                    metrics["nonfinite_skipped"] = self.nonfinite_skipped
                metrics["step_time"] = time.perf_counter() - started
                metrics["lr"] = self.scheduler.get_last_lr()[0]
                last = {"step": self.step, **{k: _plain(v) for k, v in metrics.items()}}
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    last = self._evaluate_and_log(last)
                else:
                    self._log_metrics(last)
                advance(last)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    if main or self.fsdp:
                        self.save_checkpoint()
                    self.dist.barrier()
        if main or self.fsdp:
            self.save_model(self.run.final if main else None, final=True)
        self.dist.barrier()
        return last

    def _evaluate_and_log(self, row: dict) -> dict:
        """The held-out evaluation (rank 0's; the other ranks wait) added to a metrics row, which is logged.
        Under FSDP every rank evaluates (the forward passes gather weights; greedy decoding runs the same on
        every rank) and rank 0's result is kept."""
        if self.dist.is_main or self.fsdp:
            evaluated = {**row, **{k: _plain(v) for k, v in self.evaluate().items()}}
            if self.dist.is_main:
                row = evaluated
                self._log_metrics(row)
        self.dist.barrier()
        return row

    def _log_metrics(self, row: dict) -> None:
        """Write a metrics row and hand it to the callbacks (rlgen.events.Events.metrics); a reporter without
        a metrics event (an older or hand-made one) only logs and shows progress. Rank 0 only."""
        if not self.dist.is_main:
            return
        self.run.log_metrics(row)
        if self.trackers:
            values = trackers.numeric_metrics(row)
            for _, tracker in self.trackers:
                tracker.log(row["step"], values)
        emit = getattr(self.reporter, "metrics", None)
        if emit is not None:
            emit(row["step"], row)

    eval_records: list[dict] | None = None
    eval_max_new_tokens: int = 16

    def eval_task_rewards(self) -> tuple[str, ...]:
        """The correctness rewards of the held-out evaluation (its `eval/accuracy`): the task's own; for a file,
        the run's correctness reward if it has one (exact-match against `answer` without run rewards); none
        when the run's rewards are not correctness rewards (they are logged as eval/reward_NAME instead)."""
        data = self.config.data
        if data.task and not data.path:
            return registry("task").get(data.task).default_rewards
        rewards = self.eval_rewards()
        if rewards is None:
            return ("exact-match",)
        return tuple(name for name in rewards.names if name in CORRECTNESS_REWARDS)[:1]

    def evaluate(self) -> dict:
        """Greedy completions of the held-out records: accuracy by the correctness reward, and with a data file
        and the run's own rewards (`eval_rewards`), each of them and their combination."""
        if not self.eval_records:
            return {}
        texts = [self.prompt_text(r) for r in self.eval_records]
        rewards = self.eval_rewards()
        correctness = self.eval_task_rewards()
        result = evaluate_model(self.engine, self.eval_records, rewards if rewards is not None and not correctness
                                else correctness_rewards(correctness), self.eval_max_new_tokens, prompt_texts=texts)
        self.model.train()
        metrics = {"eval/accuracy": result["metrics"]["accuracy"]} if correctness else {}
        if rewards is not None:  # rewards read the records as given (a message-list prompt stays one)
            samples = [{**reward_view(r), "completion": s["completion"]} for r, s in zip(self.eval_records, result["samples"])]
            components, valid = rewards.compute(samples)
            total = rewards.total(components)[valid]
            metrics["eval/reward"] = float(total.nanmean()) if total.numel() else float("nan")
            for k, name in enumerate(rewards.names):
                column = components[:, k][valid]
                metrics[f"eval/reward_{name}"] = float(column.nanmean()) if column.numel() else float("nan")
        return metrics

    def eval_rewards(self):
        """The run's own rewards for the held-out evaluation of a data file (None: correctness only)."""
        data = self.config.data
        rewards = getattr(self, "rewards", None)
        return rewards if getattr(data, "path", None) and hasattr(rewards, "compute") else None


# Seconds of set-up (model and data loading) after which a run says what it is loading.
LOADING_NOTICE_S = 5.0

# Rewards that score a completion right (1) or wrong (0): their mean over held-out problems is an accuracy.
CORRECTNESS_REWARDS = ("exact-match", "numeric-match", "countdown")

# What restoring a checkpoint whose files parse but hold the wrong content raises (a missing key, a value of
# the wrong type or shape); SafetensorError too, for a tensor file whose data does not load.
RESTORE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, SafetensorError)


# The fp16 loss scale halves at every overflow; below this, no scale makes the gradients finite.
MIN_LOSS_SCALE = 2.0**-24


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 160 else text[:160] + "..."


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's moments must match their parameters: a wrong shape would only fail at the first step."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if name != "step" and (not isinstance(value, torch.Tensor) or value.shape != param.shape):
                    raise ValueError(f"optimizer state '{name}' does not match its parameter's shape")


def _check_state_shapes(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A saved optimiser state against the optimiser's parameters (their full shapes), before it is sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in state["state"].items():
        for name, value in values.items():
            if name != "step" and (not isinstance(value, torch.Tensor) or value.shape != params[int(index)].shape):
                raise ValueError(f"optimizer state '{name}' does not match its parameter's shape")


def _warn(message: str) -> None:
    """A warning: one stderr line, shown even with --quiet."""
    sys.stderr.write(f"rlgen: warning: {message}\n")
    sys.stderr.flush()


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value
