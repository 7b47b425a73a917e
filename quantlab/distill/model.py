"""The decoder of a ModelSpec as a trainable PyTorch module, for the teacher and the student alike.

The maths is quantlab/graph_builder/decoder.py's (and quantlab/runtime/torch_decoder.py's), run over whole
sequences with no KV cache, the way training needs it: RMSNorm, RoPE in the checkpoint's own layout
(llama2.c's adjacent pairs when ``spec.rope_interleaved``, else the Hugging Face half split), Llama 3
frequency scaling, grouped-query attention, optional q/k bias and q/k RMSNorm, SwiGLU, a tied or an
untied head. A test holds its logits to onnxruntime's on the graph quantlab builds from the same
weights.

Weights are kept under their canonical names (quantlab/io/spec.py). Each linear is a module
(:class:`~quantlab.distill.fakequant.FloatLinear` or
:class:`~quantlab.distill.fakequant.FakeQuantLinear`); the embedding and the head may instead be
frozen tables (what an artifact's 8-bit GatherBlockQuantized / MatMulNBits head computes with).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from quantlab.distill.fakequant import FloatLinear
from quantlab.graph_builder.rope import rope_inv_freq
from quantlab.io.spec import ModelSpec

ROLES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
EMBEDDING = "model.embed_tokens.weight"


def key(name: str) -> str:
    """torch module names cannot hold dots: ``model.layers.0.mlp`` -> ``model/layers/0/mlp``."""
    return name.replace(".", "/")


def layer_linears(spec: ModelSpec) -> list[str]:
    """Every decoder linear's name, layer by layer (the head not included)."""
    return [f"model.layers.{i}.{role}" for i in range(spec.num_layers) for role in ROLES]


class DecoderLM(torch.nn.Module):
    """``forward(ids) -> logits`` (batch, seq, vocab) for the spec's decoder, from float tensors.

    ``tensors``: canonical name -> float32 array, every name of ``spec.expected_shapes()``.
    ``linears``: modules to use for some linears (fake-quantized ones), by linear name; the others
    become FloatLinear. ``embedding_table`` / ``head_table``: fixed (vocab, hidden) tables for the token
    lookup and the logits instead of the trainable embedding (and head).
    """

    def __init__(
        self,
        spec: ModelSpec,
        tensors: Mapping[str, np.ndarray],
        *,
        linears: Mapping[str, torch.nn.Module] | None = None,
        embedding_table: np.ndarray | None = None,
        head_table: np.ndarray | None = None,
    ):
        super().__init__()
        self.spec = spec
        linears = dict(linears or {})

        def tensor(name):
            return torch.from_numpy(np.array(tensors[name], dtype=np.float32))

        modules = {}
        names = layer_linears(spec) + ([] if spec.tie_word_embeddings else ["lm_head"])
        for name in names:
            if name in linears:
                modules[key(name)] = linears[name]
            else:
                bias = tensor(name + ".bias") if f"{name}.bias" in tensors else None
                modules[key(name)] = FloatLinear(tensor(name + ".weight"), bias)
        self.linears = torch.nn.ModuleDict(modules)
        vectors = [n for n in spec.expected_shapes() if n.endswith("norm.weight")]
        self.vectors = torch.nn.ParameterDict({key(n): torch.nn.Parameter(tensor(n)) for n in vectors})
        self.embedding = torch.nn.Parameter(tensor(EMBEDDING))
        self.register_buffer(
            "embedding_table", None if embedding_table is None else torch.from_numpy(np.array(embedding_table))
        )
        self.register_buffer("head_table", None if head_table is None else torch.from_numpy(np.array(head_table)))
        self.register_buffer(
            "inv_freq", torch.from_numpy(rope_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling)), False
        )
        self.head_rows: torch.Tensor | None = None  # see restrict_head

    def restrict_head(self, rows: np.ndarray | None) -> None:
        """Logits for the token ids ``rows`` only (batch, seq, len(rows)), in that order; None: every token.
        A speculative draft's head (distill --head-vocab): training then neither computes nor moves the
        other tokens' logits (their rows of a tied table still move with the embedding's)."""
        self.head_rows = None if rows is None else torch.from_numpy(np.asarray(rows, dtype=np.int64))

    def vector(self, name: str) -> torch.Tensor:
        return self.vectors[key(name)]

    def linear(self, name: str) -> torch.nn.Module:
        return self.linears[key(name)]

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        var = (x * x).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.spec.rms_norm_eps) * self.vector(name)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        d = self.spec.head_dim
        if self.spec.rope_interleaved:  # llama2.c: rotate (x[2i], x[2i+1])
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:  # Hugging Face: rotate (x[i], x[i + d/2])
            x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        r1, r2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        if self.spec.rope_interleaved:
            return torch.stack([r1, r2], dim=-1).flatten(-2)
        return torch.cat([r1, r2], dim=-1)

    def _attention(self, h: torch.Tensor, i: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        s = self.spec
        p = f"model.layers.{i}.self_attn"
        b, t, _ = h.shape

        def proj(name, heads):
            return self.linear(f"{p}.{name}")(h).view(b, t, heads, s.head_dim).transpose(1, 2)  # (b, heads, t, d)

        q, k, v = proj("q_proj", s.num_heads), proj("k_proj", s.num_kv_heads), proj("v_proj", s.num_kv_heads)
        if s.qk_norm:
            q, k = self._norm(q, f"{p}.q_norm.weight"), self._norm(k, f"{p}.k_norm.weight")
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        group = s.num_heads // s.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (b, heads, t, d)
        ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.linear(f"{p}.o_proj")(ctx.transpose(1, 2).reshape(b, t, -1))

    def forward(self, ids: torch.Tensor, *, hidden_states: bool = False):
        """ids (batch, seq) int64 -> logits (batch, seq, vocab); with ``hidden_states`` also the
        residual stream after every layer (a list of (batch, seq, hidden))."""
        s = self.spec
        _, t = ids.shape
        freqs = torch.arange(t, dtype=torch.float32)[:, None] * self.inv_freq  # (seq, head_dim / 2)
        cos, sin = torch.cos(freqs), torch.sin(freqs)
        table = self.embedding if self.embedding_table is None else self.embedding_table
        x = table[ids]  # (batch, seq, hidden)
        states = []
        for i in range(s.num_layers):
            x = x + self._attention(self._norm(x, f"model.layers.{i}.input_layernorm.weight"), i, cos, sin)
            h = self._norm(x, f"model.layers.{i}.post_attention_layernorm.weight")
            mlp = f"model.layers.{i}.mlp"
            act = torch.nn.functional.silu(self.linear(f"{mlp}.gate_proj")(h)) * self.linear(f"{mlp}.up_proj")(h)
            x = x + self.linear(f"{mlp}.down_proj")(act)
            states.append(x)
        h = self._norm(x, "model.norm.weight")
        rows = self.head_rows
        if self.head_table is not None or s.tie_word_embeddings:
            head = self.head_table if self.head_table is not None else self.embedding  # (vocab, hidden)
            logits = h @ (head if rows is None else head[rows]).T
        elif rows is None:
            logits = self.linear("lm_head")(h)
        else:
            linear = self.linear("lm_head")
            bias = None if linear.bias is None else linear.bias[rows]
            logits = torch.nn.functional.linear(h, linear.weight[rows], bias)
        return (logits, states) if hidden_states else logits

    @torch.no_grad()
    def float_tensors(self) -> dict[str, np.ndarray]:
        """Canonical name -> float32 array of every tensor of the spec; fake-quantized linears give the
        dequantized weight they compute with."""
        out = {EMBEDDING: self.embedding.numpy().copy()}
        for name in self.vectors:
            out[name.replace("/", ".")] = self.vectors[name].numpy().copy()
        for k, module in self.linears.items():
            name = k.replace("/", ".")
            weight = module.dequantized() if hasattr(module, "dequantized") else module.weight
            out[name + ".weight"] = weight.detach().numpy().copy()
            if module.bias is not None:
                out[name + ".bias"] = module.bias.detach().numpy().copy()
        return {n: out[n] for n in self.spec.expected_shapes()}


def load_tensors(ckpt) -> dict[str, np.ndarray]:
    """Every tensor of a Checkpoint, by canonical name (the whole model in memory: training needs it)."""
    return {name: ckpt.tensors.load(name) for name in ckpt.spec.expected_shapes()}
