"""The torch runtime path (quantlab's own kernels) against onnxruntime on the same artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from quantlab.cli.main import main  # noqa: E402
from quantlab.runtime.generate import OrtDecoder  # noqa: E402
from quantlab.runtime.torch_decoder import TorchDecoder  # noqa: E402
from tests.models import golden, model_path  # noqa: E402

# Same weights, same int8 activation blocks at accuracy level 4; only summation order differs.
LOGITS_ATOL = 1e-3
IDS = np.array([[1, 403, 407, 261, 378, 432, 383]])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch-path")
    out = {}
    for recipe in ("fp32", "fp16", "w4a16-g32-asym", "w8a16-g32", "w4a16-g32-sym"):
        assert (
            main(
                [
                    "convert",
                    str(model_path("stories260K.bin")),
                    "-o",
                    str(root / recipe),
                    "--recipe",
                    recipe,
                    "--no-progress",
                    "--no-eval",
                ]
            )
            == 0
        )
        out[recipe] = root / recipe
    qdq = root / "qdq.toml"
    qdq.write_text('scheme = "w4a16-g32-asym"\nformat = "qdq"\n')
    assert (
        main(
            [
                "convert",
                str(model_path("stories260K.bin")),
                "-o",
                str(root / "qdq"),
                "--recipe",
                str(qdq),
                "--no-progress",
                "--no-eval",
            ]
        )
        == 0
    )
    out["qdq"] = root / "qdq"
    return out


@pytest.mark.parametrize("recipe", ["fp32", "fp16", "w4a16-g32-asym", "w8a16-g32", "w4a16-g32-sym", "qdq"])
def test_torch_logits_match_onnxruntime(artifacts, recipe):
    # onnxruntime fuses qdq into MatMulNBits at its default accuracy level 4; the torch path dequantizes
    config = {"session.qdq_matmulnbits_accuracy_level": "0"} if recipe == "qdq" else None
    ort_dec, torch_dec = OrtDecoder(artifacts[recipe], session_config=config), TorchDecoder(artifacts[recipe])
    a, ca = ort_dec.forward(IDS, ort_dec.empty_cache())
    b, cb = torch_dec.forward(IDS, torch_dec.empty_cache())
    np.testing.assert_allclose(b, a, atol=LOGITS_ATOL, rtol=0)
    for token in (5, 77, 300):  # through the cache
        a, ca = ort_dec.forward(np.array([[token]]), ca)
        b, cb = torch_dec.forward(np.array([[token]]), cb)
        np.testing.assert_allclose(b, a, atol=LOGITS_ATOL, rtol=0)


def test_generate_backend_torch_reproduces_golden(artifacts, capsys):
    expected = golden("stories260K_greedy.json")["ids"][1:65]
    assert (
        main(
            [
                "generate",
                str(artifacts["fp32"]),
                "--prompt-ids",
                "1",
                "--greedy",
                "--max-new-tokens",
                "64",
                "--backend",
                "torch",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["ids"] == expected
