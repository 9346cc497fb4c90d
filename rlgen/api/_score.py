"""`rlgen.score` and `rlgen.pairs`: rewards onto samples, and scored samples into preference pairs."""
from __future__ import annotations

import os
from pathlib import Path

from rlgen.api._inputs import check_records, device_for, string_list, without_line_numbers
from rlgen.data.preferences import make_pairs
from rlgen.data.chat import message_text
from rlgen.data.records import check_text, read_records
from rlgen.errors import RlgenError


def _records_and_name(records, required=()) -> tuple[list[dict], str | None]:
    """(records, the file they came from or None): `records` is a list, or a JSONL/Parquet path ('-' = stdin)."""
    if isinstance(records, (str, Path)):
        return read_records(str(records), required=required, messages=True), str(records)
    return check_records("records", records), None


def score(records, rewards, *, on_error: str = "raise", combine: str = "weighted-sum", shape: str = "",
          device: str = "auto") -> list[dict]:
    """Each record plus `reward_NAME` per reward (raw values; None where it failed) and `reward`, the
    rewards combined (`combine`) then shaped (`shape`). `records` is a list or a JSONL/Parquet path ('-' =
    stdin); `rewards` NAME[:WEIGHT] or module:function[:WEIGHT] strings. Image paths are read relative to
    the records file's folder (the current one for a list or stdin); the output keeps them as given.
    Rewards that run a model (rm:PATH, digit-classifier ...) run it on `device` (auto, cpu, cuda, cuda:N)."""
    from rlgen.rewards.base import RewardSet, RewardSpec, scoring_device  # imports torch: `rlgen pairs` must not load it

    target = device_for(device)  # before any reward model loads
    names = string_list("rewards", rewards, "NAME[:WEIGHT] reward strings") or []
    if not names:
        raise RlgenError("no reward given (use --reward NAME)")
    import torch

    reward_set = RewardSet([RewardSpec.parse(r) for r in names], on_error, combine=combine, shaping=shape,
                           dtype=torch.float64)
    records, source = _records_and_name(records, required=("prompt",))
    with scoring_device(target):
        components, valid, totals = reward_set.score(_with_resolved_images(records, source))
    scored_records = []
    for i, record in enumerate(records):
        scored = dict(record)
        for k, name in enumerate(reward_set.names):
            value = float(components[i, k])
            scored[f"reward_{name}"] = None if value != value else value
        scored["reward"] = float(totals[i]) if bool(valid[i]) else None
        scored_records.append(scored)
    return without_line_numbers(scored_records)


def _with_resolved_images(records: list[dict], source: str | None) -> list[dict]:
    """Each record needs a `completion` (text) or an `image` (a PNG path, or a tensor in Python); the rewards
    see absolute image paths."""
    name = "<stdin>" if source == "-" else (source or "records")
    base = Path(source).resolve().parent if source not in (None, "-") else Path.cwd()
    out = []
    for number, record in enumerate(records, start=1):
        if "completion" not in record and "image" not in record:
            line = record.get("_line", number)
            raise RlgenError(f"{name}, line {line}: missing field 'completion' (or 'image' for image samples)")
        if "completion" not in record and not hasattr(record["image"], "shape"):
            check_text(name, record, "image")  # a path, not a number or a list
        if isinstance(record.get("image"), str):
            record = {**record, "image": str(base / record["image"])}
        # rewards read text: a conversational sample's messages as their contents (the record keeps them)
        texts = {k: message_text(record[k]) for k in ("prompt", "completion") if isinstance(record.get(k), list)}
        out.append({**record, **texts} if texts else record)
    return out


def pairs(records, *, mode: str = "best-worst", field: str = "reward", margin: float = 0.0, group_by: str = "prompt",
          source: str | None = None, out: str | None = None) -> list[dict]:
    """Preference pairs (prompt, chosen, rejected, chosen_score, rejected_score, margin, the prompt record's
    other fields) from scored samples grouped by `group_by`: each group's best against its worst
    (mode "best-worst"), or every pair whose score gap is above `margin` (mode "all"). `records` is a list
    or a JSONL/Parquet path (`source`: the file a list was read from, for messages and image paths).
    Image samples' relative PNG paths are rebased from the source's folder onto `out`'s (the JSONL the
    pairs are meant for; default the current folder)."""
    records, path = _records_and_name(records)
    source = path or source
    made = make_pairs(records, mode=mode, field=field, margin=margin, group_by=group_by,
                      source="<stdin>" if source == "-" else (source or "records"))
    return _rebase_image_paths(made, records, source, out)


def pair_stats(records: list[dict], made: list[dict], group_by: str = "prompt") -> dict:
    """{"samples", "groups", "pairs"}: what `rlgen pairs --json` reports."""
    return {"samples": len(records), "groups": len({str(r.get(group_by)) for r in records}), "pairs": len(made)}


def _rebase_image_paths(made: list[dict], records: list[dict], source: str | None, out: str | None) -> list[dict]:
    """Image samples' PNG paths are relative to their JSONL's folder: keep them valid from the pairs file's."""
    if not records or "completion" in records[0] or not isinstance(records[0].get("image"), str):
        return made
    src = Path(source).resolve().parent if source not in (None, "-") else Path.cwd()
    dst = Path(out).resolve().parent if out not in (None, "-") else Path.cwd()
    if src == dst:
        return made

    def rebase(path: str) -> str:
        return path if os.path.isabs(path) else os.path.relpath(src / path, dst)

    return [{**pair, "chosen": rebase(pair["chosen"]), "rejected": rebase(pair["rejected"])} for pair in made]
