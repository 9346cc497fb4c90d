"""rlgen as a library: the flows the `rlgen` commands run, callable from Python.

    import rlgen

    run = rlgen.train("grpo", model="tiny-arith", **{"data.task": "arithmetic", "run.steps": 2, "run.out": "runs/a"})
    samples = rlgen.sample(run.final_model, task="arithmetic", n=4, limit=10)
    scored = rlgen.score(samples, ["exact-match"])
    rlgen.evaluate(scored)

Every public name is listed in `__all__` and loaded on first use, so `import rlgen` stays light (no torch).
Besides the flows, a few lower-level pieces are exported deliberately for rlgen's benchmarks and recipes
(rlgen.api._toolkit): they are the only internals a script outside the package should need.
"""
from __future__ import annotations

import importlib

# public name -> (module, attribute or None for the module itself)
_EXPORTS = {
    # flows
    "load_config": ("rlgen.api._config", "load_config"),
    "train": ("rlgen.api._train", "train"),
    "build_trainer": ("rlgen.api._train", "build_trainer"),
    "Run": ("rlgen.api._train", "Run"),
    "sample": ("rlgen.api._sample", "sample"),
    "prompt_records": ("rlgen.api._sample", "prompt_records"),
    "score": ("rlgen.api._score", "score"),
    "pairs": ("rlgen.api._score", "pairs"),
    "pair_stats": ("rlgen.api._score", "pair_stats"),
    "evaluate": ("rlgen.api._evaluate", "evaluate"),
    "serve": ("rlgen.api._serve", "serve"),
    "merge": ("rlgen.api._merge", "merge"),
    "merge_config": ("rlgen.api._merge", "merge_config"),
    "SweepSettings": ("rlgen.api.merge_sweep", "SweepSettings"),
    "run_sweep": ("rlgen.api.merge_sweep", "run_sweep"),
    # events
    "Callback": ("rlgen.events", "Callback"),
    "Events": ("rlgen.events", "Events"),
    "RlgenError": ("rlgen.errors", "RlgenError"),
    # for plugin authors: what a trainer is built from, the backbone protocol, the extension contracts
    "Algorithm": ("rlgen.algorithms.base", "Algorithm"),
    "Trainer": ("rlgen.training.trainer", "Trainer"),
    "TrainConfig": ("rlgen.training.config", "TrainConfig"),
    "RewardedTrainConfig": ("rlgen.training.config", "RewardedTrainConfig"),
    "ModelConfig": ("rlgen.training.config", "ModelConfig"),
    "DataConfig": ("rlgen.training.config", "DataConfig"),
    "OptimConfig": ("rlgen.training.config", "OptimConfig"),
    "RunConfig": ("rlgen.training.config", "RunConfig"),
    "RolloutConfig": ("rlgen.algorithms.grpo", "RolloutConfig"),  # prompts x generations + sampling settings
    "setting": ("rlgen.config", "setting"),  # a config field with its one-line doc (`rlgen config show`)
    "section": ("rlgen.config", "section"),
    "load_records": ("rlgen.training.trainer", "load_records"),  # a DataConfig's split as records
    "PromptSampler": ("rlgen.training.data", "PromptSampler"),  # seeded, resumable prompt batches
    "RewardSet": ("rlgen.rewards.base", "RewardSet"),
    "RewardSpec": ("rlgen.rewards.base", "RewardSpec"),
    "SamplingParams": ("rlgen.rollout.engine", "SamplingParams"),
    "Rollouts": ("rlgen.rollout.engine", "Rollouts"),  # what an engine returns: prompts, token ids, masks, texts
    "HFEngine": ("rlgen.rollout.engine", "HFEngine"),  # rlgen's KV-cached sampling loop over a causal LM
    "VLLMEngine": ("rlgen.rollout.vllm_engine", "VLLMEngine"),  # the same contract over a colocated vLLM engine
    "build_text_engine": ("rlgen.rollout.engines", "build_text_engine"),  # "hf" | "vllm" over a loaded model
    "checkpoint_weights": ("rlgen.models.causal_lm", "checkpoint_weights"),  # (name, tensor) as in the HF checkpoint
    "RolloutBatch": ("rlgen.rollout.groups", "RolloutBatch"),
    "GroupRollout": ("rlgen.rollout.groups", "GroupRollout"),
    "ModelInputs": ("rlgen.rollout.groups", "ModelInputs"),
    "PairEncoder": ("rlgen.training.parts", "PairEncoder"),
    "PairwiseUpdate": ("rlgen.algorithms.parts", "PairwiseUpdate"),
    "sequence_logps": ("rlgen.algorithms.parts", "sequence_logps"),
    # token-budget micro-batching (optim.max_tokens_per_micro_batch) for plugin trainers' passes
    "micro_batches": ("rlgen.training.micro_batches", "micro_batches"),
    "row_costs": ("rlgen.training.micro_batches", "row_costs"),
    "group_units": ("rlgen.training.micro_batches", "group_units"),
    "pair_units": ("rlgen.training.micro_batches", "pair_units"),
    "map_micro_batches": ("rlgen.training.micro_batches", "map_micro_batches"),
    "make_pairs": ("rlgen.data.preferences", "make_pairs"),
    "Backbone": ("rlgen.models.backbone", "Backbone"),
    "LoadedModel": ("rlgen.models.backbone", "LoadedModel"),
    "ReferencePolicy": ("rlgen.models.backbone", "ReferencePolicy"),
    "backbone_for": ("rlgen.models.backbone", "backbone_for"),
    "Capabilities": ("rlgen.extension", "Capabilities"),
    "declare": ("rlgen.extension", "declare"),
    "check_options": ("rlgen.extension", "check_options"),
    # for the benchmarks and recipes
    "task_records": ("rlgen.api._toolkit", "task_records"),
    "resolve_model_path": ("rlgen.api._toolkit", "resolve_model_path"),
    "resolve_pipeline_path": ("rlgen.api._toolkit", "resolve_pipeline_path"),
    "load_model": ("rlgen.api._toolkit", "load_model"),
    "load_tokenizer": ("rlgen.api._toolkit", "load_tokenizer"),
    "build_char_tokenizer": ("rlgen.api._toolkit", "build_char_tokenizer"),
    "digit_class_names": ("rlgen.api._toolkit", "digit_class_names"),
    "train_digit_classifier": ("rlgen.api._toolkit", "train_digit_classifier"),
    "save_digit_classifier": ("rlgen.api._toolkit", "save_digit_classifier"),
    "kernels": ("rlgen.kernels", None),  # fused log-prob kernels and their backend switch (kernels.use)
    "native": ("rlgen._native", None),  # the compiled extension (ImportError when it was not built)
    "SafetensorsCheckpoint": ("rlgen.merging.safetensors_io", "Checkpoint"),  # memory-mapped reader of a model dir
    "ShardedWriter": ("rlgen.merging.safetensors_io", "ShardedWriter"),  # streaming safetensors shard writer
    "parse_size": ("rlgen.merging.safetensors_io", "parse_size"),  # "2GB" -> bytes
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    try:
        module_name, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'rlgen.api' has no attribute '{name}'") from None
    value = importlib.import_module(module_name)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
