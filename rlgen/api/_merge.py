"""`rlgen.merge`: combine models of one architecture, fold a LoRA adapter into its base, or sweep the
merge weights (rewarded soups, rlgen.api.merge_sweep)."""
from __future__ import annotations

from rlgen.api._inputs import device_for
from rlgen.api.merge_sweep import SweepSettings, run_sweep
from rlgen.errors import RlgenError, show_value
from rlgen.events import as_events
from rlgen.merging.config import check_dtype, from_flags, load_config, method_name, parse_size, parse_value
from rlgen.merging.merge import fold_adapter, merge_models


def _numbers(flag: str, value) -> list[float] | None:
    """Per-model values: a list of numbers, or comma-separated text as the flag gives it."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return [float(value)]
    if not isinstance(value, str):
        return [float(v) for v in value]
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise RlgenError(f"{flag} must be comma-separated numbers, got {show_value(value)}") from None


def _params(items) -> dict:
    """Method parameters: a dict, or KEY=VALUE strings (TOML values) as --param gives them."""
    if isinstance(items, dict):
        return dict(items)
    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RlgenError(f"--param must be KEY=VALUE, got {show_value(item)}")
        params[key.strip()] = parse_value(value.strip(), f"--param {key.strip()[:200]}")
    return params


def _shard_size(size) -> int | None:
    """Bytes from an int or a size text (2GB, 500MB)."""
    if size is None or isinstance(size, int):
        return size
    try:
        return parse_size(size)
    except RlgenError as exc:
        raise RlgenError(f"--max-shard-size: {exc}") from None


def merge_config(models=None, *, config=None, method=None, base=None, weights=None, density=None, params=None,
                 dtype=None, seed=None, max_shard_size=None):
    """The MergeConfig: `config`'s file (TOML or mergekit YAML) with the other arguments on top, or the
    arguments alone."""
    from dataclasses import replace

    shard = _shard_size(max_shard_size)
    if config:
        if models:
            raise RlgenError("give the models either as arguments or in --config, not both")
        for flag, value in (("--weights", weights), ("--density", density)):
            if value is not None:
                raise RlgenError(f"{flag} cannot be combined with --config (set per-model parameters in the file)")
        loaded = load_config(str(config))
        changes = {"parameters": {**loaded.parameters, **_params(params)}}
        for key, value in (("method", method and method_name(method)), ("base", base),
                           ("dtype", check_dtype("command line", "dtype", dtype)), ("seed", seed),
                           ("max_shard_size", shard)):
            if value is not None:
                changes[key] = value
        return replace(loaded, **changes)
    if not models:
        raise RlgenError("give the models to merge (or --config FILE)")
    return from_flags(list(models), method=method or "linear", base=base, weights=_numbers("--weights", weights),
                      densities=_numbers("--density", density), params=_params(params), dtype=dtype,
                      seed=seed or 0, **({"max_shard_size": shard} if shard else {}))


class _TensorProgress:
    """The merge's progress callback (done, total) as events: a progress loop opened once the total is known."""

    def __init__(self, events, description: str = "merging tensors"):
        self.events = events
        self.description = description
        self.context = None
        self.advance = None

    def __enter__(self):
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.advance is None:
            self.context = self.events.progress(total, self.description)
            self.advance = self.context.__enter__()
        if done:
            self.advance()

    def __exit__(self, *exc):
        if self.context is not None:
            self.context.__exit__(*exc)
        return False


def merge(models=None, *, out: str, method: str | None = None, base: str | None = None, weights=None, density=None,
          params=None, config=None, lora: str | None = None, dtype: str | None = None, seed: int | None = None,
          max_shard_size=None, sweep: bool = False, grid: int = 11, task: str | None = None, data: str | None = None,
          limit: int | None = None, reward=None, max_new_tokens: int = 16, images_per_prompt: int = 4,
          keep_models: bool = False, hv_ref=None, device: str = "auto", callbacks=None) -> dict:
    """Merge `models` (directories, built-in names or DIR+ADAPTER) into `out` and return the summary that
    `rlgen merge --json` prints.

    - plain: `method` (default linear), `base`, per-model `weights` / `density` (a list or "0.3,0.7"),
      `params` (a dict or KEY=VALUE strings), or `config` (TOML / mergekit YAML file);
    - `lora`: fold this adapter into the one model;
    - `sweep`: merge over a grid of weights, evaluate each point with `reward` (NAME[:WEIGHT] strings) on
      `task` / `data`, and report the Pareto front (OUT/sweep.jsonl, summary.json, front.png).

    `device` (auto, cpu, cuda, cuda:N): where each tensor is merged (streamed host -> device -> host) and a
    sweep's points are evaluated; folding a LoRA adapter runs on the CPU."""
    events = as_events(callbacks)
    target = device_for(device)
    if isinstance(models, str):
        models = [models]
    if lora:
        return _fold(models, lora, out, dtype=dtype, max_shard_size=max_shard_size, events=events,
                     others=(method, base, weights, density, params, config, seed))
    merged = merge_config(models, config=config, method=method, base=base, weights=weights, density=density,
                          params=params, dtype=dtype, seed=seed, max_shard_size=max_shard_size)
    if sweep:
        if weights is not None:
            raise RlgenError("--sweep sets the weights itself (the grid): drop --weights")
        rewards = [reward] if isinstance(reward, str) else list(reward or [])
        settings = SweepSettings(grid=grid, task=task, data=data, limit=limit, rewards=rewards,
                                 max_new_tokens=max_new_tokens, images_per_prompt=images_per_prompt,
                                 keep_models=keep_models, hv_ref=hv_ref, device=target)
        return run_sweep(merged, settings, out, progress=events.log)
    if task or data or reward or limit is not None or keep_models or hv_ref is not None:
        raise RlgenError("--task, --data, --reward, --limit, --keep-models and --hv-ref go with --sweep")
    with _TensorProgress(events) as progress:
        return merge_models(merged, out, progress=progress, device=target)


def _fold(models, lora, out, *, dtype, max_shard_size, events, others) -> dict:
    if not models or len(models) != 1:
        raise RlgenError("--lora folds an adapter into exactly one MODEL (the base)")
    if any(v for v in others):
        raise RlgenError("--lora takes only MODEL, --out, --dtype and --max-shard-size")
    shard = _shard_size(max_shard_size) or 2 * 10**9
    with _TensorProgress(events) as progress:
        return fold_adapter(models[0], lora, out, dtype=check_dtype("command line", "dtype", dtype), max_shard_size=shard,
                            progress=progress)
