"""`rlgen.sample`: completions (or images) for a task's prompts or given ones, through the same rollout
and sampler code the trainers use."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from rlgen.api._backbone import flow_for
from rlgen.api._inputs import check_numbers, device_for, model_name, string_list, without_line_numbers
from rlgen.config import ANY, COUNT, FIELD_BOUNDS, NON_NEGATIVE, POSITIVE, PROBABILITY, SEED
from rlgen.data.chat import is_messages
from rlgen.data.records import read_records
from rlgen.diffusion.images import save_grid, save_png
from rlgen.diffusion.pipeline import DiffusionModelConfig, load_diffusion_model
from rlgen.diffusion.sampling import DiffusionSamplingParams
from rlgen.errors import RlgenError, show_value
from rlgen.events import as_events
from rlgen.models.causal_lm import ModelConfig, load_policy
from rlgen.plugins import registry
from rlgen.rollout.engine import SamplingParams, check_context
from rlgen.rollout.engines import build_text_engine, check_engine_kind
from rlgen.rollout.samplers import call_sampler, check_sampler, prepare_sampler


def prompt_records(task: str | None = None, prompts=None, split: str = "test", limit: int | None = None) -> list[dict]:
    """The records to sample for: a task's split, or `prompts` (a JSONL/Parquet path, '-' for stdin, or a
    list of prompt strings / records with a `prompt` field); the first `limit` of them (None: all)."""
    check_numbers(("limit", limit, COUNT, "int?"))
    return without_line_numbers(_prompt_records(task, prompts, split, limit))


def _prompt_records(task, prompts, split: str, limit: int | None) -> list[dict]:
    """prompt_records with each file record's `_line` kept, for the sampling flows' messages."""
    if prompts is not None and not isinstance(prompts, (str, Path, list, tuple)):
        raise RlgenError(f"prompts = {show_value(prompts)}: expected a JSONL/Parquet path, '-' or a list of prompts")
    if prompts is not None and task:
        raise RlgenError("give either --task or --prompts, not both")
    if isinstance(prompts, (list, tuple)):
        records = []
        for number, item in enumerate(prompts, start=1):
            record = {"prompt": item} if isinstance(item, str) else item
            if not isinstance(record, dict) or not (isinstance(record.get("prompt"), str) or is_messages(record.get("prompt"))):
                raise RlgenError(f"prompts[{number - 1}]: expected a prompt string or a record with a 'prompt' "
                                 "(a string or a chat message list)")
            records.append(record)
    elif prompts:
        records = read_records(str(prompts), required=("prompt",), messages=True)
    elif task:
        records = registry("task").get(task).split(split)
    else:
        raise RlgenError("no prompts: give --task NAME or --prompts FILE")
    return records if limit is None else records[:limit]


def sampler_setup(sampler: str, sampler_options, sampler_reward, kind: str = "sampler"):
    """(sampler function, options, guide RewardSet or None), checked before any model loads. Options are a
    dict or KEY=VALUE strings (TOML values, as --sampler-opt gives them); rewards NAME[:WEIGHT] strings."""
    items = None if isinstance(sampler_options, dict) else string_list("sampler_options", sampler_options, "KEY=VALUE strings or a dict")
    rewards = string_list("sampler_reward", sampler_reward, "NAME[:WEIGHT] strings")
    strategy, options, guide = prepare_sampler(sampler, items, rewards, kind=kind)
    if isinstance(sampler_options, dict):
        options = dict(sampler_options)
        check_sampler(sampler, strategy, options, has_guide=bool(rewards))
    return strategy, options, guide


def image_dir_for(out: str | None, image_dir: str | None) -> tuple[Path, Path]:
    """(directory for the PNGs, directory their paths in the records are relative to): `image_dir`, or
    OUT_images/ beside the JSONL file `out` ('-' or None: ./rlgen_images); paths relative to out's folder."""
    base = Path(out).resolve().parent if out and out != "-" else Path.cwd()
    if image_dir:
        return Path(image_dir).resolve(), base
    return (base / f"{Path(out).stem}_images" if out and out != "-" else base / "rlgen_images"), base


def sample(model: str | None = None, prompts=None, *, task: str | None = None, split: str = "test",
           limit: int | None = None, n: int = 1, sampler: str = "plain", sampler_options=None, sampler_reward=None,
           max_new_tokens: int = 16, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
           out: str | None = None, image_dir: str | None = None, grid: str | None = None, num_steps: int = 20,
           guidance_scale: float = 1.0, eta: float = 0.0, batch_size: int = 64, min_p: float = 0.0,
           repetition_penalty: float = 1.0, stop=None, chat_template: str = "auto", system_prompt: str = "",
           device: str = "auto", engine: str = "hf", callbacks=None) -> list[dict]:
    """`n` samples per prompt: each record plus `completion` (text) and `sample_index`, drawn on `device`
    (auto: CUDA when available; cpu, cuda, cuda:N). The seed decides the draws on every device, but a GPU's
    random stream differs from the CPU's: the same seed gives other samples there.

    Image models (a diffusers pipeline, e.g. tiny-digits) give one record per image. With `out` (the JSONL
    file the records are meant for) or `image_dir`, each image is written as a PNG and the record's `image`
    is its path relative to out's folder (as `rlgen sample` does); otherwise `image` holds the tensor.

    A prompt is a string or a chat message list; `chat_template` (auto: when the tokenizer has one, always,
    never) renders it with the model's template, `system_prompt` first, and the completion of a message-list
    prompt is written as assistant messages (TRL's conversational format). `engine` draws text completions:
    hf (rlgen's KV-cached loop) or vllm (a vLLM engine in this process; `pip install 'rlgen[vllm]'`)."""
    # the ranges `rlgen sample` checks for its flags, named by keyword, before anything is read or loaded
    check_numbers(("n", n, COUNT, "int"), ("limit", limit, COUNT, "int?"), ("batch_size", batch_size, COUNT, "int"),
                  ("max_new_tokens", max_new_tokens, COUNT, "int"), ("temperature", temperature, NON_NEGATIVE, "float"),
                  ("top_p", top_p, FIELD_BOUNDS["top_p"], "float"), ("top_k", top_k, NON_NEGATIVE, "int"),
                  ("min_p", min_p, PROBABILITY, "float"), ("repetition_penalty", repetition_penalty, POSITIVE, "float"),
                  ("seed", seed, SEED, "int"), ("num_steps", num_steps, COUNT, "int"),
                  ("guidance_scale", guidance_scale, ANY, "float"), ("eta", eta, NON_NEGATIVE, "float"))
    check_engine_kind("engine", engine)
    target = device_for(device)
    model = model_name("model", model)
    events = as_events(callbacks)
    records = _prompt_records(task, prompts, split, limit)
    flow = flow_for({"causal-lm": _sample_text, "diffusers": _sample_images}, model, "sampling")
    return without_line_numbers(flow(model, records, n=n, sampler=sampler, sampler_options=sampler_options, sampler_reward=sampler_reward,
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, out=out,
                image_dir=image_dir, grid=grid, num_steps=num_steps, guidance_scale=guidance_scale, eta=eta,
                chat_template=chat_template, system_prompt=system_prompt, min_p=min_p,
                repetition_penalty=repetition_penalty, stop=tuple(string_list("stop", stop, "stop strings") or ()),
                batch_size=batch_size, device=target, engine=engine, events=events))


def _sample_text(model: str | None, records: list[dict], *, n: int, sampler: str, sampler_options, sampler_reward,
                 max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int, device, events,
                 chat_template: str = "auto", system_prompt: str = "", min_p: float = 0.0, repetition_penalty: float = 1.0,
                 stop: tuple = (), engine: str = "hf", **_image_options):
    """Completions of a causal LM, through the rollout engine the trainers use."""
    import torch

    from rlgen.data.chat import ChatFormat

    strategy, options, guide = sampler_setup(sampler, sampler_options, sampler_reward)
    policy, tokenizer, _ = load_policy(ModelConfig(path=model or "tiny-arith"))
    chat = ChatFormat(tokenizer, chat_template, system_prompt, key="chat_template")
    texts = rendered_prompts(chat, records)
    policy.to(device).eval()
    check_context(policy, tokenizer, list(texts.values()), max_new_tokens, "--max-new-tokens", chat.add_special_tokens)
    chunk = max(1, 256 // n)
    engine = build_text_engine(engine, policy, tokenizer, add_special_tokens=chat.add_special_tokens,
                               prompts=list(texts.values()), max_new_tokens=max_new_tokens, rows=chunk * n, seed=seed)
    params = SamplingParams(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, stop)
    generator = torch.Generator().manual_seed(seed)
    results = []
    stats: dict = {}
    try:
        _draw_text(engine, records, texts, chat, n, chunk, strategy, params, generator, guide, stats, options, events, results)
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    if stats:
        events.log(f"{sampler}: " + ", ".join(f"{key}={value}" for key, value in sorted(stats.items())))
    return results


def _draw_text(engine, records, texts, chat, n, chunk, strategy, params, generator, guide, stats, options, events, results):
    with events.progress(total=len(records), description="sampling") as advance:
        for start in range(0, len(records), chunk):
            part = records[start : start + chunk]
            expanded = [r for r in part for _ in range(n)]
            rollouts = call_sampler(strategy, engine, [texts[id(r)] for r in expanded], params, generator,
                                    rewards=guide, records=expanded, stats=stats, options=options)
            for i, (record, text) in enumerate(zip(expanded, rollouts.texts)):
                results.append({**record, "completion": chat.completion_value(record["prompt"], text), "sample_index": i % n})
            for _ in part:
                advance()


def rendered_prompts(chat, records: list[dict]) -> dict[int, str]:
    """Each record's prompt as model text (by record id), a bad one named by its line."""
    out = {}
    for number, record in enumerate(records, start=1):
        try:
            out[id(record)] = chat.prompt_text(record["prompt"])
        except RlgenError as exc:
            raise RlgenError(f"prompts, line {record.get('_line', number)}: {exc}") from None
    return out


def _sample_images(model: str, records: list[dict], *, n: int, sampler: str, sampler_options, sampler_reward,
                   num_steps: int, guidance_scale: float, eta: float, seed: int, batch_size: int, out: str | None,
                   image_dir: str | None, grid: str | None, device, events, **_text_options) -> list[dict]:
    """Images of a diffusers pipeline, through the sampling code the image trainers use."""
    import torch

    if _text_options.get("engine", "hf") != "hf":
        raise RlgenError(f"--engine {_text_options['engine']} draws text; {model} is an image model (sampled by rlgen's pipeline)")

    strategy, options, guide = sampler_setup(sampler, sampler_options, sampler_reward, kind="image-sampler")
    params = DiffusionSamplingParams(num_steps, guidance_scale, eta, eta)
    params.validate()
    to_files = out is not None or image_dir is not None
    folder = relative_to = None
    if to_files:
        folder, relative_to = image_dir_for(out, image_dir)
        if folder.exists() and any(folder.iterdir()):
            raise RlgenError(f"image directory {folder} already exists and is not empty (choose another with --image-dir)")
    diffusion = load_diffusion_model(DiffusionModelConfig(path=model))
    diffusion.to(device).eval()
    diffusion.check_prompts(records)
    generator = torch.Generator().manual_seed(seed)
    expanded = [{**r, "sample_index": i} for r in records for i in range(n)]
    tmp = folder.with_name(f".{folder.name}.tmp") if to_files else None
    if tmp is not None:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    results, images, stats = [], [], {}
    try:
        with events.progress(total=len(expanded), description="sampling images") as advance:
            for start in range(0, len(expanded), batch_size):
                part = expanded[start : start + batch_size]
                with torch.enable_grad() if sampler == "reno" else torch.no_grad():
                    drawn = call_sampler(strategy, diffusion, [str(r["prompt"]) for r in part], params, generator,
                                         rewards=guide, records=part, stats=stats, options=options)
                for k, s in enumerate(drawn):
                    images.append(s["image"])
                    if tmp is None:
                        results.append(dict(s))
                        continue
                    name = f"{start + k:06d}.png"
                    save_png(s["image"], tmp / name)
                    record = {key: value for key, value in s.items() if key != "image"}
                    results.append({**record, "image": os.path.relpath(folder / name, relative_to)})
                for _ in part:
                    advance()
        if tmp is not None:
            if folder.exists():
                folder.rmdir()
            os.replace(tmp, folder)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if stats:
        events.log(f"{sampler}: " + ", ".join(f"{key}={value}" for key, value in sorted(stats.items())))
    if grid:
        save_grid(torch.stack(images), grid, nrow=n if n > 1 else min(10, len(images)))
        events.log(f"grid written to {grid}")
    if folder is not None:
        events.log(f"{len(results)} images written to {folder}")
    return results
