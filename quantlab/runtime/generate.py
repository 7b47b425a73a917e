"""Text generation over onnxruntime with the decoder's KV cache.

The artifact's ``genai_config.json`` names the cache inputs and outputs; the cache tensors' element
types are read from the session, so a graph whose cache is compressed runs through the same loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

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


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """logits (vocab,) -> next token id."""
        c = self.config
        if c.greedy:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / c.temperature
        order = np.argsort(-z, kind="stable")
        if c.top_k:
            order = order[: c.top_k]
        z = z[order]
        p = np.exp(z - z.max())
        p /= p.sum()
        if c.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            keep = int(np.searchsorted(np.cumsum(p), c.top_p) + 1)
            p = p[:keep] / p[:keep].sum()
            order = order[:keep]
        return int(order[self.rng.choice(len(p), p=p)])


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
        self.input_types = {i.name: _ORT_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.input_names = set(self.input_types)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)  # (batch, kv_heads, seq, head_dim)
        return {n: np.zeros(shape, dtype=self.input_types[n]) for n in self.past_key_names + self.past_value_names}

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
        past = next(iter(cache.values())).shape[2] if cache else 0
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
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))
        new_cache = {}
        for i in range(self.num_layers):
            new_cache[self.past_key_names[i]] = outputs[f"present.{i}.key"]
            new_cache[self.past_value_names[i]] = outputs[f"present.{i}.value"]
        return outputs["logits"], new_cache


def generate(
    decoder: OrtDecoder,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    stop_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Yield generated token ids (the prompt excluded), stopping after a stop id or max_new_tokens."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    sample = Sampler(sampling)
    stop = set(stop_ids)
    cache = decoder.empty_cache()
    tokens = np.asarray([list(prompt_ids)], dtype=np.int64)  # (1, prompt_len)
    for _ in range(max_new_tokens):
        logits, cache = decoder.forward(tokens, cache)
        next_id = sample(logits[0, -1])
        yield next_id
        if next_id in stop:
            return
        tokens = np.asarray([[next_id]], dtype=np.int64)
