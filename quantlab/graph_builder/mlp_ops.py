"""The feed-forward half of a decoder layer, as a mixin of ``quantlab.graph_builder.decoder._Builder``: the dense
MLP in its variants (gated or not; silu, gelu-tanh or squared ReLU) and the sparse mixture of experts.

A sparse MLP is built in one of two forms (``BuildOptions.moe``), held to each other and to transformers
by tests/graph_builder/test_new_families_parity.py:

``decomposed`` (plain opset-21 ONNX)::

    logits  = MatMul(x, router)                          (batch, seq, experts)
    probs   = Softmax(logits)
    top, ix = TopK(probs, k)                             (batch, seq, k)
    top     = top / ReduceSum(top)                       when spec.moe_normalize_topk
    routing = ScatterElements(zeros, ix, top)            (batch, seq, experts), 0 for unselected experts
    w_e     = Split(routing)[e]                          (batch, seq, 1)
    y_e     = down_e(silu(gate_e(x)) * up_e(x))          every expert, each an ordinary linear MatMul(x, W)
    out     = Sum(y_e * w_e over e)

  Exact (an unselected expert is multiplied by 0) and simple, but it computes every expert: experts /
  k times the FLOPs of the sparse op. It is the form for runtimes without onnxruntime's contrib ops, and
  the one calibration runs (its taps: ``mlp.topk_indices`` and each expert's ``mlp.experts.{e}.act``).
  Each expert's linears are named like dense ones (``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``),
  so weight passes quantize them as they do any linear (MatMulNBits, or DequantizeLinear -> MatMul).

``op``: ``com.microsoft.MoE(x, logits, fc1, -, fc2)``, onnxruntime's sparse kernel, which does the softmax,
  top-k and renormalization itself (``k``, ``normalize_routing_weights``) and runs only the chosen
  experts. fc1 holds each expert's gate and up rows interleaved (``swiglu_fusion=1``: row 2i is gate_i,
  row 2i+1 is up_i; the CPU kernel reads no other SwiGLU layout), shape (experts, 2 * moe_ff, hidden);
  fc2 is the down projections in torch layout, (experts, hidden, moe_ff). ``activation_alpha=1``,
  ``activation_beta=0`` and no ``swiglu_limit`` make its SwiGLU ``g * sigmoid(g) * u``, the Llama one.
  The node carries, in ``node.meta[MOE_EXPERTS]``, the names of the expert linears its fc1 / fc2 hold and
  a loader of each one's float (out, in) weight, so ``QuantizeWeightsPass`` can rewrite it to
  ``com.microsoft.QMoE`` over their codes without reading the stacked tensors back.

The router stays float under every weight recipe: its initializer is named ``.router``, not ``.weight``,
so ``quantizable_linears`` (linears are MatMuls reading a ``*.weight`` initializer) leaves it alone; a
router rounded to 4 bits would change which experts a token picks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from quantlab.graph_builder.attention_ops import MS_DOMAIN


@dataclasses.dataclass(frozen=True)
class MoeExperts:
    """The linears a com.microsoft.MoE node holds: fc1[e] = (gate, up) of expert e, interleaved row by row;
    fc2[e] = its down projection; ``load(linear)`` -> that linear's float32 (out, in) weight."""

    fc1: tuple[tuple[str, str], ...]
    fc2: tuple[str, ...]
    load: Callable[[str], np.ndarray]


MOE_FORMS = ("auto", "op", "decomposed")
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# node.meta key of a com.microsoft.MoE node: a MoeExperts (see moe_op)
MOE_EXPERTS = "quantlab.moe_experts"

_SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))


class MlpOps:
    """Dense and sparse MLPs; reads ``self.spec``, ``self.options`` and the builder's helpers."""

    def moe_form(self) -> str:
        """``auto``: the sparse op where the graph already uses onnxruntime's contrib ops (fused attention),
        the decomposition in the plain, standard-ONNX graph."""
        form = self.options.moe
        if form == "auto":
            return "op" if self.options.attention == "fused" else "decomposed"
        return form

    def activation(self, x: ir.Value, p: str) -> ir.Value:
        kind = self.spec.mlp_activation
        if kind == "silu":
            return self.op("Mul", [x, self.op("Sigmoid", [x], name=f"{p}.sigmoid")], name=f"{p}.silu")
        if kind == "relu2":
            r = self.op("Relu", [x], name=f"{p}.relu")
            return self.op("Mul", [r, r], name=f"{p}.relu2")
        # gelu with the tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = self.op("Mul", [self.op("Mul", [x, x], name=f"{p}.x2"), x], name=f"{p}.x3")
        inner = self.op(
            "Add", [x, self.op("Mul", [cube, self.f32(0.044715, "gelu_c")], name=f"{p}.cx3")], name=f"{p}.in"
        )
        t = self.op(
            "Tanh", [self.op("Mul", [inner, self.f32(_SQRT_2_OVER_PI, "gelu_k")], name=f"{p}.arg")], name=f"{p}.tanh"
        )
        half = self.op("Mul", [x, self.f32(0.5, "gelu_half")], name=f"{p}.half_x")
        return self.op("Mul", [half, self.op("Add", [t, self.f32(1.0, "gelu_one")], name=f"{p}.1pt")], name=f"{p}.gelu")

    def mlp(self, x: ir.Value, i: int) -> ir.Value:
        if i in self.spec.moe_layers:
            return self.moe_op(x, i) if self.moe_form() == "op" else self.moe_decomposed(x, i)
        p = f"model.layers.{i}.mlp"
        gate = self.linear(x, f"{p}.gate_proj") if self.spec.mlp_gated else None  # gate first: fused as gate_up
        up = self.linear(x, f"{p}.up_proj")
        if gate is not None:
            act = self.op("Mul", [self.activation(gate, p), up], name=f"{p}.act")
        else:
            act = self.op("Identity", [self.activation(up, p)], name=f"{p}.act")
        return self.linear(act, f"{p}.down_proj")

    # -- mixture of experts ------------------------------------------------------------------------
    def router_logits(self, x: ir.Value, p: str) -> ir.Value:
        """(batch, seq, experts) f32. The router stays fp32 whatever the weight dtype: it picks the experts."""
        name = f"{p}.gate.weight"
        experts, hidden = self.source.shape(name)
        w = self._lazy(f"{p}.gate.router", (hidden, experts), lambda: self.source.load(name).T, "fp32")
        return self.op("MatMul", [x, w], name=f"{p}.router_logits")

    def stacked_experts(self, p: str, proj: str) -> ir.Value:
        """Every expert's ``proj`` weight (out, in) as one (experts, out, in) tensor, the MoE op's layout."""
        s = self.spec
        names = [f"{p}.experts.{e}.{proj}.weight" for e in range(s.num_experts)]
        out_f, in_f = self.source.shape(names[0])

        def load() -> np.ndarray:
            return np.stack([self.source.load(n) for n in names])

        shape = (s.num_experts, out_f, in_f)
        return self._as_f32(self._lazy(f"{p}.experts.{proj}.torch", shape, load, self.options.weight_dtype))

    def moe_decomposed(self, x: ir.Value, i: int) -> ir.Value:
        s = self.spec
        p = f"model.layers.{i}.mlp"
        probs = self.op("Softmax", [self.router_logits(x, p)], {"axis": -1}, name=f"{p}.router_probs")
        k = self.i64([s.experts_per_token], f"moe_k{s.experts_per_token}")
        top, index = self.tape.op_multi_out(
            "TopK",
            [probs, k],
            {"axis": -1, "largest": 1, "sorted": 1},
            name=f"{p}.topk",
            outputs=[ir.Value(name=f"{p}.topk_values"), ir.Value(name=f"{p}.topk_indices")],
        )  # (batch, seq, k)
        if s.moe_normalize_topk:
            total = self.op("ReduceSum", [top, self.i64([-1], "axes_last")], {"keepdims": 1}, name=f"{p}.topk_sum")
            top = self.op("Div", [top, total], name=f"{p}.topk_norm")
        zeros = self.op("ConstantOfShape", [self.op("Shape", [probs], name=f"{p}.probs_shape")], name=f"{p}.zeros")
        routing = self.op("ScatterElements", [zeros, index, top], {"axis": -1}, name=f"{p}.routing")  # (b, s, E)
        weights = self.tape.op_multi_out(
            "Split",
            [routing],
            {"axis": -1, "num_outputs": s.num_experts},
            name=f"{p}.routing_split",
            outputs=[ir.Value(name=f"{p}.experts.{e}.routing") for e in range(s.num_experts)],
        )  # experts x (b, s, 1)
        outs = []
        for e in range(s.num_experts):
            q = f"{p}.experts.{e}"
            gate = self.linear(x, f"{q}.gate_proj")
            up = self.linear(x, f"{q}.up_proj")
            act = self.op("Mul", [self.activation(gate, q), up], name=f"{q}.act")  # (b, s, moe_ff)
            y = self.linear(act, f"{q}.down_proj")  # (b, s, hidden)
            outs.append(self.op("Mul", [y, weights[e]], name=f"{q}.weighted"))
        return self.op("Sum", outs, name=f"{p}.moe_out")

    def moe_op(self, x: ir.Value, i: int) -> ir.Value:
        s = self.spec
        p = f"model.layers.{i}.mlp"
        logits = self.op(
            "Reshape",
            [self.router_logits(x, p), self.i64([-1, s.num_experts], f"shape_tokens_{s.num_experts}")],
            name=f"{p}.router_logits_2d",
        )  # (tokens, experts)
        gate_names = [f"{p}.experts.{e}.gate_proj.weight" for e in range(s.num_experts)]
        up_names = [f"{p}.experts.{e}.up_proj.weight" for e in range(s.num_experts)]
        ff, hidden = self.source.shape(gate_names[0])

        def fc1() -> np.ndarray:  # (experts, ff, 2, hidden) -> (experts, 2 * ff, hidden): gate/up rows interleaved
            gate = np.stack([self.source.load(n) for n in gate_names])
            up = np.stack([self.source.load(n) for n in up_names])
            return np.stack([gate, up], axis=2).reshape(s.num_experts, 2 * ff, hidden)

        fc1_w = self._as_f32(
            self._lazy(f"{p}.experts.fc1", (s.num_experts, 2 * ff, hidden), fc1, self.options.weight_dtype)
        )
        fc2_w = self.stacked_experts(p, "down_proj")  # (experts, hidden, ff)
        attrs = {
            "k": s.experts_per_token,
            "activation_type": "swiglu",
            "swiglu_fusion": 1,
            "activation_alpha": 1.0,
            "activation_beta": 0.0,
            "normalize_routing_weights": int(s.moe_normalize_topk),
        }
        inputs = [x, logits, fc1_w, None, fc2_w]
        name = f"{p}.moe_out"
        out = self.tape.op("MoE", inputs, attrs, domain=MS_DOMAIN, name=f"{p}.MoE", output=ir.Value(name=name))
        out.producer().meta[MOE_EXPERTS] = MoeExperts(
            fc1=tuple((f"{p}.experts.{e}.gate_proj", f"{p}.experts.{e}.up_proj") for e in range(s.num_experts)),
            fc2=tuple(f"{p}.experts.{e}.down_proj" for e in range(s.num_experts)),
            load=lambda linear: self.source.load(f"{linear}.weight"),
        )
        return out
