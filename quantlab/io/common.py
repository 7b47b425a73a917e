"""Checks and helpers shared by the checkpoint readers.

The shape check is table driven: every canonical tensor names, per dimension, the symbol that sizes
it (``vocab``, ``hidden``, ...). A reader passes the name of the header or config field behind each
symbol, so a contradiction is reported against the field the user has to fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from quantlab.errors import InputError
from quantlab.io.spec import ModelSpec, TokenizerSpec

logger = logging.getLogger(__name__)

# Canonical tensor name (regex on the part after "model.layers.{i}." or the full name) -> dimension symbols.
_DIM_SYMBOLS: tuple[tuple[re.Pattern[str], tuple[str, ...]], ...] = tuple(
    (re.compile(pattern + "$"), symbols)
    for pattern, symbols in (
        (r"model\.embed_tokens\.weight", ("vocab", "hidden")),
        (r"lm_head\.weight", ("vocab", "hidden")),
        (r".*(input|post_attention|pre_feedforward|post_feedforward)_layernorm\.(weight|bias)", ("hidden",)),
        (r"model\.norm\.(weight|bias)", ("hidden",)),
        (r".*self_attn\.q_proj\.weight", ("q", "hidden")),
        (r".*self_attn\.[kv]_proj\.weight", ("kv", "hidden")),
        (r".*self_attn\.o_proj\.weight", ("hidden", "q")),
        (r".*self_attn\.q_proj\.bias", ("q",)),
        (r".*self_attn\.[kv]_proj\.bias", ("kv",)),
        (r".*self_attn\.[qk]_norm\.weight", ("head_dim",)),
        (r".*mlp\.gate\.weight", ("experts", "hidden")),
        (r".*mlp\.experts\.\d+\.(gate_proj|up_proj)\.weight", ("moe_ff", "hidden")),
        (r".*mlp\.experts\.\d+\.down_proj\.weight", ("hidden", "moe_ff")),
        (r".*mlp\.(gate_proj|up_proj)\.weight", ("ff", "hidden")),
        (r".*mlp\.down_proj\.weight", ("hidden", "ff")),
    )
)

# Field names of a Hugging Face config.json for each dimension symbol.
HF_FIELDS = {
    "vocab": "vocab_size",
    "hidden": "hidden_size",
    "q": "num_attention_heads",
    "kv": "num_key_value_heads",
    "head_dim": "head_dim",
    "ff": "intermediate_size",
    "experts": "num_experts",
    "moe_ff": "moe_intermediate_size",
}

MAX_DIM = 1 << 24  # no real decoder has a dimension this large; bigger means a corrupt header
MAX_JSON_BYTES = 16 << 20  # config.json, generation_config.json, index files: kilobytes in practice


def check_finite(array: np.ndarray, path, name: str) -> np.ndarray:
    """Refuse a tensor holding NaN or Inf: it would poison every calibration statistic and output.

    Checked in slices (a 1 GB embedding table needs no 256 MB mask); only a failing tensor is
    scanned whole, for the count and the first index."""
    flat = array.reshape(-1)
    step = 1 << 22
    if all(np.isfinite(flat[i : i + step]).all() for i in range(0, flat.size, step)):
        return array
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        first = np.unravel_index(int(np.argmin(finite.reshape(-1))), array.shape) if array.ndim else ()
        raise InputError(
            path, name, f"{bad} of {array.size} values are NaN or Inf (first at index {list(map(int, first))})"
        )
    return array


def _no_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def read_json_file(path: str | os.PathLike, *, max_bytes: int = MAX_JSON_BYTES):
    """A small JSON file, strictly: size capped, duplicate keys and runaway nesting are input errors."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(path, None, f"{size} bytes is more than the {max_bytes}-byte cap for this file")
    try:
        return json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as e:
        raise InputError(path, None, f"not valid JSON (not UTF-8 at byte {e.start})") from None
    except RecursionError:
        raise InputError(path, None, "not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError is a ValueError, and so is a duplicate key
        raise InputError(path, None, f"not valid JSON ({e})") from None


def _symbols(name: str) -> tuple[str, ...] | None:
    for pattern, symbols in _DIM_SYMBOLS:
        if pattern.match(name):
            return symbols
    return None


def check_tensor_shapes(
    spec: ModelSpec,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    config_path: str | os.PathLike,
    fields: Mapping[str, str],
    weights_path: str | os.PathLike,
) -> list[str]:
    """Check every tensor ``spec`` needs against the file's shapes; return the names nobody needs.

    A missing tensor is reported against ``weights_path`` and its name; a shape that contradicts
    the spec is reported against ``config_path`` and the field (from ``fields``) behind the first
    dimension that disagrees.
    """
    if spec.num_layers > len(shapes):
        # Each layer needs 9+ tensors: a header claiming millions of layers is refused without building
        # millions of expected names (found by benchmarks/fuzz_parsers.py as a hang).
        first = next(i for i in range(len(shapes) + 1) if f"model.layers.{i}.input_layernorm.weight" not in shapes)
        name = f"model.layers.{first}.input_layernorm.weight"
        raise InputError(weights_path, name, f"missing tensor (the configuration says {spec.num_layers} layers)")
    expected = spec.expected_shapes()
    for name, want in expected.items():
        if name not in shapes:
            raise InputError(weights_path, name, f"missing tensor (the configuration needs shape {list(want)})")
        got = tuple(shapes[name])
        if got == want:
            continue
        symbols = _symbols(name) or ()
        field = "shape"
        if len(got) == len(want):
            for symbol, g, w in zip(symbols, got, want, strict=False):
                if g != w:
                    field = fields.get(symbol, symbol)
                    break
        raise InputError(
            config_path,
            field,
            f"the configuration implies {name} has shape {list(want)} but the weights file has {list(got)}",
        )
    return sorted(set(shapes) - set(expected))


def positive_int(value, path, field: str, *, allow_zero: bool = False) -> int:
    """An int in (0, MAX_DIM] (or [0, MAX_DIM]); bools and floats with a fraction are rejected."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)):
        raise InputError(path, field, f"expected an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise InputError(path, field, f"expected an integer, got {value!r}")
    value = int(value)
    low = 0 if allow_zero else 1
    if not low <= value <= MAX_DIM:
        raise InputError(path, field, f"expected an integer in [{low}, {MAX_DIM}], got {value}")
    return value


def positive_float(value, path, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(path, field, f"expected a number, got {value!r}")
    value = float(value)
    if not (value > 0 and np.isfinite(value)):
        raise InputError(path, field, f"expected a positive finite number, got {value}")
    return value


def check_head_layout(spec_path, *, heads: int, kv_heads: int, head_dim: int, fields: Mapping[str, str]) -> None:
    """Heads must group evenly (GQA) and RoPE needs an even head_dim."""
    if heads % kv_heads:
        raise InputError(spec_path, fields["kv"], f"{heads} attention heads do not split into {kv_heads} KV groups")
    if head_dim % 2:
        raise InputError(spec_path, fields["head_dim"], f"head_dim {head_dim} must be even for rotary embeddings")


def inside_folder(folder: Path, name: str, source: str | os.PathLike, field: str) -> Path:
    """Resolve a file name read from an index file; refuse names that leave ``folder``."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise InputError(source, field, f"invalid file name {name!r}")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise InputError(source, field, f"file name {name!r} is an absolute path; shards must sit beside the index")
    if ".." in re.split(r"[\\/]", name):
        raise InputError(source, field, f"file name {name!r} contains '..'; shards must sit beside the index")
    root = folder.resolve()
    target = (folder / name).resolve()
    if root != target and root not in target.parents:
        raise InputError(source, field, f"file name {name!r} resolves outside {root}")
    if not target.is_file():
        raise InputError(source, field, f"file {name!r} does not exist in {root}")
    return target


def fresh_float32(array: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 array that owns its memory (never a view of a memory map)."""
    if array.dtype == np.float32 and array.flags.c_contiguous and array.flags.owndata and array.flags.writeable:
        return array
    return np.array(array, dtype=np.float32, order="C", copy=True)


def hf_config_for_spec(spec: ModelSpec) -> dict:
    """A minimal Llama ``config.json`` that Hugging Face clients can load for ``spec``."""
    eos = list(spec.eos_token_ids)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "attention_bias": spec.attention_bias,
        "mlp_bias": False,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": "float32",
    }
    if spec.rope_scaling is not None:
        config["rope_scaling"] = {"rope_type": "llama3", **spec.rope_scaling.__dict__}
    return config


def tokenizer_spec_from_file(
    path: str | os.PathLike, *, bos: int | None, eos: tuple[int, ...], chat_template: str | None = None
) -> TokenizerSpec:
    """A TokenizerSpec for a tokenizer file the user named (``--tokenizer``), judged by its suffix."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "tokenizer file not found")
    if path.suffix == ".json":
        return TokenizerSpec(
            kind="hf-json",
            content=path.read_text(encoding="utf-8"),
            chat_template=chat_template,
            bos_token_id=bos,
            eos_token_ids=eos,
        )
    if path.suffix == ".model":
        return TokenizerSpec(
            kind="sentencepiece", path=str(path), chat_template=chat_template, bos_token_id=bos, eos_token_ids=eos
        )
    return TokenizerSpec(
        kind="llama2c", path=str(path), chat_template=chat_template, bos_token_id=bos, eos_token_ids=eos
    )


def with_tokenizer_ids(spec: ModelSpec, tokenizer: TokenizerSpec) -> ModelSpec:
    """The spec's BOS (when config.json has none) and stop ids, completed from the tokenizer's."""
    return dataclasses.replace(
        spec,
        bos_token_id=spec.bos_token_id if spec.bos_token_id is not None else tokenizer.bos_token_id,
        eos_token_ids=tuple(dict.fromkeys((*spec.eos_token_ids, *tokenizer.eos_token_ids))),
    )
