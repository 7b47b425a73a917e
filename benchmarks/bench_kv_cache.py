"""KV-cache formats and bounded caches: bytes per token, quality (KL vs the fp32 cache), decode latency.

    python benchmarks/bench_kv_cache.py                  # everything (about 10-20 minutes on 2 cores)
    python benchmarks/bench_kv_cache.py --parts kld      # one part: bytes, kld, latency, bounded

Writes benchmarks/results/kv_cache.json, kv_cache.md and kv_cache.png.

1. bytes: cache bytes per token of SmolLM2-135M (30 layers, 3 kv heads, head_dim 64) per format, measured
   on the arrays a forward returns (scales included) as the growth from 64 to 128 tokens, against the fp16
   cache's 2 bytes per element; a residual window's f32 tokens are a fixed cost, reported beside it.
   ``-smooth`` and ``-static`` formats calibrate key (and value) channel ranges on 8 x 256 tokens sampled
   from the fp32 model (``-static``: the clipped range of least squared error, kv_cache.static_cache_ranges).
2. kld: SmolLM2-135M (the Q4_1 GGUF from ../shared/models, dequantized to fp32 weights; the same weights
   for every format, only the cache differs), sequences of 1024 tokens of English text (this repository's
   README and house style), one full forward each. Every key/value goes through the cache's
   quantize/dequantize before attention (and a residual window masks per query position), so a full
   forward gives the same logits as token-by-token decoding with that cache (tests/kv checks it).
   ``-channel-keys`` formats (KIVI's key layout) quantize keys in blocks, where a full forward is not
   decoding: in one forward every key of a completed block is attended quantized, while decoding keeps
   the query's own unfinished block in f32, so the full forward (the default, recorded as "method") is
   the pessimistic side (tests/kv/test_channel_keys.py); ``--decode`` measures them token by token
   (both rows as one batch, 1024 steps: slow on a shared machine).
   KL(P_fp32cache || P_format) per position, in nats.
3. latency: one decode step (1 new token) with a cache of 256, 1024 and 4096 tokens already in it
   (random cache contents of the right dtype: the time does not depend on the values), 2 threads,
   median of --steps steps after 2 warm-up steps.
4. bounded: stories260K (llama2.c, 512 training positions) generates 2048 tokens (sampled, T=1, seed 0)
   with the full cache and with 4 sinks + a 128-token window, position ids either the original ones or the
   ones inside the cache; the perplexity of each text under the full fp32 model (one full forward).

Timings taken while other work shares the machine are noisy: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO.parent / "shared" / "models"
SMOLLM2 = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
STORIES = MODELS / "stories260K.bin"
RESULTS = REPO / "benchmarks" / "results"
FORMATS = (
    "fp32",
    "int8",
    "int4",
    "int4-g32",
    "int8-smooth",
    "int4-smooth",
    "int4-r32-smooth",
    "int2-r32-smooth",  # kivi2
    "int2-g16-r32-smooth",
    "int2-r32-channel-keys",  # keys per channel over 32-token blocks (KIVI), values per token
    "int4-r32-channel-keys",
    "int8-static",  # what fused attention (GroupQueryAttention) reads: static calibrated per-channel scales
    "int4-static",
)
CONTEXTS = (256, 1024, 4096)
CALIB_SEQUENCES, CALIB_LEN = 8, 256
TEXT_FILES = (REPO / "README.md", REPO.parent / "shared" / "docs" / "house-style.md")


def time_decode(dec, cache: dict[str, np.ndarray], steps: int) -> float:
    """Median ms of one decode step over ``cache`` (two warm-up steps excluded)."""
    ids = np.array([[42]], dtype=np.int64)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        dec.forward(ids, cache)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return round(1000 * float(np.median(times)), 2)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def artifact(ckpt, work: Path, name: str, kv: str, attention: str = "plain") -> Path:
    """An artifact folder (model + genai_config only) of ``ckpt`` with cache format ``kv``, reused if present.

    ``-smooth`` and ``-static`` formats calibrate their channel ranges on CALIB_SEQUENCES x CALIB_LEN tokens
    sampled from the fp32 model (seed 0; the evaluation text is never seen by calibration).
    """
    from quantlab.emit.artifact import genai_config, save_model, write_json
    from quantlab.graph_builder.decoder import BuildOptions, build_decoder
    from quantlab.graph_builder.kv_cache import collect_key_scales, parse_kv_cache, static_cache_ranges

    folder = work / (f"{name}-kv-{kv}" + ("" if attention == "plain" else f"-{attention}"))
    if (folder / "genai_config.json").is_file():
        return folder
    fmt = parse_kv_cache(kv)
    key_scales = value_scales = None
    if fmt.smooth_keys or fmt.static:
        from quantlab.eval.data import sample_from_model
        from quantlab.runtime.generate import OrtDecoder

        base = OrtDecoder(artifact(ckpt, work, name, "fp32"), threads=2)
        calib = work / f"{name}-kv-calib.npy"
        if not calib.is_file():
            log(f"sample {CALIB_SEQUENCES} x {CALIB_LEN} calibration tokens")
            np.save(calib, sample_from_model(base, CALIB_SEQUENCES, CALIB_LEN, 0, ckpt.spec.bos_token_id or 1))
        ranges = work / f"{name}-kv-ranges-{kv}.npz"  # shared by the plain and fused artifacts of a format
        if fmt.static and ranges.is_file():
            key_scales, value_scales = np.load(ranges)["keys"], np.load(ranges)["values"]
        elif fmt.static:
            key_scales, value_scales = static_cache_ranges(base, np.load(calib), ckpt.spec.rope_interleaved, fmt)
            np.savez(ranges, keys=key_scales, values=value_scales)
        else:
            key_scales = collect_key_scales(base, np.load(calib), ckpt.spec.rope_interleaved)
    log(f"build {folder.name}")
    folder.mkdir(parents=True, exist_ok=True)
    options = BuildOptions(
        kv_cache=fmt, key_channel_scales=key_scales, value_channel_scales=value_scales, attention=attention
    )
    save_model(build_decoder(ckpt, options), folder, progress=False)
    write_json(folder / "genai_config.json", genai_config(ckpt, kv_cache=fmt))
    return folder


def bench_bytes(ckpt, folders: dict[str, Path]) -> dict:
    from quantlab.runtime.generate import OrtDecoder, cache_bytes

    s = ckpt.spec
    fp16 = 2 * s.num_layers * s.num_kv_heads * s.head_dim * 2
    out = {"fp16_bytes_per_token": fp16, "formats": {}}
    ids = np.arange(1, 65, dtype=np.int64)[None, :]  # (1, 64)
    for kv, folder in folders.items():
        dec = OrtDecoder(folder, threads=2)
        _, cache = dec.forward(ids, dec.empty_cache())
        at_64 = cache_bytes(cache)
        _, cache = dec.forward(ids, cache)
        # what one more token costs, past any residual window; the window is a fixed cost on top
        per_token = (cache_bytes(cache) - at_64) / ids.shape[1]
        fixed = at_64 - per_token * ids.shape[1]
        out["formats"][kv] = {
            "bytes_per_token": per_token,
            "ratio_to_fp16": round(per_token / fp16, 4),
            "fixed_bytes": int(fixed),
        }
        log(f"bytes {kv}: {per_token:.0f} B/token (+ {fixed:.0f} B fixed), {per_token / fp16:.3f} x fp16")
    return out


def text_ids(ckpt, seq_len: int, n: int) -> np.ndarray:
    from quantlab.runtime.tokenizer import tokenizer_from_spec

    tok = tokenizer_from_spec(ckpt.tokenizer)
    ids = tok.encode("\n\n".join(p.read_text(encoding="utf-8") for p in TEXT_FILES), add_bos=False)
    n = min(n, len(ids) // (seq_len - 1))
    bos = ckpt.spec.bos_token_id if ckpt.spec.bos_token_id is not None else 1
    rows = [[bos, *ids[i * (seq_len - 1) : (i + 1) * (seq_len - 1)]] for i in range(n)]
    return np.asarray(rows, dtype=np.int64)  # (n, seq_len)


def decode_logits(dec, data: np.ndarray) -> np.ndarray:
    """Logits of every position of ``data`` (n, seq) from decoding one token per step -> (n, seq, vocab)."""
    cache = dec.empty_cache(data.shape[0])
    out = None
    for t in range(data.shape[1]):
        logits, cache = dec.forward(data[:, t : t + 1], cache)  # (n, 1, vocab)
        if out is None:
            out = np.empty((data.shape[0], data.shape[1], logits.shape[-1]), dtype=np.float32)
        out[:, t] = logits[:, 0]
    return out


def bench_kld(
    ckpt, folders: dict[str, Path], seq_len: int, n: int, previous: dict | None = None, decode: bool = False
) -> dict:
    from quantlab.graph_builder.kv_cache import parse_kv_cache
    from quantlab.quant.metrics import kl_divergence_per_token, log_softmax
    from quantlab.runtime.generate import OrtDecoder

    data = text_ids(ckpt, seq_len, n)
    log(f"kld: {data.shape[0]} x {seq_len} tokens")
    base_dec = OrtDecoder(folders["fp32"], threads=2)
    base = [base_dec.forward(row[None], base_dec.empty_cache())[0][0] for row in data]  # (seq, vocab) each
    del base_dec
    nll_base = np.concatenate(
        [-log_softmax(b[:-1])[np.arange(seq_len - 1), row[1:]] for b, row in zip(base, data, strict=True)]
    )
    out = previous or {}
    out = {
        **out,
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32 weights)",
        "data": f"{data.shape[0]} x {seq_len} tokens of repository text (README.md, house-style.md)",
        "fp32_cache_ppl": float(np.exp(nll_base.mean())),
        "formats": out.get("formats", {}),
    }
    edges = [0, 64, 256, 512, seq_len]
    for kv, folder in folders.items():
        if kv == "fp32":
            continue
        dec = OrtDecoder(folder, threads=2)
        kl, nll, agree = [], [], 0
        by_decoding = decode and parse_kv_cache(kv).channel_keys
        decoded = decode_logits(dec, data) if by_decoding else None
        for i, (b, row) in enumerate(zip(base, data, strict=True)):
            cand = decoded[i] if decoded is not None else dec.forward(row[None], dec.empty_cache())[0][0]
            kl.append(kl_divergence_per_token(b, cand))  # (seq,)
            nll.append(-log_softmax(cand[:-1])[np.arange(seq_len - 1), row[1:]])
            agree += int((b.argmax(-1) == cand.argmax(-1)).sum())
        kl_rows = np.stack(kl)  # (n, seq)
        flat = kl_rows.ravel()
        out["formats"][kv] = {
            "method": "token-by-token decode" if by_decoding else "one full forward",
            "kld_mean": float(flat.mean()),
            "kld_median": float(np.median(flat)),
            "kld_p99": float(np.percentile(flat, 99)),
            "kld_max": float(flat.max()),
            "top1_agreement": agree / flat.size,
            "ppl": float(np.exp(np.concatenate(nll).mean())),
            "kld_mean_by_position": {
                f"{lo}-{hi}": float(kl_rows[:, lo:hi].mean()) for lo, hi in zip(edges[:-1], edges[1:], strict=True)
            },
            "kld_curve": [float(kl_rows[:, i : i + 32].mean()) for i in range(0, seq_len, 32)],
        }
        log(f"kld {kv}: mean {flat.mean():.5f}, top1 {agree / flat.size:.4f}")
    return out


def bench_latency(folders: dict[str, Path], steps: int, previous: dict | None = None) -> dict:
    from quantlab.graph_builder.kv_cache import parse_kv_cache
    from quantlab.runtime.generate import OrtDecoder

    out = {"threads": 2, "steps": steps, "load_average_before": os.getloadavg()[0], "ms_per_token": {}}
    out["ms_per_token"] = (previous or {}).get("ms_per_token", {})
    rng = np.random.default_rng(0)
    for kv, folder in folders.items():
        dec = OrtDecoder(folder, threads=2)
        out["ms_per_token"][kv] = {}
        for ctx in CONTEXTS:
            cache = {}
            for name, d in dec.cache_last_dim.items():
                shape = (1, dec.kv_heads, ctx, d)  # (batch, kv_heads, ctx, d)
                dtype = dec.input_types[name]
                if name.endswith("_residual"):
                    shape = (1, dec.kv_heads, min(ctx, 32), d)
                fmt = parse_kv_cache(kv)
                if fmt.channel_keys and name.endswith(".key_scale"):  # one scale row per block of keys
                    shape = (1, dec.kv_heads, ctx // fmt.residual, d)
                if name.endswith("_tail"):  # ctx is a whole number of blocks
                    shape = (1, dec.kv_heads, 0, d)
                if dtype == np.float32:
                    cache[name] = rng.standard_normal(shape).astype(np.float32) * (0.01 if "scale" in name else 1)
                else:
                    cache[name] = rng.integers(0, 127, shape).astype(dtype)
            out["ms_per_token"][kv][str(ctx)] = time_decode(dec, cache, steps)
            log(f"latency {kv} ctx {ctx}: {out['ms_per_token'][kv][str(ctx)]} ms")
    out["load_average_after"] = os.getloadavg()[0]
    return out


def text_ppl(decoder, ids: list[int]) -> float:
    """Perplexity of ``ids`` under ``decoder`` with its full cache: one forward over the whole text."""
    from quantlab.quant.metrics import log_softmax

    row = np.asarray(ids, dtype=np.int64)
    logits = decoder.forward(row[None], decoder.empty_cache())[0][0]  # (seq, vocab)
    nll = -log_softmax(logits[:-1])[np.arange(row.size - 1), row[1:]]
    return float(np.exp(nll.mean()))


def bench_bounded(work: Path, tokens: int, window: int, sinks: int) -> dict:
    from quantlab.io import load_checkpoint
    from quantlab.runtime.generate import BoundedCache, OrtDecoder, SamplingConfig, cache_length, generate

    ckpt = load_checkpoint(STORIES)
    folder = artifact(ckpt, work, "stories260K", "fp32")
    dec = OrtDecoder(folder, threads=2)
    sampling = SamplingConfig(greedy=False, temperature=1.0, seed=0)
    bos = ckpt.spec.bos_token_id if ckpt.spec.bos_token_id is not None else 1
    out = {
        "model": "stories260K (llama2.c; trained on 512 positions)",
        "tokens": tokens,
        "window": window,
        "sinks": sinks,
        "sampling": "T=1.0, seed 0",
        "runs": {},
    }
    runs = {"full": None}
    for mode in ("original", "cache"):
        runs[f"window{window}+sinks{sinks}, {mode} positions"] = BoundedCache(window, sinks, mode)
    for label, bounded in runs.items():
        lengths = []

        def watch(cache, lengths=lengths):
            lengths.append(cache_length(cache))

        t0 = time.perf_counter()
        ids = list(generate(dec, [bos], max_new_tokens=tokens, sampling=sampling, bounded=bounded, on_step=watch))
        elapsed = time.perf_counter() - t0
        seen = [bos, *ids]
        ppl = text_ppl(dec, seen)
        out["runs"][label] = {
            "ppl_under_full_fp32": ppl,
            "max_cache_tokens": max(lengths),
            "final_cache_tokens": lengths[-1],
            "seconds": round(elapsed, 2),
            "distinct_tokens_last_512": len(set(ids[-512:])),
        }
        log(f"bounded {label}: ppl {ppl:.3f}, cache max {max(lengths)}")
    full = out["runs"]["full"]["ppl_under_full_fp32"]
    for r in out["runs"].values():
        r["ppl_ratio_to_full"] = round(r["ppl_under_full_fp32"] / full, 4)
    return out


def at_1024(entry: dict, bytes_part: dict) -> float | None:
    """The whole cache at 1024 tokens, fixed residual included, against an fp16 cache."""
    if "bytes_per_token" not in entry:
        return None
    total = entry["bytes_per_token"] * 1024 + entry.get("fixed_bytes", 0)
    return total / (bytes_part["fp16_bytes_per_token"] * 1024)


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        "# KV-cache formats and bounded caches",
        "",
        f"Generated by `benchmarks/bench_kv_cache.py`, {results['date']}.",
        "",
    ]
    b, k, lat = results.get("bytes"), results.get("kld"), results.get("latency")
    if b or k or lat:
        lines += [
            "SmolLM2-135M-Instruct. Bytes per token: all 30 layers, keys and values, scales included "
            f"(fp16 cache: {b['fp16_bytes_per_token'] if b else '?'} B). KLD against the fp32 cache over "
            f"{k['data'] if k else '?'}; decode ms per token at 2 threads with the cache holding 256/1024/4096 tokens.",
            "",
            "| cache | bytes/token | x fp16 | fixed bytes | x fp16 @1024 | kld_mean | kld_p99 | top-1 | ppl "
            "| ms @256 | ms @1024 | ms @4096 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for kv in FORMATS:
            bb = (b or {}).get("formats", {}).get(kv, {})
            kk = (k or {}).get("formats", {}).get(kv, {})
            ll = (lat or {}).get("ms_per_token", {}).get(kv, {})
            ppl = kk.get("ppl", k.get("fp32_cache_ppl") if (k and kv == "fp32") else None)

            def f(v, fmt):
                return fmt.format(v) if v is not None else "-"

            lines.append(
                f"| {kv} | {f(bb.get('bytes_per_token'), '{:.0f}')} | {f(bb.get('ratio_to_fp16'), '{:.3f}')} "
                f"| {f(bb.get('fixed_bytes'), '{:d}')} | {f(at_1024(bb, b), '{:.3f}')} "
                f"| {f(kk.get('kld_mean'), '{:.5f}')} | {f(kk.get('kld_p99'), '{:.4f}')} "
                f"| {f(kk.get('top1_agreement'), '{:.4f}')} | {f(ppl, '{:.3f}')} | "
                + " | ".join(f(ll.get(str(c)), "{:.1f}") for c in CONTEXTS)
                + " |"
            )
        if lat:
            lines += [
                "",
                f"Load average {lat['load_average_before']:.1f} before / {lat['load_average_after']:.1f} after the "
                "latency runs (2 shared cores): timings are indicative.",
            ]
    bd = results.get("bounded")
    if bd:
        lines += [
            "",
            f"## Bounded cache: {bd['model']}, {bd['tokens']} generated tokens ({bd['sampling']})",
            "",
            "| run | ppl under full fp32 model | x full-cache | max cache tokens | distinct tokens (last 512) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for label, r in bd["runs"].items():
            lines.append(
                f"| {label} | {r['ppl_under_full_fp32']:.3f} | {r['ppl_ratio_to_full']:.3f} | {r['max_cache_tokens']} "
                f"| {r['distinct_tokens_last_512']} |"
            )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    b, k, lat = results.get("bytes"), results.get("kld"), results.get("latency")
    if b:
        names = list(b["formats"])
        axes[0].bar(names, [b["formats"][n]["bytes_per_token"] for n in names])
        axes[0].axhline(b["fp16_bytes_per_token"], color="k", ls="--", label="fp16 cache")
        axes[0].set_ylabel("cache bytes per token")
        axes[0].tick_params(axis="x", labelrotation=60, labelsize=7)
        axes[0].legend()
    axes[0].set_title("SmolLM2-135M: cache bytes/token")
    if k:
        for kv, r in k["formats"].items():
            xs = np.arange(len(r["kld_curve"])) * 32 + 16
            # a residual window's first bin is exactly 0 (every key still in f32): floor it for the log axis
            axes[1].plot(xs, np.maximum(r["kld_curve"], 1e-5), label=f"{kv} (mean {r['kld_mean']:.4f})")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("position")
        axes[1].set_ylabel("KL vs fp32 cache (nats, 32-token bins)")
        axes[1].legend(fontsize=7)
    axes[1].set_title("quality vs position")
    if lat:
        for kv, r in lat["ms_per_token"].items():
            axes[2].plot([int(c) for c in r], list(r.values()), marker="o", label=kv)
        axes[2].set_xscale("log", base=2)
        axes[2].set_xlabel("tokens in cache")
        axes[2].set_ylabel("ms per decoded token (2 threads)")
        axes[2].legend()
    axes[2].set_title("decode latency vs context")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="bytes,kld,latency,bounded")
    p.add_argument("--formats", default=",".join(FORMATS), help="cache formats to (re)measure; others are kept")
    p.add_argument("--work", type=Path, default=Path("/tmp/quantlab-bench-kv"))
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--sequences", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--decode", action="store_true", help="kld of -channel-keys formats by token-by-token decoding")
    p.add_argument("--bounded-tokens", type=int, default=2048)
    p.add_argument("--out", type=Path, default=RESULTS / "kv_cache.json")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}  # keep parts not rerun
    results["date"] = time.strftime("%Y-%m-%d")
    args.work.mkdir(parents=True, exist_ok=True)
    if parts & {"bytes", "kld", "latency"}:
        from quantlab.io import load_checkpoint

        if not SMOLLM2.is_file():
            log(f"{SMOLLM2} absent: skipping the SmolLM2 parts")
        else:
            ckpt = load_checkpoint(SMOLLM2)
            wanted = ["fp32", *(f for f in args.formats.split(",") if f != "fp32")]
            folders = {kv: artifact(ckpt, args.work, "smollm2", kv) for kv in wanted}
            if "bytes" in parts:
                fresh = bench_bytes(ckpt, folders)
                results["bytes"] = {
                    **fresh,
                    "formats": {**results.get("bytes", {}).get("formats", {}), **fresh["formats"]},
                }
            if "kld" in parts:
                results["kld"] = bench_kld(
                    ckpt, folders, args.seq_len, args.sequences, results.get("kld"), decode=args.decode
                )
            if "latency" in parts:
                results["latency"] = bench_latency(folders, args.steps, results.get("latency"))
    if "bounded" in parts and STORIES.is_file():
        results["bounded"] = bench_bounded(args.work, args.bounded_tokens, 128, 4)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    write_markdown(results, args.out.with_suffix(".md"))
    plot(results, args.out.with_suffix(".png"))
    log(f"wrote {args.out} (+ .md, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
