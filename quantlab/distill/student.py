"""Write a trained student as a Hugging Face folder that ``quantlab convert`` (and transformers) can read.

    student/
      config.json                 a LlamaForCausalLM-style config (the family's architecture name)
      model.safetensors           every float tensor; a quantized linear's weight is its dequantized codes
      quantization.safetensors    per quantized linear: {name}.codes (N, K) uint8, {name}.scales (N, G) f32,
                                  {name}.zero_points (N, G) uint8 (asymmetric only)
      quantization.json           {"format": "quantlab-prequantized", "version": 1, "recipe": {...}, "linears": [...]}
      tokenizer files             the teacher's, as quantlab's HF reader expects them
      distill.json                how the student was trained (config, losses, data), for provenance

``convert student/`` reads the codes and emits them as they are (no re-rounding): see
``quantlab.io.hf.read_prequantized``. A llama2.c teacher's adjacent-pair RoPE rows of q_proj / k_proj
are permuted into the Hugging Face half-split layout on the way out (codes, scales and zero points
move with their rows, so nothing is re-quantized); attention scores are unchanged by it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from quantlab.emit.staging import staged_output
from quantlab.io.common import hf_config_for_spec
from quantlab.io.hf import MODEL_TYPES, PREQUANTIZED_FORMAT, QUANTIZATION_FILE, QUANTIZATION_WEIGHTS
from quantlab.io.spec import ModelSpec, TokenizerSpec
from quantlab.quant.rtn import QuantizedWeight


def half_split_rows(spec: ModelSpec, heads: int) -> np.ndarray:
    """Row order taking adjacent-pair RoPE rows (2i, 2i+1) to half-split rows (i, i + d/2), per head."""
    d = spec.head_dim
    within = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])  # new row j <- old row within[j]
    return (np.arange(heads)[:, None] * d + within[None, :]).reshape(-1)


def _rope_rows(spec: ModelSpec, name: str) -> np.ndarray | None:
    if not spec.rope_interleaved:
        return None
    if ".self_attn.q_proj." in name or name.endswith(".self_attn.q_proj"):
        return half_split_rows(spec, spec.num_heads)
    if ".self_attn.k_proj." in name or name.endswith(".self_attn.k_proj"):
        return half_split_rows(spec, spec.num_kv_heads)
    return None


def hf_config(spec: ModelSpec) -> dict:
    """A transformers config.json for the spec (the half-split RoPE layout), in the spec's own family."""
    config = hf_config_for_spec(spec)
    config["architectures"] = [MODEL_TYPES[spec.family]]
    config["model_type"] = spec.family
    if spec.family not in ("llama", "qwen3"):
        del config["attention_bias"]  # Qwen2's biases are implied, Mistral has none
    if spec.family != "llama":
        del config["mlp_bias"]
    if spec.family == "mistral":
        config["sliding_window"] = None
    for key in ("bos_token_id", "eos_token_id"):
        if config[key] is None:
            del config[key]
    return config


def _permute_quantized(qw: QuantizedWeight, rows: np.ndarray) -> QuantizedWeight:
    zp = None if qw.zero_points is None else np.ascontiguousarray(qw.zero_points[rows])
    return QuantizedWeight(
        np.ascontiguousarray(qw.q[rows]), np.ascontiguousarray(qw.scales[rows]), zp, qw.bits, qw.group_size
    )


def save_student(
    out_dir: str | os.PathLike,
    spec: ModelSpec,
    tensors: dict[str, np.ndarray],
    tokenizer: TokenizerSpec | None,
    *,
    quantized: dict[str, QuantizedWeight] | None = None,
    recipe: dict | None = None,
    provenance: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the student folder (layout: module docstring) through a staging folder; returns it."""
    from safetensors.numpy import save_file

    from quantlab.runtime.tokenizer import write_tokenizer_files

    out_spec = dataclasses.replace(spec, rope_interleaved=False)
    floats = {}
    for name, array in tensors.items():
        rows = _rope_rows(spec, name)
        floats[name] = np.ascontiguousarray(array if rows is None else array[rows], dtype=np.float32)
    with staged_output(out_dir, overwrite=overwrite) as stage:
        (stage / "config.json").write_text(json.dumps(hf_config(out_spec), indent=2) + "\n", encoding="utf-8")
        save_file(floats, str(stage / "model.safetensors"))
        if quantized:
            arrays = {}
            for linear, qw in sorted(quantized.items()):
                rows = _rope_rows(spec, linear)
                qw = qw if rows is None else _permute_quantized(qw, rows)
                arrays[f"{linear}.codes"] = np.ascontiguousarray(qw.q, dtype=np.uint8)
                arrays[f"{linear}.scales"] = np.ascontiguousarray(qw.scales, dtype=np.float32)
                if qw.zero_points is not None:
                    arrays[f"{linear}.zero_points"] = np.ascontiguousarray(qw.zero_points, dtype=np.uint8)
            save_file(arrays, str(stage / QUANTIZATION_WEIGHTS))
            description = {
                "format": PREQUANTIZED_FORMAT,
                "version": 1,
                "recipe": recipe,
                "linears": sorted(quantized),
            }
            (stage / QUANTIZATION_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            write_tokenizer_files(tokenizer, stage)
        if provenance is not None:
            (stage / "distill.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return Path(out_dir)
