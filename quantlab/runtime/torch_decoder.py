"""The decoder of an artifact folder run in PyTorch, with quantlab's own int4/int8 kernels.

`quantlab generate --backend torch` and `quantlab bench` use it beside onnxruntime: the same
artifact (the same packed MatMulNBits bytes, read from model.onnx.data without repacking), the same
interface as :class:`quantlab.runtime.generate.OrtDecoder`, but every quantized linear is
quantlab's matmul_nbits kernel (csrc/, AVX2/NEON C++), called directly rather than through
``torch.ops.quantlab.matmul_nbits``: the custom op's dispatch costs ~40 us a call, more than a
small linear.

The graph is read for its weights and for which op each linear became (MatMul, MatMulNBits,
DequantizeLinear -> MatMul, DynamicQuantizeMatMul); the computation follows the artifact's model
spec (manifest.json), the same maths as quantlab/graph_builder/decoder.py.

Threads: ``threads`` go to our kernels (their own persistent pool, one call per linear) and torch's
intra-op pool is set to one thread. Two pools on the same cores fight: OpenMP's workers spin after
each small torch op while ours wait to be scheduled, and on 2 cores that made SmolLM2-135M w4 decode
~1.7x slower (43 ms -> 25 ms per token when torch keeps one thread). What torch still computes
(norms, RoPE, attention over the cache) is small next to the linears at decode time.

Native layers: when every linear of the decoder layers is MatMulNBits and the spec is the plain Llama
family (``_NATIVE_SPEC``), each layer is one ``ql_decoder_layer`` call (csrc/decoder_layer.cpp) instead
of ~20 torch ops and 4-7 ctypes calls, because a small model's decode step is mostly dispatch
(SmolLM2-135M: 211 linears per token). ``native`` says which path runs, ``native_reason`` why not.
The cache then lives in preallocated buffers (batch, kv_heads, capacity, head_dim): a forward returns a
:class:`NativeCache`, a read-only mapping whose values are the views ``buf[:, :, :length]`` (made when
read), writes the new positions in place after them and returns a longer cache over the same buffers.
An old cache stays valid for rewinding (positions below its length are never overwritten), and
``trim_cache`` or slicing ``t[:, :, :n]`` in a dict trims; anything else (a copy, no room left) is copied
once into a new, larger buffer. The step's ends run natively too: the layers are bound once to the
step's buffers and the cache's (a decode step only sets ``past``), and the final norm and a MatMulNBits
head are one ``ql_decoder_head`` call (SmolLM2 w4, interleaved runs: 0.15-0.3 ms off a 4-5 ms step).
A forward's new buffers share one mapping on transparent huge pages (:func:`quantlab.kernels.huge_page_arrays`):
a batched decode step streams the whole cache from DRAM (SmolLM2, batch 16, prompt 128: ~110 MB a step),
and on 4 KiB pages each page cost a TLB walk (interleaved runs: the layers' time 24.1 -> 22.2 ms a step).

KV cache (``kv_cache``): ``"f32"``, or ``"int8"`` on the native path (the default when the artifact's manifest
says its cache is an int8 format): each (token, kv head) row of keys and values is stored as symmetric int8
codes with one float32 scale, quantized when written (keys after RoPE), and the attention kernel reads the
codes directly (csrc/include/quantlab_kernels.h), a quarter of the f32 cache's bytes per step. The dict then
holds per layer the int8 views ``past_key_values.{i}.key`` / ``.value`` (batch, kv_heads, seq, head_dim) and
the float32 views ``past_key_values.{i}.key_scale`` / ``.value_scale`` (batch, kv_heads, seq) beside them:
every tensor is batch-first with the sequence on axis 2, so generic code (trimming, row selection) works on
it as on the f32 cache. The torch path keeps an f32 cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantlab import kernels
from quantlab.graph_builder.kv_cache import SCALE_SUFFIX, parse_kv_cache
from quantlab.graph_builder.rope import rope_inv_freq
from quantlab.io.spec import ModelSpec
from quantlab.passes.prune_head_vocab import VOCAB_MAP
from quantlab.runtime.artifact_linears import (
    ATTN_FORMS,
    MLP_FORMS,
    Linear,
    embedding_table,
    fusable_groups,
    linear_name,
    place_weights,
)

# What csrc/decoder_layer.cpp computes, as the spec fields' values: RMSNorm, SwiGLU, full RoPE, full
# attention scaled by 1/sqrt(head_dim), no softcaps. Any other value keeps the torch path.
_NATIVE_SPEC = {
    "norm_kind": "rms",
    "norm_weight_offset": 0.0,
    "sandwich_norms": False,
    "mlp_activation": "silu",
    "mlp_gated": True,
    "num_experts": 0,
    "moe_layers": (),
    "rope_fraction": 1.0,
    "sliding_window": 0,
    "sliding_layers": (),
    "attention_scale": None,
    "attention_softcap": 0.0,
    "final_softcap": 0.0,
    "embedding_scale": 1.0,
}
MIN_CACHE_CAPACITY = 256
KV_CACHE_KINDS = ("f32", "int8")


class NativeCache(Mapping):
    """The cache a native forward returns: name -> the first ``length`` positions of that tensor's
    preallocated buffer (batch, kv_heads, length[, head_dim]), a view made when first read. A decode step
    reads none of them (the next forward takes ``buffers`` as they are), so a step makes no views."""

    __slots__ = ("buffers", "length", "owner", "_views")

    def __init__(self, owner: TorchDecoder, buffers: list, length: int):
        self.owner, self.buffers, self.length = owner, buffers, length
        self._views: dict = {}

    def fits(self, batch: int, needed: int) -> bool:
        """Whether the buffers hold ``batch`` sequences and have room for ``needed`` positions."""
        k = self.buffers[0][0]  # every buffer has the same batch and capacity
        return k.shape[0] == batch and k.shape[2] >= needed

    def __getitem__(self, name: str):
        view = self._views.get(name)
        if view is None:
            i, j = self.owner._slots[name]
            view = self._views[name] = self.buffers[i][j][:, :, : self.length]
        return view

    def __iter__(self):
        return iter(self.owner._cache_names)

    def __len__(self) -> int:
        return len(self.owner._cache_names)


class TorchDecoder:
    """An artifact's decoder in PyTorch: ``forward(ids, cache) -> (logits, cache)`` like OrtDecoder."""

    def __init__(
        self,
        artifact_dir: str | os.PathLike,
        *,
        threads: int | None = None,
        native: bool = True,
        kv_cache: str | None = None,
    ):
        """``native=False`` keeps the torch ops even where the native layers could run (tests, debugging).
        ``kv_cache``: ``"f32"`` or ``"int8"`` (module docstring); None: ``"int8"`` when the manifest's cache
        format is int8, else ``"f32"``. The torch path always keeps an f32 cache."""
        import torch

        self.torch = torch
        torch.set_num_threads(1)  # the kernels take the threads (module docstring)
        kernel_threads = threads or 0
        self.dir = Path(artifact_dir)
        manifest = json.loads((self.dir / "manifest.json").read_text(encoding="utf-8"))
        self.spec = s = ModelSpec.from_dict(manifest["spec"])
        if kv_cache is None:
            stored = parse_kv_cache(manifest.get("kv_cache", {}).get("format", "fp32"))
            kv_cache = "int8" if stored.kind == "int8" else "f32"
        if kv_cache not in KV_CACHE_KINDS:
            raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_KINDS)}, got {kv_cache!r}")
        model = ir.load(self.dir / "model.onnx")
        self.linears: dict[str, Linear] = {}
        self.vectors: dict[str, torch.Tensor] = {}
        for node in model.graph:
            if node.op_type in ("MatMul", "MatMulNBits", "DynamicQuantizeMatMul"):
                name = linear_name(node)
                if name is not None:
                    self.linears[name] = Linear(node, torch, kernel_threads)
            elif node.op_type in ("Gather", "GatherBlockQuantized") and node.name.startswith("model.embed_tokens"):
                self.embed = torch.from_numpy(embedding_table(node, s.hidden_size))
        # on huge pages in graph order; a plain graph's q/k/v and gate/up as one linear each (place_weights)
        self.fused = place_weights(self.linears, fusable_groups(self.linears, s.num_layers), torch)
        # a draft's pruned head (passes/prune_head_vocab.py): its n logits go to the kept tokens, -inf elsewhere
        vocab_map = model.graph.initializers.get(VOCAB_MAP)
        self.vocab_map = None if vocab_map is None else torch.from_numpy(np.array(vocab_map.const_value.numpy()))
        for name, value in model.graph.initializers.items():
            if (name.endswith("norm.weight") or name.endswith(".bias")) and value.const_value is not None:
                self.vectors[name] = torch.from_numpy(np.asarray(value.const_value.numpy(), np.float32).copy())
        self.inv_freq = torch.from_numpy(rope_inv_freq(s.head_dim, s.rope_theta, s.rope_scaling))
        self._cos = self._sin = None  # _rope_tables
        self.num_layers, self.kv_heads, self.head_dim = s.num_layers, s.num_kv_heads, s.head_dim
        self.past_key_names = [f"past_key_values.{i}.key" for i in range(s.num_layers)]
        self.past_value_names = [f"past_key_values.{i}.value" for i in range(s.num_layers)]
        self.cache_allocations = 0  # cache buffers allocated by the native path (tests count them)
        self._step = None  # the native step's (x, cos, sin) buffers, kept while the batch and length stay
        self._bound = None  # (cache buffers, step buffers) the native layers are bound to
        self.native_reason = self._native_unsupported() if native else "native=False"
        self.native = self.native_reason is None
        self.kv_cache = kv_cache if self.native else "f32"
        # each layer's cache tensors in the dict's order: key, value (and key_scale, value_scale for int8)
        self._layer_names = [
            (k, v, k + SCALE_SUFFIX, v + SCALE_SUFFIX) if self.kv_cache == "int8" else (k, v)
            for k, v in zip(self.past_key_names, self.past_value_names, strict=True)
        ]
        self._cache_names = [n for names in self._layer_names for n in names]
        self.layers = [self._native_layer(i, kernel_threads) for i in range(s.num_layers)] if self.native else []
        self._slots = {n: (i, j) for i, names in enumerate(self._layer_names) for j, n in enumerate(names)}
        self._stack = kernels.LayerStack(self.layers) if self.native else None
        self._head = (
            kernels.DecoderHead(
                norm=self.vectors["model.norm.weight"],
                head=self._weights("lm_head", ()),
                hidden=s.hidden_size,
                eps=s.rms_norm_eps,
                threads=kernel_threads,
            )
            if self.native and self.linears["lm_head"].kind == "MatMulNBits"
            else None
        )  # the final norm and the head in one native call (kernels.DecoderHead)

    def _native_unsupported(self) -> str | None:
        """Why the native layers cannot run this artifact, or None when they can."""
        if kernels.backend() == "numpy":
            return "the C++ kernels are not built"
        for field, value in _NATIVE_SPEC.items():
            if getattr(self.spec, field) != value:
                return f"spec.{field} = {getattr(self.spec, field)!r}"
        for i in range(self.spec.num_layers):
            p = f"model.layers.{i}"
            names = [f"{p}.self_attn.o_proj", f"{p}.mlp.down_proj"]
            for group, forms in ((f"{p}.self_attn", ATTN_FORMS), (f"{p}.mlp", MLP_FORMS)):
                form = next((f for f in forms.values() if f"{group}.{f[0]}" in self.linears), forms["separate"])
                names += [f"{group}.{n}" for n in form]
            for name in names:
                linear = self.linears.get(name)
                if linear is None or linear.kind != "MatMulNBits":
                    return f"{name} is {'missing' if linear is None else linear.kind}"
        return None

    def _weights(self, name: str, bias_of: tuple[str, ...]) -> dict:
        """MatMulNBits linear ``name`` as the kernels take it, with the biases of ``bias_of`` concatenated
        (none unless each has one)."""
        linear = self.linears[name]
        biases = [self.vectors.get(f"{b}.bias") for b in bias_of]
        bias = self.torch.cat(biases).contiguous() if biases and all(b is not None for b in biases) else None
        return {
            "B": linear.B,
            "scales": linear.scales,
            "zero_points": linear.zp,
            "bias": bias,
            "K": linear.K,
            "N": linear.N,
            "bits": linear.bits,
            "block_size": linear.block,
            "accuracy_level": linear.level,
        }

    def _native_layer(self, i: int, threads: int, path: str = "auto"):
        """Layer ``i`` as a :class:`quantlab.kernels.DecoderLayer` (``path``: the kernels it runs, tests)."""
        from quantlab.kernels import DecoderLayer

        s, p = self.spec, f"model.layers.{i}"

        weights = self._weights

        def fused(names: tuple[str, ...], bias_of: tuple[str, ...]) -> dict:
            """One call for the group place_weights placed as one linear."""
            tensors = self.fused[names]
            return {
                **weights(names[0], bias_of),
                "B": tensors["B"],
                "scales": tensors["scales"],
                "zero_points": tensors.get("zp"),
                "N": sum(self.linears[n].N for n in names),
            }

        attn, mlp = f"{p}.self_attn", f"{p}.mlp"
        projections = tuple(f"{attn}.{n}" for n in ATTN_FORMS["separate"])
        if f"{attn}.qkv_proj" in self.linears:
            linears = {"qkv": weights(f"{attn}.qkv_proj", projections)}
        elif projections in self.fused:
            linears = {"qkv": fused(projections, projections)}
        else:
            linears = {key: weights(name, (name,)) for key, name in zip("qkv", projections, strict=True)}
        linears["o"] = weights(f"{attn}.o_proj", ())
        gate_up = tuple(f"{mlp}.{n}" for n in MLP_FORMS["separate"])
        if f"{mlp}.gate_up_proj" in self.linears:
            linears["gate_up"] = weights(f"{mlp}.gate_up_proj", ())
        elif gate_up in self.fused:
            linears["gate_up"] = fused(gate_up, ())
        else:
            linears["gate"], linears["up"] = weights(gate_up[0], ()), weights(gate_up[1], ())
        linears["down"] = weights(f"{mlp}.down_proj", ())
        return DecoderLayer(
            linears=linears,
            input_norm=self.vectors[f"{p}.input_layernorm.weight"],
            post_norm=self.vectors[f"{p}.post_attention_layernorm.weight"],
            q_norm=self.vectors[f"{attn}.q_norm.weight"] if s.qk_norm else None,
            k_norm=self.vectors[f"{attn}.k_norm.weight"] if s.qk_norm else None,
            hidden=s.hidden_size,
            heads=s.num_heads,
            kv_heads=s.num_kv_heads,
            head_dim=s.head_dim,
            intermediate=s.intermediate_size,
            eps=s.rms_norm_eps,
            rope_interleaved=s.rope_interleaved,
            threads=threads,
            path=path,
        )

    def trim_cache(self, cache: dict, length: int) -> dict:
        """The first ``length`` positions of ``cache``, as views (no copy; a later forward writes after them)."""
        if type(cache) is NativeCache and cache.owner is self:
            return NativeCache(self, cache.buffers, min(length, cache.length))
        return {name: t[:, :, :length] for name, t in cache.items()}

    def empty_cache(self, batch: int = 1) -> dict:
        torch = self.torch
        shape = (batch, self.kv_heads, 0, self.head_dim)  # (batch, kv_heads, seq, head_dim)
        if self.kv_cache == "f32":
            return {n: torch.zeros(shape) for n in self.past_key_names + self.past_value_names}
        cache = {}
        for k, v, k_scale, v_scale in self._layer_names:
            cache[k], cache[v] = torch.zeros(shape, dtype=torch.int8), torch.zeros(shape, dtype=torch.int8)
            cache[k_scale], cache[v_scale] = torch.zeros(shape[:3]), torch.zeros(shape[:3])  # (batch, kv_heads, seq)
        return cache

    def _norm(self, x, name):
        # one op (not five): after a decode step's layers have streamed the weights through the caches,
        # each small torch op costs tens of microseconds
        w = self.vectors[name]
        return self.torch.nn.functional.rms_norm(x, w.shape, w, eps=self.spec.rms_norm_eps)

    def _rope_tables(self, positions: int):
        """cos and sin of every position below ``positions`` (positions, head_dim / 2), grown by doubling:
        the same float32 products as per step, looked up instead of recomputed."""
        if self._cos is None or self._cos.shape[0] < positions:
            n = max(positions, 2 * (0 if self._cos is None else self._cos.shape[0]), 1024)
            freqs = self.torch.arange(n).float()[:, None] * self.inv_freq  # (positions, head_dim / 2)
            self._cos, self._sin = self.torch.cos(freqs), self.torch.sin(freqs)
        return self._cos, self._sin

    def _rope(self, x, cos, sin):
        d = self.spec.head_dim
        if self.spec.rope_interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        r1, r2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        if self.spec.rope_interleaved:
            return self.torch.stack([r1, r2], dim=-1).flatten(-2)
        return self.torch.cat([r1, r2], dim=-1)

    def _attention(self, h, i, cos, sin, allowed, past_k, past_v):
        s, torch = self.spec, self.torch
        p = f"model.layers.{i}.self_attn"
        b, t, _ = h.shape

        def proj(name, heads):
            y = self.linears[f"{p}.{name}"](h)
            if f"{p}.{name}.bias" in self.vectors:
                y = y + self.vectors[f"{p}.{name}.bias"]
            return y.view(b, t, heads, s.head_dim).transpose(1, 2)  # (batch, heads, seq, head_dim)

        if f"{p}.qkv_proj" in self.linears:  # one fused linear (passes/fuse_matmul_nbits.py): one call, then views
            sizes = [s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim]
            y = self.linears[f"{p}.qkv_proj"](h)
            biases = [self.vectors.get(f"{p}.{name}.bias") for name in ("q_proj", "k_proj", "v_proj")]
            if all(b is not None for b in biases):  # the fused node leaves the biases as they were
                y = y + torch.cat(biases)
            parts = y.split(sizes, dim=-1)
            q, k, v = (
                y.reshape(b, t, heads, s.head_dim).transpose(1, 2)
                for y, heads in zip(parts, (s.num_heads, s.num_kv_heads, s.num_kv_heads), strict=True)
            )
        else:
            q, k, v = proj("q_proj", s.num_heads), proj("k_proj", s.num_kv_heads), proj("v_proj", s.num_kv_heads)
        if s.qk_norm:
            q, k = self._norm(q, f"{p}.q_norm.weight"), self._norm(k, f"{p}.k_norm.weight")
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        # grouped-query attention without repeating the cache per query head (enable_gqa); ``allowed`` is an
        # additive mask (0 or float32 min) so that a padding row, which sees no key, stays finite
        ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        ctx = ctx.transpose(1, 2).reshape(b, t, -1)
        return self.linears[f"{p}.o_proj"](ctx), k, v

    def forward(self, input_ids, cache, *, attention_mask=None, position_ids=None):
        torch = self.torch
        with torch.inference_mode():
            ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
            batch, seq = ids.shape
            if type(cache) is NativeCache:
                past = cache.length
            else:
                past = next(iter(cache.values())).shape[2] if cache else 0
            cos, sin = self._rope_step(batch, seq, past, position_ids)  # (batch, seq, head_dim / 2)
            if self.native:
                x, new_cache = self._layers_native(ids, cache, cos, sin, attention_mask, past)
            else:
                x, new_cache = self._layers_torch(ids, cache, cos[:, None], sin[:, None], attention_mask, past)
            if self._head is not None:
                logits = self._head(x)
            else:
                logits = self.linears["lm_head"](self._norm(x, "model.norm.weight"))
            if self.vocab_map is not None:  # the graph's Pad (one -inf column) and Gather
                logits = torch.nn.functional.pad(logits, (0, 1), value=float("-inf"))[..., self.vocab_map]
        return logits.numpy(), new_cache

    def _rope_step(self, batch: int, seq: int, past: int, position_ids):
        """cos and sin of the step's positions (batch, seq, head_dim / 2): ``past`` on, or ``position_ids``."""
        if position_ids is None:
            cos, sin = self._rope_tables(past + seq)
            return cos[past : past + seq].expand(batch, seq, -1), sin[past : past + seq].expand(batch, seq, -1)
        pos = self.torch.as_tensor(np.asarray(position_ids), dtype=self.torch.long).expand(batch, seq)
        cos, sin = self._rope_tables(max(past + seq, int(pos.max()) + 1))
        return cos[pos], sin[pos]

    def _layers_native(self, ids, cache, cos, sin, attention_mask, past):
        """The decoder layers as one ql_decoder_layers call, the cache written in place (module docstring).

        A decode step on the cache the last step returned rebinds nothing: the step's embeddings and rotary
        tables go into buffers kept while the batch and length stay, the layers keep their bindings to those
        and to the cache buffers, and only ``past`` (and a key mask) is set; the cache returned is a
        :class:`NativeCache`, whose views are made when read. (~0.3 ms a SmolLM2 step of binding 30 layers
        and making 60 views, before.)"""
        torch = self.torch
        batch, seq = ids.shape
        total = past + seq
        key_mask = (
            None
            if attention_mask is None
            else torch.as_tensor(np.asarray(attention_mask), dtype=torch.long).contiguous()  # (batch, total)
        )
        step = self._step
        if step is None or step[0].shape[:2] != (batch, seq):
            half = self.head_dim // 2
            step = self._step = (
                torch.empty(batch, seq, self.spec.hidden_size),  # x: the layers update it in place
                torch.empty(batch, seq, half),  # cos
                torch.empty(batch, seq, half),  # sin
            )
        x, step_cos, step_sin = step
        torch.index_select(self.embed, 0, ids.reshape(-1), out=x.view(batch * seq, -1))
        step_cos.copy_(cos)
        step_sin.copy_(sin)
        cos, sin = step_cos, step_sin
        if type(cache) is NativeCache and cache.owner is self and cache.fits(batch, total):
            buffers = cache.buffers
        else:
            buffers = self._cache_buffers(cache, batch, past, total)
        if self._bound is None or self._bound[0] is not buffers or self._bound[1] is not step:
            for i, (layer, bufs) in enumerate(zip(self.layers, buffers, strict=True)):
                # the first layer checks the step's buffers; the caches are _cache_buffers' (batch, kv, capacity[, d])
                k_scale, v_scale = bufs[2:] if len(bufs) == 4 else (None, None)
                layer.bind(
                    x, bufs[0], bufs[1], cos, sin, key_mask, past=past, k_scale=k_scale, v_scale=v_scale,
                    check=i == 0,
                )  # fmt: skip
            self._bound = (buffers, step)
        mask_ptr = None if key_mask is None else key_mask.data_ptr()
        for a in self._stack.args:
            a.past, a.key_mask = past, mask_ptr
        self._stack()
        return x, NativeCache(self, buffers, total)

    def _cache_buffers(self, cache, batch: int, past: int, needed: int) -> list:
        """Per layer, the whole buffers (batch, kv_heads, capacity[, head_dim]) behind its cache entries (key,
        value and for int8 their scales): the ones they are prefix views of, when each entry is one with room for
        ``needed`` positions and the layer's share a capacity (the kernel takes one); else new buffers holding
        copies of the entries, all the forward's new ones in one :func:`quantlab.kernels.huge_page_arrays`."""
        torch = self.torch
        layers = [[cache[n] for n in names] for names in self._layer_names]
        buffers = []
        for tensors in layers:
            found = [self._cache_buffer(t, batch, past, needed) for t in tensors]
            ok = all(b is not None for b in found) and len({b.shape[2] for b in found}) == 1
            buffers.append(found if ok else None)
        missing = [i for i, b in enumerate(buffers) if b is None]
        if not missing:
            return buffers
        capacity = max(MIN_CACHE_CAPACITY, 2 * needed)
        specs, sources = [], []
        for i in missing:
            for j, t in enumerate(layers[i]):
                code = j < 2  # key, value; then their scales (batch, kv_heads, capacity)
                t = t if type(t) is torch.Tensor else torch.as_tensor(np.asarray(t))
                dtype = torch.int8 if code and self.kv_cache == "int8" else torch.float32
                if t.dtype != dtype:  # a copy would cast: an f32 cache's values are no int8 codes
                    raise TypeError(f"a {self.kv_cache} cache holds {dtype} keys, values and scales, got {t.dtype}")
                shape = (batch, self.kv_heads, capacity, self.head_dim)[: 4 if code else 3]
                specs.append((shape, np.int8 if dtype == torch.int8 else np.float32))
                sources.append(t)
        new = [torch.from_numpy(a) for a in kernels.huge_page_arrays(specs)]
        for buf, t in zip(new, sources, strict=True):
            buf[:, :, :past] = t
        per_layer = len(new) // len(missing)
        for n, i in enumerate(missing):
            buffers[i] = new[n * per_layer : (n + 1) * per_layer]
        self.cache_allocations += len(new)
        return buffers

    def _cache_buffer(self, t, batch: int, past: int, needed: int):
        """The whole (batch, kv_heads, capacity[, head_dim]) buffer that cache entry ``t`` (a key or value of the
        cache's dtype, or an int8 cache's float32 scales) is a prefix view of, when it has room for ``needed``
        positions; else None."""
        torch, kv = self.torch, self.kv_heads
        if type(t) is not torch.Tensor or t.storage_offset() != 0:
            return None
        code = t.dim() == 4
        d = self.head_dim if code else 1
        dtype = torch.int8 if code and self.kv_cache == "int8" else torch.float32
        if t.dtype != dtype or t.shape != (batch, kv, past, self.head_dim)[: t.dim()] or t.dim() not in (3, 4):
            return None
        strides = t.stride()
        s0, s1 = strides[0], strides[1]
        capacity = s1 // d
        if (
            strides[2:] == ((d, 1) if code else (1,))
            and s1 == capacity * d
            and s0 == kv * s1
            and capacity >= needed
            and t.untyped_storage().nbytes() >= batch * s0 * t.element_size()
        ):
            return t.as_strided((batch, kv, capacity, d)[: t.dim()], strides)
        return None

    def _layers_torch(self, ids, cache, cos, sin, attention_mask, past):
        torch, s = self.torch, self.spec
        batch, seq = ids.shape
        total = past + seq
        mask = (
            torch.ones(batch, total, dtype=torch.bool)
            if attention_mask is None
            else torch.as_tensor(np.asarray(attention_mask)).bool()
        )
        causal = torch.arange(total)[None, :] <= torch.arange(past, total)[:, None]  # (seq, total)
        allowed = causal[None, None] & mask[:, None, None, :]  # (batch, 1, seq, total)
        allowed = torch.zeros(allowed.shape).masked_fill(~allowed, float(np.finfo(np.float32).min))
        x = self.embed[ids]
        new_cache = {}
        for i in range(s.num_layers):
            h = self._norm(x, f"model.layers.{i}.input_layernorm.weight")
            attn, k, v = self._attention(
                h, i, cos, sin, allowed, cache[self.past_key_names[i]], cache[self.past_value_names[i]]
            )
            x = x + attn
            h = self._norm(x, f"model.layers.{i}.post_attention_layernorm.weight")
            mlp = f"model.layers.{i}.mlp"
            if f"{mlp}.gate_up_proj" in self.linears:
                gate, up = self.linears[f"{mlp}.gate_up_proj"](h).chunk(2, dim=-1)
            else:
                gate, up = self.linears[f"{mlp}.gate_proj"](h), self.linears[f"{mlp}.up_proj"](h)
            act = torch.nn.functional.silu(gate) * up
            x = x + self.linears[f"{mlp}.down_proj"](act)
            new_cache[self.past_key_names[i]], new_cache[self.past_value_names[i]] = k, v
        return x, new_cache
