"""Text generation over onnxruntime with the decoder's KV cache.

The artifact's ``genai_config.json`` names the cache inputs and outputs; the cache tensors' element
types, their last dimension and any scale tensors beside them (``past_key_values.{i}.key_scale``) are
read from the session, so a graph whose cache is quantized runs through the same loop.

:func:`generate_batch` runs many prompts through one KV cache of batch B: the prompts are padded on
the left, and ``attention_mask`` and ``position_ids`` are kept per sequence, so each sequence gets the
tokens it would get alone.

A bounded cache (:class:`BoundedCache`, attention sinks + sliding window, StreamingLLM, arXiv
2309.17453) is a policy of the generation loop: after each step the cache keeps its first ``sinks``
and last ``window`` tokens, so it never holds more than ``sinks + window`` tokens however long the
generation runs.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from quantlab.graph_builder.kv_cache import RESIDUAL_SUFFIX, SCALE_SUFFIX, TAIL_SUFFIX

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int64)": np.int64,
}


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Greedy (argmax) decoding, or seeded sampling with temperature, top-k and top-p (nucleus)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")


GREEDY = SamplingConfig()

POSITION_MODES = ("original", "cache")


BOUNDED_CHANNEL_KEYS = (
    "a bounded cache (--kv-window) evicts single tokens, and a -channel-keys cache (int2-r32-channel-keys) quantizes "
    "keys in blocks that share scales: use a per-token format (kivi2 = int2-r32-smooth) or no window"
)


@dataclasses.dataclass(frozen=True)
class BoundedCache:
    """Attention sinks + sliding window: keep the first ``sinks`` and the last ``window`` cached tokens.

    ``positions``: the position id given to a new token. ``original`` (the default) is its index in the
    whole generated text: the cached keys were rotated (RoPE) at their own original positions, so
    query-key distances inside the window stay exact, only the sinks look far away. ``cache`` is its
    index inside the cache, StreamingLLM's choice; with keys cached after RoPE (as our graph does)
    that puts the query at a position before keys it follows, which
    ``benchmarks/bench_kv_cache.py`` measures as worse.
    """

    window: int
    sinks: int = 4
    positions: str = "original"

    def __post_init__(self):
        if self.window < 1 or self.sinks < 0:
            raise ValueError("window must be >= 1 and sinks >= 0")
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {', '.join(POSITION_MODES)}")

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    def evict(self, cache: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every cache tensor is (batch, kv_heads, seq, ...): keep seq [0, sinks) and [seq - window, seq)."""
        length = cache_length(cache)
        if length <= self.capacity:
            return cache
        if any(name.endswith(TAIL_SUFFIX) for name in cache):
            raise ValueError(BOUNDED_CHANNEL_KEYS)
        keep = np.r_[0 : self.sinks, length - self.window : length]
        out = {}
        for name, t in cache.items():
            if name.endswith(RESIDUAL_SUFFIX):  # the latest tokens: still the latest after eviction
                if t.shape[2] > self.window:
                    raise ValueError(f"window {self.window} is shorter than the cache's residual window")
                out[name] = t
            else:
                out[name] = np.ascontiguousarray(t[:, :, keep])
        return out


def freeze_heap() -> None:
    """Once the model is loaded, before decoding: collect, then take every object alive (the imported modules,
    the model) out of the cyclic collector's walks (``gc.freeze``). A decode loop allocates enough to trigger
    full collections, and each walked the ~200k objects of torch, onnx and numpy: ~4% of a batch-16 decode
    step on the native layers (SmolLM2, measured). What the loop itself leaves behind is still collected."""
    gc.collect()
    gc.freeze()


def cache_length(cache: dict[str, np.ndarray]) -> int:
    """Tokens in the cache: the sequence axis of its first tensor (a key, never a residual window), plus
    that key's f32 tail with a -channel-keys format (whole blocks in the key, the rest in the tail)."""
    if not cache:
        return 0
    name, first = next(iter(cache.items()))
    tail = cache.get(name + TAIL_SUFFIX)
    return first.shape[2] + (tail.shape[2] if tail is not None else 0)


def cache_bytes(cache: dict[str, np.ndarray]) -> int:
    """Bytes the cache tensors hold (scales and residual windows included)."""
    return int(sum(t.nbytes for t in cache.values()))


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """logits (vocab,) -> next token id."""
        if self.config.greedy:
            return int(np.argmax(logits))
        order, p = candidates(logits, self.config)
        return int(order[self.rng.choice(len(p), p=p)])


_HEAD = 1024  # tokens sorted by a sampling step before it falls back to sorting the whole vocabulary


def candidates(logits: np.ndarray, config: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """logits (vocab,) -> (token ids, their probabilities) that sampling draws from: temperature, then the
    top-k likeliest, then the smallest prefix whose mass reaches top-p (always at least one token).

    Token ids come likeliest first, ties in id order. Only the likeliest ``_HEAD`` are sorted (a partition
    finds them; the rest are only summed): sorting 49k logits per token was most of a sampled batch-16
    decoding step. Where the prefix could reach past them (top-p mass not reached inside, or a tie with a
    token outside at their edge), the whole vocabulary is sorted instead, so the tokens are the same."""
    z = logits.astype(np.float64) / config.temperature
    n = z.size
    k = min(config.top_k or n, n)
    if _HEAD < n and (k <= _HEAD or (k == n and config.top_p < 1.0)):
        picked = _partial(z, k, config.top_p)
        if picked is not None:
            return picked
    order = np.argsort(-z, kind="stable")[:k]
    z = z[order]
    p = np.exp(z - z[0])
    p /= p.sum()
    return _top_p(order, p, config.top_p)


def _top_p(order: np.ndarray, p: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        p = p[:keep] / p[:keep].sum()
        order = order[:keep]
    return order, p


def _partial(z: np.ndarray, k: int, top_p: float) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`candidates` from the likeliest ``min(k, _HEAD)`` tokens, or None where that could differ."""
    head = min(k, _HEAD)
    part = np.argpartition(-z, head - 1)[:head]
    order = part[np.lexsort((part, -z[part]))]  # likeliest first, ties in id order, as the stable sort
    zs = z[order]
    edge = zs[-1]
    e = np.exp(zs - zs[0])
    p = e / (e.sum() if k == head else np.exp(z - zs[0]).sum())  # top-k's mass, or the whole vocabulary's
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        if keep > head or (keep == head and k > head):
            return None  # the top-p prefix reaches past the sorted tokens
    else:
        keep = head
    if zs[keep - 1] == edge and np.count_nonzero(z == edge) > np.count_nonzero(zs == edge):
        return None  # tied with a token outside the partition: the stable sort may have kept another id
    p = p[:keep] / p[:keep].sum()
    return order[:keep], p


class OrtDecoder:
    """One onnxruntime session over an artifact's decoder, with cache handling."""

    def __init__(
        self,
        artifact_dir: str | os.PathLike,
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        model_file: str = "model.onnx",
        session_config: dict[str, str] | None = None,
    ):
        import onnxruntime as ort

        self.dir = Path(artifact_dir)
        cfg = json.loads((self.dir / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]
        self.num_layers = int(cfg["num_hidden_layers"])
        self.kv_heads = int(cfg["num_key_value_heads"])
        self.head_dim = int(cfg["head_size"])
        names = cfg["inputs"]
        self.past_key_names = [names["past_key_names"] % i for i in range(self.num_layers)]
        self.past_value_names = [names["past_value_names"] % i for i in range(self.num_layers)]
        outs = cfg["outputs"]
        present_names = [outs["present_key_names"] % i for i in range(self.num_layers)]
        present_names += [outs["present_value_names"] % i for i in range(self.num_layers)]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        for key, value in (session_config or {}).items():
            opts.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(
            str(self.dir / model_file), sess_options=opts, providers=list(providers or ["CPUExecutionProvider"])
        )
        inputs = self.session.get_inputs()
        self.input_types = {i.name: _ORT_TYPES.get(i.type, np.float32) for i in inputs}
        self.input_names = set(self.input_types)
        self.output_names = [o.name for o in self.session.get_outputs()]
        # past name -> present name, for the cache tensors and any scale tensors beside them
        self.cache_names: dict[str, str] = {}
        for past, present in zip(self.past_key_names + self.past_value_names, present_names, strict=True):
            self.cache_names[past] = present
            for suffix in (SCALE_SUFFIX, RESIDUAL_SUFFIX, TAIL_SUFFIX):
                if past + suffix in self.input_names:
                    self.cache_names[past + suffix] = present + suffix
        # the cache's last dimension: head_dim, head_dim / 2 for packed int4, groups for a scale
        self.cache_last_dim = {
            i.name: int(i.shape[3]) if isinstance(i.shape[3], int) else self.head_dim
            for i in inputs
            if i.name in self.cache_names
        }

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        return {
            n: np.zeros((batch, self.kv_heads, 0, d), dtype=self.input_types[n])  # (batch, kv_heads, seq, d)
            for n, d in self.cache_last_dim.items()
        }

    def forward(
        self,
        input_ids: np.ndarray,
        cache: dict[str, np.ndarray],
        *,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """input_ids (batch, seq) after ``past`` cached tokens -> logits (batch, seq, vocab), new cache."""
        batch, seq = input_ids.shape
        past = cache_length(cache)
        if attention_mask is None:
            attention_mask = np.ones((batch, past + seq), dtype=np.int64)
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)).copy()
        feeds = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
            "position_ids": position_ids.astype(np.int64),
            **cache,
        }
        # a graph that derives positions from the mask (onnxruntime-genai's builder) has no position_ids
        feeds = {name: value for name, value in feeds.items() if name in self.input_names}
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))
        new_cache = {past_name: outputs[present] for past_name, present in self.cache_names.items()}
        return outputs["logits"], new_cache


def generate(
    decoder: OrtDecoder,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    stop_ids: Sequence[int] = (),
    bounded: BoundedCache | None = None,
    on_step: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> Iterator[int]:
    """Yield generated token ids (the prompt excluded), stopping after a stop id or max_new_tokens.

    With ``bounded`` the cache is cut back to its sinks and window after every step (the prompt goes
    through in one forward first, attending to all of itself). ``on_step(cache)`` sees the cache
    carried to the next step (after any eviction).
    """
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    sample = Sampler(sampling)
    stop = set(stop_ids)
    cache = decoder.empty_cache()
    tokens = np.asarray([list(prompt_ids)], dtype=np.int64)  # (1, prompt_len)
    processed = 0  # tokens the model has seen: the original position of the next one
    for _ in range(max_new_tokens):
        position_ids = None  # the default: positions continue from the cache length
        if bounded is not None and bounded.positions == "original":
            position_ids = np.arange(processed, processed + tokens.shape[1], dtype=np.int64)[None, :]
        logits, cache = decoder.forward(tokens, cache, position_ids=position_ids)
        processed += tokens.shape[1]
        if bounded is not None:
            cache = bounded.evict(cache)
        if on_step is not None:
            on_step(cache)
        next_id = sample(logits[0, -1])
        yield next_id
        if next_id in stop:
            return
        tokens = np.asarray([[next_id]], dtype=np.int64)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, position_ids), each (batch, longest prompt) int64: every prompt ends at
    the last column, the padding in front of it is masked out, and positions count from 0 at each
    prompt's first token (padding gets position 0: masked, it never reaches a real token)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), pad_id, dtype=np.int64)  # (batch, longest)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = prompt
        mask[row, longest - len(prompt) :] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


def generate_batch(
    decoder: OrtDecoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
) -> list[list[int]]:
    """The generated ids of every prompt (prompts excluded), one forward per step for the whole batch.

    Each sequence has its own sampler seeded with ``sampling.seed``, so sequence i gets exactly what
    :func:`generate` gives prompt i alone, up to the float rounding that a padded, batched matmul may
    order differently. A sequence that stops (a stop id, kept in its output) leaves the batch: its rows
    are cut out of the cache, and the others carry on.
    """
    samplers = [Sampler(sampling) for _ in prompts]
    stop = set(stop_ids)
    out: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # prompts index of each row still in the batch
    ids, mask, positions = left_pad(prompts, pad_id)
    cache = decoder.empty_cache(len(prompts))
    for _ in range(max_new_tokens):
        logits, cache = decoder.forward(ids, cache, attention_mask=mask, position_ids=positions)
        rows, next_ids = [], []
        for row, index in enumerate(active):
            token = samplers[index](logits[row, -1])
            out[index].append(token)
            if token not in stop:
                rows.append(row)
                next_ids.append(token)
        if not rows:
            break
        if len(rows) < len(active):  # every cache tensor (scales and windows too) is batch-first
            cache = {name: np.ascontiguousarray(t[rows]) for name, t in cache.items()}
            mask, positions = mask[rows], positions[rows]
            active = [active[row] for row in rows]
        ids = np.asarray(next_ids, dtype=np.int64)[:, None]  # (batch, 1)
        positions = positions[:, -1:] + 1  # (batch, 1)
        mask = np.concatenate([mask, np.ones((len(active), 1), dtype=np.int64)], axis=1)  # (batch, total)
    return out
