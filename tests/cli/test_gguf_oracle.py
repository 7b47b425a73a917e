"""The SmolLM2 GGUF through quantlab against transformers' own GGUF loader, as the independent oracle."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.runtime.generate import OrtDecoder
from tests.cli.conftest import SMOLLM2
from tests.models import golden, model_path

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# fp32 on both sides; 30 layers summed in different orders.
LOGITS_ATOL = 1e-4


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
    np.testing.assert_allclose(logits, ref, atol=LOGITS_ATOL, rtol=0)
    seq = list(prompt)
    for token in (504, 3575, 282, 4649):  # "The capital of France"
        seq.append(token)
        logits, cache = decoder.forward(np.array([[token]]), cache)
        with torch.no_grad():
            ref = oracle(torch.tensor([seq])).logits.numpy()[:, -1:]
        np.testing.assert_allclose(logits, ref, atol=LOGITS_ATOL, rtol=0)
