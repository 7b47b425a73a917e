"""Weight-only int4/int8 matmul kernels with onnxruntime's MatMulNBits tensor contract.

``matmul_nbits(x, B, scales, zero_points, K=..., N=..., bits=..., block_size=...)`` takes the
tensors a ``com.microsoft.MatMulNBits`` node takes (layout: :mod:`quantlab.kernels.reference`), as
numpy arrays or torch tensors, and runs the C++ core (csrc/) through ctypes. When the core was not
built (no compiler at install time) it falls back to numpy, logs a warning once, and
:func:`backend` says ``"numpy"``.

``accuracy_level`` follows onnxruntime: 0 computes in fp32 on dequantized weights; 4 (the default
here, the fast one) quantizes activations to int8 per (row, block) and does exact integer dot
products, adding only the int8 rounding of the activations as error; 3 rounds weights and
activations to bf16 where the CPU has bf16 tiles (AMX, M >= 8, blocks of a multiple of 32), which is
2-3x closer to the fp32 product than int8 and faster at small batches, and is fp32 elsewhere.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
from typing import Any

import numpy as np

from quantlab.kernels import _native
from quantlab.kernels.reference import dequantize_nbits, k_blocks, matmul_nbits_reference

logger = logging.getLogger(__name__)

__all__ = [
    "DecoderHead",
    "DecoderLayer",
    "LayerStack",
    "available_paths",
    "backend",
    "build_info",
    "dequantize_nbits",
    "huge_page_arrays",
    "huge_page_buffer",
    "matmul_nbits",
    "pack_weights",
    "run_layers",
    "matmul_nbits_reference",
]

_lib, _why_not = _native.load_core()
if _lib is None:
    logger.warning(
        "quantlab.kernels: the C++ kernels are not available (%s); using the slow numpy fallback. "
        "Reinstall with a C++ compiler and cmake to build them.",
        _why_not,
    )


_HUGE_PAGE = 2 << 20


def huge_page_buffer(nbytes: int) -> np.ndarray:
    """A zeroed uint8 array of ``nbytes`` in private anonymous memory, 2 MiB-aligned, that asks the kernel
    for transparent huge pages (``madvise(MADV_HUGEPAGE)``; granted or not, the memory works the same).

    Why: a decode step streams every weight from DRAM once. With 4 KiB pages the CPU's hardware prefetcher
    stops at every page boundary and each page costs a TLB walk; on 2 MiB pages one thread streams the
    int4 weights measurably faster (Sapphire Rapids, M = 1, (4096, 11008), one thread: 12.2 -> 13.6 GB/s,
    benchmarks/bench_kernels.py). numpy asks for huge pages only for its own arrays of 4 MiB and more, and
    onnxruntime and torch not at all, so the runtime places the weights itself (:func:`pack_weights`).
    """
    size = (nbytes + 2 * _HUGE_PAGE - 1) // _HUGE_PAGE * _HUGE_PAGE
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20)
    mm = mmap.mmap(-1, size, flags=flags)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without THP: plain pages
            pass
    raw = np.frombuffer(mm, dtype=np.uint8)  # keeps the mapping alive
    start = -raw.ctypes.data % _HUGE_PAGE
    return raw[start : start + nbytes]


def huge_page_arrays(specs: list[tuple[tuple[int, ...], Any]], align: int = 64) -> list[np.ndarray]:
    """Zeroed arrays of the given ``(shape, dtype)`` pairs, placed one after another in one
    :func:`huge_page_buffer`, each ``align``-byte aligned: one mapping for all of them, so that small arrays are
    not each rounded up to a huge page."""
    dtypes = [np.dtype(dtype) for _, dtype in specs]
    sizes = [int(np.prod(shape)) * dt.itemsize for (shape, _), dt in zip(specs, dtypes, strict=True)]
    offsets, total = [], 0
    for size in sizes:
        total = (total + align - 1) // align * align
        offsets.append(total)
        total += size
    buf = huge_page_buffer(max(total, 1))
    return [
        buf[off : off + size].view(dt).reshape(shape)
        for (shape, _), dt, size, off in zip(specs, dtypes, sizes, offsets, strict=True)
    ]


def pack_weights(arrays: list[np.ndarray], align: int = 64) -> list[np.ndarray]:
    """Copies of ``arrays`` (same dtypes, shapes and values) in :func:`huge_page_arrays`: the weights of a model
    in the order a decode step reads them, on huge pages."""
    out = huge_page_arrays([(a.shape, a.dtype) for a in arrays], align)
    for view, a in zip(out, arrays, strict=True):
        view[...] = a
    return out


def backend() -> str:
    """``"native:<path>"`` (the SIMD path that runs by default, e.g. ``native:avx2``) or ``"numpy"``."""
    if _lib is None:
        return "numpy"
    return "native:" + _native.PATH_NAMES[_lib.ql_best_path()]


def available_paths() -> list[str]:
    """The native paths this CPU can run (``scalar`` is the reference); empty without the core."""
    if _lib is None:
        return []
    return [name for name, code in _native.PATHS.items() if code and _lib.ql_path_available(code)]


def build_info() -> str:
    """What the core was compiled with and what this CPU supports."""
    return "numpy fallback: " + _why_not if _lib is None else _lib.ql_build_info().decode()


_DTYPE_NAMES: dict[Any, str] = {}  # dtype object -> name, filled on first sight (str(dtype) is slow)


def _dtype_name(x: Any) -> str:
    name = _DTYPE_NAMES.get(x.dtype)
    if name is None:
        name = str(x.dtype).replace("torch.", "")
        _DTYPE_NAMES[x.dtype] = name
    return name


class _Buf:
    """A C-contiguous host buffer (numpy array or CPU torch tensor) and its address."""

    __slots__ = ("obj", "ptr", "size")

    def __init__(self, t: Any):
        if type(t) is np.ndarray:
            if not t.flags.c_contiguous:
                t = np.ascontiguousarray(t)
            self.ptr = t.__array_interface__["data"][0]
            self.size = t.size
        elif _is_torch(t):
            if t.device.type != "cpu":
                raise ValueError("matmul_nbits: use quantlab.kernels.torch_ops for CUDA tensors")
            t = t.contiguous()
            self.ptr = t.data_ptr()
            self.size = t.numel()
        else:
            t = np.ascontiguousarray(t)
            self.ptr = t.__array_interface__["data"][0]
            self.size = t.size
        self.obj = t


def _is_torch(t: Any) -> bool:
    return type(t).__module__.startswith("torch")


def matmul_nbits(
    x: Any,
    B: Any,
    scales: Any,
    zero_points: Any = None,
    *,
    K: int,
    N: int,
    bits: int = 4,
    block_size: int = 32,
    bias: Any = None,
    accuracy_level: int = 4,
    threads: int | None = None,
    path: str = "auto",
) -> Any:
    """``Y = x @ dequant(B).T (+ bias)`` with onnxruntime MatMulNBits' inputs and attributes.

    ``x`` is ``(..., K)`` float32/float16/bfloat16 (numpy or CPU torch); ``scales`` and ``bias`` have
    its dtype (other float dtypes are cast); ``B`` and ``zero_points`` are uint8. Returns ``(..., N)``
    of the same kind and dtype as ``x``. ``threads=None`` uses every core; ``path`` forces one
    implementation (``"scalar"``, ``"avx2"``, ``"avx_vnni"``, ``"neon"``, ``"neon_dot"``).
    """
    if bits not in (4, 8):
        raise ValueError(f"matmul_nbits: bits must be 4 or 8, got {bits}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"matmul_nbits: accuracy_level must be 0..4, got {accuracy_level}")
    if x.shape[-1] != K:
        raise ValueError(f"matmul_nbits: x has {x.shape[-1]} columns, K={K}")
    kb = k_blocks(K, block_size)
    torch_in = _is_torch(x)
    dtype = _dtype_name(x)
    if dtype not in _native.DTYPES:
        raise TypeError(f"matmul_nbits: activations must be float32, float16 or bfloat16, got {x.dtype}")
    lead = tuple(x.shape[:-1])
    m = int(math.prod(lead))

    if _lib is None:
        return _numpy_fallback(x, B, scales, zero_points, bias, K=K, N=N, bits=bits, block_size=block_size)

    xb = _Buf(x)
    bb = _Buf(B)
    expected_b = N * kb * block_size * bits // 8
    if bb.size != expected_b or _dtype_name(bb.obj) != "uint8":
        raise ValueError(f"matmul_nbits: B must be uint8 with {expected_b} elements (N, k_blocks, blob)")
    sb = _Buf(_cast_like(scales, x))
    if sb.size != N * kb:
        raise ValueError(f"matmul_nbits: scales must have N * k_blocks = {N * kb} elements, got {sb.size}")
    zb = None
    if zero_points is not None:
        zb = _Buf(zero_points)
        if _dtype_name(zb.obj) != "uint8":
            raise TypeError("matmul_nbits: only uint8 (packed) zero points are supported")
        expected_z = N * ((kb + 1) // 2 if bits == 4 else kb)
        if zb.size != expected_z:
            raise ValueError(f"matmul_nbits: zero_points must have {expected_z} elements, got {zb.size}")
    biasb = None
    if bias is not None:
        biasb = _Buf(_cast_like(bias, x))
        if biasb.size != N:
            raise ValueError(f"matmul_nbits: bias must have N = {N} elements")

    if torch_in:
        import torch

        y = torch.empty((*lead, N), dtype=x.dtype)
        y_ptr = y.data_ptr()
    else:
        y = np.empty((*lead, N), dtype=x.dtype)
        y_ptr = y.__array_interface__["data"][0]

    args = _native.MatMulNBitsArgs(
        a=xb.ptr,
        b=bb.ptr,
        scales=sb.ptr,
        zero_points=zb.ptr if zb else None,
        bias=biasb.ptr if biasb else None,
        y=y_ptr,
        m=m,
        k=K,
        n=N,
        bits=bits,
        block_size=block_size,
        dtype=_native.DTYPES[dtype],
        accuracy=_accuracy(accuracy_level),
        path=_native.PATHS[path],
        threads=0 if threads is None else int(threads),
    )
    status = _lib.ql_matmul_nbits(ctypes.byref(args))
    if status != 0:
        raise ValueError(
            f"matmul_nbits: core returned {_native.STATUS.get(status, status)} "
            f"(K={K}, N={N}, bits={bits}, block_size={block_size}, path={path})"
        )
    return y


def _accuracy(level: int) -> int:
    """The core's arithmetic for onnxruntime's accuracy_level: 4 int8, 3 bf16 where a path has it
    (AMX), else fp32 (0..2: fp16 and below are computed in fp32)."""
    return level if level in (3, 4) else 0


def _ptr(t: Any) -> int | None:
    """The address of a C-contiguous numpy array or CPU torch tensor (None for None), without a copy."""
    if t is None:
        return None
    if type(t) is np.ndarray:
        if not t.flags.c_contiguous:
            raise ValueError("decoder_layer: buffers must be C-contiguous")
        return t.__array_interface__["data"][0]
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("decoder_layer: buffers must be contiguous CPU tensors")
    return t.data_ptr()


def _size(t: Any) -> int:
    return t.size if type(t) is np.ndarray else t.numel()


def _linear_args(name: str, w: dict) -> _native.LinearArgs:
    """One linear's ``ql_linear``, its tensors checked against the MatMulNBits contract."""
    K, N, bits, bs = w["K"], w["N"], w["bits"], w["block_size"]
    kb = k_blocks(K, bs)
    zp, bias = w.get("zero_points"), w.get("bias")
    expected = {
        "B": (w["B"], "uint8", N * kb * bs * bits // 8),
        "scales": (w["scales"], "float32", N * kb),
        "zero_points": (zp, "uint8", N * ((kb + 1) // 2 if bits == 4 else kb)),
        "bias": (bias, "float32", N),
    }
    if bits not in (4, 8):
        raise ValueError(f"decoder_layer: {name} has bits={bits}; 4 or 8 only")
    for what, (t, dtype, size) in expected.items():
        if t is not None and (_dtype_name(t) != dtype or _size(t) != size):
            raise ValueError(f"decoder_layer: {name}.{what} must be {size} {dtype} values")
    return _native.LinearArgs(
        b=_ptr(w["B"]),
        scales=_ptr(w["scales"]),
        zero_points=_ptr(zp),
        bias=_ptr(bias),
        k=K,
        n=N,
        bits=bits,
        block_size=bs,
        accuracy=_accuracy(w.get("accuracy_level", 4)),
    )


class DecoderLayer:
    """One Llama-family decoder layer run by a single ``ql_decoder_layer`` call (csrc/decoder_layer.cpp).

    The weights are bound once: ``linears`` maps ``qkv`` or ``q``/``k``/``v``, ``o``, ``gate_up`` or
    ``gate``/``up``, and ``down`` to dicts of MatMulNBits tensors and attributes (``B``, ``scales``,
    ``zero_points``, ``bias``, ``K``, ``N``, ``bits``, ``block_size``, ``accuracy_level``); scales,
    bias and norm weights are float32. The caller keeps every tensor alive and unchanged. A call
    binds the step's buffers and updates ``x`` and the caches in place; nothing is copied.
    """

    def __init__(
        self,
        *,
        linears: dict[str, dict],
        input_norm: Any,
        post_norm: Any,
        q_norm: Any = None,
        k_norm: Any = None,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        intermediate: int,
        eps: float,
        rope_interleaved: bool = False,
        threads: int | None = None,
        path: str = "auto",
    ):
        if _lib is None:
            raise RuntimeError(f"decoder_layer needs the C++ kernels ({_why_not})")
        args = _native.DecoderLayerArgs(
            input_norm=_ptr(input_norm),
            post_norm=_ptr(post_norm),
            q_norm=_ptr(q_norm),
            k_norm=_ptr(k_norm),
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate=intermediate,
            eps=eps,
            rope_interleaved=int(rope_interleaved),
            path=_native.PATHS[path],
            threads=0 if threads is None else int(threads),
        )
        self._keep = [input_norm, post_norm, q_norm, k_norm]
        for name, w in linears.items():
            if name not in _native.LAYER_LINEARS:
                raise ValueError(f"decoder_layer: unknown linear {name!r}")
            setattr(args, name, _linear_args(name, w))
            self._keep.append(w)
        for name, t in (("input_norm", input_norm), ("post_norm", post_norm), ("q_norm", q_norm), ("k_norm", k_norm)):
            size = head_dim if name in ("q_norm", "k_norm") else hidden
            if t is not None and (_dtype_name(t) != "float32" or _size(t) != size):
                raise ValueError(f"decoder_layer: {name} must be {size} float32 values")
        self.args = args
        self._ref = ctypes.pointer(args)

    def bind(
        self,
        x: Any,
        k_cache: Any,
        v_cache: Any,
        cos: Any,
        sin: Any,
        key_mask: Any = None,
        *,
        past: int,
        k_scale: Any = None,
        v_scale: Any = None,
        check: bool = True,
    ) -> None:
        """Binds the step's buffers, which a run (:meth:`__call__` or :func:`run_layers`) then updates in place:
        ``x`` (batch, seq, hidden) float32.

        ``k_cache``/``v_cache``: (batch, kv_heads, capacity, head_dim) buffers, float32, or int8 with
        ``k_scale``/``v_scale`` (batch, kv_heads, capacity) float32 (one symmetric scale per token and kv
        head, quantlab_kernels.h); positions ``past .. past + seq - 1`` are written. ``cos``/``sin``:
        (batch, seq, head_dim / 2) float32; ``key_mask``: None or (batch, past + seq) int64, 0 = masked.
        ``check=False`` (torch tensors only) skips the shape, dtype and layout checks (several
        microseconds, per layer and step) for buffers the caller has already checked, e.g. those an
        earlier layer of the same step took; a wrong buffer then corrupts memory.
        """
        batch, seq, hidden = x.shape
        a = self.args
        if not check:
            a.x, a.k_cache, a.v_cache = x.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr()
            if k_scale is None:
                a.cache_dtype, a.k_scale, a.v_scale = 0, None, None
            else:
                a.cache_dtype, a.k_scale, a.v_scale = 1, k_scale.data_ptr(), v_scale.data_ptr()
            a.cos, a.sin = cos.data_ptr(), sin.data_ptr()
            a.key_mask = None if key_mask is None else key_mask.data_ptr()
            a.batch, a.seq, a.past, a.capacity = batch, seq, past, k_cache.shape[2]
            return
        capacity = k_cache.shape[2]
        cache_shape = (batch, a.kv_heads, capacity, a.head_dim)
        rope_shape = (batch, seq, a.head_dim // 2)
        scales = (k_scale, v_scale)
        if (
            hidden != a.hidden
            or tuple(k_cache.shape) != cache_shape
            or tuple(v_cache.shape) != cache_shape
            or tuple(cos.shape) != rope_shape
            or tuple(sin.shape) != rope_shape
            or (key_mask is not None and tuple(key_mask.shape) != (batch, past + seq))
            or any(t is not None and tuple(t.shape) != cache_shape[:3] for t in scales)
        ):
            raise ValueError(
                f"decoder_layer: x {tuple(x.shape)}, caches {tuple(k_cache.shape)} {tuple(v_cache.shape)}, "
                f"cos/sin {tuple(cos.shape)} {tuple(sin.shape)}, key_mask "
                f"{None if key_mask is None else tuple(key_mask.shape)}, scales "
                f"{[None if t is None else tuple(t.shape) for t in scales]} do not fit past={past}"
            )
        cache_dtype = _dtype_name(k_cache)
        if cache_dtype not in _native.CACHE_DTYPES or _dtype_name(v_cache) != cache_dtype:
            raise TypeError(f"decoder_layer: float32 or int8 caches only, got {k_cache.dtype} {v_cache.dtype}")
        if (cache_dtype == "int8") != (k_scale is not None and v_scale is not None):
            raise TypeError("decoder_layer: int8 caches take k_scale and v_scale, float32 caches neither")
        for t in (x, cos, sin, *(t for t in scales if t is not None)):
            if _dtype_name(t) != "float32":
                raise TypeError(f"decoder_layer: float32 buffers only, got {t.dtype}")
        if key_mask is not None and _dtype_name(key_mask) != "int64":
            raise TypeError(f"decoder_layer: key_mask must be int64, got {key_mask.dtype}")
        a.x, a.k_cache, a.v_cache = _ptr(x), _ptr(k_cache), _ptr(v_cache)
        a.k_scale, a.v_scale, a.cache_dtype = _ptr(k_scale), _ptr(v_scale), _native.CACHE_DTYPES[cache_dtype]
        a.cos, a.sin, a.key_mask = _ptr(cos), _ptr(sin), _ptr(key_mask)
        a.batch, a.seq, a.past, a.capacity = batch, seq, past, capacity

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        """Runs the layer on ``x`` (batch, seq, hidden) float32, in place: :meth:`bind`'s arguments."""
        self.bind(*args, **kwargs)
        run_layers([self])


class LayerStack:
    """Decoder layers run in order by one ``ql_decoder_layers`` call (:func:`run_layers`), the pointer array
    to their arguments built once: a model's decode step runs the same layers every time."""

    def __init__(self, layers: list[DecoderLayer]):
        self.layers = list(layers)
        self.args = [layer.args for layer in self.layers]
        self._refs = (ctypes.POINTER(_native.DecoderLayerArgs) * len(self.layers))(
            *(layer._ref for layer in self.layers)
        )

    def __call__(self) -> None:
        status = _lib.ql_decoder_layers(self._refs, len(self.layers))
        if status != 0:
            raise ValueError(f"decoder_layer: core returned {_native.STATUS.get(status, status)}")


class DecoderHead:
    """The step's end after the layers in one ``ql_decoder_head`` call: logits = rmsnorm(x) * ``norm``, then
    the MatMulNBits ``head`` (a dict as :class:`DecoderLayer`'s linears). One native call instead of a torch
    norm and a :func:`matmul_nbits` call (quantlab_kernels.h says why). The caller keeps the tensors alive."""

    def __init__(self, *, norm: Any, head: dict, hidden: int, eps: float, threads: int | None = None):
        if _lib is None:
            raise RuntimeError(f"decoder_head needs the C++ kernels ({_why_not})")
        if _dtype_name(norm) != "float32" or _size(norm) != hidden or head["K"] != hidden:
            raise ValueError(f"decoder_head: norm must be {hidden} float32 values and the head's K {hidden}")
        self.n = head["N"]
        self.args = _native.DecoderHeadArgs(
            norm=_ptr(norm),
            head=_linear_args("head", head),
            hidden=hidden,
            eps=eps,
            path=_native.PATHS["auto"],
            threads=0 if threads is None else int(threads),
        )
        self._keep = [norm, head]
        self._ref = ctypes.pointer(self.args)

    def __call__(self, x: Any) -> Any:
        """x: (..., hidden) contiguous float32 CPU torch tensor -> (..., n) logits, a new tensor."""
        if _dtype_name(x) != "float32" or x.shape[-1] != self.args.hidden or not x.is_contiguous():
            raise ValueError(f"decoder_head: x must be contiguous float32 (..., {self.args.hidden}), got {x.shape}")
        y = x.new_empty((*x.shape[:-1], self.n))
        a = self.args
        a.x, a.logits, a.rows = x.data_ptr(), y.data_ptr(), x.numel() // a.hidden
        status = _lib.ql_decoder_head(self._ref)
        if status != 0:
            raise ValueError(f"decoder_head: core returned {_native.STATUS.get(status, status)}")
        return y


def run_layers(layers: list[DecoderLayer]) -> None:
    """Runs ``layers``, each bound to its step's buffers (:meth:`DecoderLayer.bind`), in order in one
    ``ql_decoder_layers`` call. One call instead of one per layer: between calls the interpreter's data
    has been evicted from the core's caches by the layer's weights, which made the Python between 30
    layer calls cost ~1.3 ms a SmolLM2 decode step against ~0.1 ms with the same code and no kernels
    in between (csrc/include/quantlab_kernels.h)."""
    LayerStack(layers)()


def _cast_like(t: Any, x: Any) -> Any:
    if type(t) is type(x) and t.dtype == x.dtype:
        return t
    if _is_torch(x):
        import torch

        t = t if _is_torch(t) else torch.from_numpy(np.asarray(t))
        return t.to(x.dtype)
    return np.asarray(t).astype(x.dtype, copy=False)


def _numpy_fallback(x, B, scales, zero_points, bias, *, K, N, bits, block_size) -> Any:
    def to_np(t: Any) -> np.ndarray | None:
        if t is None:
            return None
        if _is_torch(t):
            return t.detach().float().cpu().numpy() if t.is_floating_point() else t.detach().cpu().numpy()
        return np.asarray(t)

    y = matmul_nbits_reference(
        to_np(x).astype(np.float32),
        to_np(B),
        to_np(scales).astype(np.float32),
        to_np(zero_points),
        None if bias is None else to_np(bias).astype(np.float32),
        k=K,
        n=N,
        bits=bits,
        block_size=block_size,
    )
    if _is_torch(x):
        import torch

        return torch.from_numpy(y).to(x.dtype)
    return y.astype(x.dtype)
