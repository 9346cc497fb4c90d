"""model.gradient_checkpointing: the activations are recomputed in the backward pass (the checkpointed blocks
run twice), and one training step's gradients equal those without checkpointing."""
from __future__ import annotations

import pytest
import torch

from rlgen.api import build_trainer

LM = dict(task="arithmetic", sets=["run.eval_every=0", "run.threads=1", "algorithm.batch_size=4"])
CASES = {
    "causal-lm": ("sft", LM, "DecoderLayer"),
    "causal-lm-lora": ("sft", {**LM, "sets": LM["sets"] + ["model.lora_r=4"]}, "DecoderLayer"),
    "causal-lm-grpo": ("grpo", dict(sets=["run.eval_every=0", "run.threads=1", "rollout.prompts_per_step=2",
                                          "rollout.num_generations=4", "rollout.max_new_tokens=4",
                                          "algorithm.shared_prefix=false"]), "DecoderLayer"),
    "unet": ("diffusion-sft", dict(sets=["run.eval_every=0", "run.threads=1", "data.eval_samples=0",
                                         "algorithm.batch_size=4"]), "ResnetBlock2D"),
}


def _step_gradients(tmp_path, algo: str, options: dict, block: str, checkpointing: bool):
    """(gradients of one train_step by parameter name, grad-enabled forward calls inside the first `block`
    module, trainer)."""
    options = dict(options)
    sets = options.pop("sets") + [f"model.gradient_checkpointing={str(checkpointing).lower()}", "run.device=cpu"]
    trainer = build_trainer(algo, out=str(tmp_path / f"checkpointing-{checkpointing}"), steps=1, sets=sets, **options)
    trainer.setup()
    # a layer inside the block: recomputing may re-run the block's forward without its own hooks (transformers)
    module = next(next(m for m in trainer.model.modules() if type(m).__name__.endswith(block)).children())
    calls = []
    module.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    gradients = {}

    def capture() -> float:  # in place of the update: the gradients as the optimiser would see them
        gradients.update({name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad})
        return 0.0

    trainer.optimizer_step = capture
    trainer.step = 1
    trainer.train_step()
    return gradients, sum(calls), trainer


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, case):
    algo, options, block = CASES[case]
    plain, plain_calls, _ = _step_gradients(tmp_path, algo, options, block, checkpointing=False)
    checkpointed, checkpointed_calls, trainer = _step_gradients(tmp_path, algo, options, block, checkpointing=True)
    net = trainer.model.denoiser if case == "unet" else trainer.model
    assert getattr(net, "is_activation_checkpointing", None) or net.is_gradient_checkpointing  # transformers 5 / diffusers
    assert checkpointed_calls == 2 * plain_calls > 0  # each grad-enabled forward of the block ran again in backward
    assert plain.keys() == checkpointed.keys() and any(bool(g.abs().sum() > 0) for g in plain.values())
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-6, atol=1e-6, msg=name)
