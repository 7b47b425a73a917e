"""One shard of a distributed calibration: a fixed, contiguous run of canonical blocks and its hidden states.

    shard = CalibrationShard(source, recipe, tokens[rows], layout, first_block, stop_block)
    shard.observe(i, committed)   # -> [BlockStats of its blocks, in block order]

``observe(i, committed)`` is idempotent: ``committed[j]`` (an object reference) holds layer j's decided
integers for every j < i, and the shard brings its hidden states to the input of layer i first, by
running layers through their quantized graphs as the artifact computes them. A shard just restarted
(its process was killed) starts from the embeddings and replays the committed layers, so a retried call
returns the same bytes. The class is plain Python; quantlab.distributed.calibrate makes it a Ray actor.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from quantlab.calib.blocks import BlockLayout, BlockStats, observe_blocks
from quantlab.calib.layerwise import (
    CalibrationResult,
    LayerRunner,
    embed_tokens,
    release_freed_memory,
    with_layer_cache,
    with_overrides,
)
from quantlab.recipe import Recipe

logger = logging.getLogger(__name__)


def observation_settings(recipe: Recipe, i: int) -> dict:
    """observe_blocks's keyword arguments for layer i, as quantlab.calib.calibrate observes it."""
    from quantlab.calib.calibrate import AWQ_SAMPLE_TOKENS, ERROR_SAMPLE_TOKENS

    method = recipe.method
    return dict(
        hessians=method == "gptq",
        samples=AWQ_SAMPLE_TOKENS if method == "awq" else ERROR_SAMPLE_TOKENS,
        absmax=method == "smoothquant",
        seed=recipe.calibration.seed + i,
    )


def layer_entries(result: CalibrationResult, i: int) -> dict:
    """Layer i's decisions in ``result``: what a shard needs to run the layer quantized."""
    prefix = f"model.layers.{i}."
    return {
        "quantized": {n: result.quantized[n] for n in result.quantized if n.startswith(prefix)},
        "int8": {n: v for n, v in result.int8.items() if n.startswith(prefix)},
        "float_overrides": {n: v for n, v in result.float_overrides.items() if n.startswith(prefix)},
    }


class CalibrationShard:
    def __init__(
        self,
        source: dict,
        recipe: Recipe,
        tokens: np.ndarray,
        layout: BlockLayout,
        first_block: int,
        threads: int | None = None,
    ):
        """source: load_checkpoint's arguments (the checkpoint must be at that path on every node);
        tokens (n, seq): the sequences of this shard's blocks, from ``first_block`` on."""
        from quantlab.io import load_checkpoint

        self.ckpt = load_checkpoint(source["path"], allow_pickle=source.get("allow_pickle", False))
        self.recipe, self.tokens, self.layout = recipe, tokens, layout
        self.first_block, self.threads = first_block, threads
        self.hidden: np.ndarray | None = None
        self.position = 0  # layers the hidden states have been through
        self.result = CalibrationResult()

    def pid(self) -> int:
        return os.getpid()

    def observe(self, i: int, committed: list) -> list[BlockStats]:
        """Layer i's statistics over this shard's blocks; ``committed``: references to layers 0..i-1's
        decisions (quantlab.distributed.shard.layer_entries)."""
        import ray

        if len(committed) != i:
            raise ValueError(f"layer {i} needs the decisions of {i} layers, got {len(committed)}")
        if self.hidden is None or self.position > i:  # a new (or restarted) shard: from the embeddings
            self.hidden, self.position = embed_tokens(self.ckpt, self.tokens), 0
            self.result = CalibrationResult()
        while self.position < i:
            j = self.position
            self._advance(j, ray.get(committed[j]))
            self.position = j + 1
        fp = with_layer_cache(with_overrides(self.ckpt, self.result.float_overrides), i)
        runner = LayerRunner(fp, i, self.threads, outputs="taps")
        blocks = list(
            observe_blocks(
                runner, self.hidden, self.layout, first_block=self.first_block, **observation_settings(self.recipe, i)
            )
        )
        del runner, fp
        release_freed_memory()
        return blocks

    def solve_gptq(self, names: list[str], hessian: np.ndarray, config):
        """GPTQ for linears ``names`` (stacked rows) with their shared input's Hessian: a driver's
        fan-out of one layer's solves while the shards wait at the layer barrier."""
        from quantlab.quant import linalg
        from quantlab.quant.gptq import gptq_quantize

        fp = with_overrides(self.ckpt, self.result.float_overrides)
        weights = [fp.tensors.load(name + ".weight") for name in names]
        # the object store's copy is read-only: GPTQ works in a private one
        qw = gptq_quantize(weights, np.array(hessian), config, consume=True)
        del weights
        linalg.release()
        release_freed_memory()
        return qw

    def _advance(self, j: int, entries: dict) -> None:
        """Run the hidden states through layer j with its decided integers, in the runs a single
        process makes (the same shapes: the same bytes)."""
        from quantlab.calib.calibrate import _quantized_layer

        for name, qw in entries["quantized"].items():
            self.result.quantized[name] = qw
        self.result.int8.update(entries["int8"])
        self.result.float_overrides.update(entries["float_overrides"])
        runner = _quantized_layer(self.ckpt, j, self.recipe, self.result, self.threads)
        start, _ = self.layout.block_rows(self.first_block)
        for run_start in range(0, self.hidden.shape[0], self.layout.batch):
            # runs start where the calibration's do: the shard's first row is a run's first row
            assert (start + run_start) % self.layout.batch == 0
            sl = slice(run_start, run_start + self.layout.batch)
            self.hidden[sl], _ = runner.run(self.hidden[sl])
        del runner
        for name in entries["quantized"]:  # layer j's integers are not needed again unless replaying
            del self.result.quantized[name]
        release_freed_memory()
