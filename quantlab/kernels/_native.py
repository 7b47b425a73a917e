"""ctypes binding of the C++ core ``_libquantlab_kernels.so`` (csrc/include/quantlab_kernels.h)."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

ABI_VERSION = 8
LIB_NAME = "_libquantlab_kernels.so"
CUDA_LIB_NAME = "_libquantlab_cuda.so"
# Overrides the library location (a build directory's copy, for example).
ENV_LIB = "QUANTLAB_KERNELS_LIB"
# "1" forces the numpy fallback (tests of the fallback, debugging).
ENV_DISABLE = "QUANTLAB_KERNELS_DISABLE"

DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}
PATHS = {"auto": 0, "scalar": 1, "avx2": 2, "neon": 3, "neon_dot": 4, "avx_vnni": 5, "avx512_vnni": 6, "amx": 7}
PATH_NAMES = {v: k for k, v in PATHS.items()}
STATUS = {0: "ok", 1: "invalid argument", 2: "unsupported", 3: "internal error"}


class MatMulNBitsArgs(ctypes.Structure):
    """Mirror of ``ql_matmul_nbits_args``."""

    _fields_ = [
        ("a", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("zero_points", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("m", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("bits", ctypes.c_int32),
        ("block_size", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("accuracy", ctypes.c_int32),
        ("path", ctypes.c_int32),
        ("threads", ctypes.c_int32),
    ]


class GPTQColumnsArgs(ctypes.Structure):
    """Mirror of ``ql_gptq_columns_args``."""

    _fields_ = [
        ("w", ctypes.c_void_p),
        ("hinv", ctypes.c_void_p),
        ("err", ctypes.c_void_p),
        ("q", ctypes.c_void_p),
        ("codes", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("reciprocals", ctypes.c_void_p),
        ("zero_points", ctypes.c_void_p),
        ("group_of_column", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("block", ctypes.c_int64),
        ("begin", ctypes.c_int64),
        ("end", ctypes.c_int64),
        ("ld_hinv", ctypes.c_int64),
        ("max_code", ctypes.c_int32),
        ("threads", ctypes.c_int32),
    ]


class LinearArgs(ctypes.Structure):
    """Mirror of ``ql_linear`` (one MatMulNBits weight of a decoder layer; ``b`` None: absent)."""

    _fields_ = [
        ("b", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("zero_points", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("k", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("bits", ctypes.c_int32),
        ("block_size", ctypes.c_int32),
        ("accuracy", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    ]


LAYER_LINEARS = ("qkv", "q", "k", "v", "o", "gate_up", "gate", "up", "down")


class DecoderLayerArgs(ctypes.Structure):
    """Mirror of ``ql_decoder_layer_args``."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("k_scale", ctypes.c_void_p),
        ("v_scale", ctypes.c_void_p),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("key_mask", ctypes.c_void_p),
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("q_norm", ctypes.c_void_p),
        ("k_norm", ctypes.c_void_p),
        *[(name, LinearArgs) for name in LAYER_LINEARS],
        ("batch", ctypes.c_int64),
        ("seq", ctypes.c_int64),
        ("past", ctypes.c_int64),
        ("capacity", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("intermediate", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("rope_interleaved", ctypes.c_int32),
        ("path", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("cache_dtype", ctypes.c_int32),
    ]


class DecoderHeadArgs(ctypes.Structure):
    """Mirror of ``ql_decoder_head_args``."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("norm", ctypes.c_void_p),
        ("head", LinearArgs),
        ("logits", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("path", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    ]


CACHE_DTYPES = {"float32": 0, "int8": 1}  # ql_cache_dtype, by the cache tensors' dtype


def _candidates(name: str) -> list[Path]:
    here = Path(__file__).resolve().parent
    found = [here / name]
    env = os.environ.get(ENV_LIB if name == LIB_NAME else "QUANTLAB_CUDA_LIB")
    if env:
        found.insert(0, Path(env))
    return found


def load_core() -> tuple[ctypes.CDLL | None, str]:
    """Loads the core library; returns (library or None, why not)."""
    if os.environ.get(ENV_DISABLE) == "1":
        return None, f"disabled by {ENV_DISABLE}=1"
    reasons = []
    for path in _candidates(LIB_NAME):
        if not path.is_file():
            reasons.append(f"{path} not found")
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as err:
            reasons.append(f"{path}: {err}")
            continue
        lib.ql_abi_version.restype = ctypes.c_int
        if lib.ql_abi_version() != ABI_VERSION:
            reasons.append(f"{path}: ABI {lib.ql_abi_version()} != {ABI_VERSION} (stale build)")
            continue
        lib.ql_matmul_nbits.argtypes = [ctypes.POINTER(MatMulNBitsArgs)]
        lib.ql_matmul_nbits.restype = ctypes.c_int
        lib.ql_decoder_layer.argtypes = [ctypes.POINTER(DecoderLayerArgs)]
        lib.ql_decoder_layer.restype = ctypes.c_int
        lib.ql_decoder_layers.argtypes = [ctypes.POINTER(ctypes.POINTER(DecoderLayerArgs)), ctypes.c_int32]
        lib.ql_decoder_layers.restype = ctypes.c_int
        lib.ql_decoder_head.argtypes = [ctypes.POINTER(DecoderHeadArgs)]
        lib.ql_decoder_head.restype = ctypes.c_int
        lib.ql_gptq_columns.argtypes = [ctypes.POINTER(GPTQColumnsArgs)]
        lib.ql_gptq_columns.restype = ctypes.c_int
        lib.ql_path_available.argtypes = [ctypes.c_int32]
        lib.ql_path_available.restype = ctypes.c_int
        lib.ql_best_path.restype = ctypes.c_int
        lib.ql_build_info.restype = ctypes.c_char_p
        lib.ql_path_features.argtypes = [ctypes.c_int32]
        lib.ql_path_features.restype = ctypes.c_char_p
        lib.ql_cpu_features.restype = ctypes.c_char_p
        return lib, ""
    return None, "; ".join(reasons)


def load_cuda() -> ctypes.CDLL | None:
    """Loads the CUDA library if it was built (QUANTLAB_CUDA=ON); None otherwise."""
    for path in _candidates(CUDA_LIB_NAME):
        if path.is_file():
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as err:
                logger.debug("cannot load %s: %s", path, err)
                continue
            lib.qlc_matmul_nbits_f16.restype = ctypes.c_int
            lib.qlc_matmul_nbits_f16.argtypes = [
                ctypes.c_void_p,  # a (m, k) f16, device
                ctypes.c_void_p,  # b (n, k_blocks, blob) uint8, device
                ctypes.c_void_p,  # scales (n, k_blocks) f16, device
                ctypes.c_void_p,  # zero_points packed uint8 or NULL, device
                ctypes.c_void_p,  # y (m, n) f16, device
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_int32,  # block_size
                ctypes.c_void_p,  # cudaStream_t
            ]
            return lib
    return None
