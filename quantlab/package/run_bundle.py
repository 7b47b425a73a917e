"""Run a quantlab bundle with nothing but onnxruntime, numpy and tokenizers: greedy generation.

This file is copied into every bundle and imports nothing from quantlab (nor torch), so
``python -I run_bundle.py BUNDLE --json`` proves the bundle is self-contained. It prints one JSON
object: the prompt ids, the generated ids and their text.

The cache: every graph input other than input_ids / attention_mask / position_ids is a cache tensor
``past_key_values.*`` (batch, kv_heads, seq, d), fed back from the output named ``present.*``.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int64)": np.int64,
}
_FIXED_INPUTS = ("input_ids", "attention_mask", "position_ids")


def llama2c_pieces(path: Path) -> list[bytes]:
    """llama2.c tokenizer.bin: int32 max_len, then per token float32 score, int32 length, bytes."""
    data = path.read_bytes()
    pieces, offset = [], 4
    while offset < len(data):
        _score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        pieces.append(data[offset : offset + length])
        offset += length
    return pieces


class BundleTokenizer:
    def __init__(self, folder: Path):
        self.hf = None
        self.pieces = None
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self.hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "tokenizer.bin").is_file():
            self.pieces = llama2c_pieces(folder / "tokenizer.bin")

    def encode(self, text: str) -> list[int]:
        if self.hf is None:
            raise SystemExit("run_bundle: this bundle's tokenizer cannot encode text; pass --prompt-ids")
        return list(self.hf.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=False)
        if self.pieces is None:
            return ""
        out = b""
        for i in ids:
            piece = self.pieces[i] if 0 <= i < len(self.pieces) else b""
            if piece.startswith(b"<0x") and piece.endswith(b">") and len(piece) == 6:
                piece = bytes([int(piece[3:5], 16)])
            out += piece
        return out.decode("utf-8", errors="replace")


def greedy(folder: Path, model_file: str, prompt_ids: list[int], max_new_tokens: int, threads: int) -> list[int]:
    cfg = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]
    eos = cfg.get("eos_token_id", [])
    stop = set(eos if isinstance(eos, list) else [eos])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(folder / model_file), sess_options=opts, providers=["CPUExecutionProvider"])
    cache_inputs = [i for i in session.get_inputs() if i.name not in _FIXED_INPUTS]
    heads = int(cfg["decoder"]["num_key_value_heads"])
    head_size = int(cfg["decoder"]["head_size"])
    cache = {
        # (batch, kv_heads, seq, d): empty before the first token
        i.name: np.zeros(
            (1, heads, 0, i.shape[3] if isinstance(i.shape[3], int) else head_size),
            dtype=_ORT_TYPES.get(i.type, np.float32),
        )
        for i in cache_inputs
    }
    present = {name: "present" + name[len("past_key_values") :] for name in cache}
    output_names = [o.name for o in session.get_outputs()]
    input_names = {i.name for i in session.get_inputs()}
    tokens = np.asarray([prompt_ids], dtype=np.int64)  # (1, seq)
    past, generated = 0, []
    for _ in range(max_new_tokens):
        seq = tokens.shape[1]
        feeds = {
            "input_ids": tokens,
            "attention_mask": np.ones((1, past + seq), dtype=np.int64),
            "position_ids": np.arange(past, past + seq, dtype=np.int64)[None, :],
            **cache,
        }
        feeds = {k: v for k, v in feeds.items() if k in input_names}
        outputs = dict(zip(output_names, session.run(output_names, feeds), strict=True))
        cache = {name: outputs[present[name]] for name in cache}
        past += seq
        next_id = int(np.argmax(outputs["logits"][0, -1]))
        generated.append(next_id)
        if next_id in stop:
            break
        tokens = np.asarray([[next_id]], dtype=np.int64)
    return generated


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", nargs="?", default=str(Path(__file__).resolve().parent))
    p.add_argument("--model", default=None, help="model file in the bundle (default: the manifest's)")
    p.add_argument("--prompt", default=None, help="prompt text (HF tokenizers)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated prompt ids")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    folder = Path(args.bundle)
    manifest_path = folder / "manifest.json"  # absent while quantlab package records the ids
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    check = manifest.get("generation", {})
    tokenizer = BundleTokenizer(folder)
    if args.prompt_ids is not None:
        prompt_ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    elif args.prompt is not None:
        prompt_ids = tokenizer.encode(args.prompt)
    elif check.get("prompt") is not None:
        prompt_ids = tokenizer.encode(check["prompt"])
    else:
        prompt_ids = list(check.get("prompt_ids", [1]))
    model_file = args.model or manifest.get("model_file", "model.onnx")
    max_new = args.max_new_tokens or int(check.get("max_new_tokens", 16))
    ids = greedy(folder, model_file, prompt_ids, max_new, args.threads)
    loaded = sorted(m for m in ("quantlab", "torch") if m in sys.modules)
    result = {"prompt_ids": prompt_ids, "ids": ids, "text": tokenizer.decode(ids), "foreign_modules": loaded}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
