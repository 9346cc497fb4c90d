"""Write the randomly initialised tiny-digits pipelines (epsilon / DDIM and velocity / flow matching) that
`recipes/tiny-digits/run.sh` then trains with `rlgen train diffusion-sft`.

    python recipes/tiny-digits/make_init.py OUT_DIR [--seed 0]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import diffusers
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

from rlgen.api import digit_class_names

CLASS_NAMES = digit_class_names()
NULL_CLASS = 10  # the "no class" label, trained by label dropout, used by classifier-free guidance


def make_unet(seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1,
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=8, num_class_embeds=len(CLASS_NAMES) + 1,
    )


def write_pipeline(out: Path, scheduler, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    make_unet(seed).save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", type(scheduler).__name__]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    info = {"class_names": list(CLASS_NAMES), "null_class": NULL_CLASS, "prompt_parser": "digits",
            "dataset": "sklearn.datasets.load_digits (8x8, values / 16, scaled to [-1, 1])"}
    (out / "rlgen_diffusion.json").write_text(json.dumps(info, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    # "trailing" spacing starts sampling at t = 999 (pure noise), which few-step DDIM needs.
    ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                         set_alpha_to_one=False, timestep_spacing="trailing", prediction_type="epsilon")
    write_pipeline(out / "tiny-digits", ddim, args.seed)
    write_pipeline(out / "tiny-digits-flow", FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0), args.seed)
    print(f"wrote {out / 'tiny-digits'} and {out / 'tiny-digits-flow'}")


if __name__ == "__main__":
    main()
