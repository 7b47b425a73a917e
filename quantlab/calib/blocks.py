"""Canonical blocks of calibration sequences: the unit whose statistics are the same bytes anywhere.

The calibration sequences are cut into onnxruntime runs of ``batch`` sequences, and the runs into at
most :data:`CANONICAL_BLOCKS` contiguous blocks of equal length (the last may be short)::

    sequences  |....|....|....|....|....|....|....|..|    batches of `batch` sequences
    blocks     |  block 0 |  block 1 |  block 2 |    |    `per_block` batches each

A block's statistics (:class:`BlockStats`: each linear input's float32 Gram, its token count, its
sampled tokens, its per-channel maxima) depend only on the block's sequences and the layer: every
batch is the same onnxruntime run with the same shapes, and a batch's sampled tokens are drawn from
a generator seeded by (seed, global batch index). :class:`StatsMerger` folds blocks in block order
(Grams in float64, :class:`quantlab.quant.gram.OrderedGramSum`), so a layer's statistics are the
same bytes whether one process observed all blocks (quantlab.calib.calibrate) or shards on several
machines each observed a contiguous run of them (quantlab.distributed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np

# Blocks per calibration: the most shards a calibration can use, and the number of partial Grams that
# travel per linear input and layer in a distributed one. 8 keeps a 1B model's 64 batches (128 x 512
# tokens, 2 sequences per run) in blocks of 8 runs.
CANONICAL_BLOCKS = 8


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """How ``sequences`` calibration sequences are cut into runs and canonical blocks."""

    sequences: int
    batch: int  # sequences per onnxruntime run
    per_block: int  # runs per canonical block

    @property
    def batches(self) -> int:
        return math.ceil(self.sequences / self.batch)

    @property
    def blocks(self) -> int:
        return math.ceil(self.batches / self.per_block)

    def block_rows(self, block: int) -> tuple[int, int]:
        """(start, stop) of the block's sequences."""
        start = block * self.per_block * self.batch
        return start, min(self.sequences, start + self.per_block * self.batch)

    def shard_blocks(self, shards: int) -> list[tuple[int, int]]:
        """(first block, stop block) of each of ``shards`` contiguous, near-equal runs of blocks."""
        if not 1 <= shards <= self.blocks:
            raise ValueError(f"{shards} shards for {self.blocks} canonical blocks")
        base, extra = divmod(self.blocks, shards)
        out, start = [], 0
        for s in range(shards):
            stop = start + base + (1 if s < extra else 0)
            out.append((start, stop))
            start = stop
        return out


def block_layout(sequences: int, batch: int, blocks: int = CANONICAL_BLOCKS) -> BlockLayout:
    batches = math.ceil(sequences / batch)
    return BlockLayout(sequences, batch, max(1, math.ceil(batches / blocks)))


@dataclasses.dataclass
class BlockStats:
    """One canonical block's statistics at the inputs of a layer's linears, keyed by role input name.
    Plain arrays and ints: what a shard sends back per block and layer."""

    index: int
    grams: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # packed upper x^T x, float32
    widths: dict[str, int] = dataclasses.field(default_factory=dict)  # K of each gram
    counts: dict[str, int] = dataclasses.field(default_factory=dict)  # tokens
    samples: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)  # (t, K) token subsets
    absmax: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # (K,)

    @property
    def nbytes(self) -> int:
        arrays = [*self.grams.values(), *self.absmax.values(), *(a for v in self.samples.values() for a in v)]
        return sum(a.nbytes for a in arrays)


def observe_blocks(
    runner,
    hidden: np.ndarray,
    layout: BlockLayout,
    *,
    first_block: int = 0,
    hessians: bool,
    samples: int,
    absmax: bool,
    seed: int,
    out: np.ndarray | None = None,
) -> Iterator[BlockStats]:
    """Run the layer over ``hidden``, the sequences of blocks ``first_block``, ``first_block + 1``, ...
    (all of the calibration's, or a shard's contiguous run), yielding each block's statistics when it is
    done. The layer's outputs go into ``out`` when given (``hidden`` itself works: a run's inputs are
    not read again once its outputs exist)."""
    from quantlab.quant.gram import UpperGram, packed_upper

    if out is not None and runner.outputs == "taps":
        raise ValueError("a runner built with outputs='taps' has no layer outputs to keep")
    seq = hidden.shape[1]
    n_total = layout.sequences * seq  # tokens of the whole calibration: each batch keeps its share
    offset = layout.block_rows(first_block)[0]  # row 0 of hidden is this sequence of the calibration
    block = first_block
    grams: dict[str, UpperGram] = {}  # one running sum per linear input, zeroed for each block
    while True:
        start, stop = layout.block_rows(block)
        if start - offset >= hidden.shape[0]:
            return
        stats = BlockStats(block)
        used: set[str] = set()
        for run_start in range(start, stop, layout.batch):
            sl = slice(run_start - offset, min(stop, run_start + layout.batch) - offset)
            y, taps = runner.run(hidden[sl])
            if out is not None:
                out[sl] = y
            del y
            rng = np.random.default_rng((seed, run_start // layout.batch))  # the global run's own draws
            for name, x in taps.items():
                x = x.reshape(-1, x.shape[-1])  # (tokens, K)
                stats.counts[name] = stats.counts.get(name, 0) + x.shape[0]
                if hessians and x.shape[0]:  # (a sparse MLP's expert can see no token of a run)
                    if name not in grams:
                        grams[name] = UpperGram(x.shape[-1], runner.threads)
                    grams[name].add(x)
                    used.add(name)
                if samples:
                    keep = max(1, round(samples * x.shape[0] / n_total))
                    idx = np.sort(rng.choice(x.shape[0], size=min(keep, x.shape[0]), replace=False))
                    stats.samples.setdefault(name, []).append(np.array(x[idx]))
                if absmax and x.shape[0]:
                    m = np.abs(x).max(axis=0)
                    stats.absmax[name] = m if name not in stats.absmax else np.maximum(stats.absmax[name], m)
            del taps
        for name in sorted(used):
            stats.widths[name] = grams[name].k
            stats.grams[name] = packed_upper(grams[name])
        yield stats
        block += 1


class StatsMerger:
    """Folds :class:`BlockStats` into a layer's statistics, strictly in block order (a block that
    arrives early waits), so the result does not depend on which block finished first."""

    def __init__(self, first_block: int = 0) -> None:
        from quantlab.quant.gram import OrderedGramSum

        self._sum_type = OrderedGramSum
        self.next_block = first_block
        self.waiting: dict[int, BlockStats] = {}
        self.sums: dict = {}
        self.counts: dict[str, int] = {}
        self.samples: dict[str, list[np.ndarray]] = {}
        self.absmax: dict[str, np.ndarray] = {}

    def add(self, stats: BlockStats) -> None:
        if stats.index < self.next_block or stats.index in self.waiting:
            raise ValueError(f"block {stats.index} given twice")
        self.waiting[stats.index] = stats
        while self.next_block in self.waiting:
            self._fold(self.waiting.pop(self.next_block))
            self.next_block += 1

    def _fold(self, stats: BlockStats) -> None:
        for name, count in stats.counts.items():
            self.counts[name] = self.counts.get(name, 0) + count
        for name, packed in stats.grams.items():
            self.sums.setdefault(name, self._sum_type(stats.widths[name])).add(packed, stats.counts[name])
        for name, parts in stats.samples.items():
            self.samples.setdefault(name, []).extend(parts)
        for name, m in stats.absmax.items():
            self.absmax[name] = m if name not in self.absmax else np.maximum(self.absmax[name], m)

    def layer_stats(self, blocks: int):
        """The merged :class:`quantlab.calib.layerwise.LayerStats` once blocks 0..blocks-1 are in."""
        from quantlab.calib.layerwise import LayerStats

        if self.waiting or self.next_block != blocks:
            raise ValueError(f"merged blocks up to {self.next_block} of {blocks}; waiting: {sorted(self.waiting)}")
        stats = LayerStats(counts=dict(self.counts), samples=self.samples, absmax=self.absmax)
        for name, acc in self.sums.items():
            stats.hessians[name] = acc.hessian()
        self.sums = {}
        return stats
