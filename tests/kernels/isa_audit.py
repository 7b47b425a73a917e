"""Instruction-set audit of the kernel library's object code.

A kernel path may execute only instructions whose CPU feature its runtime check tests: anything more
is a SIGILL on some CPU (an AVX-512 VNNI CPU without AVX-VNNI ran a VEX ``vpdpbusd``). A green test run
on one CPU proves nothing about the next, so this reads the object code instead of running it:

1. every instruction of an object belongs to a feature of the object's path (x86-64: each instruction
   decoded by iced-x86, which knows its CPUID features; AArch64: llvm-objdump told exactly the path's
   features, so anything else decodes as ``<unknown>``);
2. an ISA object defines no weak symbols (an inline or template function compiled with AVX-512 flags
   is a weak symbol, and the linker may keep that copy for the baseline code as well);
3. an ISA object refers to another path's symbols only when that path's features are a subset of its
   own (any other hand-over must go through the driver's checked ``supported_kernels``).

The features each path checks come from the library itself (``ql_path_features``, printed by the
C++ test binary's ``--path-features``), so the audit and the runtime check cannot drift apart.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Path ids (csrc/include/quantlab_kernels.h) and the object that holds each path's code.
PATH_IDS = {"scalar": 1, "avx2": 2, "neon": 3, "neon_dot": 4, "avx_vnni": 5, "avx512_vnni": 6, "amx": 7}
OBJECT_PATHS = {
    "kernels_avx2": "avx2",
    "kernels_avx_vnni": "avx_vnni",
    "kernels_avx512": "avx512_vnni",
    "kernels_amx": "amx",
    "kernels_amx_bf16": "amx",
    "kernels_neon": "neon",
    "kernels_neon_dot": "neon_dot",
}

# The driver is the one dispatcher: it calls into a path only after kernels_for() checked the CPU
# (the native and qemu runs of the C++ test binary exercise that), so its references are not audited.
DISPATCHERS = frozenset({"matmul_nbits"})

# x86-64 baseline: what every x86-64 CPU executes (iced-x86 CpuidFeature names). CET_IBT is endbr64,
# a NOP before CET; MULTIBYTENOP is the long NOP every x86-64 CPU has.
X86_BASELINE = frozenset(
    {"INTEL8086", "INTEL186", "INTEL286", "INTEL386", "INTEL486", "X64", "CPUID", "CMOV", "FPU", "FPU287",
     "FPU387", "SSE", "SSE2", "MULTIBYTENOP", "PAUSE", "CET_IBT", "TSC"}
)  # fmt: skip
# Instructions allowed beyond a path's features in exactly one place, each guarded by a check that
# the audit cannot see: (object stem, function name fragment, feature) -> why.
X86_GUARDED = {
    # (detect() and xcr0() are inlined into ql::cpu_features())
    ("cpu_features", "cpu_features", "XSAVE"): "xgetbv, executed only when CPUID reports OSXSAVE",
}
# Encodings that older CPUs execute as a baseline instruction: gcc's generic tuning emits tzcnt
# (F3 0F BC, "rep bsf") for __builtin_ctz of a non-zero value, which runs as bsf without BMI1.
X86_COMPATIBLE = {"BMI1": frozenset({"tzcnt"})}
# gcc's target_clones (csrc/gptq.cpp): the resolver tests the clone's named feature with
# __builtin_cpu_supports; the lower levels that gcc's target implies are present on every CPU that
# has it (AVX2 and AVX-512F CPUs all have SSE4.2 and POPCNT).
_SSE_UP = {"SSE3", "SSSE3", "SSE4_1", "SSE4_2", "POPCNT", "XSAVE", "AVX"}
X86_CLONE_FEATURES = {"avx512f": frozenset(_SSE_UP | {"AVX2", "AVX512F"}), "avx2": frozenset(_SSE_UP | {"AVX2"})}
# AArch64: our feature names -> llvm-objdump --mattr names.
LLVM_AARCH64_ATTRS = {"ASIMD": "neon", "DOTPROD": "dotprod", "LSE": "lse", "RDM": "rdm", "CRC32": "crc"}


@dataclass(frozen=True)
class Violation:
    obj: str
    function: str
    what: str

    def __str__(self) -> str:
        return f"{self.obj}: {self.function}: {self.what}"


def object_files(build_dir: Path) -> list[Path]:
    """The kernel library's object files in a CMake build folder."""
    found = sorted((build_dir / "CMakeFiles" / "quantlab_kernels_obj.dir").rglob("*.o"))
    if not found:
        raise FileNotFoundError(f"no objects of quantlab_kernels_obj under {build_dir}")
    return found


def stem(obj: Path) -> str:
    return obj.name.split(".")[0]


def path_of(obj: Path) -> str:
    return OBJECT_PATHS.get(stem(obj), "scalar")


def parse_path_features(text: str) -> dict[str, frozenset[str]]:
    """``quantlab_kernels_test --path-features`` output -> {path name: features}."""
    by_id = {}
    for line in text.splitlines():
        pid, _, names = line.partition(":")
        by_id[int(pid)] = frozenset(names.split())
    return {name: by_id[pid] for name, pid in PATH_IDS.items()}


# ---- 1. instructions ------------------------------------------------------------------------------

_FUNC = re.compile(r"^[0-9a-f]+ <(.+)>:$")
_INSN = re.compile(r"^\s*[0-9a-f]+:\t([0-9a-f ]+?)\s*\t(?:\{\w+\}\s*)?(\S*)")  # skips "{vex} "


def _disassemble(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
    return proc.stdout


def x86_instruction_features(obj: Path, objdump: str = "objdump") -> dict[str, dict[str, set[str]]]:
    """{function: {feature: mnemonics}} for every instruction of an x86-64 object."""
    import iced_x86

    names = {getattr(iced_x86.CpuidFeature, n): n for n in dir(iced_x86.CpuidFeature) if n.isupper()}
    out: dict[str, dict[str, set[str]]] = {}
    func = "?"
    for line in _disassemble([objdump, "-d", "-w", str(obj)]).splitlines():
        m = _FUNC.match(line)
        if m:
            func = m.group(1)
            continue
        m = _INSN.match(line)
        if not m or m.group(2) == "(bad)":
            if m:
                out.setdefault(func, {}).setdefault("UNDECODABLE", set()).add(line.strip())
            continue
        code = bytes.fromhex(m.group(1).replace(" ", ""))
        insn = iced_x86.Decoder(64, code).decode()
        for feature in insn.cpuid_features():
            out.setdefault(func, {}).setdefault(names.get(feature, str(feature)), set()).add(m.group(2))
    return out


def audit_x86_object(obj: Path, allowed: frozenset[str], objdump: str = "objdump") -> list[Violation]:
    """Instructions of ``obj`` outside ``allowed`` (plus the baseline, the guarded uses and gcc's clones)."""
    found = []
    for func, features in x86_instruction_features(obj, objdump).items():
        ok = set(X86_BASELINE | allowed)
        clone = func.rsplit(".", 1)[-1] if "." in func else ""
        ok |= X86_CLONE_FEATURES.get(clone, frozenset())
        ok |= {f for (s, frag, f) in X86_GUARDED if s == stem(obj) and frag in func}
        for feature, mnemonics in sorted(features.items()):
            if feature not in ok and not mnemonics <= X86_COMPATIBLE.get(feature, frozenset()):
                found.append(Violation(obj.name, func, f"{feature} ({', '.join(sorted(mnemonics)[:6])})"))
    return found


def audit_aarch64_object(obj: Path, allowed: frozenset[str], llvm_objdump: str = "llvm-objdump") -> list[Violation]:
    """Instructions of ``obj`` that llvm-objdump cannot decode with exactly the path's features."""
    attrs = ",".join("+" + LLVM_AARCH64_ATTRS[f] for f in sorted(allowed | {"ASIMD"}))
    found = []
    func = "?"
    for line in _disassemble([llvm_objdump, "-d", f"--mattr={attrs}", str(obj)]).splitlines():
        m = _FUNC.match(line)
        if m:
            func = m.group(1)
        elif "<unknown>" in line:
            found.append(Violation(obj.name, func, f"instruction outside {attrs}: {line.strip()}"))
    return found


# ---- 2 and 3. symbols -----------------------------------------------------------------------------


def _symbols(obj: Path, nm: str = "nm") -> list[tuple[str, str]]:
    """(type letter, name) of every symbol, mangled."""
    rows = []
    for line in _disassemble([nm, str(obj)]).splitlines():
        parts = line.split()
        if len(parts) >= 2:
            rows.append((parts[-2], parts[-1]))
    return rows


def weak_symbols(obj: Path, nm: str = "nm") -> list[Violation]:
    """Weak or unique global definitions in an ISA object."""
    return [
        Violation(obj.name, name, f"weak symbol ({kind}): the linker may keep this ISA's copy for all callers")
        for kind, name in _symbols(obj, nm)
        if kind in ("W", "V", "u")
    ]


def cross_path_references(objects: list[Path], features: dict[str, frozenset[str]], nm: str = "nm") -> list[Violation]:
    """References from one path's object to a symbol defined by a path with features it does not check."""
    owner: dict[str, str] = {}
    for obj in objects:
        for kind, name in _symbols(obj, nm):
            if kind in ("T", "D", "R", "B"):
                owner[name] = path_of(obj)
    found = []
    for obj in objects:
        if stem(obj) in DISPATCHERS:
            continue
        mine = features[path_of(obj)]
        for kind, name in _symbols(obj, nm):
            if kind != "U" or name not in owner:
                continue
            theirs = features[owner[name]]
            if not theirs <= mine:
                extra = " ".join(sorted(theirs - mine))
                found.append(Violation(obj.name, name, f"refers to the {owner[name]} path ({extra} unchecked)"))
    return found


def audit(
    objects: list[Path], features: dict[str, frozenset[str]], arch: str, tools: dict[str, str]
) -> list[Violation]:
    """Every check above over one build's objects; ``tools`` names objdump / llvm-objdump / nm."""
    found: list[Violation] = []
    for obj in objects:
        allowed = features[path_of(obj)]
        if arch == "x86_64":
            found += audit_x86_object(obj, allowed, tools["objdump"])
        else:
            found += audit_aarch64_object(obj, allowed, tools["llvm-objdump"])
        if path_of(obj) != "scalar":
            found += weak_symbols(obj, tools["nm"])
    found += cross_path_references(objects, features, tools["nm"])
    return found
