"""Rebuild a Hugging Face ``tokenizer.json`` from a GGUF file's ``tokenizer.ggml.*`` metadata.

Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are supported. The
pre-tokenizer is chosen by ``tokenizer.ggml.pre`` from :data:`PRE_TOKENIZERS`, which mirrors the
pre-tokenizers of the Hugging Face tokenizers llama.cpp's converter recognised. Control and
unknown tokens become special added tokens; user-defined tokens become plain added tokens.
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


def _post_processor(add_bos: bool, bos_id: int | None, bos_text: str | None) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    if not add_bos or bos_id is None:
        return byte_level
    special = {"SpecialToken": {"id": bos_text, "type_id": 0}}
    template = {
        "type": "TemplateProcessing",
        "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [special, {"Sequence": {"id": "A", "type_id": 0}}, special, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos_text: {"id": bos_text, "ids": [bos_id], "tokens": [bos_text]}},
    }
    return {"type": "Sequence", "processors": [byte_level, template]}


def gguf_tokenizer_spec(fields: dict, path: str | os.PathLike) -> TokenizerSpec:
    """A ``hf-json`` TokenizerSpec from the reader's fields (``GGUFReader.fields``)."""
    model = _field(fields, "tokenizer.ggml.model", path, required=True)
    if model != "gpt2":
        raise InputError(
            path,
            "tokenizer.ggml.model",
            f"only byte-level BPE ('gpt2') vocabularies can be rebuilt, got {model!r}; "
            "pass --tokenizer with the model's tokenizer.json or tokenizer.model",
        )
    pre = _field(fields, "tokenizer.ggml.pre", path, "default")
    if pre not in PRE_TOKENIZERS:
        raise InputError(path, "tokenizer.ggml.pre", f"unknown pre-tokenizer {pre!r}; known: {sorted(PRE_TOKENIZERS)}")
    tokens = _field(fields, "tokenizer.ggml.tokens", path, required=True)
    types = _field(fields, "tokenizer.ggml.token_type", path, [1] * len(tokens))
    merges = _field(fields, "tokenizer.ggml.merges", path, required=True)
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
    pairs = []
    for merge in merges:
        parts = merge.split(" ") if isinstance(merge, str) else ()
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab:
            raise InputError(path, "tokenizer.ggml.merges", f"malformed merge {merge!r}")
        pairs.append(parts)

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
    steps, ignore_merges = PRE_TOKENIZERS[pre]
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps},
        "post_processor": _post_processor(add_bos, bos, None if bos is None else tokens[bos]),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": pairs,
        },
    }
    return TokenizerSpec(
        kind="hf-json",
        content=json.dumps(document, ensure_ascii=False),
        chat_template=template,
        bos_token_id=bos,
        eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
    )
