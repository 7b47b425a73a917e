"""benchmarks/bench_pareto.py's parts that need no model and no llama.cpp: the text, the windows, the rows,
the metrics, the f32 GGUF writer, merging and rendering the results."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the script imports common.py from its own folder
_spec = importlib.util.spec_from_file_location("bench_pareto", BENCHMARKS / "bench_pareto.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
import pareto_report as report  # noqa: E402  (beside the script, found through the path above)

SENTENCE = "The quick brown fox jumps over the lazy dog and keeps running through the field. "


def test_prose_paragraphs_keep_sentences_and_drop_code_titles_and_lists():
    document = "\n\n".join(
        [
            "Naming and binding\n******************",
            "*Names* refer to objects.  " + SENTENCE * 3,
            "   for x in range(3):\n       print(x)",
            "* a list item that is long enough. " * 8,
            "Too short.",
            "A wrapped paragraph\nthat continues here. " + SENTENCE * 3,
        ]
    )
    paragraphs = bench.prose_paragraphs(document)
    assert len(paragraphs) == 2
    assert paragraphs[0].startswith("Names refer to objects.")  # emphasis markers dropped
    assert paragraphs[1].startswith("A wrapped paragraph that continues here.")  # one line


def test_eval_text_is_prose_of_the_running_python():
    text, description = bench.eval_text()
    assert len(text) > 50_000 and "Language Reference" in description
    assert ">>>" not in text


def test_token_windows_spread_over_the_text():
    ids = list(range(1000))
    windows = bench.token_windows(ids, 4, 10)
    assert windows.shape == (4, 10) and windows.dtype == np.int64
    assert windows[0, 0] == 0 and windows[-1, -1] == 999  # first and last tokens included
    with_bos = bench.token_windows(ids, 4, 10, bos=7)
    assert (with_bos[:, 0] == 7).all() and with_bos[0, 1] == 0
    with pytest.raises(ValueError):
        bench.token_windows(ids[:30], 4, 10)


def test_pick_rows():
    table = {"fp32": (), "a": (), "b": ()}
    assert bench.pick_rows(None, table, "fp32") == ["fp32", "a", "b"]
    slow = next(iter(bench.OPT_IN))
    assert slow not in bench.pick_rows(None, bench.QUANTLAB_ROWS, "fp32")
    assert bench.pick_rows(slow, bench.QUANTLAB_ROWS, "fp32") == ["fp32", slow]
    assert bench.pick_rows("", table, "fp32") == []
    assert bench.pick_rows("b,a,b", table, "fp32") == ["fp32", "b", "a"]  # the reference first, once each
    with pytest.raises(SystemExit, match="unknown row"):
        bench.pick_rows("a,zz", table, "fp32")
    assert bench.row_key(("--recipe", "x")) != bench.row_key(("--recipe", "y"))


def test_every_row_table_entry_is_runnable():
    assert next(iter(bench.QUANTLAB_ROWS)) == bench.QUANTLAB_REF
    assert next(iter(bench.LLAMA_ROWS)) == bench.LLAMA_REF
    assert all(name.startswith("LLAMA_FTYPE_") for name in bench.LLAMA_ROWS.values())


def test_compare_against_hand_computed_figures():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, size=(2, 6))
    reference = [rng.normal(size=(6, 5)).astype(np.float32) for _ in range(2)]
    same = bench.compare(ids, reference, reference)
    assert same["positions"] == 10 and same["kld_mean"] == 0.0 and same["top1_agreement"] == 1.0
    assert same["ppl"] == pytest.approx(same["reference_ppl"])
    uniform = [np.zeros((6, 5), np.float32) for _ in range(2)]
    result = bench.compare(ids, reference, uniform)
    assert result["ppl"] == pytest.approx(5.0)  # a uniform model over 5 tokens
    p = [np.exp(r[:-1]) / np.exp(r[:-1]).sum(-1, keepdims=True) for r in reference]
    expected = np.mean(np.concatenate([(q * np.log(q * 5)).sum(-1) for q in p]))  # KL(P || uniform)
    assert result["kld_mean"] == pytest.approx(expected, rel=1e-6)


def test_f32_gguf_keeps_metadata_and_dequantizes(tmp_path):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 64)).astype(np.float32)
    norm = rng.normal(size=(64,)).astype(np.float32)
    source = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(source, arch="llama")
    writer.add_block_count(1)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_token_list(["<s>", "a", "b"])
    quantized = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_norm.weight", norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    out = tmp_path / "tiny.f32.gguf"
    bench.peers.write_f32_gguf(source, out)
    reader = gguf.GGUFReader(out)
    assert reader.fields["llama.block_count"].contents() == 1
    assert reader.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "a", "b"]
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
    tensors = {t.name: t for t in reader.tensors}
    assert {t.tensor_type for t in tensors.values()} == {gguf.GGMLQuantizationType.F32}
    expected = gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_q.weight"].data), expected)
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_norm.weight"].data), norm)
    assert not out.with_name(out.name + ".partial").exists()


def _doc(rows, token_sha="t", created="c"):
    return {
        "created": created,
        "model": {"file": "m.gguf", "sha256": "m"},
        "machine": {"cpu": "cpu", "versions": {"quantlab": "0.1.0"}},
        "eval": {"text": "prose", "sequences": 8, "seq_len": 256, "threads": 2, "token_ids_sha256": token_sha},
        "references": {"quantlab": "fp32", "llama.cpp": "f32", "cross_check": None},
        "results": rows,
        "notes": [],
        "commands": [f"run {created}"],
    }


def _row(tool, name, size, kld=0.1):
    return {
        "tool": tool,
        "row": name,
        "status": "ok",
        "size_bytes": size,
        "kld_mean": kld,
        "kld_p99": kld,
        "kld_max": kld,
        "top1_agreement": 0.9,
        "ppl": 10.0,
    }


def test_merge_keeps_other_rows_only_on_the_same_tokens():
    old = _doc([_row("quantlab", "fp32", 500e6, 0.0), _row("llama.cpp", "q4_0", 90e6)])
    new = _doc([_row("quantlab", "fp32", 500e6, 0.0), _row("quantlab", "w4", 95e6)], created="d")
    merged = report.merge(old, new)
    assert [(r["tool"], r["row"]) for r in merged["results"]] == [
        ("quantlab", "fp32"),
        ("quantlab", "w4"),
        ("llama.cpp", "q4_0"),
    ]
    assert merged["commands"] == ["run c", "run d"]
    assert report.merge(_doc(old["results"], token_sha="other"), new) is new


def test_markdown_orders_by_size_and_shows_rows_that_did_not_run():
    unavailable = {"tool": "quantlab", "row": "source", "status": "unavailable", "reason": "exit 2: no such recipe"}
    doc = _doc([_row("quantlab", "fp32", 500e6, 0.0), _row("llama.cpp", "q4_0", 91.7e6, 0.376), unavailable])
    md = report.markdown(doc, "p.png")
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[0] == "| " + " | ".join(report.COLUMNS) + " |"
    assert lines[2].startswith("| llama.cpp | q4_0 | 91.7 | 0.3760 |")
    assert lines[3].startswith("| quantlab | fp32 (reference) | 500.0 |")
    assert "unavailable: exit 2: no such recipe" in lines[4]
    assert "![size against KLD](p.png)" in md
    text = f"before\n{report.README_START}\nold\n{report.README_END}\nafter\n"
    replaced = report.replace_readme_block(text, "new block")
    assert replaced == f"before\n{report.README_START}\nnew block\n{report.README_END}\nafter\n"
    with pytest.raises(ValueError):
        report.replace_readme_block("no markers", "x")
