"""Quantization cost on a Llama-3.2-1B-shaped model with RANDOM weights (speed and memory only).

    python benchmarks/bench_quantize.py [--layers 16] [--samples 128] [--seq-len 512]

Writes a random-weight Hugging Face folder (bf16 safetensors, one shard per layer) with the
Llama-3.2-1B shapes, then times `quantlab convert` in fresh processes:

- RTN: ``--recipe w4a16-g128-asym``
- GPTQ: w4a16-g128 with ``samples x seq_len`` calibration tokens (random ids), sequential and not

and records wall time and peak RSS (wait4's ru_maxrss) into benchmarks/results/quantize_1b.json.
Targets on the 2-core machine: RTN <= 2 min, GPTQ <= 20 min, peak RSS <= 3 GB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine, run_convert, save  # noqa: E402  (benchmarks/ is the script folder)

REPO = Path(__file__).resolve().parents[1]

LLAMA_3_2_1B = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    tie_word_embeddings=True,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    bos_token_id=128000,
    eos_token_id=128001,
    torch_dtype="bfloat16",
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
)


def _bf16(rng: np.random.Generator, shape, std: float) -> np.ndarray:
    """Random normal values as raw bfloat16 bits (uint16): the top half of each float32."""
    x = (rng.standard_normal(shape, dtype=np.float32) * std).view(np.uint32)
    return (x >> 16).astype(np.uint16)


def write_random_model(folder: Path, layers: int, seed: int = 0) -> None:
    """A Llama-3.2-1B-shaped HF folder, one safetensors shard per layer, never the whole model in memory."""
    cfg = dict(LLAMA_3_2_1B, num_hidden_layers=layers)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(seed)
    h, ff, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * cfg["head_dim"]
    weight_map = {}

    def shard(name: str, tensors: dict) -> None:
        _write_bf16_safetensors(folder / name, tensors)
        weight_map.update({k: name for k in tensors})

    shard(
        "embed.safetensors",
        {
            "model.embed_tokens.weight": _bf16(rng, (cfg["vocab_size"], h), 0.02),
            "model.norm.weight": _bf16(rng, (h,), 0.0) | np.uint16(0x3F80),
        },
    )
    for i in range(layers):
        p = f"model.layers.{i}."
        shard(
            f"layer{i:02d}.safetensors",
            {
                p + "input_layernorm.weight": np.full(h, 0x3F80, np.uint16),
                p + "post_attention_layernorm.weight": np.full(h, 0x3F80, np.uint16),
                p + "self_attn.q_proj.weight": _bf16(rng, (h, h), 0.02),
                p + "self_attn.k_proj.weight": _bf16(rng, (kv, h), 0.02),
                p + "self_attn.v_proj.weight": _bf16(rng, (kv, h), 0.02),
                p + "self_attn.o_proj.weight": _bf16(rng, (h, h), 0.02),
                p + "mlp.gate_proj.weight": _bf16(rng, (ff, h), 0.02),
                p + "mlp.up_proj.weight": _bf16(rng, (ff, h), 0.02),
                p + "mlp.down_proj.weight": _bf16(rng, (h, ff), 0.02),
            },
        )
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _write_bf16_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """safetensors with BF16 tensors given as uint16 bit patterns (numpy has no bfloat16)."""
    header, offset = {}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--skip", nargs="*", default=[], choices=["rtn", "gptq", "gptq-parallel"])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quantize_1b.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="quantlab-bench-1b-"))
    try:
        t0 = time.perf_counter()
        write_random_model(work / "hf", args.layers)
        print(f"random Llama-3.2-1B-shaped model ({args.layers} layers) written in {time.perf_counter() - t0:.0f}s")
        tokens = np.random.default_rng(0).integers(0, LLAMA_3_2_1B["vocab_size"], (args.samples, args.seq_len))
        np.save(work / "calib.npy", tokens)
        results = {}
        if "rtn" not in args.skip:
            results["rtn_w4a16_g128"] = run_convert(
                [str(work / "hf"), "-o", str(work / "rtn"), "--recipe", "w4a16-g128-asym", "--no-eval"]
            )
            print("rtn", results["rtn_w4a16_g128"])
            shutil.rmtree(work / "rtn")
        for mode, sequential in (("gptq", "true"), ("gptq-parallel", "false")):
            if mode in args.skip:
                continue
            recipe = work / f"{mode}.toml"
            recipe.write_text(
                f'scheme = "w4a16-g128-asym-gptq"\n[calibration]\nsamples = {args.samples}\n'
                f"seq_len = {args.seq_len}\n[gptq]\nsequential = {sequential}\n"
            )
            key = f"{mode.replace('-', '_')}_w4a16_g128"
            results[key] = run_convert(
                [
                    str(work / "hf"),
                    "-o",
                    str(work / mode),
                    "--recipe",
                    str(recipe),
                    "--calib",
                    str(work / "calib.npy"),
                    "--no-eval",
                ]
            )
            print(mode, results[key])
            shutil.rmtree(work / mode)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out.exists():  # a run that skips some modes keeps the earlier figures for them
        results = {**json.loads(args.out.read_text()).get("results", {}), **results}
    doc = {
        "benchmark": "quantize_1b",
        "model": f"Llama-3.2-1B-shaped, RANDOM weights, {args.layers} layers (speed and memory only)",
        "calibration_tokens": [args.samples, args.seq_len],
        "targets": {"rtn_wall_s": 120, "gptq_wall_s": 1200, "peak_rss_bytes": 3 * 2**30},
        "machine": machine(),
        "results": results,
    }
    save(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
