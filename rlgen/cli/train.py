"""`rlgen train ALGO`: build the typed config and run the trainer.

Precedence, lowest first: the config class defaults, the model's recommended settings
(`rlgen_defaults.toml` in its directory, e.g. the built-in models'), the algorithm preset, --config TOML,
flags, --set.
"""
from __future__ import annotations

import dataclasses
from enum import Enum

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

Devices and processes: --device picks where the model trains (run.device; default auto: CUDA when available), --precision its numerics (run.precision). --nproc N trains data-parallel in N processes on this machine (one per GPU, or N CPU processes with gloo): the same command runs again under torchrun, every process draws the same global batch and trains on its share, the gradients are summed, and rank 0 alone writes OUT and prints. Algorithms that do not run multi-process yet say so in one line. Several machines: run torchrun yourself on each, with the same command (no --nproc):

    rlgen train sft --model tiny-arith --task arithmetic --nproc 2 --out runs/sft2

    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m rlgen train sft ... --out runs/sft
"""


class Precision(str, Enum):
    fp32 = "fp32"
    bf16_mixed = "bf16-mixed"
    bf16 = "bf16"
    fp16_mixed = "fp16-mixed"



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
    eval_data: opt.OptStr = typer.Option(None, "--eval-data", help="Held-out records (data.eval_path) for the evaluation every run.eval_every steps, never trained on; without it a --data file holds out data.eval_fraction of itself."),
    reward: opt.StrList = opt.Reward,
    out: opt.OptStr = typer.Option(None, "--out", "-o", help="Run directory."),
    steps: opt.OptInt = typer.Option(None, "--steps", help="Number of optimiser steps."),
    seed: opt.OptInt = opt.Seed,
    save_every: opt.OptInt = typer.Option(None, "--save-every", help="Checkpoint every N steps (0 = final only)."),
    resume: opt.OptStr = typer.Option(None, "--resume", help="Continue the run in this directory from its newest sound checkpoint (damaged ones are skipped with a warning; no checkpoint: from step 0)."),
    device: opt.OptStr = typer.Option(None, "--device", help="Where the model trains (run.device): auto (CUDA when available; under torchrun the GPU of LOCAL_RANK), cpu, cuda or cuda:N."),
    precision: Precision = typer.Option(None, "--precision", help="run.precision: fp32, bf16-mixed (bf16 autocast, fp32 weights), bf16 (bf16 weights), fp16-mixed (fp16 autocast, loss scaling)."),
    nproc: opt.OptInt = typer.Option(None, "--nproc", help="Data-parallel processes on this machine, launched with torchrun (1 = this process)."),
    quiet: bool = opt.Quiet,
    json_output: bool = opt.Json,
):
    from rlgen.api import train as run_training
    from rlgen.cli.report import Reporter
    from rlgen.config import COUNT
    from rlgen.rewards.base import RewardSpec

    opt.check_options(("--nproc", nproc, COUNT))
    if device is not None:
        opt.check_device(device)
    flags = {
        "model.path": model,
        "data.task": task,
        "data.path": data,
        "data.eval_path": eval_data,
        "rewards": [dataclasses.asdict(RewardSpec.parse(r)) for r in reward] if reward else None,
        "run.out": out,
        "run.steps": steps,
        "run.seed": seed,
        "run.save_every": save_every,
        "run.device": device,
        "run.precision": Precision(precision).value if precision is not None else None,
    }
    if nproc is not None and nproc > 1:
        raise typer.Exit(_launch(algorithm, nproc, config, sets, resume, flags))
    reporter = Reporter(quiet=quiet, json_output=json_output)
    run = run_training(algorithm, config, sets=sets, resume=resume, callbacks=reporter.events(), **flags)
    if run.rank == 0:  # under torchrun the other processes print nothing
        reporter.result(run.summary(), f"done: model saved to {run.final_model}")


def _launch(algorithm: str, nproc: int, config, sets, resume, flags: dict) -> int:
    """This command again in `nproc` processes under torchrun; their exit status. What a process would
    refuse (an algorithm without multi-process training, a bad config or device) is refused here, once."""
    import os
    import sys

    from rlgen.api import load_config
    from rlgen.api._config import algorithm_entry
    from rlgen.cli.launch import Invocation, run_torchrun, torchrun_command
    from rlgen.devices import resolve_device
    from rlgen.errors import RlgenError

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise RlgenError("--nproc inside a torchrun launch: give the processes to torchrun, or --nproc without it")
    entry = algorithm_entry(algorithm)
    if not getattr(entry.trainer_cls, "supports_distributed", False):
        raise RlgenError(f"--nproc {nproc}: `rlgen train {algorithm}` does not run multi-process yet; use --nproc 1")
    typed = load_config(entry, config, sets=sets, resume=resume, **flags)
    device = resolve_device(typed.run.device, "run.device", local_rank=0)
    if device.type == "cuda":  # one GPU per process: two ranks on one GPU fail in NCCL ("Duplicate GPU")
        import torch

        if typed.run.device.startswith("cuda:"):
            raise RlgenError(f"--nproc {nproc} with run.device = {typed.run.device}: each process takes the GPU of "
                             "its LOCAL_RANK; use --device cuda (or CUDA_VISIBLE_DEVICES to choose the GPUs)")
        if nproc > torch.cuda.device_count():
            raise RlgenError(f"--nproc {nproc} needs one GPU per process; this machine has {torch.cuda.device_count()}")
    args = Invocation.args or sys.argv[1:]  # sys.argv: a caller that runs the typer app without rlgen's main
    return run_torchrun(torchrun_command(nproc, args), debug=Invocation.debug)


def register(app: typer.Typer) -> None:
    app.command("train", help=HELP, no_args_is_help=True)(train)
