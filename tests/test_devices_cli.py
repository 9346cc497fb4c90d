"""--device on every command that loads a model (train, sample, score, eval, merge with its --cuda alias), the
`device` keyword of the Python API, --precision on train, and the devices of `rlgen env`.

A device that cannot be used is refused in one line before any model loads: `cuda:99` is refused on every
machine (no GPU, or fewer than 100), `gpu` is not a device spec at all. The CUDA tests compare each flow on
the GPU with the same flow on the CPU; they run where a GPU is."""
from __future__ import annotations

import json
import tomllib

import pytest
import torch

import rlgen as api
from cli_helpers import rlgen, rlgen_ok
from rlgen.errors import RlgenError

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SCORED = '{"prompt": "1+1=", "completion": "2", "answer": "2"}\n'


def _commands(tmp_path) -> dict[str, list[str]]:
    """Each command that loads a model, writing what it writes under tmp_path/<name>."""
    return {
        "train": ["train", "sft", "--task", "arithmetic", "--steps", "1", "--out", str(tmp_path / "train")],
        "sample": ["sample", "--task", "arithmetic", "--limit", "2", "--out", str(tmp_path / "sample.jsonl")],
        "score": ["score", "-r", "exact-match", "--out", str(tmp_path / "score.jsonl")],
        "eval": ["eval", "--model", "tiny-arith", "--task", "arithmetic", "--limit", "2",
                 "--samples-out", str(tmp_path / "eval.jsonl")],
        "merge": ["merge", "tiny-arith", "tiny-arith", "--out", str(tmp_path / "merge")],
    }


@pytest.mark.parametrize("command", ["train", "sample", "score", "eval", "merge"])
@pytest.mark.parametrize("spec", ["cuda:99", "gpu", "cpu:1"])
def test_an_unusable_device_is_one_line_before_anything_is_written(tmp_path, command, spec):
    code, out, err = rlgen(*_commands(tmp_path)[command], "--device", spec, stdin=SCORED)
    assert code == 2, err
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("rlgen: error: --device"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
@pytest.mark.parametrize("command", ["train", "sample", "score", "eval", "merge"])
def test_cuda_without_a_gpu_is_one_line(tmp_path, command):
    code, _, err = rlgen(*_commands(tmp_path)[command], "--device", "cuda", stdin=SCORED)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no CUDA device" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU: both refuse in the same line")
def test_merge_cuda_is_an_alias_of_device_cuda(tmp_path):
    command = _commands(tmp_path)["merge"]
    assert rlgen(*command, "--cuda") == rlgen(*command, "--device", "cuda")
    code, _, err = rlgen(*command, "--cuda", "--device", "cpu")
    assert code == 2 and "--cuda" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("call", [
    lambda device: api.sample(task="arithmetic", limit=1, device=device),
    lambda device: api.score([{"prompt": "1+1=", "completion": "2", "answer": "2"}], "exact-match", device=device),
    lambda device: api.evaluate(model="tiny-arith", task="arithmetic", limit=1, device=device),
    lambda device: api.merge(["tiny-arith", "tiny-arith"], out="never-written", device=device),
])
@pytest.mark.parametrize("device", ["gpu", 0, None, "cuda:99"])
def test_the_api_checks_the_device_keyword(tmp_path, monkeypatch, call, device):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RlgenError, match=r"^device"):
        call(device)
    assert list(tmp_path.iterdir()) == []


def test_train_device_and_precision_set_the_run_config(tmp_path):
    out = tmp_path / "run"
    rlgen_ok("train", "sft", "--task", "arithmetic", "--steps", "1", "--set", "data.eval_samples=0", "-q",
             "--device", "cpu", "--precision", "bf16-mixed", "--out", out)
    run = tomllib.loads((out / "config.toml").read_text())["run"]
    assert (run["device"], run["precision"]) == ("cpu", "bf16-mixed")
    code, _, err = rlgen("train", "sft", "--precision", "fp8", "--out", tmp_path / "other")
    assert code == 2 and "--precision" in err and len(err.strip().splitlines()) == 1, err


def test_env_lists_devices_with_their_kernels():
    from rlgen import kernels
    from rlgen.merging import kernels as merge_kernels

    info = json.loads(rlgen_ok("env", "--json").out)
    for key in ("rlgen", "torch", "cuda_available", "cuda_devices", "cpu_threads", "kernel_backend", "kernels",
                "packages", "plugins"):  # what bug reports had before
        assert key in info
    devices = {row["device"]: row for row in info["devices"]}
    expected = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert list(devices) == expected
    for name, row in devices.items():
        assert row["logprob_kernel"] == kernels.backend_name(name)
        assert row["merge_kernel"] == merge_kernels.backend_name(name)
    text = rlgen_ok("env").out
    assert f"devices.cpu: name=cpu, threads={torch.get_num_threads()}" in text


# --- on a GPU: each flow there against the same flow on the CPU ------------------------------------------

@CUDA
def test_eval_on_cuda_matches_the_cpu():
    on = {device: api.evaluate(model="tiny-arith", task="arithmetic", limit=16, device=device)
          for device in ("cpu", "cuda")}
    assert on["cuda"]["accuracy"] == pytest.approx(on["cpu"]["accuracy"], abs=1 / 16)


@CUDA
def test_merge_on_cuda_matches_the_cpu(tmp_path):
    from safetensors.torch import load_file

    for device in ("cpu", "cuda"):
        summary = api.merge(["tiny-arith", "tiny-arith"], out=str(tmp_path / device), method="ties",
                              base="tiny-arith", density=0.5, device=device)
        assert summary["device"].startswith(device)
    cpu, cuda = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cpu", "cuda"))
    for name, tensor in cpu.items():
        torch.testing.assert_close(cuda[name], tensor)


@CUDA
def test_image_sampling_and_scoring_on_cuda_match_the_cpu():
    drawn = {device: api.sample("tiny-digits", task="digits", limit=2, n=2, num_steps=4, device=device)
             for device in ("cpu", "cuda")}
    assert [r["prompt"] for r in drawn["cuda"]] == [r["prompt"] for r in drawn["cpu"]]
    for a, b in zip(drawn["cpu"], drawn["cuda"]):
        assert b["image"].device.type == "cpu"  # records carry host tensors, whatever the device
        torch.testing.assert_close(a["image"], b["image"], atol=2e-2, rtol=0)
    scores = {device: api.score(drawn["cpu"], "digit-classifier", device=device) for device in ("cpu", "cuda")}
    for a, b in zip(scores["cpu"], scores["cuda"]):
        assert b["reward"] == pytest.approx(a["reward"], abs=1e-4)
