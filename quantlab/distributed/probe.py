"""The startup probe: does a node compute the same bytes as the driver?

A distributed calibration is the bytes of a single-process one only if every node's arithmetic is the
driver's: the same onnxruntime build and kernels (MLAS picks them by ISA), the same MKL code path for
GPTQ's factorization, the same numpy. So before any shard starts, every node with CPUs calibrates a
small synthetic two-layer model with the user's recipe, through the same functions a calibration uses
(observation, canonical-block Hessians, the method's solve, the quantized layer's forward), and hashes
the integers it decided: layer 1's depend on layer 0's quantized outputs, so the hash covers all of it.
A node whose hash differs from the driver's is refused, by name.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from quantlab.io.spec import Checkpoint, ModelSpec
from quantlab.recipe import Recipe

# The probe model: widths that are multiples of every group size quantlab's schemes use (32, 64, 128),
# big enough that MLAS and MKL take their blocked (ISA-specific) paths.
PROBE_DIMS = dict(hidden=256, ff=512, heads=4, kv_heads=2, vocab=128, layers=2)
PROBE_TOKENS = (8, 64)  # sequences, tokens each
PROBE_BATCH = 2  # sequences per run: four runs, so the probe crosses canonical blocks too


class _Arrays:
    """A TensorSource over in-memory float32 arrays."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def names(self) -> list[str]:
        return list(self.arrays)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.arrays[name].shape)

    def load(self, name: str) -> np.ndarray:
        return np.array(self.arrays[name], dtype=np.float32)


def probe_checkpoint(seed: int = 20) -> Checkpoint:
    d = PROBE_DIMS
    spec = ModelSpec(
        family="llama",
        vocab_size=d["vocab"],
        hidden_size=d["hidden"],
        intermediate_size=d["ff"],
        num_layers=d["layers"],
        num_heads=d["heads"],
        num_kv_heads=d["kv_heads"],
        head_dim=d["hidden"] // d["heads"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=PROBE_TOKENS[1],
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_ids=(2,),
    )
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in spec.expected_shapes().items():
        if name.endswith("norm.weight"):
            w = rng.uniform(0.8, 1.2, shape)
            w[rng.choice(shape[0], 3, replace=False)] *= 8.0  # outlier channels, as real models have
        else:
            w = rng.normal(0, 1 / np.sqrt(shape[-1]), shape)
        arrays[name] = w.astype(np.float32)
    return Checkpoint(spec=spec, tensors=_Arrays(arrays), tokenizer=None, source_format="probe")


def probe_digest(recipe: Recipe) -> str:
    """SHA-256 of what ``recipe``'s calibration decides for the probe model on this machine."""
    from quantlab.calib.calibrate import calibrate

    ckpt = probe_checkpoint()
    tokens = np.random.default_rng(21).integers(3, PROBE_DIMS["vocab"], PROBE_TOKENS, dtype=np.int64)
    recipe = dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration, seed=0))
    result = calibrate(ckpt, recipe, tokens, batch=PROBE_BATCH, progress=False)
    h = hashlib.sha256()
    for name in sorted(result.quantized):
        qw = result.quantized[name]
        for part in (qw.q, qw.scales, qw.zero_points):
            if part is not None:
                h.update(np.ascontiguousarray(part).tobytes())
    for name in sorted(result.int8):
        for part in result.int8[name]:
            h.update(np.ascontiguousarray(part).tobytes())
    for name in sorted(result.float_overrides):
        h.update(np.ascontiguousarray(result.float_overrides[name]).tobytes())
    h.update(np.asarray(result.layer_errors, np.float64).tobytes())
    return h.hexdigest()
