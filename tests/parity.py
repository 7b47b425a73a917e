"""The decoder parity check the family tests share: prefill a prompt, then decode through the cache,
each step's logits against transformers' full forward; and greedy decoding through the cache."""

from __future__ import annotations

import numpy as np
import torch

PROMPT = [[3, 17, 42, 99, 5, 120, 64]]
DECODE = [11, 150, 7, 33]
LOGITS_ATOL = 1e-4  # fp32 end to end; the two implementations sum in different orders


def compare_prompt_and_decode(model, decoder, atol: float = LOGITS_ATOL) -> None:
    """Prefill PROMPT, then decode DECODE one token at a time through the cache: transformers' logits."""
    ids = np.array(PROMPT, dtype=np.int64)
    logits, cache = decoder.forward(ids, decoder.empty_cache())
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(logits, ref, atol=atol, rtol=0)
    seq = list(PROMPT[0])
    for token in DECODE:
        seq.append(token)
        logits, cache = decoder.forward(np.array([[token]], dtype=np.int64), cache)
        with torch.no_grad():
            ref = model(torch.tensor([seq])).logits.numpy()[:, -1:]
        np.testing.assert_allclose(logits, ref, atol=atol, rtol=0)
    assert cache["past_key_values.0.key"].shape[2] == len(seq)


def greedy(decoder, prompt: list[int], steps: int) -> list[int]:
    """``steps`` greedy tokens after ``prompt``, one forward per token through the cache."""
    logits, cache = decoder.forward(np.array([prompt], dtype=np.int64), decoder.empty_cache())
    out = []
    for _ in range(steps):
        token = int(logits[0, -1].argmax())
        out.append(token)
        logits, cache = decoder.forward(np.array([[token]], dtype=np.int64), cache)
    return out
