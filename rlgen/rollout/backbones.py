"""The built-in backbones (rlgen.models.backbone): causal LMs, defined here because their rollout engine
(HFEngine) is in this layer, and diffusers pipelines (rlgen.diffusion.backbone). Registered through the
`register_backbones` hook like any plugin's, causal LMs first."""
from __future__ import annotations

from pathlib import Path

import torch

from rlgen.diffusion.backbone import DIFFUSERS
from rlgen.hookspecs import hookimpl
from rlgen.models.backbone import LoadedModel, ReferencePolicy, build_reference
from rlgen.models.causal_lm import ModelConfig, is_peft, load_model, load_policy, resolve_model_path, save_hf
from rlgen.models.locate import is_causal_lm_dir
from rlgen.models.logprobs import token_logprobs
from rlgen.rollout.engine import HFEngine


class CausalLMBackbone:
    name = "causal-lm"
    description = "a Hugging Face causal LM (config.json; AutoModelForCausalLM + AutoTokenizer) or a LoRA adapter on one"

    def claims(self, path: Path) -> bool:
        return is_causal_lm_dir(path)

    def resolve(self, name_or_path: str) -> Path:
        return resolve_model_path(name_or_path)

    def load(self, model_config: ModelConfig) -> LoadedModel:
        model, tokenizer, path = load_policy(model_config)
        return LoadedModel(model, tokenizer, path)

    def save(self, handle: LoadedModel, out_dir: Path, merge_lora: bool = True) -> None:
        save_hf(handle.model, handle.tokenizer, out_dir, merge_lora=merge_lora)

    def reference_policy(self, handle: LoadedModel, model_config: ModelConfig) -> ReferencePolicy:
        """The LoRA base (adapter off), or the base model reloaded from `handle.path`: not a copy of the
        policy, which on resume holds the checkpoint's weights."""
        return build_reference(handle.model, has_adapter=is_peft(handle.model),
                               frozen_copy=lambda: load_model(handle.path, model_config.dtype),
                               logprobs=token_logprobs)

    def rollout_engine(self, handle: LoadedModel) -> HFEngine:
        return HFEngine(handle.model, handle.tokenizer)

    def sequence_logprobs(self, handle: LoadedModel, prompt_ids, prompt_mask, completion_ids, completion_mask,
                          temperature: float = 1.0, shared_prefix: bool = True) -> torch.Tensor:
        """Per-token log-probs [B, C] of right-padded completions after their left-padded prompts."""
        return token_logprobs(handle.model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature,
                              shared_prefix)


CAUSAL_LM = CausalLMBackbone()


@hookimpl
def register_backbones(register):
    register(CAUSAL_LM.name, CAUSAL_LM, CAUSAL_LM.description)
    register(DIFFUSERS.name, DIFFUSERS, DIFFUSERS.description)
