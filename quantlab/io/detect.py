"""Pick the reader from what the path is, never from a guess that could load the wrong thing.

Path kinds, checked in this order::

    folder with config.json     safetensors present -> Hugging Face; else pickles (--allow-pickle)
    file starting b"GGUF"       GGUF (a *.gguf without the magic is an error)
    file starting "ak42" magic  llama2.c version 1 or 2
    zip or pickle opcodes       PyTorch pickle beside a config.json (--allow-pickle)
    other *.bin                 llama2.c legacy version 0 (the exact size check decides)
    any other file              llama2.c legacy version 0 if its header predicts its exact size
    *.safetensors               the Hugging Face folder it sits in
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from quantlab.errors import InputError
from quantlab.io.spec import Checkpoint

GGUF_MAGIC = b"GGUF"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_PROTOCOL = 0x80  # legacy torch.save files start with a pickle PROTO opcode
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


def detect_format(path: str | os.PathLike) -> str:
    """One of "hf-safetensors", "torch-pickle", "gguf", "llama2c"; InputError when none fits."""
    from quantlab.io.llama2c import MAGIC

    path = Path(path)
    if not path.exists():
        raise InputError(path, None, "no such file or directory")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(path, "config.json", "a checkpoint folder needs a Hugging Face config.json")
        if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
            return "hf-safetensors"
        if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
            return "torch-pickle"
        raise InputError(path, "model.safetensors", "no safetensors or PyTorch weights beside config.json")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == GGUF_MAGIC:
        return "gguf"
    if path.suffix == ".gguf":
        raise InputError(path, "magic", f"a .gguf file must start with b'GGUF', found {head[:4]!r}")
    if path.suffix == ".safetensors":
        if not (path.parent / "config.json").is_file():
            raise InputError(path.parent, "config.json", "a safetensors checkpoint needs config.json beside it")
        return "hf-safetensors"
    if len(head) >= 4 and struct.unpack("<I", head[:4])[0] == MAGIC:
        return "llama2c"
    if head[:4] == ZIP_MAGIC or (head and head[0] == PICKLE_PROTOCOL):
        return "torch-pickle"
    if path.suffix == ".bin" or _is_legacy_llama2c(path):
        return "llama2c"
    raise InputError(path, None, "unknown checkpoint format (expected a HF folder, .gguf, llama2.c .bin or .pt)")


def _is_legacy_llama2c(path: Path) -> bool:
    from quantlab.io.llama2c import expected_size, read_header

    try:
        header = read_header(path, path.stat().st_size)
    except InputError:
        return False
    return header.version == 0 and expected_size(header) == path.stat().st_size


def load_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False, tokenizer_path=None) -> Checkpoint:
    """Validate ``path`` and return its Checkpoint; tensors stay on disk until loaded."""
    fmt = detect_format(path)
    path = Path(path)
    if fmt == "hf-safetensors":
        from quantlab.io.hf import load_hf_folder

        return load_hf_folder(path if path.is_dir() else path.parent, tokenizer_path=tokenizer_path)
    if fmt == "gguf":
        from quantlab.io.gguf_reader import load_gguf

        return load_gguf(path, tokenizer_path=tokenizer_path)
    if fmt == "llama2c":
        from quantlab.io.llama2c import load_llama2c

        return load_llama2c(path, tokenizer_path=tokenizer_path)
    from quantlab.io.torch_pickle import load_torch_pickle

    return load_torch_pickle(path, allow_pickle=allow_pickle, tokenizer_path=tokenizer_path)
