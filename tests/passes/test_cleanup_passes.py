"""Each cleanup pass: structure, ``modified`` both ways, numerics in onnxruntime before and after."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from quantlab.passes.check import CheckModelPass, InferShapesPass
from quantlab.passes.dead_nodes import RemoveDeadNodesPass
from quantlab.passes.fold_constants import FoldConstantsPass
from quantlab.passes.manager import run_passes
from tests.passes.graphs import check, clean_graph, foldable_graph, ops, run_ort

# Folding evaluates the same fp32 arithmetic in onnx's reference evaluator instead of onnxruntime.
NUMERIC_ATOL = 1e-6

X = np.arange(8, dtype=np.float32).reshape(2, 4) - 3.0


def test_remove_dead_nodes_structure_and_numerics():
    model = foldable_graph()
    before = run_ort(model, {"x": X})
    result = RemoveDeadNodesPass()(model)
    assert result.modified
    assert "Neg" not in ops(result.model) and "Abs" not in ops(result.model)
    assert ops(result.model) == ["Sqrt", "Add", "Mul"]
    np.testing.assert_allclose(run_ort(result.model, {"x": X})[0], before[0], atol=NUMERIC_ATOL)
    check(result.model)


def test_remove_dead_nodes_unmodified_on_clean_graph():
    result = RemoveDeadNodesPass()(clean_graph())
    assert not result.modified
    assert ops(result.model) == ["Relu"]


def test_remove_dead_nodes_drops_unused_initializers():
    model = foldable_graph()
    FoldConstantsPass()(model)
    result = RemoveDeadNodesPass()(model)
    assert result.modified
    assert set(result.model.graph.initializers) == {"scale.folded"}


def test_fold_constants_structure_and_numerics():
    model = foldable_graph()
    before = run_ort(model, {"x": X})
    result = FoldConstantsPass()(model)
    assert result.modified
    assert "Sqrt" not in ops(result.model) and "Add" not in ops(result.model)
    assert "Mul" in ops(result.model)
    folded = result.model.graph.initializers["scale.folded"].const_value.numpy()
    np.testing.assert_allclose(folded, [2.0, 3.0, 4.0, 5.0], atol=NUMERIC_ATOL)
    np.testing.assert_allclose(run_ort(result.model, {"x": X})[0], before[0], atol=NUMERIC_ATOL)
    check(result.model)


def test_fold_constants_unmodified_on_clean_graph():
    result = FoldConstantsPass()(clean_graph())
    assert not result.modified


def test_fold_constants_leaves_big_tensors_to_the_runtime():
    model = foldable_graph()
    result = FoldConstantsPass(max_elements=2)(model)
    assert not result.modified
    assert ops(result.model)[:2] == ["Sqrt", "Add"]


def test_infer_shapes_fills_types_and_is_idempotent():
    model = foldable_graph()
    for node in model.graph:
        for v in node.outputs:
            v.shape, v.type = None, None
    result = InferShapesPass()(model)
    assert result.modified
    mul = next(n for n in result.model.graph if n.op_type == "Mul")
    assert mul.outputs[0].dtype == ir.DataType.FLOAT
    assert list(mul.outputs[0].shape)[1] == 4
    assert not InferShapesPass()(result.model).modified


def test_check_model_accepts_valid_and_rejects_broken_graph():
    assert not CheckModelPass()(foldable_graph()).modified
    broken = foldable_graph()
    mul = next(n for n in broken.graph if n.op_type == "Mul")
    mul.op_type = "NoSuchOp"
    with pytest.raises(Exception, match="NoSuchOp"):
        CheckModelPass()(broken)


def test_run_passes_records_each_pass_and_dumps_ir(tmp_path):
    model = foldable_graph()
    before = run_ort(model, {"x": X})
    pipeline = [RemoveDeadNodesPass(), FoldConstantsPass(max_elements=64), RemoveDeadNodesPass(), CheckModelPass()]
    model, records = run_passes(model, pipeline, dump_dir=tmp_path)
    assert [r["pass"] for r in records] == [
        "RemoveDeadNodesPass",
        "FoldConstantsPass",
        "RemoveDeadNodesPass",
        "CheckModelPass",
    ]
    assert [r["modified"] for r in records] == [True, True, True, False]
    assert records[1]["config"] == {"max_elements": 64}
    assert ops(model) == ["Mul"]
    assert len(list(tmp_path.iterdir())) == 4
    np.testing.assert_allclose(run_ort(model, {"x": X})[0], before[0], atol=NUMERIC_ATOL)


def test_fold_constants_never_grows_the_model():
    """Cast(fp16 weight) -> fp32 would double the stored bytes: --dtype fp16 must stay fp16 on disk."""
    from quantlab.graph_builder.decoder import BuildOptions, build_decoder
    from tests.tiny import tiny_checkpoint

    model = build_decoder(tiny_checkpoint(), BuildOptions(weight_dtype="fp16"))
    casts = sum(n.op_type == "Cast" for n in model.graph)
    result = FoldConstantsPass()(model)
    assert sum(n.op_type == "Cast" for n in result.model.graph) == casts
    assert not any(name.endswith(".folded") for name in result.model.graph.initializers)


def test_fold_constants_keeps_one_copy_of_a_table_two_nodes_read():
    from onnx import TensorProto, helper

    table = helper.make_tensor("t", TensorProto.FLOAT, [16, 32], np.ones(512, np.float32))  # 2 KiB
    shape = helper.make_tensor("s", TensorProto.INT64, [2], [32, 16])
    nodes = [
        helper.make_node("Reshape", ["t", "s"], ["r"], name="view"),
        helper.make_node("MatMul", ["x", "r"], ["y"], name="mm"),
        helper.make_node("Gather", ["t", "i"], ["z"], name="gather"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32]),
        helper.make_tensor_value_info("i", TensorProto.INT64, [1]),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=[table, shape])
    shared = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert not FoldConstantsPass()(shared).modified  # folded, the view would be a second table
    shared.graph.outputs.pop()
    shared.graph.remove(next(n for n in shared.graph if n.name == "gather"), safe=True)
    assert FoldConstantsPass()(shared).modified  # the Reshape's alone: folding moves the bytes, not copies them
