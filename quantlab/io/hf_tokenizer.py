"""The tokenizer of a Hugging Face checkpoint folder.

``tokenizer.json`` is used as is (kind ``hf-json``); the chat template comes from
``tokenizer_config.json`` or ``chat_template.jinja``; stop tokens are the union of config.json,
generation_config.json and tokenizer_config.json's ``eos_token``, plus ``<|im_end|>`` for ChatML.
A folder with only a SentencePiece ``tokenizer.model`` gives kind ``sentencepiece``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from quantlab.errors import InputError
from quantlab.io.common import read_json_file, tokenizer_spec_from_file
from quantlab.io.spec import ModelSpec, TokenizerSpec

logger = logging.getLogger(__name__)

CHATML_END = "<|im_end|>"


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    value = read_json_file(path)
    if not isinstance(value, dict):
        raise InputError(path, None, "must hold a JSON object")
    return value


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def chat_template_of(folder: Path, tok_config: dict | None) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = (tok_config or {}).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise InputError(folder / "tokenizer_config.json", "chat_template", "must be a string")
    return template


def stop_ids_for_template(template: str | None, token_to_id: Callable[[str], int | None]) -> tuple[int, ...]:
    """ChatML models end a turn with ``<|im_end|>``: make it a stop token when the template uses it."""
    if template and CHATML_END in template:
        token_id = token_to_id(CHATML_END)
        if token_id is not None:
            return (token_id,)
    return ()


def _ids(value) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    return tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool))


def hf_tokenizer_spec(
    folder: str | os.PathLike, spec: ModelSpec, *, tokenizer_path: str | os.PathLike | None = None
) -> TokenizerSpec | None:
    folder = Path(folder)
    tok_config_path = folder / "tokenizer_config.json"
    tok_config = _read_json(tok_config_path)
    template = chat_template_of(folder, tok_config)
    generation = _read_json(folder / "generation_config.json") or {}
    if tokenizer_path is not None:
        return tokenizer_spec_from_file(
            tokenizer_path, bos=spec.bos_token_id, eos=spec.eos_token_ids, chat_template=template
        )
    tok_json = folder / "tokenizer.json"
    sp_model = folder / "tokenizer.model"
    if tok_json.is_file():
        import tokenizers

        try:
            content = tok_json.read_bytes().decode("utf-8")
            tok = tokenizers.Tokenizer.from_str(content)
        except Exception as e:  # the Rust error types are not exported
            raise InputError(tok_json, None, f"not a valid tokenizer.json ({e})") from None
        lookup = tok.token_to_id
        kind, extra = "hf-json", (str(tok_config_path),) if tok_config is not None else ()
    elif sp_model.is_file():
        import sentencepiece

        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
        except Exception as e:  # sentencepiece raises OSError or RuntimeError depending on the build
            raise InputError(sp_model, None, f"not a valid SentencePiece model ({e})") from None

        def lookup(text: str) -> int | None:
            token_id = sp.piece_to_id(text)
            return None if token_id == sp.unk_id() and text != sp.id_to_piece(token_id) else token_id

        kind, content, extra = "sentencepiece", None, ()
    else:
        logger.warning("%s: no tokenizer.json or tokenizer.model; the artifact will have no tokenizer", folder)
        return None
    cfg = tok_config or {}
    bos = spec.bos_token_id
    if bos is None and _token_text(cfg.get("bos_token")) is not None:
        bos = lookup(_token_text(cfg["bos_token"]))
    eos = [*spec.eos_token_ids, *_ids(generation.get("eos_token_id"))]
    if _token_text(cfg.get("eos_token")) is not None and lookup(_token_text(cfg["eos_token"])) is not None:
        eos.append(lookup(_token_text(cfg["eos_token"])))
    eos.extend(stop_ids_for_template(template, lookup))
    return TokenizerSpec(
        kind=kind,
        content=content,
        path=str(sp_model) if kind == "sentencepiece" else None,
        chat_template=template,
        bos_token_id=bos,
        eos_token_ids=tuple(dict.fromkeys(eos)),
        extra_files=extra,
    )
