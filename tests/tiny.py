"""Tiny random-weight decoders built in code, and a way to run any built graph in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantlab.emit.artifact import genai_config, save_model, write_json
from quantlab.io.spec import Checkpoint, ModelSpec
from quantlab.runtime.generate import OrtDecoder


class ArraySource:
    """A TensorSource over in-memory arrays (canonical names, torch (out, in) layout)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def names(self) -> list[str]:
        return list(self.arrays)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.arrays[name].shape)

    def load(self, name: str) -> np.ndarray:
        return np.array(self.arrays[name], dtype=np.float32)


def tiny_checkpoint(
    seed: int = 0, *, hidden=64, ff=96, layers=2, heads=4, kv_heads=2, vocab=96, tie=False, outliers: bool = True
) -> Checkpoint:
    """A random Llama-shaped checkpoint; with ``outliers`` a few hidden channels carry large activations,
    as real LLMs do, so calibrated methods have something to find."""
    rng = np.random.default_rng(seed)
    spec = ModelSpec(
        family="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ff,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_ids=(2,),
    )
    arrays = {}
    for name, shape in spec.expected_shapes().items():
        if name.endswith("norm.weight"):
            w = rng.uniform(0.8, 1.2, shape)
            if outliers:
                w[rng.choice(shape[0], 3, replace=False)] *= 8.0
        else:
            w = rng.normal(0, 1 / np.sqrt(shape[-1]), shape)
        arrays[name] = w.astype(np.float32)
    return Checkpoint(spec=spec, tensors=ArraySource(arrays), tokenizer=None, source_format="test")


def run_decoder(
    model: ir.Model, ckpt: Checkpoint, folder: Path, ids: np.ndarray, session_config: dict[str, str] | None = None
) -> np.ndarray:
    """Save ``model`` into ``folder`` and return its logits for ``ids`` (batch, seq) from an empty cache."""
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder, progress=False)
    write_json(folder / "genai_config.json", genai_config(ckpt))
    decoder = OrtDecoder(folder, session_config=session_config)
    logits, _ = decoder.forward(ids, decoder.empty_cache(ids.shape[0]))
    return logits
