"""The torch backend's native decoder layers (csrc/decoder_layer.cpp) against onnxruntime.

One ``ql_decoder_layer`` call per layer replaces the torch ops and per-linear kernel calls; the oracle
is onnxruntime on the same artifact. The cache is a preallocated buffer behind views: rewinding to an
old dict, trimming and batch rows leaving must all still give onnxruntime's answers. The int8 cache
(``kv_cache="int8"``) is held to the fp32 cache's logits within its rounding, to the reference quantization
(quantlab.graph_builder.kv_cache.quantize) for its codes, and to the same cache handling.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from quantlab import kernels  # noqa: E402
from quantlab.cli.main import main  # noqa: E402
from quantlab.graph_builder.kv_cache import KvCacheFormat, quantize  # noqa: E402
from quantlab.runtime.generate import OrtDecoder, generate_batch, left_pad  # noqa: E402
from quantlab.runtime.torch_decoder import TorchDecoder  # noqa: E402
from tests.models import model_path  # noqa: E402

pytestmark = pytest.mark.skipif(kernels.backend() == "numpy", reason="the C++ kernels are not built")

# Same weights, same int8 activation blocks at accuracy level 4; only summation order differs.
LOGITS_ATOL = 1e-3
# The torch-ops path against the native layers: two implementations whose attention sums in another order
# (torch's SDPA kernel, chosen by torch per ISA, against csrc/decoder_attention.cpp). With int8 activations
# a 1e-7 difference can move one code across a rounding boundary and a logit by ~0.2 (on an AVX2 Zen,
# layer 1's SDPA output moved by 5e-7 and the prompt's logits by 0.27 from position 2), so they are
# compared on float activations, where the logits move with the sums: w4 weights, accuracy level 0.
FLOAT_ACTIVATIONS = "w4a16-g32-asym-level0"
PROMPT = [1, 403, 407, 261, 378, 432, 383]
QUANTIZED = ("w4a16-g32-asym", "w4a16-g32-sym", "w8a16-g32")
# int8 cache vs fp32 cache, mean KL divergence (nats) of the next-token distributions over a 64-token greedy
# run. int8 rounding moves each cached value by at most max|row| / 254; measured: 0.0024 (stories260K w4),
# 0.0007 (SmolLM2 w4). Reading the cache with one mean scale per tensor instead of one per row gives 0.25 and
# 3.3 (checked below), a cache without its scales ~10.
INT8_CACHE_MEAN_KLD = 0.01
# SmolLM2's greedy prompt (see test_smollm2_greedy_matches_onnxruntime): every step wins by >= 2 logits.
SMOL_PROMPT = [33, 28, 216, 34, 28, 216, 35, 28, 216, 36, 28, 216, 37, 28]


def _convert(source, out, recipe=None):
    argv = ["convert", str(source), "-o", str(out), "--no-progress", "--no-eval"]
    assert main(argv + (["--recipe", recipe] if recipe else [])) == 0
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("native-layer")
    stories = model_path("stories260K.bin")
    out = {recipe: _convert(stories, root / recipe, recipe) for recipe in (*QUANTIZED, "fp32")}
    # float activations (accuracy level 0): logits continuous in the summation order (see FLOAT_ACTIVATIONS)
    recipe = root / "float-activations.toml"
    recipe.write_text('scheme = "w4a16-g32-asym"\naccuracy_level = 0\n')
    out[FLOAT_ACTIVATIONS] = _convert(stories, root / FLOAT_ACTIVATIONS, str(recipe))
    return out


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    root = tmp_path_factory.mktemp("native-smollm2")
    return _convert(model_path("SmolLM2-135M-Instruct.Q4_1.gguf"), root / "w4", "w4a16-g128-asym")


def _greedy(decoder, prompt, steps):
    logits, cache = decoder.forward(np.array([prompt]), decoder.empty_cache())
    out = []
    for _ in range(steps):
        out.append(int(np.argmax(logits[0, -1])))
        logits, cache = decoder.forward(np.array([[out[-1]]]), cache)
    return out


@pytest.mark.parametrize("recipe", QUANTIZED)
def test_native_layers_match_onnxruntime(artifacts, recipe):
    ort_dec, torch_dec = OrtDecoder(artifacts[recipe]), TorchDecoder(artifacts[recipe], threads=2)
    assert torch_dec.native, torch_dec.native_reason
    a, ca = ort_dec.forward(np.array([PROMPT]), ort_dec.empty_cache())
    b, cb = torch_dec.forward(np.array([PROMPT]), torch_dec.empty_cache())
    np.testing.assert_allclose(b, a, atol=LOGITS_ATOL, rtol=0)
    for token in (5, 77, 300, 2, 17):
        a, ca = ort_dec.forward(np.array([[token]]), ca)
        b, cb = torch_dec.forward(np.array([[token]]), cb)
        np.testing.assert_allclose(b, a, atol=LOGITS_ATOL, rtol=0)
    assert _greedy(torch_dec, PROMPT, 24) == _greedy(ort_dec, PROMPT, 24)


def test_plain_graph_projections_run_as_one_call(artifacts, tmp_path, monkeypatch):
    """The plain graph's separate q/k/v and gate/up MatMulNBits are placed as one linear each (concatenated
    along N, each projection a view of it) and run as one call: the logits are those of the separate calls bit
    for bit, and onnxruntime's on the same artifact."""
    plain = tmp_path / "plain"
    argv = ["convert", str(model_path("stories260K.bin")), "-o", str(plain), "--no-progress", "--no-eval"]
    assert main([*argv, "--recipe", "w4a16-g32-asym", "--attention", "plain"]) == 0
    fused = TorchDecoder(plain, threads=2)
    assert fused.native, fused.native_reason
    layers = fused.spec.num_layers
    assert len(fused.fused) == 2 * layers  # q/k/v and gate/up of every layer
    q, k, v = (fused.linears[f"model.layers.0.self_attn.{n}_proj"] for n in "qkv")
    qkv_b = fused.fused[tuple(f"model.layers.0.self_attn.{n}_proj" for n in "qkv")]["B"]
    assert q.B.data_ptr() == qkv_b.data_ptr() and v.B.data_ptr() + v.B.nbytes == qkv_b.data_ptr() + qkv_b.nbytes
    import quantlab.runtime.torch_decoder as torch_decoder

    monkeypatch.setattr(torch_decoder, "fusable_groups", lambda linears, num_layers: [])
    separate = TorchDecoder(plain, threads=2)
    assert separate.fused == {}
    ort_dec = OrtDecoder(plain)
    a, ca = fused.forward(np.array([PROMPT]), fused.empty_cache())
    b, cb = separate.forward(np.array([PROMPT]), separate.empty_cache())
    c, cc = ort_dec.forward(np.array([PROMPT]), ort_dec.empty_cache())
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, atol=LOGITS_ATOL, rtol=0)
    for token in (5, 77, 300):
        a, ca = fused.forward(np.array([[token]]), ca)
        b, cb = separate.forward(np.array([[token]]), cb)
        np.testing.assert_array_equal(a, b)


def test_native_layers_match_the_torch_ops(artifacts):
    native = TorchDecoder(artifacts[FLOAT_ACTIVATIONS])
    ops = TorchDecoder(artifacts[FLOAT_ACTIVATIONS], native=False)
    assert native.native and not ops.native
    a, ca = ops.forward(np.array([PROMPT]), ops.empty_cache())
    b, cb = native.forward(np.array([PROMPT]), native.empty_cache())
    np.testing.assert_allclose(b, a, atol=LOGITS_ATOL, rtol=0)
    for token in (5, 77, 300):
        a, ca = ops.forward(np.array([[token]]), ca)
        b, cb = native.forward(np.array([[token]]), cb)
        np.testing.assert_allclose(b, a, atol=LOGITS_ATOL, rtol=0)


def test_native_layers_batch_left_padding(artifacts):
    ort_dec, torch_dec = OrtDecoder(artifacts["w4a16-g32-asym"]), TorchDecoder(artifacts["w4a16-g32-asym"])
    prompts = [PROMPT, [1, 99], [1, 300, 301, 302]]
    ids, mask, positions = left_pad(prompts)  # (batch, longest) each
    a, ca = ort_dec.forward(ids, ort_dec.empty_cache(len(prompts)), attention_mask=mask, position_ids=positions)
    b, cb = torch_dec.forward(ids, torch_dec.empty_cache(len(prompts)), attention_mask=mask, position_ids=positions)
    real = mask.astype(bool)  # padding rows attend to nothing: their logits are nobody's business
    np.testing.assert_allclose(b[real], a[real], atol=LOGITS_ATOL, rtol=0)
    assert np.isfinite(b).all()
    for step in range(3):
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        token = np.array([[5 + step], [77], [300 + step]])
        a, ca = ort_dec.forward(token, ca, attention_mask=mask, position_ids=positions)
        b, cb = torch_dec.forward(token, cb, attention_mask=mask, position_ids=positions)
        np.testing.assert_allclose(b, a, atol=LOGITS_ATOL, rtol=0)
    # generate_batch drops finished rows by copying the cache's rows: that takes the copying path
    stop = _greedy(ort_dec, [1, 99], 3)[2]
    expected = generate_batch(ort_dec, prompts, max_new_tokens=12, stop_ids=[stop])
    assert generate_batch(torch_dec, prompts, max_new_tokens=12, stop_ids=[stop]) == expected


@pytest.mark.parametrize("kv_cache", ["f32", "int8"])
def test_cache_views_rewind_trim_and_no_reallocation(artifacts, kv_cache):
    dec = TorchDecoder(artifacts["w8a16-g32"], kv_cache=kv_cache)
    _, cache = dec.forward(np.array([PROMPT]), dec.empty_cache())
    allocated = dec.cache_allocations
    assert allocated == len(cache) == (2 if kv_cache == "f32" else 4) * dec.num_layers
    marked = cache
    for token in (5, 77, 300, 2, 9, 10, 11, 12):  # in place: no buffer per step
        _, cache = dec.forward(np.array([[token]]), cache)
    assert dec.cache_allocations == allocated
    key = dec.past_key_names[0]
    assert cache[key].shape[2] == len(PROMPT) + 8
    assert cache[key].untyped_storage().data_ptr() == marked[key].untyped_storage().data_ptr()

    fresh = TorchDecoder(artifacts["w8a16-g32"], kv_cache=kv_cache)
    expected, _ = fresh.forward(np.array([PROMPT + [42, 43]]), fresh.empty_cache())
    rewound, c = dec.forward(np.array([[42]]), marked)  # rewind: the old dict overwrites position 7 on
    rewound, _ = dec.forward(np.array([[43]]), c)
    np.testing.assert_allclose(rewound[0, -1], expected[0, -1], atol=LOGITS_ATOL, rtol=0)
    trimmed, _ = dec.forward(np.array([[43]]), dec.trim_cache(c, len(PROMPT) + 1))
    np.testing.assert_allclose(trimmed[0, -1], expected[0, -1], atol=LOGITS_ATOL, rtol=0)
    assert dec.cache_allocations == allocated

    copied = {name: t.clone() for name, t in cache.items()}  # not a view of a buffer with room: copied once
    dec.forward(np.array([[1]]), copied)
    assert dec.cache_allocations == 2 * allocated


def test_buffer_growth_keeps_the_history(artifacts):
    # Exact: a cache that had to grow against one that always had room. (Against another implementation
    # 400 random tokens are no test at 1e-3: on this 64-wide model a 1e-6 change of an activation can
    # move an int8 code across a rounding boundary and a logit by ~0.2, in ~2% of tokens.)
    dec = TorchDecoder(artifacts["w4a16-g32-sym"])
    prompt = np.array([[1, *np.random.default_rng(0).integers(2, 500, 199)]])
    _, grown = dec.forward(prompt, dec.empty_cache())  # capacity 400: 210 steps grow it once
    roomy = {}
    for name, t in grown.items():
        buf = torch.zeros(t.shape[0], t.shape[1], 1024, t.shape[3])  # (batch, kv_heads, capacity, head_dim)
        buf[:, :, :200] = t
        roomy[name] = buf[:, :, :200]
    first = dec.cache_allocations
    for step in range(210):
        token = np.array([[3 + step]])
        logits, grown = dec.forward(token, grown)
        expected, roomy = dec.forward(token, roomy)
        np.testing.assert_array_equal(logits, expected)
    assert dec.cache_allocations == 2 * first  # one growth per cache tensor, none for the roomy one
    assert grown[dec.past_key_names[0]].shape[2] == 410


def test_float_artifacts_keep_the_torch_path(artifacts):
    dec = TorchDecoder(artifacts["fp32"])
    assert not dec.native
    assert "MatMul" in dec.native_reason


@pytest.mark.parametrize("recipe", ["w4a16-g32-asym", "w8a16-g32"])
def test_decoder_head_is_the_norm_then_the_head(artifacts, recipe):
    # kernels.DecoderHead (ql_decoder_head): rmsnorm in float32 with the sum of squares in double, as the
    # layers' norms, then the MatMulNBits head; the same bytes as that norm written out in numpy followed by
    # kernels.matmul_nbits. The decoder's forward ends with it on the native path.
    dec = TorchDecoder(artifacts[recipe])
    assert dec._head is not None
    s, head = dec.spec, dec.linears["lm_head"]
    x = np.random.default_rng(3).standard_normal((2, 3, s.hidden_size)).astype(np.float32)
    w = dec.vectors["model.norm.weight"].numpy()
    ss = (x.astype(np.float64) ** 2).sum(-1, keepdims=True) / s.hidden_size
    normed = (x * (np.float32(1) / np.sqrt(ss.astype(np.float32) + np.float32(s.rms_norm_eps)))) * w
    expected = head(torch.from_numpy(normed.astype(np.float32)))
    got = dec._head(torch.from_numpy(x))
    assert got.shape == (2, 3, head.N)
    np.testing.assert_array_equal(got.numpy(), expected.numpy())
    with pytest.raises(ValueError, match="decoder_head"):
        dec._head(torch.from_numpy(x[..., :-1].copy()))
    with pytest.raises(ValueError, match="decoder_head"):
        dec._head(torch.from_numpy(x).double())


def test_native_cache_is_a_mapping_of_views_made_when_read(artifacts):
    # The cache a native forward returns maps every cache name, in order, to a view of its buffer's first
    # `length` positions; a decode step on it makes no view (the next forward takes its buffers), trimming
    # gives another such cache over the same buffers, and a plain dict of its items is a valid cache too.
    dec = TorchDecoder(artifacts["w4a16-g32-asym"], kv_cache="int8")
    logits, cache = dec.forward(np.array([PROMPT]), dec.empty_cache())
    logits, cache = dec.forward(np.array([[5]]), cache)
    assert cache._views == {}
    assert list(cache) == dec._cache_names and len(cache) == 4 * dec.num_layers
    key, scale = cache[dec.past_key_names[1]], cache[dec.past_key_names[1] + "_scale"]
    assert key.shape == (1, dec.kv_heads, len(PROMPT) + 1, dec.head_dim) and key.dtype == torch.int8
    assert scale.shape == (1, dec.kv_heads, len(PROMPT) + 1) and scale.dtype == torch.float32
    assert key.untyped_storage().data_ptr() == cache.buffers[1][0].untyped_storage().data_ptr()
    with pytest.raises(KeyError):
        cache["past_key_values.999.key"]
    trimmed = dec.trim_cache(cache, 3)
    assert trimmed.buffers is cache.buffers and trimmed[dec.past_key_names[0]].shape[2] == 3
    allocated = dec.cache_allocations
    a, _ = dec.forward(np.array([[9]]), cache)
    b, _ = dec.forward(np.array([[9]]), dict(cache.items()))  # the same views in a dict: the same buffers
    np.testing.assert_array_equal(a, b)
    assert dec.cache_allocations == allocated


def test_decoder_layer_rejects_bad_shapes(artifacts):
    dec = TorchDecoder(artifacts["w4a16-g32-asym"])
    layer, s = dec.layers[0], dec.spec
    x = torch.zeros(1, 2, s.hidden_size)
    cache = torch.zeros(1, s.num_kv_heads, 4, s.head_dim)
    rope = torch.zeros(1, 2, s.head_dim // 2)
    layer(x, cache, cache.clone(), rope, rope, past=0)  # fits
    with pytest.raises(ValueError):
        layer(x, cache, cache.clone(), rope, rope, past=3)  # no room: the core refuses
    with pytest.raises(ValueError):
        layer(x, cache[:, :, :1], cache[:, :, :1].clone(), rope, rope, past=0)
    with pytest.raises(ValueError):
        layer(x, cache, cache.clone(), rope[:, :1], rope[:, :1], past=0)
    with pytest.raises(TypeError):
        layer(x.double(), cache, cache.clone(), rope, rope, past=0)
    codes, scale = cache.to(torch.int8), torch.zeros(cache.shape[:3])  # (batch, kv_heads, capacity)
    layer(x, codes, codes.clone(), rope, rope, past=0, k_scale=scale, v_scale=scale.clone())  # fits
    with pytest.raises(TypeError):  # int8 codes without their scales
        layer(x, codes, codes.clone(), rope, rope, past=0)
    with pytest.raises(TypeError):  # scales beside float caches
        layer(x, cache, cache.clone(), rope, rope, past=0, k_scale=scale, v_scale=scale.clone())
    with pytest.raises(ValueError):
        layer(x, codes, codes.clone(), rope, rope, past=0, k_scale=scale[:, :, :1], v_scale=scale[:, :, :1])
    o = dec.linears["model.layers.0.self_attn.o_proj"]
    weights = {"B": o.B, "scales": o.scales[:-1], "K": o.K, "N": o.N, "bits": o.bits, "block_size": o.block}
    with pytest.raises(ValueError, match="o.scales"):
        kernels.DecoderLayer(
            linears={"o": weights},
            input_norm=torch.ones(s.hidden_size),
            post_norm=torch.ones(s.hidden_size),
            hidden=s.hidden_size,
            heads=s.num_heads,
            kv_heads=s.num_kv_heads,
            head_dim=s.head_dim,
            intermediate=s.intermediate_size,
            eps=1e-5,
        )


def test_smollm2_greedy_matches_onnxruntime(smollm2):
    ort_dec, torch_dec = OrtDecoder(smollm2), TorchDecoder(smollm2, threads=2)
    assert torch_dec.native, torch_dec.native_reason
    # "1, 2, 3, 4, 5,": every greedy step wins by >= 2 logits. SmolLM2's outlier activations make int8
    # activation blocks touchy: any two implementations (onnxruntime, our torch ops, the native layers)
    # differ by ~0.3 per logit on average, so a prompt with near-ties would test luck, not the layers.
    assert _greedy(torch_dec, SMOL_PROMPT, 16) == _greedy(ort_dec, SMOL_PROMPT, 16)


def test_grouped_attention_prompt_blocks_match_the_torch_ops(artifacts):
    # 40 query rows: five row blocks per kv head, on the pool (stories260K: 2 query heads per kv head);
    # float activations, as above
    native = TorchDecoder(artifacts[FLOAT_ACTIVATIONS], threads=2)
    ops = TorchDecoder(artifacts[FLOAT_ACTIVATIONS], native=False)
    assert native.native
    prompt = [1, *np.random.default_rng(0).integers(2, 500, 39)]
    a, ca = ops.forward(np.array([prompt]), ops.empty_cache())
    b, cb = native.forward(np.array([prompt]), native.empty_cache())
    np.testing.assert_allclose(b, a, atol=LOGITS_ATOL, rtol=0)
    a, _ = ops.forward(np.array([[5]]), ca)
    b, _ = native.forward(np.array([[5]]), cb)
    np.testing.assert_allclose(b, a, atol=LOGITS_ATOL, rtol=0)


def _mean_kld(p: np.ndarray, q: np.ndarray) -> float:
    """Mean KL(softmax(p) || softmax(q)) over the rows of two (rows, vocab) logit arrays."""
    lp, lq = (torch.log_softmax(torch.from_numpy(x).double(), -1) for x in (p, q))
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _forced_logits(decoder, prompt, tokens, spoil_scales=False):
    """The last-position logits after the prompt and after each of ``tokens`` fed in turn (rows, vocab)."""
    logits, cache = decoder.forward(np.array([prompt]), decoder.empty_cache())
    if spoil_scales:  # the control: one mean scale per tensor for the prompt's rows, not one per row
        with torch.inference_mode():
            for name, t in cache.items():
                if name.endswith("_scale"):
                    t.fill_(float(t.mean()))
    rows = [logits[0, -1]]
    for token in tokens:
        logits, cache = decoder.forward(np.array([[token]]), cache)
        rows.append(logits[0, -1])
    return np.stack(rows)


@pytest.mark.parametrize("model", ["stories260K", "SmolLM2"])
def test_int8_cache_close_to_the_f32_cache(artifacts, smollm2, model):
    art, prompt = (artifacts["w4a16-g32-asym"], PROMPT) if model == "stories260K" else (smollm2, SMOL_PROMPT)
    f32, int8 = TorchDecoder(art, threads=2, kv_cache="f32"), TorchDecoder(art, threads=2, kv_cache="int8")
    assert int8.native and int8.kv_cache == "int8"
    tokens = _greedy(f32, prompt, 64)[:-1]
    expected = _forced_logits(f32, prompt, tokens)
    assert _mean_kld(expected, _forced_logits(int8, prompt, tokens)) < INT8_CACHE_MEAN_KLD
    assert _mean_kld(expected, _forced_logits(int8, prompt, tokens, spoil_scales=True)) > 10 * INT8_CACHE_MEAN_KLD


def test_int8_cache_smollm2_greedy_matches_the_f32_cache(smollm2):
    f32, int8 = TorchDecoder(smollm2, threads=2, kv_cache="f32"), TorchDecoder(smollm2, threads=2, kv_cache="int8")
    assert _greedy(int8, SMOL_PROMPT, 16) == _greedy(f32, SMOL_PROMPT, 16)


def test_int8_cache_codes_are_the_reference_quantization(artifacts):
    # layer 0's keys and values come before any attention: the fp32 cache's rows, quantized by the
    # reference (scale = max|x| / 127, round half to even), must be the int8 cache's codes and scales
    f32 = TorchDecoder(artifacts["w4a16-g32-asym"], kv_cache="f32")
    int8 = TorchDecoder(artifacts["w4a16-g32-asym"], kv_cache="int8")
    _, cf = f32.forward(np.array([PROMPT]), f32.empty_cache())
    _, ci = int8.forward(np.array([PROMPT]), int8.empty_cache())
    for name in (f32.past_key_names[0], f32.past_value_names[0]):
        codes, scale = quantize(cf[name].numpy(), KvCacheFormat("int8"))
        assert ci[name].dtype == torch.int8 and ci[name].shape == cf[name].shape
        np.testing.assert_array_equal(ci[name].numpy(), codes)
        np.testing.assert_array_equal(ci[name + "_scale"].numpy(), scale[..., 0])  # (batch, kv_heads, seq)


def test_int8_cache_batch_left_padding(artifacts):
    # each row of a left-padded batch gives what its prompt gives alone; generate_batch's row selection
    # (numpy copies of every cache tensor, scales included) takes the copying path
    dec = TorchDecoder(artifacts["w4a16-g32-asym"], kv_cache="int8")
    prompts = [PROMPT, [1, 99], [1, 300, 301, 302]]
    ids, mask, positions = left_pad(prompts)  # (batch, longest) each
    batch, _ = dec.forward(ids, dec.empty_cache(len(prompts)), attention_mask=mask, position_ids=positions)
    assert np.isfinite(batch).all()
    for row, prompt in enumerate(prompts):
        alone, _ = dec.forward(np.array([prompt]), dec.empty_cache())
        np.testing.assert_allclose(batch[row, -1], alone[0, -1], atol=LOGITS_ATOL, rtol=0)
    stop = _greedy(dec, [1, 99], 3)[2]
    expected = [generate_batch(dec, [p], max_new_tokens=12, stop_ids=[stop])[0] for p in prompts]
    assert generate_batch(dec, prompts, max_new_tokens=12, stop_ids=[stop]) == expected


def test_kv_cache_option(artifacts, tmp_path):
    assert TorchDecoder(artifacts["w4a16-g32-asym"]).kv_cache == "f32"
    kv8 = tmp_path / "kv8"
    argv = ["convert", str(model_path("stories260K.bin")), "-o", str(kv8), "--no-progress", "--no-eval"]
    assert main([*argv, "--recipe", "w4a16-g32-asym", "--kv", "int8"]) == 0
    assert TorchDecoder(kv8).kv_cache == "int8"  # the manifest's cache format
    assert TorchDecoder(kv8, kv_cache="f32").kv_cache == "f32"
    assert TorchDecoder(kv8, native=False).kv_cache == "f32"  # the torch ops keep an f32 cache
    with pytest.raises(ValueError, match="kv_cache"):
        TorchDecoder(kv8, kv_cache="int4")
    dec = TorchDecoder(kv8)
    cache = dec.empty_cache()
    cache[dec.past_key_names[0]] = cache[dec.past_key_names[0]].float()
    with pytest.raises(TypeError):  # float keys are no int8 codes: not cast
        dec.forward(np.array([[1]]), cache)


@pytest.mark.parametrize("kv_cache", ["f32", "int8"])
def test_attention_task_split_is_exact(smollm2, kv_cache):
    # One thread runs each kv head's 3 query heads as one task; two threads split a decode step's groups
    # into parts (3 kv heads, 2 threads) and prompts into row blocks. Per head the sums run in the same
    # order either way (and the linears split over outputs): the logits must be bitwise equal.
    prompt = np.array([[1, *np.random.default_rng(0).integers(100, 40000, 149)]])
    outs = []
    for threads in (1, 2):
        dec = TorchDecoder(smollm2, threads=threads, kv_cache=kv_cache)
        logits, cache = dec.forward(prompt, dec.empty_cache())
        rows = [logits[:, -1]]
        for token in (5, 77, 300):
            logits, cache = dec.forward(np.array([[token]]), cache)
            rows.append(logits[:, -1])
        outs.append(np.concatenate(rows))
    np.testing.assert_array_equal(outs[1], outs[0])


@pytest.mark.parametrize("kv_cache", ["f32", "int8"])
@pytest.mark.parametrize(
    "batch,seq,past,masked",
    [
        (2, 3, 300, (1, 10, 120)),  # a prompt block: row tasks
        (1, 1, 700, (0, 0, 360)),  # a decode step: split along the cache, its first chunk all masked
        (1, 1, 700, (0, 200, 210)),  # the same with a short masked stretch
    ],
)
def test_attention_kernels_match_the_baseline_loops(smollm2, kv_cache, batch, seq, past, masked):
    # The AVX2 / AVX-512 paths run attention on their own vector registers (csrc/attention_simd.h), a
    # decode step over a long cache split into chunks of the cache that are merged afterwards
    # (decode_split); the scalar path keeps decoder_layer.cpp's baseline loops. Same layer, same cache with
    # a masked stretch: every path's output within float rounding of the scalar path's. SmolLM2's head_dim
    # 64 takes the AVX-512 kernels (16 floats) as well as AVX2's (8).
    dec = TorchDecoder(smollm2, kv_cache=kv_cache)
    s, rng = dec.spec, np.random.default_rng(0)
    shape = (batch, s.num_kv_heads, past + seq, s.head_dim)
    if kv_cache == "int8":
        caches = [torch.from_numpy(rng.integers(-127, 128, shape).astype(np.int8)) for _ in range(2)]
        scales = [torch.from_numpy(rng.uniform(0.001, 0.05, shape[:3]).astype(np.float32)) for _ in range(2)]
    else:
        caches = [torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for _ in range(2)]
        scales = [None, None]
    x0 = torch.from_numpy(rng.standard_normal((batch, seq, s.hidden_size)).astype(np.float32))
    cos, sin = (t[past : past + seq].expand(batch, seq, -1).contiguous() for t in dec._rope_tables(past + seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[masked[0], masked[1] : masked[2]] = 0
    outs = {}
    for path in ["scalar", *kernels.available_paths()]:
        x = x0.clone()
        k, v = caches[0].clone(), caches[1].clone()
        ks, vs = (None, None) if scales[0] is None else (scales[0].clone(), scales[1].clone())
        dec._native_layer(0, 2, path)(x, k, v, cos, sin, mask, past=past, k_scale=ks, v_scale=vs)
        outs[path] = x.numpy()
    ref = outs.pop("scalar")
    assert np.abs(ref - x0.numpy()).max() > 0.1  # the layer did something
    top = np.abs(ref).max()
    for path, y in outs.items():
        # The layer's linears quantize their inputs to int8 per block (accuracy level 4): a context value
        # that moves by float rounding can flip one code at a rounding boundary and move a few outputs by up
        # to ~1% (seen: 16 of 3456 values by <= 0.45%); everything else agrees to float rounding. A wrong
        # kernel (a scale, the mask, a head) moves most values by far more.
        err = np.abs(y - ref)
        assert err.max() <= 1e-2 * top, (path, err.max() / top)
        assert np.mean(err > 2e-4 * top) <= 0.01, (path, np.mean(err > 2e-4 * top))


def test_run_layers_is_the_layers_one_by_one(smollm2):
    # kernels.run_layers: one native call for bound layers, the same bytes as one call per layer; a layer the
    # core refuses stops the run there with its error, the layers before it having run.
    dec = TorchDecoder(smollm2)
    s, rng = dec.spec, np.random.default_rng(1)
    shape = (1, s.num_kv_heads, 40, s.head_dim)
    x0 = torch.from_numpy(rng.standard_normal((1, 1, s.hidden_size)).astype(np.float32))
    cos, sin = (t[20:21].expand(1, 1, -1).contiguous() for t in dec._rope_tables(21))
    caches0 = [torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for _ in range(6)]
    runs = {}
    for mode in ("one call", "one by one"):
        x, caches = x0.clone(), [c.clone() for c in caches0]
        layers = dec.layers[:3]
        for i, layer in enumerate(layers):
            layer.bind(x, caches[2 * i], caches[2 * i + 1], cos, sin, past=20)
            if mode == "one by one":
                kernels.run_layers([layer])
        if mode == "one call":
            kernels.run_layers(layers)
        runs[mode] = (x.clone(), [c.clone() for c in caches])
    assert torch.equal(runs["one call"][0], runs["one by one"][0])
    assert all(torch.equal(a, b) for a, b in zip(runs["one call"][1], runs["one by one"][1], strict=True))
    assert not torch.equal(runs["one call"][0], x0)
    x, caches = x0.clone(), [c.clone() for c in caches0]
    dec.layers[0].bind(x, caches[0], caches[1], cos, sin, past=20)
    dec.layers[1].bind(x, caches[2], caches[3], cos, sin, past=20)
    dec.layers[1].args.capacity = 20  # no room for position 20: the core refuses this layer
    with pytest.raises(ValueError, match="core returned"):
        kernels.run_layers(dec.layers[:2])
    y = x0.clone()
    dec.layers[0](y, caches0[0].clone(), caches0[1].clone(), cos, sin, past=20)
    assert torch.equal(x, y)  # the first layer ran, the second did not
