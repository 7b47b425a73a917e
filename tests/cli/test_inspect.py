"""quantlab inspect's size by part: every byte of model.onnx + model.onnx.data lands in one part, and a
tied table read by both the lookup and the head is reported once, as "shared embedding/head"."""

from __future__ import annotations

import json

import onnx
import pytest

from quantlab.cli.inspect import PARTS, size_by_part
from quantlab.cli.main import main
from quantlab.emit.artifact import save_model
from quantlab.graph_builder.decoder import build_decoder
from quantlab.passes.manager import run_passes
from quantlab.pipelines import cleanup_pipeline, quantization_pipeline
from quantlab.recipe import load_recipe
from tests.models import model_path
from tests.tiny import tiny_checkpoint


def parts_of(folder) -> dict[str, int]:
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return size_by_part(proto, (folder / "model.onnx").stat().st_size)


def stored_bytes(folder) -> int:
    return (folder / "model.onnx").stat().st_size + (folder / "model.onnx.data").stat().st_size


@pytest.mark.parametrize("tie", [False, True])
def test_parts_add_up_and_a_tied_table_is_one_part(tie, tmp_path):
    ckpt = tiny_checkpoint(tie=tie)
    model = build_decoder(ckpt)
    recipe = load_recipe("w4a16-g32-asym")
    model, _ = run_passes(model, quantization_pipeline(model, recipe, tied=tie) + cleanup_pipeline())
    save_model(model, tmp_path, progress=False)
    parts = parts_of(tmp_path)
    assert sum(parts.values()) == stored_bytes(tmp_path)
    vocab, hidden = ckpt.spec.vocab_size, ckpt.spec.hidden_size
    head_codes = vocab * 128  # the head's w8a16-g128: one padded 128-code block per row of 64
    if tie:
        assert parts["shared embedding/head"] == head_codes and "embedding" not in parts and "head" not in parts
    else:
        assert parts["head"] == head_codes and parts["embedding"] == vocab * hidden  # 8-bit table
    assert parts["linears"] > 0 and parts["graph"] > 0 and set(parts) <= set(PARTS)  # tiny scales stay inline


@pytest.mark.slow
def test_inspect_prints_the_parts_of_a_tied_fp32_artifact(tmp_path, capsys):
    out = tmp_path / "fp32"
    assert main(["convert", str(model_path("stories260K.bin")), "-o", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parts"]["shared embedding/head"] == 512 * 64 * 4  # vocab x hidden fp32, stored once
    assert sum(info["parts"].values()) == stored_bytes(out)
    assert main(["inspect", str(out)]) == 0
    assert "shared embedding/head" in capsys.readouterr().out
