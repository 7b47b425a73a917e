"""Measure latency per token, peak memory and size of artifacts, side by side with the baselines.

Each TARGET is an artifact folder (run by onnxruntime, and by torch with quantlab's kernels when it is
quantized) or a checkpoint (a Hugging Face folder, .gguf or llama2.c .bin, run by transformers in
fp32 and bf16 eager, and a .gguf by llama.cpp): "what users run today". Every (target, backend,
thread count) runs in its own fresh process: one warm-up generation, then --runs generations of --gen
greedy tokens after a prompt of --prompt-len random token ids (seeded; no stop at end-of-sequence).

Reported: time to first token (the prefill), time per output token (median and p90 of the decode
steps), tokens/s, peak RSS of the process, size, the weight bandwidth a decode step achieves and its
share of a streaming-read roofline measured at the start, and with --baseline the quality columns of
`quantlab eval` (KL divergence, top-1 agreement) for the artifacts. A backend that cannot run here
gets a row that says why. --contexts 256,2048,4096 measures TPOT after prompts of those lengths
instead (a model too short for one says so). --batch 1,4,16 decodes that many sequences together (each
its own random prompt) and reports the batch's tokens/s.

A TARGET folder need not come from quantlab: any model.onnx with the decoder I/O contract (input_ids,
attention_mask, position_ids, past_key_values.{i}.key|value -> logits, present.{i}.key|value) and a
genai_config.json runs, e.g. onnxruntime-genai's model builder output, which the onnxruntime-genai
backend also runs in genai's own generation loop. --json FILE writes everything, machine and library
versions included; --plot FILE draws TPOT (against context with --contexts).

With --ray ADDRESS the cells run on a Ray cluster (:mod:`quantlab.distributed.bench`), at most one per node
at a time, each still in its own fresh process on its node; every row names its node and that node's CPU,
and the report says when rows come from different machines. The targets must be readable at the same
paths on every node. --baseline's quality columns are computed here, as without --ray.

--draft DRAFT_ART adds speculative rows (:mod:`quantlab.bench.speculative`): for each artifact target on
onnxruntime and torch-kernels, plain and speculative decoding (--draft-tokens a round) on the same chat
prompt in one worker, with the acceptance rate, tokens per target forward and the effective TPOT of both
(wall time after the first token / tokens) and their ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from quantlab.errors import InputError

HELP = "latency per token, peak memory and quality of artifacts and baselines"


def _ints(text: str) -> tuple[int, ...]:
    """``"1,2"`` or ``"0-3"`` -> a tuple of ints."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += range(int(lo), int(hi) + 1) if hi else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,2 or 0-3, got {text!r}") from None
    return tuple(out)


def _progress(row: dict) -> None:
    """One line on stderr per finished measurement: full runs take hours."""
    if row.get("mode") == "speculative":
        what = (
            f"acceptance {row['acceptance_rate']:.2f}, TPOT {row['effective_tpot_ms']['speculative']:.2f} ms against "
            f"{row['effective_tpot_ms']['plain']:.2f} ms plain ({row['tpot_ratio']:.2f}x)"
            if row["status"] == "ok"
            else f"{row['status']}: {row['reason']}"
        )
        print(f"bench: {row['variant']} speculative with {row['draft']} on {row['backend']}: {what}", file=sys.stderr)
        return
    where = f"context {row['context']}" if row["context"] is not None else f"prompt {row['prompt_len']}"
    where += f", batch {row['batch']}" if row.get("batch", 1) != 1 else ""
    where += f", node {row['node']['name']} ({row['node']['ip']})" if "node" in row else ""
    what = f"TPOT {row['tpot_ms']['median']:.2f} ms" if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
    print(f"bench: {row['variant']} on {row['backend']}, {row['threads']} threads, {where}: {what}", file=sys.stderr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from quantlab.bench.backends import BACKENDS

    p.add_argument("targets", nargs="+", metavar="TARGET", help="artifact folder, HF folder, .gguf or .bin")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--gen", type=int, default=128, help="generated tokens per run, >= 2 (default 128)")
    p.add_argument("--runs", type=int, default=5, help="measured runs after the warm-up (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="runs excluded at the start (default 1)")
    p.add_argument("--threads", type=_ints, default=(2,), help="thread counts, e.g. 2 or 1,2 (default 2)")
    p.add_argument(
        "--pin",
        type=_ints,
        default=None,
        metavar="CPUS",
        help="pin each worker to these CPUs (e.g. 0,1); default: no pinning (recorded either way)",
    )
    p.add_argument(
        "--contexts",
        type=_ints,
        default=(),
        metavar="N,N",
        help="context sweep: TPOT after prompts of these lengths (e.g. 256,2048,4096)",
    )
    p.add_argument(
        "--batch",
        type=_ints,
        default=(1,),
        metavar="N,N",
        help="sequences decoded together, e.g. 1,4,16: tok/s is the batch's (default 1)",
    )
    p.add_argument(
        "--backend",
        action="append",
        metavar="NAME",
        choices=list(BACKENDS),
        help=f"only these backends (repeat); default every one that runs the target: {', '.join(BACKENDS)}",
    )
    p.add_argument("--baseline", metavar="ARTIFACT", help="artifact to measure KLD and top-1 against (e.g. fp32)")
    p.add_argument(
        "--quality-samples",
        type=int,
        default=8,
        help="sequences of 128 tokens sampled from the baseline for the quality columns (default 8)",
    )
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt ids and quality samples (default 0)")
    p.add_argument("--model-label", help='name of the model in tables and plots, e.g. "1B-shaped (random weights)"')
    p.add_argument("--roofline-mib", type=int, default=512, help="array size for the roofline (default 512 MiB)")
    p.add_argument(
        "--draft",
        metavar="DRAFT_ART",
        help="also measure speculative decoding with this draft artifact (same tokenizer) against plain decoding, "
        "on a chat prompt: acceptance rate and effective TPOT",
    )
    p.add_argument(
        "--draft-tokens", type=int, default=4, metavar="K", help="with --draft: tokens drafted a round (default 4)"
    )
    p.add_argument(
        "--draft-prompt", metavar="TEXT", help="with --draft: the chat prompt (default: a short-story request)"
    )
    p.add_argument("--json", metavar="FILE", help="write every figure, the method and the machine as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a PNG: TPOT per target, or against context with --contexts")
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the cells on a Ray cluster, one per node at a time: auto or HEAD_IP:PORT (targets at the same "
        "paths on every node; needs pip install 'quantlab[ray]')",
    )


def run(args: argparse.Namespace) -> int:
    from quantlab.bench import report
    from quantlab.bench.runner import BenchConfig, measure_here, run_bench

    if args.roofline_mib < 1:
        raise InputError(None, "--roofline-mib", "must be >= 1")
    # fail now, not after an hour of measuring
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise InputError(None, "--plot", "needs matplotlib (pip install 'quantlab[plot]')")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not Path(path).absolute().parent.is_dir():
            raise InputError(path, flag, "its folder does not exist")
    config = BenchConfig(
        prompt_len=args.prompt_len,
        gen=args.gen,
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
        seed=args.seed,
        contexts=args.contexts,
        batches=args.batch,
        prefill_chunk=args.prefill_chunk,
        pin=args.pin,
        backends=tuple(args.backend) if args.backend else None,
        baseline=args.baseline,
        quality_samples=args.quality_samples,
        roofline_mib=args.roofline_mib,
        model_label=args.model_label,
        draft=args.draft,
        draft_tokens=args.draft_tokens,
        **({"draft_prompt": args.draft_prompt} if args.draft_prompt else {}),
    )
    measure = measure_here
    if args.ray is not None:
        if args.draft is not None:
            raise InputError(None, "--draft", "the speculative rows are measured on this machine: not with --ray")
        from quantlab.distributed import require_ray
        from quantlab.distributed.calibrate import check_reachable

        require_ray()
        check_reachable(args.ray)
        from quantlab.distributed.bench import bench_on_cluster

        measure = bench_on_cluster(args.ray, args.targets)
    doc = run_bench(args.targets, config, progress=_progress, measure=measure)
    if args.plot:
        report.plot(doc, args.plot)
        # relative to the JSON's folder, so results can move together (benchmarks/results/ in the repo)
        where = Path(args.json).absolute().parent if args.json else Path.cwd()
        doc["plot"] = os.path.relpath(Path(args.plot).absolute(), where)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(report.text_table(doc))
    return 1 if any(row["status"] == "failed" for row in doc["results"]) else 0
