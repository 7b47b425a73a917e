"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward.

Leviathan et al., arXiv 2211.17192, and Chen et al., arXiv 2302.01318. One round, with the last
committed token ``t`` not yet in the target's cache::

    draft:   t -> x1 -> x2 -> ... -> xk           k forwards of one token (the first may carry more)
    target:  [t, x1, ..., xk]                       one forward of k+1 positions -> p_0 ... p_k
    keep:    x1 .. xn (n <= k accepted), then one token of the target's own (from p_n)

Greedy: x_i is accepted while it is the target's argmax of p_{i-1}, and the extra token is the argmax
of p_n, so the output is token for token what plain greedy decoding of the target gives (up to the float
rounding of a (k+1)-token forward against a one-token one). Sampling: x_i ~ q_{i-1} (the draft) is
accepted with probability min(1, p(x_i) / q(x_i)); on a rejection the token is drawn from
normalize(max(0, p - q)), and when all k pass, one more from p_k. Every emitted token then follows the
target's distribution (after the same temperature / top-k / top-p transform on both models).

After each round both caches are cut back to the tokens they computed that were kept: every cache
tensor is (batch, kv_heads, seq, ...), so that is a slice of the sequence axis, exact for float caches
and for per-token scales (``..._scale``). A residual window (``..._residual``) or a -channel-keys tail
(``..._tail``) holds tokens in a layout that a slice cannot rewind: those caches are refused. A decoder
with a ``trim_cache(cache, length)`` method trims its own cache instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from quantlab.errors import InputError
from quantlab.graph_builder.kv_cache import RESIDUAL_SUFFIX, TAIL_SUFFIX
from quantlab.runtime.generate import GREEDY, SamplingConfig, cache_length, candidates

# The files whose bytes must match for two artifacts to share a tokenizer (whichever the folder has).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.bin", "tokenizer.model")
TOKENIZER_FIELDS = ("kind", "bos_token_id", "eos_token_ids")


@dataclasses.dataclass
class SpeculativeStats:
    """What the rounds did. ``accepted`` counts drafted tokens the target kept (its own extra token is not
    one); the prefill is one forward of each model."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    generated: int = 0  # tokens returned, the prefill's first one included

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_target_forward(self) -> float | None:
        """Generated tokens per target forward, the prefill's forward and token included."""
        return self.generated / self.target_forwards if self.target_forwards else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_target_forward": self.tokens_per_target_forward,
        }


@dataclasses.dataclass(frozen=True)
class SpeculativeResult:
    ids: list[int]
    stats: SpeculativeStats


# --- the maths: distributions and the acceptance rule ------------------------------------------------------------


def sampling_probs(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """logits (vocab,) -> the distribution :class:`~quantlab.runtime.generate.Sampler` draws from, as a full
    (vocab,) float64 vector: temperature, then the top-k likeliest, then the smallest top-p prefix."""
    order, p = candidates(logits, config)
    out = np.zeros(logits.shape[-1], dtype=np.float64)
    out[order] = p
    return out


def _draw(p: np.ndarray, rng: np.random.Generator) -> int:
    return int(rng.choice(p.size, p=p / p.sum()))


def verify_sampled(
    p_target: np.ndarray, q_draft: np.ndarray, drafted: Sequence[int], rng: np.random.Generator
) -> list[int]:
    """The speculative-sampling rule (arXiv 2211.17192, algorithm 1) for one round.

    ``p_target`` (k+1, vocab): the target's distribution after the committed text and after each drafted
    prefix; ``q_draft`` (k, vocab): the draft's distributions the k ``drafted`` tokens were drawn from.
    Returns the accepted drafted tokens and then one token drawn by the target's rule: 1 to k+1 tokens,
    each distributed as the target's p."""
    out: list[int] = []
    for i, x in enumerate(drafted):
        p, q = p_target[i], q_draft[i]
        if q[x] > 0 and rng.random() < min(1.0, p[x] / q[x]):
            out.append(int(x))
            continue
        residual = np.maximum(p - q, 0.0)
        # p == q to the last bit never rejects; a rounding-level residual falls back on p itself
        out.append(_draw(residual if residual.sum() > 0 else p, rng))
        return out
    out.append(_draw(p_target[len(drafted)], rng))
    return out


def verify_greedy(target_logits: np.ndarray, drafted: Sequence[int]) -> list[int]:
    """target_logits (k+1, vocab) -> the drafted tokens that match the target's argmax, then its own next."""
    best = np.argmax(target_logits, axis=-1)
    n = 0
    while n < len(drafted) and best[n] == drafted[n]:
        n += 1
    return [int(t) for t in drafted[:n]] + [int(best[n])]


# --- caches ------------------------------------------------------------------------------------------------------


def check_trimmable(decoder) -> None:
    """ValueError when the decoder's cache holds tokens in a layout a sequence slice cannot rewind."""
    if hasattr(decoder, "trim_cache"):
        return
    odd = [n for n in decoder.empty_cache() if n.endswith((RESIDUAL_SUFFIX, TAIL_SUFFIX))]
    if odd:
        raise ValueError(
            f"speculative decoding cuts the KV cache back after each round; {odd[0]} (a residual window or a "
            "-channel-keys tail) cannot be cut back exactly: use a per-token cache format (fp32, int8, int4-g32)"
        )


def trim_cache(decoder, cache: dict, length: int) -> dict:
    """The cache cut back to its first ``length`` tokens (every tensor (batch, kv_heads, seq, ...))."""
    if hasattr(decoder, "trim_cache"):
        return decoder.trim_cache(cache, length)
    out = {}
    for name, t in cache.items():
        kept = t[:, :, :length]  # numpy arrays and torch tensors alike
        # onnxruntime copies a strided input on every run: make it contiguous once
        out[name] = np.ascontiguousarray(kept) if isinstance(kept, np.ndarray) else kept
    return out


# --- the loop ------------------------------------------------------------------------------------------------------


def generate_speculative(
    target,
    draft,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    k: int = 4,
    sampling: SamplingConfig = GREEDY,
    eos_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> SpeculativeResult:
    """Generate up to ``max_new_tokens`` ids after the prompt (excluded), stopping after an eos id unless
    ``ignore_eos``. ``target`` and ``draft`` are decoders with ``forward``/``empty_cache`` (OrtDecoder,
    TorchDecoder) over one vocabulary. ``on_tokens(ids)`` sees the ids of each round as they come (the
    prefill's first token alone, then 1 to k+1 a round)."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    if k < 1 or max_new_tokens < 1:
        raise ValueError("k and max_new_tokens must be >= 1")
    check_trimmable(target)
    check_trimmable(draft)
    stop = set() if ignore_eos else set(eos_ids)
    rng = np.random.default_rng(sampling.seed)
    stats = SpeculativeStats()
    out: list[int] = []

    def emit(tokens: list[int]) -> bool:
        """Append what fits (up to max_new_tokens, through a stop id); True when generation is over."""
        room = tokens[: max_new_tokens - len(out)]
        for n, t in enumerate(room):
            if t in stop:
                room = room[: n + 1]
                break
        out.extend(room)
        stats.generated = len(out)
        if on_tokens is not None and room:
            on_tokens(room)
        return len(out) >= max_new_tokens or bool(room and room[-1] in stop)

    def pick(logits: np.ndarray) -> tuple[int, np.ndarray | None]:
        if sampling.greedy:
            return int(np.argmax(logits)), None
        q = sampling_probs(logits, sampling)
        return _draw(q, rng), q

    # prefill: both models run the prompt; the target's last logits give the first token
    prompt = np.asarray([list(prompt_ids)], dtype=np.int64)  # (1, prompt_len)
    logits, target_cache = target.forward(prompt, target.empty_cache())
    _, draft_cache = draft.forward(prompt, draft.empty_cache())
    stats.target_forwards += 1
    stats.draft_forwards += 1
    committed = list(prompt_ids)
    first, _ = pick(logits[0, -1])
    committed.append(first)
    if emit([first]):
        return SpeculativeResult(out, stats)
    while True:
        # the target's cache holds every committed token but the last; the draft's may lag further behind
        base = len(committed)
        steps = min(k, max_new_tokens - len(out) - 1)  # never draft what could not be emitted
        drafted: list[int] = []
        q_draft: list[np.ndarray] = []
        feed = committed[cache_length(draft_cache) :]
        for _ in range(steps):
            logits, draft_cache = draft.forward(np.asarray([feed], dtype=np.int64), draft_cache)
            stats.draft_forwards += 1
            token, q = pick(logits[0, -1])
            drafted.append(token)
            q_draft.append(q)
            feed = [token]
        block = np.asarray([[committed[-1], *drafted]], dtype=np.int64)  # (1, steps + 1)
        logits, target_cache = target.forward(block, target_cache)
        stats.target_forwards += 1
        if sampling.greedy:
            kept = verify_greedy(logits[0], drafted)
        else:
            p_target = np.stack([sampling_probs(row, sampling) for row in logits[0]])  # (steps + 1, vocab)
            kept = verify_sampled(p_target, np.stack(q_draft) if q_draft else p_target[:0], drafted, rng)
        accepted = len(kept) - 1
        stats.rounds += 1
        stats.drafted += steps
        stats.accepted += accepted
        committed += kept
        # keep what each model computed from the committed text: target up to all but the last committed
        # token; draft up to the drafted tokens it fed that were accepted (it never fed the last drafted one)
        target_cache = trim_cache(target, target_cache, base + accepted)
        draft_cache = trim_cache(draft, draft_cache, min(cache_length(draft_cache), base + accepted))
        if emit(kept):
            return SpeculativeResult(out, stats)


# --- the pair of artifacts ---------------------------------------------------------------------------------------


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, None, "not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, None, f"not valid JSON ({e})") from None


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def check_same_vocabulary(target_dir: str | os.PathLike, draft_dir: str | os.PathLike) -> None:
    """InputError naming the draft folder unless both artifacts have one vocabulary and tokenizer: the same
    vocab_size (genai_config.json), the same tokenizer kind and special ids (tokenizer_info.json) and the
    same tokenizer file bytes."""
    target, draft = Path(target_dir), Path(draft_dir)
    if not (draft / "model.onnx").is_file():
        raise InputError(draft, "model.onnx", "the draft is not an artifact folder (no model.onnx)")
    sizes = [_json(d / "genai_config.json")["model"].get("vocab_size") for d in (target, draft)]
    if sizes[0] != sizes[1]:
        raise InputError(
            draft / "genai_config.json",
            "model.vocab_size",
            f"the draft's vocabulary has {sizes[1]} tokens, the target's {sizes[0]}: a draft must share the "
            "target's tokenizer",
        )
    infos = [_json(d / "tokenizer_info.json") for d in (target, draft)]
    for field in TOKENIZER_FIELDS:
        if infos[0].get(field) != infos[1].get(field):
            raise InputError(
                draft / "tokenizer_info.json",
                field,
                f"{infos[1].get(field)!r} where the target has {infos[0].get(field)!r}: a draft must share the "
                "target's tokenizer",
            )
    for name in TOKENIZER_FILES:
        if _digest(target / name) != _digest(draft / name):
            raise InputError(draft / name, None, "differs from the target's: a draft must share its tokenizer")


def frequent_token_ids(
    path: str | os.PathLike, tokenizer, vocab_size: int, n: int, *, always: Sequence[int] = ()
) -> tuple[np.ndarray, dict]:
    """The ``n`` token ids most frequent in the file at ``path`` (text, .jsonl, .json or .npy ids, as
    :func:`quantlab.eval.data.load_token_data` reads them; ties to the lower id), with ``always`` (the
    special ids a draft must be able to propose) among them, sorted; and a description for the manifest:
    the file's sha256, its token count and the share of its tokens the kept ids cover.

    For a draft's head (``convert --head-vocab``, passes/prune_head_vocab.py). InputError naming the
    file or the flag on bad input."""
    from quantlab.eval.data import load_token_data

    check_head_vocab(n, vocab_size, always)
    data = load_token_data(path, tokenizer, seq_len=1 << 20, vocab_size=vocab_size)
    kept, coverage = most_frequent_tokens(data.ids, data.lengths, vocab_size, n, always=always)
    if kept is None:
        raise InputError(path, None, "holds no tokens to count")
    description = {
        "vocab": vocab_size,
        "data": os.fspath(path),
        "data_sha256": _digest(Path(path)),
        "data_tokens": int(np.asarray(data.lengths).sum()),
        "coverage": coverage,
        "kept_sha256": ids_sha256(kept),
    }
    return kept, description


def check_head_vocab(n: int, vocab_size: int, always: Sequence[int] = ()) -> None:
    """InputError on ``--head-vocab`` unless 1 <= n < vocab_size and n holds the ``always`` ids."""
    if not 1 <= n < vocab_size:
        raise InputError(
            None, "--head-vocab", f"must be between 1 and the vocabulary size - 1 ({vocab_size - 1}), got {n}"
        )
    if len({int(t) for t in always if 0 <= int(t) < vocab_size}) > n:
        raise InputError(None, "--head-vocab", "must keep at least the special tokens")


def most_frequent_tokens(
    ids: np.ndarray, lengths: np.ndarray, vocab_size: int, n: int, *, always: Sequence[int] = ()
) -> tuple[np.ndarray | None, float]:
    """The ``n`` ids most frequent in the real tokens of ``ids`` (rows, seq) (``lengths`` each; ties to the
    lower id), ``always`` among them, sorted; and the share of the tokens they cover. (None, 0.0) when
    there are no tokens. The rule ``convert --head-vocab`` and ``distill --head-vocab`` share."""
    ids = np.asarray(ids)
    real = np.arange(ids.shape[1])[None, :] < np.asarray(lengths)[:, None]
    counts = np.bincount(ids[real], minlength=vocab_size)
    total = int(counts.sum())
    if total == 0:
        return None, 0.0
    chosen = {int(t) for t in always if 0 <= int(t) < vocab_size}
    for token in np.lexsort((np.arange(vocab_size), -counts)):  # most frequent first, then the lower id
        if len(chosen) >= n:
            break
        chosen.add(int(token))
    kept = np.array(sorted(chosen), dtype=np.int64)
    return kept, round(float(counts[kept].sum()) / total, 6)


def special_ids(spec) -> list[int]:
    """The ids a draft's pruned head always keeps (a ModelSpec's): end of sequence, and the beginning."""
    return [*(spec.eos_token_ids or ()), *([spec.bos_token_id] if spec.bos_token_id is not None else [])]


def ids_sha256(ids: np.ndarray) -> str:
    """sha256 of token ids as little-endian int64: the kept set of a pruned head, as distill and convert record it."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()
