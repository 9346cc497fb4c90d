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
from rlgen.diffusion.sampling import initial_noise, sample
from rlgen.errors import RlgenError
from rlgen.rewards.base import RewardSet
from rlgen.config import section, setting
from rlgen.training.config import GroupRolloutConfig, OptimConfig


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
    def prepare_data(self) -> None:
        self.load_prompts()
        self.rewards = RewardSet(self.config.rewards)
        self.rewards.require_differentiable()
        self.eval_rewards = self.rewards
        self.params = self.config.sampling.params()
        if self.config.algorithm.backprop_steps > self.params.num_steps:
            raise RlgenError(f"algorithm.backprop_steps ({self.config.algorithm.backprop_steps}) exceeds sampling.num_steps ({self.params.num_steps})")

    def train_step(self) -> dict:
        a = self.config.algorithm
        started = time.perf_counter()
        picks = torch.randint(len(self.records), (self.config.rollout.prompts_per_step,), generator=self.generator)
        records = expand([self.records[int(i)] for i in picks], self.config.rollout.num_generations)
        k = a.backprop_steps if a.backprop_strategy == "fixed" else int(torch.randint(1, a.backprop_steps + 1, (1,), generator=self.generator))
        cond = self.model.conditioning([str(r["prompt"]) for r in records], records)
        null = self.model.null_conditioning(len(records)) if self.params.guidance_scale != 1.0 else None
        noise = initial_noise(self.model, len(records), self.generator)
        trajectory = sample(self.model, cond, null, self.params, self.generator, noise=noise, grad_last=k,
                            checkpointing=a.gradient_checkpointing, keep_trajectory=False)
        reward = self.rewards.differentiable_total(trajectory.images, records)
        loss = (reward - a.reward_target).abs().mean() if a.reward_target is not None else -reward.mean()
        self.backward(loss)
        grad_norm = self.optimizer_step()
        return {"loss": float(loss.detach()), "reward": float(reward.detach().mean()), "reward_std": float(reward.detach().std()),
                "backprop_steps": k, "grad_norm": grad_norm, "images_per_s": len(records) / (time.perf_counter() - started)}
