"""The sections every trainer's config is built from, declared once: model, data, optim, run (TrainConfig),
the rewards of reward-driven trainers (RewardedTrainConfig) and the rollout shape text and image trainers
share (GroupRolloutConfig: prompts_per_step x num_generations). An algorithm's config subclasses one of
these, adds its own sections (`algorithm`, `rollout`, ...) and re-declares a shared field only to give it
its own default (e.g. GRPO's lr 1e-6). Registry names in a config (task, advantage, loss_type, rewards,
combiner, shaping) are checked when it is loaded, so a typo fails before any data or model is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlgen.config import DROPOUT, NON_NEGATIVE, section, setting
from rlgen.devices import check_device_spec
from rlgen.errors import RlgenError
from rlgen.models.causal_lm import ModelConfig
from rlgen.plugins import registry
from rlgen.rewards.base import RewardSpec
from rlgen.rewards.combine import parse_spec
from rlgen.training.precision import Precision

# Closed choices, shared by the configs that use them (one spelling of each).
ScaleRewards = Literal["group", "batch", "none"]
LrScheduler = Literal["constant", "linear", "cosine"]
KernelMode = Literal["auto", "native", "torch", "reference"]  # rlgen.kernels.MODES
OnError = Literal["raise", "skip"]

# (config key, registry kind, name): a name a config asks a registry for
RegisteredName = tuple[str, str, str]


def check_registered(names: list[RegisteredName]) -> None:
    """One line naming the key, the unknown name and the known ones, for the first unknown name."""
    for key, kind, name in names:
        known = registry(kind)
        if name not in known:
            raise RlgenError(f"config key '{key}': unknown {kind} '{name}' (known: {', '.join(known.names()) or 'none'})")


def reward_names(key: str, rewards: list[RewardSpec]) -> list[RegisteredName]:
    """Registry look-ups of a rewards list: `module:function` and `rm:PATH` rewards are not registry names."""
    return [(f"{key}[{i}].name", "reward", spec.name) for i, spec in enumerate(rewards) if ":" not in spec.name]


def spec_names(key: str, kind: str, spec: str) -> list[RegisteredName]:
    """The registry look-up of a combiner / shaping spec ('NAME' or 'NAME:key=value,...'); "" = none."""
    if not spec.strip():
        return []
    try:
        name, _ = parse_spec(spec)
    except RlgenError as exc:
        raise RlgenError(f"config key '{key}': {exc}") from None
    return [(key, kind, name)]


@dataclass
class DataConfig:
    task: str | None = setting("arithmetic", "a built-in or plugin task (train and held-out splits); ignored when `path` is set")
    path: str | None = setting(None, "JSONL or Parquet with `prompt` (and `answer`) fields, instead of a task")
    split: str = setting("train", "the task's split to train on")
    eval_split: str = setting("test", "the task's held-out split")
    eval_samples: int = setting(200, "held-out problems scored greedily every run.eval_every steps")
    eval_path: str | None = setting(None, "held-out records (JSONL or Parquet, the training file's fields), evaluated every run.eval_every steps and never trained on")
    eval_fraction: float = setting(0.1, "with data.path and no data.eval_path: this fraction of the file, drawn with run.seed, is held out for the evaluation and never trained on (0 = no evaluation)", bounds=DROPOUT)
    prompt_field: str = setting("prompt", "the data file's column that holds the prompt (e.g. question)")
    answer_field: str = setting("answer", "the data file's column that holds the reference answer (exact-match's `answer`)")
    max_prompt_length: int = setting(0, "prompts longer than this many tokens are truncated (counted and logged); 0 = off", bounds=NON_NEGATIVE)
    prompt_truncation: Literal["left", "right"] = setting("left", "which end of a long prompt goes: left keeps its end (TRL's), right its start")
    chat_template: Literal["auto", "always", "never"] = setting("auto", "apply the tokenizer's chat template to prompts (a string or a list of messages) and completions: auto (when the tokenizer has one), always, never")
    system_prompt: str = setting("", "a system message put first in every prompt (with a chat template)")

    def registered_names(self) -> list[RegisteredName]:
        return [("data.task", "task", self.task)] if self.task and not self.path else []


@dataclass
class OptimConfig:
    lr: float = setting(1e-5, "peak learning rate (AdamW)")
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay")
    adam_beta1: float = setting(0.9, "AdamW's first-moment decay")
    adam_beta2: float = setting(0.999, "AdamW's second-moment decay")
    adam_eps: float = setting(1e-8, "AdamW's epsilon")
    max_grad_norm: float = setting(1.0, "gradient-norm clipping; 0 = no clipping")
    lr_scheduler: LrScheduler = setting("constant", "learning-rate schedule after the warm-up")
    warmup_steps: int = setting(0, "linear warm-up from 0 over this many steps")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimiser step")
    # The forward pads a micro-batch to its longest row: the budget counts rows x longest row (prompt + completion).
    max_tokens_per_micro_batch: int = setting(0, "token budget of each forward/backward micro-batch (rows x longest row, "
                                                 "balanced, split by token count); 0 = gradient_accumulation_steps decides",
                                              bounds=NON_NEGATIVE)
    # A NaN/inf gradient norm stops the run (the update is never applied) unless this is true.
    skip_nonfinite_steps: bool = setting(False, "skip updates whose gradient norm is NaN/inf (counted as `nonfinite_skipped`) instead of stopping")


@dataclass
class RunConfig:
    out: str = setting("runs/run", "run directory: config.toml, metrics.jsonl, checkpoints/, final/")
    steps: int = setting(100, "optimiser steps")
    seed: int = setting(0, "seed of every random draw (data order, sampling, init)")
    save_every: int = setting(0, "checkpoint every N steps; 0 = only the final model")
    keep_checkpoints: int = setting(0, "keep the newest N checkpoints; 0 = keep all")
    eval_every: int = setting(0, "held-out evaluation every N steps; 0 = none")
    threads: int = setting(0, "torch intra-op threads; 0 = torch's default")
    kernels: KernelMode = setting("auto", "log-prob kernels: auto (native where built), native, torch, or reference (eager, for debugging)")
    device: str = setting("auto", "where the model trains: auto (CUDA when available; under torchrun the GPU of LOCAL_RANK), cpu, cuda or cuda:N")
    precision: Precision = setting("fp32", "fp32 | bf16-mixed (bf16 autocast, fp32 master weights and AdamW states) | bf16 (bf16 weights) | fp16-mixed (fp16 autocast with a loss scaler)")
    distributed: Literal["ddp", "fsdp"] = setting("ddp", "multi-process data parallelism: ddp (every rank holds the whole model, gradients summed) | fsdp (FSDP2: weights, gradients and AdamW states sharded over the ranks)")
    reshard_after_forward: bool = setting(True, "fsdp: free each block's gathered weights after its forward (less memory; gathered again for the backward)")
    cpu_offload: bool = setting(False, "fsdp: keep the sharded weights, gradients and AdamW states in CPU memory (CUDA runs; the update runs on the CPU)")
    checkpoint_format: Literal["auto", "full", "sharded"] = setting("auto", "checkpoints: full (rank 0 gathers and writes the whole model, an HF directory, and the AdamW states) | sharded (each rank writes the rows it holds: nothing gathered; needs a file system every node writes to) | auto (sharded under fsdp, else full); both resume at any world size")
    report_to: list[str] = setting(doc="experiment trackers the metrics go to (rank 0): tensorboard | wandb (offline) | mlflow (local file store) | trackio (local) | plugin name; each writes under OUT/tracking/NAME", factory=list)
    log_completions_every: int = setting(0, "every N steps, a table of the step's sample completions (prompt, completion, rewards) to OUT/completions.jsonl and the trackers (GRPO family, online DPO); 0 = off", bounds=NON_NEGATIVE)

    def validate(self) -> None:
        check_device_spec(self.device, "run.device")
        twice = sorted({name for name in self.report_to if self.report_to.count(name) > 1})
        if twice:
            raise RlgenError(f"config key 'run.report_to': tracker '{twice[0]}' is listed twice")

    def registered_names(self) -> list[RegisteredName]:
        return [(f"run.report_to[{i}]", "tracker", name) for i, name in enumerate(self.report_to)]


@dataclass
class GroupRolloutConfig:
    """The batch shape of a rollout: `prompts_per_step` prompts, `num_generations` samples of each."""
    prompts_per_step: int = setting(16, "prompts sampled per step (groups per step)")
    num_generations: int = setting(8, "samples per prompt: the group size (TRL's num_generations)")


@dataclass
class TrainConfig:
    """What every trainer's config has. Subclasses replace `model` / `data` with their own section classes
    (image models, preference pairs) and change defaults by re-declaring a field."""
    model: ModelConfig = section(ModelConfig, "the model to train")
    data: DataConfig = section(DataConfig, "training and held-out data")
    optim: OptimConfig = section(OptimConfig, "optimiser and learning-rate schedule")
    run: RunConfig = section(RunConfig, "run directory, length, seed, checkpoints, evaluation")

    def registered_names(self) -> list[RegisteredName]:
        """Every registry name this config asks for: its sections' and its own (subclasses add theirs)."""
        names = []
        for value in vars(self).values():
            own = getattr(value, "registered_names", None)
            if own is not None:
                names += own()
        if isinstance(getattr(self, "rewards", None), list):
            names += reward_names("rewards", self.rewards)
        return names

    def validate(self) -> None:
        check_registered(self.registered_names())
        precision, dtype = getattr(self.run, "precision", "fp32"), getattr(self.model, "dtype", "float32")
        if precision.endswith("-mixed") and dtype != "float32":  # fp16 gradients cannot even be unscaled
            raise RlgenError(f"run.precision = {precision} keeps float32 master weights: model.dtype must be float32, "
                             f"not {dtype} (run.precision = bf16 trains bf16 weights)")


@dataclass
class RewardedTrainConfig(TrainConfig):
    """A trainer driven by rewards: which rewards, how they combine, what a failing reward does."""
    rewards: list[RewardSpec] = setting(doc="rewards scored on every sample ([[rewards]] tables: name, weight, options)", factory=list)
    rewards_on_error: OnError = setting("raise", "a reward that fails on a sample: stop (raise) or skip the sample (counted in the metrics)")
    # The gdpo advantage normalises the reward columns itself and ignores combine and shaping.
    reward_combine: str = setting("weighted-sum", "how the reward columns become one value: a reward-combiner spec (weighted-sum | min | mean | mean-minus-std:k=1.0 | plugin)")
    reward_shaping: str = setting("", "shaping of the combined reward before the advantages: a reward-shaping spec (par:ref_field=answer | center | clip:low=..,high=.. | ref-normalize | plugin); \"\" = none")

    def registered_names(self) -> list[RegisteredName]:
        return [*super().registered_names(), *spec_names("reward_combine", "reward-combiner", self.reward_combine),
                *spec_names("reward_shaping", "reward-shaping", self.reward_shaping)]
