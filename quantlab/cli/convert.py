"""Convert a checkpoint (Hugging Face folder, GGUF file, llama2.c .bin) into an ONNX artifact folder.

The folder holds model.onnx + model.onnx.data, the tokenizer, genai_config.json (onnxruntime-genai),
config.json (optimum) and manifest.json (provenance). It is written to a staging folder and renamed
into place, so a failed or interrupted conversion leaves nothing behind.
"""

from __future__ import annotations

import argparse

HELP = "checkpoint -> ONNX artifact folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="HF folder (config.json + *.safetensors), .gguf file, or llama2.c .bin")
    p.add_argument("-o", "--output", required=True, help="artifact folder to create")
    p.add_argument(
        "--dtype",
        choices=["fp32", "fp16"],
        default="fp32",
        help="weight storage precision (fp16 halves the file; CPU arithmetic stays fp32)",
    )
    p.add_argument("--tokenizer", help="tokenizer file, when it is not beside the checkpoint (llama2.c)")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read PyTorch .bin/.pt state dicts (only with torch.load(weights_only=True))",
    )
    p.add_argument("--dump-ir", metavar="DIR", help="write the IR as text after every pass, for debugging")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from quantlab import api
    from quantlab.emit.artifact import read_manifest

    out = api.convert(
        args.source,
        args.output,
        weight_dtype=args.dtype,
        overwrite=args.force,
        allow_pickle=args.allow_pickle,
        tokenizer=args.tokenizer,
        dump_ir=args.dump_ir,
        progress=not args.no_progress,
    )
    manifest = read_manifest(out)
    size = sum(f["bytes"] for f in manifest["files"].values())
    print(f"wrote {out} ({size / 1e6:.1f} MB, {manifest['graph']['parameters'] / 1e6:.2f}M parameters)")
    return 0
