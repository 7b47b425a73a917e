"""The issue's bounded-cache acceptance on stories260K: 4 sinks + a 128-token window generate far past the
model's 512 training positions with a fixed cache, and the text stays as likely under the full fp32 model
as the full-cache generation's (perplexity ratio <= 2)."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.emit.artifact import genai_config, save_model, write_json
from quantlab.graph_builder.decoder import build_decoder
from quantlab.io import load_checkpoint
from quantlab.quant.metrics import log_softmax
from quantlab.runtime.generate import BoundedCache, OrtDecoder, SamplingConfig, cache_length, generate
from tests.models import model_path

MAX_PPL_RATIO = 2.0
SAMPLING = SamplingConfig(greedy=False, temperature=1.0, seed=0)


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    ckpt = load_checkpoint(model_path("stories260K.bin"))
    folder = tmp_path_factory.mktemp("stories-bounded")
    save_model(build_decoder(ckpt), folder, progress=False)
    write_json(folder / "genai_config.json", genai_config(ckpt))
    return OrtDecoder(folder, threads=2), ckpt.spec.bos_token_id or 1


def ppl(decoder, ids: list[int]) -> float:
    row = np.asarray(ids, dtype=np.int64)
    logits = decoder.forward(row[None], decoder.empty_cache())[0][0]  # (seq, vocab), full cache
    return float(np.exp(-log_softmax(logits[:-1])[np.arange(row.size - 1), row[1:]].mean()))


def check(stories, tokens: int) -> None:
    decoder, bos = stories
    lengths = []
    policy = BoundedCache(window=128, sinks=4)
    bounded = list(
        generate(
            decoder,
            [bos],
            max_new_tokens=tokens,
            sampling=SAMPLING,
            bounded=policy,
            on_step=lambda c: lengths.append(cache_length(c)),
        )
    )
    full = list(generate(decoder, [bos], max_new_tokens=tokens, sampling=SAMPLING))
    assert len(bounded) == tokens
    assert max(lengths) == 132 and all(n == 132 for n in lengths[131:])
    assert ppl(decoder, [bos, *bounded]) <= MAX_PPL_RATIO * ppl(decoder, [bos, *full])


def test_window_128_sinks_4_past_the_training_length(stories):
    check(stories, 640)


@pytest.mark.slow
def test_window_128_sinks_4_generates_2048_tokens(stories):
    check(stories, 2048)
