"""Generate text with an artifact folder, over onnxruntime with the KV cache.

Greedy with --greedy; otherwise seeded sampling (--temperature, --top-k, --top-p, --seed), which
gives the same tokens for the same seed. --json prints one object with the ids and the text.

--draft DRAFT_ART decodes speculatively (:mod:`quantlab.runtime.speculative`): the draft, a smaller
artifact of the same tokenizer (`quantlab distill --mode shrink`, then `quantlab convert`), proposes
--draft-tokens tokens and the target checks them in one forward. Greedy output is the target's own; sampled
output follows the target's distribution. --json adds the acceptance statistics.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from quantlab.errors import InputError

HELP = "generate text from an artifact"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="folder written by quantlab convert")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids, used as is (no BOS added)")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many tokens (default 64)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads")
    p.add_argument(
        "--backend",
        choices=["onnxruntime", "torch"],
        default="onnxruntime",
        help="onnxruntime (default), or PyTorch with quantlab's own int4/int8 kernels on the same artifact",
    )
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    p.add_argument(
        "--kv-window",
        type=int,
        default=None,
        help="bounded cache: keep only the last N tokens (plus --kv-sinks), so memory stays fixed however long "
        "the generation (StreamingLLM)",
    )
    p.add_argument(
        "--kv-sinks",
        type=int,
        default=4,
        help="with --kv-window: first tokens always kept (attention sinks, default 4)",
    )
    p.add_argument(
        "--draft",
        metavar="DRAFT_ART",
        help="speculative decoding: an artifact of the same tokenizer (e.g. a shrunk student) drafts tokens",
    )
    p.add_argument(
        "--draft-tokens", type=int, default=4, metavar="K", help="with --draft: tokens drafted per round (default 4)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def _prompt_ids(args, tok) -> list[int]:
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError as e:
            raise InputError(None, "--prompt-ids", "expected comma-separated integers") from e
        if not ids:
            raise InputError(None, "--prompt-ids", "empty prompt")
        return ids
    if args.chat:
        return tok.encode_chat(args.prompt)
    return tok.encode(args.prompt)  # the tokenizer's own BOS rule


def continuation_text(tok, prompt: list[int], ids: list[int]) -> str:
    """The text the generated ids add after the prompt, decoded in the prompt's context (a
    SentencePiece piece after BOS drops its leading space, as llama2.c's run.c does)."""
    ids = [t for t in ids if t not in tok.eos_token_ids]
    base = tok.decode(prompt)
    full = tok.decode(prompt + ids)
    return full[len(base) :] if full.startswith(base) else tok.decode(ids)


def _open_decoder(folder, args):
    from quantlab.runtime.generate import OrtDecoder, freeze_heap

    if args.backend == "torch":
        from quantlab.runtime.torch_decoder import TorchDecoder

        decoder = TorchDecoder(folder, threads=args.threads)
    else:
        decoder = OrtDecoder(folder, threads=args.threads)
    freeze_heap()
    return decoder


def _check_draft(folder, args) -> None:
    """Before any model loads: --draft's flags and its tokenizer against the target's."""
    from pathlib import Path

    from quantlab.runtime.speculative import check_same_vocabulary

    if args.draft_tokens < 1:
        raise InputError(None, "--draft-tokens", "must be >= 1")
    if args.kv_window is not None:
        raise InputError(None, "--kv-window", "a bounded cache and --draft do not go together")
    check_same_vocabulary(folder, Path(args.draft))


def _speculate(target, args, prompt, sampling, stop, show):
    """Speculative decoding with --draft over the same backend; the statistics."""
    from pathlib import Path

    from quantlab.runtime.speculative import generate_speculative

    draft = _open_decoder(Path(args.draft), args)
    try:
        result = generate_speculative(
            target,
            draft,
            prompt,
            max_new_tokens=args.max_new_tokens,
            k=args.draft_tokens,
            sampling=sampling,
            eos_ids=stop,
            on_tokens=show,
        )
    except ValueError as e:  # a cache that cannot be cut back after a round
        raise InputError(None, "--draft", str(e)) from e
    return result.stats


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from quantlab.graph_builder.kv_cache import TAIL_SUFFIX
    from quantlab.runtime.generate import BOUNDED_CHANNEL_KEYS, BoundedCache, SamplingConfig, generate
    from quantlab.runtime.tokenizer import load_tokenizer

    folder = Path(args.artifact)
    if not (folder / "model.onnx").is_file():
        raise InputError(folder, "model.onnx", "not an artifact folder (no model.onnx)")
    if args.max_new_tokens < 1:
        raise InputError(None, "--max-new-tokens", "must be >= 1")
    try:
        sampling = SamplingConfig(
            greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
        )
    except ValueError as e:
        raise InputError(None, "sampling", str(e)) from e
    bounded = None
    if args.kv_window is not None:
        if args.kv_window < 1:
            raise InputError(None, "--kv-window", "must be >= 1")
        if args.kv_sinks < 0:
            raise InputError(None, "--kv-sinks", "must be >= 0")
        bounded = BoundedCache(window=args.kv_window, sinks=args.kv_sinks)
    if args.draft is not None:
        _check_draft(folder, args)
    tok = load_tokenizer(folder)
    prompt = _prompt_ids(args, tok)
    vocab = json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]
    if any(not 0 <= t < vocab for t in prompt):
        raise InputError(None, "--prompt-ids", f"token ids must be in [0, {vocab})")
    decoder = _open_decoder(folder, args)
    if bounded is not None and any(n.endswith(TAIL_SUFFIX) for n in getattr(decoder, "cache_names", ())):
        raise InputError(None, "--kv-window", BOUNDED_CHANNEL_KEYS)
    stop = () if args.ignore_eos else sorted(tok.eos_token_ids)
    ids: list[int] = []
    start = time.perf_counter()
    first = None
    printed = ""

    def show(tokens: list[int]) -> None:
        nonlocal first, printed
        first = first or time.perf_counter()
        ids.extend(tokens)
        if not args.json:  # stream: print what the new tokens add to the decoded text
            text = continuation_text(tok, prompt, ids)
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text

    stats = None
    if args.draft is not None:
        stats = _speculate(decoder, args, prompt, sampling, stop, show)
    else:
        for token in generate(
            decoder, prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_ids=stop, bounded=bounded
        ):
            show([token])
    end = time.perf_counter()
    text = continuation_text(tok, prompt, ids)
    if args.json:
        tpot = (end - first) / (len(ids) - 1) if len(ids) > 1 else None
        doc = {
            "prompt_ids": prompt,
            "ids": ids,
            "text": text,
            "ttft_s": round(first - start, 6) if first else None,
            "tpot_s": round(tpot, 6) if tpot else None,
        }
        if stats is not None:
            doc["speculative"] = {"draft": args.draft, "draft_tokens": args.draft_tokens, **stats.to_dict()}
        print(json.dumps(doc))
    else:
        sys.stdout.write("\n")
    return 0
