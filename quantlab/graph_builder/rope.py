"""Rotary position embeddings: the frequencies (computed once at build time) and the rotation in the graph,
as a mixin of ``quantlab.graph_builder.decoder._Builder`` (it uses the builder's ``op``, ``const``, ``i64`` and
``spec`` through ``self``)."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from quantlab.io.spec import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies ``theta^(-2i/head_dim)`` for i in [0, head_dim/2), shape (head_dim // 2,).

    With Llama 3 scaling (``rope_type: llama3``) low frequencies are divided by ``factor``, high
    frequencies are kept, and the band between is interpolated smoothly; the same rule as Meta's
    reference code and transformers' ``_compute_llama3_parameters``.
    """
    # float64 then rounded once, so the table does not depend on accumulation order
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is not None:
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


class RopeOps:
    """cos/sin tables per RoPE base and the rotation of q/k in the checkpoint's layout."""

    def rope_tables(self, position_ids: ir.Value, theta: float | None = None) -> tuple[ir.Value, ir.Value]:
        """cos and sin of position * inv_freq, shape (batch, 1, seq, rotary_dim/2), shared by all layers
        that rotate with base ``theta`` (None: spec.rope_theta)."""
        s = self.spec
        theta = s.rope_theta if theta is None else theta
        if theta in self._rope:
            return self._rope[theta]
        self.position_ids = position_ids
        r = "rope" if theta == s.rope_theta else f"rope_{theta:g}"
        inv_freq = rope_inv_freq(s.rotary_dim, theta, s.rope_scaling if theta == s.rope_theta else None)
        pos = self.op("Cast", [position_ids], {"to": ir.DataType.FLOAT}, name=f"{r}.pos_f32")
        pos = self.op("Unsqueeze", [pos, self.i64([-1], "axes_last")], name=f"{r}.pos")  # (batch, seq, 1)
        freqs = self.op("Mul", [pos, self.const(inv_freq, f"{r}.inv_freq")], name=f"{r}.freqs")  # (batch, seq, r/2)
        freqs = self.op("Unsqueeze", [freqs, self.i64([1], "axes_1")], name=f"{r}.freqs_h")  # (batch, 1, seq, r/2)
        self._rope[theta] = self.op("Cos", [freqs], name=f"{r}.cos"), self.op("Sin", [freqs], name=f"{r}.sin")
        return self._rope[theta]

    def layer_rope(self, i: int, cos: ir.Value, sin: ir.Value) -> tuple[ir.Value, ir.Value]:
        """Layer i's cos/sin: the shared ones, or its own base's (Gemma 3's sliding layers)."""
        theta = self.spec.rope_theta_of(i)
        return (cos, sin) if theta == self.spec.rope_theta else self.rope_tables(self.position_ids, theta)

    def apply_rope(self, x: ir.Value, cos: ir.Value, sin: ir.Value, prefix: str) -> ir.Value:
        """Rotate x (batch, heads, seq, head_dim) in the layout the checkpoint's q/k rows are in; with a
        partial rotary the leading rotary_dim dims rotate (half-split within them) and the rest pass."""
        s = self.spec
        if s.rotary_dim < s.head_dim:
            r, last = s.rotary_dim, self.i64([-1], "axes_last")
            ends = [self.i64([0], "zero1"), self.i64([r], f"rot{r}"), self.i64([s.head_dim], "d1")]
            rot = self.op("Slice", [x, ends[0], ends[1], last], name=f"{prefix}.rot_in")
            rest = self.op("Slice", [x, ends[1], ends[2], last], name=f"{prefix}.pass")
            rot = self._rotate(rot, cos, sin, r, f"{prefix}.rot")
            return self.op("Concat", [rot, rest], {"axis": -1}, name=f"{prefix}.out")
        return self._rotate(x, cos, sin, s.head_dim, prefix)

    def _rotate(self, x: ir.Value, cos: ir.Value, sin: ir.Value, d: int, prefix: str) -> ir.Value:
        """x (..., d) rotated as a whole."""
        n = "" if d == self.spec.head_dim else f"_r{d}"  # constant names are unique per value
        if self.spec.rope_interleaved:  # llama2.c / GGUF storage: pairs (2i, 2i+1)
            x1 = self.op(
                "Slice",
                [
                    x,
                    self.i64([0], "zero1"),
                    self.i64([d], f"d1{n}"),
                    self.i64([-1], "axes_last"),
                    self.i64([2], "two1"),
                ],
                name=f"{prefix}.even",
            )
            x2 = self.op(
                "Slice",
                [x, self.i64([1], "one1"), self.i64([d], f"d1{n}"), self.i64([-1], "axes_last"), self.i64([2], "two1")],
                name=f"{prefix}.odd",
            )
        else:  # Hugging Face: halves (i, i + d/2)
            x1 = self.op(
                "Slice",
                [x, self.i64([0], "zero1"), self.i64([d // 2], f"half_d1{n}"), self.i64([-1], "axes_last")],
                name=f"{prefix}.lo",
            )
            x2 = self.op(
                "Slice",
                [x, self.i64([d // 2], f"half_d1{n}"), self.i64([d], f"d1{n}"), self.i64([-1], "axes_last")],
                name=f"{prefix}.hi",
            )
        r1 = self.op(
            "Sub",
            [self.op("Mul", [x1, cos], name=f"{prefix}.x1c"), self.op("Mul", [x2, sin], name=f"{prefix}.x2s")],
            name=f"{prefix}.r1",
        )
        r2 = self.op(
            "Add",
            [self.op("Mul", [x2, cos], name=f"{prefix}.x2c"), self.op("Mul", [x1, sin], name=f"{prefix}.x1s")],
            name=f"{prefix}.r2",
        )
        if not self.spec.rope_interleaved:
            return self.op("Concat", [r1, r2], {"axis": -1}, name=f"{prefix}.out")
        # interleave back: (batch, heads, seq, d/2, 2) -> (batch, heads, seq, d)
        r1 = self.op("Unsqueeze", [r1, self.i64([-1], "axes_last")], name=f"{prefix}.r1u")
        r2 = self.op("Unsqueeze", [r2, self.i64([-1], "axes_last")], name=f"{prefix}.r2u")
        pairs = self.op("Concat", [r1, r2], {"axis": -1}, name=f"{prefix}.pairs")
        return self.op("Reshape", [pairs, self.i64([0, 0, 0, d], f"shape_bhsd{n}")], name=f"{prefix}.out")
