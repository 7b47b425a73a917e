"""Quantization schemes: one spelled-out string parsed into a frozen dataclass.

Grammar (parts joined by ``-``, the first part is always the bit widths)::

    w{4|8}a{16|8}  [g{32|64|128|256} | pc]  [sym | asym]  [rtn | gptq | awq | smoothquant]

Examples: ``w4a16-g128-asym``, ``w4a16-g32-sym``, ``w8a16-g128``, ``w4a16-g128-awq``,
``w4a16-g128-gptq``, ``w8a8-smoothquant``, ``w4a16-pc``.

Defaults, so that nothing hides in a file name:

- method: ``rtn`` when no method part is given;
- symmetry: asymmetric for rtn/gptq/awq unless ``-sym``; smoothquant weights are always
  per-channel symmetric int8 (``-asym`` or a group size with smoothquant is an error);
- weight-only methods need a grouping part (``g<N>`` or ``pc``): there is no default group size.

``str(scheme)`` is the canonical, fully spelled form (``w8a16-g128`` prints as ``w8a16-g128-asym``,
``-rtn`` is never printed) and ``parse_scheme(str(s)) == s`` for every valid scheme.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PER_CHANNEL = -1
"""``group_size`` value meaning one group spanning the whole input dimension K."""

GROUP_SIZES = (32, 64, 128, 256)
WEIGHT_BITS = (4, 8)
METHODS = ("rtn", "gptq", "awq", "smoothquant")

_BITS_RE = re.compile(r"^w(\d+)a(\d+)$")
_GROUP_RE = re.compile(r"^g(\d+)$")


@dataclass(frozen=True)
class QuantScheme:
    """A weight (and optionally activation) quantization scheme.

    bits: weight bits (4 or 8). group_size: elements of K sharing one scale, or ``PER_CHANNEL`` (-1).
    symmetric: zero point fixed at 2^(bits-1) (the MatMulNBits default) instead of stored per group.
    method: how the integer codes are chosen. activation_bits: 16 (weight-only) or 8 (W8A8).
    """

    bits: int
    group_size: int
    symmetric: bool
    method: str = "rtn"
    activation_bits: int = 16

    def __post_init__(self) -> None:
        if self.bits not in WEIGHT_BITS:
            raise ValueError(f"weight bits must be one of {WEIGHT_BITS}, got {self.bits}")
        if self.group_size != PER_CHANNEL and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group size must be one of {GROUP_SIZES} or per channel (-1), got {self.group_size}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.activation_bits not in (8, 16):
            raise ValueError(f"activation bits must be 16 or 8, got {self.activation_bits}")
        if self.method == "smoothquant":
            if (self.bits, self.activation_bits) != (8, 8):
                raise ValueError("smoothquant is W8A8: spell it w8a8-smoothquant")
            if self.group_size != PER_CHANNEL or not self.symmetric:
                raise ValueError("smoothquant weights are per-channel symmetric int8: drop the group/asym part")
        elif self.activation_bits != 16:
            raise ValueError(f"8-bit activations need method smoothquant, got {self.method!r}")

    @property
    def per_channel(self) -> bool:
        return self.group_size == PER_CHANNEL

    @property
    def weight_only(self) -> bool:
        return self.activation_bits == 16

    def __str__(self) -> str:
        head = f"w{self.bits}a{self.activation_bits}"
        if self.method == "smoothquant":
            return f"{head}-smoothquant"
        group = "pc" if self.per_channel else f"g{self.group_size}"
        parts = [head, group, "sym" if self.symmetric else "asym"]
        if self.method != "rtn":
            parts.append(self.method)
        return "-".join(parts)


def parse_scheme(text: str) -> QuantScheme:
    """Parse ``w4a16-g128-asym`` and friends (see the module docstring) into a :class:`QuantScheme`."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty quantization scheme {text!r}; expected e.g. 'w4a16-g128-asym'")
    parts = text.strip().lower().split("-")
    match = _BITS_RE.match(parts[0])
    if match is None:
        raise ValueError(f"scheme {text!r}: first part must be 'w<bits>a<bits>' (e.g. 'w4a16'), got {parts[0]!r}")
    bits, activation_bits = int(match.group(1)), int(match.group(2))

    group_size: int | None = None
    symmetric: bool | None = None
    method: str | None = None
    for part in parts[1:]:
        group_match = _GROUP_RE.match(part)
        if group_match or part == "pc":
            if group_size is not None:
                raise ValueError(f"scheme {text!r}: more than one grouping part ({part!r})")
            group_size = int(group_match.group(1)) if group_match else PER_CHANNEL
        elif part in ("sym", "asym"):
            if symmetric is not None:
                raise ValueError(f"scheme {text!r}: more than one of sym/asym")
            symmetric = part == "sym"
        elif part in METHODS:
            if method is not None:
                raise ValueError(f"scheme {text!r}: more than one method ({method!r}, {part!r})")
            method = part
        else:
            raise ValueError(
                f"scheme {text!r}: unknown part {part!r}; expected g<{'|'.join(map(str, GROUP_SIZES))}>, pc, "
                f"sym, asym or a method ({', '.join(METHODS)})"
            )

    method = method or "rtn"
    if method == "smoothquant":
        group_size = PER_CHANNEL if group_size is None else group_size
        symmetric = True if symmetric is None else symmetric
    elif group_size is None:
        raise ValueError(f"scheme {text!r}: missing grouping part, add g<N> (e.g. g128) or pc")
    if symmetric is None:
        symmetric = False
    return QuantScheme(bits, group_size, symmetric, method, activation_bits)
