"""`rlgen train ALGO`: build the typed config and run the trainer.

Precedence, lowest first: the config class defaults, the model's recommended settings
(`rlgen_defaults.toml` in its directory, e.g. the built-in models'), the algorithm preset, --config TOML,
flags, --set.
"""
from __future__ import annotations

import dataclasses

import typer

from rlgen.cli import options as opt

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


def build_config(algorithm, config_file, sets, flags: dict, resume_dir: str | None):
    """The typed config of the command line (kept for callers of the old name; see rlgen.load_config)."""
    from rlgen.api import load_config

    return load_config(algorithm, config_file, sets=sets, resume=resume_dir, **flags)


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
    from rlgen.api import train as run_training
    from rlgen.cli.report import Reporter
    from rlgen.rewards.base import RewardSpec

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
    reporter = Reporter(quiet=quiet, json_output=json_output)
    run = run_training(algorithm, config, sets=sets, resume=resume, callbacks=reporter.events(), **flags)
    reporter.result(run.summary(), f"done: model saved to {run.final_model}")


def register(app: typer.Typer) -> None:
    app.command("train", help=HELP, no_args_is_help=True)(train)
