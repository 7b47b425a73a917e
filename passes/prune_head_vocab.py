"""A head that scores only the most frequent tokens, for speculative drafts.

    head(x) -> logits (batch, seq, vocab)
        -> head'(x) -> (batch, seq, n) -> Pad(last axis, 1 column of -inf) -> Gather(axis -1, map) -> logits

A draft's job is to guess the target's next token, and nearly every token it guesses is one of a few
thousand frequent ones; yet scoring all of them costs a draft as much as several of its layers (SmolLM2:
576 x 49152, 28M of a 3-layer draft's 39M weights). FR-Spec (Zhao et al., arXiv 2502.14856) keeps the
draft's head to the tokens most frequent in a corpus. Here ``head'`` holds the rows of the kept tokens
(sliced from the quantized head: the same codes, scales and zero points, so a kept token's logit is
what the full head gives it, bit for bit), and ``map`` sends each kept token to its column and every
other token to the -inf one: the artifact keeps the I/O contract (full-vocabulary logits), so any
runtime and the speculative loop use it unchanged, and a token the draft cannot score is one it never
proposes (exact under greedy and under sampling, where its probability is then 0 and the verification
rule still gives the target's distribution).

``map`` is the initializer ``lm_head.vocab_map`` (vocab,) int64; quantlab's native runtime reads it to
do the same gather (quantlab/runtime/torch_decoder.py). The head is the node producing ``logits``: a
MatMulNBits (its weight an initializer, or the Reshape of a tied embedding's rows, which then stays the
embedding's alone), or a float MatMul by a (hidden, vocab) initializer or the Transpose of the table.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from quantlab.passes.graph_utils import add_constant

LOGITS = "logits"
VOCAB_MAP = "lm_head.vocab_map"


def _array(value: ir.Value) -> np.ndarray:
    """An initializer's array, through the Reshape a tied head reads the embedding's rows by."""
    producer = value.producer()
    if value.const_value is None and producer is not None and producer.op_type == "Reshape":
        return _array(producer.inputs[0]).reshape(_array(producer.inputs[1]))
    if value.const_value is None:
        raise ValueError(f"{value.name} is computed, not stored: the head cannot be pruned")
    return np.asarray(value.const_value.numpy())


def _float_weight(value: ir.Value) -> np.ndarray:
    """A float head's (hidden, vocab) weight: an initializer, its fp16 Cast, or Transpose(table)."""
    producer = value.producer()
    if producer is None:
        return _array(value)
    if producer.op_type == "Cast":
        return _float_weight(producer.inputs[0])
    if producer.op_type == "Transpose":
        return _float_weight(producer.inputs[0]).T
    raise ValueError(f"the head's weight comes from a {producer.op_type}: the head cannot be pruned")


class PruneHeadVocabPass(ir.passes.InPlacePass):
    """The head scores ``kept`` token ids (sorted, unique) and every other token gets -inf."""

    def __init__(self, kept: np.ndarray, describe: dict | None = None):
        super().__init__()
        self.kept = np.asarray(kept, dtype=np.int64)
        if self.kept.ndim != 1 or len(self.kept) == 0 or np.any(np.diff(self.kept) <= 0):
            raise ValueError("kept token ids must be a non-empty, sorted list without repeats")
        self.describe = describe or {}

    def config(self) -> dict:
        return {"kept": int(len(self.kept)), **self.describe}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        out = next((v for v in graph.outputs if v.name == LOGITS), None)
        head = out.producer() if out is not None else None
        if head is None:
            raise ValueError("the graph has no logits output")
        n = len(self.kept)
        if head.op_type == "MatMulNBits" and head.domain == "com.microsoft":
            attrs = {a.name: a.value for a in head.attributes.values()}
            vocab = attrs["N"]
            self._check(vocab)
            blocks = _array(head.inputs[1])[self.kept]  # (n, n_blocks, blob)
            scales = _array(head.inputs[2]).reshape(vocab, -1)[self.kept]
            inputs = [
                head.inputs[0],
                add_constant(graph, "lm_head.kept.qweight", np.ascontiguousarray(blocks)),
                add_constant(graph, "lm_head.kept.scales", np.ascontiguousarray(scales.reshape(-1))),
            ]
            if len(head.inputs) > 3 and head.inputs[3] is not None:
                zero_points = _array(head.inputs[3]).reshape(vocab, -1)[self.kept]
                inputs.append(add_constant(graph, "lm_head.kept.qzeros", np.ascontiguousarray(zero_points.reshape(-1))))
            new_attrs = [ir.AttrInt64("N", n) if a.name == "N" else a for a in head.attributes.values()]
            scored = ir.Node("com.microsoft", "MatMulNBits", inputs, attributes=new_attrs, name=head.name)
        elif head.op_type == "MatMul" and head.domain in ("", "ai.onnx"):
            weight = _float_weight(head.inputs[1])  # (hidden, vocab)
            vocab = weight.shape[1]
            self._check(vocab)
            kept = np.ascontiguousarray(weight[:, self.kept], dtype=np.float32)  # fp16 storage computes in fp32
            scored = ir.Node(
                "", "MatMul", [head.inputs[0], add_constant(graph, "lm_head.kept.weight", kept)], name=head.name
            )
        else:
            raise ValueError(f"the head is a {head.op_type}: only MatMulNBits and MatMul heads can be pruned")
        scored.outputs[0].name = "lm_head.kept_logits"  # (batch, seq, n)
        # every token that is not kept points at the padded column n, which holds -inf
        vocab_map = np.full(vocab, n, dtype=np.int64)
        vocab_map[self.kept] = np.arange(n, dtype=np.int64)
        pads = add_constant(graph, "lm_head.vocab_pads", np.array([0, 0, 0, 0, 0, 1], dtype=np.int64))
        fill = add_constant(graph, "lm_head.vocab_fill", np.array(-np.inf, dtype=np.float32))
        pad = ir.Node("", "Pad", [scored.outputs[0], pads, fill], name="lm_head.vocab_pad")
        pad.outputs[0].name = "lm_head.kept_logits_padded"
        gather = ir.Node(
            "",
            "Gather",
            [pad.outputs[0], add_constant(graph, VOCAB_MAP, vocab_map)],
            attributes=[ir.AttrInt64("axis", -1)],
        )
        gather.name = "lm_head.vocab_gather"
        graph.insert_before(head, [scored, pad, gather])
        out_index = graph.outputs.index(out)
        head.outputs[0].name = "lm_head.full_logits"  # free the name before the gather takes it
        gather.outputs[0].name = LOGITS
        gather.outputs[0].shape, gather.outputs[0].type = out.shape, out.type
        graph.outputs[out_index] = gather.outputs[0]
        graph.remove(head, safe=True)
        return ir.passes.PassResult(model, True)

    def _check(self, vocab: int) -> None:
        if self.kept[-1] >= vocab:
            raise ValueError(f"kept token id {int(self.kept[-1])} is outside the head's vocabulary of {vocab}")
