"""Describe an artifact folder: ops, parameters, sizes, inputs and outputs, provenance.

Reads the graph without its weights, so it is instant for any model size.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from quantlab.errors import InputError

HELP = "describe an artifact folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="folder written by quantlab convert")
    p.add_argument("--json", action="store_true", help="print one JSON object")


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
