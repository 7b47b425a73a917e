"""GGUF checkpoints of the ``llama`` (dense, or Mixtral's ``*_exps`` experts), ``qwen3moe`` and ``gemma3``
architectures, read with the ``gguf`` package.

The reader memory-maps the file; a tensor is dequantized to float32 only when it is loaded. Each
architecture is a row of :data:`ARCHITECTURES`: what llama.cpp's converter (convert_hf_to_gguf.py) did
to the Hugging Face tensors, undone here so the canonical tensors and the ModelSpec are those the HF
reader produces for the same model:

- ``llama`` stores ``attn_q`` / ``attn_k`` rows permuted for its adjacent-pair RoPE; :func:`unpermute_rows`
  undoes that (the other architectures use llama.cpp's NEOX RoPE, the half-split layout, unpermuted).
- Gemma stores every ``*norm.weight`` as ``1 + w`` (computed in float32; the 270M file's values need 11
  significant bits, so not bf16); the reader subtracts the 1 again (exact in float32 by Sterbenz'
  lemma for values in [0.5, 2] and exact above that), and the spec's ``norm_weight_offset`` adds it back.
- Experts are stacked as one tensor per projection, ``(experts, out, in)``; each expert's slice is its
  own canonical ``mlp.experts.{e}.*_proj.weight``. A layer is an MoE layer iff it has the stacked tensors.
- Hyperparameters llama.cpp does not read from the file are set as llama.cpp sets them (llama-model.cpp),
  since llama.cpp is what the file was made for: Gemma 3's every sixth layer global and the others
  sliding (unless ``{arch}.attention.sliding_window_pattern`` says), the sliding layers' RoPE base 10000
  (unless ``{arch}.rope.freq_base_swa`` says), attention scale 1/sqrt(key_length) (1/sqrt(hidden/heads)
  for the 62-layer 27B), and the MoE top-k weights always renormalized (llama and qwen3moe).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

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
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
}
# Sandwich norms (Gemma 2/3): llama.cpp's ffn_norm is the MLP's input norm, post_attention_norm the attention
# output's, which Hugging Face calls pre_feedforward_layernorm and post_attention_layernorm.
SANDWICH_NAMES = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# stacked expert tensors (experts, out, in) -> the projection of each mlp.experts.{e}
EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclass(frozen=True)
class GGUFArchitecture:
    """What llama.cpp's converter did to one architecture's tensors and which keys describe it."""

    family: str  # ModelSpec.family of a dense model
    moe_family: str | None = None  # ModelSpec.family when the file has expert tensors; None: experts refused
    permuted_qk: bool = False  # attn_q / attn_k rows permuted for adjacent-pair RoPE (llama only)
    norm_shift: float = 0.0  # every *norm.weight stored as w + norm_shift (Gemma: 1)
    qk_norm: bool = False
    sandwich_norms: bool = False
    mlp_activation: str = "silu"
    embedding_scaled: bool = False  # embeddings x sqrt(hidden), in float32 as llama.cpp does
    swa_pattern: int = 0  # n > 0: layer i slides iff i % n < n - 1 when the file names a sliding window
    swa_rope_theta: float = 10000.0  # the sliding layers' RoPE base unless {arch}.rope.freq_base_swa says
    layer_names: dict = field(default_factory=dict)  # overrides of LAYER_NAMES


ARCHITECTURES = {
    "llama": GGUFArchitecture("llama", moe_family="mixtral", permuted_qk=True),
    "qwen3moe": GGUFArchitecture("qwen3_moe", moe_family="qwen3_moe", qk_norm=True),
    "gemma3": GGUFArchitecture(
        "gemma3",
        norm_shift=1.0,
        qk_norm=True,
        sandwich_norms=True,
        mlp_activation="gelu_tanh",
        embedding_scaled=True,
        swa_pattern=6,
        layer_names=SANDWICH_NAMES,
    ),
}
# The header fields behind each dimension symbol, for error messages ({arch} is the file's architecture).
GGUF_FIELDS = {
    "vocab": "{arch}.vocab_size",
    "hidden": "{arch}.embedding_length",
    "q": "{arch}.attention.head_count",
    "kv": "{arch}.attention.head_count_kv",
    "head_dim": "{arch}.attention.key_length",
    "ff": "{arch}.feed_forward_length",
    "experts": "{arch}.expert_count",
    "moe_ff": "{arch}.expert_feed_forward_length",
}


def fields_of(arch: str) -> dict[str, str]:
    return {symbol: key.format(arch=arch) for symbol, key in GGUF_FIELDS.items()}


class _Entry(NamedTuple):
    tensor: object  # gguf ReaderTensor
    expert: int | None  # the slice of a stacked expert tensor, or None


def canonical_name(gguf_name: str, arch: GGUFArchitecture = ARCHITECTURES["llama"]) -> str | None:
    """The canonical name of a GGUF tensor (for a stacked expert tensor: with ``{e}`` for the expert)."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in GLOBAL_NAMES and suffix == "weight":
        return f"{GLOBAL_NAMES[base]}.weight"
    match = _LAYER_TENSOR.match(gguf_name)
    if not match:
        return None
    layer, kind, suffix = match.groups()
    if kind in EXPERT_NAMES and suffix == "weight":
        return f"model.layers.{layer}.mlp.experts.{{e}}.{EXPERT_NAMES[kind]}.weight"
    name = arch.layer_names.get(kind, LAYER_NAMES.get(kind))
    return None if name is None else f"model.layers.{layer}.{name}.{suffix}"


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


@functools.cache
def _fast_reader_class():
    """gguf.GGUFReader with array metadata parsed in bulk (same fields, parts and indices).

    The package parses an array one element at a time through slices of its np.memmap, whose every slice
    runs memmap.__array_finalize__: Gemma 3's 262144 tokens, scores and types take 12 s of a 13 s open.
    Here each array's elements become slices of a plain ndarray view of the same bytes (one element per
    part, as the package lays them out), about a second for all three. Files in the other byte order and
    arrays of arrays take the package's own path. check_gguf_header has bounded every count beforehand.
    """
    import gguf

    class FastGGUFReader(gguf.GGUFReader):
        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            plain = self.data.view(np.ndarray)  # (file bytes,) uint8, no memmap subclass
            raw_itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            itype, count, offs = gguf.GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
            parts, types = [raw_itype, alen], [gguf.GGUFValueType.ARRAY, itype]
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is not None:
                width = np.dtype(nptype).itemsize
                values = plain[offs : offs + width * count].view(nptype)  # (count,)
                parts += [values[i : i + 1] for i in range(count)]
                offs += width * count
            elif itype == gguf.GGUFValueType.STRING:
                for _ in range(count):
                    length = plain[offs : offs + 8].view(np.uint64)
                    end = offs + 8 + int(length[0])
                    parts += [length, plain[offs + 8 : end]]
                    offs = end
                if offs > len(plain):
                    raise ValueError("string array runs past the end of the file")
            else:
                return super()._get_field_parts(orig_offs, raw_type)
            step = 2 if itype == gguf.GGUFValueType.STRING else 1
            return offs - orig_offs, parts, list(range(1 + step, len(parts), step)), types

    return FastGGUFReader


def open_gguf(path: str | os.PathLike):
    """A GGUFReader, with every failure of a malformed file turned into an InputError."""
    size = os.path.getsize(path)
    check_gguf_header(path)
    try:
        reader = _fast_reader_class()(path)
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


def architecture_of(fields: dict, path) -> tuple[str, GGUFArchitecture]:
    arch = _get(fields, "general.architecture", path)
    if arch not in ARCHITECTURES:
        raise InputError(path, "general.architecture", f"unsupported {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    return arch, ARCHITECTURES[arch]


def _moe_fields(fields: dict, experts: dict[int, tuple[int, ...]], arch: str, row: GGUFArchitecture, path) -> dict:
    """The ModelSpec fields of the expert layers; ``experts``: layer -> its stacked gate tensor's shape
    (experts, moe_intermediate, hidden)."""
    count_key, used_key = f"{arch}.expert_count", f"{arch}.expert_used_count"
    count = _get(fields, count_key, path, 0)
    if not experts:
        if count:
            raise InputError(path, count_key, f"{count} experts, but the file has no ffn_*_exps tensors")
        return {}
    if row.moe_family is None:
        raise InputError(path, count_key, f"mixture-of-experts {arch!r} files are not supported")
    layer, shape = next(iter(experts.items()))
    count = positive_int(_get(fields, count_key, path), path, count_key)
    for i, got in experts.items():
        if got[0] != count:
            name = f"blk.{i}.ffn_gate_exps.weight"
            raise InputError(path, name, f"stacks {got[0]} experts, {count_key} says {count}")
    used = positive_int(_get(fields, used_key, path), path, used_key)
    if used > count:
        raise InputError(path, used_key, f"{used} is more than the {count} experts")
    size_key = f"{arch}.expert_feed_forward_length"
    size = positive_int(_get(fields, size_key, path, shape[1]), path, size_key)
    return {
        "family": row.moe_family,
        "num_experts": count,
        "experts_per_token": used,
        "moe_intermediate_size": size,
        # llama.cpp renormalizes the top-k weights for llama and qwen3moe unless a file says otherwise
        "moe_normalize_topk": bool(_get(fields, f"{arch}.expert_weights_norm", path, True)),
        "moe_layers": tuple(sorted(experts)),
    }


def _sliding_fields(fields: dict, arch: str, row: GGUFArchitecture, layers: int, hidden: int, heads: int, path):
    """Gemma 3's sliding layers, their RoPE base, the attention scale and the logits' soft-capping."""
    if not row.swa_pattern:
        return {}
    window_key = f"{arch}.attention.sliding_window"
    window = positive_int(_get(fields, window_key, path, 0), path, window_key, allow_zero=True)
    pattern_key = f"{arch}.attention.sliding_window_pattern"
    pattern = _get(fields, pattern_key, path, row.swa_pattern)
    if isinstance(pattern, list):  # one flag per layer, true: sliding
        if len(pattern) != layers or not all(isinstance(flag, bool) for flag in pattern):
            raise InputError(path, pattern_key, f"expected {layers} true/false flags or a period")
        sliding = tuple(i for i, flag in enumerate(pattern) if flag)
    else:  # every n-th layer global (llama.cpp's set_swa_pattern)
        n = positive_int(pattern, path, pattern_key)
        sliding = tuple(i for i in range(layers) if i % n < n - 1)
    sliding = sliding if window else ()
    theta_key = f"{arch}.rope.freq_base_swa"
    theta = _float32_value(positive_float(_get(fields, theta_key, path, row.swa_rope_theta), path, theta_key))
    head_dim = _get(fields, f"{arch}.attention.key_length", path, hidden // heads)
    scalar = hidden // heads if layers == 62 else head_dim  # llama.cpp's rule: the 27B scales by hidden / heads
    cap_key = f"{arch}.final_logit_softcapping"
    cap = _get(fields, cap_key, path, 0.0)
    return {
        "sliding_window": window if sliding else 0,
        "sliding_layers": sliding,
        "sliding_rope_theta": theta if sliding else None,
        "attention_scale": float(scalar**-0.5),
        "final_softcap": _float32_value(positive_float(cap, path, cap_key)) if cap else 0.0,
    }


def spec_from_gguf(fields: dict, tensors: dict[str, tuple[int, ...]], path) -> ModelSpec:
    """Hyperparameters from the ``{arch}.*`` keys; tensors decide tying, biases and which layers are MoE.

    ``tensors``: canonical name -> shape, a stacked expert tensor under its ``{e}`` name as
    (experts, out, in)."""
    arch, row = architecture_of(fields, path)
    scaling = _get(fields, f"{arch}.rope.scaling.type", path, "none")
    if scaling != "none":
        raise InputError(path, f"{arch}.rope.scaling.type", f"unsupported RoPE scaling {scaling!r}")

    def dim(key: str, default=None) -> int:
        return positive_int(_get(fields, f"{arch}.{key}", path, default), path, f"{arch}.{key}")

    hidden = dim("embedding_length")
    heads = dim("attention.head_count")
    kv_heads = dim("attention.head_count_kv", heads)
    head_dim = dim("attention.key_length", hidden // heads)
    if dim("attention.value_length", head_dim) != head_dim:
        raise InputError(path, f"{arch}.attention.value_length", "must equal the key length")
    if dim("rope.dimension_count", head_dim) != head_dim:
        raise InputError(path, f"{arch}.rope.dimension_count", "partial rotary embeddings are not supported")
    check_head_layout(path, heads=heads, kv_heads=kv_heads, head_dim=head_dim, fields=fields_of(arch))
    layers = dim("block_count")
    embed = tensors.get("model.embed_tokens.weight")
    vocab_default = len(fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in fields else None
    vocab = dim("vocab_size", vocab_default or (embed[0] if embed else None))
    eps_key, theta_key = f"{arch}.attention.layer_norm_rms_epsilon", f"{arch}.rope.freq_base"
    bos = _get(fields, "tokenizer.ggml.bos_token_id", path, -1)
    eos = _get(fields, "tokenizer.ggml.eos_token_id", path, -1)
    experts = {}
    for name, shape in tensors.items():
        if name.endswith(".mlp.experts.{e}.gate_proj.weight"):
            experts[int(name.split(".")[2])] = shape
    extra = {
        **_moe_fields(fields, experts, arch, row, path),
        **_sliding_fields(fields, arch, row, layers, hidden, heads, path),
    }
    if row.embedding_scaled:
        extra["embedding_scale"] = float(np.float32(hidden**0.5))
    return ModelSpec(
        **{"family": row.family, **extra},
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=dim("feed_forward_length"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float32_value(positive_float(_get(fields, eps_key, path), path, eps_key)),
        rope_theta=_float32_value(positive_float(_get(fields, theta_key, path, 10000.0), path, theta_key)),
        max_position_embeddings=dim("context_length"),
        tie_word_embeddings="lm_head.weight" not in tensors,
        rope_interleaved=False,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
        qk_norm=row.qk_norm,
        bos_token_id=bos if bos >= 0 else None,
        eos_token_ids=(eos,) if eos >= 0 else (),
        norm_weight_offset=row.norm_shift,
        sandwich_norms=row.sandwich_norms,
        mlp_activation=row.mlp_activation,
    )


class GGUFSource:
    """TensorSource over a GGUF file: dequantize on load, undo the converter's Q/K permutation and norm
    shift, slice stacked experts."""

    def __init__(
        self,
        reader,
        by_name: dict[str, _Entry],
        spec: ModelSpec,
        path: str | os.PathLike | None = None,
        arch: GGUFArchitecture = ARCHITECTURES["llama"],
    ):
        self._reader = reader
        self._path = path
        self._tensors = by_name  # canonical name -> _Entry
        self._heads = {"q_proj": spec.num_heads, "k_proj": spec.num_kv_heads} if arch.permuted_qk else {}
        self._norm_shift = np.float32(arch.norm_shift)

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        entry = self._tensors[name]
        shape = tuple(int(d) for d in reversed(entry.tensor.shape))
        return shape if entry.expert is None else shape[1:]

    def _data(self, name: str):
        entry = self._tensors[name]
        return entry.tensor.data if entry.expert is None else entry.tensor.data[entry.expert]

    def load(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        tensor = self._tensors[name].tensor
        out = dequantize(self._data(name), tensor.tensor_type)  # (out, in) in torch Linear order
        if np.may_share_memory(out, tensor.data):  # F32 tensors come back as a view of the memory map
            out = np.array(out, dtype=np.float32, order="C")
        out = np.ascontiguousarray(out, dtype=np.float32).reshape(self.shape(name))
        projection = name.rsplit(".", 2)[-2]
        if projection in self._heads:
            out = unpermute_rows(out, self._heads[projection])
        if self._norm_shift and name.endswith("norm.weight"):
            out -= self._norm_shift
        return check_finite(out, self._path, tensor.name)

    def source_blocks(self, name: str) -> SourceBlocks:
        """The tensor's own integer codes, block scales and mins (no rounding: see
        quantlab.quant.gguf_blocks), rows un-permuted as :meth:`load` does; ``lm_head.weight`` of a tied
        model reads the embedding."""
        name = self._tied_head(name)
        tensor = self._tensors[name].tensor
        blocks = decode_blocks(self._data(name), tensor.tensor_type.name, self.shape(name))
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
            name.removesuffix(".weight"): entry.tensor.tensor_type.name
            for name, entry in self._tensors.items()
            if name.endswith(".weight") and len(self.shape(name)) == 2
        }
        return plan_source_quantization(types, lambda linear: self.source_blocks(f"{linear}.weight"), tied=tied)

    def _tied_head(self, name: str) -> str:
        return "model.embed_tokens.weight" if name == "lm_head.weight" and name not in self._tensors else name


def load_gguf(path: str | os.PathLike, *, tokenizer_path=None) -> Checkpoint:
    path = Path(path)
    reader = open_gguf(path)
    arch, row = architecture_of(reader.fields, path)
    stacked = {}  # canonical name with {e} -> ReaderTensor
    for tensor in reader.tensors:
        name = canonical_name(tensor.name, row)
        if name is None:
            raise InputError(path, tensor.name, f"tensor not supported by this reader of {arch!r} files")
        if name in stacked:
            raise InputError(path, tensor.name, "appears twice")
        stacked[name] = tensor
    shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in stacked.items()}
    spec = spec_from_gguf(reader.fields, shapes, path)
    by_name: dict[str, _Entry] = {}
    for name, tensor in stacked.items():
        if "{e}" not in name:
            by_name[name] = _Entry(tensor, None)
            continue
        if len(shapes[name]) != 3 or shapes[name][0] != spec.num_experts:
            raise InputError(path, tensor.name, f"shape {list(shapes[name])} is no stack of {spec.num_experts} experts")
        by_name.update({name.format(e=e): _Entry(tensor, e) for e in range(spec.num_experts)})
    source = GGUFSource(reader, by_name, spec, path, row)
    shapes = {name: source.shape(name) for name in by_name}
    unused = check_tensor_shapes(spec, shapes, config_path=path, fields=fields_of(arch), weights_path=path)
    if unused:
        raise InputError(path, unused[0], f"tensor not described by the {arch}.* metadata")
    if tokenizer_path is not None:
        tokenizer = tokenizer_spec_from_file(tokenizer_path, bos=spec.bos_token_id, eos=spec.eos_token_ids)
    else:
        tokenizer = gguf_tokenizer_spec(reader.fields, path)
    spec = with_tokenizer_ids(spec, tokenizer)
    ordered = {name: by_name[name] for name in spec.expected_shapes()}
    return Checkpoint(
        spec=spec,
        tensors=GGUFSource(reader, ordered, spec, path, row),
        tokenizer=tokenizer,
        source_format="gguf",
        source_files=(str(path),),
        # config.json for Hugging Face clients: written for the dense llama family only
        hf_config=hf_config_for_spec(spec) if spec.family == "llama" else None,
    )
