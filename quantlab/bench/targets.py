"""What a benchmark target is: an artifact folder or a checkpoint (Hugging Face folder, .gguf file,
llama2.c .bin) for the runtimes users run today.

An artifact is any folder with the decoder I/O contract: ``model.onnx`` taking input_ids,
attention_mask, (position_ids,) past_key_values.{i}.key|value and giving logits, present.{i}.key|value,
with a ``genai_config.json`` that names them. quantlab's own carry a ``manifest.json`` (recipe, sizes,
source); a peer's, such as onnxruntime-genai's model builder output, is described from its graph.

Nothing here loads weights: sizes come from the manifest or the file system, the bytes a decode step
reads from the graph's initializer table (``model.onnx`` without its external data).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from quantlab.errors import InputError

ARTIFACT = "artifact"
CHECKPOINT = "checkpoint"

# Ops that read one row of their table per token: a decode step does not stream these initializers.
_GATHER_OPS = {"Gather", "GatherBlockQuantized"}


@dataclasses.dataclass(frozen=True)
class Target:
    path: Path
    kind: str  # ARTIFACT | CHECKPOINT
    format: str  # "onnx" | "hf-safetensors" | "gguf" | "llama2c"
    model: str  # a human label for the model (``--model-label`` or taken from the source file name)
    variant: str  # recipe name for an artifact ("fp32", "w4a16-g128-asym", ...), the format for a checkpoint
    size_bytes: int  # artifact: sum of the manifest's file sizes; checkpoint: its files on disk
    max_positions: int | None  # the model's context length, when known
    vocab_size: int
    quantized: bool  # an artifact whose recipe quantizes weights
    weight_bytes_per_step: int | None  # artifact: initializer bytes a decode step streams (None for checkpoints)
    embedding_bytes: int | None  # the gathered tables left out of weight_bytes_per_step
    cache_dtype: str | None  # artifact: element type of the KV cache inputs ("float32", "int8", ...)
    producer: str = "quantlab"  # who wrote it: "quantlab", or the graph's producer_name for a peer's artifact
    attention: str | None = None  # a quantlab artifact's graph attention ("plain", "fused"; --attention)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = os.fspath(self.path)
        return d


def describe_target(path: str | os.PathLike, model_label: str | None = None) -> Target:
    """Classify ``path`` and read its sizes; raises InputError for anything we cannot benchmark."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, None, "not found")
    if p.is_dir() and (p / "model.onnx").is_file():
        if not (p / "manifest.json").is_file():
            return _describe_foreign_artifact(p, model_label)
        return _describe_artifact(p, model_label)
    return _describe_checkpoint(p, model_label)


def _describe_foreign_artifact(folder: Path, model_label: str | None) -> Target:
    """An artifact quantlab did not write: its scheme from the graph (MatMulNBits' bits and block size),
    its size from its files, its vocabulary and context length from genai_config.json."""
    import onnx

    genai_file = folder / "genai_config.json"
    try:
        genai = json.loads(genai_file.read_text(encoding="utf-8"))["model"]
    except FileNotFoundError:
        raise InputError(genai_file, None, "not found: the benchmark needs it for the cache and vocabulary") from None
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(genai_file, "model", f"not a genai_config ({e})") from None
    proto = onnx.load(os.fspath(folder / "model.onnx"), load_external_data=False)
    names = {v.name for v in proto.graph.input}
    missing = [n for n in ("input_ids", "attention_mask", "past_key_values.0.key") if n not in names]
    if missing or "logits" not in {v.name for v in proto.graph.output}:
        raise InputError(folder / "model.onnx", None, f"not a decoder with a KV cache (no {missing or ['logits']})")
    weight_bytes, embedding_bytes, cache_dtype = graph_weight_bytes(folder / "model.onnx")
    schemes = sorted(
        {
            "int{bits}-g{block_size}".format(**{a.name: a.i for a in node.attribute})
            for node in _all_nodes(proto.graph)
            if node.op_type == "MatMulNBits"
        }
    )
    producer = proto.producer_name or "unknown"
    files = [f for f in folder.iterdir() if f.is_file() and (f.suffix == ".onnx" or f.name.endswith(".onnx.data"))]
    return Target(
        path=folder,
        kind=ARTIFACT,
        format="onnx",
        model=model_label or folder.name,
        variant=f"{'+'.join(schemes) or 'float'} ({producer})",
        size_bytes=sum(f.stat().st_size for f in files),
        max_positions=genai.get("context_length"),
        vocab_size=int(genai["vocab_size"]),
        quantized=bool(schemes),
        weight_bytes_per_step=weight_bytes,
        embedding_bytes=embedding_bytes,
        cache_dtype=cache_dtype,
        producer=producer,
    )


def _describe_artifact(folder: Path, model_label: str | None) -> Target:
    from quantlab.emit.artifact import read_manifest

    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as e:
        raise InputError(folder / "manifest.json", None, f"unreadable ({e})") from None
    recipe = manifest.get("recipe", {})
    spec = manifest.get("spec", {})
    genai = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]
    weight_bytes, embedding_bytes, cache_dtype = graph_weight_bytes(folder / "model.onnx")
    sources = sorted(manifest.get("source", {}).get("files", {}))
    variant = recipe.get("name", "?")
    # KV-cache variants show up as their own variant: the recipe's kv_cache, else the cache inputs' type
    kv = recipe.get("kv_cache") or (cache_dtype if cache_dtype != "float32" else None)
    if kv and kv != "fp32" and "kv" not in variant:
        variant += f" + kv {kv}"
    return Target(
        path=folder,
        kind=ARTIFACT,
        format="onnx",
        model=model_label or (_stem(sources[0]) if sources else folder.name),
        variant=variant,
        size_bytes=sum(int(f["bytes"]) for f in manifest.get("files", {}).values()),
        max_positions=genai.get("context_length") or spec.get("max_position_embeddings"),
        vocab_size=int(genai["vocab_size"]),
        quantized=bool(recipe.get("scheme")),
        weight_bytes_per_step=weight_bytes,
        embedding_bytes=embedding_bytes,
        cache_dtype=cache_dtype,
        attention=manifest.get("attention", {}).get("kind"),
    )


def _describe_checkpoint(path: Path, model_label: str | None) -> Target:
    from quantlab.io import load_checkpoint

    ckpt = load_checkpoint(path)  # headers only: tensors are read lazily and we read none
    if path.is_dir():
        size = sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".pt"))
    else:
        size = path.stat().st_size
    return Target(
        path=path,
        kind=CHECKPOINT,
        format=ckpt.source_format,
        model=model_label or _stem(path.name),
        variant=_gguf_file_type(path) if ckpt.source_format == "gguf" else ckpt.source_format,
        size_bytes=size,
        max_positions=ckpt.spec.max_position_embeddings,
        vocab_size=ckpt.spec.vocab_size,
        quantized=False,
        weight_bytes_per_step=None,
        embedding_bytes=None,
        cache_dtype=None,
    )


def _gguf_file_type(path: Path) -> str:
    """``gguf Q4_K_M``: the file's general.file_type, the name llama.cpp's quantizer gives it."""
    import gguf

    field = gguf.GGUFReader(path).fields.get(gguf.Keys.General.FILE_TYPE)
    if field is None:
        return "gguf"
    try:
        name = gguf.LlamaFileType(int(field.contents())).name
    except ValueError:
        return f"gguf file_type {field.contents()}"
    return "gguf " + name.removeprefix("MOSTLY_").removeprefix("ALL_")


def graph_weight_bytes(model_file: Path) -> tuple[int, int, str | None]:
    """(bytes a decode step streams, bytes of gathered tables, KV cache element type) of an ONNX graph.

    Every initializer counts with its stored size (external data ``length`` or inline bytes), except
    those read only by Gather/GatherBlockQuantized: decode gathers one row of the embedding. A tied head
    is a second, transposed copy in our graphs, so it is counted, as the head's MatMul streams it.
    For fp16-stored weights onnxruntime may fold the cast to fp32 at load and stream fp32: the figure
    is then the stored size, a lower bound.
    """
    import onnx

    proto = onnx.load(os.fspath(model_file), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in _all_nodes(proto.graph):
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = gathered = 0
    for init in proto.graph.initializer:
        external = {e.key: e.value for e in init.external_data}
        nbytes = int(external["length"]) if "length" in external else _inline_bytes(init)
        total += nbytes
        ops = consumers.get(init.name, set())
        if ops and ops <= _GATHER_OPS:
            gathered += nbytes
    cache_dtype = None
    for value in proto.graph.input:
        if value.name.startswith("past_key_values."):
            cache_dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
            break
    return total - gathered, gathered, cache_dtype


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _all_nodes(attr.g)


def _inline_bytes(init) -> int:
    if init.raw_data:
        return len(init.raw_data)
    import onnx.numpy_helper

    return int(onnx.numpy_helper.to_array(init).nbytes)


def _stem(name: str) -> str:
    for suffix in (".gguf", ".bin", ".safetensors"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
