"""Device placement of the GRPO and DDPO steps: no tensor operation mixes devices (a CPU index or 0-dim CPU
tensor meeting CUDA tensors works silently in torch, with a copy or a sync; everything a step makes should live
on the model's device, and what must run on the CPU, such as scoring and the CPU generator's draws, moves
explicitly). On a CPU-only machine every op runs on the CPU; the `cuda` case is the real check."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from rlgen.api import build_trainer

aten = torch.ops.aten
MOVES = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default}
CASES = {
    "grpo": dict(sets=["rollout.prompts_per_step=2", "rollout.num_generations=4", "rollout.max_new_tokens=4",
                       "run.eval_every=0", "run.threads=1"]),
    # per-prompt statistics and shuffled steps: the CPU-side tracker and generator paths
    "ddpo": dict(model="tiny-digits", sets=["rollout.prompts_per_step=2", "rollout.num_generations=2",
                                            "sampling.num_steps=3", "algorithm.advantage=per-prompt",
                                            "algorithm.shuffle_timesteps=true", "data.eval_samples=0",
                                            "run.eval_every=0", "run.threads=1"]),
}


class DeviceRecorder(TorchDispatchMode):
    """Records the devices of every op's tensor arguments; an op other than a copy with more than one is mixed."""

    def __init__(self):
        super().__init__()
        self.devices: set[torch.device] = set()
        self.mixed: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat, _ = tree_flatten((args, kwargs or {}))
        devices = {t.device for t in flat if isinstance(t, torch.Tensor)}
        self.ops += 1
        self.devices |= devices
        if len(devices) > 1 and func not in MOVES:
            self.mixed.append(f"{func}: {sorted(str(d) for d in devices)}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("algo", list(CASES))
def test_a_training_step_never_mixes_devices(tmp_path, algo, device):
    options = dict(CASES[algo])
    sets = options.pop("sets") + [f"run.device={device}"]
    trainer = build_trainer(algo, out=str(tmp_path / "run"), steps=1, sets=sets, **options)
    trainer.setup()
    assert trainer.device.type == device
    recorder = DeviceRecorder()
    trainer.step = 1
    with recorder, trainer.precision.autocast():
        metrics = trainer.train_step()
    assert recorder.ops > 1000 and "grad_norm" in metrics  # the step ran through the update
    assert trainer.device in recorder.devices  # resolve_device names the GPU's index, as tensors do
    assert not recorder.mixed, "\n".join(sorted(set(recorder.mixed))[:20])
