"""Convert a checkpoint (Hugging Face folder, GGUF file, llama2.c .bin) into an ONNX artifact folder.

The folder holds model.onnx + model.onnx.data, the tokenizer, genai_config.json (onnxruntime-genai),
config.json (optimum) and manifest.json (provenance, and for quantized recipes the measured quality
against the fp32 model). It is written to a staging folder and renamed into place, so a failed or
interrupted conversion, or a missed --max-kld/--min-top1 budget, leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib

from quantlab.errors import InputError

HELP = "checkpoint -> ONNX artifact folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="HF folder (config.json + *.safetensors), .gguf file, or llama2.c .bin")
    p.add_argument("-o", "--output", required=True, help="artifact folder to create")
    p.add_argument(
        "--recipe",
        default="fp32",
        help="what to do to the weights: a built-in (fp32, fp16, w8a16-g128, w4a16-g128-asym, w4a16-g32-sym, "
        "w4a16-g128-gptq, w4a16-g128-awq, w8a8-smoothquant, ...; source keeps a GGUF's own quantized codes) "
        "or a .toml/.yaml recipe file with per-layer overrides (default fp32)",
    )
    p.add_argument(
        "--dtype",
        choices=["fp32", "fp16"],
        default=None,
        help="storage of the weights that stay in float (fp16 halves them; CPU arithmetic stays fp32)",
    )
    p.add_argument(
        "--kv",
        metavar="FORMAT",
        default=None,
        help="KV cache format in the graph: fp32 (default), int8, int4, int2 with per-token scales, then "
        "-g<N> (channel groups), -r<N> (the latest N tokens also kept in f32), -smooth (calibrated key channel "
        "scales), -channel-keys (keys per channel over blocks of the -r<N> tokens); kivi2 = int2-r32-smooth; "
        "int8-static / int4-static: calibrated per-channel scales (what "
        "--attention fused reads; onnxruntime-genai runs these). Overrides the recipe's kv_cache. The other "
        "quantized caches run in quantlab generate, not in onnxruntime-genai",
    )
    p.add_argument(
        "--kv-residual",
        metavar="N",
        type=int,
        default=None,
        help="the residual window of the chosen quantized cache format: the latest N tokens also kept in f32 "
        "(--kv kivi2 --kv-residual 32; 0 removes the window); replaces any -r<N> in the format",
    )
    p.add_argument(
        "--attention",
        choices=["auto", "plain", "fused"],
        default="auto",
        help="fused: the graph onnxruntime runs fastest (GroupQueryAttention with the cache in one shared "
        "buffer, RotaryEmbedding, fused q/k/v and gate/up linears, fused norms; onnxruntime and "
        "onnxruntime-genai only), which stores --kv int8/int4 with static calibrated per-channel scales "
        "(int8-static / int4-static); plain: standard opset-21 ONNX for any runtime; auto (default): fused "
        "unless the cache is quantized or the recipe's format is qdq",
    )
    calib = p.add_mutually_exclusive_group()
    calib.add_argument(
        "--calib", metavar="FILE", help='calibration data: text, JSONL with {"text": ...}, or token ids (.npy/.json)'
    )
    calib.add_argument(
        "--calib-from-model",
        metavar="N",
        type=int,
        help="data-free calibration: N sequences sampled from the full-precision model itself",
    )
    p.add_argument(
        "--calibrate-all-experts",
        action="store_true",
        help="MoE models: calibrate every expert on every calibration token (statistics only; each layer's "
        "output still mixes the experts its router chose), not only on the tokens routed to it",
    )
    p.add_argument(
        "--max-kld", type=float, help="fail (exit 3, nothing written) if mean KL divergence to fp32 exceeds this"
    )
    p.add_argument(
        "--min-top1", type=float, help="fail (exit 3, nothing written) if top-1 agreement with fp32 is below this"
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--max-size",
        metavar="SIZE",
        help="choose each weight's scheme from measured sensitivity for the least KL divergence whose "
        "model.onnx + model.onnx.data fit SIZE (105MB, 1.2GB); exit 2 and nothing written when nothing fits",
    )
    size.add_argument(
        "--bpw", type=float, metavar="BITS", help="as --max-size, the size given in bits per source parameter"
    )
    p.add_argument(
        "--requantize",
        action="store_true",
        help="with --max-size/--bpw: keep none of a GGUF's own codes, round every tensor afresh",
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=16,
        help="sequences sampled from the fp32 model to measure quality for the manifest (default 16)",
    )
    p.add_argument(
        "--head-vocab",
        type=int,
        metavar="N",
        help="speculative drafts: the head scores only the N tokens most frequent in --head-vocab-data, every "
        "other token gets -inf (a smaller, faster head; quality against fp32 is then not measured)",
    )
    p.add_argument(
        "--head-vocab-data",
        metavar="FILE",
        help="with --head-vocab: text (or .jsonl/.json/.npy token ids) whose token counts choose the kept tokens",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the quality measurement (unless a budget is set)")
    p.add_argument("--tokenizer", help="tokenizer file, when it is not beside the checkpoint (llama2.c)")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read PyTorch .bin/.pt state dicts (only with torch.load(weights_only=True))",
    )
    p.add_argument("--dump-ir", metavar="DIR", help="write the IR as text after every pass, for debugging")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted calibration from its per-layer checkpoints (.OUTPUT.resume/ beside the "
        "output); refused if the model, recipe, calibration data or quantlab version changed",
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="calibrate, or measure --max-size / --bpw sensitivity, on a Ray cluster: auto (the cluster this "
        "machine is in) or HEAD_IP:PORT; the artifact is the same bytes as without it (needs pip install "
        "'quantlab[ray]'; the checkpoint, and for --max-size the output's folder, at the same path on every node)",
    )
    p.add_argument(
        "--shards",
        type=int,
        metavar="N",
        help="with --ray: calibration shards (Ray actors), 1 to 8, or --max-size sensitivity meters, 1 or more "
        "(default: one per CPU of the cluster, at most 8 shards)",
    )


@contextlib.contextmanager
def _environment_errors_as_input_errors(errnos, output):
    """A full disk, a read-only or forbidden folder: the user's to fix, in one line (exit 2), not a bug."""
    try:
        yield
    except OSError as e:
        if e.errno not in errnos:
            raise
        raise InputError(e.filename or output, None, f"cannot write: {e.strerror}") from e


def run(args: argparse.Namespace) -> int:
    from quantlab import api
    from quantlab.emit.artifact import read_manifest
    from quantlab.emit.staging import ENVIRONMENT_ERRNOS, terminate_as_exit
    from quantlab.fit.choose import parse_size

    if args.eval_samples < 1:
        raise InputError(None, "--eval-samples", "must be >= 1")
    budget = api.QualityBudget(max_kld=args.max_kld, min_top1=args.min_top1, samples=args.eval_samples)
    # SIGTERM -> SystemExit(143): temporary folders are removed on the way out.
    with terminate_as_exit(), _environment_errors_as_input_errors(ENVIRONMENT_ERRNOS, args.output):
        out = api.convert(
            args.source,
            args.output,
            recipe=args.recipe,
            weight_dtype=args.dtype,
            kv_cache=args.kv,
            kv_residual=args.kv_residual,
            attention=args.attention,
            calib=args.calib,
            calib_from_model=args.calib_from_model,
            budget=budget,
            evaluate_quality=not args.no_eval,
            overwrite=args.force,
            allow_pickle=args.allow_pickle,
            tokenizer=args.tokenizer,
            dump_ir=args.dump_ir,
            progress=not args.no_progress,
            resume=args.resume,
            calibrate_all_experts=args.calibrate_all_experts,
            max_size=parse_size(args.max_size) if args.max_size else None,
            bpw=args.bpw,
            requantize=args.requantize,
            ray=args.ray,
            shards=args.shards,
            head_vocab=args.head_vocab,
            head_vocab_data=args.head_vocab_data,
        )
    manifest = read_manifest(out)
    size = sum(f["bytes"] for f in manifest["files"].values())
    print(f"wrote {out} ({size / 1e6:.1f} MB, {manifest['graph']['parameters'] / 1e6:.2f}M parameters)")
    fit = manifest.get("fit")
    if fit:
        print(
            f"chose {fit['linears_per_scheme']} under {fit['max_bytes'] / 1e6:.3f} MB "
            f"(model files {fit['written_bytes'] / 1e6:.3f} MB), predicted kld_mean {fit['predicted_kld_mean']:.5f}"
        )
    q = manifest.get("quality")
    if q:
        print(
            f"quality vs fp32 ({q['tokens']} tokens): kld_mean {q['kld_mean']:.5f}, "
            f"top1_agreement {q['top1_agreement']:.4f}, ppl {q['ppl']:.3f} (fp32 {q['baseline_ppl']:.3f})"
        )
    return 0
