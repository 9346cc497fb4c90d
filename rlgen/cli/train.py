"""`rlgen train ALGO`: build the typed config and run the trainer.

Precedence, lowest first: the config class defaults, the model's recommended settings
(`rlgen_defaults.toml` in its directory, e.g. the built-in models'), the algorithm preset, --config TOML,
flags, --set.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from rlgen.cli import options as opt
from rlgen.errors import RlgenError

HELP = """Train a model with ALGO (sft, grpo, rloo, dapo, ..., dpo, simpo, rpo, orpo, kto, online-dpo, rm; see `rlgen plugins`).

Config precedence: the model's recommended settings < algorithm preset < --config TOML < flags < --set. The resolved config is written to
OUT/config.toml; metrics go to OUT/metrics.jsonl, checkpoints to OUT/checkpoints/step-N, the model to OUT/final.
OUT is locked (OUT/.lock) while the run lasts. OUT must be new, empty, or a run that failed before its first checkpoint
(started over); anything else is refused, never overwritten. A step whose loss or gradient norm is NaN/inf stops the
run (optim.skip_nonfinite_steps = true skips its update instead).

Example:

    rlgen train grpo --model tiny-arith --task arithmetic --reward exact-match --out runs/demo

    rlgen train grpo --config run.toml --set algorithm.loss_type=dr_grpo --set rollout.num_generations=4

    rlgen train dpo --model tiny-arith --data pairs.jsonl --task arithmetic --set algorithm.beta=0.1 --out runs/dpo
"""


def model_recommended(algorithm, data: dict) -> dict:
    """Settings a model directory recommends for an algorithm family ([grpo], [sft] ... tables of its
    rlgen_defaults.toml): how a built-in model carries its own learning rate and lengths."""
    from rlgen.config import from_dict, read_toml
    from rlgen.diffusion.pipeline import resolve_pipeline_path
    from rlgen.models.causal_lm import resolve_model_path

    default = algorithm.config_cls().model.path
    model_path = data.get("model", {}).get("path", default) if isinstance(data.get("model"), dict) else default
    try:
        path = resolve_model_path(str(model_path))
    except RlgenError:
        try:
            path = resolve_pipeline_path(str(model_path))
        except RlgenError:
            return {}  # reported with a proper message when the model is loaded
    recommended = path / "rlgen_defaults.toml"
    if not recommended.is_file():
        return {}
    settings = read_toml(recommended).get(algorithm.family, {})
    try:
        from_dict(algorithm.config_cls, settings)
    except RlgenError as exc:
        raise RlgenError(f"{recommended} [{algorithm.family}]: {exc}") from None
    return settings


def build_config(algorithm, config_file, sets, flags: dict, resume_dir: str | None):
    from rlgen.config import apply_override, deep_merge, from_dict, read_toml

    if resume_dir:
        saved = Path(resume_dir) / "config.toml"
        if not saved.is_file():
            raise RlgenError(f"cannot resume: {saved} not found (is {resume_dir} a run directory?)")
        data = read_toml(saved)
    else:
        data = deep_merge({}, algorithm.defaults)
        if config_file:
            data = deep_merge(data, read_toml(config_file))
    user = {}
    sections = {f.name for f in dataclasses.fields(algorithm.config_cls)}
    for dotted, value in flags.items():
        if value is None:
            continue
        section, key = dotted.split(".", 1) if "." in dotted else (dotted, None)
        if section not in sections:
            raise RlgenError(f"`rlgen train {algorithm.name}` has no '{section}' settings (flag for {dotted})")
        if key is None:
            user[section] = value
        else:
            user.setdefault(section, {})[key] = value
    for assignment in sets or []:
        apply_override(user, assignment)
    data = deep_merge(data, user)
    if resume_dir:
        data.setdefault("run", {})["out"] = str(resume_dir)
    else:  # a resumed run's config.toml already holds what the model recommended
        data = deep_merge(model_recommended(algorithm, data), data)
    config = from_dict(algorithm.config_cls, data)
    # Local paths are stored absolute, so a resumed run or a saved adapter finds them from anywhere.
    for section, key in (("model", "path"), ("data", "path")):
        part = getattr(config, section, None)
        value = getattr(part, key, None) if part is not None else None
        if value and Path(value).exists():
            setattr(part, key, str(Path(value).resolve()))
    return config


def train(
    algorithm: str = typer.Argument(..., help="Algorithm name (see `rlgen plugins`)."),
    config: opt.OptStr = typer.Option(None, "--config", "-c", help="TOML config file."),
    sets: opt.StrList = opt.Sets,
    model: opt.OptStr = opt.Model,
    task: opt.OptStr = opt.Task,
    data: opt.OptStr = opt.Data,
    reward: opt.StrList = opt.Reward,
    out: opt.OptStr = typer.Option(None, "--out", "-o", help="Run directory."),
    steps: opt.OptInt = typer.Option(None, "--steps", help="Number of optimiser steps."),
    seed: opt.OptInt = opt.Seed,
    save_every: opt.OptInt = typer.Option(None, "--save-every", help="Checkpoint every N steps (0 = final only)."),
    resume: opt.OptStr = typer.Option(None, "--resume", help="Continue the run in this directory from its newest sound checkpoint (damaged ones are skipped with a warning; no checkpoint: from step 0)."),
    quiet: bool = opt.Quiet,
    json_output: bool = opt.Json,
):
    from rlgen.cli.report import Reporter
    from rlgen.plugins import registry
    from rlgen.rewards.base import RewardSpec
    from rlgen.training.run_dir import RunDir

    algo = registry("algorithm").get(algorithm)
    flags = {
        "model.path": model,
        "data.task": task,
        "data.path": data,
        "rewards": [dataclasses.asdict(RewardSpec.parse(r)) for r in reward] if reward else None,
        "run.out": out,
        "run.steps": steps,
        "run.seed": seed,
        "run.save_every": save_every,
    }
    cfg = build_config(algo, config, sets, flags, resume)
    reporter = Reporter(quiet=quiet, json_output=json_output)
    run_dir = RunDir(cfg.run.out)
    trainer = algo.trainer_cls(cfg, run_dir, reporter, resume=bool(resume))
    last = trainer.fit()
    summary = {"algorithm": algorithm, "out": str(run_dir.root), "final_model": str(run_dir.final), "last_step": last}
    reporter.result(summary, f"done: model saved to {run_dir.final}")


def register(app: typer.Typer) -> None:
    app.command("train", help=HELP, no_args_is_help=True)(train)
