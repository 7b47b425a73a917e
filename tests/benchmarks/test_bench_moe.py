"""benchmarks/bench_moe.py's core on tiny models: the parameter and bytes-per-step accounting held to counts
taken independently from the transformers models, a measured TPOT per artifact, and the report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the script imports common.py and moe_report.py from its own folder
_spec = importlib.util.spec_from_file_location("bench_moe", BENCHMARKS / "bench_moe.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_moe"] = bench  # its dataclass looks its module up while the class is made
_spec.loader.exec_module(bench)
import moe_report as report  # noqa: E402

from quantlab.bench.runner import BenchConfig  # noqa: E402

SHAPE = bench.TINY
FP32 = 4  # bytes per weight and per cache element in an fp32 artifact
CONFIG = BenchConfig(prompt_len=8, gen=4, runs=1, warmup=0, threads=(1,), backends=("onnxruntime",), roofline_mib=4)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    work = tmp_path_factory.mktemp("moe")
    counts, artifacts = bench.prepare(SHAPE, work, recipes=("fp32",))
    return counts, artifacts, work


@pytest.fixture(scope="module")
def doc(prepared):
    """The MoE's two graphs measured (a worker process each; the dense ones are measured the same way)."""
    counts, artifacts, _ = prepared
    moe = [a for a in artifacts if a.model == "moe"]
    return bench.measure(SHAPE, counts, moe, CONFIG, notes=("tiny test run",))


def _hf_counts(folder: Path) -> dict:
    """Total, routed-expert, embedding and active parameters as transformers loads the folder."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    routed = sum(p.numel() for n, p in params.items() if ".mlp.experts." in n)
    config = model.config
    experts, k = getattr(config, "num_experts", 0), getattr(config, "num_experts_per_tok", 0)
    active = total - (routed * (experts - k) // experts if experts else 0)
    return {
        "total": total,
        "routed": routed,
        "embedding": params["model.embed_tokens.weight"].numel(),
        "active": active,
    }


def test_parameter_counts_match_transformers(prepared):
    counts, _, work = prepared
    hf = {m: _hf_counts(work / f"{m}-hf") for m in bench.MODELS}
    for model in bench.MODELS:
        ours = counts[model]
        assert (ours["total"], ours["active"], ours["embedding"]) == (
            hf[model]["total"],
            hf[model]["active"],
            hf[model]["embedding"],
        )
        assert ours["routed_experts"] == hf[model]["routed"]
    assert hf["moe"]["routed"] == SHAPE.layers * SHAPE.experts * 3 * SHAPE.hidden * SHAPE.moe_ff
    # the dense models match the MoE's total / active parameters but for its routers
    routers = SHAPE.layers * SHAPE.experts * SHAPE.hidden
    assert hf["dense-total"]["total"] == hf["moe"]["total"] - routers
    assert hf["dense-active"]["total"] == hf["moe"]["active"] - routers


def test_bytes_per_step_match_the_parameters(prepared):
    _, artifacts, work = prepared
    assert {(a.model, a.graph) for a in artifacts} == {(m, g) for m in bench.MODELS for g in bench.GRAPHS}
    share = SHAPE.top_k / SHAPE.experts
    context = 10
    for a in artifacts:
        hf = _hf_counts(work / f"{a.model}-hf")
        b = bench.step_bytes(a.path, context)
        assert b["context"] == context
        assert b["kv_cache"] == SHAPE.layers * 2 * SHAPE.kv_heads * context * SHAPE.head_dim * FP32
        # attention, routers, norms and the untied head stream whole; the embedding one row
        assert b["weights"] == FP32 * (hf["total"] - hf["routed"] - hf["embedding"])
        assert b["embedding_row"] == FP32 * SHAPE.hidden
        assert b["experts_stored"] == FP32 * hf["routed"]
        assert b["experts_sparse"] == round(FP32 * hf["routed"] * share)
        # the sparse op reads the chosen experts only; the decomposed graph computes them all
        expected = share if (a.model, a.graph) == ("moe", "fused") else 1.0
        assert b["experts_graph"] == round(FP32 * hf["routed"] * expected)
        rest = b["weights"] + b["embedding_row"] + b["constants"] + b["kv_cache"]
        assert b["graph"] == b["experts_graph"] + rest and b["sparse"] == b["experts_sparse"] + rest
        assert 0 < b["constants"] < 1024  # RoPE frequencies, shapes and scalars only
        assert not b["experts_quantized"]


def test_every_artifact_is_measured(doc):
    rows = doc["results"]
    assert [(r["model"], r["graph"], r["moe_form"]) for r in rows] == [
        ("moe", "fused", "op"),
        ("moe", "plain", "decomposed"),
    ]
    for r in rows:
        assert r["status"] == "ok", r["reason"]
        assert r["tpot_ms"]["median"] > 0 and r["tpot_ms"]["n"] == CONFIG.runs * (CONFIG.gen - 1)
        assert r["graph_GBps"] == pytest.approx(r["bytes_per_step"]["graph"] / r["tpot_ms"]["median"] / 1e6)
        assert r["artifact_bytes"] > r["bytes_per_step"]["weights"]
        assert r["bytes_per_step"]["context"] == CONFIG.prompt_len + CONFIG.gen // 2
    assert r["bytes_per_step"]["graph"] > rows[0]["bytes_per_step"]["graph"]  # decomposed: every expert
    result = doc
    assert result["machine"]["cpu"] and "cpu_flags" in result["machine"]
    assert result["notes"][0] == "tiny test run"


def test_report_table_plot_and_readme_block(doc, tmp_path):
    result = doc
    md = report.markdown(result, "p.png")
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[0] == "| " + " | ".join(report.COLUMNS) + " |"
    assert len(lines) == 1 + len(result["results"])
    assert lines[1].startswith("| moe | fp32 | fused (MoE op) |")
    assert "- note: tiny test run" in md
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{report.README_START}\nold\n{report.README_END}\nafter\n")
    report.write_outputs(result, tmp_path, "moe_tiny", readme)
    text = readme.read_text()
    assert "old" not in text and text.startswith(f"before\n{report.README_START}\nGenerated by")
    assert text.endswith(f"{report.README_END}\nafter\n")
    assert (tmp_path / "moe_tiny.png").stat().st_size > 0 and (tmp_path / "moe_tiny.json").is_file()


def test_quantized_experts_are_counted_as_their_graph_reads_them(prepared, tmp_path):
    _, artifacts, work = prepared
    share = SHAPE.top_k / SHAPE.experts
    fp32 = next(a for a in artifacts if (a.model, a.graph) == ("moe", "fused"))
    fp32_experts = bench.step_bytes(fp32.path, 10)["experts_stored"]
    for graph in bench.GRAPHS:
        out = tmp_path / graph
        bench.convert(work / "moe-hf", out, "w4a16-g32-asym", graph, fresh=False)
        b = bench.step_bytes(out, 10)
        assert b["experts_graph"] == round(b["experts_stored"] * (share if graph == "fused" else 1.0))
        assert b["experts_sparse"] == round(b["experts_stored"] * share)
        if b["experts_quantized"]:  # 4-bit codes and their scales and zero points: under a third of fp32
            assert b["experts_stored"] < fp32_experts / 3
        else:
            assert b["experts_stored"] == fp32_experts


def test_summary_ratios():
    def row(model, graph, ms, recipe="fp32"):
        return {"model": model, "recipe": recipe, "graph": graph, "status": "ok", "tpot_ms": {"median": ms}}

    rows = [row("moe", "fused", 10), row("moe", "plain", 60), row("dense-active", "fused", 8)]
    rows += [row("dense-total", "fused", 50), row("moe", "fused", 5, "w4")]  # w4 has no dense rows: no line
    assert report.summary({"results": rows}) == [
        "- fp32: the MoE op's TPOT is 1.25x dense-active's and 0.20x dense-total's (fused graphs); "
        "the decomposed MoE's is 1.20x dense-total's."
    ]
