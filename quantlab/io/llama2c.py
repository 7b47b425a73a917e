"""llama2.c checkpoints (karpathy/llama2.c ``export.py``) and its ``tokenizer.bin``.

Checkpoint versions:

    v0 (legacy)  7 x int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
                 (vocab_size < 0: an untied classifier is stored last), then fp32 tensors in run.c's
                 order: embedding, per-kind stacks over layers, final norm, two unused RoPE tables
                 (seq_len x head_size/2 floats each), classifier if untied.
    v1 ("ak42")  256-byte header: uint32 magic 0x616b3432, int32 version, the 7 int32 params,
                 uint8 shared_classifier, zero padding; fp32 norms, then fp32 matrices, no RoPE tables.
    v2 ("ak42")  as v1 plus int32 group_size at byte 37; fp32 norms, then int8 Q8_0 values of every
                 matrix, then all their fp32 scales (one per group of group_size values), same order.

The computed byte size must equal the file size exactly. Weights keep llama2.c's adjacent-pair
RoPE layout, so the spec reports ``rope_interleaved=True``.

tokenizer.bin: int32 max_token_length, then per token float32 score, int32 length, the bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantlab.errors import InputError
from quantlab.io.common import MAX_DIM, check_finite, check_tensor_shapes, hf_config_for_spec, tokenizer_spec_from_file
from quantlab.io.spec import Checkpoint, ModelSpec, TokenizerSpec

logger = logging.getLogger(__name__)

MAGIC = 0x616B3432  # "ak42"
HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
NEW_HEADER_BYTES = 256
LEGACY_HEADER_BYTES = 28
BOS_ID, EOS_ID = 1, 2
# The header fields behind each dimension symbol, for error messages.
FIELDS = {
    "vocab": "vocab_size",
    "hidden": "dim",
    "q": "n_heads",
    "kv": "n_kv_heads",
    "head_dim": "n_heads",
    "ff": "hidden_dim",
}

# llama2.c weight kind -> canonical name suffix inside model.layers.{i}.
LAYER_KINDS = {
    "attention_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "w1": "mlp.gate_proj.weight",
    "w2": "mlp.down_proj.weight",
    "w3": "mlp.up_proj.weight",
}
MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass(frozen=True)
class Llama2cHeader:
    version: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    group_size: int | None = None

    @property
    def header_bytes(self) -> int:
        return LEGACY_HEADER_BYTES if self.version == 0 else NEW_HEADER_BYTES

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives: fp32 at ``offset``, or int8 at ``offset`` with fp32 group scales."""

    shape: tuple[int, ...]
    offset: int
    scale_offset: int | None = None


def read_header(path: Path, size: int) -> Llama2cHeader:
    with open(path, "rb") as f:
        head = f.read(NEW_HEADER_BYTES)
    if len(head) < LEGACY_HEADER_BYTES:
        raise InputError(path, "header", f"file is {size} bytes, shorter than a llama2.c header")
    (magic,) = struct.unpack_from("<I", head, 0)
    if magic == MAGIC:
        if len(head) < NEW_HEADER_BYTES:
            raise InputError(path, "header", f"file is {size} bytes, shorter than the 256-byte header")
        (version,) = struct.unpack_from("<i", head, 4)
        if version not in (1, 2):
            raise InputError(path, "version", f"unsupported llama2.c version {version}; supported: 0, 1, 2")
        params = struct.unpack_from("<7i", head, 8)
        shared = head[36]
        if shared not in (0, 1):
            raise InputError(path, "shared_classifier", f"expected 0 or 1, got {shared}")
        group_size = struct.unpack_from("<i", head, 37)[0] if version == 2 else None
        header = Llama2cHeader(version, *params, shared_classifier=bool(shared), group_size=group_size)
    else:
        params = struct.unpack_from("<7i", head, 0)
        # The legacy format flags an untied classifier with a negative vocab size.
        header = Llama2cHeader(0, *params[:5], abs(params[5]), params[6], shared_classifier=params[5] > 0)
    _check_header(path, header)
    return header


def _check_header(path, h: Llama2cHeader) -> None:
    for name in HEADER_FIELDS:
        value = getattr(h, name)
        if not 0 < value <= MAX_DIM:
            raise InputError(path, name, f"must be in [1, {MAX_DIM}], got {value}")
    if h.dim % h.n_heads:
        raise InputError(path, "n_heads", f"dim {h.dim} is not divisible by n_heads {h.n_heads}")
    if h.n_heads % h.n_kv_heads:
        raise InputError(path, "n_kv_heads", f"n_heads {h.n_heads} is not a multiple of n_kv_heads {h.n_kv_heads}")
    if h.head_size % 2:
        raise InputError(path, "n_heads", f"head size {h.head_size} must be even for rotary embeddings")
    if h.group_size is None:
        return
    if not 0 < h.group_size <= MAX_DIM:
        raise InputError(path, "group_size", f"must be positive, got {h.group_size}")
    shapes = _shapes(h)
    for kind in _order(h)[1]:
        if int(np.prod(shapes[kind])) % h.group_size:
            raise InputError(path, "group_size", f"{h.group_size} does not divide the {kind} tensor {shapes[kind]}")


def _shapes(h: Llama2cHeader) -> dict[str, tuple[int, ...]]:
    kv_dim = h.n_kv_heads * h.head_size
    return {
        "embedding": (h.vocab_size, h.dim),
        "attention_norm": (h.dim,),
        "ffn_norm": (h.dim,),
        "norm": (h.dim,),
        "wq": (h.dim, h.dim),
        "wk": (kv_dim, h.dim),
        "wv": (kv_dim, h.dim),
        "wo": (h.dim, h.dim),
        "w1": (h.hidden_dim, h.dim),
        "w2": (h.dim, h.hidden_dim),
        "w3": (h.hidden_dim, h.dim),
        "rope_table": (h.seq_len, h.head_size // 2),
        "output": (h.vocab_size, h.dim),
    }


def _order(h: Llama2cHeader) -> tuple[list[str], list[str]]:
    """(fp32 kinds, Q8_0 kinds) in file order; per-layer kinds repeat over the layers."""
    classifier = [] if h.shared_classifier else ["output"]
    if h.version == 0:
        kinds = ["embedding", "attention_norm", *MATRICES[:4], "ffn_norm", *MATRICES[4:]]
        return [*kinds, "norm", "rope_table", "rope_table", *classifier], []
    matrices = ["embedding", *MATRICES, *classifier]
    if h.version == 1:
        return ["attention_norm", "ffn_norm", "norm", *matrices], []
    return ["attention_norm", "ffn_norm", "norm"], matrices


def _names(kind: str, h: Llama2cHeader) -> list[str | None]:
    if kind in LAYER_KINDS:
        return [f"model.layers.{i}.{LAYER_KINDS[kind]}" for i in range(h.n_layers)]
    return [
        {"embedding": "model.embed_tokens.weight", "norm": "model.norm.weight", "output": "lm_head.weight"}.get(kind)
    ]


def layout(h: Llama2cHeader) -> tuple[dict[str, Slot], int]:
    """(canonical name -> slot, expected file size in bytes)."""
    shapes = _shapes(h)
    slots: dict[str, Slot] = {}
    offset = h.header_bytes
    fp32_kinds, q8_kinds = _order(h)
    for kind in fp32_kinds:
        for name in _names(kind, h):
            if name is not None:
                slots[name] = Slot(shapes[kind], offset)
            offset += 4 * int(np.prod(shapes[kind]))
    quantized = [(name, shapes[kind]) for kind in q8_kinds for name in _names(kind, h)]
    scale_offset = offset + sum(int(np.prod(shape)) for _, shape in quantized)
    for name, shape in quantized:
        count = int(np.prod(shape))
        slots[name] = Slot(shape, offset, scale_offset)
        offset += count
        scale_offset += 4 * (count // h.group_size)
    return slots, scale_offset if quantized else offset


def expected_size(h: Llama2cHeader) -> int:
    """The file size ``layout(h)`` implies, by arithmetic: no per-tensor slots for a header to inflate."""
    shapes = _shapes(h)
    fp32_kinds, q8_kinds = _order(h)

    def copies(kind: str) -> int:
        return h.n_layers if kind in LAYER_KINDS else 1

    size = h.header_bytes + sum(4 * copies(k) * int(np.prod(shapes[k])) for k in fp32_kinds)
    for kind in q8_kinds:
        count = int(np.prod(shapes[kind]))
        size += copies(kind) * (count + 4 * (count // h.group_size))
    return size


def _check_size(path, h: Llama2cHeader, size: int) -> dict[str, Slot]:
    # Size first, by arithmetic: a header claiming 16M layers must not make us build 16M slots.
    expected = expected_size(h)
    if expected == size:
        slots, laid_out = layout(h)
        assert laid_out == size
        return slots
    flipped = dataclasses.replace(h, shared_classifier=not h.shared_classifier)
    if expected_size(flipped) == size:
        field = "vocab_size" if h.version == 0 else "shared_classifier"
        said = "shared with the embedding" if h.shared_classifier else "stored separately"
        raise InputError(path, field, f"says the classifier is {said}, but the file size ({size}) says otherwise")
    raise InputError(
        path,
        "header",
        f"{', '.join(f'{k}={getattr(h, k)}' for k in HEADER_FIELDS)} imply {expected} bytes "
        f"but the file has {size}; a header field or the file is wrong (truncated?)",
    )


class Llama2cSource:
    """TensorSource over a llama2.c file: one ``np.fromfile`` per tensor (plus its scales for Q8_0)."""

    def __init__(self, path: Path, slots: dict[str, Slot], group_size: int | None):
        self._path = path
        self._slots = slots
        self._group_size = group_size

    def names(self) -> list[str]:
        return list(self._slots)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._slots[name].shape

    def load(self, name: str) -> np.ndarray:
        slot = self._slots[name]
        count = int(np.prod(slot.shape))
        if slot.scale_offset is None:
            out = np.fromfile(self._path, dtype="<f4", count=count, offset=slot.offset)
            return check_finite(out.astype(np.float32, copy=False).reshape(slot.shape), self._path, name)
        gs = self._group_size
        values = np.fromfile(self._path, dtype=np.int8, count=count, offset=slot.offset)
        scales = np.fromfile(self._path, dtype="<f4", count=count // gs, offset=slot.scale_offset)
        out = values.reshape(-1, gs).astype(np.float32)  # (groups, group_size)
        out *= scales[:, None]
        return check_finite(out.reshape(slot.shape), self._path, name)


@dataclass(frozen=True)
class Llama2cVocab:
    max_token_length: int
    pieces: list[bytes]
    scores: list[float]


def read_llama2c_tokenizer(path: str | os.PathLike) -> Llama2cVocab:
    """Parse and validate a llama2.c ``tokenizer.bin``; the token count is whatever the file holds."""
    data = Path(path).read_bytes()
    if len(data) < 4:
        raise InputError(path, "max_token_length", "file too short for a llama2.c tokenizer")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_len <= 1 << 16:
        raise InputError(path, "max_token_length", f"must be positive, got {max_len}")
    pieces, scores, offset = [], [], 4
    while offset < len(data):
        if offset + 8 > len(data):
            raise InputError(path, f"token {len(pieces)}", "record truncated")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if not 0 <= length <= max_len or offset + length > len(data):
            raise InputError(path, f"token {len(pieces)}", f"length {length} is invalid (max {max_len})")
        pieces.append(data[offset : offset + length])
        scores.append(score)
        offset += length
    return Llama2cVocab(max_len, pieces, scores)


def find_tokenizer(model_path: Path, vocab_size: int, tokenizer_path=None) -> TokenizerSpec | None:
    eos = (EOS_ID,)
    if tokenizer_path is not None and Path(tokenizer_path).suffix in (".json", ".model"):
        return tokenizer_spec_from_file(tokenizer_path, bos=BOS_ID, eos=eos)
    if tokenizer_path is None:
        candidates = [model_path.parent / "tokenizer.bin", model_path.parent / f"tok{vocab_size}.bin"]
        tokenizer_path = next((p for p in candidates if p.is_file()), None)
        if tokenizer_path is None:
            logger.warning("%s: no tokenizer.bin or tok%d.bin beside it; no tokenizer", model_path, vocab_size)
            return None
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise InputError(tokenizer_path, None, "tokenizer file not found")
    vocab = read_llama2c_tokenizer(tokenizer_path)
    if len(vocab.pieces) != vocab_size:
        raise InputError(tokenizer_path, "vocab_size", f"{len(vocab.pieces)} tokens but the model has {vocab_size}")
    models = [tokenizer_path.with_suffix(".model"), tokenizer_path.parent / "tokenizer.model"]
    extra = tuple(str(p) for p in models if p.is_file())[:1]  # the SentencePiece twin, when there is one
    return TokenizerSpec(
        kind="llama2c", path=str(tokenizer_path), bos_token_id=BOS_ID, eos_token_ids=eos, extra_files=extra
    )


def load_llama2c(path: str | os.PathLike, *, tokenizer_path=None) -> Checkpoint:
    path = Path(path)
    size = path.stat().st_size
    header = read_header(path, size)
    slots = _check_size(path, header, size)
    spec = ModelSpec(
        family="llama",
        vocab_size=header.vocab_size,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_layers=header.n_layers,
        num_heads=header.n_heads,
        num_kv_heads=header.n_kv_heads,
        head_dim=header.head_size,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=header.seq_len,
        tie_word_embeddings=header.shared_classifier,
        rope_interleaved=True,
        bos_token_id=BOS_ID,
        eos_token_ids=(EOS_ID,),
    )
    check_tensor_shapes(
        spec, {n: s.shape for n, s in slots.items()}, config_path=path, fields=FIELDS, weights_path=path
    )
    names = list(spec.expected_shapes())
    return Checkpoint(
        spec=spec,
        tensors=Llama2cSource(path, {n: slots[n] for n in names}, header.group_size),
        tokenizer=find_tokenizer(path, header.vocab_size, tokenizer_path),
        source_format="llama2c",
        source_files=(str(path),),
        hf_config=hf_config_for_spec(spec),
    )
