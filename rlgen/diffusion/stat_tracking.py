"""DDPO's per-prompt reward statistics: each prompt's advantage is its reward z-scored against the recent
rewards of the same prompt (a bounded history), falling back to the batch statistics until a prompt has
`min_count` rewards."""
from __future__ import annotations

from collections import deque

import torch


class PerPromptStatTracker:
    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.history: dict[str, deque] = {}

    def advantages(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Push this batch's rewards, then z-score each against its prompt's buffer (eps 1e-6, as DDPO)."""
        rewards = rewards.float()
        out = torch.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std(correction=0)  # numpy std, as DDPO
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buffer = self.history.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[rows].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = torch.tensor(list(buffer))
                mean, std = values.mean(), values.std(correction=0)
            out[rows] = (rewards[rows] - mean) / (std + 1e-6)
        return out

    def state(self) -> dict:
        return {prompt: list(values) for prompt, values in self.history.items()}

    def restore(self, state: dict) -> None:
        self.history = {prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state.items()}
