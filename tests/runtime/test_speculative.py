"""Speculative decoding on stories260K artifacts: greedy output is plain greedy output, the sampling rule
keeps the target's distribution, and the caches are cut back exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from quantlab import api
from quantlab.cli.main import main
from quantlab.errors import InputError
from quantlab.runtime.generate import OrtDecoder, Sampler, SamplingConfig, generate
from quantlab.runtime.speculative import (
    check_same_vocabulary,
    generate_speculative,
    sampling_probs,
    trim_cache,
    verify_greedy,
    verify_sampled,
)
from tests.models import model_path

PROMPT = [1, 403, 407, 261]  # BOS "Once upon a"
NEW_TOKENS = 256
# Pearson chi-square of 20000 draws over 5 tokens (4 degrees of freedom): P(chi2 > 40) is about 4e-8, so a
# correct rule never fails it, and a rule that returns the draft's distribution scores in the thousands
CHI2_BOUND = 40.0
DRAWS = 20000


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """stories260K as fp32 (the target), w8 (agrees almost always), w4 (disagrees now and then), and an
    int8 KV cache (per-token scales: cut back by a slice) and one with a residual window (refused)."""
    root = tmp_path_factory.mktemp("speculative")
    made = {
        "fp32": ["--recipe", "fp32"],
        "w8": ["--recipe", "w8a16-g128"],
        "w4": ["--recipe", "w4a16-g32-sym"],
        "kv-int8": ["--recipe", "fp32", "--kv", "int8"],
        "kv-residual": ["--recipe", "fp32", "--kv", "int8-r16"],
    }
    for name, flags in made.items():
        argv = ["convert", str(model_path("stories260K.bin")), "-o", str(root / name), *flags]
        assert main([*argv, "--no-eval", "--no-progress"]) == 0
    return {name: root / name for name in made}


@pytest.fixture(scope="module")
def target(artifacts):
    return OrtDecoder(artifacts["fp32"], threads=1)


@pytest.fixture(scope="module")
def plain(target):
    return list(generate(target, PROMPT, max_new_tokens=NEW_TOKENS))


@pytest.mark.parametrize("draft_name", ["fp32", "w8", "w4"])
def test_greedy_equals_plain_decoding(artifacts, target, plain, draft_name):
    draft = OrtDecoder(artifacts[draft_name], threads=1)
    result = generate_speculative(target, draft, PROMPT, max_new_tokens=NEW_TOKENS, k=4)
    assert result.ids == plain
    s = result.stats
    assert s.generated == NEW_TOKENS
    assert s.target_forwards == s.rounds + 1  # the prefill, then one verification forward a round
    assert s.draft_forwards == s.drafted + 1
    assert s.tokens_per_target_forward > 1
    if draft_name == "fp32":  # the target drafting for itself: every drafted token is its own argmax
        assert s.acceptance_rate == 1.0
    if draft_name == "w4":
        assert 0 < s.acceptance_rate < 1


@pytest.mark.parametrize("k", [1, 2, 7])
def test_any_draft_length_gives_the_same_tokens(artifacts, target, plain, k):
    draft = OrtDecoder(artifacts["w4"], threads=1)
    result = generate_speculative(target, draft, PROMPT, max_new_tokens=64, k=k)
    assert result.ids == plain[:64]
    assert result.stats.drafted <= k * result.stats.rounds


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 5, 6, 11])
def test_max_new_tokens_is_exact(artifacts, target, plain, max_new_tokens):
    draft = OrtDecoder(artifacts["w8"], threads=1)
    seen: list[int] = []
    result = generate_speculative(target, draft, PROMPT, max_new_tokens=max_new_tokens, k=4, on_tokens=seen.extend)
    assert result.ids == seen == plain[:max_new_tokens]


def test_stops_after_an_eos_id_unless_ignored(artifacts, target, plain):
    draft = OrtDecoder(artifacts["w4"], threads=1)
    stop = plain[20]  # a token of the text taken as the stop id: output ends at its first occurrence
    end = plain.index(stop) + 1
    result = generate_speculative(target, draft, PROMPT, max_new_tokens=NEW_TOKENS, k=4, eos_ids=[stop])
    assert result.ids == plain[:end]
    ignored = generate_speculative(target, draft, PROMPT, max_new_tokens=40, k=4, eos_ids=[stop], ignore_eos=True)
    assert ignored.ids == plain[:40]


def test_int8_cache_with_per_token_scales_is_cut_back(artifacts):
    target = OrtDecoder(artifacts["kv-int8"], threads=1)
    draft = OrtDecoder(artifacts["w4"], threads=1)
    expected = list(generate(target, PROMPT, max_new_tokens=64))
    result = generate_speculative(target, draft, PROMPT, max_new_tokens=64, k=4)
    assert result.ids == expected
    assert result.stats.acceptance_rate < 1  # rounds were cut back, scales included


def test_residual_window_cache_is_refused(artifacts, target):
    draft = OrtDecoder(artifacts["kv-residual"], threads=1)
    with pytest.raises(ValueError, match="_residual"):
        generate_speculative(target, draft, PROMPT, max_new_tokens=8)


def test_trim_cache_keeps_the_first_tokens(target):
    _, cache = target.forward(np.asarray([PROMPT]), target.empty_cache())
    cut = trim_cache(target, cache, 2)
    for name, t in cut.items():
        assert t.shape[2] == 2 and t.flags.c_contiguous
        np.testing.assert_array_equal(t, cache[name][:, :, :2])


def test_torch_decoders_greedy_equals_plain(artifacts):
    torch_decoder = pytest.importorskip("quantlab.runtime.torch_decoder")
    target = torch_decoder.TorchDecoder(artifacts["fp32"], threads=1)
    draft = torch_decoder.TorchDecoder(artifacts["kv-int8"], threads=1)  # the fp32 weights: float cache in torch
    expected = list(generate(target, PROMPT, max_new_tokens=48))
    result = generate_speculative(target, draft, PROMPT, max_new_tokens=48, k=3)
    assert result.ids == expected
    assert result.stats.rounds >= 48 // 4


def test_sampled_speculation_is_seeded_and_self_draft_accepts_nearly_all(artifacts, target):
    sampling = SamplingConfig(greedy=False, temperature=0.8, top_k=40, seed=3)
    a = generate_speculative(target, target, PROMPT, max_new_tokens=48, k=4, sampling=sampling)
    b = generate_speculative(target, target, PROMPT, max_new_tokens=48, k=4, sampling=sampling)
    assert a.ids == b.ids and len(a.ids) == 48
    assert a.stats.acceptance_rate > 0.9  # p == q up to rounding: min(1, p/q) is about 1
    draft = OrtDecoder(artifacts["w4"], threads=1)
    c = generate_speculative(target, draft, PROMPT, max_new_tokens=48, k=4, sampling=sampling)
    assert len(c.ids) == 48


def test_api_generate_ids_with_a_draft(artifacts, plain):
    ids = api.generate_ids(artifacts["fp32"], PROMPT, max_new_tokens=40, stop_ids=(), draft=artifacts["w4"])
    assert ids == plain[:40]


# --- the acceptance rule, on fixed distributions --------------------------------------------------------------


def _chi2(counts: np.ndarray, p: np.ndarray) -> float:
    expected = counts.sum() * p
    return float(((counts - expected) ** 2 / expected).sum())


def test_speculative_sampling_keeps_the_target_distribution():
    """Draw the k drafted tokens from q, apply the rule: the first token out follows p_0, and the second
    (after an accepted first) follows p_1, whatever q is."""
    p = np.array([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.1, 0.2, 0.25, 0.4], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = np.array([[0.1, 0.1, 0.2, 0.3, 0.3], [0.4, 0.3, 0.1, 0.1, 0.1]])  # a draft far from the target
    rng = np.random.default_rng(0)
    first, second = np.zeros(5), np.zeros(5)
    lengths = np.zeros(4)
    for _ in range(DRAWS):
        drafted = [int(rng.choice(5, p=q[i])) for i in range(2)]
        out = verify_sampled(p, q, drafted, rng)
        lengths[len(out)] += 1
        first[out[0]] += 1
        if len(out) >= 2:
            second[out[1]] += 1
    assert _chi2(first, p[0]) < CHI2_BOUND
    assert _chi2(second, p[1]) < CHI2_BOUND
    assert _chi2(first, q[0]) > 10 * CHI2_BOUND  # the test can tell the draft's distribution from the target's
    # the first drafted token is accepted with probability sum_x min(p, q)
    np.testing.assert_allclose(1 - lengths[1] / DRAWS, np.minimum(p[0], q[0]).sum(), atol=0.02)


def test_identical_distributions_accept_everything():
    p = np.full((3, 4), 0.25)
    rng = np.random.default_rng(1)
    assert all(len(verify_sampled(p, p[:2], [1, 3], rng)) == 3 for _ in range(200))


def test_verify_greedy_accepts_the_matching_prefix_and_adds_the_target_token():
    logits = np.eye(6)[[2, 4, 1, 5]]  # argmax per position: 2, 4, 1, 5
    assert verify_greedy(logits, [2, 4, 1]) == [2, 4, 1, 5]
    assert verify_greedy(logits, [2, 3, 1]) == [2, 4]
    assert verify_greedy(logits, [0, 4, 1]) == [2]
    assert verify_greedy(logits[:1], []) == [2]


def test_sampling_probs_is_what_the_sampler_draws_from():
    logits = np.array([2.0, 1.0, 0.5, 3.0, -1.0, 0.0])
    config = SamplingConfig(greedy=False, temperature=0.7, top_k=4, top_p=0.9, seed=5)
    p = sampling_probs(logits, config)
    assert p.sum() == pytest.approx(1.0)
    sampler = Sampler(config)
    drawn = np.bincount([sampler(logits) for _ in range(4000)], minlength=logits.size)
    assert set(np.flatnonzero(drawn)) == set(np.flatnonzero(p))  # the same support after top-k and top-p
    assert _chi2(drawn[p > 0], p[p > 0]) < CHI2_BOUND


# --- the pair of artifacts ---------------------------------------------------------------------------------------


def test_same_vocabulary_is_checked(artifacts, tmp_path):
    check_same_vocabulary(artifacts["fp32"], artifacts["w4"])
    other = tmp_path / "other-vocab"
    shutil.copytree(artifacts["w4"], other)
    config = json.loads((other / "genai_config.json").read_text())
    config["model"]["vocab_size"] += 1
    (other / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="vocab_size") as e:
        check_same_vocabulary(artifacts["fp32"], other)
    assert str(other) in e.value.one_line() and "\n" not in e.value.one_line()
    retok = tmp_path / "other-tokenizer"
    shutil.copytree(artifacts["w4"], retok)
    blob = bytearray((retok / "tokenizer.bin").read_bytes())
    blob[-1] ^= 1
    (retok / "tokenizer.bin").write_bytes(bytes(blob))
    with pytest.raises(InputError, match="tokenizer.bin"):
        check_same_vocabulary(artifacts["fp32"], retok)
