"""Built-in models shipped inside the package (the backbones register in rlgen.rollout.backbones)."""
from __future__ import annotations

from pathlib import Path

from rlgen.hookspecs import hookimpl

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin_models"

BUILTIN_MODELS = {
    "tiny-arith": "Llama-architecture char-level LM (0.7M params), SFT on the arithmetic task (recipes/tiny-arith)",
    "tiny-digits": "class-conditional 8x8 digit diffusion model (epsilon, DDIM; 0.7M params) trained on 30% noisy labels (recipes/tiny-digits)",
    "tiny-digits-flow": "class-conditional 8x8 digit flow-matching model (velocity; 0.7M params) trained on 30% noisy labels (recipes/tiny-digits)",
}


@hookimpl
def register_models(register):
    for name, description in BUILTIN_MODELS.items():
        register(name, BUILTIN_DIR / name, description)

