"""Built-in algorithms: sft, grpo, and grpo presets under the names users look for."""
from __future__ import annotations

from rlgen.algorithms.base import Algorithm
from rlgen.algorithms.diffusion.dpo import DiffusionDPOConfig, DiffusionDPOTrainer
from rlgen.algorithms.diffusion.policy_gradient import DiffusionPGConfig, DiffusionPolicyGradientTrainer
from rlgen.algorithms.diffusion.reward_backprop import RewardBackpropConfig, RewardBackpropTrainer
from rlgen.algorithms.diffusion.sft import DiffusionSFTConfig, DiffusionSFTTrainer
from rlgen.algorithms.dpo import DPOConfig, PreferenceTrainer
from rlgen.algorithms.grpo import GRPOConfig, GRPOTrainer
from rlgen.algorithms.kto import KTOConfig, KTOTrainer
from rlgen.algorithms.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from rlgen.algorithms.reward_modeling import RewardModelConfig, RewardModelTrainer
from rlgen.algorithms.sft import SFTConfig, SFTTrainer
from rlgen.hookspecs import hookimpl

ALGORITHMS = (
    Algorithm("sft", SFTConfig, SFTTrainer, "supervised fine-tuning on prompt -> completion"),
    Algorithm("grpo", GRPOConfig, GRPOTrainer, "group relative policy optimisation (advantage and loss from the registries)"),
    Algorithm("rloo", GRPOConfig, GRPOTrainer, "REINFORCE leave-one-out (grpo preset)",
              {"algorithm": {"advantage": "rloo", "loss_type": "grpo"}}, base="grpo"),
    Algorithm("remax", GRPOConfig, GRPOTrainer, "ReMax: greedy-rollout baseline (grpo preset)",
              {"algorithm": {"advantage": "remax", "loss_type": "grpo"}}, base="grpo"),
    Algorithm("reinforce-pp", GRPOConfig, GRPOTrainer, "REINFORCE++ with batch-normalised advantages (grpo preset)",
              {"algorithm": {"advantage": "reinforce++", "loss_type": "dapo"}}, base="grpo"),
    Algorithm("dapo", GRPOConfig, GRPOTrainer, "DAPO: clip-higher, dynamic sampling, overlong shaping, token mean (grpo preset)",
              {"algorithm": {"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28, "dynamic_sampling": True,
                             "overlong_buffer": -1, "mask_truncated_completions": True}}, base="grpo"),
    Algorithm("dr-grpo", GRPOConfig, GRPOTrainer, "Dr. GRPO: no std scaling, constant normaliser (grpo preset)",
              {"algorithm": {"loss_type": "dr_grpo", "scale_rewards": "none"}}, base="grpo"),
    Algorithm("gdpo", GRPOConfig, GRPOTrainer, "GDPO: per-reward group normalisation, then weighted sum (grpo preset)",
              {"algorithm": {"advantage": "gdpo", "scale_rewards": "batch"}}, base="grpo"),
    Algorithm("gspo", GRPOConfig, GRPOTrainer, "GSPO: sequence-level importance ratio (grpo preset)",
              {"algorithm": {"loss_type": "gspo", "epsilon": 3e-4, "epsilon_high": 4e-4}}, base="grpo"),
    Algorithm("cispo", GRPOConfig, GRPOTrainer, "CISPO: clipped importance-sampling weights (grpo preset)",
              {"algorithm": {"loss_type": "cispo", "epsilon_high": 5.0}}, base="grpo"),
    Algorithm("dpo", DPOConfig, PreferenceTrainer, "direct preference optimisation on prompt/chosen/rejected pairs (loss_type: sigmoid, ipo, hinge, robust ...)"),
    Algorithm("simpo", DPOConfig, PreferenceTrainer, "SimPO: length-normalised, reference-free, target margin gamma (dpo preset)",
              {"algorithm": {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0}}, base="dpo"),
    Algorithm("rpo", DPOConfig, PreferenceTrainer, "RPO: DPO plus the NLL of the chosen answers (dpo preset, rpo_alpha = 1)",
              {"algorithm": {"loss_type": "sigmoid", "rpo_alpha": 1.0}}, base="dpo"),
    Algorithm("orpo", DPOConfig, PreferenceTrainer, "ORPO: NLL plus odds-ratio preference term, reference-free (dpo preset)",
              {"algorithm": {"loss_type": "orpo", "beta": 0.1, "rpo_alpha": 1.0}}, base="dpo"),
    Algorithm("kto", KTOConfig, KTOTrainer, "KTO: unpaired desirable / undesirable answers (prompt, completion, label)"),
    Algorithm("online-dpo", OnlineDPOConfig, OnlineDPOTrainer, "online DPO: sample, score, pair best vs worst, DPO update, repeat (DNO-style with ref_update_every)"),
    Algorithm("rm", RewardModelConfig, RewardModelTrainer, "reward model: Bradley-Terry on preference pairs (use it as --reward rm:PATH)"),
    Algorithm("ddpo", DiffusionPGConfig, DiffusionPolicyGradientTrainer,
              "DDPO: PPO clip per denoising step, per-prompt reward statistics, DDIM eta=1 (image models)",
              {"algorithm": {"advantage": "per-prompt", "shuffle_timesteps": True, "beta": 0.0}, "sampling": {"eta": 1.0},
               "eval": {"eta": 1.0, "num_steps": 10}}),
    Algorithm("flow-grpo", DiffusionPGConfig, DiffusionPolicyGradientTrainer,
              "Flow-GRPO: group-relative advantages, SDE sampling, KL to the reference, denoising reduction (image models)",
              {"model": {"path": "tiny-digits-flow"},
               "algorithm": {"advantage": "grpo", "beta": 0.04, "timestep_fraction": 0.99, "shuffle_timesteps": False},
               "sampling": {"noise_level": 0.7}}),
    Algorithm("reward-backprop", RewardBackpropConfig, RewardBackpropTrainer,
              "AlignProp / DRaFT-K: backpropagate a differentiable reward through the last K sampling steps (image models)"),
    Algorithm("diffusion-dpo", DiffusionDPOConfig, DiffusionDPOTrainer,
              "Diffusion-DPO on preference pairs of images (prompt, chosen, rejected PNG paths)"),
    Algorithm("diffusion-sft", DiffusionSFTConfig, DiffusionSFTTrainer, "denoising objective on images (pre-train / fine-tune a diffusers denoiser; CFG label dropout)"),
)


@hookimpl
def register_algorithms(register):
    for algorithm in ALGORITHMS:
        register(algorithm.name, algorithm, algorithm.description)
