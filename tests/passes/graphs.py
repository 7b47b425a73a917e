"""Small graphs for pass tests, and a helper that runs a model in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper


def run_ort(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def foldable_graph() -> ir.Model:
    """y = x * (sqrt(c) + 1) with a dead branch z = Neg(x); (sqrt(c) + 1) is constant."""
    c = helper.make_tensor("c", TensorProto.FLOAT, [4], [1.0, 4.0, 9.0, 16.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [
        helper.make_node("Sqrt", ["c"], ["sqrt_c"], name="sqrt"),
        helper.make_node("Add", ["sqrt_c", "one"], ["scale"], name="add"),
        helper.make_node("Mul", ["x", "scale"], ["y"], name="mul"),
        helper.make_node("Neg", ["x"], ["z"], name="dead_neg"),
        helper.make_node("Abs", ["z"], ["z2"], name="dead_abs"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=[c, one],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def clean_graph() -> ir.Model:
    """y = Relu(x): nothing to fold, nothing dead."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def check(model: ir.Model) -> None:
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
