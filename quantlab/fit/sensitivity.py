"""Measured sensitivity per unit and scheme, and the activation statistics the scale search weighs by.

A *unit* is a group of tensors that gets one scheme (architecture knowledge as data, :data:`LAYER_UNITS`):
per decoder layer q+k, v, o, the MLP's gate+up and down, plus ``lm_head`` and the token embedding. Its
sensitivity to a scheme is ``KL(P_fp32 || P_unit)`` averaged over the positions of a few sequences
sampled from the fp32 model, where ``P_unit`` is the fp32 graph with only that unit's weights replaced
by what the conversion will write for them (the importance-searched codes, dequantized). One
onnxruntime session over the fp32 graph takes the weights as overridable inputs, so each (unit, scheme)
is one forward with new weights fed in, no rebuild. Why measured KL and not a weighted-error proxy:
the error's gain to the output differs by orders of magnitude between units (``quantlab.package.
sensitivity``); the proxy is used only *within* a unit, to extrapolate from a measured rung to one that
was not measured (:func:`quantlab.fit.choose.complete_ladder`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

EMBEDDING_UNIT = "embedding"
HEAD_UNIT = "lm_head"
EMBEDDING_TENSOR = "model.embed_tokens"
# linear name inside a decoder layer -> its unit (k-quants' split: v and down apart from the rest)
LAYER_UNITS = {
    "self_attn.q_proj": "attn_qk",
    "self_attn.k_proj": "attn_qk",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_o",
    "mlp.gate_proj": "mlp_in",
    "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "mlp_down",
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# sampled with a seed of their own, apart from calibration (seed) and the manifest's figures
FIT_SEED_OFFSET = 2_000_029
# onnxruntime would keep a second, pre-packed copy of every fp32 MatMul weight (540 MB for SmolLM2-135M);
# the few forwards here do not pay that back
NO_PREPACKING = {"session.disable_prepacking": "1"}
# every linear's input exposed at once: SmolLM2-135M holds ~0.2 MB of them per token
TOKENS_PER_FORWARD = 512


def unit_of(tensor: str) -> str | None:
    """``model.layers.3.self_attn.k_proj`` -> ``model.layers.3.attn_qk``; ``lm_head``; ``model.embed_tokens``
    -> ``embedding``; None for anything else."""
    if tensor == HEAD_UNIT:
        return HEAD_UNIT
    if tensor == EMBEDDING_TENSOR:
        return EMBEDDING_UNIT
    m = _LAYER.match(tensor)
    if m and m.group(2) in LAYER_UNITS:
        return f"model.layers.{m.group(1)}.{LAYER_UNITS[m.group(2)]}"
    return None


def unit_tensors(unit: str) -> list[str]:
    """``model.layers.3.mlp_in`` -> [gate, up] linear names; ``lm_head``; ``model.embed_tokens``."""
    if unit == HEAD_UNIT:
        return [HEAD_UNIT]
    if unit == EMBEDDING_UNIT:
        return [EMBEDDING_TENSOR]
    layer, _, group = unit.rpartition(".")
    return [f"{layer}.{name}" for name, g in LAYER_UNITS.items() if g == group]


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """``kld[unit][scheme]``: mean KL (nats) with only ``unit`` at ``scheme``; ``measured`` says which
    figures are measured (the others are extrapolated by weighted error)."""

    kld: dict[str, dict[str, float]]
    measured: dict[str, tuple[str, ...]]
    tokens: int
    data: str

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "data": self.data,
            "kld_mean": {u: {s: round(v, 7) for s, v in k.items()} for u, k in self.kld.items()},
            "measured": {u: list(s) for u, s in self.measured.items()},
        }


def _with_extra_io(baseline: Path, inputs: list[str], outputs: list[str], out_file: str) -> None:
    """baseline/model.onnx with initializers ``inputs`` made overridable graph inputs and the values
    ``outputs`` made graph outputs; the external data file is shared."""
    import onnx

    proto = onnx.load(str(baseline / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in proto.graph.initializer}
    for name in inputs:
        proto.graph.input.append(
            onnx.helper.make_tensor_value_info(name, inits[name].data_type, list(inits[name].dims))
        )
    for name in outputs:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    (baseline / out_file).write_bytes(proto.SerializeToString(deterministic=True))


def _linear_inputs(baseline: Path) -> dict[str, str]:
    """Linear name -> the graph value its MatMul multiplies (``model.layers.0.mlp.up_proj`` -> value name)."""
    import onnx

    proto = onnx.load(str(baseline / "model.onnx"), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    return {
        node.input[1].removesuffix(".weight"): node.input[0]
        for node in proto.graph.node
        if node.op_type == "MatMul" and node.input[1] in inits and node.input[1].endswith(".weight")
    }


def _feeds(decoder, ids: np.ndarray) -> dict[str, np.ndarray]:
    batch, seq = ids.shape
    return {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((batch, seq), np.int64),
        "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy(),
        **decoder.empty_cache(batch),
    }


def collect_input_statistics(
    baseline: Path, ids: np.ndarray, gram_dir: Path | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
    """Statistics of the input each linear sees over the tokens ``ids`` (n, seq), from forwards of the
    fp32 ``baseline`` artifact over :data:`TOKENS_PER_FORWARD` tokens at a time (whole sequences, at least
    one; every linear's input is an output of that forward): ``E[x_k^2]`` (K,) float32 per linear
    (linears that share an input share the array) and, when ``gram_dir`` is given, ``E[x x^T]`` (K, K)
    float32 saved there as one ``.npy`` per distinct input (linear -> file; sums divided once)."""
    from quantlab.quant import linalg
    from quantlab.runtime.generate import OrtDecoder

    inputs = _linear_inputs(baseline)
    values = sorted(set(inputs.values()))
    model_file = "moments.onnx"
    _with_extra_io(baseline, [], values, model_file)
    sums: dict[str, np.ndarray] = {}
    grams: dict[str, np.ndarray] = {}
    tokens, batch = 0, max(1, TOKENS_PER_FORWARD // ids.shape[1])
    try:
        decoder = OrtDecoder(baseline, model_file=model_file, session_config=NO_PREPACKING)
        for start in range(0, ids.shape[0], batch):
            arrays = decoder.session.run(values, _feeds(decoder, ids[start : start + batch]))
            for value, x in zip(values, arrays, strict=True):
                x = x.reshape(-1, x.shape[-1]).astype(np.float64)  # (tokens, K)
                sums[value] = sums.get(value, 0.0) + np.sum(x * x, axis=0)
                if gram_dir is not None:  # float32 products summed in float32: 400 MB for SmolLM2, not 800
                    x32 = x.astype(np.float32)
                    grams[value] = grams.get(value, np.float32(0.0)) + linalg.matmul(x32, x32, trans_a=True)
            tokens += arrays[0].shape[0] * arrays[0].shape[1]
            del arrays
    finally:
        (baseline / model_file).unlink(missing_ok=True)
    moments = {value: (s / tokens).astype(np.float32) for value, s in sums.items()}
    files: dict[str, Path] = {}
    if gram_dir is not None:
        gram_dir.mkdir(parents=True, exist_ok=True)
        for n, value in enumerate(values):
            files[value] = gram_dir / f"gram{n:04d}.npy"
            np.save(files[value], grams.pop(value) / np.float32(tokens))
    return (
        {linear: moments[value] for linear, value in inputs.items()},
        {linear: files[value] for linear, value in inputs.items() if value in files},
    )


def collect_input_moments(baseline: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    """``E[x_k^2]`` (K,) float32 of the input each linear sees over the tokens ``ids`` (batch, seq)."""
    return collect_input_statistics(baseline, ids)[0]


SENSITIVITY_MODEL = "sensitivity.onnx"


def overridable_weights(units) -> list[str]:
    """The fp32 initializers a measurement of ``units`` may replace (a tied head feeds the embedding too)."""
    return sorted({f"{t}.weight" for u in units for t in unit_tensors(u)} | {f"{EMBEDDING_TENSOR}.weight"})


@contextlib.contextmanager
def sensitivity_model(baseline: Path, units) -> Iterator[str]:
    """baseline/:data:`SENSITIVITY_MODEL` (the fp32 graph with ``units``' weights as overridable inputs)
    while the block runs; yields its file name."""
    _with_extra_io(baseline, overridable_weights(units), [], SENSITIVITY_MODEL)
    try:
        yield SENSITIVITY_MODEL
    finally:
        (baseline / SENSITIVITY_MODEL).unlink(missing_ok=True)


class KldMeter:
    """``KL(P_fp32 || P_overridden)`` over the tokens ``ids`` (batch, seq): one onnxruntime session over
    ``baseline/model_file`` (:func:`sensitivity_model`), the reference's float64 log-softmax computed once.
    A figure depends only on the overrides, not on what was measured before: every process that opens
    the same baseline with the same ids gives the same float for the same weights."""

    def __init__(self, baseline: Path, model_file: str, ids: np.ndarray):
        from quantlab.quant.metrics import log_softmax
        from quantlab.runtime.generate import OrtDecoder

        self.log_softmax = log_softmax
        decoder = OrtDecoder(baseline, model_file=model_file, session_config=NO_PREPACKING)
        self.session, self.base = decoder.session, _feeds(decoder, ids)
        self.log_p = log_softmax(self.logits({}))  # (batch, seq - 1, vocab)
        self.p = np.exp(self.log_p)

    def logits(self, overrides: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(["logits"], {**self.base, **overrides})[0][:, :-1]  # (batch, seq - 1, vocab)

    def __call__(self, overrides: dict[str, np.ndarray]) -> float:
        """Mean KL per position (nats) with the fp32 weights named in ``overrides`` replaced."""
        log_q = self.log_softmax(self.logits(overrides))
        return float(np.mean(np.maximum(np.sum(self.p * (self.log_p - log_q), axis=-1), 0.0)))


def measure_kld(
    baseline: Path,
    ids: np.ndarray,
    units: dict[str, tuple[str, ...]],
    fake_quantized: Callable[[str, str], dict[str, np.ndarray]],
    *,
    data: str,
) -> Sensitivity:
    """KL divergence per (unit, scheme) in ``units`` over the tokens ``ids`` (batch, seq), in this process
    (``quantlab.distributed.sensitivity.measure_kld_on_cluster`` fans the same figures out over Ray).

    ``fake_quantized(unit, scheme)`` gives the dequantized weights the conversion would write for a
    unit, by fp32 initializer name (``model.layers.0.mlp.up_proj.weight``) in the layout the fp32 graph
    stores them: linears (in, out), the embedding (vocab, hidden). A tied head shared with the
    embedding feeds both.
    """
    with sensitivity_model(baseline, units) as model_file:
        meter = KldMeter(baseline, model_file, ids)
        kld: dict[str, dict[str, float]] = {}
        for unit, schemes in sorted(units.items()):
            kld[unit] = {scheme: meter(fake_quantized(unit, scheme)) for scheme in schemes}
            logger.info("sensitivity %s: %s", unit, kld[unit])
    return sensitivity_of(kld, units, ids, data)


def sensitivity_of(kld: dict[str, dict[str, float]], units: dict[str, tuple[str, ...]], ids, data: str) -> Sensitivity:
    """The Sensitivity of measured figures ``kld`` (every rung of ``units``) over the tokens ``ids``."""
    measured = {u: tuple(s) for u, s in units.items()}
    return Sensitivity(kld, measured, int(ids.shape[0] * (ids.shape[1] - 1)), data)
