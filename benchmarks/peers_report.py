"""The README's "Against the peers" block (issue 18), from the results of `bench_latency.py --peers`.

results/peers_smollm2.json holds TPOT after prompts of 256, 2048 and 4096 tokens for quantlab's default
w4 artifact (fp32 and int4 cache) in onnxruntime-genai and in quantlab's native runtime, the model
builder's int4 artifact in onnxruntime-genai and llama.cpp's q4_0 / q4_K_M; results/batch_smollm2.json
tokens/s at batch 1, 4, 16. The block states issue 18's bars from those rows, then the tables.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import replace_block  # benchmarks/ is the script folder

PEERS, BATCH, SPECULATIVE = "peers_smollm2.json", "batch_smollm2.json", "speculative_smollm2.json"
README_START, README_END = "<!-- peers:start -->", "<!-- peers:end -->"
BAR_TPOT = 0.8  # quantlab's default w4 artifact: TPOT <= 0.8 x the best peer
BAR_BATCH = 6.0  # batch 16: >= 6 x the tokens/s of batch 1
BAR_SPECULATIVE = 0.65
CACHE_FORMAT_RUNTIMES = {"onnxruntime", "onnxruntime-genai"}  # effective TPOT with a draft <= 0.65 x plain decoding


def _rows(doc: dict) -> list[dict]:
    return [r for r in doc["results"] if r.get("status") == "ok" and r.get("mode") != "speculative"]


def _producer(doc: dict, row: dict) -> str:
    target = next((t for t in doc["targets"] if t["path"] == row["target"]), {})
    return target.get("producer") or target.get("format", "")


def _is_quantlab_default(doc: dict, row: dict, kv: str) -> bool:
    """quantlab's default w4 graph (fused) with the fp32 cache (kv "") or the int4 cache (kv "int4")."""
    if _producer(doc, row) != "quantlab" or "fused" not in row["target"].rsplit("/", 1)[-1]:
        return False
    return ("kv-int4" in row["target"]) == (kv == "int4")


def peer_bars(doc: dict) -> list[str]:
    """One line per context: quantlab's best runtime for its default artifact against the best peer."""
    rows = _rows(doc)
    lines = []
    for context in sorted({r["context"] for r in rows if r.get("context")}):
        at = [r for r in rows if r.get("context") == context and r["batch"] == 1]
        peers = {
            "onnxruntime-genai builder int4": [
                r for r in at if r["backend"] == "onnxruntime-genai" and _producer(doc, r) == "onnxruntime-genai"
            ],
            "llama.cpp q4_0": [r for r in at if r["backend"] == "llama.cpp" and "q4_0" in r["target"]],
        }
        best_peer = min(
            ((name, r["tpot_ms"]["median"]) for name, found in peers.items() for r in found),
            key=lambda p: p[1],
            default=None,
        )
        ours = {r["backend"]: r["tpot_ms"]["median"] for r in at if _is_quantlab_default(doc, r, "")}
        if best_peer is None or not ours:
            lines.append(f"- context {context}: not measured (a peer or quantlab's row is missing)")
            continue
        backend, tpot = min(ours.items(), key=lambda kv: kv[1])
        ratio = tpot / best_peer[1]
        verdict = "met" if ratio <= BAR_TPOT else "not met"
        others = ", ".join(f"{b} {t:.2f} ms" for b, t in sorted(ours.items()) if b != backend)
        lines.append(
            f"- context {context}: quantlab default w4 {tpot:.2f} ms ({backend}{'; ' + others if others else ''}) "
            f"vs best peer {best_peer[0]} {best_peer[1]:.2f} ms: {ratio:.2f}x (bar <= {BAR_TPOT}: {verdict})"
        )
    longest = max((r["context"] for r in rows if r.get("context")), default=None)
    if longest is not None:
        # the runtimes that read the artifact's own int4 cache (the native runtime keeps its own cache formats)
        for backend in sorted({r["backend"] for r in rows} & CACHE_FORMAT_RUNTIMES):
            pair = {
                kv: next(
                    (
                        r["tpot_ms"]["median"]
                        for r in rows
                        if r["backend"] == backend and r.get("context") == longest and _is_quantlab_default(doc, r, kv)
                    ),
                    None,
                )
                for kv in ("", "int4")
            }
            if None not in pair.values():
                verdict = "met" if pair["int4"] <= pair[""] else "not met"
                lines.append(
                    f"- int4 KV at {longest} tokens in {backend}: {pair['int4']:.2f} ms vs fp32 cache "
                    f"{pair['']:.2f} ms (bar <=: {verdict})"
                )
    return lines


def batch_bars(doc: dict) -> list[str]:
    rows = _rows(doc)
    lines = []
    for target, backend in sorted({(r["target"], r["backend"]) for r in rows}):
        tps = {r["batch"]: r["tokens_per_s"] for r in rows if r["target"] == target and r["backend"] == backend}
        if 1 in tps and 16 in tps:
            ratio = tps[16] / tps[1]
            name = target.rsplit("/", 1)[-1]
            verdict = "met" if ratio >= BAR_BATCH else "not met"
            lines.append(
                f"- batch 16 / batch 1 tokens/s, {name} in {backend}: {tps[16]:.0f} / {tps[1]:.0f} = {ratio:.1f}x "
                f"(bar >= {BAR_BATCH:g}: {verdict})"
            )
    return lines


def speculative_bars(doc: dict) -> list[str]:
    cpu = doc.get("machine", {}).get("cpu", "?")
    lines = []
    for r in doc["results"]:
        if r.get("mode") != "speculative" or r.get("status") != "ok":
            continue
        ratio = r.get("tpot_ratio")
        verdict = "met" if ratio is not None and ratio <= BAR_SPECULATIVE else "not met"
        draft = str(r.get("draft", "?")).rsplit("/", 1)[-1]
        lines.append(
            f"- speculative decoding, {r['target'].rsplit('/', 1)[-1]} with draft {draft} "
            f"(k = {r.get('draft_tokens', '?')}) in {r['backend']}: acceptance "
            f"{100 * r.get('acceptance_rate', 0):.0f}%, effective TPOT {ratio:.2f}x plain "
            f"(bar <= {BAR_SPECULATIVE}: {verdict}); same tokens as plain decoding: {r.get('identical_to_plain')} "
            f"(benchmarks/bench_speculative.py on {cpu})"
        )
    for k, ratio in doc.get("ceiling_ratio", {}).items():  # the same machine's verification costs
        verify = doc["verify_ms"]
        lines.append(
            f"- speculative decoding's ceiling at k = {k} (every drafted token accepted, drafting free): "
            f"{ratio:.2f}x plain, the target's forward over {int(k) + 1} tokens taking {verify[str(int(k) + 1)]} ms "
            f"against {verify['1']} ms for one (benchmarks/bench_speculative.py on {cpu})"
        )
    return lines


def readme_block(results: Path, readme_dir: Path) -> str:
    from quantlab.bench.report import markdown

    names = [name for name in (PEERS, BATCH, SPECULATIVE) if (results / name).is_file()]
    docs = [(results / name, json.loads((results / name).read_text("utf-8"))) for name in names]
    # benchmarks/bench_speculative.py keeps its `quantlab bench --draft` rows under "rows"
    docs = [(p, d if "results" in d else {**d, "results": d.get("rows", [])}) for p, d in docs]
    by_name = {p.name: d for p, d in docs}
    bars = peer_bars(by_name[PEERS]) if PEERS in by_name else []
    bars += batch_bars(by_name[BATCH]) if BATCH in by_name else []
    bars += speculative_bars(by_name[SPECULATIVE]) if SPECULATIVE in by_name else []
    return "\n".join(
        [
            "Generated by `benchmarks/make_readme_table.py` from `benchmarks/results/"
            + "`, `".join(p.name for p, _ in docs)
            + "` (`python benchmarks/bench_latency.py --peers` measures the peers and batch files, "
            "`benchmarks/bench_speculative.py` the speculative one; each file names the machine and load it ran "
            "under); do not edit by hand. Issue 18's bars, from those rows:",
            "",
            *bars,
            "",
            markdown([(p, d) for p, d in docs if "roofline_GBps" in d], readme_dir),  # bench runs' tables
        ]
    )


def existing(results: Path) -> bool:
    return (results / PEERS).is_file()


def replace_readme_block(text: str, block: str) -> str:
    return replace_block(text, block, README_START, README_END)
