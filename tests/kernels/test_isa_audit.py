"""Every kernel path's object code uses only the CPU features its runtime check tests (isa_audit.py),
on the x86-64 build and the AArch64 cross build, whatever CPU runs the tests; and the audit catches
deliberately mis-flagged builds."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.kernels import isa_audit
from tests.kernels.conftest import AARCH64_SYSROOT
from tests.kernels.helpers import REPO
from tests.models import require

X86 = platform.machine() in ("x86_64", "AMD64")
CSRC = REPO / "csrc"
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]


def _x86_tools():
    if not X86:
        pytest.skip("the x86-64 audit reads this machine's native build")
    require(shutil.which("objdump") is not None, "objdump not installed (apt-get install binutils)")
    pytest.importorskip("iced_x86", reason="iced-x86 not installed (pip install quantlab[test])")
    return {"objdump": "objdump", "nm": "nm"}


def _aarch64_tools():
    tools = {"llvm-objdump": "llvm-objdump", "nm": "aarch64-linux-gnu-nm"}
    missing = [t for t in tools.values() if shutil.which(t) is None]
    require(not missing, f"{', '.join(missing)} not installed (apt-get install llvm binutils-aarch64-linux-gnu)")
    return tools


def _features(cmd: list[str]) -> dict[str, frozenset[str]]:
    out = subprocess.run([*cmd, "--path-features"], capture_output=True, text=True, check=True, timeout=60).stdout
    return isa_audit.parse_path_features(out)


def _compile(src: Path | str, out: Path, flags: list[str], compiler: str = "g++") -> Path:
    """One object from a csrc file (or from source text), as CMake would build it plus ``flags``."""
    if isinstance(src, str):
        text, src = src, out.with_suffix(".cpp")
        src.write_text(text)
    cmd = [compiler, "-O3", "-std=c++17", "-fPIC", f"-I{CSRC}", f"-I{CSRC / 'include'}", *flags, "-c", str(src)]
    subprocess.run([*cmd, "-o", str(out)], check=True, capture_output=True, timeout=300)
    return out


def test_x86_objects_use_only_checked_features(native_build):
    tools = _x86_tools()
    features = _features([str(native_build / "quantlab_kernels_test")])
    objects = isa_audit.object_files(native_build)
    assert {isa_audit.path_of(o) for o in objects} >= {"scalar", "avx2"}
    violations = isa_audit.audit(objects, features, "x86_64", tools)
    assert not violations, "\n".join(map(str, violations))


def test_aarch64_objects_use_only_checked_features(aarch64_build):
    tools = _aarch64_tools()
    exe = ["qemu-aarch64", "-L", AARCH64_SYSROOT, str(aarch64_build / "quantlab_kernels_test")]
    features = _features(exe)
    assert features["neon_dot"] >= {"ASIMD", "DOTPROD"} and features["neon"] == {"ASIMD"}
    objects = isa_audit.object_files(aarch64_build)
    assert {isa_audit.path_of(o) for o in objects} == {"scalar", "neon", "neon_dot"}
    violations = isa_audit.audit(objects, features, "aarch64", tools)
    assert not violations, "\n".join(map(str, violations))


def test_audit_catches_an_avx2_object_built_with_avx_vnni(native_build, tmp_path):
    """The bug users hit: AVX-VNNI's VEX vpdpbusd in code that an AVX2 (or AVX512-VNNI) check lets run."""
    tools = _x86_tools()
    features = _features([str(native_build / "quantlab_kernels_test")])
    obj = _compile(
        CSRC / "kernels_avx2.cpp", tmp_path / "kernels_avx2.cpp.o", [*AVX2_FLAGS, "-mavxvnni", "-DQL_VNNI=1"]
    )
    violations = isa_audit.audit_x86_object(obj, features["avx2"], tools["objdump"])
    assert any("AVX_VNNI (vpdpbusd" in v.what for v in violations), violations
    (tmp_path / "ok").mkdir()
    good = _compile(CSRC / "kernels_avx2.cpp", tmp_path / "ok" / "kernels_avx2.cpp.o", AVX2_FLAGS)
    assert not isa_audit.audit_x86_object(good, features["avx2"], tools["objdump"])


def test_audit_catches_baseline_code_built_for_a_newer_cpu(native_build, tmp_path):
    """A -march that implies more (here AVX-512 for the portable reference kernels)."""
    tools = _x86_tools()
    features = _features([str(native_build / "quantlab_kernels_test")])
    obj = _compile(CSRC / "kernels_scalar.cpp", tmp_path / "kernels_scalar.cpp.o", ["-march=skylake-avx512"])
    violations = isa_audit.audit_x86_object(obj, features["scalar"], tools["objdump"])
    assert {v.what.split()[0] for v in violations} & {"AVX", "AVX2", "AVX512F", "AVX512VL", "BMI2"}, violations


def test_audit_catches_weak_symbols_and_unchecked_hand_overs(native_build, tmp_path):
    """An AVX-512 object that instantiates std::vector (a weak symbol the linker may give everyone) and
    calls the AVX-VNNI path's table directly, as the SIGILL build did."""
    tools = _x86_tools()
    features = _features([str(native_build / "quantlab_kernels_test")])
    objects = isa_audit.object_files(native_build)
    if not any(isa_audit.path_of(o) == "avx_vnni" for o in objects):
        pytest.skip("this compiler builds no AVX-VNNI path")
    bad = _compile(
        '#include <vector>\n#include "matmul_internal.h"\n'
        "template class std::vector<float>;  // weak copies of every member, built for AVX-512\n"
        "const ql::PathKernels* fallback() { return ql::avx_vnni_kernels(); }\n",
        tmp_path / "kernels_avx512.cpp.o",
        [*AVX2_FLAGS, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
    )
    assert isa_audit.weak_symbols(bad, tools["nm"])
    swapped = [o for o in objects if isa_audit.path_of(o) != "avx512_vnni"] + [bad]
    refs = isa_audit.cross_path_references(swapped, features, tools["nm"])
    assert any("avx_vnni path (AVX_VNNI unchecked)" in v.what for v in refs), refs
    # the real library's objects reach other paths only through supported_kernels()
    assert not isa_audit.cross_path_references(objects, features, tools["nm"])


def test_audit_catches_dotprod_in_the_plain_neon_path(aarch64_build, tmp_path):
    tools = _aarch64_tools()
    exe = ["qemu-aarch64", "-L", AARCH64_SYSROOT, str(aarch64_build / "quantlab_kernels_test")]
    features = _features(exe)
    obj = _compile(
        CSRC / "kernels_neon_dot.cpp",
        tmp_path / "kernels_neon.cpp.o",
        ["-march=armv8.2-a+dotprod"],
        compiler="aarch64-linux-gnu-g++",
    )
    violations = isa_audit.audit_aarch64_object(obj, features["neon"], tools["llvm-objdump"])
    assert violations and all("<unknown>" in v.what for v in violations)
