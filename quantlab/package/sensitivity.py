"""Per-unit quantization sensitivity, measured: the KL divergence of the model's output when only one
unit's weights are quantized and everything else stays fp32.

A *unit* is a group of weights that gets one precision: per decoder layer the attention projections
(q, k, v, o), the MLP's input projections (gate, up) and its down projection, plus ``lm_head`` and the
token embedding. A tied head that shares one quantized tensor with the embedding
(``passes/share_tied_embedding.py``) makes the two one unit, ``lm_head``, whose weights are both the
head's and the table's: quantizing it changes every logit and every looked-up row at once. Its
sensitivity to a scheme is ``KL(P_fp32 || P_unit)`` averaged over the positions of a few sequences
sampled from the fp32 model, where ``P_unit`` is the fp32 model with that unit's weights replaced
by their round-to-nearest reconstruction ``dequantize(rtn_quantize(W))`` (the same integers the
conversion writes).

Why the measured KLD rather than a proxy such as the layer's output error weighted by calibration
activations (``||(W - W_hat) X||``): the proxy needs a per-layer gain to the output that it cannot
see (an error in layer 0 travels through every later layer, one in ``lm_head`` lands on the logits
directly), and those gains differ by orders of magnitude between units; the measured KLD includes
them, is the same quantity the manifest reports, and is cheap: one onnxruntime session over the fp32
graph with the unit weights made overridable graph inputs, so each (unit, scheme) is one forward of a
few hundred tokens with new weights fed in, no rebuild. Summing per-unit KLDs to predict the mixed
model's KLD assumes the effects add up; :mod:`quantlab.package.fit` measures the chosen mix for real
and reports both.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np

from quantlab.fit.choose import STACKED
from quantlab.quant.scheme import parse_scheme

logger = logging.getLogger(__name__)

EMBEDDING_UNIT = "embedding"
HEAD_UNIT = "lm_head"
EMBEDDING_TENSOR = "model.embed_tokens"
EMBEDDING_WEIGHT = f"{EMBEDDING_TENSOR}.weight"
# linear name inside a decoder layer -> the unit it belongs to (architecture knowledge as data)
LAYER_UNITS = {
    "self_attn.q_proj": "attention",
    "self_attn.k_proj": "attention",
    "self_attn.v_proj": "attention",
    "self_attn.o_proj": "attention",
    "mlp.gate_proj": "mlp_in",
    "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "mlp_down",
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# sampled with a seed of its own, apart from calibration (seed) and the manifest's figures (api.EVAL_SEED_OFFSET)
SENSITIVITY_SEED_OFFSET = 2_000_029


def unit_of(linear: str) -> str | None:
    """``model.layers.3.self_attn.k_proj`` -> ``model.layers.3.attention``; ``lm_head``; the embedding
    table ``model.embed_tokens`` -> ``embedding``; None for anything else (norms, biases). A stack the
    fusion writes as one tensor (``self_attn.qkv_proj``, ``mlp.gate_up_proj``) is its members' unit."""
    if linear == HEAD_UNIT:
        return HEAD_UNIT
    if linear == EMBEDDING_TENSOR:
        return EMBEDDING_UNIT
    m = _LAYER.match(linear)
    if m is None:
        return None
    name = STACKED.get(m.group(2), (m.group(2),))[0]  # a stack's members all share one unit here
    return f"model.layers.{m.group(1)}.{LAYER_UNITS[name]}" if name in LAYER_UNITS else None


def unit_linears(unit: str) -> list[str]:
    """The linear names of a layer unit, for recipe overrides: ``model.layers.3.mlp_in`` -> gate, up."""
    layer, _, group = unit.rpartition(".")
    return [f"{layer}.{name}" for name, g in LAYER_UNITS.items() if g == group]


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """``kld[unit][scheme]``: mean KL divergence (nats) with only ``unit`` quantized to ``scheme``."""

    kld: dict[str, dict[str, float]]
    tokens: int  # predicted positions each figure averages over
    data: str  # how the token set was made

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "data": self.data, "kld_mean": self.kld}


def _fake_quantized(weight: np.ndarray, scheme: str, *, rows: bool) -> np.ndarray:
    """The weight the conversion's integers stand for. Linear weights are stored (in, out) and quantized
    along ``in``; the embedding table (vocab, hidden) row by row along ``hidden`` (``rows``)."""
    from quantlab.quant.rtn import dequantize, rtn_quantize

    s = parse_scheme(scheme)
    w = weight if rows else weight.T  # (N, K): quantized along K
    w_hat = dequantize(rtn_quantize(np.ascontiguousarray(w, dtype=np.float32), s.bits, s.group_size, s.symmetric))
    return np.ascontiguousarray(w_hat if rows else w_hat.T)


def _overridable_model(baseline: Path, weights: list[str], out_file: str) -> None:
    """baseline/model.onnx with ``weights`` (initializers) also listed as graph inputs, so that a feed
    replaces them (onnxruntime's overridable initializers); the external data file is shared."""
    import onnx

    proto = onnx.load(str(baseline / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in proto.graph.initializer}
    for name in weights:
        init = inits[name]
        proto.graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
    (baseline / out_file).write_bytes(proto.SerializeToString(deterministic=True))


def measure_sensitivity(
    baseline: Path,
    unit_weights: dict[str, list[str]],
    schemes: dict[str, tuple[str, ...]],
    *,
    bos_id: int,
    samples: int = 4,
    seq_len: int = 64,
    seed: int = 0,
) -> Sensitivity:
    """KL divergence per (unit, scheme) over ``samples x seq_len`` tokens sampled from the fp32 model.

    ``baseline`` is an fp32 artifact folder; ``unit_weights`` maps each unit to its weight initializers
    (``model.layers.0.mlp.up_proj.weight``, ``model.embed_tokens.weight``; a shared tied head lists both
    ``lm_head.weight`` and the table); ``schemes`` the schemes to try per unit.
    """
    import onnx
    from onnx import numpy_helper

    from quantlab.eval.data import sample_from_model
    from quantlab.quant.metrics import log_softmax
    from quantlab.runtime.generate import OrtDecoder

    data_seed = seed + SENSITIVITY_SEED_OFFSET
    ids = sample_from_model(OrtDecoder(baseline), samples, seq_len, data_seed, bos_id)  # (samples, seq_len)
    model_file = "sensitivity.onnx"
    names = sorted(n for ws in unit_weights.values() for n in ws)
    _overridable_model(baseline, names, model_file)
    decoder = OrtDecoder(baseline, model_file=model_file)
    proto = onnx.load(str(baseline / "model.onnx"), load_external_data=False)
    stored = {i.name: i for i in proto.graph.initializer}

    def weight(name: str) -> np.ndarray:
        onnx.external_data_helper.load_external_data_for_tensor(stored[name], str(baseline))
        array = numpy_helper.to_array(stored[name])
        stored[name].ClearField("raw_data")  # keep one weight in memory at a time
        return array

    batch, seq = ids.shape
    base_feeds = {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((batch, seq), np.int64),
        "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy(),
        **decoder.empty_cache(batch),
    }

    def logits(overrides: dict[str, np.ndarray]) -> np.ndarray:
        return decoder.session.run(["logits"], {**base_feeds, **overrides})[0][:, :-1]  # (batch, seq - 1, vocab)

    # KL(P_ref || P_cand) per position as quant.metrics.kl_divergence_per_token computes it, with the
    # reference's float64 log-softmax (a few hundred MB for a 49k vocabulary) computed once, not per call
    log_p = log_softmax(logits({}))  # (batch, seq - 1, vocab)
    p = np.exp(log_p)

    def mean_kl(candidate: np.ndarray) -> float:
        return float(np.mean(np.maximum(np.sum(p * (log_p - log_softmax(candidate)), axis=-1), 0.0)))

    kld: dict[str, dict[str, float]] = {}
    for unit in sorted(unit_weights):
        originals = {n: weight(n) for n in unit_weights[unit]}
        kld[unit] = {}
        for scheme in schemes[unit]:
            fed = {n: _fake_quantized(w, scheme, rows=n == EMBEDDING_WEIGHT) for n, w in originals.items()}
            kld[unit][scheme] = mean_kl(logits(fed))
        logger.info("sensitivity %s: %s", unit, kld[unit])
    (baseline / model_file).unlink()
    data = f"sampled from the fp32 model: {samples} x {seq_len}, seed {data_seed}"
    return Sensitivity(kld, int(batch * (seq - 1)), data)
