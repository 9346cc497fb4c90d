"""`rlgen eval`: a model on a task's held-out split, a JSONL of scored samples, or a run directory."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from rlgen.cli import options as opt
from rlgen.errors import RlgenError

HELP = """Evaluate a model on a task (greedy or --sampler accuracy, pass@k), summarise scored JSONL, or plot a run.

Examples:

    rlgen eval --model runs/demo/final --task arithmetic --json

    rlgen eval --model tiny-arith --task arithmetic -k 8

    rlgen eval --model tiny-arith --task arithmetic --sampler best-of-n --sampler-opt n=8 --sampler-reward exact-match

    rlgen sample --task arithmetic -n 4 | rlgen score -r exact-match | rlgen eval -

    rlgen eval runs/demo --plot curves.png

    rlgen eval --rm runs/rm/final --data pairs.jsonl --json   # reward-model pairwise accuracy (RewardBench convention)
"""


def evaluate(
    source: opt.OptStr = typer.Argument(None, help="Scored JSONL file, '-' (stdin), or a run directory."),
    model: opt.OptStr = opt.Model,
    task: opt.OptStr = opt.Task,
    data: opt.OptStr = opt.Data,
    split: str = typer.Option("test", "--split", help="Task split to evaluate on."),
    limit: opt.OptInt = typer.Option(None, "--limit", help="Evaluate only the first N problems."),
    k: int = typer.Option(1, "-k", help="Samples per problem for pass@k (k > 1 samples at --temperature)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Temperature of the pass@k samples and of --sampler."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Maximum completion length in tokens."),
    reward: opt.StrList = opt.Reward,
    seed: int = typer.Option(0, "--seed", help="Random seed of the pass@k samples."),
    plot: opt.OptStr = typer.Option(None, "--plot", help="With a run directory: write the metric curves to this PNG."),
    samples_out: opt.OptStr = typer.Option(None, "--samples-out", help="Write the evaluated samples (greedy or --sampler's) as JSONL."),
    sampler: opt.OptStr = typer.Option(
        None, "--sampler", help="With --model: evaluate one completion per problem from this sampler (plain, best-of-n, smc) "
        "at --temperature instead of greedy."),
    sampler_opt: opt.StrList = typer.Option(None, "--sampler-opt", help="Sampler option KEY=VALUE (TOML value); repeatable."),
    sampler_reward: opt.StrList = typer.Option(
        None, "--sampler-reward", help="Guide reward of --sampler: NAME[:WEIGHT] or module:function[:WEIGHT]; repeatable."),
    rm: opt.OptStr = typer.Option(
        None, "--rm", help="A reward model directory: with --data PAIRS, its pairwise accuracy (chosen must score higher; "
        "a tie counts as wrong), overall and per `subset`."),
    num_steps: int = typer.Option(20, "--num-steps", help="Image models: denoising steps."),
    guidance_scale: float = typer.Option(1.0, "--guidance-scale", help="Image models: classifier-free guidance weight."),
    eta: float = typer.Option(0.0, "--eta", help="Image models: step noise (DDIM eta / flow SDE noise level); 0 = deterministic."),
    quiet: bool = opt.Quiet,
    json_output: bool = opt.Json,
):
    from rlgen.cli.report import Reporter
    from rlgen.diffusion.pipeline import is_image_model

    reporter = Reporter(quiet=quiet, json_output=json_output)
    if rm:
        if model:
            raise RlgenError("give either --rm (pairwise accuracy of a reward model) or --model, not both")
        result = _eval_reward_model(rm, data, limit)
    elif is_image_model(model):
        result = _eval_image_model(model, task, data, split, limit, k, reward, seed, samples_out, sampler, sampler_opt,
                                   sampler_reward, num_steps, guidance_scale, eta)
    elif model:
        result = _eval_model(model, task, data, split, limit, k, temperature, max_new_tokens, reward, seed, samples_out,
                             sampler, sampler_opt, sampler_reward)
    elif source and source != "-" and Path(source).is_dir():
        result = _eval_run(Path(source), plot)
    elif source:
        result = _eval_samples(source)
    else:
        raise RlgenError("nothing to evaluate: give --model M --task T, a scored JSONL file, '-' or a run directory")
    if json_output:
        reporter.emit_json(result)
    else:
        _print_table(reporter, result)


def _eval_model(model, task, data, split, limit, k, temperature, max_new_tokens, reward, seed, samples_out,
                sampler=None, sampler_opt=None, sampler_reward=None):
    import torch

    from rlgen.data.records import write_records
    from rlgen.evaluation.metrics import correctness_rewards, evaluate_model
    from rlgen.models.causal_lm import ModelConfig, load_policy
    from rlgen.plugins import registry
    from rlgen.rewards.base import RewardSet, RewardSpec
    from rlgen.training.trainer import DataConfig, load_records

    if not task and not data:
        raise RlgenError("--model needs --task NAME or --data FILE to evaluate on")
    sampler_options, guide = _sampler_setup(sampler, sampler_opt, sampler_reward)
    records = load_records(DataConfig(task=task, path=data), split, required=("prompt", "answer"))
    if limit:
        records = records[:limit]
    if reward:
        rewards = RewardSet([RewardSpec.parse(r) for r in reward])
    else:
        rewards = correctness_rewards(registry("task").get(task).default_rewards if task and not data else ("exact-match",))
    policy, tokenizer, path = load_policy(ModelConfig(path=model))
    from rlgen.rollout.engine import HFEngine

    engine = HFEngine(policy.eval(), tokenizer)
    result = evaluate_model(engine, records, rewards, max_new_tokens, k=k, temperature=temperature,
                            generator=torch.Generator().manual_seed(seed), sampler=sampler, sampler_rewards=guide,
                            sampler_options=sampler_options)
    if samples_out:
        write_records(result["samples"], samples_out)
    return {"model": str(path), "task": task or data, "split": split, "reward": rewards.names[0], "sampler": "greedy",
            **result["metrics"]}


def _eval_image_model(model, task, data, split, limit, k, reward, seed, samples_out, sampler, sampler_opt, sampler_reward,
                      num_steps, guidance_scale, eta) -> dict:
    """Reward statistics of k images per prompt at fixed seeds (overall and per prompt)."""
    from rlgen.data.records import write_records
    from rlgen.diffusion.pipeline import DiffusionModelConfig, load_diffusion_model
    from rlgen.diffusion.sampling import DiffusionSamplingParams
    from rlgen.evaluation.images import evaluate_image_model
    from rlgen.plugins import registry
    from rlgen.rewards.base import RewardSet, RewardSpec
    from rlgen.rollout.samplers import prepare_sampler
    from rlgen.training.trainer import DataConfig, load_records

    if not task and not data:
        raise RlgenError("--model needs --task NAME or --data FILE (prompts) to evaluate on")
    if k < 1:
        raise RlgenError("-k (images per prompt) must be >= 1")
    strategy, options, guide = (prepare_sampler(sampler, sampler_opt, sampler_reward, kind="image-sampler")
                                if sampler else (None, {}, None))
    names = reward or (list(registry("task").get(task).default_rewards) if task and not data else [])
    if not names:
        raise RlgenError("no reward given for the image evaluation (use --reward NAME, e.g. digit-classifier)")
    rewards = RewardSet([RewardSpec.parse(r) for r in names])
    records = load_records(DataConfig(task=task, path=data), split)
    records = records[:limit] if limit else records
    params = DiffusionSamplingParams(num_steps, guidance_scale, eta, eta)
    params.validate()
    diffusion = load_diffusion_model(DiffusionModelConfig(path=model))
    diffusion.eval()
    diffusion.check_prompts(records)
    stats, samples = evaluate_image_model(diffusion, records, rewards, k, params, seed=seed, sampler=strategy,
                                          sampler_options=options, guide=guide)
    if samples_out:
        write_records([{key: v for key, v in s.items() if key != "image"} for s in samples], samples_out)
    return {"model": str(diffusion.path), "task": task or data, "split": split, "reward": "+".join(rewards.names),
            "sampler": sampler or "plain", "images_per_prompt": k, "num_steps": num_steps, **stats}


def _sampler_setup(sampler, sampler_opt, sampler_reward):
    """(--sampler-opt options, --sampler-reward guide), checked before any model is loaded."""
    if sampler is None:
        if sampler_opt or sampler_reward:
            raise RlgenError("--sampler-opt and --sampler-reward need --sampler NAME")
        return {}, None
    from rlgen.rollout.samplers import prepare_sampler

    _, options, guide = prepare_sampler(sampler, sampler_opt, sampler_reward)
    return options, guide


def _eval_reward_model(path: str, data: str | None, limit: int | None) -> dict:
    from rlgen.algorithms.reward_modeling import pair_accuracy
    from rlgen.data.preferences import read_pairs
    from rlgen.models.causal_lm import resolve_model_path
    from rlgen.models.reward_model import load_reward_model

    if not data:
        raise RlgenError("--rm needs --data PAIRS (JSONL/Parquet with prompt, chosen, rejected)")
    pairs = read_pairs(data)
    if limit:
        pairs = pairs[:limit]
    model, tokenizer = load_reward_model(resolve_model_path(path))
    return {"reward_model": path, "data": data, **pair_accuracy(model, tokenizer, pairs)}


def _eval_samples(source: str) -> dict:
    from rlgen.data.records import read_records
    from rlgen.evaluation.metrics import reward_stats

    records = read_records(source)
    fields = sorted({key for r in records for key in r if key == "reward" or key.startswith("reward_")})
    result: dict = {"num_samples": len(records)}
    for field in fields:
        values = [r.get(field) for r in records]
        result[field] = reward_stats([v for v in values if isinstance(v, (int, float))])
    correctness = [f for f in fields if f in ("reward_exact-match", "reward_numeric-match", "reward_countdown")]
    if correctness:
        result["accuracy"] = result[correctness[0]].get("mean")
    if not fields:
        raise RlgenError(f"{source}: no reward fields to summarise (run `rlgen score` first)")
    return result


def _eval_run(run: Path, plot: str | None) -> dict:
    metrics_path = run / "metrics.jsonl"
    if not metrics_path.is_file():
        raise RlgenError(f"{run} is not a run directory (no metrics.jsonl)")
    rows = []
    for lineno, line in enumerate(metrics_path.read_text().splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise RlgenError(f"{metrics_path}, line {lineno}: malformed JSON") from None
    if not rows:
        raise RlgenError(f"{metrics_path} is empty")
    if plot:
        from rlgen.evaluation.plot import plot_run

        plot_run(rows, plot, title=str(run))
    last = rows[-1]
    evals = [r["eval/accuracy"] for r in rows if r.get("eval/accuracy") is not None]
    result = {"run": str(run), "steps": last.get("step"), "final": last}
    if evals:
        result["eval_accuracy_first"] = evals[0]
        result["eval_accuracy_last"] = evals[-1]
    if plot:
        result["plot"] = plot
    return result


def _print_table(reporter, result: dict) -> None:
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value")

    def add(prefix, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{prefix}.{key}" if prefix else key, inner)
        else:
            table.add_row(prefix, f"{value:.4f}" if isinstance(value, float) else str(value))

    add("", result)
    reporter.console.print(table)


def register(app: typer.Typer) -> None:
    app.command("eval", help=HELP)(evaluate)
