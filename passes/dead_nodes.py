"""Remove nodes whose outputs nothing reads, and initializers nothing uses."""

from __future__ import annotations

import onnx_ir as ir


class RemoveDeadNodesPass(ir.passes.InPlacePass):
    """Node(...) -> nothing, when no node and no graph output reads any of its outputs.

    Runs from the outputs backwards, so a chain of dead nodes goes in one call. Initializers left
    without users are removed too (graph inputs are part of the model's interface and stay).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        graph_outputs = set(graph.outputs)
        modified = False
        for node in reversed(list(graph)):
            if any(out in graph_outputs or out.uses() for out in node.outputs):
                continue
            graph.remove(node, safe=True)
            modified = True
        graph_inputs = set(graph.inputs)
        for name, value in list(graph.initializers.items()):
            if not value.uses() and value not in graph_outputs and value not in graph_inputs:
                del graph.initializers[name]
                modified = True
        return ir.passes.PassResult(model, modified)
