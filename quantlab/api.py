"""The Python API: what the CLI's subcommands do, callable from code.

from quantlab import api
api.convert("SmolLM2-135M-Instruct.Q4_1.gguf", "out/smollm2-fp32")
ids = api.generate_ids("out/smollm2-fp32", [1, 2, 3], max_new_tokens=16)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir

from quantlab.build.decoder import BuildOptions, build_decoder
from quantlab.emit.artifact import write_artifact
from quantlab.io import load_checkpoint
from quantlab.passes.check import CheckModelPass, InferShapesPass
from quantlab.passes.dead_nodes import RemoveDeadNodesPass
from quantlab.passes.fold_constants import FoldConstantsPass
from quantlab.passes.manager import run_passes
from quantlab.runtime.generate import GREEDY, OrtDecoder, SamplingConfig, generate

logger = logging.getLogger(__name__)


def cleanup_pipeline() -> list[ir.passes.PassBase]:
    """The passes every artifact goes through last, top to bottom."""
    return [RemoveDeadNodesPass(), FoldConstantsPass(), RemoveDeadNodesPass(), InferShapesPass(), CheckModelPass()]


def convert(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    weight_dtype: str = "fp32",
    overwrite: bool = False,
    allow_pickle: bool = False,
    tokenizer: str | os.PathLike | None = None,
    dump_ir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Checkpoint -> artifact folder. Raises quantlab.errors.InputError on bad input."""
    ckpt = load_checkpoint(source, allow_pickle=allow_pickle, tokenizer_path=tokenizer)
    options = BuildOptions(weight_dtype=weight_dtype)
    model = build_decoder(ckpt, options)
    model, records = run_passes(model, cleanup_pipeline(), dump_dir=dump_ir)
    recipe = {"weights": weight_dtype, "activations": "fp32", "kv_cache": "fp32"}
    return write_artifact(model, ckpt, out_dir, recipe=recipe, passes=records, overwrite=overwrite, progress=progress)


def generate_ids(
    artifact_dir: str | os.PathLike,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 32,
    sampling: SamplingConfig = GREEDY,
    stop_ids: Sequence[int] | None = None,
    threads: int | None = None,
) -> list[int]:
    """Generate from token ids; stops at the tokenizer's stop ids unless ``stop_ids`` is given."""
    if stop_ids is None:
        from quantlab.runtime.tokenizer import load_tokenizer

        stop_ids = sorted(load_tokenizer(artifact_dir).eos_token_ids)
    decoder = OrtDecoder(artifact_dir, threads=threads)
    return list(generate(decoder, prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stop_ids))
