"""The backbone protocol: everything rlgen does with a model family, behind one interface.

A backbone (causal LMs, diffusers pipelines, and whatever a plugin adds through the `register_backbones`
hook) says which directories it `claims` from their files alone, then resolves, loads and saves them,
builds the frozen reference policy, opens the engine that samples from them, and computes the log-probs
the trainers optimise. Callers ask `backbone_for(name_or_path)` instead of asking "is this an image
model?".

The built-in implementations live in the layer that holds their sampler: `rlgen.rollout.backbones`
(causal LMs, sampled by `HFEngine`) and `rlgen.diffusion.backbone` (diffusers pipelines).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch

from rlgen.errors import RlgenError, show_value
from rlgen.models.locate import model_dir
from rlgen.plugins import registry

# Built-in backbones, asked in this order before any plugin's (their claims do not overlap).
BUILTIN_ORDER = ("causal-lm", "diffusers")


@dataclass
class LoadedModel:
    """What `Backbone.load` returns and every other method takes back."""

    model: Any  # the trained module: a causal LM (peft-wrapped with LoRA) or a DiffusionModel
    tokenizer: Any | None  # a text backbone's tokenizer; None where the model carries its own
    path: Path  # the resolved directory it was loaded from (the base that frozen references reload)


class ReferencePolicy:
    """The frozen policy that KL penalties and DPO-family losses compare against, in one of two forms:

    - "frozen-copy": a separate module, never trained (full fine-tuning; `build_reference` freezes it);
    - "adapter-off": the policy itself with its peft LoRA adapter switched off (its base weights are
      frozen already, so no copy is kept).

    `forward()` is the context in which the reference runs: no gradients, eval mode (dropout off), the
    adapter disabled for "adapter-off"; it yields the module to call and restores everything after.
    Re-entering it while it is active is a no-op, so code running under it may ask for it again.
    `logprobs(...)` runs the backbone's log-prob function on that module.
    """

    KINDS = ("frozen-copy", "adapter-off")

    def __init__(self, module, kind: str, logprobs: Callable[..., torch.Tensor] | None = None):
        if kind not in self.KINDS:
            raise ValueError(f"reference kind must be one of {self.KINDS}, got {kind!r}")
        self.module = module
        self.kind = kind
        self._logprobs = logprobs
        self._active = False

    @property
    def is_copy(self) -> bool:
        return self.kind == "frozen-copy"

    @contextlib.contextmanager
    def forward(self) -> Iterator[Any]:
        if self._active:
            yield self.module
            return
        was_training = self.module.training
        self.module.eval()
        self._active = True
        try:
            with torch.no_grad(), (self.module.disable_adapter() if self.kind == "adapter-off"
                                   else contextlib.nullcontext()):
                yield self.module
        finally:
            self._active = False
            self.module.train(was_training)

    def logprobs(self, *args, **kwargs) -> torch.Tensor:
        """The backbone's log-probs (causal LMs: per completion token [B, C]) under the reference."""
        if self._logprobs is None:
            raise RlgenError("this reference policy has no log-prob function (its backbone computes none)")
        with self.forward() as module:
            return self._logprobs(module, *args, **kwargs)

    # A moving reference (online DPO's ref_update_every) is a frozen copy refreshed from the policy, and
    # part of the run's checkpointed state.
    def state_dict(self) -> dict:
        self._need_copy("has no state of its own")
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._need_copy("cannot be overwritten")
        self.module.load_state_dict(state)

    def _need_copy(self, what: str) -> None:
        if not self.is_copy:
            raise RlgenError(f"an adapter-off reference policy (the LoRA base) {what}; it needs full fine-tuning")


def build_reference(policy, *, has_adapter: bool, frozen_copy: Callable[[], Any],
                    logprobs: Callable[..., torch.Tensor] | None = None) -> ReferencePolicy:
    """The one way a reference is made: the policy with its adapter off when it trains a LoRA adapter
    (no second copy of the weights), else a frozen copy (`frozen_copy()` is only called then)."""
    if has_adapter:
        return ReferencePolicy(policy, "adapter-off", logprobs)
    copy = frozen_copy().requires_grad_(False).eval()
    # the policy's device and weight dtype (a copy reloaded from disk is on the CPU in model.dtype)
    first = next(iter(policy.parameters()), None)
    if first is not None:
        copy.to(device=first.device, dtype=first.dtype if first.is_floating_point() else None)
    return ReferencePolicy(copy, "frozen-copy", logprobs)


@runtime_checkable
class Backbone(Protocol):
    """A model family. Registered objects implement every member; a method a family cannot support
    raises RlgenError saying so (e.g. a backbone without sequence log-probs)."""

    name: str  # the registry name ("causal-lm", "diffusers")
    description: str  # one line for `rlgen plugins` and error messages

    def claims(self, path: Path) -> bool:
        """Whether the directory is this family's, decided from its files only (nothing imported or loaded)."""

    def resolve(self, name_or_path: str) -> Path:
        """The directory of a built-in model name or a path; anything else: one RlgenError line."""

    def load(self, model_config) -> LoadedModel:
        """Load for training or sampling (`model_config.path`, dtype, LoRA settings)."""

    def save(self, handle: LoadedModel, out_dir: Path, merge_lora: bool = True) -> None:
        """Write the model in its upstream format, atomically."""

    def reference_policy(self, handle: LoadedModel, model_config) -> ReferencePolicy:
        """The frozen reference of the policy in `handle` (through `build_reference`)."""

    def rollout_engine(self, handle: LoadedModel):
        """What samples from the model (causal LMs: an HFEngine; pipelines: an image sampler)."""

    def sequence_logprobs(self, handle: LoadedModel, *args, **kwargs) -> torch.Tensor:
        """The log-probs the policy-gradient trainers optimise (per token, or per denoising step)."""


def backbones() -> list[Backbone]:
    """Every registered backbone, in the order `backbone_for` asks them: built-ins first, then plugins by name."""
    entries = list(registry("backbone"))
    rank = {name: index for index, name in enumerate(BUILTIN_ORDER)}
    entries.sort(key=lambda entry: (rank.get(entry.name, len(rank)), entry.name))
    return [entry.item for entry in entries]


def backbone_named(name: str) -> Backbone:
    return registry("backbone").get(name)


def claiming_backbone(name_or_path: str) -> Backbone | None:
    """The first backbone that claims the directory a model name or path points to, or None."""
    path = model_dir(name_or_path)
    if not path.is_dir():
        return None
    return next((backbone for backbone in backbones() if backbone.claims(path)), None)


def backbone_for(name_or_path: str | Path) -> Backbone:
    """The backbone of a --model value (a built-in name or a directory); anything no backbone claims is one
    RlgenError line listing the kinds that were asked."""
    if isinstance(name_or_path, Path):
        name_or_path = str(name_or_path)
    if name_or_path is not None and not isinstance(name_or_path, str):
        raise RlgenError(f"model = {show_value(name_or_path)}: expected a built-in model name or a model directory")
    if not name_or_path:
        raise RlgenError("no model given: name a built-in model or a model directory")
    backbone = claiming_backbone(name_or_path)
    if backbone is not None:
        return backbone
    path = model_dir(name_or_path)
    models = registry("model")
    if name_or_path in models and not path.is_dir():
        raise RlgenError(f"built-in model '{name_or_path}' is missing its files at {path}")
    if not path.exists():
        raise RlgenError(f"unknown model {show_value(name_or_path)}: not a built-in name ({', '.join(models.names())}) "
                         "nor an existing directory")
    kinds = "; ".join(f"{b.name} ({b.description})" for b in backbones())
    raise RlgenError(f"{path} is not a model directory of any known kind: {kinds}")
