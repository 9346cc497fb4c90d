"""rlgen.devices: the one resolver of --device / run.device."""
from __future__ import annotations

import pytest
import torch

from rlgen.devices import check_device_spec, device_listing, module_device, resolve_device
from rlgen.errors import RlgenError


@pytest.mark.parametrize("spec", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_well_formed_specs_pass(spec):
    assert check_device_spec(spec) == spec


@pytest.mark.parametrize("spec", ["gpu", "cpu:1", "auto:0", "cuda:", "cuda:-1", "CUDA", "", 3, None, "cuda:0 "])
def test_malformed_specs_are_one_line_naming_the_key(spec):
    with pytest.raises(RlgenError) as err:
        check_device_spec(spec, "run.device")
    message = str(err.value)
    assert message.startswith("run.device must be auto (CUDA when available), cpu, cuda or cuda:N")
    assert "\n" not in message


def test_cpu_and_auto_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto", local_rank=0) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no GPU")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_line(spec):
    with pytest.raises(RlgenError) as err:
        resolve_device(spec, "--device")
    assert str(err.value).startswith(f"--device {spec}: no CUDA device is available here")
    assert "use --device cpu or auto" in str(err.value)


def test_module_device_and_listing():
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters: the CPU
    listing = device_listing()
    assert listing[0]["device"] == "cpu" and listing[0]["threads"] >= 1
    assert len(listing) == 1 + torch.cuda.device_count()
