"""`rlgen eval compare RUN_A RUN_B ...`: the final metrics of several run directories side by side, and one
PNG per metric with the runs' curves overlaid.

A run directory needs `metrics.jsonl` (one JSON object per line with `step`); its resolved `config.toml`,
when present, gives the model and the algorithm. rlgen's config does not store the algorithm's name, so it
is inferred from the config's sections and keys (e.g. "grpo/dapo" for GRPO-family runs: advantage / policy
loss; "preference/sigmoid" for DPO-family runs: the preference loss; "sft", "kto", "rm", "online-dpo/..."),
unless the config has an `algorithm` string or `algorithm.name`.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence

from rlgen.config import TomlError, loads_toml
from rlgen.errors import RlgenError
from rlgen.evaluation.plot import save_figure

# (metric key, its summary columns): last value, best (max) value and the step of the best
EVAL_KEYS = ("eval/accuracy", "eval/reward", "eval/pair_accuracy")
WALL_TIME_KEYS = ("wall_time", "elapsed", "elapsed_s", "time")


def read_metrics(run: Path) -> list[dict]:
    """The rows of RUN/metrics.jsonl; errors name the path."""
    run = Path(run)
    if not run.exists():
        raise RlgenError(f"{run}: no such run directory")
    if not run.is_dir():
        raise RlgenError(f"{run} is not a run directory")
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise RlgenError(f"{run} is not a run directory (no {path})")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise RlgenError(f"{path}, line {lineno}: malformed JSON") from None
        if not isinstance(row, dict):
            raise RlgenError(f"{path}, line {lineno}: not a JSON object")
        rows.append(row)
    if not rows:
        raise RlgenError(f"{path} is empty")
    return rows


def read_config(run: Path) -> dict | None:
    """RUN/config.toml as a dict, or None when the run has none."""
    path = Path(run) / "config.toml"
    if not path.is_file():
        return None
    try:
        return loads_toml(path.read_text(), str(path))
    except TomlError as exc:
        raise RlgenError(f"{path}: invalid TOML ({exc.reason})") from None


def algorithm_label(config: dict | None) -> str | None:
    """The algorithm of a resolved config: its explicit name, or inferred from its sections and keys."""
    if not config:
        return None
    algo = config.get("algorithm")
    if isinstance(algo, str):
        return algo
    if not isinstance(algo, dict):
        return "sft" if "sft" in config else None  # run dirs from before SFT's section became [algorithm]
    if isinstance(algo.get("name"), str):
        return algo["name"]
    loss = algo.get("loss_type")
    if "advantage" in algo:
        return f"{algo['advantage']}/{loss}"  # GRPO family: advantage estimator / policy loss
    if "completion_only_loss" in algo:
        return "sft"
    if "desirable_weight" in algo:
        return "kto"
    if "center_rewards_coefficient" in algo:
        return "rm"
    if "ref_update_every" in algo:
        return f"online-dpo/{loss}"
    if loss is not None:
        return f"preference/{loss}"
    return None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def summarize_run(rows: list[dict], config: dict | None) -> dict:
    """Final metrics of one run: steps, last / best / best step of each eval metric, last train reward,
    the training time (sum of `step_time`) and the wall time when the run logged one."""
    steps = [r["step"] for r in rows if _number(r.get("step"))]
    model = (config or {}).get("model", {})
    out: dict = {
        "algorithm": algorithm_label(config),
        "model": model.get("path") if isinstance(model, dict) else None,
        "steps": max(steps) if steps else None,
    }
    for key in EVAL_KEYS:
        points = [(r.get("step"), r[key]) for r in rows if _number(r.get(key))]
        if points:
            best = max(points, key=lambda p: p[1])  # the first step reaching the maximum
            out[f"{key}_last"] = points[-1][1]
            out[f"{key}_best"] = best[1]
            out[f"{key}_best_step"] = best[0]
    rewards = [r["reward"] for r in rows if _number(r.get("reward"))]
    if rewards:
        out["reward_last"] = rewards[-1]
    times = [r["step_time"] for r in rows if _number(r.get("step_time"))]
    if times:
        out["train_time_s"] = round(sum(times), 3)
    for key in WALL_TIME_KEYS:
        logged = [r[key] for r in rows if _number(r.get(key))]
        if logged:
            out["wall_time_s"] = logged[-1]
            break
    return out


def run_names(runs: Sequence[Path]) -> list[str]:
    """Short labels: each run's directory name, or more of its path where names collide."""
    paths = [Path(r) for r in runs]
    names = [p.name or str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    return names


def metric_keys(runs_rows: Sequence[list[dict]]) -> list[str]:
    """Numeric metric keys present in at least one run (step excluded), in first-seen order."""
    keys: dict[str, None] = {}
    for rows in runs_rows:
        for row in rows:
            for key, value in row.items():
                if key != "step" and _number(value):
                    keys.setdefault(key, None)
    return list(keys)


def plot_file_names(keys: Sequence[str]) -> dict[str, str]:
    """A distinct, filesystem-safe PNG name per metric key ("eval/accuracy" -> "eval_accuracy.png")."""
    names: dict[str, str] = {}
    used: set[str] = set()
    for key in keys:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_.") or "metric"
        candidate, k = stem, 2
        while candidate.lower() in used:
            candidate, k = f"{stem}-{k}", k + 1
        used.add(candidate.lower())
        names[key] = f"{candidate}.png"
    return names


def compare_runs(runs: Sequence[str | Path], plot_dir: str | Path | None = None) -> dict:
    """{"runs": [per-run summary with "name" and "path"], "metrics": keys, "plots": {key: png}}; the plots
    only with `plot_dir`. Every run is read (and every error raised) before any file is written."""
    if not runs:
        raise RlgenError("eval compare needs at least one run directory (rlgen eval compare RUN_A RUN_B ...)")
    paths = [Path(r) for r in runs]
    all_rows = [read_metrics(p) for p in paths]
    configs = [read_config(p) for p in paths]
    names = run_names(paths)
    summaries = [{"name": name, "path": str(path), **summarize_run(rows, config)}
                 for name, path, rows, config in zip(names, paths, all_rows, configs)]
    keys = metric_keys(all_rows)
    result: dict = {"runs": summaries, "metrics": keys}
    if plot_dir is not None:
        files = plot_file_names(keys)
        target = Path(plot_dir)
        if target.exists() and not target.is_dir():
            raise RlgenError(f"--plot-dir {target} exists and is not a directory")
        plots = {}
        for key in keys:
            curves = {name: [(r.get("step"), r[key]) for r in rows if _number(r.get(key)) and _number(r.get("step"))]
                      for name, rows in zip(names, all_rows)}
            out = target / files[key]
            plot_curves(key, curves, out)
            plots[key] = str(out)
        result["plots"] = plots
    return result


def plot_curves(key: str, curves: dict[str, list[tuple[float, float]]], out: Path) -> None:
    """One metric's curves (step -> value), one line per run, labelled by run name; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for name, points in curves.items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=name,
                    marker="o" if len(points) < 30 else None, markersize=3)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out, dpi=100)


SUMMARY_COLUMNS = (("steps", "steps"), ("eval/accuracy_last", "eval acc last"), ("eval/accuracy_best", "eval acc best"),
                   ("eval/reward_last", "eval reward last"), ("eval/reward_best", "eval reward best"),
                   ("eval/pair_accuracy_last", "pair acc last"), ("eval/pair_accuracy_best", "pair acc best"),
                   ("reward_last", "train reward last"), ("train_time_s", "train time (s)"),
                   ("wall_time_s", "wall time (s)"))


def print_comparison(console, result: dict) -> None:
    """The comparison as a rich table (one row per run; columns present in at least one run)."""
    from rich.table import Table

    runs = result["runs"]
    columns = [(key, label) for key, label in SUMMARY_COLUMNS if any(r.get(key) is not None for r in runs)]
    table = Table(show_header=True, header_style="bold")
    for label in ("run", "algorithm", "model", *[label for _, label in columns]):
        table.add_column(label)
    for r in runs:
        model = r.get("model")
        cells = [r["name"], r.get("algorithm") or "-", Path(model).name if model and "/" in model else (model or "-")]
        for key, _ in columns:
            value = r.get(key)
            cells.append("-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value))
        table.add_row(*cells)
    console.print(table)
    for key, path in result.get("plots", {}).items():
        console.print(f"{key}: {path}")
