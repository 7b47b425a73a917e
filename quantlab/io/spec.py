"""The normalized description of a decoder-only checkpoint that every reader produces.

Tensor names are canonical and follow the Hugging Face Llama layout whatever the source format:

    model.embed_tokens.weight                      (vocab, hidden)
    model.layers.{i}.input_layernorm.weight        (hidden,)
    model.layers.{i}.self_attn.q_proj.weight       (heads * head_dim, hidden)      torch Linear: (out, in)
    model.layers.{i}.self_attn.k_proj.weight       (kv_heads * head_dim, hidden)
    model.layers.{i}.self_attn.v_proj.weight       (kv_heads * head_dim, hidden)
    model.layers.{i}.self_attn.{q,k,v}_proj.bias   (out,)          only when spec.attention_bias
    model.layers.{i}.self_attn.o_proj.weight       (hidden, heads * head_dim)
    model.layers.{i}.self_attn.{q,k}_norm.weight   (head_dim,)     only when spec.qk_norm
    model.layers.{i}.post_attention_layernorm.weight (hidden,)
    model.layers.{i}.mlp.gate_proj.weight          (intermediate, hidden)
    model.layers.{i}.mlp.up_proj.weight            (intermediate, hidden)
    model.layers.{i}.mlp.down_proj.weight          (hidden, intermediate)
    model.norm.weight                              (hidden,)
    lm_head.weight                                 (vocab, hidden)  absent when spec.tie_word_embeddings

The rows of q_proj / k_proj are in the layout that ``spec.rope_interleaved`` names: False is the
Hugging Face half-split layout (rotate x[:d/2] with x[d/2:]), True is llama2.c's adjacent pairs
(rotate x[2i] with x[2i+1]). GGUF readers undo llama.cpp's permutation and report False.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelSpec:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_interleaved: bool = False
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ModelSpec keys: {sorted(unknown)}")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical tensor name -> shape, for every tensor this spec needs."""
        h, d = self.hidden_size, self.head_dim
        q, kv, ff = self.num_heads * d, self.num_kv_heads * d, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, h),
            "model.norm.weight": (h,),
        }
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            shapes[p + "self_attn.q_proj.weight"] = (q, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, q)
            if self.attention_bias:
                shapes[p + "self_attn.q_proj.bias"] = (q,)
                shapes[p + "self_attn.k_proj.bias"] = (kv,)
                shapes[p + "self_attn.v_proj.bias"] = (kv,)
            if self.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = (d,)
                shapes[p + "self_attn.k_norm.weight"] = (d,)
            shapes[p + "mlp.gate_proj.weight"] = (ff, h)
            shapes[p + "mlp.up_proj.weight"] = (ff, h)
            shapes[p + "mlp.down_proj.weight"] = (h, ff)
        return shapes


class TensorSource(Protocol):
    """Lazy access to a checkpoint's tensors under canonical names.

    ``load`` reads one tensor from disk and returns a fresh, C-contiguous float32 array; nothing is
    cached, so a converter that loads, writes and drops one tensor at a time holds one tensor.
    """

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def load(self, name: str) -> np.ndarray: ...


@dataclass(frozen=True)
class TokenizerSpec:
    """Where the checkpoint's tokenizer comes from.

    kind:
      ``hf-json``       ``content`` holds a Hugging Face ``tokenizer.json`` document (str)
      ``llama2c``       ``path`` is a llama2.c ``tokenizer.bin``
      ``sentencepiece`` ``path`` is a SentencePiece ``.model``
    """

    kind: str
    content: str | None = None
    path: str | None = None
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra_files: tuple[str, ...] = ()  # e.g. tokenizer_config.json to copy next to tokenizer.json


@dataclass(frozen=True)
class PreQuantized:
    """Integer codes a checkpoint already carries (a quantization-aware distilled student).

    ``weights``: linear name -> quantlab.quant.rtn.QuantizedWeight, exported as they are (no
    re-rounding); ``recipe``: the recipe (file schema) they were trained for; ``path``: where they came
    from, for error messages.
    """

    recipe: dict
    weights: dict
    path: str


@dataclass(frozen=True)
class Checkpoint:
    spec: ModelSpec
    tensors: TensorSource
    tokenizer: TokenizerSpec | None
    source_format: str  # "hf-safetensors" | "gguf" | "llama2c" | "torch-pickle"
    source_files: tuple[str, ...] = field(default=())
    hf_config: dict | None = None  # the config.json to emit for Hugging Face clients, when known
    prequantized: PreQuantized | None = None  # integer codes to export as they are (quantlab distill)

    def source_sha256(self) -> dict[str, str]:
        return {os.path.basename(p): sha256_file(p) for p in self.source_files}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
