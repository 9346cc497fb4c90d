"""Trainers for diffusion and flow-matching image models (rlgen.diffusion holds the model-side pieces)."""
