"""`rlgen merge --sweep`: rewarded soups. Interpolate fine-tunes over a grid of weights, evaluate every
point with the given rewards on a task's held-out prompts, and report the Pareto front.

Each point is merged with the same streaming `merge_models` as a plain `rlgen merge` (into a
temporary directory unless the models are kept), then evaluated like `rlgen eval`: greedy
completions for causal LMs, k images per prompt at fixed seeds for diffusers pipelines. An objective
is a reward's mean times the sign of its weight, so `length:-1` asks for short answers. The hypervolume
of the front is measured from a fixed reference point (`hypervolume_reference`; --hv-ref), never from the
sweep's own worst point, so sweeps with the same rewards compare.
"""
from __future__ import annotations

import itertools
import math
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from rlgen.api._backbone import flow_for
from rlgen.data.records import json_text
from rlgen.diffusion.pipeline import DiffusionModelConfig, load_diffusion_model
from rlgen.diffusion.sampling import DiffusionSamplingParams
from rlgen.errors import RlgenError, show_value
from rlgen.evaluation.images import evaluate_image_model
from rlgen.evaluation.pareto import hypervolume, pareto_front
from rlgen.evaluation.plot import plot_front
from rlgen.merging.config import merged_models, validate
from rlgen.merging.merge import merge_models
from rlgen.models.causal_lm import ModelConfig, load_policy
from rlgen.rewards.base import RewardSet, RewardSpec, scoring_device
from rlgen.rollout.engine import HFEngine, SamplingParams
from rlgen.training.trainer import DataConfig, load_records


@dataclass
class SweepSettings:
    grid: int = 11  # points per edge of the weight simplex (11 -> steps of 0.1)
    task: str | None = None
    data: str | None = None
    split: str = "test"
    limit: int | None = None
    rewards: list[str] = field(default_factory=list)
    max_new_tokens: int = 16
    images_per_prompt: int = 4  # image models
    num_steps: int = 20  # image models
    seed: int = 0
    keep_models: bool = False
    hv_ref: str | list[float] | None = None  # hypervolume reference, one value per reward in its units (--hv-ref)
    device: object = None  # the torch.device points are merged and evaluated on (None: the CPU)


def simplex_grid(num_models: int, points_per_edge: int) -> list[tuple[float, ...]]:
    """All weight vectors with entries in {0, 1/(g-1), ..., 1} summing to 1 (g = points_per_edge), ordered
    from the first model alone to the last model alone."""
    if num_models < 2:
        raise RlgenError("--sweep needs at least two models to interpolate")
    if points_per_edge < 2:
        raise RlgenError("--grid must be >= 2 (points per edge of the weight grid)")
    steps = points_per_edge - 1
    grid = []
    for combo in itertools.product(range(steps + 1), repeat=num_models - 1):
        if sum(combo) <= steps:
            grid.append(tuple(c / steps for c in (steps - sum(combo), *combo)))
    return sorted(grid, key=lambda w: tuple(-x for x in w))


def hypervolume_reference(specs, given: str | list[float] | None = None) -> tuple[list[float], str]:
    """(the hypervolume reference point, one value per reward in the reward's own units; "default" or
    "--hv-ref"). A point adds volume only where it is better than the reference in every reward. The
    default is fixed, so hypervolumes of different sweeps with the same rewards compare: 0 for a maximised
    reward and 1 for a minimised one, the worst end of a reward in [0, 1]. Rewards on other scales (a
    length to minimise, say) need --hv-ref: "0,40" = exact-match above 0, length below 40."""
    if given is None:
        return [0.0 if spec.weight >= 0 else 1.0 for spec in specs], "default"
    items = given.split(",") if isinstance(given, str) else list(given)
    try:
        values = [float(v) for v in items]
    except (TypeError, ValueError):
        raise RlgenError(f"--hv-ref expects comma-separated numbers, one per --reward, "
                         f"got {show_value(given)}") from None
    if len(values) != len(specs):
        raise RlgenError(f"--hv-ref has {len(values)} value(s) for {len(specs)} reward(s) "
                         f"({', '.join(spec.name for spec in specs)}): give one per --reward, in order")
    if not all(math.isfinite(v) for v in values):
        raise RlgenError(f"--hv-ref values must be finite numbers, got {show_value(given)}")
    return values, "--hv-ref"


def objectives(means: dict[str, float], specs) -> list[float]:
    """Each reward's mean oriented for maximisation (times the sign of its weight)."""
    return [means[spec.name] * (1.0 if spec.weight >= 0 else -1.0) for spec in specs]


def _lm_evaluator(settings: SweepSettings, rewards) -> Callable[[Path], dict]:
    records = load_records(DataConfig(task=settings.task, path=settings.data), settings.split, required=("prompt",))
    records = records[: settings.limit] if settings.limit else records

    def evaluate(model_dir: Path) -> dict:
        policy, tokenizer, _ = load_policy(ModelConfig(path=str(model_dir)))
        engine = HFEngine(policy.to(settings.device or "cpu").eval(), tokenizer)
        out = engine.generate([r["prompt"] for r in records],
                              SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=0.0))
        samples = [{**r, "completion": text} for r, text in zip(records, out.texts)]
        components, _ = rewards.compute(samples)
        return {name: float(components[:, i].nanmean()) for i, name in enumerate(rewards.names)}

    return evaluate


def _image_evaluator(settings: SweepSettings, rewards) -> Callable[[Path], dict]:
    records = load_records(DataConfig(task=settings.task, path=settings.data), settings.split)
    records = records[: settings.limit] if settings.limit else records
    params = DiffusionSamplingParams(settings.num_steps, 1.0, 0.0, 0.0)

    def evaluate(model_dir: Path) -> dict:
        model = load_diffusion_model(DiffusionModelConfig(path=str(model_dir)))
        model.to(settings.device or "cpu").eval()
        model.check_prompts(records)
        stats, _ = evaluate_image_model(model, records, rewards, settings.images_per_prompt, params, seed=settings.seed)
        return {name: stats[f"rewards/{name}/mean"] for name in rewards.names}

    return evaluate


def run_sweep(config, settings: SweepSettings, out: str, progress: Callable[[str], None] | None = None) -> dict:
    """Merge and evaluate every grid point of `config` (its models' weights are set by the grid); write
    OUT/sweep.jsonl, OUT/front.png and OUT/summary.json; return the summary."""
    if not settings.rewards:
        raise RlgenError("--sweep needs at least one --reward to evaluate the points with")
    if not settings.task and not settings.data:
        raise RlgenError("--sweep needs --task NAME or --data FILE (the prompts each point is evaluated on)")
    specs = [RewardSpec.parse(r) for r in settings.rewards]
    rewards = RewardSet(specs)
    hv_reference, hv_source = hypervolume_reference(specs, settings.hv_ref)
    # Checked before anything is written, with a weight on every model as each point will have.
    method = validate(replace(config, models=[replace(m, parameters={**m.parameters, "weight": 1.0})
                                              for m in config.models]))
    listed = merged_models(config, method)
    swept = [i for i, m in enumerate(config.models) if m in listed]
    weights_grid = simplex_grid(len(listed), settings.grid)
    evaluator = flow_for({"causal-lm": _lm_evaluator, "diffusers": _image_evaluator}, listed[0].model, "the merge sweep")
    evaluate = evaluator(settings, rewards)

    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise RlgenError(f"{target} exists and is not empty (choose another --out)")
    target.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".sweep-", dir=target))
    points = []
    try:
        for index, weights in enumerate(weights_grid):
            label = "-".join(f"{w:.2f}" for w in weights)
            model_dir = (target / "models" / label) if settings.keep_models else (scratch / label)
            point_config = _with_weights(config, swept, weights)
            merge_models(point_config, str(model_dir), device=settings.device)
            with scoring_device(settings.device or "cpu"):
                means = evaluate(model_dir)
            if not settings.keep_models:
                shutil.rmtree(model_dir, ignore_errors=True)
            points.append({"weights": list(weights), "rewards": means})
            if progress:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in means.items())
                progress(f"point {index + 1}/{len(weights_grid)} weights {label}: {shown}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    values = [objectives(p["rewards"], specs) for p in points]
    front = set(pareto_front(values))
    # in objective units (every objective maximised), like the values
    reference = [r * (1.0 if spec.weight >= 0 else -1.0) for r, spec in zip(hv_reference, specs)]
    for i, point in enumerate(points):
        point["on_front"] = i in front
    summary = {
        "method": config.method,
        "models": [m.model for m in listed],
        "base": config.base,
        "rewards": [{"name": s.name, "direction": "max" if s.weight >= 0 else "min"} for s in specs],
        "points": points,
        "front": sorted(front),
        "hypervolume": hypervolume([values[i] for i in sorted(front)], reference) if len(specs) > 1 else None,
        "hypervolume_reference": hv_reference,  # per reward, in its units
        "hypervolume_reference_source": hv_source,
        # front points that add nothing: not better than the reference in every reward (see --hv-ref)
        "front_points_outside_reference": sum(not all(v > r for v, r in zip(values[i], reference)) for i in front),
        "out": str(target),
    }
    _write_jsonl(target / "sweep.jsonl", points)
    if len(specs) >= 2:
        plot_front(points, specs[0].name, specs[1].name, str(target / "front.png"),
                   title=f"{config.method} sweep: {' vs '.join(_short_name(m.model) for m in listed)}",
                   labels=[f"{s.name} ({'higher' if s.weight >= 0 else 'lower'} is better)" for s in specs[:2]])
        summary["plot"] = str(target / "front.png")
    (target / "summary.json").write_text(json_text(summary, indent=2) + "\n")  # NaN / inf -> null
    return summary


def _short_name(model: str) -> str:
    """A run's name for a plot: runs/correct/final -> correct."""
    path = Path(model)
    return path.parent.name if path.name in ("final", "") and path.parent.name else path.name


def _with_weights(config, swept: list[int], weights) -> object:
    """`config` with the weight of model swept[k] set to weights[k] (other parameters kept)."""
    models = list(config.models)
    for index, weight in zip(swept, weights):
        models[index] = replace(models[index], parameters={**models[index].parameters, "weight": weight})
    return replace(config, models=models)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json_text(r) + "\n" for r in rows))
    tmp.replace(path)
