"""Recipes: what to do to a model, as one frozen value that round-trips to a file.

A recipe is a built-in name (``w4a16-g128-awq``, ``w8a16-g128``, ``w8a8-smoothquant``, ``fp16``) or a
TOML/YAML file with a strict schema (unknown keys are errors):

    scheme = "w4a16-g128-asym"       # the default for every linear
    method = "gptq"                  # rtn | gptq | awq | smoothquant (or spelled in the scheme)
    format = "matmulnbits"           # matmulnbits (com.microsoft) | qdq (standard DequantizeLinear + MatMul)
    accuracy_level = 4               # MatMulNBits compute: 0 as the input type, 4 int8 activations
    lm_head = "w8a16-g128-asym"      # or "none" to keep the head in full precision
    embedding = "w8a16-g64-asym"     # the token embedding table, or "none"
    kv_cache = "int8"                # the KV cache: fp32 | int8 | int4-g32 | kivi2 ... (graph_builder.kv_cache)
    keep_source = false              # true (no scheme): a GGUF's own quantized codes as they are (--recipe source)

    [[override]]                     # first match wins; patterns are fnmatch on linear names
    pattern = "model.layers.*.mlp.down_proj"
    scheme = "w4a16-g32-asym"
    [[override]]
    pattern = "model.layers.0.*"
    skip = true

    [calibration]
    samples = 128
    seq_len = 512
    seed = 0

    [gptq]
    damp = 0.01
    act_order = true

    [awq]
    grid = 20
    clip = true

    [smoothquant]
    alpha = 0.5

Linear names are ``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``model.layers.{i}.mlp.{gate,up,down}_proj``
and ``lm_head``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from quantlab.errors import InputError
from quantlab.graph_builder.kv_cache import parse_kv_cache
from quantlab.quant.scheme import QuantScheme, parse_scheme

FORMATS = ("matmulnbits", "qdq")
METHODS = ("rtn", "gptq", "awq", "smoothquant")
FLOAT_RECIPES = {"fp32": "fp32", "fp16": "fp16"}
# --recipe source: keep a GGUF's own quantization (Recipe.keep_source)
SOURCE_RECIPE = "source"


@dataclass(frozen=True)
class Override:
    pattern: str
    scheme: QuantScheme | None  # None: keep this linear in full precision


@dataclass(frozen=True)
class CalibrationConfig:
    samples: int = 128
    seq_len: int = 512
    seed: int = 0


@dataclass(frozen=True)
class GptqOptions:
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    # True: each layer calibrates on the previous layers' quantized outputs (one more forward per layer).
    sequential: bool = True


@dataclass(frozen=True)
class AwqOptions:
    grid: int = 20
    clip: bool = True


@dataclass(frozen=True)
class SmoothQuantOptions:
    alpha: float = 0.5


@dataclass(frozen=True)
class Recipe:
    name: str
    scheme: QuantScheme | None = None  # None: no weight quantization
    weight_dtype: str = "fp32"  # storage of what stays in float
    format: str = "matmulnbits"
    accuracy_level: int = 4
    lm_head: QuantScheme | None = field(default_factory=lambda: parse_scheme("w8a16-g128-asym"))
    # the token embedding table (GatherBlockQuantized); only when the recipe quantizes at all
    embedding: QuantScheme | None = field(default_factory=lambda: parse_scheme("w8a16-g64-asym"))
    overrides: tuple[Override, ...] = ()
    kv_cache: str = "fp32"  # a KvCacheFormat spelling, canonical (str(parse_kv_cache(...)))
    calibration: CalibrationConfig = CalibrationConfig()
    gptq: GptqOptions = GptqOptions()
    awq: AwqOptions = AwqOptions()
    smoothquant: SmoothQuantOptions = SmoothQuantOptions()
    # emit the checkpoint's own quantized codes (a GGUF's blocks) as they are; see passes/keep_source_quantization.py
    keep_source: bool = False

    @property
    def method(self) -> str:
        return self.scheme.method if self.scheme else "none"

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq", "smoothquant")

    def scheme_for(self, linear: str) -> QuantScheme | None:
        """The scheme for one linear (None: leave it in full precision)."""
        for o in self.overrides:
            if fnmatch.fnmatchcase(linear, o.pattern):
                return o.scheme
        if self.scheme is None:
            return None
        if linear == "lm_head":
            return self.lm_head
        return self.scheme

    def to_dict(self) -> dict:
        """The recipe in the file schema: ``recipe_from_dict(r.to_dict()) == r``."""
        d = {
            "name": self.name,
            "weight_dtype": self.weight_dtype,
            "format": self.format,
            "accuracy_level": self.accuracy_level,
            "lm_head": str(self.lm_head) if self.lm_head else "none",
            "embedding": str(self.embedding) if self.embedding else "none",
            "kv_cache": self.kv_cache,
            "override": [
                {"pattern": o.pattern, "scheme": str(o.scheme)} if o.scheme else {"pattern": o.pattern, "skip": True}
                for o in self.overrides
            ],
        }
        if self.scheme is not None:
            d["scheme"] = str(self.scheme)
        if self.keep_source:
            d["keep_source"] = True
        for key in _SECTIONS:
            d[key] = dataclasses.asdict(getattr(self, key))
        return d


_TOP_KEYS = {
    "name",
    "scheme",
    "method",
    "embedding",
    "format",
    "accuracy_level",
    "lm_head",
    "override",
    "calibration",
    "gptq",
    "awq",
    "smoothquant",
    "weight_dtype",
    "kv_cache",
    "keep_source",
}
_SECTIONS = {
    "calibration": CalibrationConfig,
    "gptq": GptqOptions,
    "awq": AwqOptions,
    "smoothquant": SmoothQuantOptions,
}


def _scheme(text: str, path, key: str, method: str | None = None) -> QuantScheme | None:
    if text in ("none", "fp32", "fp16"):
        return None
    try:
        scheme = parse_scheme(text)
    except ValueError as e:
        raise InputError(path, key, str(e)) from e
    if method is not None and method != scheme.method:
        if method not in METHODS:
            raise InputError(path, "method", f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        scheme = dataclasses.replace(scheme, method=method)
    return scheme


def _section(cls, raw, path, key):
    if not isinstance(raw, dict):
        raise InputError(path, key, "must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in raw.items():
        if k not in fields:
            raise InputError(path, f"{key}.{k}", f"unknown key; expected one of {', '.join(sorted(fields))}")
        expected = type(getattr(cls(), k))
        if expected is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if type(v) is not expected:
            raise InputError(path, f"{key}.{k}", f"expected {expected.__name__}, got {type(v).__name__}")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (v != v or v < 0 or v > 1e9):
            raise InputError(path, f"{key}.{k}", f"out of range: {v}")
    return cls(**{k: (float(v) if isinstance(getattr(cls(), k), float) else v) for k, v in raw.items()})


def recipe_from_dict(raw: dict, path: str | os.PathLike = "<recipe>") -> Recipe:
    if not isinstance(raw, dict):
        raise InputError(path, None, "a recipe must be a table of keys")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise InputError(path, sorted(unknown)[0], f"unknown key; expected one of {', '.join(sorted(_TOP_KEYS))}")
    method = raw.get("method")
    scheme = _scheme(str(raw["scheme"]), path, "scheme", method) if "scheme" in raw else None
    fmt = raw.get("format", "matmulnbits")
    if fmt not in FORMATS:
        raise InputError(path, "format", f"expected one of {', '.join(FORMATS)}, got {fmt!r}")
    level = raw.get("accuracy_level", 4)
    if level not in (0, 1, 2, 3, 4) or isinstance(level, bool):
        raise InputError(path, "accuracy_level", f"expected 0..4, got {level!r}")
    lm_head = _scheme(str(raw.get("lm_head", "w8a16-g128-asym")), path, "lm_head")
    embedding = _scheme(str(raw.get("embedding", "w8a16-g64-asym")), path, "embedding")
    if embedding is not None and (not embedding.weight_only or embedding.method != "rtn"):
        raise InputError(path, "embedding", f"the embedding takes a weight-only RTN scheme, got {embedding}")
    overrides = []
    if not isinstance(raw.get("override", []), list):
        raise InputError(path, "override", "must be a list of tables ([[override]])")
    for n, o in enumerate(raw.get("override", [])):
        key = f"override[{n}]"
        if not isinstance(o, dict) or "pattern" not in o or not isinstance(o["pattern"], str):
            raise InputError(path, key, "each override needs a string 'pattern'")
        extra = set(o) - {"pattern", "scheme", "skip"}
        if extra:
            raise InputError(path, f"{key}.{sorted(extra)[0]}", "unknown key; expected pattern, scheme, skip")
        if o.get("skip", False) is True:
            overrides.append(Override(o["pattern"], None))
        elif "scheme" in o:
            s = _scheme(str(o["scheme"]), path, f"{key}.scheme", scheme.method if scheme else None)
            overrides.append(Override(o["pattern"], s))
        else:
            raise InputError(path, key, "an override needs 'scheme' or 'skip = true'")
    weight_dtype = raw.get("weight_dtype", "fp32")
    if weight_dtype not in ("fp32", "fp16"):
        raise InputError(path, "weight_dtype", f"expected fp32 or fp16, got {weight_dtype!r}")
    kv_raw = raw.get("kv_cache", "fp32")
    if not isinstance(kv_raw, str):
        raise InputError(path, "kv_cache", f"expected a string, got {type(kv_raw).__name__}")
    try:
        kv_cache = str(parse_kv_cache(kv_raw))
    except ValueError as e:
        raise InputError(path, "kv_cache", str(e)) from e
    sections = {k: _section(cls, raw[k], path, k) for k, cls in _SECTIONS.items() if k in raw}
    keep_source = raw.get("keep_source", False)
    if not isinstance(keep_source, bool):
        raise InputError(path, "keep_source", f"expected true or false, got {keep_source!r}")
    if keep_source and scheme is not None:
        raise InputError(path, "scheme", "keep_source emits the checkpoint's own codes: give no scheme")
    name = raw.get("name") or (str(scheme) if scheme else SOURCE_RECIPE if keep_source else weight_dtype)
    return Recipe(
        name=str(name),
        scheme=scheme,
        weight_dtype=weight_dtype,
        format=fmt,
        accuracy_level=level,
        lm_head=lm_head,
        embedding=embedding,
        overrides=tuple(overrides),
        kv_cache=kv_cache,
        keep_source=keep_source,
        **sections,
    )


def load_recipe(spec: str) -> Recipe:
    """A built-in name (``w4a16-g128-awq``, ``fp16``) or a path to a .toml / .yaml / .yml / .json file."""
    path = Path(spec)
    if path.suffix.lower() in (".toml", ".yaml", ".yml", ".json"):
        if not path.is_file():
            raise InputError(path, None, "recipe file not found")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() == ".toml":
                import tomllib

                raw = tomllib.loads(text)
            elif path.suffix.lower() == ".json":
                raw = json.loads(text, object_pairs_hook=_no_duplicates)
            else:
                import yaml

                raw = yaml.safe_load(text)
        except Exception as e:  # a parse error is the user's input, whatever the parser
            raise InputError(path, None, f"cannot parse recipe: {e}") from e
        return recipe_from_dict(raw, path)
    if spec == SOURCE_RECIPE:
        return recipe_from_dict({"name": SOURCE_RECIPE, "keep_source": True}, "--recipe")
    if spec in FLOAT_RECIPES:
        return Recipe(name=spec, scheme=None, weight_dtype=FLOAT_RECIPES[spec])
    return recipe_from_dict({"scheme": spec}, "--recipe")


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise ValueError(f"duplicate key {sorted(dup)[0]!r}")
    return dict(pairs)
