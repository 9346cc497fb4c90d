"""The package build: the native extension is optional (a machine without a C++ compiler still gets a
working install with the torch kernels), and the CUDA sources compile wherever nvcc is found."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rlgen import kernels

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_builds_without_a_compiler(tmp_path):
    env = {**os.environ, "CXX": "/nonexistent/c++", "CC": "/nonexistent/cc", "CUDACXX": "/nonexistent/nvcc"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         "-C", f"build-dir={tmp_path / 'build'}"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("rlgen-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rlgen/kernels/__init__.py" in names and "rlgen/builtin_models/tiny-arith/model.safetensors" in names
    assert not [n for n in names if "_native" in n]  # nothing compiled: the torch kernels serve


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler on this machine")
def test_native_cpu_extension_is_built_here():
    """A machine with a C++ compiler gets the native kernels at install time, and they are active."""
    assert kernels.native_import_error("_native") is None
    assert kernels.backend_name("cpu") == ("reference" if kernels.mode() == "reference" else
                                          "torch" if kernels.mode() == "torch" else "native-cpu")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: the CUDA extension is not built")
def test_cuda_extension_compiled_when_nvcc_exists():
    """nvcc on PATH at install time means rlgen._native_cuda was compiled, and it imports without a GPU."""
    assert kernels.native_import_error("_native_cuda") is None
    module = kernels._import_native("_native_cuda")
    assert hasattr(module, "softmax_stats") and hasattr(module, "softmax_grad")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_kernel_math_in_host_emulation(tmp_path):
    """No GPU here: the CUDA kernels' per-thread math is compiled as host code and checked against a
    float64 reference (row lengths 0-50000, alignments, fp32/bf16/fp64, masks, in-place gradients)."""
    binary = tmp_path / "host_emulation"
    build = subprocess.run(
        ["nvcc", "-std=c++17", "-O1", "-x", "cu", str(REPO / "native/cuda/tests/host_emulation.cu"), "-o", str(binary),
         "-I", str(REPO / "native/cpu")],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "FAIL" not in run.stdout and "grad done, failures 0" in run.stdout
