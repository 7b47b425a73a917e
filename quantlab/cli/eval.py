"""Evaluate an artifact: perplexity, and against a baseline artifact KL divergence and top-1 agreement.

The text comes from --data FILE (UTF-8 text cut into --seq-len windows; .jsonl with a {"text": ...}
document per line; token ids as .npy (n, seq) or .json list of lists) or is sampled with --samples N
(seeded by --seed) from the baseline, or from the candidate itself when there is no baseline.
KL divergence is KL(P_baseline || P_candidate) of the next-token distributions, in nats, per token.
--json prints one object: ppl, tokens (predicted positions), data (source, sequences, seq_len, sha256) and, with a
baseline, baseline_ppl, kld_mean, kld_median, kld_p99_9, kld_max, top1_agreement.

Several artifacts are scored on the same text, one after another (one JSON object per line with --json,
in the order given); with --ray ADDRESS each is scored by a task on a Ray cluster
(:mod:`quantlab.distributed.evaluate`), the same figures. --samples then needs --baseline, so that the
text is one text.
"""

from __future__ import annotations

import argparse
import json

from quantlab.errors import InputError

HELP = "perplexity, KL divergence and top-1 agreement against a baseline"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", nargs="+", help="candidate artifact folder(s) (written by quantlab convert)")
    p.add_argument("--baseline", help="reference artifact folder (e.g. the fp32 conversion)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="FILE", help='text, .jsonl {"text": ...} per line, or token ids (.npy, .json)')
    src.add_argument("--samples", type=int, metavar="N", help="sample N sequences from the baseline (or the candidate)")
    p.add_argument("--seed", type=int, default=0, help="seed for --samples (default 0)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--max-sequences", type=int, default=None, help="use at most this many sequences of --data")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--json", action="store_true", help="print one JSON object per artifact, a line each")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="score the artifacts in parallel on a Ray cluster: auto or HEAD_IP:PORT (the same figures; the "
        "artifacts and baseline at the same paths on every node; needs pip install 'quantlab[ray]')",
    )


def run(args: argparse.Namespace) -> int:
    from quantlab.eval.data import load_token_data, make_token_data, sample_from_model
    from quantlab.eval.quality import evaluate, model_config
    from quantlab.runtime.generate import OrtDecoder
    from quantlab.runtime.tokenizer import load_tokenizer

    artifacts = args.artifact
    configs = [model_config(a) for a in artifacts]
    config = configs[0]
    if any(int(c["vocab_size"]) != int(config["vocab_size"]) for c in configs):
        raise InputError(artifacts[0], "vocab_size", "the candidates' vocabularies differ: score them apart")
    if args.ray is not None:
        from quantlab.distributed import require_ray
        from quantlab.distributed.calibrate import check_reachable

        require_ray()
        check_reachable(args.ray)
    if args.baseline is not None:
        model_config(args.baseline)
    context = min((int(c["context_length"]) for c in configs if c.get("context_length")), default=None)
    if args.seq_len < 2:
        raise InputError(None, "--seq-len", "must be >= 2 (one token predicted from one before it)")
    if context and args.seq_len > int(context):
        raise InputError(None, "--seq-len", f"must be <= the model's context length {context}")
    if args.data is not None:
        data = load_token_data(
            args.data,
            load_tokenizer(artifacts[0]),
            seq_len=args.seq_len,
            max_sequences=args.max_sequences,
            vocab_size=int(config["vocab_size"]),
        )
    else:
        if args.samples < 1:
            raise InputError(None, "--samples", "must be >= 1")
        if args.max_sequences is not None:
            raise InputError(None, "--max-sequences", "applies to --data; --samples N already says how many")
        if args.baseline is None and len(artifacts) > 1:
            raise InputError(None, "--samples", "with several artifacts needs --baseline (one text for all)")
        source = args.baseline if args.baseline is not None else artifacts[0]
        tok = load_tokenizer(source)
        start = tok.bos_token_id if tok.bos_token_id is not None else min(tok.eos_token_ids, default=None)
        if start is None:
            raise InputError(source, "tokenizer", "no BOS or EOS token to start sampled text from")
        decoder = OrtDecoder(source, threads=args.threads)
        ids = sample_from_model(decoder, args.samples, args.seq_len, args.seed, start, progress=not args.no_progress)
        data = make_token_data(ids, f"sampled from {source} (seed {args.seed}, temperature 1.0)")
    if args.ray is not None:
        from quantlab.distributed.evaluate import evaluate_on_cluster

        reports = evaluate_on_cluster(artifacts, data, args.baseline, address=args.ray, threads=args.threads)
    else:
        progress = not args.no_progress
        reports = [evaluate(a, data, args.baseline, threads=args.threads, progress=progress) for a in artifacts]
    if args.json:
        print("\n".join(json.dumps(r.to_dict()) for r in reports))
    else:
        print("\n\n".join(_table(r.to_dict()) for r in reports))
    return 0


def _table(r: dict) -> str:
    d = r["data"]
    rows = [("candidate", r["candidate"])]
    if "baseline" in r:
        rows.append(("baseline", r["baseline"]))
    rows += [
        ("data", f"{d['source']}: {d['sequences']} x {d['seq_len']} tokens, sha256 {d['sha256'][:16]}"),
        ("tokens", f"{r['tokens']} predicted"),
        ("perplexity", f"{r['ppl']:.4f}" + (f"  (baseline {r['baseline_ppl']:.4f})" if "baseline" in r else "")),
    ]
    if "baseline" in r:
        rows += [
            (
                "KL divergence",
                f"mean {r['kld_mean']:.6f}  median {r['kld_median']:.6f}  "
                f"p99.9 {r['kld_p99_9']:.6f}  max {r['kld_max']:.6f}  (nats)",
            ),
            ("top-1 agreement", f"{100 * r['top1_agreement']:.2f}%"),
        ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
