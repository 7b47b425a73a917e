"""Canonical blocks without Ray: a layer's statistics are the same bytes however the blocks are shared out."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.calib.blocks import StatsMerger, block_layout, observe_blocks
from quantlab.calib.layerwise import LayerRunner, embed_tokens
from quantlab.quant import gram
from tests.tiny import tiny_checkpoint

# float32 blocks summed in float64 against a float64 product: the float32 GEMM's own rounding
HESSIAN_RTOL = 1e-5


def test_layout_cuts_runs_into_at_most_eight_blocks_and_shards_into_contiguous_runs():
    layout = block_layout(sequences=128, batch=2)  # the 1B default: 64 runs
    assert (layout.batches, layout.per_block, layout.blocks) == (64, 8, 8)
    assert layout.shard_blocks(3) == [(0, 3), (3, 6), (6, 8)]
    small = block_layout(sequences=5, batch=2)
    assert (small.blocks, small.block_rows(2)) == (3, (4, 5))
    with pytest.raises(ValueError):
        small.shard_blocks(4)


@pytest.mark.parametrize("k", [64, gram.BLOCK + 77])
def test_ordered_gram_sum_is_the_hessian(k):
    rng = np.random.default_rng(k)
    xs = [rng.standard_normal((n, k)).astype(np.float32) for n in (33, 100, 7)]
    acc = gram.OrderedGramSum(k)
    for x in xs:
        g = gram.UpperGram(k)
        g.add(x)
        acc.add(gram.packed_upper(g), x.shape[0])
    h = acc.hessian()
    x64 = np.concatenate(xs).astype(np.float64)
    np.testing.assert_allclose(h, 2 * x64.T @ x64 / x64.shape[0], rtol=HESSIAN_RTOL, atol=HESSIAN_RTOL)
    assert np.array_equal(h, h.T)


def _layer_stats(parts, layout, order):
    merger = StatsMerger()
    for n in order:
        merger.add(parts[n])
    return merger.layer_stats(layout.blocks)


def test_sharded_observation_gives_the_same_bytes_in_any_arrival_order():
    ckpt = tiny_checkpoint(layers=1)
    tokens = np.random.default_rng(1).integers(3, 96, (10, 16))
    hidden = embed_tokens(ckpt, tokens)
    layout = block_layout(tokens.shape[0], batch=2)  # 5 runs, 5 blocks
    runner = LayerRunner(ckpt, 0, outputs="taps")
    settings = dict(hessians=True, samples=64, absmax=True, seed=3)
    whole = list(observe_blocks(runner, hidden, layout, **settings))
    shards = []
    for first, stop in layout.shard_blocks(2):
        rows = slice(layout.block_rows(first)[0], layout.block_rows(stop - 1)[1])
        shards += observe_blocks(runner, hidden[rows].copy(), layout, first_block=first, **settings)
    one = _layer_stats(whole, layout, range(layout.blocks))
    two = _layer_stats(shards, layout, [4, 2, 0, 3, 1])
    assert one.hessians.keys() == two.hessians.keys() and one.hessians
    for name in one.hessians:
        assert one.hessians[name].tobytes() == two.hessians[name].tobytes()
        assert one.sample(name).tobytes() == two.sample(name).tobytes()
        assert one.absmax[name].tobytes() == two.absmax[name].tobytes()
        assert one.counts[name] == two.counts[name] == tokens.size
