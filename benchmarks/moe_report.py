"""benchmarks/bench_moe.py's outputs: the markdown table, the plot (TPOT against bytes streamed per step)
and the README block, all made from the results JSON."""

from __future__ import annotations

from pathlib import Path

from common import replace_block, save  # benchmarks/ is the script folder

README_START, README_END = "<!-- moe:start -->", "<!-- moe:end -->"
COLUMNS = (
    "model",
    "recipe",
    "graph",
    "params total / active (M)",
    "artifact MB",
    "streamed / step MB",
    "of which experts MB",
    "if only the chosen experts MB",
    "TPOT ms (median, p90)",
    "GB/s",
)
MODEL_ORDER = {"moe": 0, "dense-active": 1, "dense-total": 2}


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def _ordered(doc: dict) -> list[dict]:
    return sorted(doc["results"], key=lambda r: (MODEL_ORDER.get(r["model"], 9), r["recipe"], r["graph"]))


def table_rows(doc: dict) -> list[list[str]]:
    rows = []
    for r in _ordered(doc):
        b = r["bytes_per_step"]
        graph = r["graph"] + (f" (MoE {r['moe_form']})" if r["moe_form"] else "")
        recipe = r["recipe"] + (
            " (experts float)" if r["model"] == "moe" and r["recipe"] != "fp32" and not b["experts_quantized"] else ""
        )
        if r["status"] == "ok":
            tpot = f"{r['tpot_ms']['median']:.1f} ({r['tpot_ms']['p90']:.1f})" + (" noisy" if r["noisy"] else "")
            gbps = f"{r['graph_GBps']:.1f}"
        else:
            tpot, gbps = f"{r['status']}: {r['reason']}", "-"
        rows.append(
            [
                r["model"],
                recipe,
                graph,
                f"{r['params_total'] / 1e6:.1f} / {r['params_active'] / 1e6:.1f}",
                _mb(r["artifact_bytes"]),
                _mb(b["graph"]),
                _mb(b["experts_graph"]),
                _mb(b["sparse"]),
                tpot,
                gbps,
            ]
        )
    return rows


def header(doc: dict) -> str:
    m, s, c = doc["machine"], doc["shape"], doc["config"]
    others = m.get("others_cpu_share")
    load = f"load average {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}" + (
        f", other processes took {100 * others:.0f}% of the CPU time" if others is not None else ""
    )
    roof = ", ".join(f"{t} threads {v:.1f} GB/s" for t, v in doc["roofline_GBps"].items())
    return (
        f"RANDOM weights (speed and accounting only). Shape: hidden {s['hidden']}, {s['layers']} layers, "
        f"{s['heads']}/{s['kv_heads']} heads of {s['head_dim']}, vocabulary {s['vocab']} (untied head); MoE "
        f"{s['experts']} experts of {s['moe_ff']}, top {s['top_k']}; dense-total's MLP is {s['experts']} x "
        f"{s['moe_ff']} wide, dense-active's {s['top_k']} x {s['moe_ff']}. onnxruntime, {c['threads'][0]} threads, "
        f"prompt {c['prompt_len']}, {c['gen']} tokens, {c['runs']} runs; bytes per step at context "
        f"{doc['results'][0]['bytes_per_step']['context']}, KV cache read included. Machine: {m['cpu']} "
        f"({m['cores']} cores; flags: {' '.join(m['cpu_flags']) or 'none'}); {load}; roofline {roof}. "
        f"Graphs: fused = {doc['graphs'].get('fused', '-')}; plain = {doc['graphs'].get('plain', '-')}."
    )


def summary(doc: dict) -> list[str]:
    """One line per recipe: the MoE's TPOT in each graph against the dense models' in the fused graph."""
    tpot = {
        (r["model"], r["recipe"], r["graph"]): r["tpot_ms"]["median"] for r in doc["results"] if r["status"] == "ok"
    }
    lines = []
    for recipe in dict.fromkeys(r["recipe"] for r in doc["results"]):
        op, dec = tpot.get(("moe", recipe, "fused")), tpot.get(("moe", recipe, "plain"))
        active, total = tpot.get(("dense-active", recipe, "fused")), tpot.get(("dense-total", recipe, "fused"))
        if None in (op, active, total):
            continue
        line = (
            f"- {recipe}: the MoE op's TPOT is {op / active:.2f}x dense-active's and {op / total:.2f}x "
            f"dense-total's (fused graphs)"
        )
        if dec is not None:
            line += f"; the decomposed MoE's is {dec / total:.2f}x dense-total's"
        lines.append(line + ".")
    return lines


def markdown(doc: dict, png_name: str | None) -> str:
    lines = [header(doc), "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(doc)]
    ratios = summary(doc)
    lines += [""] + ratios if ratios else []
    if png_name:
        lines += ["", f"![TPOT against bytes streamed per decode step]({png_name})"]
    extra = [f"- note: {n}" for n in doc.get("notes", [])] + [f"- warning: {w}" for w in doc.get("warnings", [])]
    return "\n".join(lines + ([""] + extra if extra else [])) + "\n"


def plot(doc: dict, path: Path) -> None:
    """TPOT median against the bytes a step streams as the graph reads them; a dashed line per roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"moe": "o", "dense-active": "^", "dense-total": "s"}
    colors = {"fused": "tab:blue", "plain": "tab:orange"}
    fig, ax = plt.subplots(figsize=(9, 6))
    rows = sorted((r for r in doc["results"] if r["status"] == "ok"), key=lambda r: r["bytes_per_step"]["graph"])
    for r in rows:
        x, y = r["bytes_per_step"]["graph"] / 1e6, r["tpot_ms"]["median"]
        ax.scatter([x], [y], marker=markers.get(r["model"], "x"), color=colors.get(r["graph"], "gray"), s=50)
        # a dense model's two graphs read the same bytes: fused labels go left, plain ones right, MoE ones above
        offset, align = {"fused": ((-7, -3), "right"), "plain": ((7, -3), "left")}[r["graph"]]
        if r["model"] == "moe":
            offset, align = (0, 7), "center"
        label = f"{r['model']} {r['recipe'].split('-')[0]}"
        ax.annotate(label, (x, y), textcoords="offset points", xytext=offset, ha=align, fontsize=7)
    xs = [r["bytes_per_step"]["graph"] / 1e6 for r in rows] or [1.0]
    span = [min(xs) / 1.5, max(xs) * 1.5]
    for threads, gbps in doc["roofline_GBps"].items():  # MB / (GB/s) = ms
        ax.plot(span, [x / gbps for x in span], "k--", lw=0.8, label=f"roofline {gbps:.1f} GB/s ({threads} threads)")
    for name, marker in markers.items():
        ax.scatter([], [], marker=marker, color="gray", label=name)
    for name, color in colors.items():
        ax.scatter([], [], marker="o", color=color, label=f"{name} graph")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes a decode step streams (graph's reads, KV cache included), MB (log)")
    ax.set_ylabel("TPOT median, ms (log)")
    ax.set_title("Qwen3-MoE-shaped vs dense of equal total / active parameters (random weights)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def readme_block(doc: dict, name: str) -> str:
    return (
        f"Generated by `benchmarks/bench_moe.py` from `benchmarks/results/{name}.json` "
        "(`python benchmarks/bench_moe.py --render` rewrites it); do not edit by hand.\n\n"
        + markdown(doc, f"benchmarks/results/{name}.png")
    )


def write_outputs(doc: dict, results: Path, name: str, readme: Path | None) -> None:
    save(results / f"{name}.json", doc)
    (results / f"{name}.md").write_text(markdown(doc, f"{name}.png"), encoding="utf-8")
    plot(doc, results / f"{name}.png")
    if readme is not None:
        text = readme.read_text(encoding="utf-8")
        readme.write_text(replace_block(text, readme_block(doc, name), README_START, README_END), encoding="utf-8")
