"""Shared-prefix forward passes: the prompt of each group of identical consecutive prompts is run once
and its KV cache repeated per row, in the trainers' log-prob pass and in the rollout engine. Both must
agree with the plain full-sequence path (values and parameter gradients, up to float rounding), and
models whose cache cannot be repeated must fall back to the plain path by a capability check."""
from __future__ import annotations

import pytest
import torch

from rlgen.models.logprobs import Head, completion_logprobs
from rlgen.rollout.engine import HFEngine, SamplingParams
from rlgen.models.sequences import consecutive_runs, prefix_runs, supports_shared_prefix

PAD, EOS = 0, 2
RUNS = [3, 1, 4, 2]  # group sizes: uneven on purpose, including a group of one


def make_batch(vocab: int, seed: int = 0, width: int = 6):
    """Left-padded prompts of different lengths, repeated in runs of RUNS; right-padded completions of
    different lengths (some stop early, padding after the stop token, some run to the full width)."""
    gen = torch.Generator().manual_seed(seed)
    prompt_lengths = [5, 3, 7, 4]
    p_width = max(prompt_lengths)
    prompt_ids, prompt_mask = [], []
    for n, length in zip(RUNS, prompt_lengths):
        ids = torch.full((p_width,), PAD, dtype=torch.long)
        mask = torch.zeros(p_width, dtype=torch.long)
        ids[p_width - length:] = torch.randint(3, vocab, (length,), generator=gen)
        mask[p_width - length:] = 1
        prompt_ids += [ids] * n
        prompt_mask += [mask] * n
    rows = sum(RUNS)
    completion_ids = torch.randint(3, vocab, (rows, width), generator=gen)
    for row, stop in enumerate([2, 6, 1, 4, 6, 3, 5, 0, 6, 2]):
        if stop < width:
            completion_ids[row, stop] = EOS
            completion_ids[row, stop + 1:] = PAD
    completion_mask = ((torch.cumsum((completion_ids == EOS).long(), 1) - (completion_ids == EOS).long()) == 0).long()
    return torch.stack(prompt_ids), torch.stack(prompt_mask), completion_ids, completion_mask


def forward_calls(model):
    """Input shapes of each forward of the module the log-prob pass runs: the decoder when the head is
    split off for the fused kernel, else the whole model. (Building the Head runs its one-off check.)"""
    calls = []
    handle = Head(model).decoder.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                             with_kwargs=True)
    return calls, handle


def logprobs_and_grads(model, batch, shared: bool, temperature: float = 1.0):
    model.zero_grad(set_to_none=True)
    calls, handle = forward_calls(model)
    try:
        logp, entropy = completion_logprobs(model, *batch, temperature, shared_prefix=shared)
    finally:
        handle.remove()
    mask = batch[3].float()
    weights = torch.linspace(-1.0, 1.5, logp.numel()).view_as(logp)  # an arbitrary, non-uniform loss
    ((logp * weights * mask).sum() / mask.sum()).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), entropy.detach(), grads, calls


def assert_paths_agree(model, batch, temperature: float = 1.0):
    logp_plain, ent_plain, grads_plain, calls_plain = logprobs_and_grads(model, batch, False, temperature)
    logp_shared, ent_shared, grads_shared, calls_shared = logprobs_and_grads(model, batch, True, temperature)
    assert len(calls_plain) == 1  # one forward over prompt + completion
    # shared: the distinct prompts once, then every row's completion against the repeated cache
    assert [c[0] for c in calls_shared] == [len(RUNS), sum(RUNS)]
    assert calls_shared[1][1] == batch[2].shape[1] - 1
    torch.testing.assert_close(logp_shared, logp_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_shared, ent_plain, rtol=1e-5, atol=1e-5)
    assert grads_plain.keys() == grads_shared.keys() and grads_plain
    for name, grad in grads_plain.items():
        scale = grad.abs().max().clamp(min=1e-12)
        diff = (grads_shared[name] - grad).abs().max()
        assert diff <= 1e-4 * scale, f"{name}: max |diff| {diff:.3g} vs max |grad| {scale:.3g}"
    return grads_shared


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    from rlgen.models.causal_lm import load_model

    torch.manual_seed(0)
    model = load_model(tiny_model_dir, "float32").train()
    return model


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    return GPT2LMHeadModel(config).train()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_llama_shared_prefix_matches_plain(llama, temperature):
    assert supports_shared_prefix(llama)
    assert_paths_agree(llama, make_batch(llama.config.vocab_size), temperature)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gpt2_shared_prefix_matches_plain(gpt2, temperature):
    assert supports_shared_prefix(gpt2)
    assert_paths_agree(gpt2, make_batch(gpt2.config.vocab_size), temperature)


def test_single_completion_token_and_no_groups(llama):
    prompt_ids, prompt_mask, completion_ids, completion_mask = make_batch(llama.config.vocab_size, width=1)
    with torch.no_grad():
        plain = completion_logprobs(llama, prompt_ids, prompt_mask, completion_ids, completion_mask, shared_prefix=False)
        shared = completion_logprobs(llama, prompt_ids, prompt_mask, completion_ids, completion_mask)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    # every prompt distinct (n = 1): nothing to share, the plain path runs (bit-identical)
    first = prefix_runs(prompt_ids, prompt_mask)[0]
    batch = [t[first] for t in make_batch(llama.config.vocab_size)]
    calls, handle = forward_calls(llama)
    with torch.no_grad():
        distinct = completion_logprobs(llama, *batch)
    handle.remove()
    assert len(calls) == 1
    with torch.no_grad():
        assert torch.equal(distinct[0], completion_logprobs(llama, *batch, shared_prefix=False)[0])


def enable_checkpointing(model):
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def plain_only_models(tiny_model_dir):
    """Models whose cache must not be repeated: each should take the plain path."""
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    from rlgen.models.causal_lm import load_model

    torch.manual_seed(0)
    checkpointed = enable_checkpointing(load_model(tiny_model_dir, "float32"))
    sliding = MistralForCausalLM(MistralConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=2, sliding_window=4,
                                               max_position_embeddings=32, pad_token_id=PAD))
    cross = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                       add_cross_attention=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return {"gradient-checkpointing": checkpointed, "sliding-window": sliding, "cross-attention": cross}


def test_fallback_to_plain_path(tiny_model_dir):
    for name, model in plain_only_models(tiny_model_dir).items():
        model.train()
        assert not supports_shared_prefix(model), name
        batch = make_batch(min(model.config.vocab_size, 40))
        logp_a, ent_a, grads_a, calls_a = logprobs_and_grads(model, batch, True)
        logp_b, ent_b, grads_b, calls_b = logprobs_and_grads(model, batch, False)
        assert len(calls_a) == 1 and calls_a == calls_b, name  # the plain path, not a failed attempt
        assert torch.equal(logp_a, logp_b) and torch.equal(ent_a, ent_b), name
        for key in grads_b:
            assert torch.equal(grads_a[key], grads_b[key]), (name, key)


def test_gradient_checkpointing_only_blocks_training_mode(tiny_model_dir):
    from rlgen.models.causal_lm import load_model

    model = enable_checkpointing(load_model(tiny_model_dir, "float32"))
    assert not supports_shared_prefix(model.train())
    assert supports_shared_prefix(model.eval())  # checkpointing is inactive in eval mode (the rollout engine)


def test_lora_model_shares_prefix(llama):
    peft = pytest.importorskip("peft")
    import copy

    model = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                        task_type="CAUSAL_LM"))
    assert supports_shared_prefix(model)
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "lora_B"):
                for linear in layer.lora_B.values():
                    linear.weight.normal_(std=0.1)  # a non-zero adapter, so its gradients are not trivially zero
    assert_paths_agree(model, make_batch(llama.config.vocab_size))


# --- micro-batches ------------------------------------------------------------------------------------

def test_micro_batches_hold_whole_groups(llama):
    from rlgen.algorithms.grpo import _micro_batches
    from rlgen.rollout.groups import ModelInputs

    inputs = ModelInputs(*make_batch(llama.config.vocab_size))
    rows = inputs.prompt_ids.shape[0]
    starts = {0, 3, 4, 8}
    for steps in (1, 2, 3, 4, 7):
        chunks = _micro_batches(llama, inputs, steps, True)
        assert len(chunks) == min(steps, len(RUNS))
        assert torch.cat(chunks).tolist() == list(range(rows))
        assert all(int(c[0]) in starts for c in chunks)  # every micro-batch starts at a group boundary
    group_of = [k for k, size in enumerate(RUNS) for _ in range(size)]
    for budget, count in ((1, len(RUNS)), (40, None), (10**6, 1)):  # by token budget: groups stay whole too
        chunks = _micro_batches(llama, inputs, 1, True, budget)
        assert sorted(torch.cat(chunks).tolist()) == list(range(rows))
        owner = {group_of[r]: k for k, c in enumerate(chunks) for r in c.tolist()}  # each group in one chunk:
        assert all(owner[group_of[r]] == k for k, c in enumerate(chunks) for r in c.tolist())
        assert count is None or len(chunks) == count  # a group over the budget goes alone
    chunks = _micro_batches(llama, inputs, 3, False)  # plain: rows chunked as before
    assert [c.tolist() for c in chunks] == [c.tolist() for c in torch.arange(rows).chunk(3)]


def test_runs():
    starts, row_run = consecutive_runs(["a", "a", "b", "a", "a", "a"])
    assert starts == [0, 2, 3] and row_run.tolist() == [0, 0, 1, 2, 2, 2]
    assert consecutive_runs(["x", "y", "z"])[0] == [0, 1, 2]
    ids = torch.tensor([[0, 5, 6], [0, 5, 6], [7, 5, 6], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]])
    starts, row_run = prefix_runs(ids, mask)
    assert starts.tolist() == [0, 2, 3] and row_run.tolist() == [0, 0, 1, 2]


# --- rollout engine -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from rlgen.models.causal_lm import load_tokenizer

    return load_tokenizer(tiny_model_dir)


PROMPTS = ["12+3="] * 4 + ["7+8="] + ["100+250="] * 3 + ["12+3="] * 2  # runs 4, 1, 3, 2 (a prompt may recur later)


@pytest.mark.parametrize("params", [SamplingParams(6, 1.0), SamplingParams(5, 0.0), SamplingParams(4, 0.8, 0.9, 5)])
def test_engine_shared_prefill_matches_plain(llama, tokenizer, params):
    rollouts = {}
    for shared in (True, False):
        engine = HFEngine(llama, tokenizer, shared_prefix=shared)
        calls, handle = forward_calls(llama)
        try:
            rollouts[shared] = engine.generate(PROMPTS, params, torch.Generator().manual_seed(7))
        finally:
            handle.remove()
        assert calls[0][0] == (4 if shared else len(PROMPTS))  # the prefill: distinct runs only
        assert all(c == (len(PROMPTS), 1) for c in calls[1:])
        # no forward pass after the last sampled token
        assert len(calls) == rollouts[shared].completion_ids.shape[1]
    a, b = rollouts[True], rollouts[False]
    for field in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.texts == b.texts and a.prompts == b.prompts == PROMPTS
    assert llama.training  # the engine restores the mode


def test_engine_is_reproducible_and_encodes_like_the_tokenizer(llama, tokenizer):
    engine = HFEngine(llama, tokenizer)
    first = engine.generate(PROMPTS, SamplingParams(6, 1.0), torch.Generator().manual_seed(3))
    again = engine.generate(PROMPTS, SamplingParams(6, 1.0), torch.Generator().manual_seed(3))
    assert torch.equal(first.completion_ids, again.completion_ids) and first.texts == again.texts
    ids, mask = engine.encode_prompts(PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        expected = tokenizer(prompt).input_ids
        assert ids[row, mask[row].bool()].tolist() == expected
        assert mask[row].sum() == len(expected) and mask[row, -len(expected):].all()


# --- one GRPO update, shared vs plain -----------------------------------------------------------------

def grpo_update(tiny_model_dir, tmp_path, shared: bool, **algorithm):
    from rlgen.algorithms.grpo import GRPOConfig, GRPOTrainer
    from rlgen.cli.report import Reporter
    from rlgen.config import from_dict
    from rlgen.training.run_dir import RunDir

    out = tmp_path / ("shared" if shared else "plain")
    cfg = from_dict(GRPOConfig, {
        "model": {"path": str(tiny_model_dir)},
        "rollout": {"prompts_per_step": 3, "num_generations": 4, "max_new_tokens": 6},
        "algorithm": {"beta": 0.0, **algorithm},
        "optim": {"lr": 1e-3, "gradient_accumulation_steps": 2},
        "run": {"out": str(out), "steps": 1, "seed": 5, "eval_every": 0, "threads": 1},
    })
    cfg.algorithm.shared_prefix = shared  # the switch `_update` reads (default: on)
    trainer = GRPOTrainer(cfg, RunDir(out), Reporter(quiet=True))
    trainer.setup()
    captured = {}
    optimizer_step = trainer.optimizer_step

    def capture():
        captured.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return optimizer_step()

    trainer.optimizer_step = capture
    trainer.step = 1
    metrics = trainer.train_step()
    return metrics, captured


@pytest.mark.parametrize("algorithm", [{}, pytest.param({"loss_type": "grpo", "num_iterations": 2, "beta": 0.05},
                                                          marks=pytest.mark.slow)])  # ~3 s each
def test_grpo_update_shared_matches_plain(tiny_model_dir, tmp_path, algorithm):
    plain, grads_plain = grpo_update(tiny_model_dir, tmp_path, False, **algorithm)
    shared, grads_shared = grpo_update(tiny_model_dir, tmp_path, True, **algorithm)
    assert plain["completion_length"] == shared["completion_length"] and plain["reward"] == shared["reward"]
    for key in ("loss", "entropy", "grad_norm") + (("kl",) if algorithm else ()):
        assert shared[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-7), key
    assert grads_plain.keys() == grads_shared.keys() and grads_plain
    for name, grad in grads_plain.items():
        assert (grads_shared[name] - grad).abs().max() <= 1e-4 * grad.abs().max().clamp(min=1e-12), name
