"""GGUF checkpoints of the ``llama`` architecture, read with the ``gguf`` package.

The reader memory-maps the file; a tensor is dequantized to float32 only when it is loaded.
llama.cpp's converter stores ``attn_q`` / ``attn_k`` rows permuted for its adjacent-pair RoPE;
:func:`unpermute_rows` undoes that so the canonical tensors use the Hugging Face half-split layout.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path

import numpy as np

from quantlab.errors import InputError
from quantlab.io.common import (
    check_finite,
    check_head_layout,
    check_tensor_shapes,
    hf_config_for_spec,
    positive_float,
    positive_int,
    tokenizer_spec_from_file,
    with_tokenizer_ids,
)
from quantlab.io.gguf_tokenizer import gguf_tokenizer_spec
from quantlab.io.spec import Checkpoint, ModelSpec
from quantlab.quant.gguf_blocks import SourceBlocks, SourceQuantization, decode_blocks, plan_source_quantization

logger = logging.getLogger(__name__)

GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# The header fields behind each dimension symbol, for error messages.
GGUF_FIELDS = {
    "vocab": "llama.vocab_size",
    "hidden": "llama.embedding_length",
    "q": "llama.attention.head_count",
    "kv": "llama.attention.head_count_kv",
    "head_dim": "llama.attention.key_length",
    "ff": "llama.feed_forward_length",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def canonical_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base in GLOBAL_NAMES and suffix == "weight":
        return f"{GLOBAL_NAMES[base]}.weight"
    match = _LAYER_TENSOR.match(gguf_name)
    if match and match.group(2) in LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    return None


def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's ``permute``: per head, adjacent-pair rows back to half-split rows.

    The converter does ``w.reshape(n_head, 2, d // 2, *rest).swapaxes(1, 2).reshape(w.shape)``,
    which sends half-split row ``(h, half, i)`` to position ``(h, i, half)``. The inverse reads the
    stored rows as ``(n_head, d // 2, 2)`` and swaps the last two row axes back.
    """
    rows = weight.shape[0]
    head_dim = rows // n_head
    w = weight.reshape(n_head, head_dim // 2, 2, *weight.shape[1:])  # (heads, d/2, 2, in)
    return np.ascontiguousarray(w.swapaxes(1, 2)).reshape(weight.shape)


# GGUF value types (gguf.GGUFValueType) -> bytes of one value; 8 string, 9 array: variable.
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def check_gguf_header(path: str | os.PathLike) -> None:
    """Walk a v2/v3 GGUF header (metadata and tensor infos) checking every count and length against
    the bytes left in the file, before the gguf package parses it.

    The package trusts counts: a mutated file whose string array claims 2^32 elements sends it into
    a loop over slices past the end of the file (fuzzing found it: minutes of CPU and gigabytes of
    memory for a 169 kB file). Here every element costs at least one byte read, so the walk is
    linear in the file size. Raises InputError naming the field; returns quietly otherwise (the
    package still reports what this walk does not check).
    """
    import mmap
    import struct

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            return  # the package's own errors cover a file too short for a header
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF" or struct.unpack_from("<I", buf, 4)[0] < 2:
                return
            pos = 8

            def take(n: int, what: str) -> int:
                nonlocal pos
                if n < 0 or n > size - pos:
                    raise InputError(path, what, f"needs {n} bytes at offset {pos}, the file has {size - pos} left")
                start, pos = pos, pos + n
                return start

            def u64(what: str) -> int:
                return struct.unpack_from("<Q", buf, take(8, what))[0]

            def u32(what: str) -> int:
                return struct.unpack_from("<I", buf, take(4, what))[0]

            def value(kind: int, what: str, depth: int = 0) -> None:
                if kind in _SCALAR_BYTES:
                    take(_SCALAR_BYTES[kind], what)
                elif kind == _STRING:
                    take(u64(what), what)
                elif kind == _ARRAY and depth < 4:
                    inner, count = u32(what), u64(what)
                    least = _SCALAR_BYTES.get(inner, 8 if inner == _STRING else 12)
                    if count > (size - pos) // least:
                        raise InputError(
                            path, what, f"array claims {count} elements, the file has {size - pos} bytes left"
                        )
                    if inner in _SCALAR_BYTES:
                        take(count * least, what)
                    else:
                        for _ in range(count):
                            value(inner, what, depth + 1)
                else:
                    raise InputError(path, what, f"unknown or too deeply nested value type {kind}")

            n_tensors, n_kv = u64("tensor_count"), u64("metadata_kv_count")
            if n_kv > size // 13 or n_tensors > size // 24:
                raise InputError(path, "header", f"claims {n_kv} metadata keys and {n_tensors} tensors in {size} bytes")
            for i in range(n_kv):
                key_at = take(u64(f"metadata key {i}"), f"metadata key {i}")
                key = bytes(buf[key_at:pos]).decode("utf-8", "replace")
                value(u32(key), key)
            for i in range(n_tensors):
                name_at = take(u64(f"tensor {i} name"), f"tensor {i} name")
                name = bytes(buf[name_at:pos]).decode("utf-8", "replace")
                n_dims = u32(name)
                if n_dims > 8:
                    raise InputError(path, name, f"{n_dims} dimensions")
                take(8 * n_dims + 12, name)  # dims, type, offset


def open_gguf(path: str | os.PathLike):
    """A GGUFReader, with every failure of a malformed file turned into an InputError."""
    import gguf

    size = os.path.getsize(path)
    check_gguf_header(path)
    try:
        reader = gguf.GGUFReader(path)
    except ValueError as e:
        if "magic" in str(e):
            raise InputError(path, "magic", "not a GGUF file (bad magic)") from None
        raise InputError(path, "header", f"malformed or truncated GGUF of {size} bytes (gguf: {e})") from None
    except (IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError, MemoryError) as e:
        raise InputError(
            path, "header", f"malformed or truncated GGUF of {size} bytes ({type(e).__name__}: {e})"
        ) from None
    alignment = int(reader.alignment)
    for tensor in reader.tensors:
        if (int(tensor.data_offset) - int(reader.data_offset)) % alignment:
            relative = int(tensor.data_offset) - int(reader.data_offset)
            raise InputError(
                path, tensor.name, f"data offset {relative} is not a multiple of the {alignment}-byte alignment"
            )
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != tensor.n_bytes:
            raise InputError(path, tensor.name, f"tensor data ends at byte {end} but the file has {size} bytes")
    return reader


def _float32_value(value: float) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.9999997e-06; keep the shortest decimal that round-trips."""
    return float(np.format_float_scientific(np.float32(value), unique=True))


def _get(fields: dict, key: str, path, default=None):
    if key not in fields:
        if default is None:
            raise InputError(path, key, "missing")
        return default
    try:
        return fields[key].contents()
    except Exception as e:  # malformed field: gguf raises ValueError/IndexError/UnicodeDecodeError
        raise InputError(path, key, f"unreadable value ({e})") from None


def spec_from_gguf(fields: dict, tensors: dict[str, tuple[int, ...]], path) -> ModelSpec:
    """Hyperparameters from the ``llama.*`` keys; tensors only decide tying and biases."""
    arch = _get(fields, "general.architecture", path)
    if arch != "llama":
        raise InputError(path, "general.architecture", f"unsupported {arch!r}; only 'llama' is supported")
    if _get(fields, "llama.expert_count", path, 0):
        raise InputError(path, "llama.expert_count", "mixture-of-experts models are not supported")
    scaling = _get(fields, "llama.rope.scaling.type", path, "none")
    if scaling != "none":
        raise InputError(path, "llama.rope.scaling.type", f"unsupported RoPE scaling {scaling!r}")

    def dim(key: str, default=None) -> int:
        return positive_int(_get(fields, key, path, default), path, key)

    hidden = dim("llama.embedding_length")
    heads = dim("llama.attention.head_count")
    kv_heads = dim("llama.attention.head_count_kv", heads)
    head_dim = dim("llama.attention.key_length", hidden // heads)
    if dim("llama.attention.value_length", head_dim) != head_dim:
        raise InputError(path, "llama.attention.value_length", "must equal the key length")
    if dim("llama.rope.dimension_count", head_dim) != head_dim:
        raise InputError(path, "llama.rope.dimension_count", "partial rotary embeddings are not supported")
    check_head_layout(path, heads=heads, kv_heads=kv_heads, head_dim=head_dim, fields=GGUF_FIELDS)
    embed = tensors.get("model.embed_tokens.weight")
    vocab_default = len(fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in fields else None
    vocab = dim("llama.vocab_size", vocab_default or (embed[0] if embed else None))
    eps_key, theta_key = "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base"
    bos = _get(fields, "tokenizer.ggml.bos_token_id", path, -1)
    eos = _get(fields, "tokenizer.ggml.eos_token_id", path, -1)
    return ModelSpec(
        family="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=dim("llama.feed_forward_length"),
        num_layers=dim("llama.block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float32_value(positive_float(_get(fields, eps_key, path), path, eps_key)),
        rope_theta=_float32_value(positive_float(_get(fields, theta_key, path, 10000.0), path, theta_key)),
        max_position_embeddings=dim("llama.context_length"),
        tie_word_embeddings="lm_head.weight" not in tensors,
        rope_interleaved=False,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
        bos_token_id=bos if bos >= 0 else None,
        eos_token_ids=(eos,) if eos >= 0 else (),
    )


class GGUFSource:
    """TensorSource over a GGUF file: dequantize on load, undo the Q/K permutation."""

    def __init__(self, reader, by_name: dict, spec: ModelSpec, path: str | os.PathLike | None = None):
        self._reader = reader
        self._path = path
        self._tensors = by_name  # canonical name -> ReaderTensor
        self._heads = {"q_proj": spec.num_heads, "k_proj": spec.num_kv_heads}

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def load(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        tensor = self._tensors[name]
        out = dequantize(tensor.data, tensor.tensor_type)  # (out, in) in torch Linear order
        if np.may_share_memory(out, tensor.data):  # F32 tensors come back as a view of the memory map
            out = np.array(out, dtype=np.float32, order="C")
        out = np.ascontiguousarray(out, dtype=np.float32).reshape(self.shape(name))
        projection = name.rsplit(".", 2)[-2]
        if projection in self._heads:
            out = unpermute_rows(out, self._heads[projection])
        return check_finite(out, self._path, tensor.name)

    def source_blocks(self, name: str) -> SourceBlocks:
        """The tensor's own integer codes, block scales and mins (no rounding: see
        quantlab.quant.gguf_blocks), rows un-permuted as :meth:`load` does; ``lm_head.weight`` of a tied
        model reads the embedding."""
        tensor = self._tensors[self._tied_head(name)]
        blocks = decode_blocks(tensor.data, tensor.tensor_type.name, self.shape(self._tied_head(name)))
        for array in (blocks.scales, blocks.mins):
            if array is not None:
                check_finite(array, self._path, tensor.name)
        projection = name.rsplit(".", 2)[-2]
        if projection in self._heads:
            blocks = blocks.map_rows(functools.partial(unpermute_rows, n_head=self._heads[projection]))
        return blocks

    def source_quantization(self, tied: bool) -> SourceQuantization:
        """Per linear (and the embedding), whether its GGUF quantization can be kept, and how."""
        types = {
            name.removesuffix(".weight"): self._tensors[name].tensor_type.name
            for name in self._tensors
            if name.endswith(".weight") and len(self._tensors[name].shape) == 2
        }
        return plan_source_quantization(types, lambda linear: self.source_blocks(f"{linear}.weight"), tied=tied)

    def _tied_head(self, name: str) -> str:
        return "model.embed_tokens.weight" if name == "lm_head.weight" and name not in self._tensors else name


def load_gguf(path: str | os.PathLike, *, tokenizer_path=None) -> Checkpoint:
    path = Path(path)
    reader = open_gguf(path)
    by_name = {}
    for tensor in reader.tensors:
        name = canonical_name(tensor.name)
        if name is None:
            raise InputError(path, tensor.name, "tensor not supported by this reader (e.g. rope_freqs, MoE experts)")
        by_name[name] = tensor
    shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in by_name.items()}
    spec = spec_from_gguf(reader.fields, shapes, path)
    unused = check_tensor_shapes(spec, shapes, config_path=path, fields=GGUF_FIELDS, weights_path=path)
    if unused:
        raise InputError(path, unused[0], "tensor not described by the llama.* metadata")
    if tokenizer_path is not None:
        tokenizer = tokenizer_spec_from_file(tokenizer_path, bos=spec.bos_token_id, eos=spec.eos_token_ids)
    else:
        tokenizer = gguf_tokenizer_spec(reader.fields, path)
    spec = with_tokenizer_ids(spec, tokenizer)
    ordered = {name: by_name[name] for name in spec.expected_shapes()}
    return Checkpoint(
        spec=spec,
        tensors=GGUFSource(reader, ordered, spec, path),
        tokenizer=tokenizer,
        source_format="gguf",
        source_files=(str(path),),
        hf_config=hf_config_for_spec(spec),
    )
