"""QuantizeEmbeddingPass: structure, ``modified`` both ways, numerics against the dequantized table."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.graph_builder.decoder import BuildOptions, build_decoder
from quantlab.io.spec import Checkpoint
from quantlab.passes.quantize_embedding import QuantizeEmbeddingPass, pack_rows
from quantlab.quant.rtn import dequantize, rtn_quantize
from quantlab.quant.scheme import parse_scheme
from tests.tiny import ArraySource, run_decoder, tiny_checkpoint

IDS = np.array([[1, 5, 9, 33, 70, 2, 11, 64]], dtype=np.int64)
# Same fp32 arithmetic after the gather; only the table differs, and it is dequantized exactly.
ATOL = 1e-5


def test_pack_rows_golden_bytes():
    codes = np.array([[0, 1, 2, 3, 15], [8, 8, 8, 8, 8]], dtype=np.uint8)
    assert pack_rows(codes, 4).tolist() == [[0x10, 0x32, 0x0F], [0x88, 0x88, 0x08]]
    assert pack_rows(codes, 8).tolist() == codes.tolist()


@pytest.mark.parametrize("scheme", ["w8a16-g32-asym", "w4a16-g32-asym", "w8a16-g64-sym", "w4a16-g64-sym"])
def test_structure_modified_and_numerics(scheme, tmp_path):
    ckpt = tiny_checkpoint()
    s = parse_scheme(scheme)
    model = build_decoder(ckpt)
    result = QuantizeEmbeddingPass(s)(model)
    assert result.modified
    ops = [n.op_type for n in result.model.graph]
    assert "GatherBlockQuantized" in ops and "Gather" not in ops
    assert not QuantizeEmbeddingPass(s)(result.model).modified
    arrays = {n: ckpt.tensors.load(n) for n in ckpt.tensors.names()}  # the oracle: the dequantized table
    table = arrays["model.embed_tokens.weight"]
    arrays["model.embed_tokens.weight"] = dequantize(rtn_quantize(table, s.bits, s.group_size, s.symmetric))
    reference_model = build_decoder(
        Checkpoint(spec=ckpt.spec, tensors=ArraySource(arrays), tokenizer=None, source_format="test")
    )
    reference = run_decoder(reference_model, ckpt, tmp_path / "ref", IDS)
    got = run_decoder(result.model, ckpt, tmp_path / "q", IDS)
    np.testing.assert_allclose(got, reference, atol=ATOL, rtol=0)


def test_fp16_storage_quantizes_the_table_under_the_cast():
    model = build_decoder(tiny_checkpoint(), BuildOptions(weight_dtype="fp16"))
    assert QuantizeEmbeddingPass(parse_scheme("w8a16-g32-asym"))(model).modified
    gbq = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    assert gbq.inputs[0].name == "model.embed_tokens.data"


def test_no_embedding_no_change():
    from tests.passes.graphs import clean_graph

    assert not QuantizeEmbeddingPass(parse_scheme("w8a16-g32-asym"))(clean_graph()).modified
