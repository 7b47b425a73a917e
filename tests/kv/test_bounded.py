"""Bounded caches (attention sinks + sliding window): fixed size over many steps, sinks kept, positions."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.emit.artifact import genai_config, save_model, write_json
from quantlab.graph_builder.decoder import BuildOptions, build_decoder
from quantlab.graph_builder.kv_cache import parse_kv_cache
from quantlab.runtime.generate import BoundedCache, OrtDecoder, SamplingConfig, cache_length, generate
from tests.tiny import tiny_checkpoint

CKPT = tiny_checkpoint(5)  # max_position_embeddings 256: the runs below go past it
SAMPLING = SamplingConfig(greedy=False, seed=3)


@pytest.fixture(scope="module", params=["fp32", "int4", "int2-r8"])
def decoder(request, tmp_path_factory):
    kv = parse_kv_cache(request.param)
    folder = tmp_path_factory.mktemp(f"bounded-{request.param}")
    save_model(build_decoder(CKPT, BuildOptions(kv_cache=kv)), folder, progress=False)
    write_json(folder / "genai_config.json", genai_config(CKPT, kv_cache=kv))
    return OrtDecoder(folder)


def test_cache_size_is_fixed_and_sinks_are_kept(decoder):
    policy = BoundedCache(window=16, sinks=4)
    lengths, caches = [], []

    def watch(cache):
        lengths.append(cache_length(cache))
        caches.append(cache)

    prompt = [1, 5, 9, 13, 17, 21]
    ids = list(generate(decoder, prompt, max_new_tokens=300, sampling=SAMPLING, bounded=policy, on_step=watch))
    assert len(ids) == 300  # 306 positions: past the model's 256
    assert max(lengths) == policy.capacity == lengths[-1]
    assert lengths[:15] == list(range(6, 21))  # grows by one per step until it is full
    token_tensors = [n for n in caches[0] if not n.endswith("_residual")]  # a residual window is the latest
    for name in token_tensors:  # the prompt's first 4 entries stay, bit for bit
        np.testing.assert_array_equal(caches[-1][name][:, :, :4], caches[0][name][:, :, :4])
    assert {caches[-1][n].shape[2] for n in token_tensors} == {policy.capacity}  # scales evicted with values


def test_window_longer_than_the_text_changes_nothing(decoder):
    prompt = [1, 7, 3]
    full = list(generate(decoder, prompt, max_new_tokens=40, sampling=SAMPLING))
    wide = list(generate(decoder, prompt, max_new_tokens=40, sampling=SAMPLING, bounded=BoundedCache(64, 4)))
    assert wide == full


def test_positions_keep_counting_past_the_window(decoder):
    """With original positions the step after an eviction is fed position = tokens seen so far."""
    seen = []
    real_forward = decoder.forward

    def spy(ids, cache, **kw):
        seen.append((cache_length(cache), int(kw["position_ids"][0, -1])))
        return real_forward(ids, cache, **kw)

    decoder.forward = spy
    try:
        list(generate(decoder, [1, 2], max_new_tokens=30, sampling=SAMPLING, bounded=BoundedCache(8, 2)))
    finally:
        del decoder.forward
    assert seen[-1] == (10, 30)  # cache of 10 tokens, position 30 (2 prompt + 28 generated before it)
    cache_mode = []
    decoder.forward = lambda ids, cache, **kw: cache_mode.append(kw["position_ids"]) or real_forward(ids, cache, **kw)
    try:
        list(generate(decoder, [1, 2], max_new_tokens=30, sampling=SAMPLING, bounded=BoundedCache(8, 2, "cache")))
    finally:
        del decoder.forward
    assert all(p is None for p in cache_mode)  # positions follow the cache length


def test_bad_policies():
    with pytest.raises(ValueError):
        BoundedCache(window=0)
    with pytest.raises(ValueError):
        BoundedCache(window=8, sinks=-1)
    with pytest.raises(ValueError):
        BoundedCache(window=8, positions="rerotate")


def test_window_shorter_than_the_residual_is_refused(decoder):
    """A window of 4 cannot hold an 8-token full-precision residual; formats without one accept it."""
    run = lambda: list(  # noqa: E731
        generate(decoder, list(range(1, 12)), max_new_tokens=2, bounded=BoundedCache(window=4, sinks=1))
    )
    if any(n.endswith("_residual") for n in decoder.cache_names):
        with pytest.raises(ValueError, match="residual"):
            run()
    else:
        assert len(run()) == 2
