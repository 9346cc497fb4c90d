"""What the diffusion trainers share: the diffusers backbone in place of the causal LM, prompts, image
rewards, and the held-out evaluation (mean reward on fixed prompts and fixed seeds)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rlgen.config import section, setting
from rlgen.diffusion.generate import generate_images
from rlgen.diffusion.pipeline import DiffusionModelConfig, load_diffusion_model
from rlgen.diffusion.sampling import DiffusionSamplingParams
from rlgen.data.records import check_text
from rlgen.errors import RlgenError
from rlgen.evaluation.images import reward_statistics
from rlgen.rewards.base import RewardSpec
from rlgen.training.config import DataConfig, TrainConfig
from rlgen.training.sharded_state import is_sharded_checkpoint
from rlgen.training.trainer import Trainer, load_records


TimeDensity = Literal["uniform", "logit-normal"]  # how training noise levels are drawn (logit-normal: SD3)


@dataclass
class PromptDataConfig(DataConfig):
    task: str | None = "digits"
    path: str | None = setting(None, "JSONL / Parquet with a `prompt` field (and any fields rewards read), instead of a task")
    eval_samples: int = setting(200, "held-out prompts of the evaluation every run.eval_every steps; 0 = none")

    def validate(self) -> None:
        """The text models' keys that image models have no use for are refused, not silently ignored."""
        unused = [(key, value) for key, value, default in (
            ("chat_template", self.chat_template, "auto"), ("system_prompt", self.system_prompt, ""),
            ("max_prompt_length", self.max_prompt_length, 0), ("prompt_truncation", self.prompt_truncation, "left"))
            if value != default]
        if unused:
            key, value = unused[0]
            raise RlgenError(f"config key 'data.{key}' = {value!r}: image trainers do not use it (their prompts are "
                             "text for the text encoder, without a chat template or truncation)")


@dataclass
class EvalSamplingConfig:
    """How the held-out evaluation samples, at a fixed seed: by default deterministic (ODE / eta 0) with more
    steps than training (Flow-GRPO's denoising reduction); DDPO evaluates with its training sampler."""
    num_steps: int = setting(20, "denoising steps of the held-out samples")
    guidance_scale: float = setting(1.0, "classifier-free guidance scale; 1 = none")
    eta: float = setting(0.0, "step noise (DDIM eta / flow SDE noise level); 0 = deterministic. The noise is seeded too")
    num_generations: int = setting(8, "images per held-out prompt")
    seed: int = setting(1234, "seed of the held-out samples' noise (the same for every checkpoint)")
    batch_size: int = setting(64, "images per sampling forward pass")


def default_image_rewards() -> list[RewardSpec]:
    return [RewardSpec("digit-classifier")]


@dataclass
class SamplingConfig:
    num_steps: int = setting(10, "denoising steps of a training sample")
    guidance_scale: float = setting(1.0, "classifier-free guidance scale; 1 = none")
    eta: float = setting(1.0, "DDIM step noise (1 = DDPM-like, 0 = deterministic)")
    noise_level: float = setting(0.7, "flow-matching SDE noise level (Flow-GRPO's a)")
    sde_window: list[int] = setting(doc="[start, end): noise only on these steps (Flow-GRPO-Fast); [] = all steps", factory=list)

    def params(self) -> DiffusionSamplingParams:
        if self.sde_window and len(self.sde_window) != 2:
            raise RlgenError("config key 'sampling.sde_window' must be [start, end] or []")
        params = DiffusionSamplingParams(self.num_steps, self.guidance_scale, self.eta, self.noise_level,
                                         tuple(self.sde_window) if self.sde_window else None)
        params.validate()
        return params


@dataclass
class ImageTrainConfig(TrainConfig):
    """What the image trainers' configs share: a diffusers model, prompts, rewards and the held-out evaluation."""
    model: DiffusionModelConfig = section(DiffusionModelConfig, "the diffusers pipeline whose denoiser is trained")
    data: PromptDataConfig = section(PromptDataConfig, "prompts (training and held-out)")
    rewards: list[RewardSpec] = setting(doc="image rewards ([[rewards]] tables: name, weight, options): the held-out evaluation's, and the training signal of reward-driven trainers", factory=default_image_rewards)
    eval: EvalSamplingConfig = section(EvalSamplingConfig, "how the held-out evaluation samples")


class DiffusionTrainer(Trainer):
    """Trainer for a diffusers pipeline: the denoiser is the trained module."""

    backbone_name = "diffusers"

    def _load_model(self, checkpoint: Path | None):
        cfg = self.config.model
        if checkpoint is not None and cfg.lora_r > 0:
            model = load_diffusion_model(cfg, adapter_dir=_adapter_dir(checkpoint / "model"))
        else:  # full fine-tuning resumes from the base: prepare() may copy it as the frozen reference (KL,
            # DPO); _restore() then loads the checkpoint's weights into the trained denoiser
            model = load_diffusion_model(cfg)
        return model, None, model.path

    def shard(self, module) -> None:
        """FSDP shards the denoiser (its down / mid / up blocks, then the rest of it): the pipeline calls it
        directly, so its forward is where the weights are gathered. A frozen-copy reference (KL, DPO) is
        copied from the denoiser before it is sharded (a sharded module does not copy); Trainer.reference_policy
        places it."""
        if self.needs_reference():
            self.fsdp_reference = self.reference_policy()
        super().shard(module.denoiser)

    fsdp_reference = None  # the reference built before sharding (see `shard`)

    def needs_reference(self) -> bool:
        """Whether the trainer builds a reference policy in prepare() (its frozen copy is made before FSDP shards)."""
        return False

    def reference_policy(self):
        if self.fsdp_reference is not None:
            return self.fsdp_reference
        return super().reference_policy()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the denoiser's block activations in the backward pass (diffusers' checkpointing)."""
        self.model.denoiser.enable_gradient_checkpointing()

    def _restore(self, checkpoint: Path) -> None:
        if self.config.model.lora_r == 0 and not is_sharded_checkpoint(checkpoint):  # sharded: Trainer._restore reads them
            from dataclasses import replace

            saved = load_diffusion_model(replace(self.config.model, path=str(checkpoint / "model")))
            if self.fsdp:  # each rank keeps its shards of the full weights
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                set_model_state_dict(self.model.denoiser, saved.denoiser.state_dict(),
                                     options=StateDictOptions(full_state_dict=True))
            else:
                self.model.denoiser.load_state_dict(saved.denoiser.state_dict())
        super()._restore(checkpoint)

    records: list[dict] = []  # training prompts (records with `prompt`), set by prepare_data

    def prepare(self) -> None:
        """Every prompt must condition the model: a class-conditional one fails here, before any sampling."""
        self.model.check_prompts(self.records + (self.eval_records or []))

    def save_model(self, out_dir: Path | None, final: bool) -> None:
        if self.fsdp:  # every rank gathers the denoiser's full weights; rank 0 (out_dir given) writes them
            from rlgen.training import fsdp

            state = fsdp.full_model_state(self.model.denoiser)
            if out_dir is not None:  # a plain (unsharded) pipeline with the gathered weights, saved as one process does
                plain = load_diffusion_model(self.config.model)
                plain.denoiser.load_state_dict(state)
                plain.save(out_dir, merge_lora=False)
            return
        self.model.save(out_dir, merge_lora=final and self.config.model.lora_merge_on_save)

    def eval_task_rewards(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.config.rewards)

    # --- prompts ---
    def load_prompts(self) -> None:
        data = self.config.data
        evaluating = bool(data.eval_samples and self.config.run.eval_every)
        self.records, held = self.split_held_out(load_records(data, data.split), evaluating=evaluating)
        for record in self.records + (held or []):  # an image model's prompt is text (no chat template)
            check_text(data.path or data.task, record, "prompt")
        self.eval_records = held or []

    def evaluate(self) -> dict:
        """Mean reward of deterministic samples for the held-out prompts at fixed seeds (the same noise for
        the base model and every checkpoint, so the numbers compare)."""
        if not self.eval_records:
            return {}
        e = self.config.eval
        params = DiffusionSamplingParams(e.num_steps, e.guidance_scale, e.eta, e.eta)
        self.model.eval()
        samples = generate_images(self.model, self.eval_records, e.num_generations, params, seed=e.seed, batch_size=e.batch_size)
        self.model.train()
        stats = reward_statistics(samples, self.eval_rewards)  # one scoring pass for every figure
        out = {"eval/reward": stats["reward_mean"]}
        out.update({f"eval/{name}": stats[f"rewards/{name}/mean"] for name in self.eval_rewards.names})
        return out


def _adapter_dir(model_dir: Path) -> Path:
    for name in ("unet_lora", "transformer_lora"):
        if (model_dir / name).is_dir():
            return model_dir / name
    raise RlgenError(f"checkpoint {model_dir} has no LoRA adapter (unet_lora/)")

