"""`rlgen sample`: completions (or images) as JSONL, through the same rollout code the trainers use."""
from __future__ import annotations

import typer

from rlgen.cli import options as opt

HELP = """Generate completions for a task's prompts or a prompts file; JSONL on stdout (or --out FILE).

Each output line is the input record plus `completion` and `sample_index`.

Example:

    rlgen sample --model tiny-arith --task arithmetic --split test -n 4 --limit 10 | rlgen score -r exact-match | rlgen eval -

    rlgen sample --task arithmetic --limit 10 --sampler best-of-n --sampler-opt n=8 --sampler-reward exact-match

Reward-guided samplers (`best-of-n`, `smc`) score candidates with the --sampler-reward guide, which sees
each record's fields (`answer` ...); -n still counts output samples per prompt.

Image models (a diffusers pipeline directory, or tiny-digits / tiny-digits-flow) write PNG files and one
JSONL line per image with its path in `image`; samplers: plain, best-of-n, reno, fk-steering:

    rlgen sample --model tiny-digits --task digits -n 8 --grid grid.png --out samples.jsonl

    rlgen sample --model tiny-digits --task digits --sampler fk-steering --sampler-reward digit-classifier
"""


def sample(
    model: opt.OptStr = opt.Model,
    task: opt.OptStr = opt.Task,
    prompts: opt.OptStr = typer.Option(None, "--prompts", "-p", help="JSONL/Parquet file with a `prompt` field ('-' = stdin)."),
    split: str = typer.Option("test", "--split", help="Task split: train or test."),
    limit: opt.OptInt = typer.Option(None, "--limit", help="Use only the first N prompts."),
    n: int = typer.Option(1, "-n", "--num-samples", help="Completions per prompt."),
    sampler: str = typer.Option("plain", "--sampler", help="Sampling strategy: plain, best-of-n, smc (see `rlgen plugins`)."),
    sampler_opt: opt.StrList = typer.Option(None, "--sampler-opt", help="Sampler option KEY=VALUE (TOML value), e.g. n=8; repeatable."),
    sampler_reward: opt.StrList = typer.Option(
        None, "--sampler-reward", help="Guide reward of best-of-n / smc: NAME[:WEIGHT] or module:function[:WEIGHT]; repeatable."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Maximum completion length in tokens."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep the smallest token set with this probability."),
    top_k: int = typer.Option(0, "--top-k", help="0 = off."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    out: str = typer.Option("-", "--out", "-o", help="Output JSONL file ('-' = stdout)."),
    image_dir: opt.OptStr = typer.Option(None, "--image-dir", help="Image models: where the PNGs go (default OUT_images/ beside --out, or ./rlgen_images)."),
    grid: opt.OptStr = typer.Option(None, "--grid", help="Image models: also write all images as one grid PNG (a row per prompt)."),
    num_steps: int = typer.Option(20, "--num-steps", help="Image models: denoising steps."),
    guidance_scale: float = typer.Option(1.0, "--guidance-scale", help="Image models: classifier-free guidance weight (1 = off)."),
    eta: float = typer.Option(0.0, "--eta", help="Image models: step noise (DDIM eta; the SDE noise level for flow models); 0 = deterministic."),
    batch_size: int = typer.Option(64, "--batch-size", help="Image models: prompts per sampling batch."),
    min_p: float = opt.MinP,
    repetition_penalty: float = opt.RepetitionPenalty,
    stop: opt.StrList = opt.Stop,
    chat_template: str = opt.ChatTemplate,
    system_prompt: str = opt.SystemPrompt,
    engine: str = opt.Engine,
    device: str = opt.Device,
    quiet: bool = opt.Quiet,
):
    from rlgen.api import sample as draw_samples
    from rlgen.cli.report import Reporter
    from rlgen.config import COUNT
    from rlgen.data.records import write_records

    opt.check_options(
        ("-n", n, COUNT), ("--limit", limit, COUNT), ("--batch-size", batch_size, COUNT),
        *opt.sampling_checks(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, top_p=top_p, top_k=top_k,
                             min_p=min_p, repetition_penalty=repetition_penalty),
        *opt.image_checks(num_steps=num_steps, guidance_scale=guidance_scale, eta=eta))
    opt.check_device(device)
    reporter = Reporter(quiet=quiet)
    records = draw_samples(model, prompts, task=task, split=split, limit=limit, n=n, sampler=sampler,
                           sampler_options=sampler_opt, sampler_reward=sampler_reward, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, out=out, image_dir=image_dir,
                           grid=grid, num_steps=num_steps, guidance_scale=guidance_scale, eta=eta,
                           batch_size=batch_size, min_p=min_p, repetition_penalty=repetition_penalty, stop=stop,
                           chat_template=chat_template, system_prompt=system_prompt,
                           device=device, engine=engine, callbacks=reporter.events())
    write_records(records, out)


def register(app: typer.Typer) -> None:
    app.command("sample", help=HELP)(sample)
