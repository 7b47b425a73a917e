"""The codes a chosen 4-bit linear is written with: importance-searched round-to-nearest or GPTQ,
whichever leaves the smaller output error on the calibration tokens.

Three candidates: the searched codes (:func:`quantlab.quant.rtn.search_scales`); GPTQ as published
(each group's min/max scale fit as the column loop reaches it); and GPTQ that keeps the searched
scales and zero points and solves only the rounding, visiting columns by decreasing ``H_kk`` (act
order; the groups stay in natural order, so MatMulNBits reads the codes as they are). On SmolLM2-135M
(2048 sampled tokens, 4-bit g32 and g128, five linears across the depth) the output error relative to
plain RTN was 0.40-0.85 searched, 0.13-0.42 GPTQ, 0.10-0.39 GPTQ with searched scales in act order.

All three are measured by the same yardstick, the linear's expected squared output error
``tr(E H E^T)`` with ``E = W - W_hat`` and ``H = E[x x^T]`` over the calibration tokens' inputs to that
linear (the quantity GPTQ minimizes column by column, and which the scale search approximates with the
diagonal of ``H`` only). GPTQ pays where input channels are correlated; where its greedy column order
or its min/max group scales lose to the searched scales, the searched codes are kept. Ties go to the
searched codes. Same inputs, same codes: GPTQ's column loop and the scale search are deterministic.

AWQ is not a candidate here: its per-channel scales fold into the preceding norm, which q/k/v (or
gate/up) share, so it cannot be chosen per unit; the importance-weighted scale search takes its place
(the same activation statistics, applied through the group scales instead of the norm).

The input Gram matrices live in float32 ``.npy`` files beside the fp32 baseline (one per distinct
linear input; SmolLM2-135M: 120 files, 400 MB), read memory-mapped when a linear's codes are made,
so they cost disk, not memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from quantlab.quant import linalg
from quantlab.quant.gptq import GPTQConfig, gptq_quantize
from quantlab.quant.rtn import QuantizedWeight, dequantize, search_scales
from quantlab.quant.scheme import QuantScheme

logger = logging.getLogger(__name__)

RTN_SEARCH, GPTQ, GPTQ_SEARCHED = "rtn-search", "gptq", "gptq-searched-scales"


def output_error(weight: np.ndarray, qw: QuantizedWeight, gram: np.ndarray) -> float:
    """``tr(E H E^T)``, ``E = W - W_hat`` (N, K), ``H`` (K, K): the expected squared output error summed
    over the N outputs, in float64 (on MLAS: the same bytes with any thread count, so a cluster's node and
    this process pick the same codes)."""
    e = (np.asarray(weight, np.float32) - dequantize(qw)).astype(np.float64)
    return float(np.einsum("nk,nk->", linalg.matmul(e, gram, dtype=np.float64), e))


class LinearCodes:
    """Linear name -> its codes at a 4-bit scheme, made on demand and the same every time.

    ``moments[linear]``: ``E[x_k^2]`` (K,) of its input (the scale search's importance); ``grams[linear]``:
    the ``.npy`` of ``E[x x^T]`` (K, K); a linear without one gets the searched codes. ``methods`` records
    what each (linear, scheme) was written with, for the manifest.
    """

    def __init__(self, load_weight, moments: dict[str, np.ndarray], grams: dict[str, Path] | None = None):
        self.load_weight, self.moments, self.grams = load_weight, moments, grams or {}
        self.methods: dict[tuple[str, str], str] = {}
        self.errors: dict[tuple[str, str], dict[str, float]] = {}

    def __call__(self, linear: str, s: QuantScheme) -> QuantizedWeight:
        w = self.load_weight(linear)
        searched = search_scales(w, self.moments[linear], s.bits, s.group_size, s.symmetric)
        gram_file = self.grams.get(linear)
        if gram_file is None:
            self.methods[(linear, str(s))] = RTN_SEARCH
            return searched
        gram = np.load(gram_file, mmap_mode="r")
        # GPTQ's H is 2 E[x x^T]; the factor does not change the solution, damping is relative to its diagonal
        h = np.array(gram, np.float32)
        candidates = {
            RTN_SEARCH: searched,
            GPTQ: gptq_quantize(w, h, GPTQConfig.from_scheme(s)),
            GPTQ_SEARCHED: gptq_quantize(w, h, GPTQConfig.from_scheme(s, act_order=True), static=searched),
        }
        errors = {m: output_error(w, q, gram) for m, q in candidates.items()}
        method = min(errors, key=lambda m: (errors[m], m != RTN_SEARCH))  # a tie keeps the searched codes
        self.methods[(linear, str(s))] = method
        self.errors[(linear, str(s))] = errors
        return candidates[method]

    def summary(self, chosen: dict[str, str]) -> dict:
        """Per method, how many of the ``chosen`` (linear -> scheme name) were written with it, and the
        summed output error of both candidates over them (what the pick saved)."""
        counts: dict[str, int] = {}
        totals = {RTN_SEARCH: 0.0, GPTQ: 0.0, GPTQ_SEARCHED: 0.0}
        for linear, scheme in sorted(chosen.items()):
            method = self.methods.get((linear, scheme))
            if method is None:
                continue
            counts[method] = counts.get(method, 0) + 1
            for m, e in self.errors.get((linear, scheme), {}).items():
                totals[m] += e
        out: dict = {"linears_per_method": dict(sorted(counts.items()))}
        if any(totals.values()):
            out["output_error_sum"] = {m: float(f"{e:.6g}") for m, e in sorted(totals.items())}
        return out
