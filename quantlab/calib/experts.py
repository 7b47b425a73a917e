"""Calibrating a sparse MLP's experts: which tokens each expert receives, and what to do with too few.

The layer graph (the decomposed sparse MLP, :func:`quantlab.graph_builder.decoder.build_layer`) exposes the
router's choice ``mlp.topk_indices`` (batch, seq, k), made as the family makes it (softmax, top-k), and
every expert's down_proj input ``mlp.experts.{e}.act`` at every token. :class:`RoutedTaps` turns those
into each expert's own statistics inputs::

    mlp.experts.{e}.in    the MLP's input (post_attention_layernorm.out) at the tokens routed to e:
                          the input of expert e's gate_proj and up_proj
    mlp.experts.{e}.act   expert e's activation at those tokens: the input of its down_proj

so GPTQ's Hessians and AWQ's samples of expert e are over its routed tokens only. With ``all_experts``
every calibration token is routed to every expert for these statistics (``--calibrate-all-experts``),
while the layer's output, which feeds the next layer, still mixes only the chosen experts, as the graph
computes it. An expert whose statistics saw fewer tokens than :func:`min_expert_tokens` is rounded to
nearest instead (:func:`rtn_fallback`): with none its Hessian is zero, and with fewer than its input
width it is rank-deficient.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from quantlab.graph_builder.decoder import LINEAR_INPUTS
from quantlab.io.spec import ModelSpec

# An expert is calibrated when its statistics saw at least this many tokens per input channel of its widest
# linear (K = max(hidden, moe_intermediate_size): gate/up read the hidden state, down the activation), and
# rounded to nearest otherwise. A Hessian from n tokens has rank <= n: zero with none (nothing to factor),
# rank-deficient below K, where GPTQ's updates (damped by 1% of the mean diagonal in the directions no
# token spanned) fit the tokens seen and miss the rest. Measured (GPTQ 4-bit g32 against RTN, output
# error on 4096 held-out tokens of correlated random inputs, 5 weights each): at K = 64, 512 and 1024
# GPTQ's error is 1.15-1.18x RTN's with n = K/2 tokens, about 1.0x at 3K/4, 0.84-0.85x at K, 0.68-0.73x at
# 1.5-2K. So n >= K: calibration never makes an expert worse than rounding it.
MIN_TOKENS_PER_INPUT_CHANNEL = 1.0


def min_expert_tokens(spec: ModelSpec) -> int:
    """The fewest tokens an expert of ``spec`` is calibrated on (see MIN_TOKENS_PER_INPUT_CHANNEL)."""
    return math.ceil(MIN_TOKENS_PER_INPUT_CHANNEL * max(spec.hidden_size, spec.moe_intermediate_size))


ROUTING_TAP = "mlp.topk_indices"
MOE_INPUT = "post_attention_layernorm.out"
_EXPERT_ROLE = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)")


def expert_of(role: str) -> int | None:
    """``mlp.experts.3.up_proj`` -> 3; None for a dense role."""
    match = _EXPERT_ROLE.fullmatch(role)
    return int(match.group(1)) if match else None


def linear_input(role: str) -> str:
    """The statistics a role's linear is calibrated on: LINEAR_INPUTS for dense roles, the expert's own
    routed inputs (``mlp.experts.{e}.in`` / ``.act``) for an expert's."""
    match = _EXPERT_ROLE.fullmatch(role)
    if match is None:
        return LINEAR_INPUTS[role]
    e, proj = match.groups()
    return f"mlp.experts.{e}.act" if proj == "down_proj" else f"mlp.experts.{e}.in"


@dataclasses.dataclass(frozen=True)
class ExpertTokens:
    """One sparse layer's token counts. routed[e]: calibration tokens whose top-k chose expert e;
    calibrated[e]: the tokens its statistics saw (routed[e], or every token with all_experts);
    rtn_fallback: the experts rounded to nearest for want of tokens (see min_expert_tokens)."""

    routed: tuple[int, ...]
    calibrated: tuple[int, ...]
    rtn_fallback: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return {
            "routed_tokens": list(self.routed),
            "calibrated_tokens": list(self.calibrated),
            "rtn_fallback": list(self.rtn_fallback),
        }


def rtn_fallback(calibrated: tuple[int, ...], minimum: int) -> tuple[int, ...]:
    """The experts whose statistics saw fewer than ``minimum`` tokens."""
    return tuple(e for e, n in enumerate(calibrated) if n < minimum)


def manifest_entry(spec: ModelSpec, experts: dict[int, ExpertTokens], all_experts: bool) -> dict:
    """What the manifest records of a calibration's experts (``calibration.experts``)."""
    return {
        "calibrate_all_experts": all_experts,
        "min_tokens_for_calibration": min_expert_tokens(spec),
        "layers": {str(i): experts[i].to_dict() for i in sorted(experts)},
    }


class RoutedTaps:
    """A :class:`~quantlab.calib.layerwise.LayerRunner` of a sparse layer whose taps are per expert.

    ``run`` returns the runner's output and its dense taps, with the router's choice and the experts'
    activations replaced by the ``mlp.experts.{e}.in`` / ``.act`` rows of each expert's tokens (an
    expert with none in a batch has no entry: statistics of zero tokens are never formed). It counts
    the tokens as it goes (:meth:`tokens`).
    """

    def __init__(self, runner, spec: ModelSpec, all_experts: bool = False, keep_input: bool = True):
        """keep_input: also return the MLP's input at every token (AWQ's scales read it; GPTQ does not)."""
        self.runner = runner
        self.keep_input = keep_input
        self.threads = runner.threads
        self.outputs = runner.outputs
        self.num_experts = spec.num_experts
        self.minimum = min_expert_tokens(spec)
        self.all_experts = all_experts
        self.routed = np.zeros(spec.num_experts, dtype=np.int64)
        self.calibrated = np.zeros(spec.num_experts, dtype=np.int64)

    def run(self, hidden: np.ndarray) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        out, taps = self.runner.run(hidden)
        chosen = taps.pop(ROUTING_TAP)
        chosen = chosen.reshape(-1, chosen.shape[-1])  # (tokens, k)
        x = taps[MOE_INPUT] if self.keep_input else taps.pop(MOE_INPUT)
        x = x.reshape(-1, x.shape[-1])  # (tokens, hidden)
        for e in range(self.num_experts):
            act = taps.pop(f"mlp.experts.{e}.act")
            act = act.reshape(-1, act.shape[-1])  # (tokens, moe_ff)
            routed = np.flatnonzero((chosen == e).any(axis=-1))
            self.routed[e] += routed.size
            rows = slice(None) if self.all_experts else routed
            count = x.shape[0] if self.all_experts else routed.size
            self.calibrated[e] += count
            if count:
                taps[f"mlp.experts.{e}.in"] = x[rows]
                taps[f"mlp.experts.{e}.act"] = act[rows]
        return out, taps

    def tokens(self) -> ExpertTokens:
        calibrated = tuple(int(n) for n in self.calibrated)
        return ExpertTokens(tuple(int(n) for n in self.routed), calibrated, rtn_fallback(calibrated, self.minimum))
