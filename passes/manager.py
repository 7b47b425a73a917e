"""Run a literal list of passes, in order, recording what each did.

    pipeline = [RemoveDeadNodesPass(), FoldConstantsPass(), InferShapesPass(), CheckModelPass()]
    model, records = run_passes(model, pipeline, dump_dir="ir-dumps")

``records`` goes into the artifact's manifest: each pass's name, its configuration and whether it
changed the graph. With ``dump_dir`` the IR is written as text after every pass, for debugging.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir

logger = logging.getLogger(__name__)


def pass_config(p: ir.passes.PassBase) -> dict:
    """A pass's configuration for the manifest: its ``config()`` if it has one, else its plain public
    attributes (anything that is not a number, string or flag is summarized by its type)."""
    if hasattr(p, "config"):
        return p.config()
    raw = (
        dataclasses.asdict(p)
        if dataclasses.is_dataclass(p)
        else {k: v for k, v in vars(p).items() if not k.startswith("_")}
    )
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else type(v).__name__ for k, v in raw.items()}


def run_passes(
    model: ir.Model, pipeline: Sequence[ir.passes.PassBase], *, dump_dir: str | os.PathLike | None = None
) -> tuple[ir.Model, list[dict]]:
    records = []
    if dump_dir is not None:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
    for index, p in enumerate(pipeline):
        start = time.perf_counter()
        result = p(model)
        model = result.model
        name = type(p).__name__
        logger.info("%s: modified=%s (%.2fs)", name, result.modified, time.perf_counter() - start)
        records.append({"pass": name, "config": pass_config(p), "modified": bool(result.modified)})
        if dump_dir is not None:
            (Path(dump_dir) / f"{index:02d}_{name}.txt").write_text(str(model.graph), encoding="utf-8")
    return model, records
