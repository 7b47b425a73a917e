"""The C++ test binary (csrc/tests/test_kernels.cpp): every path against the scalar reference,
natively and, for AArch64, cross-compiled and run under qemu-user."""

from __future__ import annotations

import platform
import shutil
import subprocess

import pytest

from tests.kernels.helpers import cmake_build
from tests.models import require

AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"


def _run_and_check(cmd: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and tail.endswith(" 0 failed"), proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc.stdout


def test_cpp_paths_match_scalar_native(tmp_path_factory):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    build = tmp_path_factory.mktemp("cpp_native")
    cmake_build(build, "-DQUANTLAB_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release", target="quantlab_kernels_test")
    out = _run_and_check([str(build / "quantlab_kernels_test")])
    if platform.machine() in ("x86_64", "AMD64"):
        assert "avx2" in out.splitlines()[0]


def test_cpp_aarch64_under_qemu(tmp_path_factory):
    missing = [t for t in ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(t) is None]
    apt = "apt-get install -y gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user"
    require(not missing, f"{', '.join(missing)} not installed ({apt})")
    build = tmp_path_factory.mktemp("cpp_aarch64")
    cmake_build(
        build,
        "-DQUANTLAB_CUDA=OFF",
        "-DCMAKE_BUILD_TYPE=Release",
        "-DCMAKE_SYSTEM_NAME=Linux",
        "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
        "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc",
        "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++",
        target="quantlab_kernels_test",
    )
    exe = str(build / "quantlab_kernels_test")
    # qemu's default CPU has the dot-product extension: neon and neon_dot are both tested.
    out = _run_and_check(["qemu-aarch64", "-L", AARCH64_SYSROOT, exe, "--quick"])
    assert "available: scalar neon neon_dot" in out.splitlines()[0]
    # A Cortex-A53 (ARMv8.0, no SDOT): runtime dispatch must fall back to plain NEON.
    out = _run_and_check(["qemu-aarch64", "-L", AARCH64_SYSROOT, "-cpu", "cortex-a53", exe, "--quick"])
    assert "best:neon" in out.splitlines()[0] and "neon_dot" not in out.splitlines()[0].split("available:")[1]
