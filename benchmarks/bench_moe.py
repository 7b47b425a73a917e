"""Sparse (Mixture-of-Experts) models against dense ones: parameters, bytes a decode step streams, TPOT.

    python benchmarks/bench_moe.py                 # the full run (about 10 min on 2 cores) and README.md's table
    python benchmarks/bench_moe.py --render        # table, plot and README block from results/moe_qwen3.json

Three RANDOM-weight models (speed and accounting only, no quality) written with transformers'
``save_pretrained`` and converted by quantlab:

    moe           Qwen3-MoE: every layer sparse, ``experts`` experts of ``moe_ff``, top ``top_k``, renormalized
    dense-total   Qwen3 with intermediate = experts x moe_ff: the MoE's TOTAL parameters (less its routers)
    dense-active  Qwen3 with intermediate = top_k x moe_ff: the MoE's ACTIVE parameters (less its routers)

The three share everything but the MLP (hidden, layers, attention, vocabulary, an untied head), so they
differ exactly in the experts. Each is converted with every ``--recipes`` entry in two graphs:
``fused`` (GroupQueryAttention and ``com.microsoft.MoE``, which runs only the chosen experts) and
``plain`` (opset-21 attention and the decomposed MoE, which computes every expert and weights the
unselected ones by 0). The sparse MLP's form follows ``--attention``: quantlab exposes no separate switch.

Per artifact (:func:`step_bytes`): the bytes a decode step streams at the mean context of the measured steps
(prompt + gen / 2) as the graph's ops read them, and as a sparse kernel must read them (only the top_k
chosen experts of every layer; ``sparse``), split into experts, other weights (attention, routers, norms,
head), one embedding row, graph constants and the KV cache read. TPOT comes from ``quantlab bench``'s runner
(onnxruntime, fresh worker process per artifact, median over the decode steps of every run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import moe_report  # noqa: E402  (beside this script)
from common import save  # noqa: E402

logger = logging.getLogger("bench_moe")

MODELS = ("moe", "dense-total", "dense-active")
GRAPHS = {
    "fused": "GroupQueryAttention + com.microsoft.MoE (only the chosen experts run)",
    "plain": "opset-21 attention + decomposed MoE (every expert computed, unselected ones weighted 0)",
}
RECIPES = ("fp32", "w4a16-g128-asym")
RESULT_NAME = "moe_qwen3"
# Ops that read only the rows they are given: an embedding step reads one row, a gather of experts k of them
_GATHER_OPS = {"Gather", "GatherBlockQuantized", "GatherElements", "GatherND"}
_SPARSE_EXPERT_OPS = {"MoE", "QMoE"} | _GATHER_OPS
_EXPERT_TENSOR = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.")


@dataclasses.dataclass(frozen=True)
class Shape:
    """The shared shape of the three models; the MLP is the only difference between them."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int
    top_k: int
    moe_ff: int
    max_positions: int = 2048


# ~408M total parameters, ~89M active (4 of 64 experts, 1/16 as Qwen3-30B-A3B's 8 of 128); fp32 artifacts 1.6 GB
FULL = Shape(hidden=768, layers=12, heads=12, kv_heads=4, head_dim=64, vocab=32000, experts=64, top_k=4, moe_ff=192)
TINY = Shape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=256, experts=8, top_k=2, moe_ff=32)


def hf_config(shape: Shape, model: str):
    """The transformers config of one of MODELS."""
    import transformers

    common = dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,
    )
    if model == "moe":
        return transformers.Qwen3MoeConfig(
            **common,
            intermediate_size=shape.experts * shape.moe_ff,  # unused: no layer is dense
            num_experts=shape.experts,
            num_experts_per_tok=shape.top_k,
            moe_intermediate_size=shape.moe_ff,
            norm_topk_prob=True,  # as Qwen3-30B-A3B
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    experts = {"dense-total": shape.experts, "dense-active": shape.top_k}[model]
    return transformers.Qwen3Config(**common, intermediate_size=experts * shape.moe_ff)


def write_random_model(shape: Shape, model: str, folder: Path, seed: int = 0) -> None:
    """A random-weight HF folder (safetensors, fp32) of one of MODELS; written beside, then renamed."""
    import torch
    import transformers

    config = hf_config(shape, model)
    cls = transformers.Qwen3MoeForCausalLM if model == "moe" else transformers.Qwen3ForCausalLM
    torch.manual_seed(seed)
    hf = cls(config).eval()
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    hf.save_pretrained(partial, safe_serialization=True)
    del hf
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def parameter_counts(hf_folder: Path) -> dict:
    """Total and active parameters of an HF folder, from its tensors' shapes (nothing loaded).

    Active: what one token uses, every tensor but the routed experts, which count top_k / experts of their
    parameters (model cards count the embedding in both, as here)."""
    from quantlab.io import load_checkpoint

    ckpt = load_checkpoint(hf_folder)
    spec, tensors = ckpt.spec, ckpt.tensors
    counts = {"total": 0, "routed_experts": 0, "embedding": 0}
    for name in tensors.names():
        n = 1
        for d in tensors.shape(name):
            n *= d
        counts["total"] += n
        if _EXPERT_TENSOR.match(name):
            counts["routed_experts"] += n
        elif name == "model.embed_tokens.weight":
            counts["embedding"] += n
    unused = counts["routed_experts"] * (spec.num_experts - spec.experts_per_token) // max(spec.num_experts, 1)
    counts["active"] = counts["total"] - unused
    counts["experts"], counts["top_k"] = spec.num_experts, spec.experts_per_token
    return counts


def step_bytes(artifact: Path, context: int) -> dict:
    """Bytes one decode step streams with ``context`` tokens in the KV cache, read from the graph.

    An initializer is an expert tensor when a MoE/QMoE node reads it as a weight, or its name holds
    ``.mlp.experts.``: the sparse op and a gather of experts read top_k / experts of it, the decomposed
    graph all of it (``graph``); a sparse kernel needs top_k / experts in either graph (``sparse``). A table
    read only by Gather streams one row. Weights are the other initializers named after the model's
    tensors (``model.``/``lm_head.``), constants the graph's own (RoPE frequencies, shapes, scalars).
    The cache read is layers x 2 (K, V) x kv_heads x context x head_dim elements of the cache's type.
    """
    import numpy as np
    import onnx

    manifest = json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
    spec = manifest["spec"]
    share = spec["experts_per_token"] / spec["num_experts"] if spec["num_experts"] else 1.0
    proto = onnx.load(os.fspath(artifact / "model.onnx"), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    moe_weights: set[str] = set()
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, set()).add(node.op_type)
            if node.op_type in ("MoE", "QMoE") and i >= 2:  # 0: hidden states, 1: router logits
                moe_weights.add(name)
    out = dict.fromkeys(
        ("experts_stored", "experts_graph", "experts_sparse", "weights", "embedding_row", "constants"), 0.0
    )
    experts_quantized = False
    for init in proto.graph.initializer:
        external = {e.key: e.value for e in init.external_data}
        nbytes = int(external["length"]) if "length" in external else _inline_bytes(init)
        ops = consumers.get(init.name, set())
        if init.name in moe_weights or ".mlp.experts." in init.name:
            out["experts_stored"] += nbytes
            out["experts_graph"] += nbytes * (share if ops & _SPARSE_EXPERT_OPS else 1.0)
            out["experts_sparse"] += nbytes * share
            experts_quantized |= init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        elif ops and ops <= _GATHER_OPS:
            out["embedding_row"] += nbytes / init.dims[0]
        elif init.name.startswith(("model.", "lm_head.")):
            out["weights"] += nbytes
        else:
            out["constants"] += nbytes
    cache_type = next(v.type.tensor_type.elem_type for v in proto.graph.input if v.name.startswith("past_key_values."))
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(cache_type)).itemsize
    out["kv_cache"] = spec["num_layers"] * 2 * spec["num_kv_heads"] * context * spec["head_dim"] * itemsize
    out = {k: round(v) for k, v in out.items()}
    rest = out["weights"] + out["embedding_row"] + out["constants"] + out["kv_cache"]
    return {
        **out,
        "context": context,
        "graph": out["experts_graph"] + rest,
        "sparse": out["experts_sparse"] + rest,
        "experts_quantized": experts_quantized,
    }


def _inline_bytes(init) -> int:
    if init.raw_data:
        return len(init.raw_data)
    import onnx.numpy_helper

    return int(onnx.numpy_helper.to_array(init).nbytes)


def convert(hf_folder: Path, out: Path, recipe: str, graph: str, fresh: bool) -> float | None:
    """quantlab convert (in this process); the wall seconds, None when an earlier run's artifact is reused."""
    from quantlab import api

    manifest = out / "manifest.json"
    if not fresh and manifest.is_file():
        done = json.loads(manifest.read_text(encoding="utf-8"))
        if done["recipe"]["name"] == recipe and done.get("attention", {}).get("kind") == graph:
            logger.info("reusing %s", out)
            return None
    logger.info("convert %s --recipe %s --attention %s -> %s", hf_folder.name, recipe, graph, out)
    start = time.perf_counter()
    api.convert(hf_folder, out, recipe=recipe, attention=graph, evaluate_quality=False, overwrite=True, progress=False)
    return round(time.perf_counter() - start, 2)


@dataclasses.dataclass(frozen=True)
class Artifact:
    model: str  # one of MODELS
    recipe: str
    graph: str  # one of GRAPHS
    path: Path
    convert_s: float | None  # None: reused from an earlier run


def prepare(
    shape: Shape,
    work: Path,
    *,
    models: tuple[str, ...] = MODELS,
    recipes: tuple[str, ...] = RECIPES,
    graphs: tuple[str, ...] = tuple(GRAPHS),
    fresh: bool = False,
) -> tuple[dict, list[Artifact]]:
    """Write (or reuse) the models in ``work`` and convert each: (parameter counts by model, artifacts)."""
    counts, artifacts = {}, []
    for model in models:
        hf = work / f"{model}-hf"
        if fresh or not (hf / "config.json").is_file():
            logger.info("writing the random-weight %s model to %s", model, hf)
            write_random_model(shape, model, hf)
        counts[model] = parameter_counts(hf)
        for recipe in recipes:
            for graph in graphs:
                out = work / model / f"{recipe}-{graph}"
                artifacts.append(Artifact(model, recipe, graph, out, convert(hf, out, recipe, graph, fresh)))
    return counts, artifacts


def measure(shape: Shape, counts: dict, artifacts: list[Artifact], config, notes: tuple[str, ...] = ()) -> dict:
    """TPOT of every artifact with ``config`` (a quantlab.bench.runner.BenchConfig) beside its parameters and
    bytes per step: the results document."""
    from quantlab.bench.runner import run_bench

    context = config.prompt_len + config.gen // 2  # the mean cache length over the measured decode steps
    doc = run_bench([os.fspath(a.path) for a in artifacts], config)
    by_target = {r["target"]: r for r in doc["results"]}
    results = []
    for a in artifacts:
        row = by_target[os.fspath(a.path)]
        streamed = step_bytes(a.path, context)
        results.append(
            {
                "model": a.model,
                "recipe": a.recipe,
                "graph": a.graph,
                "moe_form": ("op" if a.graph == "fused" else "decomposed") if a.model == "moe" else None,
                "params_total": counts[a.model]["total"],
                "params_active": counts[a.model]["active"],
                "artifact_bytes": row["size_bytes"],
                "bytes_per_step": streamed,
                "convert_s": a.convert_s,
                "status": row["status"],
                "reason": row.get("reason", ""),
                "tpot_ms": row.get("tpot_ms"),
                "ttft_ms": row.get("ttft_ms"),
                "peak_rss_bytes": row.get("peak_rss_bytes"),
                "noisy": row.get("noisy"),
                "step_spread": row.get("step_spread"),
                "run_spread": row.get("run_spread"),
                "graph_GBps": streamed["graph"] / row["tpot_ms"]["median"] / 1e6 if row["status"] == "ok" else None,
                "target": os.fspath(a.path),
            }
        )
    return {
        "benchmark": "moe",
        "created": doc["created"],
        "command": sys.argv,
        "shape": dataclasses.asdict(shape),
        "models": {
            "moe": "Qwen3MoeForCausalLM, every layer sparse, norm_topk_prob true, RANDOM weights",
            "dense-total": "Qwen3ForCausalLM, intermediate = experts x moe_ff (the MoE's total parameters)",
            "dense-active": "Qwen3ForCausalLM, intermediate = top_k x moe_ff (the MoE's active parameters)",
        },
        "parameters": counts,
        "graphs": {g: GRAPHS[g] for g in dict.fromkeys(a.graph for a in artifacts)},
        "config": doc["config"],
        "method": {
            "tpot": doc["method"]["tpot"],
            "prompt": doc["method"]["prompt"],
            "bytes_per_step": f"at context {context} (prompt + gen / 2, the measured steps' mean); see step_bytes",
            "graph_GBps": "bytes_per_step.graph / TPOT median",
            "roofline": doc["method"]["roofline"],
        },
        "machine": doc["machine"],
        "roofline_GBps": doc["roofline_GBps"],
        "results": results,
        "notes": list(notes) + doc["notes"],
        # the runner's warnings name a row by its recipe alone: name the model and graph too
        "warnings": [w for w in doc["warnings"] if not w.startswith("noisy:")] + noisy_warnings(results),
    }


def noisy_warnings(results: list[dict]) -> list[str]:
    return [
        f"noisy: {r['model']} {r['recipe']} {r['graph']}: steps' p90 {100 * r['step_spread']:.0f}% above the "
        f"median, run medians spread {100 * r['run_spread']:.0f}%"
        for r in results
        if r["noisy"]
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "quantlab-bench-moe")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--graphs", nargs="+", default=list(GRAPHS), choices=list(GRAPHS))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="write and convert again even when --work holds them")
    ap.add_argument("--note", action="append", default=[], help="a note kept in the JSON and shown under the table")
    ap.add_argument("--render", action="store_true", help="only render results/moe_qwen3.json again")
    ap.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    opts = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)  # this script's progress; quantlab's own passes stay quiet
    json_file = opts.out / f"{RESULT_NAME}.json"
    readme = None if opts.no_readme else REPO / "README.md"
    if opts.render:
        moe_report.write_outputs(json.loads(json_file.read_text(encoding="utf-8")), opts.out, RESULT_NAME, readme)
        return 0
    from quantlab.bench.runner import BenchConfig

    config = BenchConfig(
        prompt_len=opts.prompt_len,
        gen=opts.gen,
        runs=opts.runs,
        threads=(opts.threads,),
        backends=("onnxruntime",),
        model_label="Qwen3-MoE-shaped, RANDOM weights",
    )
    opts.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    counts, artifacts = prepare(
        FULL, opts.work, recipes=tuple(opts.recipes), graphs=tuple(opts.graphs), fresh=opts.fresh
    )
    doc = measure(FULL, counts, artifacts, config, notes=tuple(opts.note))
    logger.info("done in %.1f min", (time.perf_counter() - start) / 60)
    save(json_file, doc)
    moe_report.write_outputs(doc, opts.out, RESULT_NAME, readme)
    logger.info("wrote %s (.md, .png)%s", json_file, "" if readme is None else " and README.md's block")
    return 0


if __name__ == "__main__":
    sys.exit(main())
