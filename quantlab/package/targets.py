"""Bundle targets as data: what each one allows in the graph and what it ships beside the model."""

from __future__ import annotations

import dataclasses

CONTRIB_DOMAIN = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class Target:
    """``accuracy_level`` is MatMulNBits' compute mode on this target (None: no MatMulNBits allowed);
    ``kernel_arch`` names the CPU the csrc/ kernel library is built for (None: no library shipped)."""

    name: str
    contrib_ops: bool
    accuracy_level: int | None
    kernel_arch: str | None
    elf_machine: int | None = None


# e_machine values from the ELF specification: 62 EM_X86_64, 183 EM_AARCH64.
TARGETS = {
    t.name: t
    for t in (
        Target("cpu-x86_64", contrib_ops=True, accuracy_level=4, kernel_arch=None),
        Target("cpu-arm64", contrib_ops=True, accuracy_level=4, kernel_arch="aarch64", elf_machine=183),
        Target("cuda", contrib_ops=True, accuracy_level=0, kernel_arch=None),
        Target("portable", contrib_ops=False, accuracy_level=None, kernel_arch=None),
    )
}
ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64"}
