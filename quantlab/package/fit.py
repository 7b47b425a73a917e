"""--fit: choose each layer's precision under a size budget from measured sensitivity, then convert once.

1. Sizes, exactly and without quantizing anything: the graph is built with each candidate scheme
   (:data:`LINEAR_SCHEMES` for every decoder-layer unit and ``lm_head``, :data:`EMBEDDING_SCHEMES` for
   the embedding) and the quantization passes run lazily, so every initializer knows its dtype and
   shape; a unit's bytes are the sum of its tensors'. Everything that is not a unit (norms, the
   graph, tokenizer, runner, manifest) is taken from the artifact given to ``package``. A tied head
   that the pipeline writes as one tensor with the embedding (``passes/share_tied_embedding.py``: the
   head's scheme wins) makes the two one unit, ``lm_head``, with the head's candidates, as
   :func:`quantlab.fit.choose.unit_costs` counts it; the embedding is then no unit of its own.
   A candidate that another of the same bits beats on both counts (no more bytes, groups no coarser)
   is dropped before anything is measured (:func:`drop_dominated`).
2. Sensitivity, measured: the KL divergence of the output with only that unit quantized
   (:mod:`quantlab.package.sensitivity` says why this and not an activation-weighted proxy); the shared
   unit's figure has the head and the table quantized together, as the bundle will have them.
3. Choice: greedy by sensitivity saved per byte (:func:`quantlab.fit.choose.choose_precisions`, the one
   ``convert --max-size`` uses), starting from every unit
   at its smallest scheme and upgrading while the budget allows; ties go by name, so the same inputs
   give the same choice.
4. One conversion with the choice as per-layer recipe overrides, whose manifest measures the real
   ``kld_mean`` against fp32 (reported beside the predicted sum of per-unit KLDs). If that bundle does
   not fit after all, the budget shrinks by the overshoot and the choice is made again, once.
5. The uniform recipes of :data:`LADDER` whose predicted size fits are converted and measured too (and
   the given artifact is a candidate with its recorded quality): the lowest measured ``kld_mean`` that
   fits wins, and the report says when that is not the per-layer choice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path

from quantlab.emit.artifact import MANIFEST_FILE, MODEL_FILE, read_manifest
from quantlab.errors import InputError
from quantlab.fit.choose import choose_precisions
from quantlab.io.spec import sha256_file
from quantlab.package.sensitivity import (
    EMBEDDING_UNIT,
    EMBEDDING_WEIGHT,
    HEAD_UNIT,
    Sensitivity,
    measure_sensitivity,
    unit_linears,
    unit_of,
)
from quantlab.package.targets import Target
from quantlab.quant.scheme import parse_scheme

logger = logging.getLogger(__name__)

# (label, recipe fields): most bits first. Mixed rungs keep the layers that quantize worst in 4 bits
# (down_proj sees the widest activations) at 8 bits.
LADDER: tuple[tuple[str, dict], ...] = (
    ("w8a16-g128-asym", {"scheme": "w8a16-g128-asym"}),
    (
        "w4a16-g32-asym+down_proj-w8",
        {
            "scheme": "w4a16-g32-asym",
            "override": [{"pattern": "model.layers.*.mlp.down_proj", "scheme": "w8a16-g128-asym"}],
        },
    ),
    ("w4a16-g32-asym", {"scheme": "w4a16-g32-asym"}),
    ("w4a16-g128-asym", {"scheme": "w4a16-g128-asym"}),
    ("w4a16-g128-asym+head-w4", {"scheme": "w4a16-g128-asym", "lm_head": "w4a16-g128-asym"}),
)
# Candidate schemes per unit, most bits first. The embedding's blocks must be powers of two that divide
# common hidden sizes (576 = 9 x 64), so its 4-bit candidates are g32 and g64.
LINEAR_SCHEMES = ("w8a16-g128-asym", "w4a16-g32-asym", "w4a16-g128-asym")
EMBEDDING_SCHEMES = ("w8a16-g64-asym", "w4a16-g32-asym", "w4a16-g64-asym")
PER_LAYER = "per-layer"
# run_bundle.py, manifest.json and manifest.sha256 beside the artifact's own files
BUNDLE_OVERHEAD_BYTES = 64 << 10
_BITS = {2: 8, 3: 8, 21: 4, 22: 4}  # ONNX TensorProto: UINT8, INT8, UINT4, INT4


def recipe_toml(fields: dict, target: Target) -> str:
    """A recipe file for a ladder rung; a target without contrib ops gets standard-ONNX QDQ."""
    fields = dict(fields)
    if not target.contrib_ops:
        fields.update(format="qdq", embedding="none")
    lines = [f"{k} = {json.dumps(v)}" for k, v in fields.items() if k != "override"]
    for o in fields.get("override", []):
        lines += ["", "[[override]]", *(f"{k} = {json.dumps(v)}" for k, v in o.items())]
    return "\n".join(lines) + "\n"


def layer_precisions(model_path: str | os.PathLike) -> dict[str, str]:
    """Per-layer weight precision read from the graph itself: {"model.layers.0.mlp.down_proj": "int4-g32"}."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name: i.data_type for i in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            bits = attrs.get("bits", 4)
        elif node.op_type == "DequantizeLinear" and "block_size" in attrs:
            bits = _BITS.get(inits.get(node.input[0], 0), 8)
        else:
            continue
        out[node.name.rsplit(".", 1)[0]] = f"int{bits}-g{attrs.get('block_size', 0)}"
    return dict(sorted(out.items()))


def artifact_bytes(artifact: Path) -> int:
    return sum(p.stat().st_size for p in artifact.iterdir() if p.is_file() and p.name != MANIFEST_FILE)


def _tensor_bytes(shape, dtype) -> int:
    """Bytes a tensor takes in model.onnx.data: 4-bit types pack two values a byte."""
    import onnx_ir as ir

    return -(-math.prod(int(d) for d in shape) * ir.DataType(dtype).bitwidth // 8)


def _sum_by_unit(tensors) -> dict[str, int]:
    """(initializer name, bytes) pairs -> bytes per unit; tensors of no unit are left out."""
    out: dict[str, int] = {}
    for name, size in tensors:
        unit = unit_of(name.rsplit(".", 1)[0])  # model.layers.0.mlp.gate_up_proj.qweight -> ...mlp_in
        if unit is not None:
            out[unit] = out.get(unit, 0) + size
    return out


def artifact_unit_bytes(artifact: Path) -> dict[str, int]:
    """Bytes per unit of a converted artifact, from its graph's initializer shapes."""
    import onnx

    proto = onnx.load(str(artifact / MODEL_FILE), load_external_data=False)
    return _sum_by_unit((i.name, _tensor_bytes(i.dims, i.data_type)) for i in proto.graph.initializer)


def recipe_unit_bytes(ckpt, recipe) -> dict[str, int]:
    """Bytes per unit the recipe would write: the graph built and quantized lazily (no weight is read)."""
    from quantlab.graph_builder.decoder import BuildOptions, build_decoder
    from quantlab.passes.manager import run_passes
    from quantlab.pipelines import default_attention, fusion_pipeline, quantization_pipeline

    # the graph `convert` builds for this recipe (its default attention and fusions), so the bytes agree
    attention = default_attention(recipe)
    model = build_decoder(ckpt, BuildOptions(weight_dtype=recipe.weight_dtype, attention=attention))
    pipeline = quantization_pipeline(model, recipe, tied=ckpt.spec.tie_word_embeddings)
    model, _ = run_passes(model, pipeline + fusion_pipeline(attention, recipe))
    values = [v for v in model.graph.initializers.values() if v.uses()]  # replaced weights linger unused
    return _sum_by_unit((v.name, _tensor_bytes(v.shape, v.const_value.dtype)) for v in values)


def _recipe(fields: dict, target: Target, workdir: Path, name: str):
    from quantlab.recipe import load_recipe

    path = workdir / f"{name}.toml"
    path.write_text(recipe_toml(fields, target), encoding="utf-8")
    return path, load_recipe(str(path))


def unit_costs(ckpt, target: Target, workdir: Path) -> tuple[dict[str, dict[str, int]], bool]:
    """(``costs[unit][scheme]``, shared): bytes of each unit under each candidate scheme (the embedding
    only where the target runs quantized embeddings). ``shared``: the head is tied and every candidate's
    graph stores it and the embedding as one tensor (the table left no bytes of its own beyond a bit
    per entry, the rule of :func:`quantlab.fit.choose.unit_costs`); the head's unit then carries
    whatever the embedding's lookup adds (the Slice of padded rows) and there is no embedding unit."""
    spec = ckpt.spec
    sizes = []
    for linear, embedding in zip(LINEAR_SCHEMES, EMBEDDING_SCHEMES, strict=True):
        fields = {"scheme": linear, "lm_head": linear, "embedding": embedding}
        _, recipe = _recipe(fields, target, workdir, "costs")
        sizes.append((linear, embedding, recipe_unit_bytes(ckpt, recipe)))
    shared = spec.tie_word_embeddings and all(
        per_unit.get(EMBEDDING_UNIT, 0) * 8 < spec.vocab_size * spec.hidden_size for _, _, per_unit in sizes
    )
    costs: dict[str, dict[str, int]] = {}
    for linear, embedding, per_unit in sizes:
        if shared:
            per_unit[HEAD_UNIT] = per_unit.get(HEAD_UNIT, 0) + per_unit.pop(EMBEDDING_UNIT, 0)
        for unit, size in per_unit.items():
            if unit == EMBEDDING_UNIT and not target.contrib_ops:
                continue  # standard-ONNX bundles keep the embedding table in float
            costs.setdefault(unit, {})[embedding if unit == EMBEDDING_UNIT else linear] = size
    return drop_dominated(costs), shared


def drop_dominated(costs: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Each unit's candidates without those another candidate of the same bits and symmetry beats on
    both counts: no more bytes and groups no coarser. Where the rows are shorter than a group, blocks
    are padded to whole groups (K = 64 stores each g128 row as 128 codes, twice g32's 2 x 32), so the
    coarser scheme costs more and rounds the same row with one range where the finer uses two; its
    rounding error is never smaller in expectation, and a measured KLD that says otherwise is the noise
    of a few hundred tokens (stories260K: one g128 attention unit measured 0.0046 against g32's 0.0056
    alone, and the mix that took it measured 0.0850 against 0.0816 for all g32)."""
    return {unit: _undominated(by_scheme) for unit, by_scheme in costs.items()}


def _undominated(by_scheme: dict[str, int]) -> dict[str, int]:
    schemes = {s: parse_scheme(s) for s in by_scheme}

    def beats(t: str, s: str) -> bool:
        a, b = schemes[t], schemes[s]
        same_kind = (a.bits, a.symmetric) == (b.bits, b.symmetric)
        return same_kind and _group_span(a) <= _group_span(b) and by_scheme[t] <= by_scheme[s]

    return {s: size for s, size in by_scheme.items() if not any(t != s and beats(t, s) for t in by_scheme)}


def _group_span(scheme) -> float:
    """Elements of K one range covers: a per-channel scheme's group is all of K, the coarsest."""
    return scheme.group_size if scheme.group_size > 0 else math.inf


def per_layer_fields(choice: dict[str, str], shared: bool = False) -> dict:
    """Recipe fields for a choice: the commonest layer scheme as default, the others as overrides.
    ``shared``: the head and the embedding are one tensor, both at the head's scheme."""
    layers = {u: s for u, s in choice.items() if u not in (HEAD_UNIT, EMBEDDING_UNIT)}
    counts = Counter(layers.values())
    default = min(counts, key=lambda s: (-counts[s], LINEAR_SCHEMES.index(s))) if counts else LINEAR_SCHEMES[-1]
    fields = {"name": PER_LAYER, "scheme": default, "lm_head": choice.get(HEAD_UNIT, default)}
    if shared:
        fields["embedding"] = fields["lm_head"]
    elif EMBEDDING_UNIT in choice:
        fields["embedding"] = choice[EMBEDDING_UNIT]
    overrides = [
        {"pattern": linear, "scheme": scheme}
        for unit, scheme in sorted(layers.items())
        if scheme != default
        for linear in unit_linears(unit)
    ]
    if overrides:
        fields["override"] = overrides
    return fields


def _check_source(source: Path, manifest: dict) -> None:
    recorded = (manifest.get("source") or {}).get("files") or {}
    if source.is_file() and source.name in recorded and sha256_file(source) != recorded[source.name]:
        raise InputError(source, None, "is not the checkpoint the artifact was converted from (sha256 differs)")


@dataclasses.dataclass(frozen=True)
class FitPlan:
    """What every budget shares: the sizes of each unit under each scheme and of each ladder rung."""

    artifact: Path
    source: Path
    target: Target
    workdir: Path
    ckpt: object  # quantlab.io.Checkpoint
    given_bytes: int  # the artifact's own bundle, estimated
    fixed_bytes: int  # everything no recipe here changes: norms, graph, tokenizer, runner, manifest
    costs: dict[str, dict[str, int]]  # unit -> scheme -> bytes
    rungs: tuple[tuple[str, dict, int], ...]  # (label, recipe fields, predicted bundle bytes)
    shared: bool  # a tied head and the embedding are one tensor, so one unit (lm_head)

    @property
    def smallest_bytes(self) -> int:
        per_layer = self.fixed_bytes + sum(min(c.values()) for c in self.costs.values())
        return min(self.given_bytes, per_layer, *(r[2] for r in self.rungs))


def plan_fit(artifact: Path, source: str | os.PathLike, target: Target, workdir: Path, extra_bytes: int = 0) -> FitPlan:
    """Sizes only: nothing is quantized or converted (fast even for large models)."""
    from quantlab.io import load_checkpoint

    source = Path(source)
    _check_source(source, read_manifest(artifact))
    ckpt = load_checkpoint(source)
    given = artifact_bytes(artifact) + BUNDLE_OVERHEAD_BYTES + extra_bytes
    fixed = given - sum(artifact_unit_bytes(artifact).values())
    rungs = []
    for i, (label, fields) in enumerate(LADDER):
        _, recipe = _recipe(fields, target, workdir, f"rung{i}")
        rungs.append((label, fields, fixed + sum(recipe_unit_bytes(ckpt, recipe).values())))
    costs, shared = unit_costs(ckpt, target, workdir)
    return FitPlan(artifact, source, target, workdir, ckpt, given, fixed, costs, tuple(rungs), shared)


def measure_plan_sensitivity(plan: FitPlan) -> Sensitivity:
    """Per-unit KLD for every candidate scheme, over an fp32 build of the source in the work folder."""
    from quantlab import api

    spec = plan.ckpt.spec
    bos = spec.bos_token_id if spec.bos_token_id is not None else min(spec.eos_token_ids or (0,))
    with api._baseline_artifact(plan.ckpt, (plan.workdir / "baseline").absolute(), progress=False) as baseline:
        unit_weights: dict[str, list[str]] = {u: [] for u in plan.costs}
        for name in _baseline_weights(baseline):
            unit = unit_of(name.removesuffix(".weight"))
            if unit in unit_weights:
                unit_weights[unit].append(name)
        if plan.shared:  # the head's codes are the table's too: both quantized in one measurement
            unit_weights[HEAD_UNIT].append(EMBEDDING_WEIGHT)
        schemes = {u: tuple(sorted(c)) for u, c in plan.costs.items()}
        return measure_sensitivity(baseline, unit_weights, schemes, bos_id=int(bos))


def _convert(plan: FitPlan, fields: dict, name: str) -> dict:
    """Convert with a recipe (once per recipe text in the work folder); the candidate with its bundle
    estimate and measured quality."""
    from quantlab import api

    text = recipe_toml(fields, plan.target)
    out = plan.workdir / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if not (out / MANIFEST_FILE).is_file():
        recipe_path, _ = _recipe(fields, plan.target, plan.workdir, out.name)
        logger.info("--fit: converting %s", name)
        api.convert(plan.source, out, recipe=str(recipe_path), progress=False, overwrite=True)
    q = read_manifest(out)["quality"]
    return {
        "recipe": text,
        "estimated_bytes": plan.fixed_bytes + sum(artifact_unit_bytes(out).values()),
        "kld_mean": q["kld_mean"],
        "top1_agreement": q["top1_agreement"],
        "path": out,
    }


def _per_layer(plan: FitPlan, sensitivity: Sensitivity, budget: int) -> dict | None:
    """Choose, convert, measure; once more with the overshoot taken off the budget if it did not fit."""
    room = budget - plan.fixed_bytes
    candidate = None
    for _ in range(2):
        choice = choose_precisions(plan.costs, sensitivity.kld, room)
        if choice is None:
            break
        candidate = _convert(plan, per_layer_fields(choice, plan.shared), "per_layer")
        candidate.update(
            label=PER_LAYER,
            precisions=choice,
            predicted_bytes=plan.fixed_bytes + sum(plan.costs[u][s] for u, s in choice.items()),
            predicted_kld_mean=sum(sensitivity.kld[u][s] for u, s in choice.items()),
        )
        if candidate["estimated_bytes"] <= budget:
            break
        room -= candidate["estimated_bytes"] - budget
    return candidate


def _unreachable(plan: FitPlan, budget: int) -> InputError:
    embedding = "shared with the head" if plan.shared else EMBEDDING_SCHEMES[-1]
    return InputError(
        None,
        "--max-size",
        f"nothing fits {budget / 1e6:.3f} MB: the smallest bundle reachable (every unit at its smallest "
        f"scheme, embedding {embedding}) is about {plan.smallest_bytes / 1e6:.3f} MB; nothing written",
    )


def fit_plan(plan: FitPlan, sensitivity: Sensitivity, budget: int) -> tuple[Path, dict]:
    """Steps 3-5 of the module docstring for one budget; returns the chosen artifact folder and the report."""
    if plan.smallest_bytes > budget:
        raise _unreachable(plan, budget)
    quality = read_manifest(plan.artifact).get("quality") or {}
    candidates = [
        {
            "label": "artifact",
            "recipe": (read_manifest(plan.artifact).get("recipe") or {}).get("name"),
            "estimated_bytes": plan.given_bytes,
            "kld_mean": quality.get("kld_mean"),
            "top1_agreement": quality.get("top1_agreement"),
            "path": plan.artifact,
        }
    ]
    per_layer = _per_layer(plan, sensitivity, budget)
    if per_layer is not None:
        candidates.append(per_layer)
    for i, (label, fields, predicted) in enumerate(plan.rungs):
        if predicted <= budget:
            candidates.append({"label": label, **_convert(plan, fields, f"rung{i}")})
        else:  # predicted over the budget: not converted
            candidates.append(
                {"label": label, "recipe": recipe_toml(fields, plan.target), "estimated_bytes": predicted}
            )
    fitting = [c for c in candidates if c["estimated_bytes"] <= budget and c.get("kld_mean") is not None]
    report = {
        "budget_bytes": budget,
        "schemes": {"linear": list(LINEAR_SCHEMES), "embedding": [] if plan.shared else list(EMBEDDING_SCHEMES)},
        "head_shares_embedding": plan.shared,
        "sensitivity": sensitivity.to_dict(),
        # the per-layer candidate's choice is listed once, under "per_layer"
        "candidates": [
            {k: v for k, v in c.items() if k != "path" and (c is not per_layer or k not in ("precisions", "recipe"))}
            | {"fits": c in fitting}
            for c in candidates
        ],
    }
    if not fitting:
        raise InputError(
            None, "--max-size", f"no candidate fits {budget / 1e6:.3f} MB after conversion; nothing written"
        )
    best = min(fitting, key=lambda c: (c["kld_mean"], c["estimated_bytes"]))
    report.update(chosen=best["label"], kld_mean=best["kld_mean"], top1_agreement=best["top1_agreement"])
    if per_layer is not None:
        report["per_layer"] = {k: v for k, v in per_layer.items() if k not in ("path", "recipe")}
        if best is not per_layer:
            why = "does not fit" if per_layer not in fitting else f"measured kld_mean {per_layer['kld_mean']:.5f}"
            report["note"] = f"the per-layer choice {why}; {best['label']} measured lower under the budget"
    return best["path"], report


def fit_to_budget(
    artifact: Path, source: str | os.PathLike, budget_bytes: int, target: Target, workdir: Path, extra_bytes: int = 0
) -> tuple[Path, dict]:
    """Per-layer precision under the budget, checked against the uniform ladder, in ``workdir``;
    returns the chosen artifact folder and the fit report (steps: module docstring)."""
    plan = plan_fit(artifact, source, target, workdir, extra_bytes)
    if plan.smallest_bytes > budget_bytes:  # before measuring anything
        raise _unreachable(plan, budget_bytes)
    return fit_plan(plan, measure_plan_sensitivity(plan), budget_bytes)


def _baseline_weights(baseline: Path) -> list[str]:
    import onnx

    proto = onnx.load(str(baseline / MODEL_FILE), load_external_data=False)
    return sorted(i.name for i in proto.graph.initializer if i.name.endswith(".weight"))
