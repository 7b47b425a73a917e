"""--fit: pick the best-quality recipe whose bundle fits a size budget, by converting and measuring.

A ladder of recipes from most to fewest bits (with mixed-precision rungs between) is converted from the
source checkpoint with :func:`quantlab.api.convert`, which measures each candidate's KL divergence
against the fp32 model; the candidate with the lowest measured ``kld_mean`` among those under the budget
wins. The artifact given to ``package`` is a candidate too, with the quality its manifest records.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from quantlab.emit.artifact import MANIFEST_FILE, read_manifest
from quantlab.errors import InputError
from quantlab.io.spec import sha256_file
from quantlab.package.targets import Target

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


def _check_source(source: Path, manifest: dict) -> None:
    recorded = (manifest.get("source") or {}).get("files") or {}
    if source.is_file() and source.name in recorded and sha256_file(source) != recorded[source.name]:
        raise InputError(source, None, "is not the checkpoint the artifact was converted from (sha256 differs)")


def fit_to_budget(
    artifact: Path, source: str | os.PathLike, budget_bytes: int, target: Target, workdir: Path, extra_bytes: int = 0
) -> tuple[Path, dict]:
    """Convert the ladder into ``workdir``; returns the chosen artifact folder and the fit report."""
    from quantlab import api

    source = Path(source)
    art = read_manifest(artifact)
    _check_source(source, art)
    quality = art.get("quality") or {}
    candidates = [
        {
            "label": "artifact",
            "recipe": (art.get("recipe") or {}).get("name"),
            "estimated_bytes": artifact_bytes(artifact) + BUNDLE_OVERHEAD_BYTES + extra_bytes,
            "kld_mean": quality.get("kld_mean"),
            "top1_agreement": quality.get("top1_agreement"),
            "path": artifact,
        }
    ]
    for i, (label, fields) in enumerate(LADDER):
        recipe_path = workdir / f"rung{i}.toml"
        recipe_path.write_text(recipe_toml(fields, target), encoding="utf-8")
        out = workdir / f"rung{i}"
        logger.info("--fit: converting %s", label)
        api.convert(source, out, recipe=str(recipe_path), progress=False)
        q = read_manifest(out)["quality"]
        candidates.append(
            {
                "label": label,
                "recipe": recipe_toml(fields, target),
                "estimated_bytes": artifact_bytes(out) + BUNDLE_OVERHEAD_BYTES + extra_bytes,
                "kld_mean": q["kld_mean"],
                "top1_agreement": q["top1_agreement"],
                "path": out,
            }
        )
    fitting = [c for c in candidates if c["estimated_bytes"] <= budget_bytes and c["kld_mean"] is not None]
    report = {
        "budget_bytes": budget_bytes,
        "candidates": [{k: v for k, v in c.items() if k != "path"} | {"fits": c in fitting} for c in candidates],
    }
    if not fitting:
        smallest = min(c["estimated_bytes"] for c in candidates)
        raise InputError(
            None,
            "--max-size",
            f"no recipe fits {budget_bytes / 1e6:.3f} MB: the smallest candidate bundle is about "
            f"{smallest / 1e6:.3f} MB; nothing written",
        )
    best = min(fitting, key=lambda c: c["kld_mean"])
    report.update(chosen=best["label"], kld_mean=best["kld_mean"], top1_agreement=best["top1_agreement"])
    return best["path"], report
