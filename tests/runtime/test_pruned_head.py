"""A draft's head pruned to the frequent tokens (convert --head-vocab, passes/prune_head_vocab.py), on
stories260K: the kept tokens' logits are the full head's bit for bit in onnxruntime and in the native
runtime, every other token's is -inf, and speculative decoding with such a draft still gives the
target's tokens (greedy) and the target's distribution (sampling)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantlab.cli.main import main
from quantlab.runtime.generate import OrtDecoder, generate
from quantlab.runtime.speculative import generate_speculative, verify_sampled
from quantlab.runtime.tokenizer import load_tokenizer
from tests.models import model_path

PROMPT = [1, 403, 407, 261]  # BOS "Once upon a"
KEPT = 96
TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. One day, "
    "she saw a big dog in the park. The dog was friendly and wanted to play. Lily and the dog ran and "
    "laughed all day. When the sun went down, Lily went home happy. Her mom gave her a hug and a warm cup "
    "of milk. Tom had a red ball. He liked to throw it high in the sky. "
) * 3


def _convert(out, *flags, recipe="w4a16-g32-asym"):
    argv = ["convert", str(model_path("stories260K.bin")), "-o", str(out), "--recipe", recipe]
    return main([*argv, *flags, "--no-eval", "--no-progress"])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("pruned-head")
    text = root / "text.txt"
    text.write_text(TEXT)
    assert _convert(root / "full") == 0
    assert _convert(root / "fp32", recipe="fp32") == 0  # the target: a float graph rounds k+1 tokens as it does 1
    assert _convert(root / "pruned", "--head-vocab", str(KEPT), "--head-vocab-data", str(text)) == 0
    return root


def test_kept_logits_are_the_full_heads_and_the_rest_minus_infinity(artifacts):
    ids = np.asarray([PROMPT + [378, 260, 1151]])
    full, pruned = OrtDecoder(artifacts / "full", threads=1), OrtDecoder(artifacts / "pruned", threads=1)
    a, _ = full.forward(ids, full.empty_cache())
    b, _ = pruned.forward(ids, pruned.empty_cache())
    kept = np.isfinite(b[0, 0])
    assert kept.sum() == KEPT and b.shape == a.shape
    assert np.all(kept == np.isfinite(b).all(axis=(0, 1)))  # the same tokens at every position
    assert np.array_equal(a[..., kept], b[..., kept])
    assert np.all(np.isneginf(b[..., ~kept]))
    manifest = json.loads((artifacts / "pruned" / "manifest.json").read_text())
    described = manifest["head_vocab"]
    assert described["kept"] == KEPT and described["vocab"] == 512
    assert 0.9 < described["coverage"] <= 1.0
    assert "quality" not in manifest  # not a model of the whole vocabulary: no KL against fp32
    # the special tokens stay proposable: BOS 1 and EOS 2 of the llama2.c tokenizer
    assert kept[1] and kept[2]
    # the text uses fewer than KEPT tokens: all of them are kept, then the lowest ids it does not use
    counts = np.bincount(load_tokenizer(artifacts / "full").encode(TEXT), minlength=512)
    assert 0 < (counts > 0).sum() < KEPT - 2 and kept[counts > 0].all()
    unused = np.flatnonzero(counts == 0)
    assert kept[unused].sum() == KEPT - (counts > 0).sum() and not kept[unused[KEPT:]].any()


def test_native_runtime_applies_the_same_map(artifacts):
    torch_decoder = pytest.importorskip("quantlab.runtime.torch_decoder")
    ids = np.asarray([PROMPT + [378, 260]])
    full = torch_decoder.TorchDecoder(artifacts / "full", threads=1)
    pruned = torch_decoder.TorchDecoder(artifacts / "pruned", threads=1)
    a, _ = full.forward(ids, full.empty_cache())
    b, _ = pruned.forward(ids, pruned.empty_cache())
    kept = np.isfinite(b[0, 0])
    assert kept.sum() == KEPT
    assert np.array_equal(a[..., kept], b[..., kept])
    assert np.all(np.isneginf(b[..., ~kept]))
    ort, _ = OrtDecoder(artifacts / "pruned", threads=1).forward(ids, OrtDecoder(artifacts / "pruned").empty_cache())
    assert np.array_equal(np.isfinite(ort), np.isfinite(b))


def test_greedy_speculation_with_a_pruned_draft_is_plain_decoding(artifacts):
    target = OrtDecoder(artifacts / "fp32", threads=1)
    draft = OrtDecoder(artifacts / "pruned", threads=1)
    expected = list(generate(target, PROMPT, max_new_tokens=96))
    result = generate_speculative(target, draft, PROMPT, max_new_tokens=96, k=4)
    assert result.ids == expected
    assert 0 < result.stats.acceptance_rate < 1  # it agrees where the target's token is one it kept


def test_sampling_rule_keeps_the_target_distribution_when_the_draft_cannot_propose_a_token():
    """q is 0 on tokens 3 and 4 (pruned away): they still come out with the target's probability."""
    p = np.array([[0.3, 0.2, 0.1, 0.25, 0.15], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = np.array([[0.5, 0.3, 0.2, 0.0, 0.0]])
    rng = np.random.default_rng(0)
    first = np.zeros(5)
    for _ in range(20000):
        drafted = [int(rng.choice(5, p=q[0]))]
        first[verify_sampled(p, q, drafted, rng)[0]] += 1
    expected = 20000 * p[0]
    assert float(((first - expected) ** 2 / expected).sum()) < 40.0  # chi-square, 4 degrees of freedom


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--head-vocab", "64"], "--head-vocab-data"),
        (["--head-vocab", "512", "--head-vocab-data", "TEXT"], "vocabulary size"),
        (["--head-vocab", "64", "--head-vocab-data", "TEXT", "--max-kld", "0.1"], "no quality budget"),
        (["--head-vocab", "64", "--head-vocab-data", "missing.txt"], "not found"),
    ],
)
def test_bad_head_vocab_options_fail_with_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    flags = [str(text) if f == "TEXT" else str(tmp_path / f) if f == "missing.txt" else f for f in flags]
    out = tmp_path / "out"
    assert _convert(out, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


@pytest.mark.parametrize("recipe", ["fp32", "w8a16-g128"])
def test_float_and_8_bit_heads_are_pruned_the_same_way(tmp_path, recipe):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert _convert(tmp_path / "full", recipe=recipe) == 0
    assert _convert(tmp_path / "pruned", "--head-vocab", "200", "--head-vocab-data", str(text), recipe=recipe) == 0
    ids = np.asarray([PROMPT + [378, 260]])
    full, pruned = OrtDecoder(tmp_path / "full", threads=1), OrtDecoder(tmp_path / "pruned", threads=1)
    a, _ = full.forward(ids, full.empty_cache())
    b, _ = pruned.forward(ids, pruned.empty_cache())
    kept = np.isfinite(b[0, 0])
    assert kept.sum() == 200
    np.testing.assert_allclose(b[..., kept], a[..., kept], rtol=0, atol=1e-5)  # a MatMul of fewer columns
    assert np.all(np.isneginf(b[..., ~kept]))
