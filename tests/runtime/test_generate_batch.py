"""Batched generation: left padding with per-sequence masks and positions gives each prompt what it gets alone."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.emit.artifact import genai_config, save_model, write_json
from quantlab.graph_builder.decoder import BuildOptions, build_decoder
from quantlab.graph_builder.kv_cache import parse_kv_cache
from quantlab.runtime.generate import GREEDY, OrtDecoder, SamplingConfig, generate, generate_batch, left_pad
from tests.tiny import tiny_checkpoint

# prompts of different lengths (1 to 9 tokens), so most rows of the batch start with padding
PROMPTS = [[5, 17, 3], [9], [40, 41, 42, 43, 44, 45, 46, 47, 48], [7, 7], [90, 1, 60, 2, 33]]
# logits of one sequence in a padded batch against the same sequence alone: summation order only
LOGITS_ATOL = 1e-4


def _artifact(folder, **options) -> OrtDecoder:
    ckpt = tiny_checkpoint(seed=3)
    folder.mkdir(parents=True)
    save_model(build_decoder(ckpt, BuildOptions(**options)), folder, progress=False)
    write_json(folder / "genai_config.json", genai_config(ckpt))
    return OrtDecoder(folder, threads=1)


@pytest.fixture(scope="module", params=["plain", "fused", "plain-kv-int8"])
def decoder(request, tmp_path_factory) -> OrtDecoder:
    folder = tmp_path_factory.mktemp("batch") / request.param
    if request.param == "plain-kv-int8":  # scale tensors beside the cache: cut with it when a row stops
        return _artifact(folder, kv_cache=parse_kv_cache("int8"))
    return _artifact(folder, attention=request.param)


def _alone(decoder, prompts, sampling=GREEDY, stop_ids=(), max_new_tokens=12):
    return [
        list(generate(decoder, p, max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stop_ids)) for p in prompts
    ]


def test_left_pad_masks_and_counts_positions_per_sequence():
    ids, mask, positions = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError):
        left_pad([[1], []])


def test_batched_greedy_equals_each_prompt_alone(decoder):
    assert generate_batch(decoder, PROMPTS, max_new_tokens=12) == _alone(decoder, PROMPTS)


def test_batched_logits_match_alone(decoder):
    """The padded rows see nothing of the padding: first-step logits per sequence, batch against alone."""
    ids, mask, positions = left_pad(PROMPTS)
    batched, _ = decoder.forward(ids, decoder.empty_cache(len(PROMPTS)), attention_mask=mask, position_ids=positions)
    for row, prompt in enumerate(PROMPTS):
        alone, _ = decoder.forward(np.asarray([prompt]), decoder.empty_cache())
        np.testing.assert_allclose(batched[row, -1], alone[0, -1], atol=LOGITS_ATOL)


def test_a_stopped_sequence_leaves_the_batch(decoder):
    """Stop at a token one sequence meets early: the rest carry on with a smaller batch and a cut cache."""
    alone = _alone(decoder, PROMPTS)
    stop = alone[2][3]  # the fourth token of the longest prompt's continuation
    expected = _alone(decoder, PROMPTS, stop_ids=[stop])
    assert any(len(ids) < 12 for ids in expected) and any(len(ids) == 12 for ids in expected)
    assert generate_batch(decoder, PROMPTS, max_new_tokens=12, stop_ids=[stop]) == expected


def test_batched_sampling_uses_one_seeded_sampler_per_sequence(decoder):
    sampling = SamplingConfig(greedy=False, temperature=0.9, top_p=0.9, seed=4)
    assert generate_batch(decoder, PROMPTS, max_new_tokens=8, sampling=sampling) == _alone(
        decoder, PROMPTS, sampling, max_new_tokens=8
    )


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["plain", "fused"])
def test_smollm2_w4_batched_greedy_equals_alone(tmp_path, attention):
    """The real model, quantized: 4 chat prompts of different lengths, 24 greedy tokens each.

    The linears compute in fp32 (accuracy_level 0) and the head stays float: with int8 activations
    (level 4) onnxruntime's MatMulNBits rounds a row differently by its place in the kernel's row tile,
    so the same token padded by 1-3 (mod 4) gets logits up to ~1.6 apart at prefill, and greedy tokens
    part at the first near-tie; that is the kernel's arithmetic, not batching, which this test is about."""
    from quantlab.cli.main import main
    from quantlab.runtime.tokenizer import load_tokenizer
    from tests.models import model_path

    out = tmp_path / "w4"
    recipe = tmp_path / "w4-fp32-compute.toml"
    recipe.write_text('scheme = "w4a16-g32-asym"\naccuracy_level = 0\nlm_head = "none"\n')
    argv = ["convert", str(model_path("SmolLM2-135M-Instruct.Q4_1.gguf")), "-o", str(out)]
    assert main([*argv, "--recipe", str(recipe), "--attention", attention, "--no-eval", "--no-progress"]) == 0
    tok = load_tokenizer(out)
    texts = ["What is the capital of France?", "Hi", "Write a haiku about the sea and the wind at night.", "2+2="]
    prompts = [tok.encode_chat(t) for t in texts]
    decoder = OrtDecoder(out, threads=2)
    stop = sorted(tok.eos_token_ids)
    batched = generate_batch(decoder, prompts, max_new_tokens=24, stop_ids=stop)
    assert batched == _alone(decoder, prompts, stop_ids=stop, max_new_tokens=24)


def _candidates_by_full_sort(logits: np.ndarray, config: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """What the sampler draws from, by the definition: sort everything, take top-k, then the top-p prefix."""
    z = logits.astype(np.float64) / config.temperature
    order = np.argsort(-z, kind="stable")
    order = order[: config.top_k] if config.top_k else order
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if config.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), config.top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return order, p


@pytest.mark.parametrize("vocab", [40, 5000, 49152])
def test_candidates_are_the_full_sorts_tokens(vocab):
    # candidates() sorts only the likeliest tokens (a partition finds them) and falls back to the full
    # sort where the answer could reach past them: the same ids in the same order whatever the logits
    # (flat or peaked, with ties, top-k below and above the sorted head), probabilities to rounding.
    from quantlab.runtime.generate import candidates

    rng = np.random.default_rng(vocab)
    fallbacks = 0
    for trial in range(150):
        logits = (rng.standard_normal(vocab) * rng.choice([0.3, 3.0, 12.0])).astype(np.float32)
        if trial % 3 == 0:
            logits = np.round(logits)  # many ties, at the edge of the sorted head too
        config = SamplingConfig(
            greedy=False,
            temperature=float(rng.choice([0.5, 1.0, 1.7])),
            top_k=int(rng.choice([0, 0, 7, 1024, 3000])),
            top_p=float(rng.choice([1.0, 0.5, 0.95, 0.9999])),
        )
        ids, p = candidates(logits, config)
        want_ids, want_p = _candidates_by_full_sort(logits, config)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(p, want_p, rtol=1e-12, atol=1e-15)
        fallbacks += len(ids) > 1024
    if vocab == 49152:
        assert fallbacks > 0  # flat logits at top-p 0.9999: the prefix reaches past the head
