"""`rlgen train diffusion-sft`: the denoising objective on images (pre-training or fine-tuning a pipeline's
denoiser), with label / prompt dropout so classifier-free guidance works. The tiny-digits recipe uses it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from rlgen.algorithms.diffusion.base import DiffusionTrainer, ImageTrainConfig, TimeDensity
from rlgen.data.records import read_records
from rlgen.diffusion.digits import CLASS_NAMES, load_digit_images
from rlgen.diffusion.images import sample_images
from rlgen.diffusion.objectives import denoising_errors, noised, sample_times
from rlgen.errors import RlgenError
from rlgen.plugins import registry
from rlgen.rewards.base import RewardSet
from rlgen.config import section, setting
from rlgen.training.config import OptimConfig, RegisteredName
from rlgen.training.parts import summed_over_ranks


@dataclass
class ImageDataConfig:
    dataset: Literal["digits"] | None = setting("digits", "built-in image dataset (digits: scikit-learn's 8x8 handwritten digits); ignored when `path` is set")
    path: str | None = setting(None, "JSONL with `image` (PNG path, relative to the file) and `prompt` fields")
    split: str = setting("train", "the built-in dataset's split to train on")
    label_noise: float = setting(0.0, "built-in dataset: this fraction of examples gets a wrong class (a sloppy annotator)")
    eval_task: str | None = setting("digits", "prompts for the held-out evaluation (unset = none)")
    eval_split: str = setting("test", "the evaluation task's held-out split")
    eval_samples: int = setting(200, "held-out prompts of the evaluation; 0 = none")

    def registered_names(self) -> list[RegisteredName]:
        return [("data.eval_task", "task", self.eval_task)] if self.eval_task else []


@dataclass
class DiffusionSFTAlgoConfig:
    batch_size: int = setting(128, "images per optimiser step")
    cond_dropout: float = setting(0.1, "fraction of examples trained unconditionally (null class / empty prompt), for guidance")
    time_density: TimeDensity = setting("uniform", "how training noise levels are drawn (logit-normal: SD3)")


@dataclass
class DiffusionSFTConfig(ImageTrainConfig):
    data: ImageDataConfig = section(ImageDataConfig, "images to train on and the held-out prompts")
    algorithm: DiffusionSFTAlgoConfig = section(DiffusionSFTAlgoConfig, "batch size, label dropout, noise-level density")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))


def load_image_dataset(data: ImageDataConfig) -> tuple[torch.Tensor, list[dict]]:
    """(images [N, C, H, W] in [0, 1], records with `prompt` (and `label`))."""
    if data.path:
        from pathlib import Path

        records = read_records(data.path, required=("prompt", "image"))
        return sample_images(records, base_dir=Path(data.path).resolve().parent), records
    if data.dataset == "digits":
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
    """Multi-process: every rank draws the single process's whole batch (images, label dropout, noise, times)
    and trains on its contiguous share of the rows, the loss divided by the global batch size, so the
    gradients summed over ranks are the single process's."""

    supports_distributed = True

    def prepare_data(self) -> None:
        images, self.records = load_image_dataset(self.config.data)
        self.images = images  # pixels in [0, 1]; encoded once the model is loaded
        data = self.config.data
        if data.eval_task and data.eval_samples:
            self.eval_records = registry("task").get(data.eval_task).split(data.eval_split)[: data.eval_samples]
            self.eval_rewards = RewardSet(self.config.rewards)
        if self.dist.enabled and self.config.algorithm.batch_size < self.dist.world_size:
            raise RlgenError(f"algorithm.batch_size = {self.config.algorithm.batch_size} gives some of the "
                             f"{self.dist.world_size} processes no image: use at least one image per process")

    def prepare(self) -> None:
        super().prepare()
        self.images = self.model.encode(self.images, source=self.config.data.path or f"dataset {self.config.data.dataset}")

    def train_step(self) -> dict:
        a = self.config.algorithm
        # draws from the run's CPU generator (checkpointed), moved to the model's device: the same batch on any
        # device. Every draw is of the global batch, in the single process's order; a rank keeps its rows `mine`.
        index = torch.randint(len(self.records), (a.batch_size,), generator=self.generator)
        span = self.dist.share(a.batch_size)
        mine = slice(span.start, span.stop)
        x0 = self.images[index[mine]].to(self.model.device)  # the encoded dataset stays on the CPU
        records = [self.records[int(i)] for i in index[mine]]
        cond = self.model.conditioning([r["prompt"] for r in records], records)
        if cond is not None and a.cond_dropout > 0:
            drop = (torch.rand(a.batch_size, generator=self.generator) < a.cond_dropout)[mine]
            null = self.model.null_conditioning(len(records))
            cond = torch.where(drop.reshape(-1, *([1] * (cond.ndim - 1))).to(cond.device), null, cond)
        noise = torch.randn((a.batch_size, *x0.shape[1:]), generator=self.generator)[mine].to(x0.device)
        x_t, t, target = noised(self.model, x0, noise, sample_times(a.batch_size, self.generator, a.time_density)[mine])
        errors = denoising_errors(self.model.predict(x_t, t, cond), target)
        # one process: the batch mean as ever; several: this rank's part of the global mean
        loss = errors.sum() / a.batch_size if self.dist.enabled else errors.mean()
        self.backward(loss)
        grad_norm = self.optimizer_step()
        return {"loss": summed_over_ranks(self.dist, {"loss": float(loss.detach())})["loss"], "grad_norm": grad_norm}
