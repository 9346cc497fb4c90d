"""Preference data: reading and checking `prompt` / `chosen` / `rejected` records, unpaired
(`prompt` / `completion` / `label`) records for KTO, and turning scored samples into pairs.

Every problem is reported in one line naming the file, the line and the field, before any model loads.
"""
from __future__ import annotations

import math
from collections import OrderedDict

from rlgen.data.chat import message_text
from rlgen.data.records import check_text_or_messages, read_records
from rlgen.errors import RlgenError, show_value

PAIR_FIELDS = ("prompt", "chosen", "rejected")


def _where(source: str, record: dict) -> str:
    return f"{source}, line {record['_line']}" if "_line" in record else source


def _text(source: str, record: dict, field: str, allow_empty: bool = False) -> str:
    """A text field: a string, or a chat message list (TRL's conversational pairs), not empty."""
    if field not in record or record[field] is None:
        raise RlgenError(f"{_where(source, record)}: missing field '{field}'")
    value = message_text(check_text_or_messages(source, record, field))
    if not allow_empty and not value.strip():
        raise RlgenError(f"{_where(source, record)}: field '{field}' is empty")
    return value


def _number(source: str, record: dict, field: str) -> float | None:
    value = record.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RlgenError(f"{_where(source, record)}: field '{field}' must be a finite number, got {show_value(value)}")
    return float(value)


def check_pair(source: str, record: dict) -> dict:
    """A validated pair (the record itself, with `margin` filled from scores when given as such)."""
    _text(source, record, "prompt", allow_empty=True)
    _text(source, record, "chosen")
    _text(source, record, "rejected")
    chosen, rejected = record["chosen"], record["rejected"]  # compared as given (text or messages)
    margin = _number(source, record, "margin")
    chosen_score = _number(source, record, "chosen_score")
    rejected_score = _number(source, record, "rejected_score")
    if margin is None and chosen_score is not None and rejected_score is not None:
        margin = chosen_score - rejected_score
    if margin is not None:
        record["margin"] = margin
    tie = record.get("tie", False)
    if not isinstance(tie, bool):
        raise RlgenError(f"{_where(source, record)}: field 'tie' must be true or false, got {show_value(tie)}")
    if chosen == rejected and not tie:
        raise RlgenError(f"{_where(source, record)}: 'chosen' and 'rejected' are identical (mark ties with \"tie\": true)")
    return record


def read_pairs(path: str) -> list[dict]:
    """Preference pairs from JSONL / Parquet / '-' (stdin); each record keeps its line number. Prompts and
    answers are strings or chat message lists."""
    records = read_records(path, messages=True)
    source = "<stdin>" if path == "-" else path
    return [check_pair(source, r) for r in records]


def read_unpaired(path: str) -> list[dict]:
    """KTO's data: unpaired `prompt` / `completion` / `label` (bool) records. Pair files are accepted
    too: each pair gives one desirable and one undesirable example."""
    records = read_records(path, messages=True)
    source = "<stdin>" if path == "-" else path
    out = []
    for record in records:
        if "completion" not in record and "chosen" in record:
            check_pair(source, record)
            base = {k: v for k, v in record.items() if k not in ("chosen", "rejected")}
            out.append({**base, "completion": record["chosen"], "label": True})
            out.append({**base, "completion": record["rejected"], "label": False})
            continue
        _text(source, record, "prompt", allow_empty=True)
        _text(source, record, "completion")
        label = record.get("label")
        if not isinstance(label, bool):
            raise RlgenError(f"{_where(source, record)}: field 'label' must be true or false, got {show_value(label)}")
        out.append(record)
    return out


def make_pairs(records: list[dict], mode: str = "best-worst", field: str = "reward", margin: float = 0.0,
               group_by: str = "prompt", source: str = "input") -> list[dict]:
    """Pairs from scored samples, grouped by `group_by` (the prompt) in order of first appearance.

    - `best-worst`: one pair per group, its highest- against its lowest-scored completion;
    - `all`: every pair (i, j) with score_i - score_j > margin.
    Groups whose spread is not above `margin` give no pair; samples without a score (None/NaN) are
    left out; duplicated completions count once (keeping the first score seen).
    """
    if mode not in ("best-worst", "all"):
        raise RlgenError(f"unknown pairing mode '{mode}' (known: best-worst, all)")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise RlgenError(f"--margin must be a finite number >= 0, got {show_value(margin)}")
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for record in records:
        if group_by not in record:
            raise RlgenError(f"{_where(source, record)}: missing field '{group_by}'")
        if _content(record) is None:
            raise RlgenError(f"{_where(source, record)}: missing field 'completion' (or 'image' for image samples)")
        if field not in record:
            raise RlgenError(f"{_where(source, record)}: missing score field '{field}' (run `rlgen score` first)")
        score = record[field]
        if score is None or (isinstance(score, float) and math.isnan(score)):
            continue
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise RlgenError(f"{_where(source, record)}: score field '{field}' must be a number, got {show_value(score)}")
        group = groups.setdefault(str(record[group_by]), [])
        if all(_content(other) != _content(record) for other in group):
            group.append(record)
    pairs = []
    for members in groups.values():
        ranked = sorted(members, key=lambda r: -float(r[field]))  # stable: earlier samples win ties
        if mode == "best-worst":
            candidates = [(ranked[0], ranked[-1])] if len(ranked) > 1 else []
        else:
            candidates = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:]]
        for best, worst in candidates:
            gap = float(best[field]) - float(worst[field])
            if gap > margin:
                pairs.append(_pair(best, worst, field, gap))
    return pairs


_SAMPLE_FIELDS = ("completion", "image", "sample_index", "completion_tokens", "_line")


def _content(record: dict):
    """What a sample is: its completion (text, or assistant messages as given), or for image samples the
    path of its PNG."""
    value = record.get("completion", record.get("image"))
    return None if value is None else value if isinstance(value, list) else str(value)


def _pair(best: dict, worst: dict, field: str, gap: float) -> dict:
    base = {k: v for k, v in best.items() if k not in _SAMPLE_FIELDS and k != field and not k.startswith("reward")}
    return {**base, "chosen": _content(best), "rejected": _content(worst),
            "chosen_score": float(best[field]), "rejected_score": float(worst[field]), "margin": gap}


def raw_rows(pairs: list[dict]) -> tuple[list, list]:
    """(prompts, answers) with rows [chosen_0, rejected_0, chosen_1, ...], each as given (a string or a chat
    message list), for a trainer that renders them (Trainer.example_texts)."""
    return [p["prompt"] for p in pairs for _ in range(2)], [a for p in pairs for a in (p["chosen"], p["rejected"])]


def interleave(pairs: list[dict]) -> tuple[list[str], list[str]]:
    """(prompts, completions) with rows [chosen_0, rejected_0, chosen_1, ...]: each pair's two rows share
    a prompt and sit next to each other, so the prompt is run once for both."""
    prompts = [message_text(p["prompt"]) for p in pairs for _ in range(2)]
    completions = [message_text(text) for p in pairs for text in (p["chosen"], p["rejected"])]
    return prompts, completions
