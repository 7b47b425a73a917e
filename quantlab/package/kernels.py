"""The csrc/ kernel library for a bundle's target: cross-built with CMake, identified by its ELF header."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import subprocess
from pathlib import Path

from quantlab.errors import InputError
from quantlab.package.targets import ELF_MACHINES, Target

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
LIBRARY_NAME = "_libquantlab_kernels.so"
# csrc/tests/test_kernels.cpp, built from the same objects as the library and kept beside it
TEST_BINARY = "quantlab_kernels_test"
# The same toolchain the kernel tests cross-compile with (tests/kernels/test_cpp.py).
CROSS_COMPILERS = {"aarch64": ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++")}
BUILD_TIMEOUT_S = 900


def elf_machine(path: str | os.PathLike) -> dict:
    """Read an ELF header: class, byte order and e_machine (183 = AArch64), like ``file`` reports."""
    head = Path(path).read_bytes()[:20]
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise InputError(path, None, "not an ELF file")
    order = "<" if head[5] == 1 else ">"
    (machine,) = struct.unpack_from(order + "H", head, 18)
    return {
        "class": {1: "ELF32", 2: "ELF64"}.get(head[4], "unknown"),
        "byte_order": "little" if order == "<" else "big",
        "e_machine": machine,
        "machine": ELF_MACHINES.get(machine, "unknown"),
    }


def _sources_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in [REPO / "CMakeLists.txt", *(REPO / "csrc").rglob("*")] if p.is_file()):
        h.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def kernel_test_binary(library: Path) -> Path:
    """The C++ test binary built with ``library`` (run it under qemu-user for a cross target)."""
    return library.parent / TEST_BINARY


def kernel_library(target: Target, cache_dir: str | os.PathLike | None = None) -> Path:
    """Build (once per csrc/ content, cached) the kernel library for ``target.kernel_arch``."""
    arch = target.kernel_arch
    if arch not in CROSS_COMPILERS:
        raise InputError(None, "--target", f"no kernel library build for {target.name}")
    cc, cxx = CROSS_COMPILERS[arch]
    missing = [t for t in (cc, cxx, "cmake") if shutil.which(t) is None]
    if missing:
        raise InputError(
            None,
            "--target",
            f"{target.name} ships the kernel library, which needs {', '.join(missing)} "
            "(apt-get install -y gcc-aarch64-linux-gnu g++-aarch64-linux-gnu cmake)",
        )
    if not (REPO / "csrc").is_dir():
        raise InputError(REPO / "csrc", None, "the kernel sources are not in this installation")
    root = Path(cache_dir or os.environ.get("QUANTLAB_KERNEL_CACHE", Path.home() / ".cache" / "quantlab" / "kernels"))
    build = root / f"{arch}-{_sources_digest()}"
    library = build / LIBRARY_NAME
    if library.is_file():
        return library
    tmp = root / f".{build.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    configure = [
        "cmake", "-S", str(REPO), "-B", str(tmp),
        "-DQUANTLAB_CUDA=OFF", "-DQUANTLAB_BUILD_TESTS=ON", "-DCMAKE_BUILD_TYPE=Release",
        "-DCMAKE_SYSTEM_NAME=Linux", f"-DCMAKE_SYSTEM_PROCESSOR={arch}",
        f"-DCMAKE_C_COMPILER={cc}", f"-DCMAKE_CXX_COMPILER={cxx}",
    ]  # fmt: skip
    logger.info("building the %s kernel library in %s", arch, tmp)
    targets = ["--target", "quantlab_kernels", "--target", TEST_BINARY]
    for cmd in (configure, ["cmake", "--build", str(tmp), "-j", "2", *targets]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"kernel build failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    build.mkdir(parents=True, exist_ok=True)
    os.replace(tmp / TEST_BINARY, build / TEST_BINARY)
    os.replace(tmp / LIBRARY_NAME, library)
    shutil.rmtree(tmp, ignore_errors=True)
    return library
