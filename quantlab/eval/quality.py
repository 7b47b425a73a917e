"""Quality of a candidate artifact on token data: perplexity, and against a baseline artifact KL divergence
and top-1 agreement, the figures llama.cpp's ``perplexity --kl-divergence`` reports.

Each batch of sequences goes through both models in one full-sequence forward (empty cache, no
generation); only per-token scalars are kept (negative log-likelihoods, KL, argmax agreement), never
the logits, which for a 49152-token vocabulary would be 200 kB per token.

Definitions, over every predicted position (token ``t + 1`` predicted from the prefix ``<= t``):

- ``ppl = exp(mean NLL)``, the NLL of the true next token under the model, in nats;
- ``KL(P_baseline || P_candidate)`` of the next-token distributions per position, in nats,
  summarized as mean, median, 99.9th percentile and max;
- ``top1_agreement``: the fraction of positions where both models' argmax tokens are the same.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from quantlab.errors import InputError
from quantlab.eval.data import TokenData
from quantlab.quant.metrics import kl_divergence_per_token, log_softmax, top1_agreement

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class QualityReport:
    """Perplexity of the candidate; with a baseline also its perplexity, KL divergence (nats) and top-1."""

    candidate: str
    data: dict  # TokenData.describe()
    tokens: int  # predicted positions
    ppl: float
    baseline: str | None = None
    baseline_ppl: float | None = None
    kld_mean: float | None = None
    kld_median: float | None = None
    kld_p99_9: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready; the baseline's fields only when there was a baseline."""
        out = dataclasses.asdict(self)
        if self.baseline is None:
            out = {k: v for k, v in out.items() if v is not None}
        return out


def model_config(artifact_dir: str | os.PathLike) -> dict:
    """The ``model`` section of an artifact's ``genai_config.json`` (vocab_size, context_length, ...)."""
    folder = Path(artifact_dir)
    if not (folder / "model.onnx").is_file():
        raise InputError(folder, "model.onnx", "not an artifact folder (no model.onnx)")
    path = folder / "genai_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))["model"]
    except FileNotFoundError:
        raise InputError(path, None, "not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(path, "model", f"not a genai_config ({e})") from None


def evaluate(
    candidate_dir: str | os.PathLike,
    data: TokenData,
    baseline_dir: str | os.PathLike | None = None,
    *,
    threads: int | None = None,
    batch: int = 8,
    progress: bool = True,
) -> QualityReport:
    """Perplexity of the candidate on ``data``; KL divergence and top-1 agreement against the baseline.

    ``batch`` sequences go through each model per forward; ``progress`` shows a bar over batches
    on a terminal. Raises InputError when the vocabularies differ, the ids exceed the vocabulary or
    no sequence has a token to predict.
    """
    from tqdm import tqdm

    from quantlab.runtime.generate import OrtDecoder

    if batch < 1:
        raise ValueError("batch must be >= 1")
    config = model_config(candidate_dir)
    vocab, context = int(config["vocab_size"]), config.get("context_length")
    if baseline_dir is not None and (base_vocab := int(model_config(baseline_dir)["vocab_size"])) != vocab:
        raise InputError(baseline_dir, "vocab_size", f"{base_vocab} differs from the candidate's {vocab}")
    if data.ids.size and not 0 <= int(data.ids.min()) <= int(data.ids.max()) < vocab:
        raise InputError(data.source, None, f"token ids must be in [0, {vocab})")
    if context and data.seq_len > int(context):
        raise InputError(data.source, "seq_len", f"{data.seq_len} exceeds the model's context length {context}")
    if int(np.maximum(data.lengths - 1, 0).sum()) == 0:
        raise InputError(data.source, None, "no token to predict: every sequence is shorter than 2 tokens")

    candidate = OrtDecoder(candidate_dir, threads=threads)
    baseline = OrtDecoder(baseline_dir, threads=threads) if baseline_dir is not None else None
    nll_cand: list[np.ndarray] = []
    nll_base: list[np.ndarray] = []
    kl: list[np.ndarray] = []
    agreeing = 0
    starts = range(0, data.num_sequences, batch)
    bar = tqdm(starts, desc="eval", unit="batch", disable=not progress or not sys.stderr.isatty())
    for start in bar:
        ids = data.ids[start : start + batch]  # (batch, seq)
        lengths = data.lengths[start : start + batch]
        logits_cand = _full_forward(candidate, ids)  # (batch, seq, vocab)
        logits_base = _full_forward(baseline, ids) if baseline is not None else None
        # one row at a time: the float64 log-softmax of a whole batch would be 8x the logits again
        for row, length in enumerate(lengths):
            predicted = int(length) - 1  # positions 0..length-2 predict tokens 1..length-1
            if predicted < 1:
                continue
            targets = ids[row, 1 : predicted + 1]
            cand = logits_cand[row, :predicted]  # (predicted, vocab)
            nll_cand.append(_nll(cand, targets))
            if logits_base is not None:
                base = logits_base[row, :predicted]
                nll_base.append(_nll(base, targets))
                kl.append(kl_divergence_per_token(base, cand))
                agreeing += round(top1_agreement(base, cand) * predicted)
    bar.close()

    nll = np.concatenate(nll_cand)
    report = {
        "candidate": os.fspath(candidate_dir),
        "data": data.describe(),
        "tokens": int(nll.size),
        "ppl": float(np.exp(np.mean(nll))),
    }
    if baseline is not None:
        kl_all = np.concatenate(kl)
        report.update(
            baseline=os.fspath(baseline_dir),
            baseline_ppl=float(np.exp(np.mean(np.concatenate(nll_base)))),
            kld_mean=float(np.mean(kl_all)),
            kld_median=float(np.median(kl_all)),
            kld_p99_9=float(np.percentile(kl_all, 99.9)),
            kld_max=float(np.max(kl_all)),
            top1_agreement=agreeing / kl_all.size,
        )
    logger.info("eval %s: ppl %.4f over %d tokens", candidate_dir, report["ppl"], report["tokens"])
    return QualityReport(**report)


def _full_forward(decoder, ids: np.ndarray) -> np.ndarray:
    """ids (batch, seq) from an empty cache -> logits (batch, seq, vocab); right padding needs no mask (causal)."""
    logits, _ = decoder.forward(ids, decoder.empty_cache(ids.shape[0]))
    return logits


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """logits (positions, vocab), targets (positions,) -> -log P(target) per position, float64 nats."""
    log_p = log_softmax(logits)
    return -log_p[np.arange(targets.shape[0]), targets]
