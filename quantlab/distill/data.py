"""Training text for distillation: the user's own, or sequences the teacher writes itself (data-free).

Data-free follows LLM-QAT (arXiv 2305.17888): every sequence starts at BOS and each next token is drawn
from the teacher's full softmax (quantlab.eval.data.sample_from_model, over the teacher's fp32 ONNX
artifact with its KV cache). Held-out sequences for the figures are drawn the same way with another
seed, so no training sequence is ever scored.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from quantlab.eval.data import TokenData, load_token_data, make_token_data, sample_from_model
from quantlab.io.spec import Checkpoint


def bos_of(ckpt: Checkpoint) -> int:
    spec = ckpt.spec
    return spec.bos_token_id if spec.bos_token_id is not None else min(spec.eos_token_ids or (0,))


@contextlib.contextmanager
def teacher_artifact(ckpt: Checkpoint, near: str | os.PathLike, progress: bool = False):
    """A temporary fp32 ONNX artifact of the teacher beside ``near`` (removed on exit)."""
    from quantlab.api import _baseline_artifact

    with _baseline_artifact(ckpt, Path(near).absolute(), progress) as folder:
        yield folder


def sample_teacher(artifact: str | os.PathLike, ckpt: Checkpoint, n: int, seq_len: int, seed: int) -> TokenData:
    """``n`` sequences of ``seq_len`` tokens sampled from the teacher's artifact with ``seed``."""
    from quantlab.runtime.generate import OrtDecoder

    ids = sample_from_model(OrtDecoder(artifact), n, seq_len, seed, bos_of(ckpt))
    return make_token_data(ids, f"sampled from the teacher: {n} x {seq_len}, seed {seed}")


def user_text(path: str | os.PathLike, ckpt: Checkpoint, seq_len: int, max_sequences: int | None) -> TokenData:
    """The user's text (or token ids) cut into ``seq_len`` windows, tokenized by the teacher's tokenizer."""
    from quantlab.runtime.tokenizer import tokenizer_from_spec

    tok = tokenizer_from_spec(ckpt.tokenizer) if ckpt.tokenizer else None
    return load_token_data(path, tok, seq_len=seq_len, max_sequences=max_sequences, vocab_size=ckpt.spec.vocab_size)


def batch_indices(n: int, batch: int, seed: int, step: int) -> np.ndarray:
    """The rows of step ``step``'s batch: a function of (seed, step) alone, so a resumed run sees the
    same batches as an uninterrupted one."""
    rng = np.random.default_rng([seed, step])
    return np.sort(rng.choice(n, size=min(batch, n), replace=False))
