"""Distributed GPTQ at the Llama-3.2-1B layer shape: one process against Ray shards, and a model of scale.

    python benchmarks/bench_ray.py [--layers 2] [--sequences 16] [--seq-len 512]
        -> benchmarks/results/bench_ray.json and bench_ray.md

1. A random-weight checkpoint with 1B-shaped layers (hidden 2048, MLP 8192, 32 heads, 8 KV heads; a
   4096-token vocabulary: the embedding plays no part in calibration) is written to a temporary folder.
2. Calibrated with w4a16-g128-gptq once in this process (quantlab.calib.calibrate), its phases timed on
   layer 0 (observe: the layer's run and its Hessians; solve: GPTQ; forward: the quantized layer), and
   once on a two-node Ray cluster on this machine's loopback (two `ray start` processes, one CPU each:
   quantlab.distributed.local) with 2 shards. The codes must be the same bytes.
3. What moves per layer (the canonical blocks' Grams and samples in, the codes out) is measured, and the
   scale table extrapolates the per-layer traffic and time to 8B and 70B shapes (assumptions in the output).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # (hidden, intermediate, heads, kv heads, head_dim, layers)
    "1B": (2048, 8192, 32, 8, 64, 16),
    "8B": (4096, 14336, 32, 8, 128, 32),
    "70B": (8192, 28672, 64, 8, 128, 80),
}
RECIPE = "w4a16-g128-gptq"
# The scale model's assumptions (stated in the output).
DEFAULT_TOKENS = 128 * 512  # quantlab's default calibration: 128 sequences of 512 tokens
LINK_BYTES_PER_S = 1.25e9  # 10 Gb/s into the driver
BITS = 4
GROUP = 128


def write_checkpoint(folder: Path, layers: int, vocab: int = 4096) -> Path:
    from safetensors.numpy import save_file

    hidden, ff, heads, kv, hd, _ = SHAPES["1B"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ff,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
        tensors[p + "self_attn.q_proj.weight"] = w(heads * hd, hidden)
        tensors[p + "self_attn.k_proj.weight"] = w(kv * hd, hidden)
        tensors[p + "self_attn.v_proj.weight"] = w(kv * hd, hidden)
        tensors[p + "self_attn.o_proj.weight"] = w(hidden, heads * hd)
        tensors[p + "mlp.gate_proj.weight"] = w(ff, hidden)
        tensors[p + "mlp.up_proj.weight"] = w(ff, hidden)
        tensors[p + "mlp.down_proj.weight"] = w(hidden, ff)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def codes_digest(result) -> str:
    h = hashlib.sha256()
    for name in sorted(result.quantized):
        qw = result.quantized[name]
        for part in (qw.q, qw.scales, qw.zero_points):
            if part is not None:
                h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


def single_process_phases(ckpt, recipe, tokens) -> dict:
    """Layer 0's phases, as quantlab.calib.calibrate runs them."""
    from quantlab.calib.calibrate import ERROR_SAMPLE_TOKENS, METHODS, _quantized_layer
    from quantlab.calib.layerwise import CalibrationResult, LayerRunner, embed_tokens, observe_layer, with_layer_cache

    hidden = embed_tokens(ckpt, tokens)
    batch = max(1, 1024 // tokens.shape[1])
    result = CalibrationResult()
    fp = with_layer_cache(ckpt, 0)
    t0 = time.perf_counter()
    _, stats = observe_layer(
        LayerRunner(fp, 0, outputs="taps"), hidden, batch=batch, hessians=True, samples=ERROR_SAMPLE_TOKENS,
        absmax=False, seed=0, outputs=None,
    )  # fmt: skip
    t1 = time.perf_counter()
    METHODS["gptq"](fp, 0, stats, recipe, result)
    t2 = time.perf_counter()
    runner = _quantized_layer(ckpt, 0, recipe, result, None)
    for start in range(0, hidden.shape[0], batch):
        hidden[start : start + batch], _ = runner.run(hidden[start : start + batch])
    t3 = time.perf_counter()
    codes = sum(
        result.quantized[n].q.size * BITS // 8 + result.quantized[n].scales.nbytes
        + (0 if result.quantized[n].zero_points is None else result.quantized[n].zero_points.size * BITS // 8)
        for n in result.quantized
    )  # fmt: skip
    return {"observe_s": t1 - t0, "solve_s": t2 - t1, "forward_s": t3 - t2, "codes_bytes": codes}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[tuple[float, str]] = []

    def emit(self, record):
        self.messages.append((record.created, record.getMessage()))


def reduce_rate() -> float:
    """Bytes of float32 Gram folded into the float64 sum per second (quantlab.quant.gram.OrderedGramSum)."""
    from quantlab.quant.gram import OrderedGramSum, upper_size

    k = 8192
    block = np.random.default_rng(0).standard_normal(upper_size(k), dtype=np.float32)
    acc = OrderedGramSum(k)
    acc.add(block, 1)
    t = time.perf_counter()
    for _ in range(3):
        acc.add(block, 1)
    return 3 * block.nbytes / (time.perf_counter() - t)


def layer_model(shape: str) -> dict:
    """Per-layer quantities of a shape: parameters, Gram widths, traffic."""
    from quantlab.calib.blocks import CANONICAL_BLOCKS
    from quantlab.calib.calibrate import ERROR_SAMPLE_TOKENS
    from quantlab.quant.gram import upper_size

    hidden, ff, heads, kv, hd, layers = SHAPES[shape]
    q, kvw = heads * hd, kv * hd
    stacks = {  # input width K -> rows solved against that Hessian
        "qkv": (hidden, q + 2 * kvw),
        "o": (q, hidden),
        "gate_up": (hidden, 2 * ff),
        "down": (ff, hidden),
    }
    params = sum(k * n for k, n in stacks.values())
    grams = sum(upper_size(k) * 4 for k, _ in stacks.values())
    widths = sum(k for k, _ in stacks.values())
    codes = params * BITS // 8 + params // GROUP * (4 + BITS / 8)  # packed codes, fp32 scale, 4-bit zero point
    return {
        "layers": layers,
        "params_per_layer": params,
        "hessian_bytes_per_layer": sum(k * k * 4 for k, _ in stacks.values()),
        "stats_in_bytes_per_layer": CANONICAL_BLOCKS * grams + ERROR_SAMPLE_TOKENS * 4 * widths,
        "codes_bytes_per_layer": int(codes),
        "gram_flops_per_token": sum(k * k for k, _ in stacks.values()),  # the upper half, x2 for multiply-add
        "solve_flops": {name: k * k * (k / 3 + n) * 2 for name, (k, n) in stacks.items()},
    }


def extrapolate(phases: dict, rate: float, nodes_list=(1, 2, 4, 8)) -> dict:
    """Time per layer at N nodes, from layer 0's measured phases at the 1B shape on this machine."""
    base = layer_model("1B")
    per_token_obs = phases["observe_s"] / phases["tokens"]
    per_token_fwd = phases["forward_s"] / phases["tokens"]
    solve_rate = sum(base["solve_flops"].values()) / phases["solve_s"]  # flop/s of GPTQ here
    work_1b = 2 * base["params_per_layer"] + 2 * base["gram_flops_per_token"]  # observe flops per token
    out = {}
    for shape in SHAPES:
        m = layer_model(shape)
        scale = (2 * m["params_per_layer"] + 2 * m["gram_flops_per_token"]) / work_1b
        fwd_scale = m["params_per_layer"] / base["params_per_layer"]
        solves = sorted(m["solve_flops"].values(), reverse=True)
        rows = {}
        for n in nodes_list:
            loads = [0.0] * n  # largest first, each to the least loaded node
            for f in solves:
                loads[loads.index(min(loads))] += f / solve_rate
            shards = min(n, 8)
            observe = (per_token_obs * scale + per_token_fwd * fwd_scale) * DEFAULT_TOKENS / shards
            traffic = m["stats_in_bytes_per_layer"] + n * m["codes_bytes_per_layer"] if n > 1 else 0
            transfer = traffic / LINK_BYTES_PER_S
            reduce = (m["stats_in_bytes_per_layer"] / rate) if n > 1 else 0
            per_layer = observe + transfer + reduce + (max(loads) if n > 1 else sum(solves) / solve_rate)
            rows[str(n)] = {
                "seconds_per_layer": round(per_layer, 1),
                "hours_per_model": round(per_layer * m["layers"] / 3600, 2),
                "traffic_bytes_per_layer": int(traffic),
            }
        out[shape] = {**{k: v for k, v in m.items() if k != "solve_flops"}, "nodes": rows}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args()

    from quantlab.calib.calibrate import calibrate
    from quantlab.distributed.calibrate import calibrate_on_cluster
    from quantlab.distributed.local import LocalCluster
    from quantlab.io import load_checkpoint
    from quantlab.recipe import load_recipe

    recipe = load_recipe(RECIPE)
    tokens = np.random.default_rng(1).integers(3, 4096, (args.sequences, args.seq_len), dtype=np.int64)
    doc = {"machine": machine(), "recipe": RECIPE, "layers": args.layers, "tokens": int(tokens.size)}
    records = _Records()
    for name in ("quantlab.calib.calibrate", "quantlab.distributed.calibrate"):
        logging.getLogger(name).addHandler(records)
        logging.getLogger(name).setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        folder = write_checkpoint(Path(tmp) / "llama-1b-shaped", args.layers)
        ckpt = load_checkpoint(folder)
        phases = single_process_phases(ckpt, recipe, tokens)
        phases["tokens"] = int(tokens.size)
        doc["single_layer0_phases"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in phases.items()}
        print("layer 0 phases (one process):", doc["single_layer0_phases"], flush=True)

        t = time.perf_counter()
        single = calibrate(ckpt, recipe, tokens, progress=False)
        doc["single_process"] = {"seconds": round(time.perf_counter() - t, 1)}
        doc["single_process"]["seconds_per_layer"] = round(doc["single_process"]["seconds"] / args.layers, 1)
        print("one process:", doc["single_process"], flush=True)

        cluster = LocalCluster()
        try:
            cluster.start_head()
            cluster.add_worker("worker")
            os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.token)
            records.messages.clear()
            t = time.perf_counter()
            distributed = calibrate_on_cluster(
                ckpt, recipe, tokens, source={"path": str(folder)}, address=cluster.address, shards=args.shards,
                progress=False,
            )  # fmt: skip
            total = time.perf_counter() - t
        finally:
            cluster.stop()
        layers = []
        for _, message in records.messages:
            m = re.match(r"layer (\d+): observed in ([\d.]+) s \(([\d.]+) MB .*decided in ([\d.]+) s", message)
            if m:
                layers.append({"observe_s": float(m[2]), "stats_in_mb": float(m[3]), "decide_s": float(m[4])})
        doc["ray"] = {
            "nodes": 2,
            "cpus_per_node": 1,
            "shards": args.shards,
            "seconds_total_with_startup": round(total, 1),
            "layers": layers,
            "seconds_per_layer": round(sum(x["observe_s"] + x["decide_s"] for x in layers) / max(1, len(layers)), 1),
            "same_codes_as_single_process": codes_digest(distributed) == codes_digest(single),
        }
        print("ray:", doc["ray"], flush=True)
    rate = reduce_rate()
    doc["reduce_bytes_per_s"] = round(rate)
    doc["scale"] = extrapolate(phases, rate)
    doc["assumptions"] = [
        f"calibration of {DEFAULT_TOKENS} tokens (128 x 512), {RECIPE}, {len(SHAPES)} Llama shapes (GQA, 8 KV heads)",
        "a node computes like this whole 2-core machine; observation (layer run + Hessians) scales with "
        "2 x (params + sum K^2) flops per token and with the tokens per shard (at most 8 shards: 8 canonical blocks)",
        "GPTQ solves scale with K^2 (K/3 + N) flops at the rate measured on layer 0; on N nodes they are placed "
        "largest first on the least loaded node (down_proj's bounds the layer)",
        f"traffic into the driver per layer: 8 blocks x the upper-half float32 Grams + 512 sampled tokens per "
        f"input, and the codes out to every node, at {LINK_BYTES_PER_S * 8 / 1e9:.0f} Gb/s; the float64 block "
        "reduction at the rate measured here",
        "not modelled: Ray start-up (seconds per run), replays after a failure, memory (a shard holds its "
        "tokens' hidden states: 128 x 512 x hidden x 4 B / shards)",
    ]
    save(RESULTS / "bench_ray.json", doc)
    print(json.dumps(doc["scale"], indent=1))


if __name__ == "__main__":
    main()
