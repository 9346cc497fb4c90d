"""`rlgen merge`: combine model directories of one architecture, streaming tensor by tensor."""
from __future__ import annotations

import typer

from rlgen.cli import options as opt

HELP = """Merge models of one architecture (Hugging Face causal LMs, diffusers pipelines or denoisers), or fold a LoRA adapter into its base. Tensors are streamed one at a time from memory-mapped safetensors, so memory stays at a few tensors whatever the model size; the output is written atomically.

A MODEL is a directory, a built-in name, or DIR+ADAPTER (a peft LoRA adapter folded in while reading). Methods (see `rlgen plugins`): linear, slerp, task-arithmetic, ties, dare-linear, dare-ties, breadcrumbs, breadcrumbs-ties; all but linear need --base. Per-model values: --weights and --density (one value for every model, or one per model; weights default to equal, summing to 1). Everything else is --param KEY=VALUE (TOML values: lambda=1.0, normalize=false, t=[0,0.5,1] for a gradient over the layers).

--config FILE (TOML, or mergekit's YAML: merge_method, base_model, models with per-model parameters, parameters, dtype) gives the general form, with gradients and filters.

Examples:

    rlgen merge runs/a/final runs/b/final --method linear --weights 0.3,0.7 --out merged

    rlgen merge runs/a/final runs/b/final --method ties --base tiny-arith --density 0.5 --out merged

    rlgen merge runs/a/final --method slerp --base tiny-arith --param t=0.4 --out merged

    rlgen merge --config merge.yml --out merged --dtype bfloat16

    rlgen merge tiny-arith --lora runs/lora/final --out folded
"""


def merge(
    models: opt.StrList = typer.Argument(None, help="Models: directories, built-in names or DIR+ADAPTER."),
    method: opt.OptStr = typer.Option(None, "--method", help="Merge method (default linear; see `rlgen plugins`)."),
    base: opt.OptStr = typer.Option(None, "--base", help="Base model (needed by every method but linear)."),
    weights: opt.OptStr = typer.Option(None, "--weights", help="Per-model weights, comma-separated (default: equal)."),
    density: opt.OptStr = typer.Option(None, "--density", help="Per-model densities (ties, dare, breadcrumbs): one value or one per model."),
    params: opt.StrList = typer.Option(None, "--param", help="Method parameter KEY=VALUE (TOML value), e.g. lambda=1.0, normalize=false, t=0.5, gamma=0.01; repeatable."),
    config_file: opt.OptStr = typer.Option(None, "--config", help="Merge config: TOML or mergekit YAML (merge_method, base_model, models, parameters, dtype)."),
    lora: opt.OptStr = typer.Option(None, "--lora", help="Fold this peft LoRA adapter directory into the one MODEL."),
    dtype: opt.OptStr = typer.Option(None, "--dtype", help="Output dtype: float32, bfloat16, float16 (default: the inputs')."),
    seed: opt.OptInt = typer.Option(None, "--seed", help="Seed of DARE's random drop (default 0)."),
    max_shard_size: opt.OptStr = typer.Option(None, "--max-shard-size", help="Largest output shard, e.g. 2GB (default), 500MB."),
    out: str = typer.Option(..., "--out", "-o", help="Output model directory (written atomically); with --sweep, the sweep's directory."),
    sweep: bool = typer.Option(False, "--sweep", help="Rewarded soups: merge over a grid of weights, evaluate each point with --reward on --task, report the Pareto front (OUT/sweep.jsonl, summary.json, front.png)."),
    grid: int = typer.Option(11, "--grid", help="--sweep: points per edge of the weight grid (11 = steps of 0.1)."),
    task: opt.OptStr = opt.Task,
    data: opt.OptStr = opt.Data,
    limit: opt.OptInt = typer.Option(None, "--limit", help="--sweep: evaluate on the first N held-out problems / prompts."),
    reward: opt.StrList = opt.Reward,
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="--sweep on LMs: completion length of the greedy evaluation."),
    images_per_prompt: int = typer.Option(4, "--images-per-prompt", help="--sweep on image models: images per prompt (fixed seeds)."),
    keep_models: bool = typer.Option(False, "--keep-models", help="--sweep: keep every merged point in OUT/models/."),
    hv_ref: opt.OptStr = typer.Option(None, "--hv-ref", help="--sweep: hypervolume reference, one value per --reward in its units, comma-separated (default: 0 for a maximised reward, 1 for a minimised one)."),
    device: opt.OptStr = typer.Option(None, "--device", help="Where tensors are merged (streamed host -> device -> host, one at a time) and --sweep points evaluated: auto (CUDA when available; the default), cpu, cuda or cuda:N."),
    cuda: bool = typer.Option(False, "--cuda", help="Same as --device cuda (mergekit's flag)."),
    quiet: bool = opt.Quiet,
    json_output: bool = opt.Json,
):
    from rlgen.api import merge as run_merge
    from rlgen.cli.report import Reporter
    from rlgen.errors import RlgenError

    if cuda and device not in (None, "cuda"):
        raise RlgenError(f"--cuda means --device cuda; drop one of --cuda and --device {device}")
    device = "cuda" if cuda else (device or "auto")
    opt.check_device(device)
    reporter = Reporter(quiet=quiet, json_output=json_output)
    summary = run_merge(models, out=out, method=method, base=base, weights=weights, density=density, params=params,
                        config=config_file, lora=lora, dtype=dtype, seed=seed, max_shard_size=max_shard_size,
                        sweep=sweep, grid=grid, task=task, data=data, limit=limit, reward=reward,
                        max_new_tokens=max_new_tokens, images_per_prompt=images_per_prompt, keep_models=keep_models,
                        hv_ref=hv_ref, device=device, callbacks=reporter.events())
    if lora:
        reporter.result(summary, f"folded {lora} into {summary['base']} ({summary['tensors']} tensors, "
                                 f"{_size(summary['bytes'])}) -> {out} in {summary['seconds']:.2f} s")
    elif sweep:
        _print_sweep(reporter, summary, out)
    else:
        reporter.result(summary, f"merged {len(summary['models'])} model(s) with {summary['method']} "
                                 f"({summary['tensors']} tensors, {summary['shards']} shard(s), {_size(summary['bytes'])}) "
                                 f"into {out} in {summary['seconds']:.2f} s, peak RSS {summary['peak_rss_mb']:.0f} MB")


def _print_sweep(reporter, summary: dict, out: str) -> None:
    if reporter.json_output:
        reporter.emit_json(summary)
        return
    if reporter.quiet:
        return
    from rich.table import Table

    names = [r["name"] for r in summary["rewards"]]
    table = Table(title=f"{summary['method']} sweep (front: *)", show_header=True, header_style="bold")
    table.add_column("weights")
    for r in summary["rewards"]:
        table.add_column(f"{r['name']} ({r['direction']})", justify="right")
    table.add_column("front", justify="center")
    for point in summary["points"]:
        table.add_row("/".join(f"{w:.2f}" for w in point["weights"]), *(f"{point['rewards'][n]:.4f}" for n in names),
                      "*" if point["on_front"] else "")
    reporter.console.print(table)
    if summary.get("hypervolume") is not None:
        reporter.console.print(f"hypervolume {summary['hypervolume']:.4f} (reference {summary['hypervolume_reference']}, "
                               f"{summary['hypervolume_reference_source']})")
    reporter.console.print(f"wrote {out}/sweep.jsonl, summary.json" + (", front.png" if summary.get("plot") else ""))


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def register(app: typer.Typer) -> None:
    app.command("merge", help=HELP, no_args_is_help=True)(merge)
