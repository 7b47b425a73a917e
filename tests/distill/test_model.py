"""The torch decoder distillation trains against onnxruntime on the graph quantlab builds, and the
fake-quantized linear against quantlab's quantization maths."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from quantlab.distill.fakequant import FakeQuantLinear  # noqa: E402
from quantlab.distill.model import DecoderLM, load_tensors  # noqa: E402
from quantlab.graph_builder.decoder import build_decoder  # noqa: E402
from quantlab.io import load_checkpoint  # noqa: E402
from quantlab.quant.rtn import dequantize, rtn_quantize  # noqa: E402
from tests.models import model_path  # noqa: E402
from tests.tiny import run_decoder, tiny_checkpoint  # noqa: E402

# Same fp32 weights and maths; only the summation order differs between torch and onnxruntime.
LOGITS_ATOL = 1e-4


@pytest.mark.parametrize("which", ["stories260K", "tiny-untied", "tiny-tied"])
def test_logits_match_onnxruntime(which, tmp_path):
    if which == "stories260K":
        ckpt = load_checkpoint(model_path("stories260K.bin"))  # llama2.c adjacent-pair RoPE, GQA, tied head
    else:
        ckpt = tiny_checkpoint(3, tie=which == "tiny-tied")
    ids = np.random.default_rng(0).integers(0, ckpt.spec.vocab_size, (2, 37))
    reference = run_decoder(build_decoder(ckpt), ckpt, tmp_path / "ort", ids)
    with torch.no_grad():
        logits = DecoderLM(ckpt.spec, load_tensors(ckpt))(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(logits, reference, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize(("group", "symmetric"), [(32, False), (32, True), (64, False), (-1, True)])
def test_fakequant_starts_at_its_codes_and_exports_them(group, symmetric):
    weight = np.random.default_rng(1).normal(0, 0.1, (24, 172)).astype(np.float32)  # K=172: a partial group
    qw = rtn_quantize(weight, 4, group, symmetric)
    layer = FakeQuantLinear(qw)
    out = layer.export()
    np.testing.assert_array_equal(out.q, qw.q)
    np.testing.assert_array_equal(out.scales, qw.scales)
    if symmetric:
        assert out.zero_points is None
    else:
        np.testing.assert_array_equal(out.zero_points, qw.zero_points)
    np.testing.assert_array_equal(layer.dequantized().detach().numpy(), dequantize(qw))


def test_fakequant_gradients_reach_weights_and_scales():
    qw = rtn_quantize(np.random.default_rng(2).normal(0, 0.1, (8, 64)).astype(np.float32), 4, 32, False)
    layer = FakeQuantLinear(qw)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    (layer(x) ** 2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.scale.grad is not None and layer.scale.grad.abs().sum() > 0


def test_frozen_codes_train_the_scales_only_and_export_the_same_integers():
    qw = rtn_quantize(np.random.default_rng(3).normal(0, 0.1, (8, 96)).astype(np.float32), 4, 32, True)
    layer = FakeQuantLinear(qw)
    layer.freeze_codes()
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(0))
    (layer(x) ** 2).sum().backward()
    assert layer.weight.grad is None and not layer.weight.requires_grad
    assert layer.scale.grad is not None and layer.scale.grad.abs().sum() > 0
    with torch.no_grad():
        layer.scale.mul_(1.3)  # a change that would move most codes if they were re-rounded from the weight
    out = layer.export()
    np.testing.assert_array_equal(out.q, qw.q)
    np.testing.assert_allclose(out.scales, qw.scales * np.float32(1.3), rtol=1e-6)
    expected = (qw.q.astype(np.float32) - 8) * np.repeat(out.scales, 32, axis=1)
    np.testing.assert_allclose(layer.dequantized().detach().numpy(), expected, rtol=1e-6, atol=0)


def test_restricted_head_gives_those_columns_and_the_loss_skips_other_targets():
    """DecoderLM.restrict_head: the logits of the kept ids, the full head's columns; next_token_loss over
    them leaves out a target the head cannot score."""
    from quantlab.distill.train import next_token_loss

    ckpt = load_checkpoint(model_path("stories260K.bin"))
    model = DecoderLM(ckpt.spec, load_tensors(ckpt))
    ids = torch.tensor([[1, 403, 407, 261, 378, 432]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    with torch.no_grad():
        full = model(ids)
        rows = np.array([2, 261, 378, 403, 407, 432, 500])
        model.restrict_head(rows)
        part = model(ids)
    torch.testing.assert_close(part, full[..., rows], rtol=0, atol=1e-5)
    # every target is kept: the same as the full head's cross-entropy over those columns
    expected = torch.nn.functional.cross_entropy(full[0, :5, rows], torch.tensor([3, 4, 1, 2, 5]))
    torch.testing.assert_close(next_token_loss(part, ids, mask, torch.from_numpy(rows)), expected)
    # 432 not kept: its position drops out of the mean
    kept = torch.from_numpy(np.array([2, 261, 378, 403, 407, 500]))
    expected = torch.nn.functional.cross_entropy(full[0, :4, kept], torch.tensor([3, 4, 1, 2]))
    torch.testing.assert_close(next_token_loss(full[..., kept], ids, mask, kept), expected)
    assert torch.isclose(next_token_loss(full, ids, mask), torch.nn.functional.cross_entropy(full[0, :5], ids[0, 1:]))
