"""rlgen-clip-rewards: CLIP-based image rewards for rlgen, from local weights only.

- `aesthetic`: a LAION-style aesthetic predictor. CLIP image embedding (L2-normalised) -> an MLP head of
  Linear layers (768 -> 1024 -> 128 -> 64 -> 16 -> 1 for ViT-L/14; the dims are read from the head file).
  Options: clip=DIR (env RLGEN_CLIP_DIR), head=FILE (env RLGEN_AESTHETIC_HEAD).
- `pickscore`: PickScore-style prompt/image agreement, logit_scale.exp() * cos(image_emb, text_emb) / scale.
  Options: clip=DIR (env RLGEN_PICKSCORE_DIR), processor=DIR (tokenizer and preprocessor_config.json;
  default the clip directory, env RLGEN_PICKSCORE_PROCESSOR), scale=26 (as in flow_grpo).

Both take `device=` (default: the images' device, else cuda when available, else cpu) and `batch_size=32`.
Contract: `fn(samples, **options) -> list[float]`, each sample with "prompt" and "image" (a [C,H,W] tensor in
[0,1] or a PNG path). Both are differentiable in the pixels: `fn.differentiable(images [B,C,H,W] in [0,1],
samples, **options) -> Tensor[B]` keeps the graph to `images` and gives the same values as `fn`.
"""
from __future__ import annotations

from rlgen.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["aesthetic", "pickscore", "clear_caches", "clip_pixels"]


def __getattr__(name: str):
    # The rewards import torch and transformers: loaded on first use, so that importing the plugin (which
    # rlgen does for `rlgen --help`, to list plugin commands) stays quick.
    if name in __all__:
        from rlgen_clip_rewards import _rewards

        return getattr(_rewards, name)
    raise AttributeError(f"module 'rlgen_clip_rewards' has no attribute {name!r}")


# --- the hook -------------------------------------------------------------------------------------

@hookimpl
def register_rewards(register):
    from rlgen_clip_rewards import _rewards

    register("aesthetic", _rewards.aesthetic)
    register("pickscore", _rewards.pickscore)
