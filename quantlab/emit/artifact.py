"""Write the artifact folder that onnxruntime, onnxruntime-genai and optimum load.

    model.onnx            the graph
    model.onnx.data       every weight, as external data (no 2 GB protobuf limit)
    genai_config.json     onnxruntime-genai's description of the decoder and its cache
    config.json           a Hugging Face config, for optimum (when the source has one)
    tokenizer files       tokenizer.json (+ tokenizer_config.json) or llama2.c tokenizer.bin
    manifest.json         provenance: source hashes, versions, spec, passes, every file's sha256

Same input, same bytes out: nothing here records a time, a host or a random value.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx_ir as ir
from tqdm import tqdm

import quantlab
from quantlab.emit.staging import staged_output
from quantlab.graph_builder.kv_cache import KvCacheFormat
from quantlab.io.spec import Checkpoint, sha256_file

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
_DEPENDENCIES = ("onnx", "onnx-ir", "onnxruntime", "numpy", "gguf", "safetensors", "tokenizers")


def dependency_versions() -> dict[str, str]:
    versions = {"quantlab": quantlab.__version__}
    for dist in _DEPENDENCIES:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "absent"
    return versions


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_model(model: ir.Model, folder: Path, *, progress: bool = True) -> None:
    """model.onnx + model.onnx.data, streaming lazy weights one tensor at a time."""
    n = len(model.graph.initializers)
    bar = tqdm(total=n, desc="write weights", unit="tensor", disable=not progress or n == 0, leave=False)

    def on_tensor(tensor, info) -> None:  # noqa: ARG001
        bar.update(1)

    try:
        # max_workers=1 and a small in-flight budget: a lazy tensor is read, written and dropped before
        # the next is read, so peak memory is about one tensor, not the model.
        ir.save(
            model,
            folder / MODEL_FILE,
            external_data=DATA_FILE,
            callback=on_tensor,
            max_workers=1,
            max_in_flight_bytes=1 << 26,
        )
    finally:
        bar.close()


# onnxruntime-genai feeds the cache itself, as float tensors named past_key_values.{i}.key|value only.
GENAI_QUANTIZED_CACHE_NOTE = (
    "onnxruntime-genai cannot run this artifact: it allocates float caches and knows no scale tensors; "
    "use quantlab generate (or convert with --kv fp32)"
)


def kv_cache_description(ckpt: Checkpoint, kv_cache: KvCacheFormat) -> dict:
    """The cache format as genai_config.json and the manifest describe it."""
    s = ckpt.spec
    d = kv_cache.describe(s.num_layers, s.num_kv_heads, s.head_dim)
    d["onnxruntime_genai"] = GENAI_QUANTIZED_CACHE_NOTE if kv_cache.quantized and not kv_cache.static else "supported"
    return d


def genai_config(
    ckpt: Checkpoint,
    *,
    context_length: int | None = None,
    kv_cache: KvCacheFormat | None = None,
    share_buffer: bool = False,
) -> dict:
    """onnxruntime-genai's genai_config.json for our decoder's I/O names.

    ``share_buffer`` (a graph whose attention is GroupQueryAttention) lets onnxruntime-genai keep each
    layer's cache in one buffer of the maximum length that is both past and present: GroupQueryAttention
    appends the new keys in place instead of copying the whole cache into a new present every step.

    An fp32 or static (int8-static) cache gives exactly the file onnxruntime-genai loads; a quantized cache
    with per-token scales adds ``model.decoder.kv_cache`` (the format, and the scale tensors' names), which
    quantlab's runtime reads and onnxruntime-genai does not support.
    """
    s = ckpt.spec
    ctx = context_length or s.max_position_embeddings
    eos = list(s.eos_token_ids) or ([ckpt.tokenizer.eos_token_ids[0]] if ckpt.tokenizer else [])
    config = {
        "model": {
            "bos_token_id": s.bos_token_id if s.bos_token_id is not None else 1,
            "context_length": ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": s.head_dim,
                "hidden_size": s.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": s.num_heads,
                "num_hidden_layers": s.num_layers,
                "num_key_value_heads": s.num_kv_heads,
            },
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": eos[0] if eos else 0,
            "type": "llama",
            "vocab_size": s.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": ctx,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": share_buffer,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
    # A static format (int8-static) is int8 / uint8 tensors alone under the usual names, which
    # onnxruntime-genai allocates by the graph's input type: the file stays one genai loads (it refuses
    # unknown keys), and the manifest describes the format.
    if kv_cache is not None and kv_cache.quantized and not kv_cache.static:
        decoder = config["model"]["decoder"]
        decoder["kv_cache"] = {
            **kv_cache_description(ckpt, kv_cache),
            "past_key_scale_names": "past_key_values.%d.key_scale",
            "past_value_scale_names": "past_key_values.%d.value_scale",
            "present_key_scale_names": "present.%d.key_scale",
            "present_value_scale_names": "present.%d.value_scale",
        }
        if kv_cache.channel_keys:  # the keys of the unfinished block, f32
            decoder["kv_cache"].update(
                past_key_tail_names="past_key_values.%d.key_tail", present_key_tail_names="present.%d.key_tail"
            )
    return config


def estimate_artifact_bytes(spec, recipe, *, with_baseline: bool = False) -> int:
    """A lower-bound estimate of the bytes a conversion writes, for the free-space preflight.

    Every parameter at its recipe's weight width (bits / 8 for a quantized scheme, the float dtype's
    width otherwise); with ``with_baseline``, plus the temporary fp32 artifact beside the output.
    A lower bound, so the preflight never refuses a conversion that would fit.
    """
    params = int(sum(math.prod(shape) for shape in spec.expected_shapes().values()))
    float_bytes = 2 if recipe.weight_dtype == "fp16" else 4
    weight_bytes = recipe.scheme.bits / 8 if recipe.scheme is not None else float_bytes
    total = int(params * min(weight_bytes, float_bytes))
    if with_baseline:
        total += params * 4
    return total


def count_parameters(ckpt: Checkpoint) -> int:
    """Parameters of the source model (a tied head counted once), whatever precision they are stored in."""
    return int(sum(math.prod(shape) for shape in ckpt.spec.expected_shapes().values()))


def write_artifact(
    model: ir.Model,
    ckpt: Checkpoint,
    out_dir: str | os.PathLike,
    *,
    recipe: dict,
    passes: list[dict],
    overwrite: bool = False,
    progress: bool = True,
    extra_manifest: dict | None = None,
    check: Callable[[Path], dict] | None = None,
    kv_cache: KvCacheFormat | None = None,
) -> Path:
    """Write everything into a staging folder, then rename it to ``out_dir``. Returns ``out_dir``.

    ``check(staging_folder)`` runs on the complete model files before the manifest is written: what it
    returns joins the manifest (measured quality, say), and if it raises nothing is left behind.
    """
    from quantlab.runtime.tokenizer import write_tokenizer_files

    with staged_output(out_dir, overwrite=overwrite) as stage:
        save_model(model, stage, progress=progress)
        tokenizer_files = write_tokenizer_files(ckpt.tokenizer, stage) if ckpt.tokenizer else []
        gqa = any(n.op_type == "GroupQueryAttention" for n in model.graph)
        write_json(stage / "genai_config.json", genai_config(ckpt, kv_cache=kv_cache, share_buffer=gqa))
        if ckpt.hf_config:
            write_json(stage / "config.json", ckpt.hf_config)
        measured = check(stage) if check is not None else {}
        files = {}
        for path in sorted(p for p in stage.iterdir() if p.is_file()):
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "producer": "quantlab",
            "versions": dependency_versions(),
            "source": {
                "format": ckpt.source_format,
                "files": ckpt.source_sha256(),
            },
            "spec": ckpt.spec.to_dict(),
            "recipe": recipe,
            "passes": passes,
            "graph": {
                "opset": {d: v for d, v in sorted(model.opset_imports.items())},
                "nodes": len(model.graph),
                "parameters": count_parameters(ckpt),
                "inputs": [v.name for v in model.graph.inputs],
                "outputs": [v.name for v in model.graph.outputs],
            },
            "kv_cache": kv_cache_description(ckpt, kv_cache or KvCacheFormat()),
            "tokenizer": {"kind": ckpt.tokenizer.kind if ckpt.tokenizer else None, "files": tokenizer_files},
            "files": files,
        }
        manifest.update(extra_manifest or {})
        manifest.update(measured)
        write_json(stage / MANIFEST_FILE, manifest)
    logger.info("wrote %s", out_dir)
    return Path(out_dir)


def read_manifest(artifact_dir: str | os.PathLike) -> dict:
    return json.loads((Path(artifact_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
