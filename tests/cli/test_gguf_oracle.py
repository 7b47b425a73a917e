"""The SmolLM2 GGUF through quantlab against transformers' own GGUF loader, as the independent oracle."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.runtime.generate import OrtDecoder
from tests.cli.conftest import SMOLLM2
from tests.models import golden, model_path

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# fp32 on both sides; 30 layers summed in different orders. The rounding error of a logit grows with the
# magnitudes summed into it, i.e. with the scale of its position's logits, not with its own value: the
# bound is 1e-4 plus 1e-5 of the position's largest |logit|. onnxruntime's AVX2 kernels (2 AMD EPYC
# cores) put 8 of the prompt's 786,432 logits up to 1.1e-4 away from transformers at positions whose
# logits reach ~20, where the AVX-512 machine this was first written on stayed under 1e-4.
LOGITS_ATOL = 1e-4
LOGITS_ROW_RTOL = 1e-5


def assert_logits_close(logits: np.ndarray, ref: np.ndarray) -> None:
    bound = LOGITS_ATOL + LOGITS_ROW_RTOL * np.abs(ref).max(axis=-1, keepdims=True)
    excess = np.abs(logits - ref) - bound
    assert excess.max() <= 0, f"{int((excess > 0).sum())} logits over the bound, worst by {excess.max():.3g}"
    np.testing.assert_array_equal(logits.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf_loader(smollm2_artifact):
    path = model_path(SMOLLM2)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    oracle.eval()
    prompt = next(c for c in golden("smollm2_greedy.json")["cases"] if c["chat"])["prompt_ids"]
    decoder = OrtDecoder(smollm2_artifact)
    logits, cache = decoder.forward(np.array([prompt]), decoder.empty_cache())
    with torch.no_grad():
        ref = oracle(torch.tensor([prompt])).logits.numpy()
    assert_logits_close(logits, ref)
    seq = list(prompt)
    for token in (504, 3575, 282, 4649):  # "The capital of France"
        seq.append(token)
        logits, cache = decoder.forward(np.array([[token]]), cache)
        with torch.no_grad():
            ref = oracle(torch.tensor([seq])).logits.numpy()[:, -1:]
        assert_logits_close(logits, ref)
