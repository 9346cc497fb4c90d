"""Which backbone a model belongs to, asked in one place. A flow of the API that differs by model family
(sampling, evaluating a model, the merge sweep's evaluator) is a table from backbone name to function,
so a family is one table entry rather than an `is this an image model?` branch in every command."""
from __future__ import annotations

from typing import Callable, TypeVar

from rlgen.errors import RlgenError
from rlgen.models.backbone import claiming_backbone

F = TypeVar("F", bound=Callable)

DEFAULT_MODEL = "tiny-arith"
FALLBACK = "causal-lm"  # a model no backbone claims (a typo, a missing directory): its loader reports it in one line


def family(model: str | None) -> str:
    """The name of the registered backbone that claims `model` (a built-in name or a directory)."""
    backbone = claiming_backbone(model or DEFAULT_MODEL)
    return backbone.name if backbone is not None else FALLBACK


def flow_for(flows: dict[str, F], model: str | None, action: str) -> F:
    """`flows[family(model)]`; a backbone without an entry is one line saying what it cannot do yet."""
    name = family(model)
    if name not in flows:
        raise RlgenError(f"{action} is not available for {name} models (it is for: {', '.join(sorted(flows))})")
    return flows[name]
