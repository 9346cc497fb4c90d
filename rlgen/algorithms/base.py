"""An algorithm is a named config class + trainer class, optionally a preset of another one's defaults."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Algorithm:
    name: str
    config_cls: type
    trainer_cls: type
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)  # preset values, overridable by the user
    base: str = ""  # the algorithm a preset specialises (its family), e.g. "grpo" for "dapo"

    @property
    def family(self) -> str:
        return self.base or self.name
