"""The benchmark's outputs from its JSON: the text table, the README's markdown and the plots.

Speculative rows (``--draft``, ``"mode": "speculative"``) get a table of their own after the main ones.

The README's performance section is generated: :func:`replace_block` swaps what lies between
``<!-- bench:start -->`` and ``<!-- bench:end -->`` for :func:`markdown` of benchmarks/results/latency_*.json.
"""

from __future__ import annotations

import os
from pathlib import Path

START_MARKER = "<!-- bench:start -->"
END_MARKER = "<!-- bench:end -->"
GOAL_W4_OVER_FP32 = 1 / 3  # the goal for the 1B-shaped model at 2 threads

COLUMNS = (
    "variant",
    "backend",
    "threads",
    "TTFT ms",
    "TPOT ms",
    "TPOT p90",
    "tok/s",
    "peak RSS MB",
    "size MB",
    "GB/s (roofline %)",
    "KLD",
    "top-1",
)


SPECULATIVE_COLUMNS = (
    "variant",
    "draft",
    "backend",
    "threads",
    "k",
    "prompt",
    "acceptance",
    "tok/target fwd",
    "plain TPOT ms",
    "spec TPOT ms",
    "ratio",
    "same ids",
)


def _plain(rows: list[dict]) -> list[dict]:
    """The rows of the main tables: all but the speculative ones (``--draft``), which have a table of their own."""
    return [r for r in rows if r.get("mode") != "speculative"]


def _speculative(doc: dict) -> list[dict]:
    return [r for r in doc["results"] if r.get("mode") == "speculative"]


def speculative_cells(row: dict, notes: dict[str, int]) -> list[str]:
    """One speculative row as SPECULATIVE_COLUMNS: effective TPOT (wall time after the first token / tokens)
    of plain and speculative decoding, and their ratio."""
    draft = os.path.basename(os.path.normpath(row["draft"])) if row.get("draft") else "-"
    cells = [row["variant"], draft, row["backend"], _num(row.get("threads"), "d"), str(row.get("draft_tokens", "-"))]
    if row["status"] != "ok":
        number = notes.setdefault(f"{row['backend']}: {row['reason']}", len(notes) + 1)
        return cells + [f"{row['status']} [{number}]"] + ["-"] * (len(SPECULATIVE_COLUMNS) - 6)
    return cells + [
        str(row["prompt_len"]),
        "-" if row["acceptance_rate"] is None else f"{100 * row['acceptance_rate']:.1f}%",
        _num(row["tokens_per_target_forward"], ".2f"),
        _num(row["effective_tpot_ms"]["plain"], ".2f"),
        _num(row["effective_tpot_ms"]["speculative"], ".2f"),
        f"{row['tpot_ratio']:.2f}x",
        "yes" if row["identical_to_plain"] else "NO",
    ]


def _speculative_header(doc: dict) -> str:
    c = doc["config"]
    return (
        f"speculative decoding: chat prompt, {c['gen']} generated tokens, {c['runs']} runs (+{c['warmup']} warm-up); "
        "TPOT = wall time after the first token / tokens"
    )


def _num(value, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def _mb(value) -> str:
    return "-" if value is None else f"{value / 1e6:.0f}" if value >= 1e8 else f"{value / 1e6:.1f}"


def columns(doc: dict) -> tuple[str, ...]:
    """COLUMNS, with a "batch" column after "threads" when the run measured batches (``--batch``): then
    "tok/s" is the whole batch's, batch / TPOT."""
    if any(r.get("batch", 1) != 1 for r in _plain(doc["results"])):
        return COLUMNS[:3] + ("batch",) + COLUMNS[3:]
    return COLUMNS


def mixes_attention(doc: dict) -> bool:
    """Whether the run holds plain and fused-attention graphs (--attention): then each variant says which."""
    return len({r.get("attention") for r in doc["results"] if r.get("attention")}) > 1


def _variant(row: dict, attention: bool) -> str:
    return row["variant"] + (f" {row['attention']}" if attention and row.get("attention") else "")


def row_cells(row: dict, notes: dict[str, int], batch: bool = False, attention: bool = False) -> list[str]:
    """One result as table cells (see COLUMNS; with ``batch``, see :func:`columns`). A row that did not
    run says so in its TTFT cell with a footnote number; ``notes`` maps each distinct reason to its
    number (filled in here)."""
    cells = [_variant(row, attention), row["backend"], _num(row.get("threads"), "d")]
    if batch:
        cells.append(str(row.get("batch", 1)))
    if row["status"] != "ok":
        number = notes.setdefault(f"{row['backend']}: {row['reason']}", len(notes) + 1)
        return cells + [f"{row['status']} [{number}]"] + ["-"] * (len(COLUMNS) - 4)
    q = row.get("quality") or {}
    bandwidth = row.get("bandwidth_GBps")
    bw = (
        "-"
        if bandwidth is None
        else f"{bandwidth:.1f}" + (f" ({row['roofline_pct']:.0f}%)" if row.get("roofline_pct") is not None else "")
    )
    ttft = _num(row["ttft_ms"]["median"]) + (" (cold)" if row["ttft_ms"].get("cold_single_prefill") else "")
    return cells + [
        ttft,
        _num(row["tpot_ms"]["median"], ".2f"),
        _num(row["tpot_ms"]["p90"], ".2f"),
        _num(row["tokens_per_s"]),
        _mb(row.get("peak_rss_bytes")),
        _mb(row.get("size_bytes")),
        bw + (" noisy" if row.get("noisy") else ""),
        _num(q.get("kld_mean"), ".4f"),
        "-" if q.get("top1_agreement") is None else f"{100 * q['top1_agreement']:.1f}%",
    ]


def _footnotes(notes: dict[str, int]) -> list[str]:
    return [f"[{n}] {reason}" for reason, n in notes.items()]


def _groups(doc: dict) -> dict[tuple[str, int | None], list[dict]]:
    """Rows by (model, context): one table each."""
    out: dict[tuple[str, int | None], list[dict]] = {}
    for row in _plain(doc["results"]):
        out.setdefault((row["model"], row.get("context")), []).append(row)
    return out


def _header(doc: dict, model: str, context: int | None) -> str:
    c = doc["config"]
    if context is None and c["contexts"]:  # a sweep's rows without a context: backends that could not run
        return f"{model}: not measured"
    prompt = f"context {context}" if context is not None else f"prompt {c['prompt_len']}"
    return f"{model}: {prompt}, {c['gen']} generated tokens, {c['runs']} runs (+{c['warmup']} warm-up)"


def text_table(doc: dict) -> str:
    """Plain aligned columns for the terminal, one block per (model, context), then the warnings."""
    blocks = []
    for (model, context), rows in _groups(doc).items():
        notes: dict[str, int] = {}
        head = columns(doc)
        table = [list(head)] + [row_cells(r, notes, len(head) > len(COLUMNS), mixes_attention(doc)) for r in rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table]
        blocks.append("\n".join([_header(doc, model, context), *lines, *_footnotes(notes)]))
    if spec := _speculative(doc):
        notes = {}
        table = [list(SPECULATIVE_COLUMNS)] + [speculative_cells(r, notes) for r in spec]
        widths = [max(len(line[i]) for line in table) for i in range(len(SPECULATIVE_COLUMNS))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table]
        blocks.append("\n".join([_speculative_header(doc), *lines, *_footnotes(notes)]))
    blocks += doc.get("notes", [])
    lines = [(None, doc["roofline_GBps"])] if doc["roofline_GBps"] else []
    lines += [(n, n["roofline_GBps"]) for n in doc.get("nodes", {}).values()]  # --ray: each node's own
    for node, roofline in lines:
        roof = ", ".join(f"{t} thread{'s' if t != '1' else ''} {v:.1f} GB/s" for t, v in roofline.items())
        where = f"node {node['name']} ({node['ip']}, {node['machine']['cpu']}) " if node else ""
        blocks.append(f"{where}roofline (fastest streaming read: onnxruntime sgemv, torch.mv, numpy sum): {roof}")
    blocks += [f"warning: {w}" for w in doc["warnings"]]
    return "\n\n".join(blocks)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def goal_lines(doc: dict) -> list[str]:
    """w4 over fp32 TPOT per backend and thread count, where both were measured at the same prompt."""
    out = []
    ok = [r for r in _plain(doc["results"]) if r["status"] == "ok" and r.get("context") is None]
    for fp32 in (r for r in ok if r["variant"] == "fp32"):
        for w4 in ok:
            if w4["variant"].startswith("w4") and w4["model"] == fp32["model"] and w4["threads"] == fp32["threads"]:
                ratio = w4["tpot_ms"]["median"] / fp32["tpot_ms"]["median"]
                verdict = "met" if ratio <= GOAL_W4_OVER_FP32 else "not met"
                out.append(
                    f"{w4['variant']} on {w4['backend']} / fp32 on {fp32['backend']}, threads {w4['threads']}: "
                    f"TPOT ratio {ratio:.2f} (goal <= 0.33: {verdict})"
                )
    return out


def markdown(docs: list[tuple[Path, dict]], readme_dir: Path) -> str:
    """Markdown for ``(json file, doc)`` pairs: per (model, context) a table; a sweep as TPOT by context,
    with its plot linked relative to ``readme_dir``."""
    parts = []
    for json_path, doc in docs:
        name = Path(json_path).name
        m = doc["machine"]
        sweep = any(r.get("context") is not None for r in _plain(doc["results"]))
        roof = ", ".join(f"{t} thr {v:.1f} GB/s" for t, v in doc["roofline_GBps"].items())
        others = m.get("others_cpu_share")
        quiet = (
            f"other processes took {100 * others:.0f}% of the CPU time"
            if others is not None
            else f"load average at start {m['loadavg_start'][0]:.2f}"
        )
        parts.append(
            f"**{name}** — {m['cpu']}, {m['cores']} cores; onnxruntime {m['versions'].get('onnxruntime')}, "
            f"torch {m['versions'].get('torch')}, transformers {m['versions'].get('transformers')}; "
            f"roofline {roof}; {quiet}; {doc['created']}."
        )
        if sweep:
            parts.append(_sweep_markdown(doc))
        else:
            for (model, context), rows in _groups(doc).items():
                notes: dict[str, int] = {}
                head = columns(doc)
                table = [_md_row(list(head)), _md_row(["---"] * len(head))]
                table += [_md_row(row_cells(r, notes, len(head) > len(COLUMNS), mixes_attention(doc))) for r in rows]
                parts.append(f"{_header(doc, model, context)}\n\n" + "\n".join(table))
                if notes:
                    parts.append("\n".join(f"- {n}" for n in _footnotes(notes)))
        if spec := _speculative(doc):
            notes = {}
            table = [_md_row(list(SPECULATIVE_COLUMNS)), _md_row(["---"] * len(SPECULATIVE_COLUMNS))]
            table += [_md_row(speculative_cells(r, notes)) for r in spec]
            parts.append(f"{_speculative_header(doc)}\n\n" + "\n".join(table))
            if notes:
                parts.append("\n".join(f"- {n}" for n in _footnotes(notes)))
        if doc.get("plot"):  # stored relative to the JSON's folder
            link = os.path.relpath(Path(json_path).absolute().parent / doc["plot"], Path(readme_dir).absolute())
            parts.append(f"![TPOT, {name}]({Path(link).as_posix()})")
        lines = goal_lines(doc) + doc.get("notes", []) + [f"warning: {w}" for w in doc["warnings"]]
        if lines:
            parts.append("\n".join(f"- {n}" for n in lines))
    return "\n\n".join(parts) + "\n"


def _sweep_markdown(doc: dict) -> str:
    contexts = sorted({r["context"] for r in _plain(doc["results"]) if r.get("context") is not None})
    series: dict[tuple, dict] = {}
    notes: dict[str, int] = {}
    for r in _plain(doc["results"]):
        key = (r["model"], _variant(r, mixes_attention(doc)), r["backend"], r.get("threads"), r.get("batch", 1))
        cell = row_cells(r, notes)[3] if r["status"] != "ok" else f"{r['tpot_ms']['median']:.2f}"
        series.setdefault(key, {})[r.get("context")] = cell
    batched = len(columns(doc)) > len(COLUMNS)
    head = ["model", "variant", "backend", "threads", *(["batch"] if batched else [])]
    head += [f"{c} tokens" for c in contexts]
    lines = [_md_row(head), _md_row(["---"] * len(head))]
    for (model, variant, backend, threads, batch), cells in series.items():
        lead = [model, variant, backend, "-" if None in cells else str(threads), *([str(batch)] if batched else [])]
        if None in cells:  # an unavailable backend: one row, no context
            lines.append(_md_row([*lead, cells[None]] + ["-"] * (len(contexts) - 1)))
        else:
            lines.append(_md_row(lead + [cells.get(c, "-") for c in contexts]))
    title = f"TPOT in ms against context length ({doc['config']['gen']} decode steps after a prompt of that length)"
    return "\n\n".join([title, "\n".join(lines), *(["\n".join(f"- {n}" for n in _footnotes(notes))] if notes else [])])


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the bench markers replaced by ``block``; ValueError without them."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < 0 or end < start:
        raise ValueError(
            f"the README has no {START_MARKER} ... {END_MARKER} block to replace (add both markers, "
            "in that order, where the performance table belongs)"
        )
    return text[: start + len(START_MARKER)] + "\n" + block.rstrip("\n") + "\n" + text[end:]


def plot(doc: dict, path: str | os.PathLike) -> None:
    """TPOT against context for a sweep, else a bar per measured row (median, with p90 as the whisker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in _plain(doc["results"]) if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    models = sorted({r["model"] for r in ok})
    if any(r.get("context") is not None for r in ok):
        lines: dict[tuple, list] = {}
        for r in ok:
            lines.setdefault(
                (r["model"], _variant(r, mixes_attention(doc)), r["backend"], r["threads"], r.get("batch", 1)), []
            ).append(r)
        for (model, variant, backend, threads, batch), rows in lines.items():
            rows.sort(key=lambda r: r["context"])
            label = f"{variant}, {backend}, {threads} thr" + (f", batch {batch}" if batch > 1 else "")
            label += f" [{model}]" if len(models) > 1 else ""
            ax.plot([r["context"] for r in rows], [r["tpot_ms"]["median"] for r in rows], marker="o", label=label)
        ax.set_xscale("log", base=2)
        contexts = sorted({r["context"] for r in ok})
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("context length (tokens in the KV cache)")
        ax.set_title(f"TPOT against context: {', '.join(models)}")
    else:
        labels = [
            f"{_variant(r, mixes_attention(doc))}\n{r['backend']}, {r['threads']} thr"
            + (f", batch {r['batch']}" if r.get("batch", 1) > 1 else "")
            for r in ok
        ]
        medians = [r["tpot_ms"]["median"] for r in ok]
        whiskers = [[0] * len(ok), [r["tpot_ms"]["p90"] - r["tpot_ms"]["median"] for r in ok]]
        ax.bar(range(len(ok)), medians, yerr=whiskers, capsize=3)
        ax.set_xticks(range(len(ok)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"TPOT (median, whisker to p90): {', '.join(models)}")
    ax.set_ylabel("ms per output token")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
