"""Describe an artifact folder: ops, parameters, sizes (by file and by part), inputs and outputs, provenance.

Reads the graph without its weights, so it is instant for any model size.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from quantlab.errors import InputError

HELP = "describe an artifact folder"

# The parts model.onnx + model.onnx.data break down into, in the order shown.
EMBEDDING, HEAD, SHARED, LINEARS = "embedding", "head", "shared embedding/head", "linears"
SCALES, ZERO_POINTS, OTHER, GRAPH = "scales", "zero points", "norms/other", "graph"
PARTS = (EMBEDDING, HEAD, SHARED, LINEARS, SCALES, ZERO_POINTS, OTHER, GRAPH)
WEIGHT = "weight"  # a matmul's weight operand: the head's when the node produces the logits, else a linear's
# What an initializer is to the op reading it, by input index; ops that only reshape or convert a weight
# (input 0) pass the question on to whatever reads their output.
INPUT_ROLES = {
    "MatMul": {1: WEIGHT},
    "Gemm": {1: WEIGHT},
    "FusedMatMul": {1: WEIGHT},
    "MatMulNBits": {1: WEIGHT, 2: SCALES, 3: ZERO_POINTS},
    "DynamicQuantizeMatMul": {1: WEIGHT, 2: SCALES, 3: ZERO_POINTS},
    "MatMulInteger": {1: WEIGHT, 3: ZERO_POINTS},
    "DequantizeLinear": {1: SCALES, 2: ZERO_POINTS},
    "Gather": {0: EMBEDDING},
    "GatherBlockQuantized": {0: EMBEDDING, 2: SCALES, 3: ZERO_POINTS},
}
PASS_THROUGH = {"Cast", "Reshape", "Transpose", "DequantizeLinear"}
TOKEN_IDS = "input_ids"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="folder written by quantlab convert")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def size_by_part(proto, graph_bytes: int) -> dict[str, int]:
    """Bytes of model.onnx (``graph_bytes``, small inline constants included) and of each part's tensors in
    model.onnx.data. An initializer read both by the token lookup and by the head (a tied table) is
    "shared embedding/head"; the embedding is the table gathered by ``input_ids``."""
    readers = defaultdict(list)  # value name -> [(node, input index)]
    for node in proto.graph.node:
        for index, name in enumerate(node.input):
            if name:
                readers[name].append((node, index))
    logits = {o.name for o in proto.graph.output[:1]}

    def roles(name: str) -> set[str]:
        found = set()
        for node, index in readers[name]:
            if node.op_type in PASS_THROUGH and index == 0:
                found |= roles(node.output[0])
                continue
            role = INPUT_ROLES.get(node.op_type, {}).get(index, OTHER)
            if role == EMBEDDING and (len(node.input) < 2 or node.input[1] != TOKEN_IDS):
                role = OTHER  # a gather of something else (a table indexed by position, say)
            if role == WEIGHT:
                role = HEAD if node.output[0] in logits else LINEARS
            found.add(role)
        return found

    parts = dict.fromkeys(PARTS, 0)
    parts[GRAPH] = graph_bytes
    for tensor in proto.graph.initializer:
        external = {e.key: e.value for e in tensor.external_data}
        if "length" not in external:
            continue  # stored inside model.onnx, counted with the graph
        found = roles(tensor.name)
        if {EMBEDDING, HEAD} <= found:
            part = SHARED
        else:
            part = next((p for p in PARTS if p in found), OTHER)
        parts[part] += int(external["length"])
    return {p: size for p, size in parts.items() if size}


def describe(folder: Path) -> dict:
    import onnx

    from quantlab.emit.artifact import read_manifest

    model_path = folder / "model.onnx"
    if not model_path.is_file():
        raise InputError(folder, "model.onnx", "not an artifact folder (no model.onnx)")
    try:
        manifest = read_manifest(folder)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(folder / "manifest.json", None, f"unreadable manifest: {e}") from e
    proto = onnx.load(str(model_path), load_external_data=False)
    ops = Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in proto.graph.node)

    def io(values):
        return [
            {
                "name": v.name,
                "type": onnx.helper.tensor_dtype_to_string(v.type.tensor_type.elem_type),
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    return {
        "artifact": str(folder),
        "parameters": manifest["graph"]["parameters"],
        "nodes": len(proto.graph.node),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "inputs": io(proto.graph.input),
        "outputs": io(proto.graph.output),
        "files": manifest["files"],
        "total_bytes": sum(f["bytes"] for f in manifest["files"].values()),
        "parts": size_by_part(proto, model_path.stat().st_size),
        "recipe": manifest["recipe"],
        "passes": [r["pass"] for r in manifest["passes"]],
        "source": manifest["source"],
        "spec": manifest["spec"],
        "versions": manifest["versions"],
    }


def run(args: argparse.Namespace) -> int:
    info = describe(Path(args.artifact))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    s = info["spec"]
    print(f"artifact   {info['artifact']}")
    print(
        f"model      {s['family']}: {s['num_layers']} layers, hidden {s['hidden_size']}, heads {s['num_heads']}"
        f" (kv {s['num_kv_heads']}), head_dim {s['head_dim']}, vocab {s['vocab_size']}"
    )
    print(f"parameters {info['parameters']:,}")
    print(f"recipe     {', '.join(f'{k}={v}' for k, v in info['recipe'].items())}")
    print(
        f"source     {info['source']['format']}: "
        + ", ".join(f"{n} (sha256 {h[:12]}…)" for n, h in info["source"]["files"].items())
    )
    print(f"size       {info['total_bytes'] / 1e6:.2f} MB")
    for name, f in info["files"].items():
        print(f"  {name:<24} {f['bytes'] / 1e6:>10.2f} MB")
    print("parts      of model.onnx + model.onnx.data")
    for part, size in info["parts"].items():
        print(f"  {part:<24} {size / 1e6:>10.2f} MB")
    print(f"graph      {info['nodes']} nodes, opset {info['opset']}")
    for op, n in info["ops"].items():
        print(f"  {op:<32} {n}")
    for kind in ("inputs", "outputs"):
        shown = info[kind][:5]
        print(
            f"{kind:<10} "
            + "; ".join(f"{v['name']} {v['type']}{v['shape']}" for v in shown)
            + (f"; … {len(info[kind]) - len(shown)} more" if len(info[kind]) > len(shown) else "")
        )
    print(f"passes     {' -> '.join(info['passes'])}")
    v = info["versions"]
    print("versions   " + ", ".join(f"{k} {v[k]}" for k in sorted(v)))
    return 0
