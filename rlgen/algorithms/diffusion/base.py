"""What the diffusion trainers share: the diffusers backbone in place of the causal LM, prompts, image
rewards, and the held-out evaluation (mean reward on fixed prompts and fixed seeds)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rlgen.diffusion.pipeline import load_diffusion_model
from rlgen.diffusion.sampling import DiffusionSamplingParams
from rlgen.errors import RlgenError
from rlgen.rewards.base import RewardSpec
from rlgen.training.trainer import Trainer, load_records


@dataclass
class PromptDataConfig:
    task: str | None = "digits"  # a built-in or plugin prompt task; ignored when `path` is set
    path: str | None = None  # JSONL / Parquet with a `prompt` field (and any fields rewards read)
    split: str = "train"
    eval_split: str = "test"
    eval_samples: int = 200  # 0 = no held-out evaluation


@dataclass
class EvalSamplingConfig:
    """How the held-out evaluation samples, at a fixed seed: by default deterministic (ODE / eta 0) with more
    steps than training (Flow-GRPO's denoising reduction); DDPO evaluates with its training sampler."""
    num_steps: int = 20
    guidance_scale: float = 1.0
    eta: float = 0.0  # step noise (DDIM eta / flow SDE noise level); 0 = deterministic. The noise is seeded too.
    images_per_prompt: int = 8
    seed: int = 1234
    batch_size: int = 64


def default_image_rewards() -> list[RewardSpec]:
    return [RewardSpec("digit-classifier")]


@dataclass
class SamplingConfig:
    num_steps: int = 10
    guidance_scale: float = 1.0
    eta: float = 1.0
    noise_level: float = 0.7
    sde_window: list[int] = field(default_factory=list)  # [start, end): noise only there (Flow-GRPO-Fast); [] = all steps

    def params(self) -> DiffusionSamplingParams:
        if self.sde_window and len(self.sde_window) != 2:
            raise RlgenError("config key 'sampling.sde_window' must be [start, end] or []")
        params = DiffusionSamplingParams(self.num_steps, self.guidance_scale, self.eta, self.noise_level,
                                         tuple(self.sde_window) if self.sde_window else None)
        params.validate()
        return params


class DiffusionTrainer(Trainer):
    """Trainer for a diffusers pipeline: the denoiser is the trained module."""

    def _load_model(self, checkpoint: Path | None):
        cfg = self.config.model
        if checkpoint is not None and cfg.lora_r > 0:
            model = load_diffusion_model(cfg, adapter_dir=_adapter_dir(checkpoint / "model"))
        else:  # full fine-tuning resumes from the base: prepare() may copy it as the frozen reference (KL,
            # DPO); _restore() then loads the checkpoint's weights into the trained denoiser
            model = load_diffusion_model(cfg)
        return model, None, model.path

    def _restore(self, checkpoint: Path) -> None:
        if self.config.model.lora_r == 0:
            from dataclasses import replace

            saved = load_diffusion_model(replace(self.config.model, path=str(checkpoint / "model")))
            self.model.denoiser.load_state_dict(saved.denoiser.state_dict())
        super()._restore(checkpoint)

    records: list[dict] = []  # training prompts (records with `prompt`), set by prepare_data

    def prepare(self) -> None:
        """Every prompt must condition the model: a class-conditional one fails here, before any sampling."""
        self.model.check_prompts(self.records + (self.eval_records or []))

    def save_model(self, out_dir: Path, final: bool) -> None:
        self.model.save(out_dir, merge_lora=final and self.config.model.lora_merge_on_save)

    def eval_task_rewards(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.config.rewards)

    # --- prompts ---
    def load_prompts(self) -> None:
        data = self.config.data
        self.records = load_records(data, data.split)
        self.eval_records = load_records(data, data.eval_split)[: data.eval_samples] if data.eval_samples else []

    def evaluate(self) -> dict:
        """Mean reward of deterministic samples for the held-out prompts at fixed seeds (the same noise for
        the base model and every checkpoint, so the numbers compare)."""
        if not self.eval_records:
            return {}
        from rlgen.diffusion.generate import generate_images

        e = self.config.eval
        params = DiffusionSamplingParams(e.num_steps, e.guidance_scale, e.eta, e.eta)
        self.model.eval()
        samples = generate_images(self.model, self.eval_records, e.images_per_prompt, params, seed=e.seed, batch_size=e.batch_size)
        self.model.train()
        from rlgen.evaluation.images import reward_statistics

        stats = reward_statistics(samples, self.eval_rewards)  # one scoring pass for every figure
        out = {"eval/reward": stats["reward_mean"]}
        out.update({f"eval/{name}": stats[f"rewards/{name}/mean"] for name in self.eval_rewards.names})
        return out


def _adapter_dir(model_dir: Path) -> Path:
    for name in ("unet_lora", "transformer_lora"):
        if (model_dir / name).is_dir():
            return model_dir / name
    raise RlgenError(f"checkpoint {model_dir} has no LoRA adapter (unet_lora/)")

