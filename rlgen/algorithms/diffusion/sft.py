"""`rlgen train diffusion-sft`: the denoising objective on images (pre-training or fine-tuning a pipeline's
denoiser), with label / prompt dropout so classifier-free guidance works. The tiny-digits recipe uses it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlgen.algorithms.diffusion.base import DiffusionTrainer, EvalSamplingConfig, default_image_rewards
from rlgen.diffusion.objectives import denoising_errors, noised, sample_times
from rlgen.diffusion.pipeline import DiffusionModelConfig
from rlgen.errors import RlgenError
from rlgen.rewards.base import RewardSet, RewardSpec
from rlgen.training.trainer import OptimConfig, RunConfig


@dataclass
class ImageDataConfig:
    dataset: str | None = "digits"  # built-in image dataset (digits: scikit-learn's 8x8 handwritten digits)
    path: str | None = None  # JSONL with `image` (PNG path, relative to the file) and `prompt` fields
    split: str = "train"
    label_noise: float = 0.0  # built-in dataset: this fraction of examples gets a wrong class (a sloppy annotator)
    eval_task: str | None = "digits"  # prompts for the held-out evaluation (None = none)
    eval_split: str = "test"
    eval_samples: int = 200


@dataclass
class DiffusionSFTAlgoConfig:
    batch_size: int = 128
    cond_dropout: float = 0.1  # fraction of examples trained unconditionally (null class / empty prompt)
    time_density: str = "uniform"  # uniform | logit-normal (SD3)

    def validate(self):
        if self.time_density not in ("uniform", "logit-normal"):
            raise RlgenError("config key 'algorithm.time_density' must be uniform or logit-normal")
        if not 0 <= self.cond_dropout < 1:
            raise RlgenError("config key 'algorithm.cond_dropout' must be in [0, 1)")


@dataclass
class DiffusionSFTConfig:
    model: DiffusionModelConfig = field(default_factory=DiffusionModelConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    algorithm: DiffusionSFTAlgoConfig = field(default_factory=DiffusionSFTAlgoConfig)
    rewards: list[RewardSpec] = field(default_factory=default_image_rewards)  # for the held-out evaluation
    eval: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))
    run: RunConfig = field(default_factory=RunConfig)


def load_image_dataset(data: ImageDataConfig) -> tuple[torch.Tensor, list[dict]]:
    """(images [N, C, H, W] in [0, 1], records with `prompt` (and `label`))."""
    if data.path:
        from pathlib import Path

        from rlgen.data.records import read_records
        from rlgen.diffusion.images import sample_images

        records = read_records(data.path, required=("prompt", "image"))
        return sample_images(records, base_dir=Path(data.path).resolve().parent), records
    if data.dataset == "digits":
        from rlgen.diffusion.digits import CLASS_NAMES, load_digit_images

        images, labels = load_digit_images(data.split)
        return images, [{"prompt": CLASS_NAMES[int(c)], "label": int(c)} for c in sloppy_labels(labels, data.label_noise)]
    raise RlgenError(f"unknown image dataset {data.dataset!r} (built-in: digits; or give data.path)")


def sloppy_labels(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """A fixed `fraction` of the labels replaced by a different class, drawn with a fixed seed: the noisy
    annotations that leave the built-in base model imperfect, so that reward training has something to fix."""
    if not 0 <= fraction < 1:
        raise RlgenError("config key 'data.label_noise' must be in [0, 1)")
    generator = torch.Generator().manual_seed(seed)
    wrong = torch.rand(len(labels), generator=generator) < fraction
    shift = torch.randint(1, 10, (len(labels),), generator=generator)
    return torch.where(wrong, (labels + shift) % 10, labels)


class DiffusionSFTTrainer(DiffusionTrainer):
    def prepare_data(self) -> None:
        images, self.records = load_image_dataset(self.config.data)
        self.images = images  # pixels in [0, 1]; encoded once the model is loaded
        data = self.config.data
        if data.eval_task and data.eval_samples:
            from rlgen.plugins import registry

            self.eval_records = registry("task").get(data.eval_task).split(data.eval_split)[: data.eval_samples]
            self.eval_rewards = RewardSet(self.config.rewards)

    def prepare(self) -> None:
        super().prepare()
        self.images = self.model.encode(self.images, source=self.config.data.path or f"dataset {self.config.data.dataset}")

    def train_step(self) -> dict:
        a = self.config.algorithm
        index = torch.randint(len(self.records), (a.batch_size,), generator=self.generator)
        x0 = self.images[index].to(self.model.device)
        records = [self.records[int(i)] for i in index]
        cond = self.model.conditioning([r["prompt"] for r in records], records)
        if cond is not None and a.cond_dropout > 0:
            drop = torch.rand(a.batch_size, generator=self.generator) < a.cond_dropout
            null = self.model.null_conditioning(a.batch_size)
            cond = torch.where(drop.reshape(-1, *([1] * (cond.ndim - 1))).to(cond.device), null, cond)
        noise = torch.randn(x0.shape, generator=self.generator).to(x0.device)
        x_t, t, target = noised(self.model, x0, noise, sample_times(a.batch_size, self.generator, a.time_density))
        loss = denoising_errors(self.model.predict(x_t, t, cond), target).mean()
        loss.backward()
        grad_norm = self.optimizer_step()
        return {"loss": float(loss.detach()), "grad_norm": grad_norm}
