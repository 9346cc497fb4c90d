"""`rlgen train diffusion-dpo`: Diffusion-DPO on preference pairs of images (`prompt`, `chosen`, `rejected`
PNG paths, e.g. from `rlgen sample ... | rlgen score | rlgen pairs`). Both images of a pair are noised with
the same noise at the same time (in the VAE's latent space for latent pipelines); the policy's denoising
error gap is compared with the reference's."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

import torch

from rlgen.algorithms.diffusion.base import DiffusionTrainer, ImageTrainConfig, TimeDensity
from rlgen.data.preferences import read_pairs
from rlgen.diffusion.images import sample_images
from rlgen.diffusion.objectives import denoising_errors, diffusion_dpo_loss, noised, sample_times
from rlgen.errors import RlgenError
from rlgen.plugins import registry
from rlgen.rewards.base import RewardSet
from rlgen.config import section, setting
from rlgen.training.config import OptimConfig, RegisteredName
from rlgen.training.parts import summed_over_ranks


@dataclass
class PairDataConfig:
    path: str | None = setting(None, "JSONL with prompt, chosen, rejected (PNG paths, relative to the file)")
    task: str | None = setting("digits", "a prompt task whose held-out split the evaluation samples for")
    eval_split: str = setting("test", "the task's held-out split")
    eval_samples: int = setting(200, "held-out prompts of the evaluation; 0 = none")

    def registered_names(self) -> list[RegisteredName]:
        return [("data.task", "task", self.task)] if self.task else []


@dataclass
class DiffusionDPOAlgoConfig:
    # the loss scales beta by -1/2 as the SDXL script does, whose default (5000) this is; the SD1.5 script
    # has no 1/2 and defaults to 2500: the same effective 2500 on the error gaps
    beta: float = setting(5000.0, "inverse temperature on the denoising-error gaps (SDXL script's convention, > 0)")
    loss_type: Literal["sigmoid", "hinge"] = setting("sigmoid", "Diffusion-DPO loss")
    batch_size: int = setting(32, "pairs per step")
    time_density: TimeDensity = setting("uniform", "how training noise levels are drawn (logit-normal: SD3)")


@dataclass
class DiffusionDPOConfig(ImageTrainConfig):
    data: PairDataConfig = section(PairDataConfig, "image preference pairs and the held-out prompts")
    algorithm: DiffusionDPOAlgoConfig = section(DiffusionDPOAlgoConfig, "Diffusion-DPO's loss options")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))


def read_image_pairs(path: str) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """(records, chosen [P,C,H,W], rejected [P,C,H,W]) in [0, 1]; problems name the file and line."""
    pairs = read_pairs(path)
    base = Path(path).resolve().parent
    chosen = sample_images([{"image": p["chosen"]} for p in pairs], base_dir=base)
    rejected = sample_images([{"image": p["rejected"]} for p in pairs], base_dir=base)
    return pairs, chosen, rejected


class DiffusionDPOTrainer(DiffusionTrainer):
    """Multi-process: every rank draws the single process's whole batch of pairs, noise and times and trains
    on its contiguous share of the pairs, the loss and metrics divided by the global batch size (under FSDP
    the base trainer's equal shares give every rank the same policy and reference forwards)."""

    supports_distributed = True

    def prepare_data(self) -> None:
        data = self.config.data
        if not data.path:
            raise RlgenError("no pairs: give --data PAIRS.jsonl (prompt, chosen, rejected image paths)")
        self.pairs, chosen, rejected = read_image_pairs(data.path)
        self.chosen, self.rejected = chosen, rejected  # pixels in [0, 1]; encoded once the model is loaded
        if data.task and data.eval_samples:
            self.eval_records = registry("task").get(data.task).split(data.eval_split)[: data.eval_samples]
        self.eval_rewards = RewardSet(self.config.rewards)
        if self.dist.enabled and self.config.algorithm.batch_size < self.dist.world_size:
            raise RlgenError(f"algorithm.batch_size = {self.config.algorithm.batch_size} gives some of the "
                             f"{self.dist.world_size} processes no pair: use at least one pair per process")

    def needs_reference(self) -> bool:
        return True  # FSDP: the frozen copy is made before the denoiser is sharded

    def prepare(self) -> None:
        super().prepare()
        source = f"{self.config.data.path}: pair images"
        self.chosen = self.model.encode(self.chosen, source=source)
        self.rejected = self.model.encode(self.rejected, source=source)
        self.model.check_prompts(self.pairs)
        self.reference = self.reference_policy()  # run by predict(reference=True)

    def train_step(self) -> dict:
        a = self.config.algorithm
        # draws from the run's CPU generator (checkpointed), moved to the model's device: the same batch on any
        # device. Every draw is of the global batch, in the single process's order; a rank keeps its pairs `mine`.
        rows = torch.randint(len(self.pairs), (a.batch_size,), generator=self.generator)
        span = self.dist.share(a.batch_size)
        mine = slice(span.start, span.stop)
        rows = rows[mine]
        records = [self.pairs[int(i)] for i in rows]
        x0 = torch.cat([self.chosen[rows], self.rejected[rows]]).to(self.model.device)
        noise = torch.randn((a.batch_size, *x0.shape[1:]), generator=self.generator)[mine].repeat(2, 1, 1, 1).to(x0.device)
        u = sample_times(a.batch_size, self.generator, a.time_density)[mine].repeat(2)
        cond = self.model.conditioning([str(r["prompt"]) for r in records] * 2, records * 2)
        x_t, t, target = noised(self.model, x0, noise, u)
        policy = denoising_errors(self.model.predict(x_t, t, cond), target)
        with torch.no_grad():
            reference = denoising_errors(self.model.predict(x_t, t, cond, reference=True), target)
        losses, inside = diffusion_dpo_loss(policy, reference, a.beta, a.loss_type)
        inside, chosen, rejected = inside.detach(), *policy.detach().chunk(2)
        accuracy = (inside > 0).float() + 0.5 * (inside == 0).float()
        if not self.dist.enabled:  # one process: the batch means as ever
            loss = losses.mean()
            self.backward(loss)
            metrics = {"loss": float(loss.detach()), "implicit_acc": float(accuracy.mean()), "inside_mean": float(inside.mean()),
                       "mse_chosen": float(chosen.mean()), "mse_rejected": float(rejected.mean())}
        else:  # this rank's part of each global mean, summed over the ranks
            loss = losses.sum() / a.batch_size
            self.backward(loss)
            sums = {"loss": float(loss.detach()), "implicit_acc": float(accuracy.sum()), "inside_mean": float(inside.sum()),
                    "mse_chosen": float(chosen.sum()), "mse_rejected": float(rejected.sum())}
            metrics = {key: value if key == "loss" else value / a.batch_size
                       for key, value in summed_over_ranks(self.dist, sums).items()}
        metrics["grad_norm"] = self.optimizer_step()
        return metrics
