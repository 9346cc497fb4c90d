"""Built-in rewards."""
from __future__ import annotations

import ast
import re
from collections import Counter

from rlgen.hookspecs import hookimpl


def _clean(text) -> str:
    return str(text).strip()


def exact_match(samples, **_):
    """1.0 when the completion equals the `answer` field (surrounding whitespace ignored), else 0.0."""
    return [None if s.get("answer") is None else float(_clean(s["completion"]) == _clean(s["answer"])) for s in samples]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def numeric_match(samples, tolerance: float = 1e-6, **_):
    """1.0 when the last number in the completion equals the numeric `answer` (within tolerance)."""
    out = []
    for s in samples:
        try:
            target = float(_clean(s["answer"]))
        except (KeyError, TypeError, ValueError):
            out.append(None)
            continue
        found = _NUMBER.findall(str(s["completion"]))
        out.append(float(bool(found) and abs(float(found[-1]) - target) <= tolerance * max(1.0, abs(target))))
    return out


def format_reward(samples, pattern: str = r"-?\d+", **_):
    """1.0 when the whole completion matches the regex `pattern` (default: an integer), else 0.0."""
    regex = re.compile(pattern, re.DOTALL)
    return [float(regex.fullmatch(_clean(s["completion"])) is not None) for s in samples]


def length(samples, unit: str = "chars", **_):
    """Completion length in characters (or 'tokens' when the sample carries completion_tokens);
    give it a negative weight to prefer short answers."""
    if unit == "tokens":
        return [float(s.get("completion_tokens", len(str(s["completion"])))) for s in samples]
    return [float(len(str(s["completion"]))) for s in samples]


def _evaluate(node):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value, [node.value]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
        left, lnums = _evaluate(node.left)
        right, rnums = _evaluate(node.right)
        value = left + right if isinstance(node.op, ast.Add) else left - right if isinstance(node.op, ast.Sub) else left * right
        return value, lnums + rnums
    raise ValueError("only integers with + - * are allowed")


def countdown(samples, **_):
    """1.0 when the completion is an expression over the given `numbers` (each at most once, + - *)
    that evaluates to `target`; 0.0 otherwise."""
    out = []
    for s in samples:
        if "numbers" not in s or "target" not in s:
            out.append(None)
            continue
        try:
            value, used = _evaluate(ast.parse(_clean(s["completion"]), mode="eval"))
        except (SyntaxError, ValueError, RecursionError):
            out.append(0.0)
            continue
        available = Counter(int(n) for n in s["numbers"])
        ok = value == int(s["target"]) and not (Counter(used) - available)
        out.append(float(ok))
    return out


# Rewards that say whether an answer is right: their mean is reported as `accuracy`.
for _fn in (exact_match, numeric_match, countdown):
    _fn.is_correctness = True

# Fields the data must provide (in at least one record; others are "not applicable"): checked by
# RewardSet.check_fields before a training run loads its model.
exact_match.required_fields = ("answer",)
numeric_match.required_fields = ("answer",)
countdown.required_fields = ("numbers", "target")

BUILTIN_REWARDS = {
    "exact-match": exact_match,
    "numeric-match": numeric_match,
    "format": format_reward,
    "length": length,
    "countdown": countdown,
}


@hookimpl
def register_rewards(register):
    for name, fn in BUILTIN_REWARDS.items():
        register(name, fn)
