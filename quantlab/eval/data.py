"""Token data for evaluation and calibration: read from a file, or sampled from a model.

Formats, chosen by the file's suffix:

- ``.jsonl``: one ``{"text": ...}`` object per line; each is a document, tokenized on its own and
  cut to ``seq_len`` tokens.
- ``.npy``: an integer array of token ids, ``(n, seq)`` (or ``(seq,)`` for one sequence).
- ``.json``: a list of lists of token ids (rows may differ in length).
- anything else: UTF-8 text, tokenized as a whole (BOS first when the tokenizer adds one by default),
  then cut into consecutive windows of ``seq_len`` tokens, the last one possibly shorter.

Every format gives at most ``seq_len`` tokens per sequence and at most ``max_sequences`` sequences.
Rows shorter than the longest are right-padded with :data:`PAD_ID`; ``TokenData.lengths`` says how
many tokens of each row are real. The models are causal, so padding on the right never changes the
logits of the real tokens before it; consumers only have to ignore positions at or past the length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from quantlab.errors import InputError

if TYPE_CHECKING:
    from quantlab.runtime.generate import OrtDecoder
    from quantlab.runtime.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PAD_ID = 0


@dataclasses.dataclass(frozen=True, eq=False)
class TokenData:
    """Token sequences ``ids`` (n, seq) int64, right-padded; ``lengths`` (n,) real tokens per row.

    ``source`` says where they came from; ``sha256`` identifies them (see :func:`token_sha256`).
    The arrays are read-only.
    """

    ids: np.ndarray
    lengths: np.ndarray
    source: str
    sha256: str

    @property
    def num_sequences(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])

    def describe(self) -> dict:
        """The JSON-ready description reports carry: source, sequences, seq_len, sha256."""
        return {"source": self.source, "sequences": self.num_sequences, "seq_len": self.seq_len, "sha256": self.sha256}


def token_sha256(ids: np.ndarray, lengths: np.ndarray) -> str:
    """sha256 of the ids as little-endian int64 bytes, then the shape, then the lengths (int64)."""
    digest = hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes())
    digest.update(np.asarray(ids.shape, dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(lengths, dtype="<i8").tobytes())
    return digest.hexdigest()


def make_token_data(
    rows: np.ndarray | Sequence[Sequence[int]], source: str, lengths: Sequence[int] | np.ndarray | None = None
) -> TokenData:
    """TokenData from a 2-D id array (every row full unless ``lengths`` says otherwise) or ragged rows."""
    if isinstance(rows, np.ndarray):
        ids = np.array(rows, dtype=np.int64)  # a copy: the caller's array stays writable and theirs
        if ids.ndim != 2:
            raise ValueError(f"expected a 2-D id array, got shape {ids.shape}")
        lens = np.full(ids.shape[0], ids.shape[1], dtype=np.int64) if lengths is None else np.array(lengths, np.int64)
    else:
        lens = np.array([len(r) for r in rows], dtype=np.int64)
        ids = np.full((len(rows), int(lens.max(initial=0))), PAD_ID, dtype=np.int64)  # (n, longest)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
    if lens.shape != (ids.shape[0],) or np.any(lens < 0) or np.any(lens > ids.shape[1]):
        raise ValueError("lengths must give 0..seq tokens for each row")
    ids.setflags(write=False)
    lens.setflags(write=False)
    return TokenData(ids=ids, lengths=lens, source=source, sha256=token_sha256(ids, lens))


def load_token_data(
    path: str | os.PathLike,
    tokenizer: Tokenizer | None = None,
    *,
    seq_len: int = 128,
    max_sequences: int | None = None,
    vocab_size: int | None = None,
) -> TokenData:
    """Read token data from ``path`` (format by suffix, see the module docstring); validate the ids.

    ``tokenizer`` is needed for text and JSONL; ``vocab_size``, when given, bounds the ids.
    Raises InputError naming the file and the line or element at fault.
    """
    path = Path(path)
    if seq_len < 1:
        raise InputError(None, "--seq-len", "must be >= 1")
    if max_sequences is not None and max_sequences < 1:
        raise InputError(None, "--max-sequences", "must be >= 1")
    if not path.is_file():
        raise InputError(path, None, "not found")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        rows = _read_npy(path)
    elif suffix == ".json":
        rows = _read_json_ids(path)
    elif suffix == ".jsonl":
        rows = _read_jsonl(path, _need_tokenizer(path, tokenizer))
    else:
        rows = _read_text(path, _need_tokenizer(path, tokenizer), seq_len)
    if any(len(r) > seq_len for r in rows):
        logger.info("%s: sequences cut to %d tokens", path, seq_len)
    rows = [r[:seq_len] for r in rows][:max_sequences]
    if not rows or all(len(r) == 0 for r in rows):
        raise InputError(path, None, "no token data")
    if vocab_size is not None:
        _check_vocab(path, rows, vocab_size)
    return make_token_data(rows, str(path))


def _need_tokenizer(path: Path, tokenizer: Tokenizer | None) -> Tokenizer:
    if tokenizer is None:
        raise InputError(path, None, "text needs a tokenizer; give token ids as .npy or .json instead")
    return tokenizer


def _add_bos_default(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer puts BOS first by default (``add_bos_default``, or ``add_bos_token``)."""
    default = getattr(tokenizer, "add_bos_default", None)
    return bool(getattr(tokenizer, "add_bos_token", True) if default is None else default)


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(path, f"line {line}", f"not UTF-8 text (byte {e.start})") from None


def _read_text(path: Path, tokenizer: Tokenizer, seq_len: int) -> list[list[int]]:
    text = _read_utf8(path)
    if not text.strip():
        raise InputError(path, None, "no token data (the file is empty)")
    ids = tokenizer.encode(text, add_bos=_add_bos_default(tokenizer))
    return [ids[start : start + seq_len] for start in range(0, len(ids), seq_len)]


def _read_jsonl(path: Path, tokenizer: Tokenizer) -> list[list[int]]:
    add_bos = _add_bos_default(tokenizer)
    rows = []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as e:
            raise InputError(path, f"line {number}", f"not valid JSON ({e.msg}, column {e.colno})") from None
        except (RecursionError, ValueError) as e:  # runaway nesting, a duplicate key
            raise InputError(path, f"line {number}", f"not valid JSON ({str(e) or 'nested too deeply'})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise InputError(path, f"line {number}", 'expected an object with a "text" field')
        if not isinstance(record["text"], str):
            raise InputError(path, f"line {number}: text", f"expected a string, got {type(record['text']).__name__}")
        if not record["text"]:
            raise InputError(path, f"line {number}: text", "empty")
        rows.append(tokenizer.encode(record["text"], add_bos=add_bos))
    return rows


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _read_json_ids(path: Path) -> list[list[int]]:
    try:
        value = json.loads(_read_utf8(path))
    except json.JSONDecodeError as e:
        raise InputError(path, f"line {e.lineno}", f"not valid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise InputError(path, None, "not valid JSON (nested too deeply)") from None
    if not isinstance(value, list) or not all(isinstance(row, list) for row in value):
        raise InputError(path, None, "expected a list of lists of token ids")
    for i, row in enumerate(value):
        for j, token in enumerate(row):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < 2**31:
                raise InputError(path, f"[{i}][{j}]", f"expected a non-negative integer token id, got {token!r}")
    return value


def _read_npy(path: Path) -> list[np.ndarray]:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as e:  # a malformed header fails in numpy's tokenizer/ast too; pickles stay refused
        raise InputError(path, None, f"not a readable .npy array ({type(e).__name__}: {e})") from None
    if array.dtype.kind not in "iu":
        raise InputError(path, "dtype", f"expected integer token ids, got {array.dtype}")
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise InputError(path, "shape", f"expected (sequences, seq_len), got {array.shape}")
    return list(array.astype(np.int64))


def _check_vocab(path: Path, rows: Sequence[Sequence[int]], vocab_size: int) -> None:
    for i, row in enumerate(rows):
        row = np.asarray(row, dtype=np.int64)
        bad = np.flatnonzero((row < 0) | (row >= vocab_size))
        if bad.size:
            j = int(bad[0])
            raise InputError(
                path,
                f"sequence {i}, position {j}",
                f"token id {int(row[j])} is outside the vocabulary [0, {vocab_size})",
            )


def sample_from_model(
    decoder: OrtDecoder,
    n: int,
    seq_len: int,
    seed: int,
    bos_id: int,
    *,
    temperature: float = 1.0,
    first_index: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """``n`` sequences of ``seq_len`` tokens sampled from the model, each starting with ``bos_id``.

    Data-free calibration/evaluation text in the manner of LLM-QAT (arXiv 2305.17888): the model
    writes its own text, drawing every token from its full softmax at ``temperature`` (no top-k/p;
    sequences run their full length, through any end-of-sequence token). All ``n`` sequences advance
    together, one batched forward per step over the KV cache. Sequence ``i`` draws from its own
    generator seeded with ``(seed, first_index + i)``, so it is the same whatever the batch it is in:
    ``sample_from_model(d, 4, L, s, b)[2] == sample_from_model(d, 1, L, s, b, first_index=2)[0]``.
    ``progress`` shows a bar over steps on a terminal. Returns (n, seq_len) int64.
    """
    from tqdm import tqdm

    if n < 1 or seq_len < 1:
        raise ValueError("n and seq_len must be >= 1")
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    generators = [np.random.default_rng([seed, first_index + i]) for i in range(n)]
    ids = np.empty((n, seq_len), dtype=np.int64)  # (batch, seq)
    ids[:, 0] = bos_id
    cache = decoder.empty_cache(n)
    for t in tqdm(range(1, seq_len), desc="sample", unit="token", disable=not progress or not sys.stderr.isatty()):
        logits, cache = decoder.forward(ids[:, t - 1 : t], cache)  # (batch, 1, vocab)
        # float64 softmax and an explicit inverse-CDF draw: one uniform per sequence per step
        z = logits[:, -1, :].astype(np.float64) / temperature
        p = np.exp(z - z.max(axis=-1, keepdims=True))
        cdf = np.cumsum(p, axis=-1)  # (batch, vocab)
        for i, rng in enumerate(generators):
            u = rng.random() * cdf[i, -1]
            ids[i, t] = min(int(np.searchsorted(cdf[i], u, side="right")), cdf.shape[1] - 1)
    return ids
