"""Package an artifact folder into a self-contained bundle for one target (folder, or zip with --zip).

The bundle holds the model, tokenizer, configs, run_bundle.py (greedy generation with only onnxruntime,
numpy and tokenizers) and a manifest with every file's sha256; the same inputs give the same bytes.
"""

from __future__ import annotations

import argparse
from collections import Counter

from quantlab.package.bundle import DEFAULT_MAX_NEW_TOKENS, build_bundle, parse_size
from quantlab.package.targets import TARGETS

HELP = "package an artifact into a verified, self-contained bundle"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="folder written by quantlab convert")
    p.add_argument("-o", "--output", required=True, help="bundle folder (or .zip file with --zip)")
    p.add_argument("--target", default="cpu-x86_64", choices=sorted(TARGETS))
    p.add_argument("--max-size", default=None, help="fail if the bundle is larger (120MB, 1.5GB, bytes)")
    p.add_argument(
        "--fit",
        metavar="SOURCE",
        default=None,
        help="choose each layer's precision under --max-size from measured sensitivity, converting SOURCE (the "
        "artifact's checkpoint); uniform recipes that fit are measured too and the lowest KL divergence wins",
    )
    p.add_argument("--zip", action="store_true", help="write one deterministic zip file instead of a folder")
    p.add_argument("--ort", action="store_true", help="ship onnxruntime's ORT format (model.ort) for minimal builds")
    p.add_argument("--prompt", default=None, help="prompt for the recorded greedy check (HF tokenizers)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--force", action="store_true", help="replace an existing output")


def run(args: argparse.Namespace) -> int:
    max_size = parse_size(args.max_size) if args.max_size is not None else None
    result = build_bundle(
        args.artifact,
        args.output,
        target=args.target,
        max_size=max_size,
        as_zip=args.zip,
        overwrite=args.force,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        ort_format=args.ort,
        fit_source=args.fit,
    )
    gen = result.manifest["generation"]
    print(f"wrote {result.path} ({result.bytes / 1e6:.3f} MB, {len(result.manifest['files'])} files, {args.target})")
    fit = result.manifest.get("fit")
    if fit:
        print(f"--fit chose {fit['chosen']} (kld_mean {fit['kld_mean']:.5f}) under {fit['budget_bytes'] / 1e6:.3f} MB")
        per_layer = fit.get("per_layer")
        if per_layer:
            counts = Counter(per_layer["precisions"].values())
            mix = ", ".join(f"{n} x {scheme}" for scheme, n in sorted(counts.items()))
            print(
                f"per-layer: {mix}; kld_mean {per_layer['kld_mean']:.5f} measured, "
                f"{per_layer['predicted_kld_mean']:.5f} predicted"
            )
        if fit.get("note"):
            print(f"note: {fit['note']}")
    print(f"recorded greedy ids: {gen['ids']}")
    return 0
