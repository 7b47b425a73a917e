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

and, where the spec says so:

    model.layers.{i}.{input,post_attention}_layernorm.bias, model.norm.bias   (hidden,)  norm_kind "layernorm"
    model.layers.{i}.{pre,post}_feedforward_layernorm.weight  (hidden,)   sandwich_norms
    model.layers.{i}.mlp.gate.weight               (experts, hidden)        i in moe_layers: the router
    model.layers.{i}.mlp.experts.{e}.gate_proj.weight  (moe_intermediate, hidden)   and up_proj, down_proj
                                                   (hidden, moe_intermediate); no dense mlp.* then
    (no mlp.gate_proj when not spec.mlp_gated)

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

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "nemotron", "gemma3")
NORM_KINDS = ("rms", "layernorm")
MLP_ACTIVATIONS = ("silu", "gelu_tanh", "relu2")


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
    # Norms: RMSNorm, or LayerNorm with a bias (Nemotron). Every norm scales by (w + norm_weight_offset):
    # Gemma's (1 + w) and Nemotron's "layernorm1p" store w - 1. Sandwich norms (Gemma 2/3) also normalize
    # each sublayer's output before the residual Add: post_attention_layernorm is then the attention output's
    # norm and pre_feedforward_layernorm the MLP's input norm.
    norm_kind: str = "rms"
    norm_weight_offset: float = 0.0
    sandwich_norms: bool = False
    # MLP: down(act(gate(x)) * up(x)) when gated, else down(act(up(x))); act silu, gelu_tanh or relu2 (relu(x)^2).
    mlp_activation: str = "silu"
    mlp_gated: bool = True
    # Sparse MoE MLP in the layers of moe_layers (a gated MLP per expert, of moe_intermediate_size): softmax
    # over the router logits, the top experts_per_token experts, their weights renormalized to sum 1 when
    # moe_normalize_topk (Mixtral, Qwen3-MoE's norm_topk_prob), the experts' outputs summed with those weights.
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    moe_normalize_topk: bool = True
    moe_layers: tuple[int, ...] = ()
    # RoPE rotates the leading rope_fraction of each head (Nemotron's partial_rotary_factor), half-split
    # within those dims; the rest pass through.
    rope_fraction: float = 1.0
    # The layers of sliding_layers attend to the sliding_window latest keys only (key j visible to query i
    # iff i - window < j <= i) and rotate with base sliding_rope_theta (None: rope_theta) (Gemma 3).
    sliding_window: int = 0
    sliding_layers: tuple[int, ...] = ()
    sliding_rope_theta: float | None = None
    attention_scale: float | None = None  # scores = q.k * attention_scale; None: 1 / sqrt(head_dim)
    attention_softcap: float = 0.0  # scores -> softcap * tanh(scores / softcap) before the mask; 0: none
    final_softcap: float = 0.0  # the same on the logits
    embedding_scale: float = 1.0  # the embedding rows are multiplied by this (Gemma: sqrt(hidden))

    def __post_init__(self):
        if self.norm_kind not in NORM_KINDS:
            raise ValueError(f"norm_kind must be one of {NORM_KINDS}, got {self.norm_kind!r}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"mlp_activation must be one of {MLP_ACTIVATIONS}, got {self.mlp_activation!r}")
        if self.moe_layers and not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token {self.experts_per_token} must be in [1, {self.num_experts}]")
        if self.moe_layers and not (self.mlp_gated and self.mlp_activation == "silu"):
            raise ValueError("MoE experts are SwiGLU MLPs (gated silu)")
        if self.sliding_layers and self.sliding_window <= 0:
            raise ValueError("sliding_layers need a positive sliding_window")
        if self.rotary_dim % 2 or self.rotary_dim <= 0:
            raise ValueError(
                f"rope_fraction {self.rope_fraction} of head_dim {self.head_dim} is not a positive even width"
            )

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE rotates (transformers: int(head_dim * factor))."""
        return int(self.head_dim * self.rope_fraction)

    def window_of(self, layer: int) -> int:
        """Layer ``layer``'s sliding window, 0 for full attention."""
        return self.sliding_window if layer in self.sliding_layers else 0

    def rope_theta_of(self, layer: int) -> float:
        if layer in self.sliding_layers and self.sliding_rope_theta is not None:
            return self.sliding_rope_theta
        return self.rope_theta

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
        for key in ("eos_token_ids", "moe_layers", "sliding_layers"):
            d[key] = tuple(d.get(key, ()))
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
        if self.norm_kind == "layernorm":
            shapes["model.norm.bias"] = (h,)
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            norms = ["input_layernorm", "post_attention_layernorm"]
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if self.sandwich_norms else []
            for norm in norms:
                shapes[p + norm + ".weight"] = (h,)
                if self.norm_kind == "layernorm":
                    shapes[p + norm + ".bias"] = (h,)
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
            if i in self.moe_layers:
                shapes[p + "mlp.gate.weight"] = (self.num_experts, h)
                for e in range(self.num_experts):
                    shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (self.moe_intermediate_size, h)
                    shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (self.moe_intermediate_size, h)
                    shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (h, self.moe_intermediate_size)
                continue
            if self.mlp_gated:
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
