"""Tokenizers for generation: Hugging Face ``tokenizer.json``, llama2.c ``tokenizer.bin``, SentencePiece.

An artifact folder holds the tokenizer files plus ``tokenizer_info.json``::

    {"kind": "hf-json" | "llama2c" | "sentencepiece", "bos_token_id": 1, "eos_token_ids": [2],
     "add_bos_token": false, "chat_template": "...or null"}

:func:`write_tokenizer_files` writes them from a checkpoint's TokenizerSpec and
:func:`load_tokenizer` reads them back.

Chat: templates that use ChatML (``<|im_start|>``), and tokenizers with no template, are rendered
as plain ChatML, ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then
``<|im_start|>assistant\\n``; no default system prompt is injected. Other templates are rendered
with jinja2's sandbox when jinja2 is importable, else as ChatML too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from quantlab.errors import InputError
from quantlab.io.llama2c import read_llama2c_tokenizer
from quantlab.io.spec import TokenizerSpec

logger = logging.getLogger(__name__)

INFO_FILE = "tokenizer_info.json"
KINDS = ("hf-json", "llama2c", "sentencepiece")
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


def render_chatml(messages: list[dict], add_generation_prompt: bool = True) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _render_jinja(template: str, messages: list[dict], add_generation_prompt: bool, bos: str, eos: str) -> str | None:
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
    )


class Tokenizer:
    """Common surface: ids <-> text, stop ids, chat rendering. Subclasses implement the codec."""

    kind = ""

    def __init__(self, bos_token_id, eos_token_ids, chat_template=None, add_bos_token=True):
        self.bos_token_id: int | None = bos_token_id
        self.eos_token_ids: set[int] = set(eos_token_ids)
        self.eos_token_id: int | None = next(iter(eos_token_ids), None)  # the first, for templates
        self.chat_template: str | None = chat_template
        self.add_bos_token: bool = add_bos_token

    @property
    def add_bos_default(self) -> bool:
        """Whether ``encode`` puts BOS first when ``add_bos`` is not given (same as ``add_bos_token``)."""
        return self.add_bos_token

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def token_text(self, token_id: int | None) -> str:
        raise NotImplementedError

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; ``add_bos=None`` follows the tokenizer's own default."""
        add_bos = self.add_bos_token if add_bos is None else add_bos
        ids = self._encode(text)
        return [self.bos_token_id, *ids] if add_bos and self.bos_token_id is not None else ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        template = self.chat_template
        if template and "<|im_start|>" not in template:
            bos, eos = self.token_text(self.bos_token_id), self.token_text(self.eos_token_id)
            text = _render_jinja(template, messages, add_generation_prompt, bos, eos)
            if text is not None:
                return text
            logger.warning("jinja2 is not installed; rendering the chat as ChatML instead of the model's template")
        return render_chatml(messages, add_generation_prompt)

    def encode_chat(self, prompt: str) -> list[int]:
        """Ids of a one-turn user chat, ready for generation; BOS only when the tokenizer adds one itself."""
        ids = self.encode(self.apply_chat_template([{"role": "user", "content": prompt}]), add_bos=False)
        if self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids


class HFJsonTokenizer(Tokenizer):
    kind = "hf-json"

    def __init__(self, content: str, bos_token_id, eos_token_ids, chat_template=None, add_bos_token=None):
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_str(content)
        if add_bos_token is None:  # does the tokenizer's own post-processor put BOS first?
            add_bos_token = bos_token_id is not None and self._tok.encode("a").ids[:1] == [bos_token_id]
        super().__init__(bos_token_id, eos_token_ids, chat_template, add_bos_token)

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token_id) -> str:
        return "" if token_id is None else (self._tok.id_to_token(token_id) or "")


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path, bos_token_id=None, eos_token_ids=(), chat_template=None, add_bos_token=True):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        bos = bos_token_id if bos_token_id is not None else (self._sp.bos_id() if self._sp.bos_id() >= 0 else None)
        eos = tuple(eos_token_ids) or ((self._sp.eos_id(),) if self._sp.eos_id() >= 0 else ())
        super().__init__(bos, eos, chat_template, add_bos_token)

    def _encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_text(self, token_id) -> str:
        return "" if token_id is None else self._sp.id_to_piece(token_id)


class Llama2cTokenizer(Tokenizer):
    """llama2.c ``run.c`` semantics, byte for byte.

    encode: a dummy-prefix " " token (when the text is not empty), then each UTF-8 character's
    token, or its bytes as ``<0xXX>`` tokens (id = byte + 3) when it has none; then repeatedly
    merge the adjacent pair whose concatenation is the vocabulary entry with the highest score
    (the first such pair on ties) until no pair merges.
    decode: concatenate the pieces' bytes; ``<0xXX>`` pieces are raw bytes; the leading space of
    the piece after BOS is dropped; BOS and EOS produce no text.
    """

    kind = "llama2c"

    def __init__(self, path, bos_token_id=1, eos_token_ids=(2,), chat_template=None, add_bos_token=True):
        vocab = read_llama2c_tokenizer(path)
        self.pieces: list[bytes] = vocab.pieces
        self.scores: list[float] = vocab.scores
        self._lookup: dict[bytes, int] = {}
        for token_id, piece in enumerate(self.pieces):
            self._lookup.setdefault(piece, token_id)
        super().__init__(bos_token_id, eos_token_ids, chat_template, add_bos_token)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        add_bos = self.add_bos_token if add_bos is None else add_bos
        ids = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        data = text.encode("utf-8")
        if data and b" " in self._lookup:
            ids.append(self._lookup[b" "])  # the dummy prefix SentencePiece adds
        for char in _utf8_chunks(data):
            token_id = self._lookup.get(char)
            ids.extend([token_id] if token_id is not None else [byte + 3 for byte in char])
        return self._merge(ids)

    def _merge(self, ids: list[int]) -> list[int]:
        while True:
            best_score, best_id, best_index = -1e10, -1, -1
            for i in range(len(ids) - 1):
                token_id = self._lookup.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
                if token_id is not None and self.scores[token_id] > best_score:
                    best_score, best_id, best_index = self.scores[token_id], token_id, i
            if best_index < 0:
                return ids
            ids[best_index : best_index + 2] = [best_id]

    def _piece_bytes(self, prev: int | None, token_id: int) -> bytes:
        piece = self.pieces[token_id]
        if prev == self.bos_token_id and piece.startswith(b" "):
            piece = piece[1:]
        match = _BYTE_PIECE.fullmatch(piece)
        return bytes([int(match.group(1), 16)]) if match else piece

    def decode(self, ids) -> str:
        out, prev = bytearray(), None
        for token_id in ids:
            token_id = int(token_id)
            if token_id != self.bos_token_id and token_id not in self.eos_token_ids:
                out += self._piece_bytes(prev, token_id)
            prev = token_id
        return out.decode("utf-8", errors="replace")

    def token_text(self, token_id) -> str:
        return "" if token_id is None else self.pieces[token_id].decode("utf-8", errors="replace")


def _utf8_chunks(data: bytes):
    """Split UTF-8 bytes into characters the way run.c does: a lead byte plus up to 3 continuation bytes."""
    start = 0
    for i in range(1, len(data) + 1):
        if i == len(data) or (data[i] & 0xC0) != 0x80 or i - start >= 4:
            yield data[start:i]
            start = i


def tokenizer_from_spec(spec: TokenizerSpec) -> Tokenizer:
    """A Tokenizer straight from a checkpoint's TokenizerSpec (no artifact folder needed)."""
    eos = spec.eos_token_ids
    if spec.kind == "hf-json":
        return HFJsonTokenizer(spec.content, spec.bos_token_id, eos, spec.chat_template)
    if spec.kind == "llama2c":
        return Llama2cTokenizer(spec.path, spec.bos_token_id, eos, spec.chat_template)
    if spec.kind == "sentencepiece":
        return SentencePieceTokenizer(spec.path, spec.bos_token_id, eos, spec.chat_template)
    raise ValueError(f"unknown tokenizer kind {spec.kind!r}")


def write_tokenizer_files(tok_spec: TokenizerSpec, dest_dir: str | os.PathLike) -> list[str]:
    """Write the tokenizer into an artifact folder; returns the file names written."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_from_spec(tok_spec)
    add_bos = tok.add_bos_token
    written = []
    if tok_spec.kind == "hf-json":
        (dest / "tokenizer.json").write_text(tok_spec.content, encoding="utf-8")
        config = _source_tokenizer_config(tok_spec)
        config.pop("auto_map", None)
        bos_text, eos_text = tok.token_text(tok.bos_token_id), tok.token_text(tok.eos_token_id)
        config.update({"bos_token": bos_text or None, "eos_token": eos_text or None, "add_bos_token": add_bos})
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        if tok_spec.chat_template is not None:
            config["chat_template"] = tok_spec.chat_template
        (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        written += ["tokenizer.json", "tokenizer_config.json"]
    elif tok_spec.kind == "llama2c":
        shutil.copyfile(tok_spec.path, dest / "tokenizer.bin")
        written.append("tokenizer.bin")
        models = [p for p in tok_spec.extra_files if p.endswith(".model")]
        if models:
            shutil.copyfile(models[0], dest / "tokenizer.model")
            written.append("tokenizer.model")
    elif tok_spec.kind == "sentencepiece":
        shutil.copyfile(tok_spec.path, dest / "tokenizer.model")
        written.append("tokenizer.model")
    else:
        raise ValueError(f"unknown tokenizer kind {tok_spec.kind!r}")
    info = {
        "kind": tok_spec.kind,
        "bos_token_id": tok_spec.bos_token_id,
        "eos_token_ids": list(tok_spec.eos_token_ids),
        "add_bos_token": add_bos,
        "chat_template": tok_spec.chat_template,
    }
    (dest / INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
    return [*written, INFO_FILE]


def _source_tokenizer_config(tok_spec: TokenizerSpec) -> dict:
    for extra in tok_spec.extra_files:
        if Path(extra).name == "tokenizer_config.json" and Path(extra).is_file():
            value = json.loads(Path(extra).read_text(encoding="utf-8"))
            return value if isinstance(value, dict) else {}
    return {}


def load_tokenizer(artifact_dir: str | os.PathLike) -> Tokenizer:
    """Rebuild the tokenizer written by :func:`write_tokenizer_files`."""
    folder = Path(artifact_dir)
    info_path = folder / INFO_FILE
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(info_path, None, "not found: the artifact has no tokenizer") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(info_path, None, f"not valid JSON ({e})") from None
    kind = info.get("kind") if isinstance(info, dict) else None
    if kind not in KINDS:
        raise InputError(info_path, "kind", f"expected one of {KINDS}, got {kind!r}")
    args = (info.get("bos_token_id"), tuple(info.get("eos_token_ids") or ()), info.get("chat_template"))
    add_bos = info.get("add_bos_token")
    if kind == "hf-json":
        content = (folder / "tokenizer.json").read_text(encoding="utf-8")
        return HFJsonTokenizer(content, *args, add_bos_token=add_bos)
    default = True if add_bos is None else add_bos
    if kind == "llama2c":
        return Llama2cTokenizer(folder / "tokenizer.bin", *args, add_bos_token=default)
    return SentencePieceTokenizer(folder / "tokenizer.model", *args, add_bos_token=default)
