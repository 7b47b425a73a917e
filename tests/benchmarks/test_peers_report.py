"""benchmarks/peers_report.py: issue 18's bars computed from bench rows (hand-made rows, figures checked by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the report imports common.py from its own folder
import peers_report as report  # noqa: E402

TARGETS = [
    {"path": "/w/w4a16-g32-asym-fused", "producer": "quantlab"},
    {"path": "/w/w4a16-g32-asym-fused-kv-int4", "producer": "quantlab"},
    {"path": "/w/genai-builder-int4", "producer": "onnxruntime-genai"},
    {"path": "/w/m.q4_0.gguf", "format": "gguf"},
]


def _row(target, backend, context, tpot, batch=1, tokens_per_s=None):
    return {
        "target": f"/w/{target}",
        "backend": backend,
        "context": context,
        "batch": batch,
        "status": "ok",
        "tpot_ms": {"median": tpot},
        "tokens_per_s": tokens_per_s,
    }


def test_tpot_bar_against_the_best_peer_and_the_int4_cache():
    doc = {
        "targets": TARGETS,
        "results": [
            _row("w4a16-g32-asym-fused", "onnxruntime-genai", 256, 6.0),
            _row("w4a16-g32-asym-fused", "torch-kernels", 256, 4.0),
            _row("genai-builder-int4", "onnxruntime-genai", 256, 5.5),
            _row("m.q4_0.gguf", "llama.cpp", 256, 5.0),
            _row("w4a16-g32-asym-fused", "torch-kernels", 4096, 12.0),
            _row("w4a16-g32-asym-fused", "onnxruntime-genai", 4096, 12.5),
            _row("w4a16-g32-asym-fused-kv-int4", "onnxruntime-genai", 4096, 13.0),
            _row("w4a16-g32-asym-fused-kv-int4", "torch-kernels", 4096, 1.0),  # its own cache: no int4 bar
            _row("genai-builder-int4", "onnxruntime-genai", 4096, 14.0),
            {**_row("m.q4_0.gguf", "llama.cpp", 4096, 1.0), "status": "failed"},  # a failed row is no peer
        ],
    }
    lines = report.peer_bars(doc)
    assert lines[0].startswith("- context 256: quantlab default w4 4.00 ms (torch-kernels; onnxruntime-genai 6.00 ms)")
    assert "best peer llama.cpp q4_0 5.00 ms: 0.80x (bar <= 0.8: met)" in lines[0]
    assert "best peer onnxruntime-genai builder int4 14.00 ms: 0.86x (bar <= 0.8: not met)" in lines[1]
    assert lines[2:] == [
        "- int4 KV at 4096 tokens in onnxruntime-genai: 13.00 ms vs fp32 cache 12.50 ms (bar <=: not met)"
    ]


def test_batch_bar():
    doc = {
        "targets": TARGETS,
        "results": [
            _row("w4a16-g32-asym-fused", "torch-kernels", None, 5.0, batch=1, tokens_per_s=100.0),
            _row("w4a16-g32-asym-fused", "torch-kernels", None, 9.0, batch=16, tokens_per_s=650.0),
        ],
    }
    assert report.batch_bars(doc) == [
        "- batch 16 / batch 1 tokens/s, w4a16-g32-asym-fused in torch-kernels: 650 / 100 = 6.5x (bar >= 6: met)"
    ]


def test_speculative_bar_from_bench_speculative_rows(tmp_path):
    """benchmarks/bench_speculative.py keeps its rows under "rows" and names its machine: the block takes its
    bars from them (and renders no table for it)."""
    import json

    row = {
        "target": "/w/target",
        "backend": "torch-kernels",
        "mode": "speculative",
        "status": "ok",
        "draft": "/w/draft-4-v8192",
        "draft_tokens": 3,
        "tpot_ratio": 0.6,
        "acceptance_rate": 0.71,
        "identical_to_plain": True,
    }
    doc = {"rows": [row, {**row, "status": "failed"}], "machine": {"cpu": "Some CPU"}}
    (tmp_path / report.SPECULATIVE).write_text(json.dumps(doc))
    block = report.readme_block(tmp_path, tmp_path)
    bars = [line for line in block.splitlines() if line.startswith("- speculative")]
    assert bars == [
        "- speculative decoding, target with draft draft-4-v8192 (k = 3) in torch-kernels: acceptance 71%, effective "
        "TPOT 0.60x plain (bar <= 0.65: met); same tokens as plain decoding: True (benchmarks/bench_speculative.py "
        "on Some CPU)"
    ]
    # the verification costs the same run measured: the ratio no draft can beat, one line per k
    doc |= {"verify_ms": {"1": 4.0, "4": 10.0}, "ceiling_ratio": {"3": 0.625}}
    (tmp_path / report.SPECULATIVE).write_text(json.dumps(doc))
    block = report.readme_block(tmp_path, tmp_path)
    assert [line for line in block.splitlines() if line.startswith("- speculative decoding's ceiling")] == [
        "- speculative decoding's ceiling at k = 3 (every drafted token accepted, drafting free): 0.62x plain, the "
        "target's forward over 4 tokens taking 10.0 ms against 4.0 ms for one (benchmarks/bench_speculative.py on "
        "Some CPU)"
    ]
