"""`rlgen train ddpo` and `rlgen train flow-grpo`: PPO-clipped policy gradient over denoising steps.

Each step: sample `prompts_per_step` prompts x `num_generations` images with a stochastic sampler,
keeping every step's latents and log-probs; score the images; turn rewards into advantages (DDPO:
per-prompt statistics; Flow-GRPO: group z-scores from the advantage-estimator registry), clip them; then
re-run the denoiser on the stored (x_t, t) and apply the clipped surrogate to each (sample, step) pair,
plus Flow-GRPO's KL to the reference denoiser when beta > 0.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from rlgen.algorithms.diffusion.base import DiffusionTrainer, ImageTrainConfig, SamplingConfig
from rlgen.algorithms.contracts import ADVANTAGE_ESTIMATOR_DEFAULTS, AdvantageInput, estimate_advantages
from rlgen.algorithms.losses import LossContext, clipped_surrogate
from rlgen.diffusion.generate import expand, rollout
from rlgen.diffusion.sampling import denoise_step, initial_noise, make_schedule, step_noises, stochastic
from rlgen.diffusion.stat_tracking import PerPromptStatTracker
from rlgen.diffusion.steps import step_kl
from rlgen.errors import RlgenError
from rlgen.extension import capabilities
from rlgen.plugins import registry
from rlgen.rewards.base import RewardSet, counted
from rlgen.rollout.groups import scored
from rlgen.config import POSITIVE, section, setting
from rlgen.training.parts import summed_over_ranks
from rlgen.training.config import GroupRolloutConfig, OptimConfig, RegisteredName, RewardedTrainConfig, ScaleRewards

PER_PROMPT = "per-prompt"  # DDPO's stat tracker; any other name is an advantage-estimator registry entry


@dataclass
class DiffusionRolloutConfig(GroupRolloutConfig):
    prompts_per_step: int = 8
    num_generations: int = 8  # Flow-GRPO's num_image_per_prompt
    batch_size: int = setting(64, "images per sampling forward pass")
    same_noise_in_group: bool = setting(False, "one initial noise per group (DanceGRPO's init_same_noise)")


@dataclass
class DiffusionPGAlgoConfig:
    advantage: str = setting("grpo", "advantage: per-prompt (DDPO's stat tracking) or an advantage-estimator name (grpo | rloo | ... | plugin)")
    scale_rewards: ScaleRewards = setting("group", "reward standard-deviation scaling: per group, over the batch (Flow-GRPO's global_std), or none")
    stat_buffer_size: int = setting(16, "per-prompt tracking: rewards kept per prompt")
    stat_min_count: int = setting(16, "per-prompt tracking: batch statistics until a prompt has this many rewards")
    # tiny: the per-step log-probs are means over pixels
    epsilon: float = setting(1e-4, "PPO clip on the per-step ratio: [1 - epsilon, 1 + epsilon]", bounds=POSITIVE)
    adv_clip_max: float = setting(5.0, "advantages are clipped to [-adv_clip_max, adv_clip_max]")
    beta: float = setting(0.0, "KL coefficient to the reference denoiser (LoRA off, or a frozen copy); 0 = none")
    timestep_fraction: float = setting(1.0, "train on the first fraction of the (stochastic) denoising steps")
    num_inner_epochs: int = setting(1, "passes over each rollout")
    updates_per_step: int = setting(1, "optimiser steps per rollout: the samples are split into this many parts")
    train_batch_size: int = setting(64, "samples per training forward pass")
    shuffle_timesteps: bool = setting(False, "train each sample's steps in its own random order (DDPO)")
    skip_zero_advantage: bool = setting(True, "drop samples whose advantage is 0, i.e. all-equal groups (Flow-GRPO)")

    def registered_names(self) -> list[RegisteredName]:
        return [] if self.advantage == PER_PROMPT else [("algorithm.advantage", "advantage-estimator", self.advantage)]


@dataclass
class DiffusionPGConfig(ImageTrainConfig, RewardedTrainConfig):
    rollout: DiffusionRolloutConfig = section(DiffusionRolloutConfig, "prompts and images per step (the groups)")
    sampling: SamplingConfig = section(SamplingConfig, "the stochastic sampler of the training rollouts")
    algorithm: DiffusionPGAlgoConfig = section(DiffusionPGAlgoConfig, "advantages, PPO clip, KL and update schedule")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=1e-4))


class DiffusionPolicyGradientTrainer(DiffusionTrainer):
    """Multi-process ("draw globally, compute locally"): every rank draws the global prompts and every noise
    tensor of the single process, in its order, and samples only the images of its share of the groups
    (`dist.share(prompts_per_step)`), so a rank's images are the single process's. Rewards are gathered, and
    the advantages and metrics computed on the global batch on every rank; the update follows the single
    process's layout of micro-batches, each rank back-propagating its rows' share of every micro-batch's loss."""

    supports_distributed = True

    def prepare_data(self) -> None:
        cfg = self.config
        self.load_prompts()
        self.rewards = RewardSet(cfg.rewards, cfg.rewards_on_error, cfg.reward_combine, cfg.reward_shaping)
        self.eval_rewards = self.rewards
        self.params = cfg.sampling.params()
        a = cfg.algorithm
        if a.advantage == PER_PROMPT:
            self.tracker = PerPromptStatTracker(a.stat_buffer_size, a.stat_min_count)
        else:
            self.tracker = None
            self.advantage_fn = registry("advantage-estimator").get(a.advantage)
            if capabilities(self.advantage_fn, ADVANTAGE_ESTIMATOR_DEFAULTS).needs_greedy_baseline:
                raise RlgenError(f"advantage '{a.advantage}' needs a greedy baseline, which image models do not have")
        self._order: list[int] = []
        if self.dist.enabled:
            self.check_distributed()

    def check_distributed(self) -> None:
        """What multi-process training cannot do, refused before the model loads."""
        cfg = self.config
        world = self.dist.world_size
        if cfg.rollout.prompts_per_step < world:
            raise RlgenError(f"rollout.prompts_per_step = {cfg.rollout.prompts_per_step} gives some of the {world} processes "
                             "no prompt: use at least one prompt per process")
        shaping = self.rewards.shaping
        if shaping is not None and shaping.estimate is not None and any(
                shaping.options.get(key) is None for key in shaping.estimate(torch.zeros(2))):
            raise RlgenError(f"reward_shaping = '{cfg.reward_shaping}' estimates its statistics from a rank's first batch, "
                             "which differs between processes: give them as options (e.g. ref-normalize:mean=..,std=..)")

    def needs_reference(self) -> bool:
        return self.config.algorithm.beta > 0

    def prepare(self) -> None:
        super().prepare()
        # the KL term's reference: the pipeline's predict(reference=True) runs it
        self.reference = self.reference_policy() if self.config.algorithm.beta > 0 else None
        self.train_steps = self._trained_steps()
        self.schedule = make_schedule(self.model, self.params.num_steps).to(self.device)  # the rollouts' step coefficients

    def _trained_steps(self) -> list[int]:
        """Step indices trained on: the stochastic ones (an SDE window restricts them), the first fraction."""
        noisy = [i for i in range(self.params.num_steps) if stochastic(self.params, i)]
        keep = max(1, int(len(noisy) * self.config.algorithm.timestep_fraction))
        if not noisy or (self.params.eta if self.model.family == "ddim" else self.params.noise_level) == 0:
            raise RlgenError("training needs a stochastic sampler: sampling.eta (DDPM family) or sampling.noise_level (flow) > 0")
        return noisy[:keep]

    def extra_state(self) -> dict:
        state = {"order": self._order, "rewards": self.rewards.state()}
        if self.tracker is not None:
            state["stat_tracker"] = self.tracker.state()
        return state

    def restore_extra_state(self, state: dict) -> None:
        self._order = state.get("order", [])
        self.rewards.restore(state.get("rewards", {}))
        if self.tracker is not None:
            self.tracker.restore(state.get("stat_tracker", {}))

    def _next_prompts(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if not self._order:
                self._order = torch.randperm(len(self.records), generator=self.generator).tolist()
            out.append(self.records[self._order.pop()])
        return out

    # --- one step: rollout, rewards, advantages, update ---
    def _collect(self):
        """(the global records, this rank's rollouts, the range of global rows they hold)."""
        cfg = self.config
        r = cfg.rollout
        records = expand(self._next_prompts(r.prompts_per_step), r.num_generations)
        groups = self.dist.share(r.prompts_per_step)  # a group's images stay on one rank
        mine = range(groups.start * r.num_generations, groups.stop * r.num_generations)
        self.model.eval()
        rollouts = []
        group_noise = None
        if r.same_noise_in_group:  # one initial noise per prompt group
            group_noise = initial_noise(self.model, r.prompts_per_step, self.generator)
        for start in range(0, len(records), r.batch_size):
            part = records[start : start + r.batch_size]
            noise = None
            if group_noise is not None:
                noise = group_noise[[(start + i) // r.num_generations for i in range(len(part))]]
            with torch.no_grad():
                if not self.dist.enabled:
                    rollouts.append(rollout(self.model, part, self.params, self.generator, noise=noise))
                    continue
                own = self._rollout_share(part, range(max(mine.start - start, 0), min(mine.stop - start, len(part))), noise)
                if own is not None:
                    rollouts.append(own)
        self.model.train()
        return records, rollouts, mine

    def _rollout_share(self, part: list[dict], rows: range, noise: torch.Tensor | None):
        """This rank's `rows` of one sampling batch, from the single process's draws for the whole batch
        (initial noise unless given, then each noisy step's), so the generator advances as there."""
        if noise is None:
            noise = initial_noise(self.model, len(part), self.generator)
        steps = step_noises(self.model, self.params, len(part), self.generator)
        owned = len(rows) > 0
        if not owned:
            if not self.fsdp:
                return None
            rows = range(1)  # FSDP gathers weights in every forward: sample one row, thrown away, like the others
        pick = slice(rows.start, rows.stop)
        out = rollout(self.model, part[pick], self.params, None, noise=noise[pick],
                      step_noise=[n[pick] if n is not None else None for n in steps])
        return out if owned else None

    def _advantages(self, records, total: torch.Tensor, components: torch.Tensor,
                    mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Advantages; an image without any reward (`mask` False) gets exactly 0 and is left out of the
        statistics, as in the LM trainers."""
        a = self.config.algorithm
        g = self.config.rollout.num_generations
        grouped = total.view(-1, g)
        zero_std = float((grouped.std(dim=1) == 0).float().mean()) if g > 1 else 0.0
        advantages = torch.zeros_like(total)
        if self.tracker is not None:
            rows = torch.nonzero(mask).flatten()
            if len(rows):  # the tracker's history is Python lists: its statistics run on the CPU
                prompts = [str(records[i]["prompt"]) for i in rows.tolist()]
                advantages[rows] = self.tracker.advantages(prompts, total[rows].cpu()).to(total.device)
        else:
            # the same keyword arguments as the LM trainers give, so gdpo's per-reward normalisation works here too
            # zero outside `mask` also for estimators ignoring it; an image has no tokens, so per-sample only
            advantages = estimate_advantages(self.advantage_fn, AdvantageInput(
                grouped, mask.view(-1, g), components=components.view(-1, g, components.shape[-1]),
                weights=self.rewards.weights.to(total.device), scale_rewards=a.scale_rewards)).advantages.reshape(-1)
        return advantages.clamp(-a.adv_clip_max, a.adv_clip_max), zero_std

    def train_step(self) -> dict:
        started = time.perf_counter()
        records, rollouts, mine = self._collect()
        samples = [s for ro in rollouts for s in ro.samples]  # images on the CPU, where the rewards score
        components, valid, total = scored(self.rewards, samples, self.device)
        if self.dist.enabled:  # the global batch's scores, in the single process's order, on every rank
            gather = self.dist.all_gather_rows
            components, valid, total = gather(components), gather(valid), gather(total)
        rollout_time = time.perf_counter() - started
        metrics = self.rewards.metrics(components, total, valid)
        total = torch.where(valid, total, torch.zeros_like(total))
        advantages, zero_std = self._advantages(records, total, components, counted(components, valid))
        metrics["zero_std_ratio"] = zero_std
        metrics["advantage_abs_mean"] = float(advantages.abs().mean())
        metrics.update(self._update(rollouts, advantages, mine))
        metrics["rollout_time"] = rollout_time
        metrics["images_per_s"] = len(records) / (time.perf_counter() - started)
        return metrics

    def _update(self, rollouts, advantages: torch.Tensor, mine: range) -> dict:
        """`advantages` are the global batch's; `rollouts` hold its rows `mine` (all of them on one process).
        The micro-batches are laid out over the global rows as on one process, and each rank trains on its
        rows of each, weighted by their share of it."""
        a = self.config.algorithm
        latents = torch.cat([ro.trajectory.latents for ro in rollouts])
        old_log_probs = torch.cat([ro.trajectory.log_probs for ro in rollouts])
        cond = _cat([ro.cond for ro in rollouts])
        null = _cat([ro.null for ro in rollouts])
        device = advantages.device
        keep = torch.nonzero(advantages.abs() > 0).flatten() if a.skip_zero_advantage else torch.arange(len(advantages), device=device)
        sums: dict[str, float] = {}
        counts = 0
        first_ratio = None
        if keep.numel() == 0:
            return {"skipped_update": 1}
        steps = torch.tensor(self.train_steps, device=device)
        # the shuffles draw from the run's CPU generator (checkpointed), then move: the same order on any device
        for _ in range(a.num_inner_epochs):
            order = keep[torch.randperm(len(keep), generator=self.generator).to(device)] if a.shuffle_timesteps else keep
            for part in order.chunk(a.updates_per_step):
                batches = part.split(a.train_batch_size)
                for rows in batches:
                    if a.shuffle_timesteps:
                        step_order = torch.stack([steps[torch.randperm(len(steps), generator=self.generator).to(device)]
                                                  for _ in rows])
                    else:
                        step_order = steps.expand(len(rows), -1)
                    scale = 1.0 / (len(batches) * step_order.shape[1])
                    for j in range(step_order.shape[1]):
                        if self.dist.enabled:
                            stats = self._micro_step_share(latents, old_log_probs, cond, null, advantages[mine.start:mine.stop],
                                                           rows, step_order[:, j], scale, mine)
                        else:
                            stats = self._micro_step(latents, old_log_probs, cond, null, advantages, rows, step_order[:, j],
                                                     scale=scale)
                        deviation = stats.pop("max_abs_ratio_minus_one")
                        first_ratio = deviation if first_ratio is None else first_ratio
                        for key, value in stats.items():
                            sums[key] = sums.get(key, 0.0) + value
                        counts += 1
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + self.optimizer_step()
        grad_norm = sums.pop("grad_norm")  # the same on every rank (of the summed gradient)
        if self.dist.enabled:  # each rank's sums hold its rows' shares of every micro-batch mean
            sums = summed_over_ranks(self.dist, dict(sorted(sums.items())))
            first_ratio = float(self.dist.all_gather_rows(torch.tensor([first_ratio], dtype=torch.float64)).max())
        out = {key: value / counts for key, value in sums.items()}
        out["grad_norm"] = grad_norm / (a.num_inner_epochs * a.updates_per_step)
        out["onpolicy/first_ratio_max_dev"] = first_ratio  # 0 exactly when the first pass is on-policy
        out["trained_samples"] = int(keep.numel())
        return out

    def _micro_step_share(self, latents, old_log_probs, cond, null, advantages, rows, step_index, scale: float,
                          mine: range) -> dict:
        """This rank's part of the micro-step on the global `rows`: its rows' mean loss weighted by their share
        of the micro-batch (statistics likewise, summed over ranks later); a rank without rows in it runs a
        zero-weight forward and backward of one of its own rows under FSDP (every rank must run each
        forward), and nothing under DDP."""
        own = (rows >= mine.start) & (rows < mine.stop)
        local = rows[own] - mine.start
        if local.numel():
            stats = self._micro_step(latents, old_log_probs, cond, null, advantages, local, step_index[own], scale,
                                     share=local.numel() / len(rows))
        elif self.fsdp:
            stats = self._micro_step(latents, old_log_probs, cond, null, advantages, torch.zeros_like(rows[:1]),
                                     step_index[:1], scale, share=0.0)
        else:
            stats = dict.fromkeys(self._micro_stat_keys(), 0.0)
        if not local.numel():
            stats["max_abs_ratio_minus_one"] = 0.0  # the maximum over ranks is taken: this rank has no row
        return stats

    def _micro_stat_keys(self) -> list[str]:
        return (["kl"] if self.config.algorithm.beta > 0 else []) + [
            "loss", "approx_kl", "clipfrac", "clipfrac_gt_one", "clipfrac_lt_one", "ratio_mean", "max_abs_ratio_minus_one"]

    def _micro_step(self, latents, old_log_probs, cond, null, advantages, rows, step_index, scale: float,
                    share: float = 1.0) -> dict:
        """One micro-batch's loss mean over `rows` (local indices), back-propagated with weight
        `scale * share` (share: the rows' fraction of a global micro-batch; 1 on one process, where the
        statistics are the micro-batch's means; else each mean is weighted by `share` too)."""
        a = self.config.algorithm
        x_t = latents[rows, step_index]
        x_next = latents[rows, step_index + 1]
        c = cond[rows] if cond is not None else None
        n = null[rows] if null is not None else None
        schedule = self.schedule
        index = step_index if self.config.algorithm.shuffle_timesteps else int(step_index[0])
        result = denoise_step(self.model, schedule, index, x_t, c, n, self.params, prev_sample=x_next)
        old = old_log_probs[rows, step_index]
        per_sample, _ = clipped_surrogate(result.log_prob.unsqueeze(-1), old.unsqueeze(-1), advantages[rows],
                                             torch.ones(len(rows), 1, device=x_t.device), LossContext(epsilon=a.epsilon))
        loss = per_sample.mean()
        stats = {}
        if a.beta > 0:
            with torch.no_grad():
                ref = denoise_step(self.model, schedule, index, x_t, c, n, self.params, prev_sample=x_next, reference=True)
            kl = step_kl(result.mean, ref.mean, result.kl_scale).mean()
            loss = loss + a.beta * kl
            stats["kl"] = float(kl.detach()) * share
        self.backward(loss * (scale * share))
        with torch.no_grad():
            log_ratio = result.log_prob - old
            ratio = log_ratio.exp()
            stats.update({
                "loss": float(loss.detach()) * share,
                "approx_kl": float(0.5 * (log_ratio**2).mean()) * share,
                "clipfrac": float(((ratio - 1).abs() > a.epsilon).float().mean()) * share,
                "clipfrac_gt_one": float((ratio - 1 > a.epsilon).float().mean()) * share,
                "clipfrac_lt_one": float((1 - ratio > a.epsilon).float().mean()) * share,
                "ratio_mean": float(ratio.mean()) * share,
                "max_abs_ratio_minus_one": float((ratio - 1).abs().max()),
            })
        return stats


def _cat(parts):
    return None if parts[0] is None else torch.cat(parts)
