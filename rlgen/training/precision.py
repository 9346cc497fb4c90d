"""Training precision (`run.precision`): what the forward passes compute in, what the weights and optimiser
states are kept in, and the loss scaling fp16 needs.

- fp32: everything in float32.
- bf16-mixed: float32 master weights and AdamW states; forward (and its backward) under torch.autocast in
  bfloat16 on the run's device (CPU too). Log-prob accumulation stays float32 (the kernels upcast).
- bf16: the weights themselves in bfloat16 (half the memory, no master copy; AdamW states in bf16 too).
- fp16-mixed: float32 master weights, float16 autocast, and a dynamic loss scaler (torch.amp.GradScaler):
  gradients are unscaled before clipping; a step whose scaled gradients overflow is skipped and the scale
  lowered, as in every fp16 trainer.
"""
from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["fp32", "bf16-mixed", "bf16", "fp16-mixed"]
PRECISIONS = ("fp32", "bf16-mixed", "bf16", "fp16-mixed")


class PrecisionPolicy:
    def __init__(self, name: str, device: torch.device):
        if name not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
        self.name = name
        self.device = device
        self.autocast_dtype = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(name)
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16-mixed" else None

    @property
    def weight_dtype(self) -> torch.dtype | None:
        """The dtype the trained weights are cast to (None: keep the model.dtype they were loaded in)."""
        return torch.bfloat16 if self.name == "bf16" else None

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer) -> None:
        """Before clipping: the gradients in their true scale."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # skipped when the unscaled gradients hold inf/NaN
        self.scaler.update()

    def state_dict(self) -> dict:
        """JSON-able (the loss scale and its growth counter), kept in checkpoints."""
        return {} if self.scaler is None else {k: v for k, v in self.scaler.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
