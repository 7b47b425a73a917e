"""The C++ test binary (csrc/tests/test_kernels.cpp): every path against the scalar reference,
natively and, for AArch64, cross-compiled and run under qemu-user."""

from __future__ import annotations

import platform
import shutil
import subprocess

import pytest

from tests.kernels.conftest import AARCH64_SYSROOT
from tests.models import require


def _run_and_check(cmd: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and tail.endswith(" 0 failed"), proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc.stdout


def test_cpp_paths_match_scalar_native(native_build):
    out = _run_and_check([str(native_build / "quantlab_kernels_test")])
    if platform.machine() in ("x86_64", "AMD64"):
        assert "avx2" in out.splitlines()[0]


def test_cpp_aarch64_under_qemu(aarch64_build):
    exe = str(aarch64_build / "quantlab_kernels_test")
    # qemu's default CPU has the dot-product extension: neon and neon_dot are both tested.
    out = _run_and_check(["qemu-aarch64", "-L", AARCH64_SYSROOT, exe, "--quick"])
    assert "available: scalar neon neon_dot" in out.splitlines()[0]
    # A Cortex-A53 (ARMv8.0, no SDOT): runtime dispatch must fall back to plain NEON.
    out = _run_and_check(["qemu-aarch64", "-L", AARCH64_SYSROOT, "-cpu", "cortex-a53", exe, "--quick"])
    assert "best:neon" in out.splitlines()[0] and "neon_dot" not in out.splitlines()[0].split("available:")[1]


def _qemu_x86(cpu: str, exe: str) -> str:
    require(shutil.which("qemu-x86_64") is not None, "qemu-x86_64 not installed (apt-get install qemu-user)")
    return _run_and_check(["qemu-x86_64", "-cpu", cpu, exe, "--quick"])


def test_cpp_on_older_x86_cpus_under_qemu(native_build):
    """The same binary on emulated CPUs without AVX-512 (an AVX2-only Haswell) and without AVX at all:
    dispatch must pick what they have, and nothing may execute an instruction they lack (qemu raises
    SIGILL for an instruction outside the emulated CPU's CPUID)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    exe = str(native_build / "quantlab_kernels_test")
    first = _qemu_x86("Haswell", exe).splitlines()[0]
    assert "best:avx2" in first and "avx512" not in first.split("available:")[1], first
    first = _qemu_x86("qemu64", exe).splitlines()[0]
    assert "available: scalar best:scalar" in first, first
