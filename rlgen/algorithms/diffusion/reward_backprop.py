"""`rlgen train reward-backprop`: AlignProp / DRaFT-K. Sample with the graph kept through the last K
denoising steps (each recomputed in backward under gradient checkpointing), score the images with a
differentiable reward and ascend its gradient directly; no log-probs, no advantages."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from rlgen.algorithms.diffusion.base import DiffusionTrainer, ImageTrainConfig, SamplingConfig
from rlgen.diffusion.generate import expand
from rlgen.diffusion.sampling import initial_noise, sample, step_noises
from rlgen.errors import RlgenError
from rlgen.rewards.base import RewardSet
from rlgen.config import section, setting
from rlgen.training.config import GroupRolloutConfig, OptimConfig
from rlgen.training.parts import summed_over_ranks


@dataclass
class RewardBackpropAlgoConfig:
    backprop_steps: int = setting(1, "K: gradients flow through the last K sampling steps (DRaFT-K; K = 1 is AlignProp's fixed:49)")
    backprop_strategy: Literal["fixed", "uniform"] = setting("fixed", "fixed: always K steps; uniform: K drawn in [1, backprop_steps] each step")
    gradient_checkpointing: bool = setting(True, "recompute each step in backward: the memory of one step instead of K")
    reward_target: float | None = setting(None, "AlignProp's |target - reward| loss; unset = maximise the reward")


@dataclass
class RewardBackpropConfig(ImageTrainConfig):
    rollout: GroupRolloutConfig = section(GroupRolloutConfig, "prompts and images per step", prompts_per_step=8, num_generations=4)
    sampling: SamplingConfig = section(SamplingConfig, "the sampler the reward is backpropagated through", eta=0.0, noise_level=0.0)
    algorithm: RewardBackpropAlgoConfig = section(RewardBackpropAlgoConfig, "how many sampling steps the gradient flows through, and the loss")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=1e-4))


class RewardBackpropTrainer(DiffusionTrainer):
    """Multi-process: every rank draws the single process's prompts, K and every noise tensor of the whole
    batch (initial and per-step, in its order) and samples its contiguous share of the images, so a rank's
    images are the single process's; the loss is divided by the global image count and the rewards are
    gathered for the metrics. Every rank holds at least one image, so under FSDP each runs the same
    denoiser forwards (one per sampling step)."""

    supports_distributed = True

    def prepare_data(self) -> None:
        self.load_prompts()
        self.rewards = RewardSet(self.config.rewards)
        self.rewards.require_differentiable()
        self.eval_rewards = self.rewards
        self.params = self.config.sampling.params()
        if self.config.algorithm.backprop_steps > self.params.num_steps:
            raise RlgenError(f"algorithm.backprop_steps ({self.config.algorithm.backprop_steps}) exceeds sampling.num_steps ({self.params.num_steps})")
        r = self.config.rollout
        if self.dist.enabled and r.prompts_per_step * r.num_generations < self.dist.world_size:
            raise RlgenError(f"rollout.prompts_per_step = {r.prompts_per_step} x rollout.num_generations = {r.num_generations} "
                             f"gives some of the {self.dist.world_size} processes no image: use at least one image per process")

    def train_step(self) -> dict:
        a = self.config.algorithm
        started = time.perf_counter()
        picks = torch.randint(len(self.records), (self.config.rollout.prompts_per_step,), generator=self.generator)
        records = expand([self.records[int(i)] for i in picks], self.config.rollout.num_generations)
        k = a.backprop_steps if a.backprop_strategy == "fixed" else int(torch.randint(1, a.backprop_steps + 1, (1,), generator=self.generator))
        n = len(records)  # the global batch's images
        if self.dist.enabled:  # the global batch's draws, in the single process's order, sliced to this rank's images
            span = self.dist.share(n)
            mine = slice(span.start, span.stop)
            noise = initial_noise(self.model, n, self.generator)[mine]
            steps = [s[mine] if s is not None else None for s in step_noises(self.model, self.params, n, self.generator)]
            records = records[mine]
        else:
            noise, steps = None, None
        cond = self.model.conditioning([str(r["prompt"]) for r in records], records)
        null = self.model.null_conditioning(len(records)) if self.params.guidance_scale != 1.0 else None
        if noise is None:
            noise = initial_noise(self.model, len(records), self.generator)
        trajectory = sample(self.model, cond, null, self.params, self.generator, noise=noise, grad_last=k,
                            checkpointing=a.gradient_checkpointing, keep_trajectory=False, step_noise=steps)
        reward = self.rewards.differentiable_total(trajectory.images, records)
        if self.dist.enabled:  # this rank's part of the global mean; metrics of the gathered rewards
            loss = ((reward - a.reward_target).abs() if a.reward_target is not None else -reward).sum() / n
            self.backward(loss)
            loss_value = summed_over_ranks(self.dist, {"loss": float(loss.detach())})["loss"]
            rewards = self.dist.all_gather_rows(reward.detach())
        else:
            loss = (reward - a.reward_target).abs().mean() if a.reward_target is not None else -reward.mean()
            self.backward(loss)
            loss_value, rewards = float(loss.detach()), reward.detach()
        grad_norm = self.optimizer_step()
        return {"loss": loss_value, "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
                "backprop_steps": k, "grad_norm": grad_norm, "images_per_s": n / (time.perf_counter() - started)}

