"""Rebuild a Hugging Face ``tokenizer.json`` from a GGUF file's ``tokenizer.ggml.*`` metadata.

Two vocabularies are supported:

- byte-level BPE (``tokenizer.ggml.model == "gpt2"``): the file's merges; the pre-tokenizer is chosen by
  ``tokenizer.ggml.pre`` from :data:`PRE_TOKENIZERS`, which mirrors the pre-tokenizers of the Hugging Face
  tokenizers llama.cpp's converter recognised;
- SentencePiece BPE (``"llama"``: Llama 2, Gemma): the file has pieces and scores but no merges. llama.cpp
  tokenizes such a vocabulary by repeatedly joining the adjacent pair whose joined text is the
  highest-scoring token; a BPE whose merges are every split of every token into two tokens, ranked by the
  joined token's score (:func:`spm_merges`), makes the same choices except between two different pairs
  that join to the same token (llama.cpp takes the leftmost, this the pair of lower ids). Spaces become
  ``▁`` (with one prepended when ``tokenizer.ggml.add_space_prefix``), unknown characters fall back to
  ``<0xXX>`` bytes. tests/io/test_gemma3_270m.py holds Gemma 3's rebuilt tokenizer to llama.cpp's.

Control and unknown tokens become special added tokens; user-defined tokens become plain added tokens
(llama.cpp matches user-defined tokens whole before the BPE runs, and control tokens too when asked to
parse special tokens, as Hugging Face's added tokens are matched).
"""

from __future__ import annotations

import json
import os

from quantlab.errors import InputError
from quantlab.io.hf_tokenizer import stop_ids_for_template
from quantlab.io.spec import TokenizerSpec

# llama.cpp token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
SPECIAL_TOKEN_TYPES = (2, 3)
USER_DEFINED_TOKEN_TYPE = 4
BYTE_TOKEN_TYPE = 6

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> (pre-tokenizer steps, BPE ignore_merges) of the original tokenizer.json
PRE_TOKENIZERS: dict[str, tuple[list[dict], bool]] = {
    "default": ([_BYTE_LEVEL], False),
    "gpt-2": ([_BYTE_LEVEL], False),
    "smollm": ([{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL], False),
    "llama-bpe": (
        [
            {"type": "Split", "pattern": {"Regex": _LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
            {**_BYTE_LEVEL, "use_regex": False},
        ],
        True,
    ),
}


def _field(fields: dict, key: str, path, default=None, *, required: bool = False):
    if key not in fields:
        if required:
            raise InputError(path, key, "missing (needed to rebuild the tokenizer)")
        return default
    try:
        return fields[key].contents()
    except Exception as e:  # a malformed field: gguf raises ValueError/IndexError/UnicodeDecodeError
        raise InputError(path, key, f"unreadable value ({e})") from None


def _post_processor(first: dict | None, add_bos: bool, bos_id: int | None, bos_text: str | None) -> dict | None:
    """``first`` (the byte-level offsets fix, or None), then the BOS template when the file adds one."""
    if not add_bos or bos_id is None:
        return first
    special = {"SpecialToken": {"id": bos_text, "type_id": 0}}
    template = {
        "type": "TemplateProcessing",
        "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [special, {"Sequence": {"id": "A", "type_id": 0}}, special, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos_text: {"id": bos_text, "ids": [bos_id], "tokens": [bos_text]}},
    }
    return template if first is None else {"type": "Sequence", "processors": [first, template]}


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[list[str]]:
    """The merges of a SentencePiece BPE vocabulary: each split of a token into two tokens, best joined
    token first (higher score, then lower id), ties within one token by the pieces' ids. Byte tokens
    (``<0x41>``) are spellings, not text, and take no part."""
    vocab = {token: i for i, token in enumerate(tokens) if types[i] != BYTE_TOKEN_TYPE}
    ranked = []
    for token, token_id in vocab.items():
        for cut in range(1, len(token)):
            left, right = vocab.get(token[:cut]), vocab.get(token[cut:])
            if left is not None and right is not None:
                ranked.append((-scores[token_id], token_id, left, right))
    ranked.sort()
    return [[tokens[left], tokens[right]] for _, _, left, right in ranked]


def _token_list(fields: dict, path) -> tuple[list[str], list[int], dict[str, int]]:
    tokens = _field(fields, "tokenizer.ggml.tokens", path, required=True)
    types = _field(fields, "tokenizer.ggml.token_type", path, [1] * len(tokens))
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise InputError(path, "tokenizer.ggml.tokens", "must be a non-empty list of strings")
    if len(types) != len(tokens):
        raise InputError(path, "tokenizer.ggml.token_type", f"{len(types)} entries for {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        if vocab.setdefault(token, token_id) != token_id:
            raise InputError(
                path, "tokenizer.ggml.tokens", f"token {token!r} appears twice (ids {vocab[token]}, {token_id})"
            )
    return tokens, types, vocab


def _byte_level_parts(fields: dict, path, tokens: list[str], vocab: dict[str, int]) -> dict:
    """The document parts of a byte-level BPE (``gpt2``) vocabulary."""
    pre = _field(fields, "tokenizer.ggml.pre", path, "default")
    if pre not in PRE_TOKENIZERS:
        raise InputError(path, "tokenizer.ggml.pre", f"unknown pre-tokenizer {pre!r}; known: {sorted(PRE_TOKENIZERS)}")
    pairs = []
    for merge in _field(fields, "tokenizer.ggml.merges", path, required=True):
        parts = merge.split(" ") if isinstance(merge, str) else ()
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab:
            raise InputError(path, "tokenizer.ggml.merges", f"malformed merge {merge!r}")
        pairs.append(parts)
    steps, ignore_merges = PRE_TOKENIZERS[pre]
    return {
        "normalizer": None,
        "pre_tokenizer": steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"unk_token": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges},
        "merges": pairs,
        "after_bos": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
    }


def _sentencepiece_parts(fields: dict, path, tokens: list[str], types: list[int]) -> dict:
    """The document parts of a SentencePiece BPE (``llama``) vocabulary, merges rebuilt from the scores."""
    scores = _field(fields, "tokenizer.ggml.scores", path, required=True)
    if len(scores) != len(tokens) or not all(isinstance(x, (int, float)) for x in scores):
        raise InputError(path, "tokenizer.ggml.scores", f"expected {len(tokens)} numbers")
    unk = _field(fields, "tokenizer.ggml.unknown_token_id", path)
    if unk is not None and not (isinstance(unk, int) and 0 <= unk < len(tokens)):
        raise InputError(path, "tokenizer.ggml.unknown_token_id", f"token id {unk!r} outside the vocabulary")
    space = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    prefix = bool(_field(fields, "tokenizer.ggml.add_space_prefix", path, True))
    normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, space]}
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}]
    decoders.append({"type": "Fuse"})
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "normalizer": normalizer if prefix else space,
        "pre_tokenizer": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "unk_token": None if unk is None else tokens[unk],
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
        },
        "merges": spm_merges(tokens, scores, types),
        "after_bos": None,
    }


def gguf_tokenizer_spec(fields: dict, path: str | os.PathLike) -> TokenizerSpec:
    """A ``hf-json`` TokenizerSpec from the reader's fields (``GGUFReader.fields``)."""
    model = _field(fields, "tokenizer.ggml.model", path, required=True)
    if model not in ("gpt2", "llama"):
        raise InputError(
            path,
            "tokenizer.ggml.model",
            f"only byte-level BPE ('gpt2') and SentencePiece BPE ('llama') vocabularies can be rebuilt, got "
            f"{model!r}; pass --tokenizer with the model's tokenizer.json or tokenizer.model",
        )
    tokens, types, vocab = _token_list(fields, path)
    if model == "gpt2":
        parts = _byte_level_parts(fields, path, tokens, vocab)
    else:
        parts = _sentencepiece_parts(fields, path, tokens, types)

    def token_id_field(key: str) -> int | None:
        value = _field(fields, key, path)
        if value is None:
            return None
        if not isinstance(value, int) or not 0 <= value < len(tokens):
            raise InputError(path, key, f"token id {value!r} outside the vocabulary of {len(tokens)}")
        return value

    bos = token_id_field("tokenizer.ggml.bos_token_id")
    eos = [token_id_field(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    eos += [token_id_field("tokenizer.ggml.eom_token_id")]
    add_bos = bool(_field(fields, "tokenizer.ggml.add_bos_token", path, True))
    template = _field(fields, "tokenizer.chat_template", path)
    eos += stop_ids_for_template(template, vocab.get)
    added = [
        {
            "id": token_id,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind in SPECIAL_TOKEN_TYPES,
        }
        for token_id, (token, kind) in enumerate(zip(tokens, types, strict=True))
        if kind in SPECIAL_TOKEN_TYPES or kind == USER_DEFINED_TOKEN_TYPE
    ]
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": parts["normalizer"],
        "pre_tokenizer": parts["pre_tokenizer"],
        "post_processor": _post_processor(parts["after_bos"], add_bos, bos, None if bos is None else tokens[bos]),
        "decoder": parts["decoder"],
        "model": {
            "type": "BPE",
            "dropout": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            **parts["model"],
            "vocab": vocab,
            "merges": parts["merges"],
        },
    }
    return TokenizerSpec(
        kind="hf-json",
        content=json.dumps(document, ensure_ascii=False),
        chat_template=template,
        bos_token_id=bos,
        eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
    )
