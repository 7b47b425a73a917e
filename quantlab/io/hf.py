"""Hugging Face checkpoint folders: ``config.json`` + safetensors (single file or sharded).

The architecture table below is the only place that knows how the supported families differ;
its defaults are those of the transformers config classes for keys a config.json leaves out.
Both the transformers 4.x config shape (``rope_theta`` + ``rope_scaling``) and the 5.x shape
(``rope_parameters`` with ``rope_theta`` inside) are read.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantlab.errors import InputError
from quantlab.io.common import (
    HF_FIELDS,
    check_head_layout,
    check_tensor_shapes,
    inside_folder,
    positive_float,
    positive_int,
    read_json_file,
    with_tokenizer_ids,
)
from quantlab.io.hf_tokenizer import hf_tokenizer_spec
from quantlab.io.safetensors_file import DTYPES, FLOAT_DTYPES, SafetensorsFile
from quantlab.io.spec import Checkpoint, ModelSpec, PreQuantized, RopeScaling

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Moe:
    """Where a config.json keeps its sparse MLP's numbers."""

    expert_size_key: str  # the experts' intermediate size
    normalize_key: str | None  # the config's renormalize-the-top-k flag; None: always renormalized
    sparse_layer_keys: bool = False  # Qwen3-MoE's mlp_only_layers and decoder_sparse_step pick dense layers


@dataclass(frozen=True)
class Architecture:
    family: str
    defaults: dict = field(default_factory=dict)  # transformers' defaults for keys config.json may omit
    attention_bias: bool | None = None  # fixed by the architecture; None: read config["attention_bias"]
    qk_norm: bool = False
    model_type: str | None = None  # config.json's model_type, when it is not the family's name
    eps_key: str = "rms_norm_eps"
    act_key: str = "hidden_act"
    norm_kind: str = "rms"
    norm_weight_offset: float = 0.0
    sandwich_norms: bool = False
    mlp_gated: bool = True
    moe: Moe | None = None
    embedding_scaled: bool = False  # embeddings x sqrt(hidden_size)
    caps_context_at_window: bool = False  # a sliding_window under max_position_embeddings caps the context
    layer_types: bool = False  # config.layer_types: sliding layers with their own RoPE base, Gemma 3's keys
    # checkpoint tensor name -> canonical name (regex, replacement), applied in order
    renames: tuple[tuple[str, str], ...] = ()


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(
        "llama",
        {"num_key_value_heads": None, "head_dim": None, "max_position_embeddings": 2048, "attention_bias": False},
    ),
    "MistralForCausalLM": Architecture(
        "mistral",
        {"num_key_value_heads": 8, "head_dim": None, "max_position_embeddings": 131072, "sliding_window": 4096},
        attention_bias=False,
        caps_context_at_window=True,
    ),
    "Qwen2ForCausalLM": Architecture(
        "qwen2", {"num_key_value_heads": 32, "head_dim": None, "max_position_embeddings": 32768}, attention_bias=True
    ),
    "Qwen3ForCausalLM": Architecture(
        "qwen3",
        {"num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768, "attention_bias": False},
        qk_norm=True,
    ),
    "Qwen3MoeForCausalLM": Architecture(
        "qwen3_moe",
        {
            "num_key_value_heads": 4,
            "head_dim": None,
            "max_position_embeddings": 32768,
            "attention_bias": False,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "moe_intermediate_size": 768,
            "norm_topk_prob": False,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
        qk_norm=True,
        moe=Moe("moe_intermediate_size", "norm_topk_prob", sparse_layer_keys=True),
    ),
    "MixtralForCausalLM": Architecture(
        "mixtral",
        {
            "num_key_value_heads": 8,
            "head_dim": None,
            "max_position_embeddings": 131072,
            "rope_theta": 1e6,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "sliding_window": None,
        },
        attention_bias=False,
        moe=Moe("intermediate_size", None),
        caps_context_at_window=True,
        renames=(
            (r"\.block_sparse_moe\.gate\.", ".mlp.gate."),
            (r"\.block_sparse_moe\.experts\.(\d+)\.w1\.", r".mlp.experts.\1.gate_proj."),
            (r"\.block_sparse_moe\.experts\.(\d+)\.w3\.", r".mlp.experts.\1.up_proj."),
            (r"\.block_sparse_moe\.experts\.(\d+)\.w2\.", r".mlp.experts.\1.down_proj."),
        ),
    ),
    "NemotronForCausalLM": Architecture(
        "nemotron",
        {
            "num_key_value_heads": None,
            "head_dim": None,
            "max_position_embeddings": 4096,
            "attention_bias": False,
            "norm_eps": 1e-5,
            "hidden_act": "relu2",
            "partial_rotary_factor": 0.5,
        },
        eps_key="norm_eps",
        norm_kind="layernorm",
        norm_weight_offset=1.0,  # layernorm1p
        mlp_gated=False,
    ),
    "Gemma3ForCausalLM": Architecture(
        "gemma3",
        {
            "num_key_value_heads": 4,
            "head_dim": 256,
            "max_position_embeddings": 131072,
            "attention_bias": False,
            "tie_word_embeddings": True,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 256,
            "sliding_window": 4096,
            "rope_theta": 1e6,
            "rope_local_base_freq": 10000.0,
        },
        qk_norm=True,
        model_type="gemma3_text",
        act_key="hidden_activation",
        norm_weight_offset=1.0,
        sandwich_norms=True,
        embedding_scaled=True,
        layer_types=True,
    ),
}
# config.json activation name -> ModelSpec.mlp_activation
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "relu2": "relu2"}
MODEL_TYPES = {
    arch.model_type or arch.family: name for name, arch in ARCHITECTURES.items()
}  # for configs without "architectures"
COMMON_DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0, "hidden_act": "silu"}
REQUIRED_DIMS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# A folder written by `quantlab distill --mode qat` carries its trained integers beside the float weights.
QUANTIZATION_FILE = "quantization.json"
QUANTIZATION_WEIGHTS = "quantization.safetensors"
PREQUANTIZED_FORMAT = "quantlab-prequantized"


def read_config(folder: Path) -> tuple[Path, dict]:
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(path, None, "config.json not found in the checkpoint folder")
    config = read_json_file(path)
    if not isinstance(config, dict):
        raise InputError(path, None, "config.json must hold a JSON object")
    return path, config


def architecture_of(config: dict, path) -> tuple[str, Architecture]:
    names = config.get("architectures")
    model_type = config.get("model_type")
    if names is None and isinstance(model_type, str) and model_type in MODEL_TYPES:
        names = [MODEL_TYPES[model_type]]
    if not isinstance(names, list) or len(names) != 1 or not isinstance(names[0], str) or names[0] not in ARCHITECTURES:
        raise InputError(path, "architectures", f"unsupported {names!r}; supported: {', '.join(ARCHITECTURES)}")
    return names[0], ARCHITECTURES[names[0]]


def _rope(config: dict, path, arch: Architecture) -> tuple[float, RopeScaling | None, float, float | None]:
    """(theta, llama3 scaling or None, rotary fraction, sliding layers' theta or None) from either config
    shape; with ``arch.layer_types`` rope_parameters may hold one entry per layer type (transformers 5) or
    the 4.x keys rope_theta + rope_local_base_freq."""
    params = config.get("rope_parameters")
    local_theta = None
    if arch.layer_types and isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        unknown = set(params) - {"full_attention", "sliding_attention"}
        if unknown:
            raise InputError(path, "rope_parameters", f"unknown layer types {sorted(unknown)}")
        local = params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise InputError(path, "rope_parameters.sliding_attention.rope_type", "only default RoPE is supported")
        if "rope_theta" in local:
            local_theta = positive_float(local["rope_theta"], path, "rope_parameters.sliding_attention.rope_theta")
        params = params.get("full_attention") or {}
    elif arch.layer_types:
        key = "rope_local_base_freq"
        local_theta = positive_float(config.get(key, arch.defaults.get(key)), path, key)
    if params is not None:
        prefix = "rope_parameters"
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise InputError(path, prefix, "per-layer-type RoPE parameters are not supported")
        default_theta = config.get("rope_theta", arch.defaults.get("rope_theta", COMMON_DEFAULTS["rope_theta"]))
        theta = params.get("rope_theta", default_theta)
        scaling = params
    else:
        prefix = "rope_scaling"
        theta = config.get("rope_theta", arch.defaults.get("rope_theta", COMMON_DEFAULTS["rope_theta"]))
        scaling = config.get("rope_scaling") or {}
        if not isinstance(scaling, dict):
            raise InputError(path, prefix, f"expected an object or null, got {scaling!r}")
    theta = positive_float(theta, path, f"{prefix}.rope_theta" if params is not None else "rope_theta")
    default_partial = config.get("partial_rotary_factor", arch.defaults.get("partial_rotary_factor", 1.0))
    partial = positive_float(scaling.get("partial_rotary_factor", default_partial), path, "partial_rotary_factor")
    if partial > 1.0:
        raise InputError(path, "partial_rotary_factor", f"expected a fraction in (0, 1], got {partial}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None, partial, local_theta
    if rope_type != "llama3":
        raise InputError(
            path, f"{prefix}.rope_type", f"unsupported RoPE type {rope_type!r}; supported: default, llama3"
        )
    values = {}
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if key not in scaling:
            raise InputError(path, f"{prefix}.{key}", "missing (llama3 RoPE scaling needs it)")
        values[key] = positive_float(scaling[key], path, f"{prefix}.{key}")
    key = "original_max_position_embeddings"
    if key not in scaling:
        raise InputError(path, f"{prefix}.{key}", "missing (llama3 RoPE scaling needs it)")
    scaled = RopeScaling(**values, original_max_position_embeddings=positive_int(scaling[key], path, key))
    return theta, scaled, partial, local_theta


def _layer_list(value, path, key: str, num_layers: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise InputError(path, key, f"expected a list of layer indices, got {value!r}")
    if any(not 0 <= i < num_layers for i in value):
        raise InputError(path, key, f"layer indices must be in [0, {num_layers}), got {value!r}")
    return tuple(sorted(set(value)))


def _moe_fields(cfg: dict, arch: Architecture, path, num_layers: int) -> dict:
    """The ModelSpec fields of a sparse MLP, from the config keys ``arch.moe`` names."""
    moe = arch.moe
    if moe is None:
        return {}
    # transformers 5 writes num_local_experts for Qwen3-MoE too (its attribute map); Qwen's own configs num_experts
    key = "num_local_experts" if "num_local_experts" in cfg else "num_experts"
    experts = positive_int(cfg[key], path, key)
    top_k = positive_int(cfg["num_experts_per_tok"], path, "num_experts_per_tok")
    if top_k > experts:
        raise InputError(path, "num_experts_per_tok", f"{top_k} is more than the {experts} experts")
    normalize = True if moe.normalize_key is None else cfg[moe.normalize_key]
    if not isinstance(normalize, bool):
        raise InputError(path, moe.normalize_key, f"expected true or false, got {normalize!r}")
    layers = range(num_layers)
    if moe.sparse_layer_keys:
        dense = set(_layer_list(cfg["mlp_only_layers"], path, "mlp_only_layers", num_layers))
        step = positive_int(cfg["decoder_sparse_step"], path, "decoder_sparse_step")
        layers = [i for i in layers if i not in dense and (i + 1) % step == 0]
    return {
        "num_experts": experts,
        "experts_per_token": top_k,
        "moe_intermediate_size": positive_int(cfg[moe.expert_size_key], path, moe.expert_size_key),
        "moe_normalize_topk": normalize,
        "moe_layers": tuple(layers),
    }


def _layer_type_fields(cfg: dict, config: dict, path, num_layers: int) -> dict:
    """Sliding layers, window, attention scale and logit soft-capping (Gemma 3's keys).

    attn_logit_softcapping is left out: transformers' Gemma 3 stores it but never applies it (Gemma 2 did),
    and transformers is what the weights were trained and are tested against."""
    types = config.get("layer_types")
    if types is None:  # transformers 4.x: every sliding_window_pattern-th layer is global
        pattern = positive_int(config.get("sliding_window_pattern", 6), path, "sliding_window_pattern")
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers:
        raise InputError(path, "layer_types", f"expected a list of {num_layers} layer types")
    if set(types) - {"full_attention", "sliding_attention"}:
        raise InputError(path, "layer_types", f"unsupported layer types {sorted(set(types))}")
    if cfg.get("use_bidirectional_attention"):
        raise InputError(path, "use_bidirectional_attention", "bidirectional attention is not supported")
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    fields = {"sliding_layers": sliding, "sliding_window": 0}
    if sliding:
        fields["sliding_window"] = positive_int(cfg["sliding_window"], path, "sliding_window")
    scalar = positive_float(cfg["query_pre_attn_scalar"], path, "query_pre_attn_scalar")
    fields["attention_scale"] = float(scalar**-0.5)
    if cfg.get("final_logit_softcapping") is not None:
        fields["final_softcap"] = positive_float(cfg["final_logit_softcapping"], path, "final_logit_softcapping")
    if cfg.get("attn_logit_softcapping") is not None:
        logger.warning("%s: attn_logit_softcapping is ignored, as transformers' Gemma 3 ignores it", path)
    return fields


def _token_ids(value, path, field: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise InputError(path, field, f"expected a token id or a list of token ids, got {value!r}")
    return tuple(dict.fromkeys(values))


def spec_from_hf_config(config: dict, path: str | os.PathLike) -> ModelSpec:
    """Validate a config.json of a family in ARCHITECTURES and normalize it into a ModelSpec."""
    _, arch = architecture_of(config, path)
    cfg = {**COMMON_DEFAULTS, **arch.defaults, **config}  # an explicit null keeps its meaning (derive it)
    if "quantization_config" in config:
        raise InputError(path, "quantization_config", "already-quantized checkpoints are not supported")
    for key in REQUIRED_DIMS:
        if key not in config:
            raise InputError(path, key, "missing")
    dims = {key: positive_int(cfg[key], path, key) for key in REQUIRED_DIMS}
    heads = dims["num_attention_heads"]
    kv_heads = positive_int(cfg.get("num_key_value_heads") or heads, path, "num_key_value_heads")
    head_dim = positive_int(cfg.get("head_dim") or dims["hidden_size"] // heads, path, "head_dim")
    check_head_layout(path, heads=heads, kv_heads=kv_heads, head_dim=head_dim, fields=HF_FIELDS)
    activation = ACTIVATIONS.get(cfg[arch.act_key]) if isinstance(cfg[arch.act_key], str) else None
    if activation is None or (arch.mlp_gated and activation == "relu2") or (arch.moe and activation != "silu"):
        raise InputError(path, arch.act_key, f"unsupported MLP activation {cfg[arch.act_key]!r}")
    if cfg.get("mlp_bias"):
        raise InputError(path, "mlp_bias", "MLP biases are not supported")
    if cfg.get("use_sliding_window"):
        raise InputError(path, "use_sliding_window", "sliding-window attention is not supported")
    max_pos = positive_int(cfg["max_position_embeddings"], path, "max_position_embeddings")
    window = cfg.get("sliding_window") if arch.caps_context_at_window else None
    if window is not None and positive_int(window, path, "sliding_window") < max_pos:
        # Within the window, sliding attention is full attention: cap the context where results are exact.
        logger.warning("%s: sliding_window %d < max_position_embeddings %d; capping the context", path, window, max_pos)
        max_pos = int(window)
    theta, scaling, rope_fraction, local_theta = _rope(config, path, arch)
    layers = dims["num_hidden_layers"]
    extra = {**_moe_fields(cfg, arch, path, layers)}
    if arch.layer_types:
        extra.update(_layer_type_fields(cfg, config, path, layers), sliding_rope_theta=local_theta)
    if arch.embedding_scaled:
        extra["embedding_scale"] = float(np.float32(dims["hidden_size"] ** 0.5))
    if int(head_dim * rope_fraction) % 2 or int(head_dim * rope_fraction) == 0:
        raise InputError(path, "partial_rotary_factor", f"{rope_fraction} of head_dim {head_dim} is no even width")
    bias = arch.attention_bias if arch.attention_bias is not None else cfg.get("attention_bias", False)
    if not isinstance(bias, bool):
        raise InputError(path, "attention_bias", f"expected true or false, got {bias!r}")
    tie = cfg["tie_word_embeddings"]
    if not isinstance(tie, bool):
        raise InputError(path, "tie_word_embeddings", f"expected true or false, got {tie!r}")
    bos = _token_ids(config.get("bos_token_id"), path, "bos_token_id")
    return ModelSpec(
        family=arch.family,
        vocab_size=dims["vocab_size"],
        hidden_size=dims["hidden_size"],
        intermediate_size=dims["intermediate_size"],
        num_layers=dims["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=positive_float(cfg[arch.eps_key], path, arch.eps_key),
        rope_theta=theta,
        max_position_embeddings=max_pos,
        tie_word_embeddings=tie,
        rope_interleaved=False,
        rope_scaling=scaling,
        attention_bias=bias,
        qk_norm=arch.qk_norm,
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=_token_ids(config.get("eos_token_id"), path, "eos_token_id"),
        norm_kind=arch.norm_kind,
        norm_weight_offset=arch.norm_weight_offset,
        sandwich_norms=arch.sandwich_norms,
        mlp_activation=activation,
        mlp_gated=arch.mlp_gated,
        rope_fraction=rope_fraction,
        **extra,
    )


def select_tensors(spec: ModelSpec, shapes: dict, *, config_path, weights_path) -> None:
    """Check shapes against the spec; tensors the spec does not use are an error unless harmless."""
    for name in check_tensor_shapes(spec, shapes, config_path=config_path, fields=HF_FIELDS, weights_path=weights_path):
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and spec.tie_word_embeddings:
            logger.warning("%s: tie_word_embeddings is true; ignoring the stored lm_head.weight", config_path)
            continue
        raise InputError(weights_path, name, "tensor not described by config.json (a feature this reader lacks?)")


def canonical_names(arch: Architecture, owner: dict) -> dict[str, str]:
    """Checkpoint tensor name -> canonical name, for the names ``arch.renames`` changes."""
    renamed = {}
    for name in owner:
        canonical = name
        for pattern, replacement in arch.renames:
            canonical = re.sub(pattern, replacement, canonical)
        if canonical != name:
            if canonical in owner:
                raise InputError(owner[name].path, name, f"both {name!r} and {canonical!r} are stored")
            renamed[name] = canonical
    return renamed


class SafetensorsSource:
    """TensorSource over one or more validated safetensors files."""

    def __init__(self, files: dict[str, SafetensorsFile], names: list[str], stored: dict[str, str] | None = None):
        self._files = files  # canonical name -> the file that holds it
        self._names = names
        self._stored = stored or {}  # canonical name -> the name in the file, where they differ

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[name].shape(self._stored.get(name, name))

    def load(self, name: str) -> np.ndarray:
        return self._files[name].load(self._stored.get(name, name))


def _open_shards(folder: Path) -> tuple[Path, dict[str, SafetensorsFile]]:
    """(the file to blame for missing tensors, tensor name -> file), with the index validated."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        index = read_json_file(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(index_path, "weight_map", "must be a non-empty object of tensor name -> shard file")
        shards: dict[str, SafetensorsFile] = {}
        for name, shard in weight_map.items():
            if shard not in shards:
                shards[shard] = SafetensorsFile(inside_folder(folder, shard, index_path, "weight_map"))
            if name not in shards[shard].tensors:
                raise InputError(index_path, "weight_map", f"{name!r} is mapped to {shard!r}, which does not hold it")
        owner: dict[str, SafetensorsFile] = {}
        for shard_file in shards.values():
            for name in shard_file.tensors:
                if name in owner:
                    raise InputError(shard_file.path, name, f"tensor also stored in {owner[name].path.name}")
                owner[name] = shard_file
        return index_path, owner
    single = folder / "model.safetensors"
    if not single.is_file():
        candidates = sorted(folder.glob("*.safetensors"))
        if len(candidates) != 1:
            raise InputError(folder, "model.safetensors", "not found (and no model.safetensors.index.json)")
        single = candidates[0]
    one = SafetensorsFile(single)
    return single, {name: one for name in one.tensors}


def load_hf_folder(folder: str | os.PathLike, *, tokenizer_path=None) -> Checkpoint:
    """Read a Hugging Face checkpoint folder; tensors stay on disk until loaded."""
    folder = Path(folder)
    config_path, config = read_config(folder)
    spec = spec_from_hf_config(config, config_path)
    weights_path, owner = _open_shards(folder)
    stored = canonical_names(architecture_of(config, config_path)[1], owner)
    owner = {stored.get(name, name): f for name, f in owner.items()}
    stored = {canonical: name for name, canonical in stored.items()}
    shapes = {name: f.shape(stored.get(name, name)) for name, f in owner.items()}
    select_tensors(spec, shapes, config_path=config_path, weights_path=weights_path)
    names = list(spec.expected_shapes())
    for name in names:
        dtype = owner[name].tensors[stored.get(name, name)].dtype
        if dtype not in FLOAT_DTYPES:
            raise InputError(owner[name].path, stored.get(name, name), f"dtype {dtype} is not a float type")
    if tokenizer_path is None and not (folder / "tokenizer.json").is_file() and (folder / "tokenizer.bin").is_file():
        tokenizer_path = folder / "tokenizer.bin"  # a llama2.c tokenizer (a student of a llama2.c teacher)
    tokenizer = hf_tokenizer_spec(folder, spec, tokenizer_path=tokenizer_path)
    if tokenizer is not None:
        spec = with_tokenizer_ids(spec, tokenizer)
    files = sorted({str(f.path) for f in owner.values()})
    extra = [str(p) for p in (weights_path,) if p.name.endswith(".index.json")]
    return Checkpoint(
        spec=spec,
        tensors=SafetensorsSource({n: owner[n] for n in names}, names, {n: stored[n] for n in names if n in stored}),
        tokenizer=tokenizer,
        source_format="hf-safetensors",
        source_files=(str(config_path), *extra, *files, *_prequantized_files(folder)),
        hf_config=config,
        prequantized=read_prequantized(folder, spec),
    )


def _prequantized_files(folder: Path) -> tuple[str, ...]:
    paths = (folder / QUANTIZATION_FILE, folder / QUANTIZATION_WEIGHTS)
    return tuple(str(p) for p in paths if p.is_file())


def _raw_tensor(file: SafetensorsFile, name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    entry = file.tensors.get(name)
    if entry is None:
        raise InputError(file.path, name, "missing")
    if entry.dtype != dtype or entry.shape != shape:
        raise InputError(file.path, name, f"expected {dtype} {list(shape)}, got {entry.dtype} {list(entry.shape)}")
    np_dtype, width = DTYPES[dtype]
    count = (entry.end - entry.begin) // width
    return np.fromfile(file.path, dtype=np_dtype, count=count, offset=entry.begin).reshape(shape)


def read_prequantized(folder: Path, spec: ModelSpec) -> PreQuantized | None:
    """The trained integer codes of a distilled student (quantization.json + quantization.safetensors),
    validated against the spec; None for an ordinary folder."""
    from quantlab.quant.rtn import QuantizedWeight, group_count
    from quantlab.quant.scheme import parse_scheme

    path = folder / QUANTIZATION_FILE
    if not path.is_file():
        return None
    description = read_json_file(path)
    if not isinstance(description, dict) or description.get("format") != PREQUANTIZED_FORMAT:
        raise InputError(path, "format", f"expected {PREQUANTIZED_FORMAT!r}")
    recipe, linears = description.get("recipe"), description.get("linears")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("scheme"), str):
        raise InputError(path, "recipe", "must be a recipe object with a scheme")
    try:
        scheme = parse_scheme(recipe["scheme"])
    except ValueError as e:
        raise InputError(path, "recipe.scheme", str(e)) from None
    if not isinstance(linears, list) or not all(isinstance(n, str) for n in linears):
        raise InputError(path, "linears", "must be a list of linear names")
    shapes = spec.expected_shapes()
    weights = {}
    codes_file = SafetensorsFile(folder / QUANTIZATION_WEIGHTS)
    for name in linears:
        if f"{name}.weight" not in shapes:
            raise InputError(path, "linears", f"{name!r} is not a linear of this model")
        n, k = shapes[f"{name}.weight"]
        groups = (n, group_count(k, scheme.group_size))
        zero_points = None
        if not scheme.symmetric:
            zero_points = _raw_tensor(codes_file, f"{name}.zero_points", "U8", groups)
        scales = _raw_tensor(codes_file, f"{name}.scales", "F32", groups)
        if not np.isfinite(scales).all():
            raise InputError(codes_file.path, f"{name}.scales", "not finite")
        try:
            weights[name] = QuantizedWeight(
                _raw_tensor(codes_file, f"{name}.codes", "U8", (n, k)),
                scales,
                zero_points,
                scheme.bits,
                scheme.group_size,
            )
        except ValueError as e:
            raise InputError(codes_file.path, name, str(e)) from None
    return PreQuantized(recipe=recipe, weights=weights, path=str(path))
