"""The diffusers backbone: local diffusers pipeline directories (model_index.json), sampled by
rlgen.diffusion.sampling, with per-denoising-step log-probs for the policy-gradient trainers."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from rlgen.diffusion.generate import generate_images, rollout
from rlgen.diffusion.pipeline import (DiffusionModel, DiffusionModelConfig, load_diffusion_model,
                                      resolve_pipeline_path)
from rlgen.diffusion.sampling import DiffusionSamplingParams, denoise_step
from rlgen.models.backbone import LoadedModel, ReferencePolicy, build_reference
from rlgen.models.locate import is_diffusion_dir


@dataclass
class ImageSampler:
    """The diffusers backbone's rollout engine: records (with `prompt`) -> sampled images."""

    model: DiffusionModel

    def generate(self, records: list[dict], n: int, params: DiffusionSamplingParams, seed: int = 0,
                 batch_size: int = 64, progress=None) -> list[dict]:
        """n images per record, deterministic given the seed and batch size (`rlgen sample`, `rlgen eval`)."""
        return generate_images(self.model, records, n, params, seed=seed, batch_size=batch_size, progress=progress)

    def rollout(self, records: list[dict], params: DiffusionSamplingParams, generator: torch.Generator | None, **options):
        """One batch with its trajectory (latents and per-step log-probs) for training."""
        return rollout(self.model, records, params, generator, **options)


def step_logprobs(model: DiffusionModel, schedule, index, x, cond, null, params: DiffusionSamplingParams,
                  prev_sample: torch.Tensor, reference: bool = False) -> torch.Tensor:
    """[B] log-probs of the step x -> prev_sample at schedule position `index` (the policy-gradient
    trainers' per-step log-probs; `reference` runs the model's reference policy)."""
    return denoise_step(model, schedule, index, x, cond, null, params, prev_sample=prev_sample,
                        reference=reference).log_prob


class DiffusersBackbone:
    name = "diffusers"
    description = "a diffusers pipeline (model_index.json; UNet denoisers, DDPM-family or flow-matching schedulers)"
    usage = ("use it with a diffusion algorithm (ddpo, flow-grpo, reward-backprop, diffusion-dpo, diffusion-sft) "
             "or `rlgen sample`")

    def claims(self, path: Path) -> bool:
        return is_diffusion_dir(path)

    def resolve(self, name_or_path: str) -> Path:
        return resolve_pipeline_path(name_or_path)

    def load(self, model_config: DiffusionModelConfig) -> LoadedModel:
        model = load_diffusion_model(model_config)
        return LoadedModel(model, None, model.path)

    def save(self, handle: LoadedModel, out_dir: Path, merge_lora: bool = True) -> None:
        handle.model.save(out_dir, merge_lora=merge_lora)

    def reference_policy(self, handle: LoadedModel, model_config=None) -> ReferencePolicy:
        """The denoiser with its LoRA adapter off, or a frozen copy of it; the pipeline's
        `predict(..., reference=True)` then runs it. The copy is of the denoiser as it is now: trainers
        build it before a full fine-tuning run's checkpoint weights are restored."""
        model: DiffusionModel = handle.model

        def reference_logprobs(_denoiser, *args, **kwargs):
            return step_logprobs(model, *args, reference=True, **kwargs)

        model.reference = build_reference(model.denoiser, has_adapter=model.lora,
                                          frozen_copy=lambda: copy.deepcopy(model.base_denoiser),
                                          logprobs=reference_logprobs)
        return model.reference

    def rollout_engine(self, handle: LoadedModel) -> ImageSampler:
        return ImageSampler(handle.model)

    def sequence_logprobs(self, handle: LoadedModel, *args, **kwargs) -> torch.Tensor:
        """Per-step log-probs: `step_logprobs(model, schedule, index, x, cond, null, params, prev_sample)`."""
        return step_logprobs(handle.model, *args, **kwargs)


DIFFUSERS = DiffusersBackbone()
