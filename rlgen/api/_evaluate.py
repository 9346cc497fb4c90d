"""`rlgen.evaluate`: every evaluation `rlgen eval` runs: a model on a task (greedy, pass@k or a sampler;
images: reward statistics), a file or list of scored samples, a run directory, several runs compared, and
a reward model's pairwise accuracy."""
from __future__ import annotations

from pathlib import Path

from rlgen.api._backbone import flow_for
from rlgen.api._inputs import check_numbers, check_records, device_for, model_name, string_list
from rlgen.api._sample import sampler_setup
from rlgen.config import ANY, COUNT, NON_NEGATIVE, POSITIVE, PROBABILITY, SEED
from rlgen.data.preferences import read_pairs
from rlgen.data.chat import message_text
from rlgen.data.records import read_records, write_records
from rlgen.diffusion.pipeline import DiffusionModelConfig, load_diffusion_model
from rlgen.diffusion.sampling import DiffusionSamplingParams
from rlgen.errors import RlgenError, show_value
from rlgen.evaluation.compare import compare_runs, read_metrics
from rlgen.evaluation.diversity import diversity_report
from rlgen.evaluation.embeddings import resolve_similarity
from rlgen.evaluation.images import evaluate_image_model
from rlgen.evaluation.kl import check_vocabularies, kl_of_rollouts
from rlgen.evaluation.metric_contract import check_metric, parse_metric, run_metric
from rlgen.evaluation.metrics import correctness_rewards, evaluate_model, reward_column, reward_stats
from rlgen.evaluation.plot import plot_run
from rlgen.evaluation.reward_models import pair_accuracy
from rlgen.models.causal_lm import ModelConfig, load_policy, resolve_model_path
from rlgen.models.reward_model import load_reward_model
from rlgen.plugins import registry
from rlgen.rewards.base import RewardSet, RewardSpec, scoring_device
from rlgen.rollout.engine import check_context
from rlgen.rollout.engines import build_text_engine, check_engine_kind
from rlgen.training.trainer import DataConfig, load_records


def evaluate(source=None, *, model: str | None = None, task: str | None = None, data: str | None = None,
             split: str = "test", limit: int | None = None, k: int = 1, temperature: float = 1.0,
             max_new_tokens: int = 16, reward=None, seed: int = 0, plot: str | None = None, similarity: str = "auto",
             ref: str | None = None, samples_out: str | None = None, sampler: str | None = None,
             sampler_options=None, sampler_reward=None, reward_model: str | None = None, num_steps: int = 20,
             guidance_scale: float = 1.0, eta: float = 0.0, compare: list[str] | None = None,
             plot_dir: str | None = None, metrics: list[str] | None = None, device: str = "auto", min_p: float = 0.0,
             repetition_penalty: float = 1.0, stop=None, chat_template: str = "auto", system_prompt: str = "",
             engine: str = "hf") -> dict:
    """The result `rlgen eval --json` prints, for whichever of these is given:

    - `model` with `task` or `data`: accuracy (greedy, or one `sampler` completion at `temperature`),
      pass@k with `k` > 1 (plus diversity), KL to `ref`; for an image model, reward statistics of `k`
      images per prompt;
    - `reward_model` with `data` (pairs): pairwise accuracy, overall and per `subset`;
    - `source`, a run directory: its final metrics (and `plot`, a PNG of the curves);
    - `source`, a JSONL/Parquet file ('-' = stdin) or a list of scored samples: reward statistics,
      accuracy and diversity;
    - `compare`, a list of run directories: their final metrics side by side (`plot_dir`: one PNG per metric).

    `metrics` ('NAME' or 'NAME:key=value,...' specs of registered metrics, the metric contract of
    rlgen.evaluation.metric_contract) run on the evaluated samples: the scored samples given, or the
    samples a model evaluation drew; their results go under `metrics`, keyed by spec.

    `reward` and `sampler_reward` are NAME[:WEIGHT] strings; `sampler_options` a dict or KEY=VALUE strings.
    A keyword that takes several strings (reward, compare, metrics ...) also takes one. The models (the
    evaluated one, `ref`, `reward_model`, and the reward models and image classifiers of the rewards) run
    on `device`: auto (CUDA when available), cpu, cuda or cuda:N. A text model's prompts (strings or chat
    message lists) go through its chat template (`chat_template`: auto, always, never; `system_prompt`), and
    every completion is drawn with `min_p`, `repetition_penalty` and `stop` strings as `sample` draws them, by
    `engine`: hf (rlgen's KV-cached loop) or vllm (a vLLM engine in this process)."""
    # the ranges `rlgen eval` checks for its flags, named by keyword, before anything is read or loaded
    check_numbers(("limit", limit, COUNT, "int?"), ("k", k, COUNT, "int"),
                  ("max_new_tokens", max_new_tokens, COUNT, "int"), ("temperature", temperature, NON_NEGATIVE, "float"),
                  ("seed", seed, SEED, "int"), ("num_steps", num_steps, COUNT, "int"),
                  ("guidance_scale", guidance_scale, ANY, "float"), ("eta", eta, NON_NEGATIVE, "float"),
                  ("min_p", min_p, PROBABILITY, "float"), ("repetition_penalty", repetition_penalty, POSITIVE, "float"))
    check_engine_kind("engine", engine)
    text_options = dict(chat_template=chat_template, system_prompt=system_prompt, engine=engine, sampling=dict(
        min_p=min_p, repetition_penalty=repetition_penalty, stop=tuple(string_list("stop", stop, "stop strings") or ())))
    target = device_for(device)
    if source is not None and not isinstance(source, (str, Path, list, tuple)):
        raise RlgenError(f"source = {show_value(source)}: expected a scored JSONL/Parquet path, '-', a run directory "
                         "or a list of scored records")
    if isinstance(source, (list, tuple)):
        source = check_records("source", source)
    model, ref, reward_model = model_name("model", model), model_name("ref", ref), model_name("reward_model", reward_model)
    reward = string_list("reward", reward, "NAME[:WEIGHT] reward strings")
    compare = string_list("compare", compare, "run directories")
    metrics = string_list("metrics", metrics, "metric specs")
    specs = _metric_specs(metrics)  # unknown metrics and bad options fail before any model loads
    if specs and (compare is not None or reward_model or (source and not model and not isinstance(source, (list, tuple))
                                                          and source != "-" and Path(source).is_dir())):
        raise RlgenError("--metric runs on samples: scored JSONL, '-', or --model with --task/--data")
    if compare is not None:
        if model or reward_model or task or data or plot or ref or samples_out or sampler:
            raise RlgenError("`rlgen eval compare` takes run directories only (and --plot-dir, --json)")
        return compare_runs(list(compare), plot_dir)
    if plot_dir:
        raise RlgenError("--plot-dir is for `rlgen eval compare RUN ...` (use --plot with one run directory)")
    if ref and not model:
        raise RlgenError("--ref (KL to a reference model) needs --model")
    resolve_similarity(similarity)  # an unknown name, or embedding without its package, fails before any model loads
    if reward_model:
        if model:
            raise RlgenError("give either --rm (pairwise accuracy of a reward model) or --model, not both")
        return _eval_reward_model(reward_model, data, limit, target)
    if model:
        flow = flow_for({"causal-lm": _eval_model, "diffusers": _eval_image_model}, model, "evaluating a model")
        with scoring_device(target):
            return flow(model, task, data, split, limit, k, temperature, max_new_tokens, reward, seed, samples_out,
                        sampler, sampler_options, sampler_reward, ref, similarity, num_steps, guidance_scale, eta,
                        specs=specs, device=target, text_options=text_options)
    if isinstance(source, (list, tuple)):
        return _eval_samples(list(source), similarity, specs)
    if source and source != "-" and Path(source).is_dir():
        return _eval_run(Path(source), plot)
    if source:
        return _eval_samples(str(source), similarity, specs)
    raise RlgenError("nothing to evaluate: give --model M --task T, a scored JSONL file, '-' or a run directory")


def _eval_model(model, task, data, split, limit, k, temperature, max_new_tokens, reward, seed, samples_out,
                sampler=None, sampler_opt=None, sampler_reward=None, ref=None, similarity="auto", *_image_options, specs=(),
                device=None, text_options=None):
    """A causal LM on a task: accuracy (greedy or one sampler completion), pass@k and diversity, KL to `ref`."""
    import torch

    if not task and not data:
        raise RlgenError("--model needs --task NAME or --data FILE to evaluate on")
    sampler_options, guide = _sampler_setup(sampler, sampler_opt, sampler_reward)
    from rlgen.data.chat import ChatFormat

    text_options = text_options or {}
    records = load_records(DataConfig(task=task, path=data), split, required=("prompt", "answer"))
    if limit is not None:
        records = records[:limit]
    if reward:
        rewards = RewardSet([RewardSpec.parse(r) for r in reward])
    else:
        rewards = correctness_rewards(registry("task").get(task).default_rewards if task and not data else ("exact-match",))
    policy, tokenizer, path = load_policy(ModelConfig(path=model))
    chat = ChatFormat(tokenizer, text_options.get("chat_template", "auto"), text_options.get("system_prompt", ""),
                      key="chat_template")
    texts = _prompt_texts(chat, records, data or task)
    policy.to(device)
    check_context(policy, tokenizer, texts, max_new_tokens, "--max-new-tokens", chat.add_special_tokens)
    reference = None
    if ref:
        reference, _, ref_path = load_policy(ModelConfig(path=ref))
        reference.to(device).eval().requires_grad_(False)
        check_vocabularies(policy, reference)
    engine = build_text_engine(text_options.get("engine", "hf"), policy.eval(), tokenizer,
                               add_special_tokens=chat.add_special_tokens, prompts=texts, max_new_tokens=max_new_tokens,
                               rows=min(256, max(1, len(records) * k)), seed=seed)
    try:
        result = evaluate_model(engine, records, rewards, max_new_tokens, k=k, temperature=temperature,
                                generator=torch.Generator().manual_seed(seed), sampler=sampler, sampler_rewards=guide,
                                sampler_options=sampler_options, sampling=text_options.get("sampling"), prompt_texts=texts)
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    if samples_out:  # written with the prompts as given (a message list stays one, its completion assistant messages)
        write_records([{**sample, "prompt": original["prompt"],
                        "completion": chat.completion_value(original["prompt"], sample["completion"])}
                       for sample, original in zip(result["samples"], records)], samples_out)
    out = {"model": str(path), "task": task or data, "split": split, "reward": rewards.names[0], "sampler": "greedy",
           **result["metrics"]}
    if k > 1:
        out["diversity"] = {"samples": f"{k} per problem at temperature {temperature:g}",
                            **diversity_report(result["k_samples"], similarity)}
    if reference is not None:
        on_k = k > 1
        kl = kl_of_rollouts(policy, reference, result["k_rollouts"] if on_k else result["rollouts"])
        where = (f"the {k} samples per problem at temperature {temperature:g}" if on_k
                 else f"the evaluated {'greedy' if sampler is None else sampler} completions")
        out["kl_to_reference"] = {"reference": str(ref_path), "on": where, **kl}
    return _with_metrics(out, result["samples"], specs)


def _prompt_texts(chat, records: list[dict], source) -> list[str]:
    """Each record's prompt as model text; a bad one named by its line."""
    out = []
    for number, record in enumerate(records, start=1):
        try:
            out.append(chat.prompt_text(record["prompt"]))
        except RlgenError as exc:
            raise RlgenError(f"{source}, line {record.get('_line', number)}: {exc}") from None
    return out


def _eval_image_model(model, task, data, split, limit, k, _temperature, _max_new_tokens, reward, seed, samples_out,
                      sampler, sampler_opt, sampler_reward, ref, _similarity, num_steps, guidance_scale, eta,
                      specs=(), device=None, text_options=None) -> dict:
    """Reward statistics of k images per prompt at fixed seeds (overall and per prompt)."""
    if (text_options or {}).get("engine", "hf") != "hf":
        raise RlgenError(f"--engine {text_options['engine']} draws text; {model} is an image model (sampled by rlgen's pipeline)")
    if ref:
        raise RlgenError("--ref (KL to a reference model) is for language models")
    if not task and not data:
        raise RlgenError("--model needs --task NAME or --data FILE (prompts) to evaluate on")
    strategy, options, guide = (sampler_setup(sampler, sampler_opt, sampler_reward, kind="image-sampler")
                                if sampler else (None, {}, None))
    names = reward or (list(registry("task").get(task).default_rewards) if task and not data else [])
    if not names:
        raise RlgenError("no reward given for the image evaluation (use --reward NAME, e.g. digit-classifier)")
    rewards = RewardSet([RewardSpec.parse(r) for r in names])
    records = load_records(DataConfig(task=task, path=data), split)
    records = records if limit is None else records[:limit]
    params = DiffusionSamplingParams(num_steps, guidance_scale, eta, eta)
    params.validate()
    diffusion = load_diffusion_model(DiffusionModelConfig(path=model))
    diffusion.to(device).eval()
    diffusion.check_prompts(records)
    stats, samples = evaluate_image_model(diffusion, records, rewards, k, params, seed=seed, sampler=strategy,
                                          sampler_options=options, guide=guide)
    if samples_out:
        write_records([{key: v for key, v in s.items() if key != "image"} for s in samples], samples_out)
    result = {"model": str(diffusion.path), "task": task or data, "split": split, "reward": "+".join(rewards.names),
              "sampler": sampler or "plain", "images_per_prompt": k, "num_steps": num_steps, **stats}
    return _with_metrics(result, [{key: v for key, v in s.items() if key != "image"} for s in samples], specs)


def _sampler_setup(sampler, sampler_opt, sampler_reward):
    """(--sampler-opt options, --sampler-reward guide), checked before any model is loaded."""
    if sampler is None:
        if sampler_opt or sampler_reward:
            raise RlgenError("--sampler-opt and --sampler-reward need --sampler NAME")
        return {}, None
    _, options, guide = sampler_setup(sampler, sampler_opt, sampler_reward)
    return options, guide


def _eval_reward_model(path: str, data: str | None, limit: int | None, device) -> dict:
    if not data:
        raise RlgenError("--rm needs --data PAIRS (JSONL/Parquet with prompt, chosen, rejected)")
    pairs = read_pairs(data)
    if limit is not None:
        pairs = pairs[:limit]
    model, tokenizer = load_reward_model(resolve_model_path(path))
    model.to(device)
    return {"reward_model": path, "data": data, **pair_accuracy(model, tokenizer, pairs)}


def _metric_specs(metrics) -> list[tuple[str, str, dict]]:
    """(spec, name, options) of each --metric, checked now: an unknown name or option is one line."""
    if not metrics:
        return []
    specs = []
    for spec in [metrics] if isinstance(metrics, str) else metrics:
        name, options = parse_metric(spec)
        check_metric(name, options)
        specs.append((spec, name, options))
    return specs


def _with_metrics(result: dict, samples: list[dict], specs) -> dict:
    if specs:
        result["metrics"] = {spec: run_metric(name, samples, **options) for spec, name, options in specs}
    return result


def _eval_samples(source, similarity: str = "auto", specs=()) -> dict:
    """Summary of scored samples: a JSONL/Parquet path ('-' = stdin) or a list of records."""
    records = source if isinstance(source, list) else read_records(source, messages=True)
    name = "records" if isinstance(source, list) else ("<stdin>" if source == "-" else source)
    fields = sorted({key for r in records for key in r if key == "reward" or key.startswith("reward_")})
    result: dict = {"num_samples": len(records)}
    for field in fields:
        result[field] = reward_stats(reward_column(records, field, name))
    correctness = [f for f in fields if f in ("reward_exact-match", "reward_numeric-match", "reward_countdown")]
    if correctness:
        result["accuracy"] = result[correctness[0]].get("mean")
    texts = [{**r, "completion": message_text(r["completion"])} for r in records
             if isinstance(r.get("completion"), (str, list))]  # a conversational sample: its messages' text
    if texts:
        result["diversity"] = diversity_report(texts, similarity)
    if not fields and not texts:
        raise RlgenError(f"{name}: no reward fields or completions to summarise (run `rlgen sample` / `rlgen score` first)")
    return _with_metrics(result, records, specs)


def _eval_run(run: Path, plot: str | None) -> dict:
    rows = read_metrics(run)
    if plot:
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
