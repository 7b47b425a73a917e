"""Calibration that executes the graph one decoder layer at a time, in onnxruntime.

Each layer is built alone (:func:`quantlab.graph_builder.decoder.build_layer`: that layer's weights, no
cache), fed the previous layer's outputs for every calibration sequence, and observed at the input
of each of its linears. So peak memory is one layer's weights plus the calibration activations,
never the whole model with every intermediate tensor exposed.

Sequential mode (GPTQ, arXiv 2210.17323, section 4): once layer i is quantized, it runs again with
its quantized weights and *those* outputs feed layer i + 1, so later layers calibrate on what they
will really see.

The result is a value (:class:`CalibrationResult`); the graph passes consume it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
from collections.abc import Callable, Iterator

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from quantlab.graph_builder.decoder import LINEAR_INPUTS, build_layer
from quantlab.io.spec import Checkpoint
from quantlab.quant.packed import PackedWeights

logger = logging.getLogger(__name__)

ROLES = tuple(LINEAR_INPUTS)  # self_attn.q_proj, ..., mlp.down_proj


class OverlaySource:
    """A TensorSource that answers some names from ``overrides`` and the rest from ``base``."""

    def __init__(self, base, overrides: dict[str, np.ndarray]):
        self.base = base
        self.overrides = overrides

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.overrides[name].shape) if name in self.overrides else self.base.shape(name)

    def load(self, name: str) -> np.ndarray:
        if name in self.overrides:
            return np.array(self.overrides[name], dtype=np.float32)
        return self.base.load(name)


class LayerCache:
    """A TensorSource that keeps the tensors it loads whose names start with ``prefix`` (one layer's),
    read-only: the layer's observation, its method and its error report then read and widen each
    weight from the checkpoint once instead of once per use (a 1B layer's bf16 -> f32 is ~0.1 s each)."""

    def __init__(self, base, prefix: str):
        self.base = base
        self.prefix = prefix
        self.kept: dict[str, np.ndarray] = {}

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def load(self, name: str) -> np.ndarray:
        if not name.startswith(self.prefix):
            return self.base.load(name)
        if name not in self.kept:
            value = self.base.load(name)
            value.flags.writeable = False  # shared by every user: nobody may change it in place
            self.kept[name] = value
        return self.kept[name]

    def forget(self, name: str) -> None:
        """Drop a kept tensor (a later load reads it again); for a method's peak, not its speed."""
        self.kept.pop(name, None)


def with_layer_cache(ckpt: Checkpoint, index: int) -> Checkpoint:
    return dataclasses.replace(ckpt, tensors=LayerCache(ckpt.tensors, f"model.layers.{index}."))


def with_overrides(ckpt: Checkpoint, overrides: dict[str, np.ndarray]) -> Checkpoint:
    if not overrides:
        return ckpt
    return dataclasses.replace(ckpt, tensors=OverlaySource(ckpt.tensors, overrides))


class LayerRunner:
    """One decoder layer as an onnxruntime session: hidden (batch, seq, hidden) -> (hidden, taps)."""

    def __init__(
        self,
        ckpt: Checkpoint,
        index: int,
        threads: int | None = None,
        outputs: str = "all",
        transform: Callable[[ir.Model], ir.Model] | None = None,
    ):
        """outputs: what :meth:`run` returns, see :func:`quantlab.graph_builder.decoder.build_layer`.
        transform: applied to the layer's graph before it is loaded (the artifact's weight passes, for
        a layer that must compute exactly what the quantized model will)."""
        import onnxruntime as ort

        self.index = index
        self.outputs = outputs
        self.threads = threads
        model = build_layer(ckpt, index, outputs=outputs)
        if transform is not None:
            model = transform(model)
        # One layer is far below protobuf's 2 GB. Each copy of the weights is dropped as soon as the
        # next exists: at the 1B scale a layer is 240 MB of float32.
        serialized = ir.serde.serialize_model(model).SerializeToString()
        del model
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # No spinning: an idle onnxruntime worker spins, waiting for the next op, by default. Calibration
        # keeps several sessions alive on the same cores (the layer's, the Gram's, GPTQ's GEMMs), and
        # their spinning workers took the cores from the working ones: a 1B layer's observation took
        # 55 s with spinning, 40 s without (2 cores).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The arena stays on: it keeps a run's intermediates (attention scores, the MLP's 4x-wide
        # tensors: about 0.4 GB at 1024 tokens of a 1B layer) for the next run, where allocating them
        # afresh page-faults 0.4 GB per run: 15-20% of a 1B layer's calibration time on 2 cores.
        # The session, and its arena, lives for one pass over the calibration data.
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(serialized, sess_options=opts, providers=["CPUExecutionProvider"])
        del serialized
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, hidden: np.ndarray) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """hidden (batch, seq, hidden) -> output (batch, seq, hidden), {role input name: activations};
        the output is None for a runner built with ``outputs="taps"``, the taps empty with "hidden"."""
        batch, seq, _ = hidden.shape
        feeds = {
            "hidden_states": np.ascontiguousarray(hidden, dtype=np.float32),
            "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy(),
            "attention_mask": np.ones((batch, seq), dtype=np.int64),
        }
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))
        out = outputs.pop("hidden_out", None)
        prefix = f"model.layers.{self.index}."
        return out, {name.removeprefix(prefix): value for name, value in outputs.items()}


def batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@dataclasses.dataclass
class LayerStats:
    """What calibration observed at the inputs of one layer's linears, keyed by role input name
    (``input_layernorm.out``, ``self_attn.ctx_flat``, ``post_attention_layernorm.out``, ``mlp.act``)."""

    hessians: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # (K, K), H = 2/n sum x x^T
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    samples: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)  # token subsets (t, K)
    absmax: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # (K,)

    def sample(self, name: str) -> np.ndarray:
        return np.concatenate(self.samples[name], axis=0)


def observe_layer(
    runner: LayerRunner,
    hidden: np.ndarray,
    *,
    batch: int,
    hessians: bool,
    samples: int,
    absmax: bool,
    seed: int,
    outputs: np.ndarray | None | str = "new",
) -> tuple[np.ndarray | None, LayerStats]:
    """Run the layer over all calibration sequences; return its outputs and the statistics asked for.

    ``samples``: how many tokens per linear input to keep (evenly spread, seeded) for searches that
    need the activations themselves (AWQ); 0 keeps none. ``outputs``: where the layer's outputs go:
    "new" (a new array), an array (``hidden`` itself works: a batch's inputs are not read again once
    its outputs exist), or None (not kept; a sequential calibration recomputes them from the
    quantized layer). Every copy of the hidden states not made is 512 MB for 128 x 512 tokens of a
    2048-wide model.
    """
    from quantlab.calib.blocks import StatsMerger, block_layout, observe_blocks
    from quantlab.quant import gram

    # Canonical blocks (quantlab.calib.blocks): the statistics are the bytes a distributed calibration
    # over the same sequences computes, however many machines share them.
    layout = block_layout(hidden.shape[0], batch)
    out = np.empty_like(hidden) if isinstance(outputs, str) else outputs
    merger = StatsMerger()
    for block in observe_blocks(
        runner, hidden, layout, hessians=hessians, samples=samples, absmax=absmax, seed=seed, out=out
    ):
        merger.add(block)
    if hessians:
        gram.release()  # the arenas of the Gram sessions, before the method's own peak
    return out, merger.layer_stats(layout.blocks)


@dataclasses.dataclass
class CalibrationResult:
    """What calibration decided, for the graph passes to apply.

    quantized: linear name -> integers (weight-only methods), held bit-packed until the emitter asks.
    int8: linear name -> (codes int8 (N, K), scales (N,)) for W8A8.
    float_overrides: canonical tensor name -> new float values (norm weights with scales folded in,
        float linears whose rows absorbed a scale).
    layer_errors: per layer, ||y_q - y|| / ||y|| of the layer output on the calibration data.
    """

    quantized: PackedWeights = dataclasses.field(default_factory=PackedWeights)
    int8: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    float_overrides: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    layer_errors: list[float] = dataclasses.field(default_factory=list)
    # sparse layer -> its experts' token counts and RTN fallbacks (quantlab.calib.experts.ExpertTokens)
    experts: dict = dataclasses.field(default_factory=dict)


def relative_error(approx: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(approx - reference) / max(np.linalg.norm(reference), 1e-30))


def embed_tokens(ckpt: Checkpoint, tokens: np.ndarray) -> np.ndarray:
    """tokens (n, seq) -> hidden states (n, seq, hidden), the graph's Gather (and embedding scale) done once
    in numpy."""
    table = ckpt.tensors.load("model.embed_tokens.weight")  # (vocab, hidden)
    hidden = table[tokens]
    del table
    if ckpt.spec.embedding_scale != 1.0:  # Gemma's sqrt(hidden), in float32 as the graph's Mul
        hidden *= np.float32(ckpt.spec.embedding_scale)
    return hidden


def release_freed_memory() -> None:
    """Give the memory the process freed back to the system (glibc's malloc_trim; a no-op elsewhere).

    A layer's calibration frees gigabytes in blocks of every size from several threads (onnxruntime's
    pools, torch's, numpy): glibc keeps much of it in its per-thread arenas, so without this the
    resident set of a 1B model's calibration climbed from 2.3 to 3.2 GB over 16 layers, and the
    artifact's emission started on top of that (4.2 GB peak), while the live data grew by 30 MB a layer.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def progress_bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="layer", disable=not enabled)
