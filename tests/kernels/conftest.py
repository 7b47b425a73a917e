"""Kernel builds shared by the C++ and ISA-audit tests: each is configured and compiled once a session."""

from __future__ import annotations

import shutil

import pytest

from tests.kernels.helpers import cmake_build
from tests.models import require

AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"
AARCH64_TOOLS = ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "qemu-aarch64")
APT_AARCH64 = "apt-get install -y gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user"


@pytest.fixture(scope="session")
def native_build(tmp_path_factory):
    """This machine's CMake build of the kernel library and the C++ test binary."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    build = tmp_path_factory.mktemp("cpp_native")
    cmake_build(build, "-DQUANTLAB_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release", target="quantlab_kernels_test")
    return build


@pytest.fixture(scope="session")
def aarch64_build(tmp_path_factory):
    """The AArch64 cross build (run under qemu-user)."""
    missing = [t for t in AARCH64_TOOLS if shutil.which(t) is None]
    require(not missing, f"{', '.join(missing)} not installed ({APT_AARCH64})")
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
    return build
