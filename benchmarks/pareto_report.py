"""benchmarks/bench_pareto.py's results file: merging runs, and the table, plot and README block made from it."""

from __future__ import annotations

import logging
from pathlib import Path

from common import replace_block, save  # benchmarks/ is the script folder

RESULT_NAME = "pareto_smollm2"
README_START, README_END = "<!-- pareto:start -->", "<!-- pareto:end -->"
logger = logging.getLogger("bench_pareto")


def merge(old: dict | None, new: dict) -> dict:
    """``new`` with the rows of ``old`` that it did not measure, when both measured the same tokens and model."""
    if not old or old.get("eval", {}).get("token_ids_sha256") != new["eval"]["token_ids_sha256"]:
        return new
    if old.get("model", {}).get("sha256") != new["model"]["sha256"]:
        return new
    measured = {(r["tool"], r["row"]) for r in new["results"]}
    kept = [r for r in old["results"] if (r["tool"], r["row"]) not in measured]
    if kept:
        notes = new["notes"] + [n for n in old.get("notes", []) if n not in new["notes"]]
        commands = old.get("commands", [old.get("command")]) + new["commands"]
        new = {**new, "results": new["results"] + kept, "notes": notes, "commands": commands}
        new["merged_from"] = old.get("merged_from") or old.get("created")  # where the oldest kept rows ran
        # a version the new run could not see (llama-cpp-python absent) is the one the kept rows ran with
        versions, old_versions = new["machine"]["versions"], old.get("machine", {}).get("versions", {})
        new["machine"]["versions"] = {k: v if v else old_versions.get(k) for k, v in versions.items()}
        for key, value in old.get("machine", {}).items():
            new["machine"].setdefault(key, value)
        if new["references"]["cross_check"] is None:
            new["references"]["cross_check"] = old["references"].get("cross_check")
    return new


# --- outputs -----------------------------------------------------------------------------------------------------

REFERENCE_NOTE = (
    "The fp32 reference is the Q4_1 GGUF's own dequantization, so a row that keeps or rebuilds the Q4_1 grid "
    "(quantlab's `source` recipe and `--max-size` choosing `source`, llama.cpp's q4_1) is near-lossless by "
    "construction; the rows that quantize afresh (quantlab's w4/w8 recipes, llama.cpp's other types) are the "
    "comparison of the two quantizers."
)
PLOT_KLD_FLOOR = 1e-4  # rows closer to their reference are drawn on this line, their KLD in the label
K_QUANT_NOTE = (
    "llama.cpp's K-quants need rows of a multiple of 256 weights; SmolLM2-135M's hidden size is 576, so every "
    "tensor with 576-weight rows (attention, gate/up, the embedding) falls back to a legacy type (q4_K to q5_0, "
    "q5_K to q5_1, q6_K to q8_0; 180 of 272 tensors in q4_K_M and q4_K_S) and only ffn_down (1536) keeps K "
    "blocks: its K-quant rows are larger, and better, than their names suggest (llama_model_quantize's warnings)."
)
COLUMNS = ("tool", "row", "size MB", "KLD mean", "KLD p99", "top-1", "PPL")


def _ordered(doc: dict) -> list[dict]:
    """Measured rows by size, then the rows that did not run."""
    ok = sorted((r for r in doc["results"] if r["status"] == "ok"), key=lambda r: r["size_bytes"])
    return ok + [r for r in doc["results"] if r["status"] != "ok"]


def table_rows(doc: dict) -> list[list[str]]:
    out = []
    for r in _ordered(doc):
        if r["status"] != "ok":
            out.append([r["tool"], r["row"], f"{r['status']}: {r.get('reason', '')}", "-", "-", "-", "-"])
            continue
        reference = r["row"] == doc["references"].get(r["tool"])
        out.append(
            [
                r["tool"],
                r["row"] + (" (reference)" if reference else ""),
                f"{r['size_bytes'] / 1e6:.1f}",
                f"{r['kld_mean']:.4f}" if r["kld_mean"] >= 1e-4 or reference else f"{r['kld_mean']:.1e}",
                f"{r['kld_p99']:.4f}",
                f"{100 * r['top1_agreement']:.1f}%",
                f"{r['ppl']:.2f}",
            ]
        )
    return out


def markdown(doc: dict, plot_link: str | None = None) -> str:
    m, e = doc["machine"], doc["eval"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v and k != "matplotlib")
    lines = [
        f"SmolLM2-135M-Instruct ({doc['model']['file']} dequantized to fp32 is every tool's reference); "
        f"{e['sequences']} x {e['seq_len']} tokens of {e['text']}; KL(P_fp32 || P_quant) in nats averaged over "
        f"every predicted position, top-1 agreement with the tool's own fp32 model, perplexity on the text; "
        f"size = model.onnx + model.onnx.data or the .gguf file (MB = 10^6 bytes). {m['cpu']}, "
        f"{e['threads']} threads; {versions}; {doc['created']}"
        + (f" (other rows kept from {doc['merged_from']}, same tokens and model)" if doc.get("merged_from") else "")
        + ".",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in table_rows(doc)]
    cross = doc["references"].get("cross_check")
    if cross:
        lines += [
            "",
            f"The two fp32 references against each other ({cross['what']}): KLD mean {cross['kld_mean']:.1e}, "
            f"max {cross['kld_max']:.1e}, top-1 {100 * cross['top1_agreement']:.2f}%.",
        ]
    notes = [REFERENCE_NOTE, *doc.get("notes", [])]
    if any(r["tool"] == "llama.cpp" and "_K" in r["row"] for r in doc["results"]):
        notes.append(K_QUANT_NOTE)
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    if plot_link:
        lines += ["", f"![size against KLD]({plot_link})"]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    """Size (MB) against KLD mean (log scale), one marker per tool, each point labelled with its row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # marker, colour, label offsets in points (alternating along the size axis, so neighbours do not overlap)
    markers = {"quantlab": ("o", "tab:blue", [(5, 4), (5, 12)]), "llama.cpp": ("s", "tab:orange", [(5, -10), (5, -18)])}
    fig, ax = plt.subplots(figsize=(10, 6))
    for tool, (marker, color, offsets) in markers.items():
        rows = [r for r in doc["results"] if r["tool"] == tool and r["status"] == "ok"]
        rows = sorted((r for r in rows if r["row"] != doc["references"].get(tool)), key=lambda r: r["size_bytes"])
        if not rows:
            continue
        sizes = [r["size_bytes"] / 1e6 for r in rows]
        klds = [max(r["kld_mean"], PLOT_KLD_FLOOR) for r in rows]  # the reference's 0 has no place on a log axis
        ax.scatter(sizes, klds, marker=marker, color=color, label=tool, s=40)
        for i, (r, x, y) in enumerate(zip(rows, sizes, klds, strict=True)):
            label = r["row"] + (f" (KLD {r['kld_mean']:.0e})" if r["kld_mean"] < PLOT_KLD_FLOOR else "")
            ax.annotate(label, (x, y), textcoords="offset points", xytext=offsets[i % 2], fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("file size, MB (model.onnx + .data; .gguf)")
    ax.set_ylabel("KLD mean vs own fp32, nats (log)")
    ax.set_title(
        f"SmolLM2-135M-Instruct: quality per byte ({doc['eval']['sequences']} x {doc['eval']['seq_len']} tokens)"
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def replace_readme_block(text: str, block: str) -> str:
    """``text`` with what lies between the pareto markers replaced by ``block``; ValueError without them."""
    return replace_block(text, block, README_START, README_END)


def readme_block(doc: dict) -> str:
    return (
        "Generated by `benchmarks/bench_pareto.py` from `benchmarks/results/pareto_smollm2.json` "
        "(`python benchmarks/bench_pareto.py --render` rewrites it); do not edit by hand.\n\n"
        + markdown(doc, f"benchmarks/results/{RESULT_NAME}.png")
    )


def write_outputs(doc: dict, results: Path, readme: Path | None) -> None:
    save(results / f"{RESULT_NAME}.json", doc)
    (results / f"{RESULT_NAME}.md").write_text(markdown(doc, f"{RESULT_NAME}.png"), encoding="utf-8")
    plot(doc, results / f"{RESULT_NAME}.png")
    if readme is not None and readme.is_file():
        text = readme.read_text(encoding="utf-8")
        try:
            readme.write_text(replace_readme_block(text, readme_block(doc)), encoding="utf-8")
        except ValueError as e:
            logger.warning("%s: %s; README not updated", readme, e)
