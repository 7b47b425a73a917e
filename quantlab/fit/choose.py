"""Choose each unit's scheme under a size budget from measured sensitivity (``convert --max-size``).

1. Ladders (:data:`LINEAR_LADDER`, :data:`EMBEDDING_LADDER`), k-quant-like rungs from 8 bits down to
   4-bit g128, plus :data:`SOURCE_RUNG` where the checkpoint is a GGUF whose codes can be kept as they
   are. onnxruntime 1.32's CPU MatMulNBits runs 2, 4 and 8 bits only (3, 5 and 6 are refused at session
   creation), so there is no w3/w5/w6 rung; w2 is not offered (not measured yet).
2. Bytes per unit and rung from the graph itself, built and quantized lazily (no weight is read), so
   whatever the passes write (a shared tied head, say) is what is counted; the real artifact is
   checked again after writing.
3. Sensitivity: each layer unit measured at its smallest rung (the head and embedding at every rung);
   the other rungs extrapolated within the unit by importance-weighted RTN error, which is what the
   KL grows with for small errors (KL is quadratic in the logits' perturbation). The source rung's KL
   is 0 by construction; when every unit can keep the source codes and they fit, nothing is measured.
4. Greedy (:func:`choose_precisions`): every unit at its smallest rung, then the upgrade that saves
   the most KL per extra byte and fits, until none does. Ties go by name: same inputs, same choice.
5. The chosen 4-bit linears are written with importance-searched scales
   (:func:`quantlab.quant.rtn.search_scales`), the same codes the sensitivity measured.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from quantlab.errors import InputError, SizeOverrunError
from quantlab.fit.codes import LinearCodes
from quantlab.fit.sensitivity import (
    EMBEDDING_TENSOR,
    EMBEDDING_UNIT,
    FIT_SEED_OFFSET,
    HEAD_UNIT,
    NO_PREPACKING,
    Sensitivity,
    collect_input_statistics,
    measure_kld,
    unit_of,
    unit_tensors,
)
from quantlab.quant.rtn import QuantizedWeight, dequantize, rtn_quantize, weighted_error
from quantlab.quant.scheme import QuantScheme, parse_scheme

logger = logging.getLogger(__name__)

LINEAR_LADDER = ("w8a16-g128-asym", "w4a16-g32-asym", "w4a16-g64-asym", "w4a16-g128-asym")
# a GGUF's own codes kept as they are (passes/keep_source_quantization.py): the fp32 baseline *is* their
# dequantization, so this rung's KL divergence is 0 by construction and is not measured
SOURCE_RUNG = "source"
# the embedding's blocks must divide common hidden sizes (576 = 9 x 64)
EMBEDDING_LADDER = ("w8a16-g64-asym", "w4a16-g32-asym", "w4a16-g64-asym")
# measured per layer unit besides its smallest rung (g128, or g64 where K = 576 pads g128 blocks); the
# rest is extrapolated. One forward of the whole model per measurement (~1.5 s for SmolLM2 on 2 cores),
# so the 150 layer units get one each; the head and embedding (the largest units) every rung.
MEASURED_RUNGS: tuple[str, ...] = ()
# MatMulNBits computes with int8 activations (accuracy_level 4), as every other recipe does. fp32 compute
# (level 0) is more accurate (SmolLM2-135M w8 g128: KLD 0.0027 against 0.0164) but onnxruntime 1.32's CPU
# kernel then dequantizes whole weights per call: SmolLM2 decode went from 38 to 200 ms per token (same
# process, loaded machine), most of it in the 8-bit head. A smaller file that decodes 5x slower is not
# what a size budget asks for; sensitivities are measured at this level too.
ACCURACY_LEVEL = 4
SENSITIVITY_SAMPLES, SENSITIVITY_SEQ_LEN = 4, 64
# the activation statistics and GPTQ Hessians, data-free: 2048 tokens sampled apart from the sensitivity's
FIT_CALIB_SAMPLES, FIT_CALIB_SEQ_LEN = 16, 128
# model.onnx itself beside the weights, estimated before writing as the fp32 graph's model.onnx plus
# this much per initializer (name, shape, external-data location and offset), then checked on the real
# files; an overshoot shrinks the budget and the choice is made again
INITIALIZER_PROTO_BYTES = 256


def parse_size(text: str) -> int:
    """``105MB`` / ``105.5MB`` / ``1.2GB`` / ``500KB`` / ``123456`` (bytes; decimal units) -> bytes."""
    t = text.strip().upper().removesuffix("B")
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale != 1 else t)
    except ValueError:
        raise InputError(None, "--max-size", f"expected a size like 105MB or 1.2GB, got {text!r}") from None
    if not value > 0:
        raise InputError(None, "--max-size", f"must be positive, got {text!r}")
    return int(value * scale)


def choose_precisions(
    costs: dict[str, dict[str, int]], kld: dict[str, dict[str, float]], budget: int
) -> dict[str, str] | None:
    """The scheme per unit with the least summed KLD whose bytes sum to at most ``budget``, greedily:
    every unit starts at its smallest scheme; the upgrade that saves the most KLD per extra byte and
    still fits is taken, until none is left. None when even the smallest schemes do not fit."""
    choice = {u: min(costs[u], key=lambda s, u=u: (costs[u][s], kld[u][s], s)) for u in sorted(costs)}
    used = sum(costs[u][s] for u, s in choice.items())
    if used > budget:
        return None
    while True:
        best = None
        for unit in sorted(costs):
            for scheme in sorted(costs[unit]):
                extra = costs[unit][scheme] - costs[unit][choice[unit]]
                saved = kld[unit][choice[unit]] - kld[unit][scheme]
                if saved <= 0 or used + extra > budget:
                    continue
                ratio = saved / max(extra, 1)
                if best is None or ratio > best[0]:
                    best = (ratio, unit, scheme, extra)
        if best is None:
            return choice
        _, unit, scheme, extra = best
        choice[unit] = scheme
        used += extra


def _tensor_bytes(value) -> int:
    import onnx_ir as ir

    return -(-math.prod(int(d) for d in value.shape) * ir.DataType(value.const_value.dtype).bitwidth // 8)


def graph_bytes(ckpt, recipe, source=None, options=None) -> tuple[int, dict[str, int], int]:
    """(all weight bytes, bytes per unit, initializers) the recipe would write: the graph built and
    quantized lazily, no weight read. A tensor shared by two nodes is counted once. ``options``: the
    conversion's BuildOptions (fused attention adds RoPE caches, say)."""
    from quantlab.graph_builder.decoder import BuildOptions, build_decoder
    from quantlab.passes.manager import run_passes
    from quantlab.pipelines import quantization_pipeline

    options = options or BuildOptions()
    model = build_decoder(ckpt, dataclasses.replace(options, weight_dtype=recipe.weight_dtype))
    tied = ckpt.spec.tie_word_embeddings
    model, _ = run_passes(model, quantization_pipeline(model, recipe, tied=tied, source=source))
    total, per_unit, count = 0, {}, 0
    for value in model.graph.initializers.values():
        if not value.uses() or value.const_value is None:  # replaced weights linger unused
            continue
        size = _tensor_bytes(value)
        count += 1
        total += size
        for linear, share in _members(ckpt, value.name.rsplit(".", 1)[0]):  # ...mlp.up_proj.qweight -> mlp_in
            unit = unit_of(linear)
            if unit is not None:
                per_unit[unit] = per_unit.get(unit, 0) + size * share
    return total, {u: round(b) for u, b in per_unit.items()}, count


# linears stacked into one tensor (rows concatenated) by the passes, e.g. kept q/k/v reading one input
STACKED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.qk_proj": ("self_attn.q_proj", "self_attn.k_proj"),
    "self_attn.kv_proj": ("self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.up_gate_proj": ("mlp.up_proj", "mlp.gate_proj"),
}


def _members(ckpt, linear: str) -> list[tuple[str, float]]:
    """A tensor's linears with their share of its bytes: itself, or a stack's members by output rows."""
    prefix, _, name = linear.partition(".self_attn.") if ".self_attn." in linear else linear.partition(".mlp.")
    group = "self_attn." if ".self_attn." in linear else "mlp."
    members = STACKED.get(group + name) if prefix.startswith("model.layers.") else None
    if not members:
        return [(linear, 1.0)]
    rows = {m: ckpt.tensors.shape(f"{prefix}.{m}.weight")[0] for m in members}
    return [(f"{prefix}.{m}", r / sum(rows.values())) for m, r in rows.items()]


def choice_recipe(base, choice: dict[str, str]):
    """The recipe for a choice: one override per linear (first match wins), head and embedding by field."""
    overrides = tuple(
        _override(t, None if s == SOURCE_RUNG else parse_scheme(s))  # kept source codes: no rounding
        for u, s in sorted(choice.items())
        if u not in (HEAD_UNIT, EMBEDDING_UNIT)
        for t in unit_tensors(u)
    )
    layers = [s for u, s in choice.items() if u not in (HEAD_UNIT, EMBEDDING_UNIT) and s != SOURCE_RUNG]
    head, embedding = choice.get(HEAD_UNIT, LINEAR_LADDER[0]), choice.get(EMBEDDING_UNIT)
    return dataclasses.replace(
        base,
        name="fit",
        scheme=parse_scheme(min(layers or [LINEAR_LADDER[-1]])),  # every linear has an override anyway
        format="matmulnbits",
        accuracy_level=ACCURACY_LEVEL,
        lm_head=None if head == SOURCE_RUNG else parse_scheme(head),
        embedding=None if embedding in (None, SOURCE_RUNG) else parse_scheme(embedding),
        overrides=overrides,
    )


def _override(pattern: str, scheme: QuantScheme | None):
    from quantlab.recipe import Override

    return Override(pattern, scheme)


class SearchedWeights(Mapping):
    """Linear name -> the codes (:class:`quantlab.fit.codes.LinearCodes`) of the 4-bit linears of a choice,
    computed when the emitter asks (one weight in memory at a time); a ``precomputed`` mapping for
    QuantizeWeightsPass."""

    def __init__(self, ckpt, codes: LinearCodes, schemes: dict[str, QuantScheme]):
        self.ckpt, self.codes = ckpt, codes
        self.schemes = {n: s for n, s in schemes.items() if s.bits == 4 and n in codes.moments}

    def weight(self, linear: str) -> np.ndarray:
        return load_weight(self.ckpt, linear)

    def shape(self, linear: str) -> tuple[int, int]:
        name = EMBEDDING_TENSOR + ".weight" if linear == HEAD_UNIT and self.ckpt.spec.tie_word_embeddings else None
        return tuple(self.ckpt.tensors.shape(name or f"{linear}.weight"))

    def __getitem__(self, linear: str) -> QuantizedWeight:
        return self.codes(linear, self.schemes[linear])

    def __iter__(self) -> Iterator[str]:
        return iter(self.schemes)

    def __len__(self) -> int:
        return len(self.schemes)


def load_weight(ckpt, tensor: str) -> np.ndarray:
    """(out, in) float32 of a linear, or the (vocab, hidden) embedding table; a tied head is the table."""
    if tensor == HEAD_UNIT and ckpt.spec.tie_word_embeddings:
        tensor = EMBEDDING_TENSOR
    return np.asarray(ckpt.tensors.load(f"{tensor}.weight"), dtype=np.float32)


@dataclasses.dataclass
class FitChoice:
    """What the choose stage hands on: the recipe, the searched codes, and what goes into the manifest."""

    recipe: object  # quantlab.recipe.Recipe
    quantized: SearchedWeights
    report: dict
    budget: int  # bytes of model.onnx + model.onnx.data
    costs: dict[str, dict[str, int]]
    sensitivity: Sensitivity
    fixed: int
    shared: bool  # a tied head and the embedding written as one tensor
    source: object = None  # quantlab.quant.gguf_blocks.SourceQuantization narrowed to the kept units

    def check_size(self, folder: Path) -> dict:
        """The report with the real size of ``folder``'s model.onnx + model.onnx.data; raises
        SizeOverrunError when that is over the budget (the staging folder is then discarded)."""
        written = sum((folder / f).stat().st_size for f in ("model.onnx", "model.onnx.data") if (folder / f).exists())
        if written > self.budget:
            raise SizeOverrunError(written, self.budget)
        chosen = {t: str(s) for t, s in self.quantized.schemes.items()}
        return {**self.report, **self.quantized.codes.summary(chosen), "written_bytes": written}


class FakeQuantizer:
    """(unit, scheme) -> the fp32 graph's weights as the conversion will write them. ``tied_shared``:
    the head's codes are the embedding's too (ShareTiedEmbeddingPass), so both are fed.

    :meth:`portable` is what another process needs besides the checkpoint to make the same weights
    (the activation statistics and the Gram files' paths); :meth:`rebuild` makes it there."""

    def __init__(self, ckpt, codes: LinearCodes, tied_shared: bool):
        self.ckpt, self.codes, self.tied_shared = ckpt, codes, tied_shared

    def portable(self) -> dict:
        return {"moments": self.codes.moments, "grams": self.codes.grams, "tied_shared": self.tied_shared}

    @classmethod
    def rebuild(cls, ckpt, portable: dict) -> FakeQuantizer:
        codes = LinearCodes(lambda t: load_weight(ckpt, t), portable["moments"], portable["grams"])
        return cls(ckpt, codes, portable["tied_shared"])

    def dequantized(self, tensor: str, s: QuantScheme) -> np.ndarray:  # (out, in) or (vocab, hidden)
        w = load_weight(self.ckpt, tensor)
        if tensor == EMBEDDING_TENSOR:  # rows along hidden, plain RTN, as QuantizeEmbeddingPass writes them
            return dequantize(rtn_quantize(w, s.bits, s.group_size, s.symmetric))
        if s.bits == 4 and tensor in self.codes.moments:
            return dequantize(self.codes(tensor, s))
        return dequantize(rtn_quantize(w, s.bits, s.group_size, s.symmetric))

    def __call__(self, unit: str, scheme: str) -> dict[str, np.ndarray]:
        s = parse_scheme(scheme)
        fed = {}
        for tensor in unit_tensors(unit):
            w_hat = self.dequantized(tensor, s)
            if tensor == EMBEDDING_TENSOR:
                fed[f"{tensor}.weight"] = w_hat
                continue
            fed[f"{tensor}.weight"] = np.ascontiguousarray(w_hat.T)  # (in, out) as the fp32 graph stores it
            if tensor == HEAD_UNIT and self.tied_shared:
                fed[f"{EMBEDDING_TENSOR}.weight"] = w_hat
        return fed


def _rtn_errors(ckpt, moments, units: dict[str, tuple[str, ...]]) -> dict[str, dict[str, float]]:
    """Importance-weighted RTN error per unit and rung: the within-unit yardstick for extrapolation."""
    out = {}
    for unit, ladder in units.items():
        out[unit] = {}
        for tensor in unit_tensors(unit):
            w = load_weight(ckpt, tensor)
            imp = None if tensor == EMBEDDING_TENSOR else moments[tensor]
            for scheme in ladder:
                s = parse_scheme(scheme)
                e = float(weighted_error(w, rtn_quantize(w, s.bits, s.group_size, s.symmetric), imp).sum())
                out[unit][scheme] = out[unit].get(scheme, 0.0) + e
    return out


def complete_ladder(measured: dict[str, float], errors: dict[str, float]) -> dict[str, float]:
    """KLD for every rung of a unit: measured ones as they are, the others scaled from the measured
    rung nearest in weighted error (``kld_s = kld_m * err_s / err_m``)."""
    out = dict(measured)
    for scheme, err in errors.items():
        if scheme in out:
            continue
        m = min(measured, key=lambda r: (abs(math.log(max(errors[r], 1e-30) / max(err, 1e-30))), r))
        out[scheme] = measured[m] * err / max(errors[m], 1e-30)
    return out


def _peak_mb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _bos(ckpt) -> int:
    spec = ckpt.spec
    return int(spec.bos_token_id if spec.bos_token_id is not None else min(spec.eos_token_ids or (0,)))


def unit_costs(
    ckpt, base_recipe, graph_proto_bytes: int, shared: bool | None = None, options=None, keep_source: bool = True
) -> tuple[int, dict[str, dict[str, int]], bool]:
    """(bytes outside every unit, ``costs[unit][rung]``, shared) from one lazy build per rung;
    ``graph_proto_bytes``: the fp32 graph's model.onnx. ``shared``: a tied head and the embedding are
    written as one tensor (the pipeline's ShareTiedEmbeddingPass), so they are one unit, ``lm_head``,
    with the embedding at the head's scheme; otherwise each has its own ladder."""
    costs: dict[str, dict[str, int]] = {}
    fixed = None
    shared = ckpt.spec.tie_word_embeddings if shared is None else shared
    for i, linear in enumerate(LINEAR_LADDER):
        embedding = linear if shared else EMBEDDING_LADDER[min(i, len(EMBEDDING_LADDER) - 1)]
        recipe = dataclasses.replace(
            base_recipe,
            scheme=parse_scheme(linear),
            lm_head=parse_scheme(linear),
            embedding=parse_scheme(embedding),
            overrides=(),
            format="matmulnbits",
        )
        total, per_unit, count = graph_bytes(ckpt, recipe, options=options)
        if shared:  # a table of its own (over a bit per entry) means this pipeline does not share: cost it apart
            if per_unit.get(EMBEDDING_UNIT, 0) * 8 >= ckpt.spec.vocab_size * ckpt.spec.hidden_size:
                return unit_costs(ckpt, base_recipe, graph_proto_bytes, False, options, keep_source)
            per_unit.pop(EMBEDDING_UNIT, None)  # the shared table's shape constants: outside every unit
        outside = total - sum(per_unit.values()) + graph_proto_bytes + count * INITIALIZER_PROTO_BYTES
        fixed = outside if fixed is None else max(fixed, outside)
        for unit, size in per_unit.items():
            costs.setdefault(unit, {})[embedding if unit == EMBEDDING_UNIT else linear] = size
    plan = source_plan(ckpt) if keep_source else None
    if plan is not None:  # the checkpoint's own codes, where every tensor of a unit can keep them
        recipe = dataclasses.replace(base_recipe, scheme=parse_scheme(LINEAR_LADDER[0]), overrides=(), embedding=None)
        # per linear on the plain graph: the fused one stacks kept q/k/v (gate/up) into one tensor, same bytes
        from quantlab.graph_builder.decoder import BuildOptions

        _, per_unit, _ = graph_bytes(ckpt, recipe, plan, BuildOptions(attention="plain"))
        for unit in costs:
            tensors = unit_tensors(unit)
            kept = all(t in plan.kept for t in tensors) and (unit != HEAD_UNIT or not shared or plan.tied)
            if kept and unit in per_unit:  # (a tensor named in no way we know is simply not offered)
                costs[unit][SOURCE_RUNG] = per_unit[unit]
    return int(fixed or 0), costs, shared


def source_plan(ckpt):
    """The checkpoint's own quantization that can be kept (a GGUF's), or None."""
    plan = getattr(ckpt.tensors, "source_quantization", None)
    return plan(tied=ckpt.spec.tie_word_embeddings) if plan is not None else None


def chosen_source(plan, choice: dict[str, str], shared: bool):
    """The source plan narrowed to the units chosen at :data:`SOURCE_RUNG` (None when there are none)."""
    keep = {t for u, s in choice.items() if s == SOURCE_RUNG for t in unit_tensors(u)}
    if shared and choice.get(HEAD_UNIT) == SOURCE_RUNG:
        keep.add(EMBEDDING_TENSOR)  # the table the head's codes are shared with
    if plan is None or not keep:
        return None
    kept = {t: layout for t, layout in plan.kept.items() if t in keep}
    not_kept = {**plan.not_kept, **{t: "the fit chose a scheme" for t in plan.kept if t not in keep}}
    return dataclasses.replace(plan, kept=kept, not_kept=not_kept)


def choose_under_size(
    ckpt,
    baseline: Path,
    budget: int,
    base_recipe,
    *,
    seed: int = 0,
    options=None,
    calibration=None,
    keep_source: bool = True,
    measure=measure_kld,
) -> FitChoice:
    """The choose stage of ``convert --max-size``: sizes, statistics, sensitivity, greedy choice;
    ``options`` the BuildOptions the artifact is built with. ``calibration``: the user's calibration
    data (:class:`quantlab.eval.data.TokenData`) for the activation statistics and GPTQ's Hessians, else
    :data:`FIT_CALIB_SAMPLES` sequences sampled from the fp32 model. ``keep_source=False`` never keeps
    a GGUF's own codes (every tensor rounded afresh). ``measure``: :func:`quantlab.fit.sensitivity.measure_kld`
    or a function with its signature and results (``quantlab.distributed.sensitivity``: the same figures
    measured on a Ray cluster).
    Raises InputError (exit 2, before anything is measured) when even the smallest rungs do not fit."""
    from quantlab.eval.data import make_token_data, sample_from_model
    from quantlab.runtime.generate import OrtDecoder

    start = time.perf_counter()
    graph_proto = (baseline / "model.onnx").stat().st_size
    fixed, costs, shared = unit_costs(ckpt, base_recipe, graph_proto, options=options, keep_source=keep_source)
    logger.info("fit: sizes of %d units in %.1f s", len(costs), time.perf_counter() - start)
    smallest = fixed + sum(min(c.values()) for c in costs.values())
    if smallest > budget:
        raise InputError(
            None,
            "--max-size",
            f"nothing fits {budget / 1e6:.3f} MB: the smallest artifact reachable (every linear "
            f"{LINEAR_LADDER[-1]}, embedding {EMBEDDING_LADDER[-1]}) is about {smallest / 1e6:.3f} MB; nothing written",
        )
    if all(SOURCE_RUNG in c for c in costs.values()) and fixed + sum(c[SOURCE_RUNG] for c in costs.values()) <= budget:
        # every unit keeps the checkpoint's own codes (KL 0 by construction): nothing to measure or search
        logger.info("fit: the source's own codes fit; no sensitivity measured")
        none = Sensitivity({u: {SOURCE_RUNG: 0.0} for u in costs}, {}, 0, "not measured: the source's own codes fit")
        kept = {u: {SOURCE_RUNG: c[SOURCE_RUNG]} for u, c in costs.items()}
        return _choose(ckpt, base_recipe, budget, fixed, kept, none, LinearCodes(None, {}), shared, {})
    data_seed = seed + FIT_SEED_OFFSET
    decoder = OrtDecoder(baseline, session_config=NO_PREPACKING)
    ids = sample_from_model(decoder, SENSITIVITY_SAMPLES, SENSITIVITY_SEQ_LEN, data_seed, _bos(ckpt))
    if calibration is None:  # its own seed: the sensitivity is measured on other text than the codes fit
        calib_ids = sample_from_model(decoder, FIT_CALIB_SAMPLES, FIT_CALIB_SEQ_LEN, data_seed + 1, _bos(ckpt))
        calibration = make_token_data(
            calib_ids, f"sampled from the fp32 model: {FIT_CALIB_SAMPLES} x {FIT_CALIB_SEQ_LEN}, seed {data_seed + 1}"
        )
    del decoder
    moments, grams = collect_input_statistics(baseline, _rows(calibration), baseline / "fit-grams")
    if shared:  # the head's codes are the embedding's too: rounded for both, not solved for the head alone
        grams.pop(HEAD_UNIT, None)
    codes = LinearCodes(lambda t: load_weight(ckpt, t), moments, grams)
    logger.info("fit: text and activation statistics at %.1f s, peak %d MB", time.perf_counter() - start, _peak_mb())
    full = {u: tuple(r for r in c if r != SOURCE_RUNG) for u, c in costs.items()}
    to_measure = {
        u: ladder if u in (HEAD_UNIT, EMBEDDING_UNIT) else (*MEASURED_RUNGS, min(costs[u], key=costs[u].get))
        for u, ladder in full.items()
    }
    data = f"sampled from the fp32 model: {SENSITIVITY_SAMPLES} x {SENSITIVITY_SEQ_LEN}, seed {data_seed}"
    measured = measure(baseline, ids, to_measure, FakeQuantizer(ckpt, codes, shared), data=data)
    logger.info("fit: sensitivity measured at %.1f s, peak %d MB", time.perf_counter() - start, _peak_mb())
    errors = _rtn_errors(ckpt, moments, {u: full[u] for u in full if set(full[u]) != set(to_measure[u])})
    kld = {u: complete_ladder(measured.kld[u], errors.get(u, {})) for u in full}
    for unit, rungs in costs.items():
        if SOURCE_RUNG in rungs:
            kld[unit][SOURCE_RUNG] = 0.0
    sensitivity = dataclasses.replace(measured, kld=kld, measured=to_measure)
    logger.info("fit: ladders completed at %.1f s", time.perf_counter() - start)
    return _choose(ckpt, base_recipe, budget, fixed, costs, sensitivity, codes, shared, calibration.describe())


def _rows(data) -> np.ndarray:
    """TokenData -> (n, seq) ids of equal length: sequences cut to the shortest (at most FIT_CALIB_SEQ_LEN x 4)."""
    ids = np.asarray(data.ids)
    if ids.ndim == 2:
        return ids
    length = min(int(n) for n in data.lengths)
    return np.stack([np.asarray(r[:length]) for r in data.ids])


def _choose(ckpt, base_recipe, budget, fixed, costs, sensitivity, codes, shared, calibration) -> FitChoice:
    choice = choose_precisions(costs, sensitivity.kld, budget - fixed)
    if choice is None:
        raise InputError(None, "--max-size", f"nothing fits {budget / 1e6:.3f} MB; nothing written")
    recipe = choice_recipe(base_recipe, {**choice, EMBEDDING_UNIT: choice[HEAD_UNIT]} if shared else choice)
    rounded = {u: s for u, s in choice.items() if u != EMBEDDING_UNIT and s != SOURCE_RUNG}
    schemes = {t: parse_scheme(s) for u, s in rounded.items() for t in unit_tensors(u)}
    predicted = fixed + sum(costs[u][s] for u, s in choice.items())
    counts: dict[str, int] = {}
    for u, s in choice.items():
        if u != EMBEDDING_UNIT:
            counts[s] = counts.get(s, 0) + len(unit_tensors(u))
    quantized = SearchedWeights(ckpt, codes, schemes)
    report = {
        "max_bytes": budget,
        "predicted_bytes": predicted,
        "predicted_kld_mean": round(sum(sensitivity.kld[u][s] for u, s in choice.items()), 6),
        "accuracy_level": ACCURACY_LEVEL,
        "codes": "4-bit linears: searched scales or GPTQ, the lower output error on the calibration data",
        "calibration": calibration,
        "ladders": {"linear": [*LINEAR_LADDER, SOURCE_RUNG], "embedding": list(EMBEDDING_LADDER)},
        "linears_per_scheme": dict(sorted(counts.items())),
        "choice": dict(sorted(choice.items())),
        "head_shares_embedding": shared,
        "sensitivity": sensitivity.to_dict(),
    }
    source = chosen_source(source_plan(ckpt), choice, shared)
    return FitChoice(recipe, quantized, report, budget, costs, sensitivity, fixed, shared, source)


def shrink(fit: FitChoice, written: int) -> FitChoice:
    """The choice again with the fixed allowance grown by what the last artifact overshot by."""
    fixed = fit.fixed + (written - fit.report["predicted_bytes"]) + (16 << 10)
    q = fit.quantized
    calibration = fit.report["calibration"]
    return _choose(q.ckpt, fit.recipe, fit.budget, fixed, fit.costs, fit.sensitivity, q.codes, fit.shared, calibration)
