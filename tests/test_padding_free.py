"""model.padding_free: the log-prob pass packs the rows' real tokens into rows without padding (position_ids
restarting per sequence, no attention mask) and scatters the results back to [B, C]. It must agree with the
padded pass (log-probs, entropies and parameter gradients), fall back to it for the models and batches it
cannot pack, and leave training runs unchanged."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rlgen import kernels
from rlgen.models.logprobs import Head, _pack, completion_logprobs, supports_packing
from rlgen.models.sequences import supports_shared_prefix

PAD, EOS = 0, 2
# A ragged batch: left-padded prompts of different lengths; right-padded completions of different lengths,
# one with an empty mask (nothing to score), one that fills the width, one with a hole in its mask (masked
# tokens in the middle still condition what follows, as in the padded pass).
PROMPT_LENGTHS = [5, 3, 7, 4, 2, 6]
COMPLETION_MASKS = [[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8, [0] * 8, [1, 1, 0, 0, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0],
                    [1, 1, 1, 1, 1, 1, 0, 0]]


def make_batch(vocab: int, prompt_lengths=PROMPT_LENGTHS, masks=COMPLETION_MASKS, runs=None, seed: int = 0):
    """(prompt_ids, prompt_mask, completion_ids, completion_mask); `runs` repeats prompt i runs[i] times."""
    gen = torch.Generator().manual_seed(seed)
    runs = runs or [1] * len(prompt_lengths)
    width = max(prompt_lengths)
    prompt_ids, prompt_mask = [], []
    for n, length in zip(runs, prompt_lengths):
        ids = torch.full((width,), PAD, dtype=torch.long)
        ids[width - length:] = torch.randint(3, vocab, (length,), generator=gen)
        mask = (ids != PAD).long()
        prompt_ids += [ids] * n
        prompt_mask += [mask] * n
    completion_mask = torch.tensor(masks, dtype=torch.long)
    completion_ids = torch.randint(3, vocab, completion_mask.shape, generator=gen)
    last = (completion_mask * (torch.arange(completion_mask.shape[1]) + 1)).amax(1)
    completion_ids[torch.arange(completion_mask.shape[1]) >= last[:, None]] = PAD  # right padding after the last token
    return torch.stack(prompt_ids), torch.stack(prompt_mask), completion_ids, completion_mask


def run(model, batch, padding_free: bool, shared_prefix: bool = False):
    """(log-probs, entropies, parameter gradients of a masked weighted loss, input shapes of each forward)."""
    model.padding_free = padding_free
    model.zero_grad(set_to_none=True)
    calls = []
    hook = Head(model).decoder.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((tuple(kwargs["input_ids"].shape), kwargs.get("attention_mask") is None)),
        with_kwargs=True)
    try:
        logp, entropy = completion_logprobs(model, *batch, 1.0, shared_prefix)
    finally:
        hook.remove()
    mask = batch[3].float()
    weights = torch.linspace(-1.0, 1.5, logp.numel()).view_as(logp)  # an arbitrary, non-uniform loss
    ((logp * weights * mask).sum() / mask.sum().clamp(min=1)).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), entropy.detach(), grads, calls


def scored(batch) -> torch.Tensor:
    """[B, C] bool: the completion positions up to each row's last masked token (holes included)."""
    mask = batch[3]
    last = (mask * (torch.arange(mask.shape[1]) + 1)).amax(1)
    return torch.arange(mask.shape[1]) < last[:, None]


def assert_packed_matches_padded(model, batch, tol: float = 1e-5):
    logp_pad, ent_pad, grads_pad, calls_pad = run(model, batch, False)
    logp_pack, ent_pack, grads_pack, calls_pack = run(model, batch, True)
    assert calls_pad == [(tuple(torch.cat(batch[:3:2], 1).shape), False)]
    assert len(calls_pack) == 1 and calls_pack[0][1], calls_pack  # one forward, without an attention mask
    keep = scored(batch)
    active = keep.any(1)
    lengths = batch[1].sum(1)[active] + keep.sum(1)[active] - 1  # prompt + completion before its last token
    rows, width = calls_pack[0][0]
    # eager/sdpa: rows as wide as the longest sequence, at most one per sequence
    assert width == int(lengths.max()) and rows <= len(lengths) and rows * width >= int(lengths.sum())
    torch.testing.assert_close(logp_pack[keep], logp_pad[keep], rtol=0, atol=tol)
    torch.testing.assert_close(ent_pack[keep], ent_pad[keep], rtol=0, atol=tol)
    assert not logp_pack[~keep].any() and not ent_pack[~keep].any()  # zeros after each completion
    assert grads_pad.keys() == grads_pack.keys() and grads_pad
    for name, grad in grads_pad.items():  # float32 rounding grows with the gradient's size (a tied embedding's ~2)
        scale = max(1.0, float(grad.abs().max()))
        torch.testing.assert_close(grads_pack[name], grad, rtol=0, atol=tol * scale, msg=name)
    return calls_pack


# --- models -------------------------------------------------------------------------------------------

def _builtin():
    from rlgen.models.causal_lm import load_model, resolve_model_path

    return load_model(resolve_model_path("tiny-arith"), "float32")


def _qwen2(attention: str = "sdpa"):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=EOS,
                         pad_token_id=PAD, tie_word_embeddings=False)
    config._attn_implementation = attention
    return Qwen2ForCausalLM(config)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD))


def _mistral_sliding():
    from transformers import MistralConfig, MistralForCausalLM

    # a window shorter than the sequences: the packed sliding-window mask must also restart per sequence
    return MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=2, sliding_window=4,
                                            max_position_embeddings=64, pad_token_id=PAD))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=EOS,
                                      pad_token_id=PAD))


MODELS = {"tiny-arith": _builtin, "qwen2-sdpa": _qwen2, "qwen2-eager": lambda: _qwen2("eager"), "llama": _llama,
          "mistral-sliding-window": _mistral_sliding, "gpt2": _gpt2}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    torch.manual_seed(0)
    return MODELS[request.param]().train()


def test_packed_matches_padded(model):
    assert supports_packing(model)
    calls = assert_packed_matches_padded(model, make_batch(model.config.vocab_size))
    assert calls[0][0] == (4, 11)  # sequences of 7, 10, 9, 2 and 11 tokens: the 2 shares the 9's row


def test_packed_matches_padded_unfused_head(model):
    # kernel mode 'reference': no split head, the model projects only the positions asked for (logits_to_keep)
    previous = kernels.use("reference")
    try:
        assert_packed_matches_padded(model, make_batch(model.config.vocab_size, seed=1))
    finally:
        kernels.use(previous)


def test_packed_temperature_and_longer_batch():
    torch.manual_seed(0)
    model = _builtin().train()
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 20, (12,), generator=gen).tolist()
    masks = [[1] * n + [0] * (24 - n) for n in torch.randint(0, 25, (12,), generator=gen).tolist()]
    batch = make_batch(model.config.vocab_size, lengths, masks, seed=3)
    model.padding_free = True
    with torch.no_grad():
        packed = completion_logprobs(model, *batch, 0.7, shared_prefix=False)
        model.padding_free = False
        padded = completion_logprobs(model, *batch, 0.7, shared_prefix=False)
    keep = scored(batch)
    for a, b in zip(packed, padded):
        torch.testing.assert_close(a[keep], b[keep], rtol=0, atol=1e-5)


def test_shared_prefix_groups(model):
    """Groups of identical prompts: the shared-prefix path still comes first when it applies; with
    shared_prefix off the groups are packed like any rows. Both equal the padded pass."""
    batch = make_batch(model.config.vocab_size, PROMPT_LENGTHS[:3], COMPLETION_MASKS, runs=[3, 1, 2])
    logp_shared, _, _, calls_shared = run(model, batch, True, shared_prefix=True)
    logp_pad = run(model, batch, False)[0]
    if supports_shared_prefix(model):  # the distinct prompts once, then the completions against their cache
        assert [call[0][0] for call in calls_shared] == [3, 6]
    else:  # a sliding window: no shared cache, so packed
        assert len(calls_shared) == 1 and calls_shared[0][1]
    keep = scored(batch)
    torch.testing.assert_close(logp_shared[keep], logp_pad[keep], rtol=0, atol=1e-5)
    assert_packed_matches_padded(model, batch)


def test_lora_and_checkpointed_models_pack():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    lora = peft.get_peft_model(_builtin(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          task_type="CAUSAL_LM"))
    with torch.no_grad():
        for layer in lora.modules():
            if hasattr(layer, "lora_B"):
                for linear in layer.lora_B.values():
                    linear.weight.normal_(std=0.1)  # a non-zero adapter, so its gradients are not trivially zero
    assert supports_packing(lora)
    assert_packed_matches_padded(lora.train(), make_batch(lora.config.vocab_size))
    checkpointed = _builtin()
    if hasattr(checkpointed, "activation_checkpointing_enable"):  # transformers >= 5.2x's name (CI's vLLM pins < 5.20)
        checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_packed_matches_padded(checkpointed.train(), make_batch(checkpointed.config.vocab_size))


# --- falling back to the padded pass ------------------------------------------------------------------

def assert_padded_pass(model, batch):
    """padding_free on, but the padded pass runs: bit-identical results, the padded forward."""
    a = run(model, batch, True)
    b = run(model, batch, False)
    assert a[3] == b[3] and not a[3][0][1]  # the same padded forward, with its attention mask
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(a[2][k], b[2][k]) for k in b[2])


def test_batches_it_cannot_pack_run_padded():
    torch.manual_seed(0)
    model = _llama().train()
    # an empty prompt before a completion: no position predicts its first token
    assert_padded_pass(model, make_batch(64, [0, 3], [[1, 1, 0], [1, 0, 0]]))
    # nothing to score: the padded pass still runs its one forward (FSDP ranks must run the same forwards)
    assert_padded_pass(model, make_batch(64, [2, 3], [[0, 0, 0], [0, 0, 0]]))


def test_models_it_cannot_pack_run_padded(monkeypatch):
    from transformers import masking_utils

    torch.manual_seed(0)
    model = _llama().train()
    batch = make_batch(64)
    assert supports_packing(model)
    monkeypatch.setattr(model.config, "layer_types", ["linear_attention"] * 2, raising=False)  # state along the row
    assert not supports_packing(model)
    monkeypatch.undo()
    # continuous batching's paged attention: transformers builds no mask for it, packed positions are ignored
    monkeypatch.setattr(model.config, "_attn_implementation_internal", "paged|sdpa")
    assert model.config._attn_implementation == "paged|sdpa" and not supports_packing(model)
    monkeypatch.undo()
    assert supports_packing(model)
    monkeypatch.delattr(masking_utils, "find_packed_sequence_indices")  # transformers too old to detect packing
    assert not supports_packing(model)
    assert_padded_pass(model, batch)
    monkeypatch.undo()

    class NoPositions(torch.nn.Module):  # a model whose forward takes no position_ids
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask=None, logits_to_keep=0, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep)

    assert not supports_packing(NoPositions(model))


def test_off_by_default_and_set_by_the_trainer(tmp_path):
    from rlgen.api import build_trainer
    from rlgen.models.causal_lm import ModelConfig

    assert ModelConfig().padding_free is False
    for value in (False, True):
        trainer = build_trainer("sft", out=str(tmp_path / str(value)), steps=1, task="arithmetic",
                                sets=["run.eval_every=0", "run.threads=1", f"model.padding_free={str(value).lower()}"])
        trainer.setup()
        assert trainer.model.padding_free is value


def test_a_frozen_reference_copy_runs_the_policys_path(tmp_path):
    """DPO's reference is a separate frozen copy: it packs when the policy packs, so at step 1 the policy and
    the reference score every answer identically (exact ties, zero margins), not padded vs packed noise."""
    import json

    from rlgen.api import build_trainer

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1) * (1 + k % 4)})
                             + "\n" for k, (a, b) in enumerate([(864, 394), (41, 265), (497, 414), (5, 9), (70, 88), (123, 4)])))
    trainer = build_trainer("dpo", out=str(tmp_path / "run"), steps=1, data=str(pairs),
                            sets=["run.eval_every=0", "run.threads=1", "model.padding_free=true",
                                  "algorithm.shared_prefix=false", "algorithm.batch_size=6"])
    trainer.setup()
    assert trainer.reference.module.padding_free is True
    trainer.step = 1
    metrics = trainer.train_step()
    assert metrics["rewards/margins"] == 0.0 and metrics["rewards/accuracies"] == 0.0  # ties count as wrong


def test_pack_rows():
    rows, starts = _pack([5, 2, 4, 3, 1], 5)
    # first-fit decreasing, rows of at most 5: 5 | 4 then 1 | 3 then 2
    assert rows == [0, 2, 1, 2, 1] and starts == [0, 3, 0, 0, 4]
    assert _pack([3, 2], 5) == ([0, 0], [0, 3])


# --- training runs ------------------------------------------------------------------------------------

def _train(tmp_path, monkeypatch, algo: str, padding_free: bool, sets: list[str], **options):
    from safetensors.torch import load_file

    from rlgen.api import build_trainer
    from rlgen.models import logprobs

    packed_passes = []
    packed = logprobs._packed_logprobs
    monkeypatch.setattr(logprobs, "_packed_logprobs", lambda *a, **k: packed_passes.append(1) or packed(*a, **k))

    out = tmp_path / f"{algo}-{padding_free}"
    trainer = build_trainer(algo, out=str(out), steps=2, sets=["run.eval_every=0", "run.threads=1", "run.device=cpu",
                                                               f"model.padding_free={str(padding_free).lower()}", *sets],
                            **options)
    trainer.fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    weights = load_file(str(out / "final" / "model.safetensors"))
    assert bool(packed_passes) is padding_free  # the switch reached the log-prob passes
    return rows, weights


TRAIN_CASES = {
    "sft": ("sft", ["algorithm.batch_size=6", "optim.lr=1e-3"], {"task": "arithmetic"}),
    "grpo": ("grpo", ["rollout.prompts_per_step=2", "rollout.num_generations=3", "rollout.max_new_tokens=6",
                      "algorithm.shared_prefix=false", "algorithm.beta=0.05", "optim.lr=1e-3"], {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_runs_match(tmp_path, monkeypatch, case):
    algo, sets, options = TRAIN_CASES[case]
    padded_rows, padded_weights = _train(tmp_path, monkeypatch, algo, False, sets, **options)
    packed_rows, packed_weights = _train(tmp_path, monkeypatch, algo, True, sets, **options)
    steps = [row for row in padded_rows if "loss" in row]
    assert len(steps) == 2 and len(packed_rows) == len(padded_rows)
    for a, b in zip(padded_rows, packed_rows):
        for key, value in a.items():
            if isinstance(value, float) and "time" not in key and "per_s" not in key:
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    assert padded_weights.keys() == packed_weights.keys()
    for name, weight in padded_weights.items():
        torch.testing.assert_close(packed_weights[name], weight, rtol=0, atol=1e-6, msg=name)


# --- FSDP2 --------------------------------------------------------------------------------------------

FSDP_SCRIPT = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from test_padding_free import _builtin, make_batch, run, scored
    from rlgen.models.logprobs import supports_packing
    from rlgen.training.fsdp import shard_model
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    model = _builtin().train()
    # run.reshard_after_forward = false: the root keeps its gathered weights after a forward, which once let
    # the log-prob pass call the decoder alone, and fail on the sharded embeddings once the root resharded
    shard_model(model, reshard_after_forward=False)
    model.padding_free = True  # as Trainer.place_model sets it, after sharding
    assert type(model).__name__.startswith("FSDP") and model.padding_free is True and supports_packing(model)
    batch = make_batch(model.config.vocab_size)
    packed, padded, again = run(model, batch, True), run(model, batch, False), run(model, batch, True)
    assert packed[3][0][1] and not padded[3][0][1] and again[3] == packed[3]  # packed, padded, packed
    assert torch.equal(again[0], packed[0])
    keep = scored(batch)
    assert (packed[0][keep] - padded[0][keep]).abs().max() < 1e-5
    for name, grad in padded[2].items():  # sharded gradients (DTensors): compared whole
        a, b = packed[2][name].full_tensor(), grad.full_tensor()
        assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max())), name
    dist.destroy_process_group()
    print("ok")
''')


def test_fsdp_wrapped_model_packs(tmp_path):
    script = tmp_path / "fsdp_check.py"
    script.write_text(FSDP_SCRIPT)
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), tests], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
